"""The scanner side (issue 9 §1): the MPPS SCP (`fiona mpps`) and the pull of missing series
(`fiona pull-from-scanner`), against real peers: pynetdicom plays the modality sending MPPS,
Orthanc plays the scanner (it answers C-FIND and C-MOVEs to FIONA, declared as its modality).
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomgen import make_study
from fiona.clock import FakeClock
from fiona.config import Site, enabled_path, load
from fiona.scanner.mpps import MppsServer
from fiona.scanner.pull import Puller, Scanner
from fiona.scanner.steps import FAILED, FINISHED, Steps
from helpers import Gateway, dcmtk, free_port, listening, wait_for
from orthanc import Orthanc

pytestmark = pytest.mark.e2e

MODALITY = "MODALITY"


# --- the modality ---------------------------------------------------------------------------
def mpps_create(port: int, study: str, sop: str | None = None, **attrs) -> int:
    """N-CREATE an MPPS IN PROGRESS (attrs override or, set to None, remove attributes)."""
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PAT0001"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS1"
    ds.Modality = "MR"
    item = Dataset()
    item.StudyInstanceUID = study
    item.AccessionNumber = "ACC0001"
    ds.ScheduledStepAttributesSequence = [item]
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return _request(port, lambda assoc, cls: assoc.send_n_create(ds, cls, sop or generate_uid()))


def mpps_set(port: int, sop: str, status: str = "COMPLETED") -> int:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20260101"
    return _request(port, lambda assoc, cls: assoc.send_n_set(ds, cls, sop))


def _request(port: int, send) -> int:
    """The DIMSE status of one request, -1 when the association is refused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

    ae = AE(MODALITY)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", port, ae_title="FIONA")
    if not assoc.is_established:
        return -1
    try:
        status, _ = send(assoc, MPPS)
        return int(status.Status)
    finally:
        assoc.release()


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def scanner(tmp_path: Path):
    """Orthanc as the scanner; FIONA's AE is declared (its port is filled in by `gateway_for`)."""
    port = free_port()
    with Orthanc(tmp_path, "scanner", extra={"DicomModalities": {
            "fiona": ["FIONA", "127.0.0.1", port]}}) as pacs:
        pacs.fiona_port = port
        yield pacs


@pytest.fixture
def gw(tmp_path: Path, scanner: Orthanc):
    g = Gateway(tmp_path / "data", scanner.fiona_port, {
        "MPPSPORT": free_port(), "SCANNERIP": "127.0.0.1", "SCANNERPORT": scanner.dicom_port,
        "SCANNERAETITLE": scanner.aet})
    g.mpps_port = load(str(g.config)).mpps_port
    yield g
    g.stop_all()


@pytest.fixture
def mpps_scp(gw: Gateway):
    """The MPPS SCP in this process, on gw's data tree (for the per-request checks)."""
    site = load(str(gw.config)).site(None)
    server = MppsServer(site, gw.mpps_port)
    srv = server.start("127.0.0.1")
    yield server
    srv.shutdown()


