"""The Exports page in a browser (headless Debian Chromium through Playwright) against `fiona web`
and `fiona export-worker` running as real processes: a researcher with the export role asks for
an export of a delivered study, watches it turn ready without reloading the page, downloads it,
and the file's SHA-256 matches the `.sha256` the page offers. A screenshot goes to
`test-artifacts/web-exports.png`."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browser import start_web_and_log_in
from helpers import free_port
from test_export_worker import deliver, gateway

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
USER, PASSWORD = "rita", "correct horse battery staple 9"


@pytest.mark.e2e
def test_request_watch_ready_and_download_an_export(page: Page, tmp_path):
    port = free_port()
    gw, research = gateway(tmp_path, {"WEB": {"host": "127.0.0.1", "port": port}})
    try:
        mapped = deliver(tmp_path, gw, research)
        url = start_web_and_log_in(page, gw, port, USER, PASSWORD, "project:PROJ:export",
                                   tmp_path)
        page.locator("#nav-exports").click()
        expect(page.get_by_role("heading", name="Request an export")).to_be_visible()
        row = page.locator("#candidates tbody tr", has_text="P0001")
        expect(row).to_contain_text("followup")
        row.get_by_role("checkbox").check()
        page.get_by_label("Export type").select_option("dicom")
        page.get_by_role("button", name="Request export").click()
        expect(page.locator("#message")).to_contain_text("Export requested")
        job = page.locator("#jobs tr.job").first
        expect(job.locator("td.state")).to_have_text("queued")

        # the worker starts only now, so the page surely saw the job queued; the page is
        # not reloaded (the marker would be gone) while the state turns to ready
        page.evaluate("window.notReloaded = true")
        gw.start("export-worker")
        expect(job.locator("td.state")).to_have_text("ready", timeout=120_000)
        assert page.evaluate("window.notReloaded") is True
        expect(job.locator("progress")).to_have_attribute("value", re.compile(r"^\d+$"))
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-exports.png"), full_page=True,
                        animations="disabled")  # the bar's transition: at its end

        with page.expect_download() as info:
            job.get_by_role("link", name="Download").click()
        got = Path(info.value.path()).read_bytes()
        line = page.request.get(url + job.get_by_role("link", name="SHA-256")
                                .get_attribute("href")).text()
        digest, name = line.split()
        assert hashlib.sha256(got).hexdigest() == digest and name == info.value.suggested_filename
        assert mapped not in name and (gw.tree.exports / name).read_bytes() == got
    finally:
        gw.stop_all()
