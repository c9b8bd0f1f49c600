"""The Attach page in a browser (headless Chromium through Playwright) against `fiona web`:
a user with the assign role uploads a DICOM zip from a CD; the first chunk's connection is
dropped (Playwright aborts it), attach.js asks the server where the upload stands, sends it
again, and the page shows the job done; the objects are in the archive."""

from __future__ import annotations

import zipfile

import pytest
from playwright.sync_api import Page, Route, expect

from browser import start_web_and_log_in
from dicomgen import make_study
from helpers import Gateway, free_port

USER, PASSWORD = "pat", "correct horse battery staple 7"


@pytest.mark.e2e
def test_upload_survives_a_dropped_chunk_and_shows_done(page: Page, tmp_path):
    port = free_port()
    gw = Gateway(tmp_path / "data", free_port(), {"WEB": {"host": "127.0.0.1", "port": port}})
    gw.run("project", "add", "PATH", "--naming", "^P[0-9]{4}$", "--events", "baseline")
    study = make_study(tmp_path / "cd", n_series=1, images_per_series=3)
    with zipfile.ZipFile(tmp_path / "cd.zip", "w") as z:
        for f in study["files"]:
            z.write(f, f"DICOM/{f.name}")
    start_web_and_log_in(page, gw, port, USER, PASSWORD, "project:PATH:assign", tmp_path)
    page.locator("#nav-attach").click()
    dropped = []

    def drop_first_chunk(route: Route) -> None:
        if route.request.method == "PUT" and not dropped:
            dropped.append(route.request.url)
            route.abort("connectionreset")
        else:
            route.continue_()
    page.route("**/api/attach/uploads/*", drop_first_chunk)
    page.get_by_label("Participant").fill("P0001")
    page.get_by_label("File").set_input_files(str(tmp_path / "cd.zip"))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-text")).to_contain_text("done: 3 object(s)", timeout=60_000)
    assert dropped
    assert len(list(gw.tree.study_archive(study["study"]).iterdir())) == 3
