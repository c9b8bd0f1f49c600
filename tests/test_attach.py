"""Attach (issue 15) on the web: rights, bad input and a resumable upload. The site is real
(a data tree, the local control plane, the receiver's filing code); the resumable upload runs
against a real HTTP server (uvicorn in a thread) whose connection the test cuts mid-chunk."""

from __future__ import annotations

import io
import socket
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import pydicom
import pytest
import requests
import uvicorn
from PIL import Image

from dicomgen import make_study
from fiona.actions import OsActor
from fiona.attach.jobs import DONE, FAILED
from fiona.attach.service import UPLOAD_DAYS, Attacher
from fiona.control.base import Study
from fiona.receive.store import dataset_part
from helpers import free_port, wait_for
from webapp import PASSWORD, WebSite, csrf_of


@pytest.fixture
def site(tmp_path: Path):
    s = WebSite(tmp_path)
    yield s
    w = getattr(s.app.state, "attach_worker", None)
    if w is not None:
        w.stop()


def media_zip(tmp_path: Path, entries: dict[str, bytes] | None = None) -> tuple[bytes, dict]:
    """A zip as copied from a CD: DICOM files under DICOM/, a viewer's README beside them."""
    study = make_study(tmp_path / "media", n_series=1, images_per_series=3,
                       patient_name="Hansen^Ingrid", patient_id="NID0101")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in study["files"]:
            z.write(f, f"DICOM/{f.name}")
        z.writestr("README.TXT", "viewer")
        for name, data in (entries or {}).items():
            z.writestr(name, data)
    return buf.getvalue(), study


def create(client, size: int, name: str = "cd.zip", project: str = "A", **extra):
    token = client.get("/api/session").json()["csrf_token"]
    return client.post("/api/attach/uploads", headers={"X-CSRF-Token": token}, json={
        "project": project, "participant": "A001", "event": "baseline", "name": name,
        "size": size, **extra})


def upload(client, data: bytes, name: str):
    job = create(client, len(data), name).json()
    token = client.get("/api/session").json()["csrf_token"]
    r = client.put(f"/api/attach/uploads/{job['id']}?offset=0", content=data,
                   headers={"X-CSRF-Token": token})
    assert r.status_code == 200, r.text
    return job["id"]


def finished(client, job_id: str) -> dict:
    def state():
        j = client.get(f"/api/attach/uploads/{job_id}").json()
        return j if j["state"] in (DONE, FAILED) else None
    return wait_for(state, 60, f"attach job {job_id} to finish")


def test_assign_role_needed(site):
    bob = site.client("bob")  # assign in B only
    r = create(bob, 100)
    assert r.status_code == 403 and "assign role" in r.json()["detail"]
    assert site.audit("attach refused")[0]["user"] == "bob"
    alice = site.client("alice")
    assert create(alice, 100).status_code == 201
    page = alice.get("/attach")
    assert page.status_code == 200 and 'src="/static/attach.js"' in page.text
    assert "<script>" not in page.text and 'id="nav-attach"' in page.text
    site.users.add("carol", PASSWORD, ["project:A:review"])
    assert 'id="nav-attach"' not in site.client("carol").get("/status").text


def test_bad_input_stores_and_sends_nothing(site, tmp_path):
    alice = site.client("alice")
    # names carry patients' names: the owner's job shows them, the audit trail does not
    evil, _ = media_zip(tmp_path, {"../../Smith^Anna.dcm": b"x"})
    failed = finished(alice, upload(alice, evil, "cd.zip"))
    assert failed["state"] == FAILED and "leaves the upload folder" in failed["reason"]
    fake, _ = media_zip(tmp_path / "2")
    failed = finished(alice, upload(alice, fake, "Smith Anna report.pdf"))  # a zip as .pdf
    assert failed["state"] == FAILED and "is not a PDF file" in failed["reason"]
    broken = finished(alice, upload(alice, b"II*\x00" + bytes(5000), "slide.svs"))
    assert broken["state"] == FAILED and "wsidicomizer cannot convert" in broken["reason"]
    too_big = create(alice, 10**15)
    assert too_big.status_code == 413 and "upload limit" in too_big.json()["detail"]
    assert not any(site.gw.tree.archive.iterdir())
    assert not (tmp_path / "evil.dcm").exists() and not site.control.coupling_rows()
    for job in (site.gw.tree.site / "attach").iterdir():  # nothing half kept
        assert sorted(p.name for p in job.iterdir()) == ["job.json"]
    assert [e["details"]["reason"] for e in site.audit("attach failed")] == [
        "ArchiveError", "KindError", "ConversionError"]
    assert "Smith" not in (site.gw.tree.logs / "audit.log").read_text()


