"""No identifier in any log line (issue 8, item 2): a whole run with identifying data, then every
log file of the gateway is searched for the identifiers.

The run takes the paths where identifiers used to leak: a routing rule that offers a PatientID
that the project's naming rule refuses, a coupling list with a conflicting line, a manual assign
with a wrong participant ID, an object the receiver quarantines, the forwarder de-identifying
and delivering, and the CLI's listings. Quarantine reason files may name what was refused (they
stay inside quarantine); logs may not.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from helpers import Gateway, free_port, raw_c_store, wait_for

pytestmark = pytest.mark.e2e

NAME, PID, BIRTH, ACCESSION = "Zyxwvut^Qwerty", "PID73914682", "19410307", "ACC55519"
PHYSICIAN = "Hjemmelege^Oskarine"
IDENTIFIERS = [PID, BIRTH, ACCESSION, "Zyxwvut", "Qwerty", "Oskarine", "Hjemmelege"]


def _identifying_study(out: Path, accession: str, seed: int) -> dict:
    study = make_study(out, n_series=2, images_per_series=3, patient_id=PID, patient_name=NAME,
                       accession=accession, seed=seed)
    for path in study["files"]:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = BIRTH
        ds.ReferringPhysicianName = PHYSICIAN
        ds.save_as(path)
    return study


def _logs(gw: Gateway) -> dict[Path, str]:
    """Every log the run wrote: the daemons' own logs and what they printed."""
    files = [*gw.tree.logs.rglob("*"), *gw.datadir.glob("*.test.log")]
    return {p: p.read_text(errors="replace") for p in files if p.is_file()}


def test_no_identifier_reaches_any_log(tmp_path: Path):
    gw = Gateway(tmp_path / "data", free_port(), {"STUDY_QUIET_SECONDS": 2})
    gw.run("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline")
    gw.run("project", "add", "ROUTED", "--naming", "^SUBJ[0-9]+$", "--events", "scan")
    # the rule offers the PatientID as participant; ROUTED's naming rule refuses it
    gw.run("routing", "add", "trial", "--project", "ROUTED", "--event", "scan",
           "--calling-ae", "TRIALSCU", "--patient-id-regex", "PID[0-9]+")
    coupled = _identifying_study(tmp_path / "a", ACCESSION, 1)
    routed = _identifying_study(tmp_path / "b", "ACC55520", 2)
    (tmp_path / "cl.csv").write_text("AccessionNumber,ProjectName,subjectid,eventname\n"
                                     f"{ACCESSION},PROJ,P0001,baseline\n"
                                     f"{ACCESSION},PROJ,P0002,baseline\n")
    gw.run("coupling", "upload", str(tmp_path / "cl.csv"), check=False)
    (tmp_path / "ok.csv").write_text(f"{ACCESSION},PROJ,P0001,baseline\n")
    gw.run("coupling", "upload", str(tmp_path / "ok.csv"))
    for daemon in ("storescp", "process-single-file", "detect-study-arrival",
                   "anonymize-and-send"):
        gw.start(daemon)

    assert gw.storescu(tmp_path / "a").returncode == 0
    assert gw.storescu(tmp_path / "b", aet="TRIALSCU").returncode == 0
    # a hostile object with the identifiers in it goes to quarantine
    bad = pydicom.dcmread(coupled["files"][0])
    bad.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    bad.StudyInstanceUID = "../" + PID
    raw = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(raw, bad, implicit_vr=False, little_endian=True)
    status = raw_c_store(gw.port, raw.getvalue()[132:] if raw.getvalue()[128:132] == b"DICM"
                         else raw.getvalue(), bad.SOPClassUID, bad.SOPInstanceUID)
    assert status != 0x0000

    from test_arrival import control
    wait_for(lambda: (r := control(gw).requests(coupled["study"])) and not r[0].pending, 120,
             "the coupled study forwarded")
    wait_for(lambda: control(gw).study(routed["study"]), 60, "the routed study registered")
    wait_for(lambda: "ROUTED" in (gw.tree.logs / "detectStudyArrival.log").read_text(), 60,
             "the refused routing logged")
    bad_assign = gw.run("assign", routed["study"], "--project", "PROJ", "--participant", PID,
                        "--event", "baseline", check=False)
    assert bad_assign.returncode != 0
    gw.run("incoming", "list")
    gw.stop_all()

    logs = _logs(gw)
    assert any("detectStudyArrival" in p.name for p in logs) and \
        any("anonymizeAndSend" in p.name for p in logs)
    leaks = [f"{p.name}: {needle}" for p, text in logs.items() for needle in IDENTIFIERS
             if needle in text]
    assert leaks == []
    # the quarantine reason may say what was refused: it stays inside quarantine
    assert gw.quarantined()


def test_the_web_access_log_leaves_out_query_strings():
    import logging

    from fiona.web.server import PathOnlyAccessLog

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/assign?q={PID}&from=2025-01-01",
                                "1.1", 200), None)
    assert PathOnlyAccessLog().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /assign HTTP/1.1" 200'
