"""The forwarder's de-identification pool (issue 10): faster, and it loses nothing.

- the pool writes the same bytes as the single process, file for file, in the same order;
- one process hands over each file as it is done (a caller that stops waits for one file);
- a file failing the verification gate stops the whole request: it fails with the reason, the
  study goes to the quarantine and nothing after that file reaches the PACS (Orthanc);
- a forwarder killed (SIGKILL) in the middle of the pool leaves no worker behind and the request
  pending; restarted, it completes the study exactly once in Orthanc.
"""

from __future__ import annotations

import os
import shutil
import signal
from datetime import datetime
from multiprocessing import forkserver, resource_tracker
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomgen import make_study
from fiona.bootstrap import init
from fiona.clock import FakeClock
from fiona.config import load, read_secret
from fiona.control import open_control_plane
from fiona.control.base import Project, TransferRequest, now_iso
from fiona.deid.pipeline import Pipeline, ProjectRules, settings_for
from fiona.send.forward import Forwarder
from fiona.send.pool import CHUNK, DeidPool, Done, Job
from helpers import Gateway, free_port, wait_for
from orthanc import Orthanc

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
PROJECT = Project("PROJ", naming="^P[0-9]{4}$", events=["baseline"], features={0})


@pytest.fixture(autouse=True)
def _stop_pool_helpers():
    """An in-process pool's fork server and resource tracker live as long as pytest: stop them
    after each test (the tracker ignores SIGTERM, so the process check would wait 15 s)."""
    yield
    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("pacs")) as orthanc:
        yield orthanc


def raw_study(raw: Path, src: Path, n_series: int, per_series: int, seed: int) -> dict:
    """A study as the receiver leaves it: raw/<study>/<series>/<file>."""
    made = make_study(src, n_series=n_series, images_per_series=per_series,
                      patient_name="Hansen^Ingrid", seed=seed)
    made["raw"] = []
    for path in made["files"]:
        series = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        target = raw / made["study"] / series / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        made["raw"].append(target)
    made["raw"].sort()
    return made


def sources(raw: Path, study: str) -> list[Path]:
    """The forwarder's order: series folders, then files, by name."""
    return [f for d in sorted((raw / study).iterdir()) for f in sorted(d.iterdir())]


def test_pool_writes_the_bytes_of_the_single_process(tmp_path):
    made = raw_study(tmp_path / "raw", tmp_path / "src", 3, 7, seed=1)
    ps = pydicom.dcmread(made["files"][0])                  # dropped by feature 0, mid-study
    ps.Modality, ps.SOPClassUID = "PR", GSPS
    ps.SeriesInstanceUID, ps.SOPInstanceUID = made["series"][1], generate_uid()
    ps.file_meta.MediaStorageSOPClassUID = GSPS
    ps.file_meta.MediaStorageSOPInstanceUID = ps.SOPInstanceUID
    ps.save_as(tmp_path / "raw" / made["study"] / made["series"][1] / "s02_0003b.dcm",
               enforce_file_format=True)
    files = sources(tmp_path / "raw", made["study"])
    assert len(files) == 22 > CHUNK
    settings = settings_for(PROJECT, "P0001", "baseline", os.urandom(32), tmp_path)
    rules = ProjectRules.of(PROJECT)
    written = {}
    for workers in (1, 2):
        work = tmp_path / f"work{workers}"
        work.mkdir()
        with DeidPool(workers) as pool:
            outcomes = list(pool.outputs(Job.of(settings, rules, work), files))
        assert all(isinstance(o, Done) for o in outcomes)
        assert [o.source for o in outcomes] == files
        written[workers] = [(o.path.name if o.path else o.dropped, o.series_uid,
                             o.path.read_bytes() if o.path else b"") for o in outcomes]
        assert sorted(p.name for p in work.iterdir()) == sorted(
            o.path.name for o in outcomes if o.path)
    assert sum(1 for name, _s, data in written[1] if not data) == 1   # the presentation state
    assert written[1] == written[2]