class Server:
    """The web application served by uvicorn in a thread, on a free port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn to start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_upload_cut_in_the_middle_resumes(site, tmp_path):
    data, study = media_zip(tmp_path)
    server = Server(site.app)
    try:
        http = requests.Session()
        token = csrf_of(http.get(f"{server.url}/login").text)
        assert http.post(f"{server.url}/login", data={"username": "alice", "password": PASSWORD,
                         "csrf_token": token}, allow_redirects=False).status_code == 303
        headers = {"X-CSRF-Token": http.get(f"{server.url}/api/session").json()["csrf_token"]}
        job = http.post(f"{server.url}/api/attach/uploads", headers=headers, json={
            "project": "A", "participant": "A001", "event": "baseline", "name": "cd.zip",
            "size": len(data)}).json()
        # the whole file announced as one chunk, the connection dropped after half of it
        half = len(data) // 2
        cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        state = f"{server.url}/api/attach/uploads/{job['id']}"
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((f"PUT /api/attach/uploads/{job['id']}?offset=0 HTTP/1.1\r\n"
                          f"Host: 127.0.0.1\r\nCookie: {cookie}\r\n"
                          f"X-CSRF-Token: {headers['X-CSRF-Token']}\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:half])
            # the server streams what arrives to disk; then the connection drops
            offset = wait_for(lambda: http.get(state).json()["received"] == half and half, 30,
                              "the server to write the first half")
        assert http.get(state).json()["state"] == "uploading"
        # a client that guesses wrong is told where to resume
        wrong = http.put(f"{state}?offset=0", data=data, headers=headers)
        assert wrong.status_code == 409 and wrong.json()["offset"] == offset
        def resume():  # as attach.js: send the rest from where the server stands
            at = http.get(state).json()["received"]
            r = http.put(f"{state}?offset={at}", data=data[at:], headers=headers)
            assert r.status_code in (200, 409), r.text  # 409: the cut request still ends
            return r.status_code == 200 and r.json()
        assert wait_for(resume, 30, "the upload to resume")["received"] == len(data)
        done = wait_for(lambda: (j := http.get(state).json())["state"] in (DONE, FAILED) and j,
                        60, "the job to finish")
        assert done["state"] == DONE and done["done"] == 3 and done["not_dicom"] == ["README.TXT"]
    finally:
        server.stop()
    # what was filed is what was on the "CD", byte for byte
    archived = site.gw.tree.study_archive(study["study"]).iterdir()
    assert sorted(dataset_part(p)[1] for p in archived) == \
        sorted(dataset_part(f)[1] for f in study["files"])
    [row] = site.control.coupling_rows()
    assert (row.study_uid, row.project, row.participant) == (study["study"], "A", "A001")
    assert site.audit("attach")[0]["details"]["objects"] == 3


def test_pdf_and_image_join_an_existing_study_as_new_series(site, tmp_path):
    alice = site.client("alice")
    data, study = media_zip(tmp_path)
    assert finished(alice, upload(alice, data, "cd.zip"))["state"] == DONE
    site.control.register_study(Study(study["study"]))  # as the arrival daemon does
    png = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(png, "PNG")
    for name, content in (("report.pdf", b"%PDF-1.4\n%%EOF\n"), ("photo.png", png.getvalue())):
        job = create(alice, len(content), name, study=study["study"]).json()
        token = alice.get("/api/session").json()["csrf_token"]
        alice.put(f"/api/attach/uploads/{job['id']}?offset=0", content=content,
                  headers={"X-CSRF-Token": token})
        assert finished(alice, job["id"])["state"] == DONE
    # a PNG that says it has 400 million pixels (PIL refuses it at once) is bad input
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2,
                                                               0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    job = create(alice, len(bomb), "huge.png", study=study["study"]).json()
    token = alice.get("/api/session").json()["csrf_token"]
    alice.put(f"/api/attach/uploads/{job['id']}?offset=0", content=bomb,
              headers={"X-CSRF-Token": token})
    failed = finished(alice, job["id"])
    assert failed["state"] == FAILED and "pixels" in failed["reason"], failed
    objects = [pydicom.dcmread(p, stop_before_pixels=True)
               for p in site.gw.tree.study_archive(study["study"]).iterdir()]
    added = {o.SOPClassUID.name: o for o in objects if o.Modality in ("DOC", "OT")}
    assert set(added) == {"Encapsulated PDF Storage", "Secondary Capture Image Storage"}
    assert {o.PatientID for o in objects} == {"NID0101"}  # the study's own, de-identified later
    assert not {o.SeriesInstanceUID for o in added.values()} & set(study["series"])
    [req] = site.control.requests(study["study"])
    assert (req.project, req.participant) == ("A", "A001")


def test_a_job_left_open_goes_on_when_the_server_starts(site, tmp_path):
    """A job queued when the web application stopped is taken up at its next start, before
    anyone opens the page (the job file is the state; nothing is redone twice)."""
    data, study = media_zip(tmp_path)
    (tmp_path / "cd.zip").write_bytes(data)
    attacher = Attacher(site.config)
    job = attacher.create(OsActor("tester"), "A", "A001", "baseline", "cd.zip", len(data),
                          source=tmp_path / "cd.zip")
    assert attacher.store.load(job.id).state == "queued"
    server = Server(site.app)
    try:
        done = wait_for(lambda: attacher.store.load(job.id).state == DONE, 60, "the job")
    finally:
        server.stop()
    assert done and len(list(site.gw.tree.study_archive(study["study"]).iterdir())) == 3


def test_an_abandoned_upload_is_removed_after_its_days(site):
    alice = site.client("alice")
    job = create(alice, 1000).json()
    token = alice.get("/api/session").json()["csrf_token"]
    alice.put(f"/api/attach/uploads/{job['id']}?offset=0", content=b"x" * 400,
              headers={"X-CSRF-Token": token})
    attacher = Attacher(site.config)
    upload = attacher.store.folder(job["id"]) / "upload"
    now = upload.stat().st_mtime
    assert attacher.expire(now + (UPLOAD_DAYS * 86400 - 60)) == []  # not yet
    [gone] = attacher.expire(now + UPLOAD_DAYS * 86400 + 60)
    assert gone.id == job["id"] and not upload.exists()
    assert alice.get(f"/api/attach/uploads/{job['id']}").json()["state"] == FAILED


def test_a_job_is_closed_to_its_owner_once_the_assign_role_is_gone(site):
    """The assign role is checked on the job's project at every request, not only when the
    upload was created: a user whose role was taken away mid-upload can neither send the
    rest (which would file it in the project) nor read the job; another user never could."""
    alice = site.client("alice")
    job = create(alice, 1000).json()
    token = alice.get("/api/session").json()["csrf_token"]
    bob = site.client("bob")
    bob_token = bob.get("/api/session").json()["csrf_token"]
    assert bob.get(f"/api/attach/uploads/{job['id']}").status_code == 404
    assert bob.put(f"/api/attach/uploads/{job['id']}?offset=0", content=b"x" * 10,
                   headers={"X-CSRF-Token": bob_token}).status_code == 404
    site.users.add("alice", None, ["project:A:review"])
    assert alice.get(f"/api/attach/uploads/{job['id']}").status_code == 404
    r = alice.put(f"/api/attach/uploads/{job['id']}?offset=0", content=b"x" * 1000,
                  headers={"X-CSRF-Token": token})
    assert r.status_code == 404
    assert Attacher(site.config).store.load(job["id"]).state == "uploading"
    assert "cd.zip" not in alice.get("/attach").text


def test_an_entry_the_disk_cannot_hold_fails_the_job_clearly_and_logs_no_name(site, tmp_path,
                                                                               caplog):
    """An archive entry whose name the file system refuses (too long) is bad input: the job
    fails saying so, not with an internal error whose trace puts the name in the web log."""
    alice = site.client("alice")
    data, _ = media_zip(tmp_path, {f"DICOM/Smith^Anna{'x' * 300}.dcm": b"x"})
    failed = finished(alice, upload(alice, data, "cd.zip"))
    assert failed["state"] == FAILED and "cannot be unpacked" in failed["reason"]
    assert "Smith" not in caplog.text


def test_a_malformed_request_gets_a_clear_400(site):
    alice = site.client("alice")
    for size, extra in ((100, {"pathology": "H&E"}), (100, {"pathology": ["H&E"]}),
                        ("1e3", {})):
        r = create(alice, size, **extra)
        assert r.status_code == 400 and "bad upload request" in r.json()["detail"], extra


def test_media_cannot_join_a_study_that_belongs_to_another_project(site, tmp_path):
    """A study requested for project B belongs to B (only B's users see it). Media carrying
    its StudyInstanceUID, attached by a user of A only, would couple it to A and show her
    B's study: refused, nothing filed, nothing coupled."""
    data, study = media_zip(tmp_path)
    site.control.register_study(Study(study["study"]))
    site.request(study["study"], "B", "B001")
    alice = site.client("alice")
    failed = finished(alice, upload(alice, data, "cd.zip"))
    assert failed["state"] == FAILED and "another project" in failed["reason"], failed
    assert not site.control.coupling_rows()
    assert [r.project for r in site.control.requests(study["study"])] == ["B"]
    assert not any(site.gw.tree.archive.iterdir())