def to_scanner(scanner: Orthanc, files: list[Path]) -> None:
    res = subprocess.run([dcmtk("storescu"), "-aec", scanner.aet, "127.0.0.1",
                          str(scanner.dicom_port), *map(str, files)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def scan_state(gw: Gateway, study: str) -> str | None:
    return (Steps(gw.datadir).outcome(study) or {}).get("state")


# --- the tests ------------------------------------------------------------------------------
def test_held_back_series_is_pulled_and_the_scan_finishes(gw: Gateway, scanner: Orthanc,
                                                          tmp_path: Path):
    study = make_study(tmp_path / "study", n_series=3, images_per_series=4)
    uid, series = study["study"], study["series"]
    to_scanner(scanner, study["files"])
    for name in ("storescp", "process-single-file", "mpps"):
        gw.start(name)
    wait_for(lambda: listening(gw.mpps_port), 30, "the MPPS SCP to listen")
    sop = generate_uid()
    assert mpps_create(gw.mpps_port, uid, sop) == 0x0000
    step = json.loads((gw.tree.site / "mpps" / f"{sop}.json").read_text())
    assert step["status"] == "IN PROGRESS" and step["studies"] == [uid]
    # the scanner sends the first two series; the last is held back
    first = [f for f in study["files"] if not f.name.startswith("s03")]
    assert gw.storescu(*first).returncode == 0
    for s in series[:2]:
        gw.wait_indexed(uid, s, 4)
    assert mpps_set(gw.mpps_port, sop) == 0x0000
    assert mpps_set(gw.mpps_port, sop, "DISCONTINUED") == 0x0110  # final already
    assert mpps_set(gw.mpps_port, generate_uid()) == 0x0112       # no such step

    gw.run("pull-from-scanner", "--once")
    gw.wait_indexed(uid, series[2], 4)
    assert scan_state(gw, uid) is None  # the pass moved it; the next one sees it complete
    gw.run("pull-from-scanner", "--once")
    assert scan_state(gw, uid) == FINISHED
    assert {s: gw.series_json(uid, s)["NumFiles"] for s in series} == \
        scanner.series_counts(uid)
    status = json.loads(gw.run("status", "--json", check=False).stdout)
    assert status["scans"] == {"active": 0, "finished": 1, "failed": 0}
    log = (gw.tree.logs / "mpps.log").read_text() + \
        (gw.tree.logs / "moveFromScanner.log").read_text()
    assert "Doe" not in log and "PAT0001" not in log and "ACC0001" not in log


def test_step_without_images_fails_after_the_deadline(gw: Gateway, scanner: Orthanc):
    clock = FakeClock(start=datetime.now())
    site: Site = load(str(gw.config)).site(None)
    server = MppsServer(site, gw.mpps_port, clock)
    srv = server.start("127.0.0.1")
    try:
        study = generate_uid()
        assert mpps_create(gw.mpps_port, study) == 0x0000
    finally:
        srv.shutdown()
    puller = Puller(gw.datadir, Scanner("127.0.0.1", scanner.dicom_port, scanner.aet, "FIONA"),
                    "FIONA", deadline=3600, clock=clock)
    puller.run_once()
    assert scan_state(gw, study) is None and study in Steps(gw.datadir).active()
    clock.advance(3599)
    puller.run_once()
    assert scan_state(gw, study) is None
    clock.advance(1)
    puller.run_once()
    assert scan_state(gw, study) == FAILED
    assert Steps(gw.datadir).counts() == {"active": 0, "finished": 0, "failed": 1}


def test_unreachable_scanner_is_retried_not_fatal(gw: Gateway, mpps_scp):
    study = generate_uid()
    assert mpps_create(gw.mpps_port, study) == 0x0000
    clock = FakeClock(start=datetime.now())
    puller = Puller(gw.datadir, Scanner("127.0.0.1", free_port(), "NOBODY", "FIONA",
                                        timeout=2), "FIONA", clock=clock)
    puller.run_once()
    assert not puller.backoff.due(study)
    clock.advance(puller.backoff.remaining(study))
    assert puller.backoff.due(study)
    puller.run_once()  # tried again, still no crash
    assert study in Steps(gw.datadir).active()


@pytest.mark.parametrize("attrs, status", [
    ({"ScheduledStepAttributesSequence": None}, 0x0120),
    ({"PerformedProcedureStepStatus": None}, 0x0120),
    ({"PerformedProcedureStepStatus": "COMPLETED"}, 0x0106),
    ({"PerformedProcedureStepStatus": "RUNNING"}, 0x0106),
])
def test_malformed_mpps_is_refused_and_nothing_stored(gw: Gateway, mpps_scp, attrs, status):
    assert mpps_create(gw.mpps_port, generate_uid(), **attrs) == status
    assert not list((gw.tree.site / "mpps").glob("*"))
    assert Steps(gw.datadir).active() == {}


def test_invalid_study_uid_and_unknown_attribute_are_refused(gw: Gateway, mpps_scp):
    assert mpps_create(gw.mpps_port, "1.2.../../etc") == 0x0106
    unknown = Dataset()
    unknown.StudyInstanceUID = generate_uid()
    ds_status = mpps_create(gw.mpps_port, generate_uid(), ScheduledStepAttributesSequence=[
        unknown], PerformedProcedureStepDescription="x")
    assert ds_status == 0x0000  # the control: a well-formed step is taken
    before = set((gw.tree.site / "mpps").glob("*.json"))

    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    item = Dataset()
    item.StudyInstanceUID = generate_uid()
    ds.ScheduledStepAttributesSequence = [item]
    ds.add_new(0x0040EEEE, "LO", "not in the dictionary")  # public, unknown
    ae = AE(MODALITY)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", gw.mpps_port, ae_title="FIONA")
    try:
        status, _ = assoc.send_n_create(ds, MPPS, generate_uid())
        assert int(status.Status) == 0x0105
    finally:
        assoc.release()
    assert set((gw.tree.site / "mpps").glob("*.json")) == before
    existing = next(iter(before)).name.removesuffix(".json")
    assert mpps_create(gw.mpps_port, generate_uid(), existing) == 0x0111  # duplicate


def test_enabled_10x_stops_mpps_and_pull_while_reception_goes_on(gw: Gateway, scanner: Orthanc,
                                                                 tmp_path: Path):
    study = make_study(tmp_path / "study", n_series=1, images_per_series=2)
    to_scanner(scanner, study["files"])
    for name in ("storescp", "mpps"):
        gw.start(name)
    wait_for(lambda: listening(gw.mpps_port), 30, "the MPPS SCP to listen")
    assert mpps_create(gw.mpps_port, study["study"]) == 0x0000
    enabled_path(gw.datadir).write_text("10x\n")
    assert mpps_create(gw.mpps_port, generate_uid()) == -1  # refused
    assert gw.procs["mpps"].poll() is None                  # and still running
    wait_for(lambda: "refused an association" in (gw.tree.logs / "mpps.log").read_text(), 10,
             "the refusal in the MPPS log")
    assert "disabled" in (gw.tree.logs / "mpps.log").read_text()
    gw.run("pull-from-scanner", "--once")
    assert not gw.archive_files()                            # nothing pulled
    assert "disabled" in (gw.tree.logs / "moveFromScanner.log").read_text()
    other = make_study(tmp_path / "other", n_series=1, images_per_series=1)
    assert gw.storescu(*other["files"]).returncode == 0      # reception goes on
    assert len(gw.archive_files()) == 1
    enabled_path(gw.datadir).write_text("11x\n")
    assert mpps_create(gw.mpps_port, generate_uid()) == 0x0000  # back on, same process


def test_up_runs_mpps_and_the_pull_only_with_mppsport(tmp_path: Path):
    from fiona import up
    from fiona.bootstrap import init

    def commands(name: str, **extra) -> set[str]:
        config = load(str(init(tmp_path / name, free_port(), extra=extra)))
        return {argv[5] for argv in up._commands(config)}  # noqa: SLF001

    assert not {"mpps", "pull-from-scanner"} & commands("plain")
    assert "mpps" in commands("mpps", MPPSPORT=free_port())
    assert {"mpps", "pull-from-scanner"} <= commands(
        "both", MPPSPORT=free_port(), SCANNERIP="127.0.0.1", SCANNERPORT=104,
        SCANNERAETITLE="SCANNER")
