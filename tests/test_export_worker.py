"""The export worker (issue 14, steps 5-6): durable jobs made by the `fiona export-worker`
daemon, a kill -9 that neither loses a job nor makes a second or half zip, the password sealed
and gone once the zip exists, the "export ready" mail through a real SMTP server on loopback
(aiosmtpd), a research PACS that is down, and `fiona clear-exports`.

The delivered study is put where the forwarder would have put it (a folder destination, a
completed transfer request), so only the export worker runs as a daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from dicomgen import make_study
from fiona.clock import FakeClock
from fiona.config import load, read_secret
from fiona.control import open_control_plane
from fiona.control.base import TransferRequest, now_iso
from fiona.deid.pipeline import Pipeline, read, settings_for
from fiona.export.cleanup import ExportCleanup
from fiona.export.jobs import (
    EXPIRED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    READY,
    JobError,
    JobStore,
    seal,
    unseal,
)
from fiona.export.worker import Worker
from helpers import Gateway, free_port, wait_for

PROJECT_ARGS = ("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events",
                "baseline,followup")
PASSWORD = "correct horse battery staple 7f3a"


def deliver(tmp: Path, gw: Gateway, research: Path, n_series: int = 2, images: int = 3) -> str:
    """A study de-identified and delivered to the folder destination `research` as the
    forwarder does, with its completed transfer request; returns the mapped study UID."""
    config = load(str(gw.config))
    control = open_control_plane(config, config.site())
    made = make_study(tmp / "s", n_series=n_series, images_per_series=images, rows=16, cols=16)
    pipeline = Pipeline(settings_for(control.project("PROJ"), "P0001", "followup",
                                     read_secret(gw.datadir / "config" / "secret.key"),
                                     gw.datadir))
    mapped = pipeline.mapped_uid(made["study"])
    for f in made["files"]:
        result = pipeline.process(read(f))
        folder = research / mapped / result.series_uid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{result.sop_uid}.dcm").write_bytes(result.encoded)
    control.add_participant("PROJ", "P0001")
    req = control.add_request(TransferRequest(made["study"], "PROJ", "P0001", "followup",
                                              now_iso()))
    req.mapped_uid, req.complete = mapped, True
    req.done_revision = req.revision
    control.update_request(req)
    return mapped


def gateway(tmp: Path, extra: dict | None = None) -> tuple[Gateway, Path]:
    research = tmp / "research"
    research.mkdir()
    gw = Gateway(tmp / "data", free_port(), {
        "DESTINATIONS": {"research": {"type": "folder", "path": str(research)}}, **(extra or {})})
    gw.run(*PROJECT_ARGS)
    return gw, research


def queue(gw: Gateway, *args: str, password: str | None = None) -> str:
    cmd = gw.command("export", "--project", "PROJ", "--type", "dicom", "--queue", *args,
                     *(["--password-file", "-"] if password else []))
    res = subprocess.run(cmd, input=f"{password}\n" if password else "", capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def zips(gw: Gateway, job_id: str) -> list[str]:
    """Every file of the job beside the zips (finished or not), by name."""
    return sorted(p.name for p in gw.tree.exports.glob(f"*{job_id}*"))


def all_bytes_under(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


# --- the daemon end to end ----------------------------------------------------------------------
@pytest.mark.e2e
def test_queued_job_through_the_daemon_with_kill_9_mid_job_and_a_sealed_password(tmp_path):
    gw, research = gateway(tmp_path)
    mapped = deliver(tmp_path, gw, research, n_series=3, images=40)
    store = JobStore(gw.datadir)
    # the worker reads the delivered files in order; the last one is a named pipe, so it stops
    # there mid-job (opening a pipe blocks until a writer comes) until it is killed
    last = sorted((research / mapped).glob("*/*.dcm"))[-1]
    content = last.read_bytes()
    last.unlink()
    os.mkfifo(last)

    # queued while no worker runs: the job waits in its file
    job_id = queue(gw, password=PASSWORD)
    job = store.load(job_id)
    assert job.state == QUEUED and job.sealed_password
    assert PASSWORD.encode() not in (gw.tree.export_jobs / f"{job_id}.json").read_bytes()

    # the worker takes it up; killed with -9 while it works on it
    gw.start("export-worker")
    objects = gw.tree.export_tmp / job_id / "objects"
    wait_for(lambda: len(list(objects.rglob("*.dcm"))) == 119, 120, "the job to stop at the pipe")
    gw.stop("export-worker", signal.SIGKILL)
    assert store.load(job_id).state in IN_PROGRESS
    assert not [n for n in zips(gw, job_id) if n.endswith(".zip")]  # no zip offered

    # restarted, it finishes the job once
    last.unlink()
    last.write_bytes(content)
    gw.start("export-worker")
    done = wait_for(lambda: (j := store.load(job_id)).state == READY and j, 300, "ready")
    assert done.total == done.done == 120
    assert zips(gw, job_id) == sorted([done.zip, f"{done.zip}.manifest.csv",
                                       f"{done.zip}.sha256"])
    assert not (gw.tree.export_tmp / job_id).exists()
    assert datetime.fromisoformat(done.expires) - datetime.fromisoformat(done.finished) == \
        timedelta(days=7)
    opened = subprocess.run(["7z", "t", f"-p{PASSWORD}", str(gw.tree.exports / done.zip)],
                            capture_output=True, text=True, timeout=300)
    assert opened.returncode == 0, opened.stdout
    with zipfile.ZipFile(gw.tree.exports / done.zip) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == 120

    # the password is gone: not in the job file, no log, nowhere under DATADIR
    assert done.sealed_password is None
    gw.stop("export-worker")
    for path, data in all_bytes_under(gw.datadir):
        assert PASSWORD.encode() not in data, path

    # a second queued job through the pipe wake-up, while the worker waits
    gw.start("export-worker")
    second = queue(gw, "--participant", "P0001", "--event", "followup")
    wait_for(lambda: store.load(second).state == READY, 300, "the second job")
    assert len([n for n in os.listdir(gw.tree.exports) if n.endswith(".zip")]) == 2


def test_a_job_whose_zip_exists_is_ready_without_a_second_zip_and_leftovers_go(tmp_path):
    """The kill came after the zip's rename, before the job file said ready; and a job killed
    before it had a zip leaves a work folder and half-written files that are removed."""
    gw, research = gateway(tmp_path)
    deliver(tmp_path, gw, research)
    config = load(str(gw.config))
    store = JobStore(gw.datadir)
    worker = Worker(config, config.site())
    packed = store.new(project="PROJ", type="dicom", requester="tester")
    packed.state = "packing"
    store.save(packed)
    gw.tree.exports.mkdir(parents=True, exist_ok=True)
    name = f"PROJ_dicom_20260101T000000Z_{packed.id}.zip"
    for suffix in ("", ".sha256", ".manifest.csv"):
        (gw.tree.exports / f"{name}{suffix}").write_bytes(b"made before the kill")
    worker.process(store.load(packed.id))
    assert store.load(packed.id).state == READY and store.load(packed.id).zip == name
    assert zips(gw, packed.id) == sorted([name, f"{name}.manifest.csv", f"{name}.sha256"])

    half = store.new(project="PROJ", type="pure", requester="tester")
    half.state = "retrieving"
    store.save(half)
    (gw.tree.export_tmp / half.id / "objects").mkdir(parents=True)
    stale = [f".PROJ_pure_20260101T000000Z_{half.id}.zip.part",
             f"PROJ_pure_20260101T000000Z_{half.id}.zip.sha256"]
    for leftover in stale:
        (gw.tree.exports / leftover).write_bytes(b"half")
    assert [j.id for j in worker.due()] == [half.id]
    worker.process(store.load(half.id))
    made = store.load(half.id)
    assert made.state == READY and made.zip not in stale
    assert zips(gw, half.id) == sorted([made.zip, f"{made.zip}.manifest.csv",
                                        f"{made.zip}.sha256"])
    assert not (gw.tree.export_tmp / half.id).exists()


def test_password_sealing_is_bound_to_the_secret_and_the_job():
    # long enough that the random ciphertext cannot contain it by chance (b"pw" once did)
    password = b"correct-horse-battery-staple"
    sealed = seal(b"k" * 32, "0123456789ab", password)
    assert password not in sealed.encode()
    assert unseal(b"k" * 32, "0123456789ab", sealed) == password
    with pytest.raises(JobError):
        unseal(b"k" * 32, "ba9876543210", sealed)
    with pytest.raises(JobError):
        unseal(b"x" * 32, "0123456789ab", sealed)


def test_bad_requests_are_refused_when_queued(tmp_path):
    gw, _research = gateway(tmp_path)
    bad = gw.run("export", "--project", "NOPE", "--type", "dicom", "--queue", check=False)
    assert bad.returncode == 1 and "PROJ" in bad.stderr
    bad = gw.run("export", "--project", "PROJ", "--type", "tiff", "--queue", check=False)
    assert bad.returncode == 1 and "dicom" in bad.stderr
    with pytest.raises(JobError, match="e-mail"):
        JobStore(gw.datadir).new(project="PROJ", type="dicom", requester="t",
                                 email="a@b.org\nBcc: x@y.org")
    assert JobStore(gw.datadir).all() == []


# --- mail -----------------------------------------------------------------------------------------
class Inbox:
    """An aiosmtpd handler that keeps every message."""

    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's API
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _mail_config(port: int) -> dict:
    return {"SMTP": {"host": "127.0.0.1", "port": port, "starttls": False,
                     "from": "fiona@example.org"},
            "EXPORTS": {"url": "https://fiona.example.org", "retention_days": 3}}


def test_ready_mail_has_the_link_and_never_the_password(tmp_path):
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        gw, research = gateway(tmp_path, _mail_config(port))
        deliver(tmp_path, gw, research)
        job_id = queue(gw, "--mail", "researcher@example.org", password=PASSWORD)
        config = load(str(gw.config))
        Worker(config, config.site()).process(JobStore(gw.datadir).load(job_id))
        wait_for(lambda: inbox.messages, 30, "the mail")
    finally:
        controller.stop()
    job = JobStore(gw.datadir).load(job_id)
    assert job.state == READY and job.mailed
    ((sender, rcpts, content),) = inbox.messages
    assert sender == "fiona@example.org" and rcpts == ["researcher@example.org"]
    assert f"https://fiona.example.org/exports/{job_id}".encode() in content
    assert job.expires.encode() in content
    assert PASSWORD.encode() not in content
    for path, data in all_bytes_under(gw.datadir):
        assert PASSWORD.encode() not in data, path


def test_a_mail_server_that_is_down_never_fails_the_job(tmp_path):
    gw, research = gateway(tmp_path, _mail_config(free_port()))  # nobody listens there
    deliver(tmp_path, gw, research)
    job_id = queue(gw, "--mail", "researcher@example.org")
    config = load(str(gw.config))
    Worker(config, config.site()).process(JobStore(gw.datadir).load(job_id))
    job = JobStore(gw.datadir).load(job_id)
    assert job.state == READY and not job.mailed and (gw.tree.exports / job.zip).exists()


# --- research PACS down -------------------------------------------------------------------------
def test_research_pacs_down_the_job_waits_with_back_off_and_says_so(tmp_path):
    gw = Gateway(tmp_path / "data", free_port(), {"DESTINATIONS": {"research": {
        "type": "dicom", "aetitle": "NOBODY", "host": "127.0.0.1", "port": free_port()}}})
    gw.run(*PROJECT_ARGS)
    config = load(str(gw.config))
    control = open_control_plane(config, config.site())
    control.add_participant("PROJ", "P0001")
    req = control.add_request(TransferRequest("1.2.3.4", "PROJ", "P0001", "followup",
                                              now_iso()))
    req.mapped_uid, req.complete = "1.2.3.5", True
    req.done_revision = req.revision
    control.update_request(req)
    clock = FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
    worker = Worker(config, config.site(), clock)
    store = JobStore(gw.datadir, clock)
    job = store.new(project="PROJ", type="dicom", requester="tester")
    worker.process(job)
    waiting = store.load(job.id)
    assert waiting.state == QUEUED and "unavailable" in waiting.waiting
    assert "trying again after 2026-03-01T00:00:30" in waiting.waiting
    assert worker.due() == []
    clock.advance(31)
    assert [j.id for j in worker.due()] == [job.id]
    assert not list(gw.tree.exports.glob("*.zip"))


# --- clear-exports ------------------------------------------------------------------------------
def test_clear_exports_removes_expired_exports_and_old_temp_folders_only(tmp_path):
    gw, research = gateway(tmp_path)
    deliver(tmp_path, gw, research)
    config = load(str(gw.config))
    start = datetime.now(UTC)
    clock = FakeClock(start)
    store = JobStore(gw.datadir, clock)
    worker = Worker(config, config.site(), clock)
    old, new = (store.new(project="PROJ", type="dicom", requester="t") for _ in range(2))
    worker.process(old)
    clock.advance(2 * 86400)
    worker.process(new)
    waiting = store.new(project="PROJ", type="dicom", requester="t")  # open: never touched
    tmp = gw.tree.export_tmp
    for name in ("stale", "fresh", waiting.id):
        (tmp / name).mkdir(parents=True)

    # 6 days after the first export: nothing has expired, the stale work folder goes
    clock.advance(4 * 86400)
    now = clock.now().timestamp()
    for name, age in (("stale", 2 * 86400), ("fresh", 3600), (waiting.id, 2 * 86400)):
        os.utime(tmp / name, (now - age, now - age))
    usage = {"percent": 50.0}
    report = ExportCleanup(config, gw.datadir, "t", clock, lambda p: usage["percent"]).run()
    assert report.expired == [] and report.temp_removed == ["stale"]
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["fresh", waiting.id])

    # day 8: the first is past its retention, the second not
    clock.advance(2 * 86400)
    report = ExportCleanup(config, gw.datadir, "t", clock, lambda p: usage["percent"]).run()
    assert report.expired == [old.id]
    first, second = store.load(old.id), store.load(new.id)
    assert first.state == EXPIRED and not zips(gw, old.id)
    assert second.state == READY and len(zips(gw, new.id)) == 3
    assert store.load(waiting.id).state == QUEUED

    # above the watermark the oldest ready export goes before its time
    usage["percent"] = 90.0

    def usage_drops(path):
        return 90.0 if store.load(new.id).state == READY else 10.0
    report = ExportCleanup(config, gw.datadir, "t", clock, usage_drops).run()
    assert report.expired == [new.id] and not zips(gw, new.id)

    # expired and failed jobs are forgotten after the retention time
    clock.advance(8 * 86400)
    report = ExportCleanup(config, gw.datadir, "t", clock, lambda p: 10.0).run()
    assert sorted(report.forgotten) == sorted([old.id, new.id])
    assert [j.id for j in store.all()] == [waiting.id]
    expired = [e for e in map(json.loads, _audit_lines(gw)) if e["action"] == "export-expired"]
    assert sorted(e["details"]["job"] for e in expired) == sorted([old.id, new.id])


def test_a_full_exports_disk_fails_the_job_with_the_reason(tmp_path):
    gw, research = gateway(tmp_path)
    deliver(tmp_path, gw, research)
    config = load(str(gw.config))
    store = JobStore(gw.datadir)
    job = store.new(project="PROJ", type="dicom", requester="t")
    Worker(config, config.site(), usage=lambda p: 97.0).process(job)
    failed = store.load(job.id)
    assert failed.state == FAILED and "97% full" in failed.reason
    assert not list(gw.tree.exports.glob("*.zip"))


def _audit_lines(gw: Gateway) -> list[str]:
    from fiona.audit import audit_path

    return [line for line in audit_path(gw.datadir).read_text().splitlines() if line.strip()]