def test_one_process_hands_over_each_file_as_it_is_done(tmp_path):
    """With one process (a one-core machine) the sender takes each file as it is done, and a
    caller that stops (a request waiting while a study is prepared ahead) waits for one file,
    not for the whole study."""
    made = raw_study(tmp_path / "raw", tmp_path / "src", 2, 10, seed=5)
    files = sources(tmp_path / "raw", made["study"])
    settings = settings_for(PROJECT, "P0001", "baseline", os.urandom(32), tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    with DeidPool(1) as pool:
        outputs = pool.outputs(Job.of(settings, ProjectRules.of(PROJECT), work), files)
        first = next(outputs)
        assert isinstance(first, Done) and [p.name for p in work.iterdir()] == [first.path.name]
        outputs.close()
    assert len(list(work.iterdir())) == 1


class Site:
    """A data tree with an in-process forwarder (a pool of 2) sending to Orthanc."""

    def __init__(self, tmp_path: Path, pacs: Orthanc):
        self.config = load(str(init(tmp_path / "data", port=free_port(), ip="127.0.0.1", extra={
            "DESTINATIONS": {"research": {"type": "dicom", "aetitle": pacs.aet,
                                          "host": "127.0.0.1", "port": pacs.dicom_port}}})))
        site = self.config.site(None)
        self.control = open_control_plane(self.config, site)
        self.control.save_project(PROJECT)
        self.clock = FakeClock(start=datetime(2026, 3, 2, 9, 30))
        self.forwarder = Forwarder(self.config, site, self.control, self.clock, workers=2)
        self.key = read_secret(site.datadir / "config" / "secret.key")

    def request(self, study: str) -> TransferRequest:
        return self.control.add_request(TransferRequest(
            study, "PROJ", "P0001", "baseline", requested=now_iso(self.clock)))


@pytest.mark.e2e
def test_a_file_failing_the_gate_stops_the_request_and_nothing_after_it_is_sent(
        tmp_path, pacs):
    site = Site(tmp_path, pacs)
    raw = site.forwarder.tree.raw
    made = raw_study(raw, tmp_path / "src", 3, 10, seed=2)
    files = sources(raw, made["study"])
    leaky = files[14]                                       # in the middle of series 2
    ds = pydicom.dcmread(leaky)
    ds.SequenceName = "Ingrid Hansen"                       # kept by the profile: a leak
    ds.save_as(leaky, enforce_file_format=True)

    with site.forwarder.pool:
        site.forwarder.process(site.request(made["study"]))
    [req] = site.control.requests(made["study"])
    assert not req.complete and not req.pending and req.error_flags == {1}
    assert "verification gate" in req.error_message and "SequenceName" in req.error_message
    assert "Hansen" not in req.error_message
    [case] = list((site.forwarder.tree.quarantine / "deidentify").glob("*/reason.json"))
    assert made["study"] in case.read_text()
    pipeline = Pipeline(settings_for(PROJECT, "P0001", "baseline", site.key,
                                     site.forwarder.site.datadir))
    mapped_study = pipeline.mapped_uid(made["study"])
    in_pacs = pacs.series_counts(mapped_study)
    assert sum(in_pacs.values()) <= 14                      # only files before the leaky one
    last_series = pipeline.mapped_uid(files[-1].parent.name)
    assert last_series not in in_pacs
    assert not list(site.forwarder.tree.work.iterdir())


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        try:
            kids = Path(f"/proc/{todo.pop()}/task").glob("*/children")
            new = {int(c) for k in kids for c in k.read_text().split()}
        except (OSError, ValueError):
            continue
        todo.extend(new - found)
        found |= new
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
def test_forwarder_killed_mid_pool_then_restarted_sends_the_study_exactly_once(
        tmp_path, pacs):
    gw = Gateway(tmp_path / "data", free_port(), {
        "DESTINATIONS": {"research": {"type": "dicom", "aetitle": pacs.aet, "host": "127.0.0.1",
                                      "port": pacs.dicom_port}}})
    try:
        gw.run("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline")
        made = raw_study(gw.tree.raw, tmp_path / "src", 3, 12, seed=3)
        last = sources(gw.tree.raw, made["study"])[-1]
        held = tmp_path / "held.dcm"
        shutil.move(last, held)
        os.mkfifo(last)                 # blocks the worker that opens it: the pool stays busy
        control = open_control_plane(load(str(gw.config)))
        control.add_request(TransferRequest(made["study"], "PROJ", "P0001", "baseline",
                                            requested=now_iso()))
        before = pacs.count()
        forwarder = gw.start("anonymize-and-send")
        wait_for(lambda: pacs.count() > before and len(descendants(forwarder.pid)) >= 2, 120,
                 "the pool to start sending")
        workers = descendants(forwarder.pid)
        gw.procs.pop("anonymize-and-send")
        forwarder.send_signal(signal.SIGKILL)
        forwarder.wait()
        wait_for(lambda: not any(alive(p) for p in workers), 30, "the workers to go")
        [req] = control.requests(made["study"])
        assert req.pending and not req.complete

        last.unlink()
        shutil.move(held, last)
        gw.start("anonymize-and-send")

        def complete():
            [r] = control.requests(made["study"])
            return r if r.complete else None
        req = wait_for(complete, 180, "the request to complete")
        counts = pacs.series_counts(req.mapped_uid)
        assert sorted(counts.values()) == [12, 12, 12]
        studies = [s for s in pacs.studies()
                   if s["MainDicomTags"]["StudyInstanceUID"] == req.mapped_uid]
        assert len(studies) == 1
    finally:
        gw.stop_all()
