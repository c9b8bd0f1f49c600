"""`fiona retrieve` end to end: Orthanc plays the clinical PACS (FIONA declared as its modality,
so C-MOVE can deliver), FIONA's receiver, indexer and arrival detector run as processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomgen import make_study
from fiona.config import load
from fiona.control import open_control_plane
from helpers import Gateway, free_port, wait_for
from orthanc import Orthanc

pytestmark = pytest.mark.e2e

IMAGES = 3


@pytest.fixture
def setup(tmp_path: Path):
    """A gateway whose CLINICAL_PACS is an Orthanc holding studies ACC1..ACC3 and ACC9."""
    port = free_port()
    pacs = Orthanc(tmp_path)
    pacs.extra["DicomModalities"] = {"fiona": ["FIONA", "127.0.0.1", port]}
    gw = Gateway(tmp_path / "data", port, {
        "STUDY_QUIET_SECONDS": 1,
        "CLINICAL_PACS": {"aetitle": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}})
    studies = {}
    with pacs:
        for n, acc in enumerate(("ACC1", "ACC2", "ACC3", "ACC9")):
            studies[acc] = make_study(tmp_path / "src" / acc, n_series=2,
                                      images_per_series=IMAGES, accession=acc,
                                      patient_id=f"PAT{n}", seed=n)
            for path in studies[acc]["files"]:
                pacs.post("/instances", path.read_bytes())
        for daemon in ("storescp", "process-single-file", "detect-study-arrival"):
            gw.start(daemon)
        try:
            yield gw, pacs, studies
        finally:
            gw.stop_all()


def archived_studies(gw: Gateway) -> dict[str, int]:
    """StudyInstanceUID -> number of files FIONA archived."""
    import pydicom

    out: dict[str, int] = {}
    for path in gw.archive_files():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        out[uid] = out.get(uid, 0) + 1
    return out


def registered(gw: Gateway) -> set[str]:
    return {s.uid for s in open_control_plane(load(str(gw.config))).studies(include_hidden=True)}


def test_coupling_list_moves_exactly_the_listed_studies(setup, tmp_path):
    gw, pacs, studies = setup
    # ACC9 reached FIONA already (pushed by the scanner): it must not be moved again
    gw.storescu(*studies["ACC9"]["files"])
    wait_for(lambda: studies["ACC9"]["study"] in registered(gw), 60, "ACC9 registered")
    coupling = tmp_path / "coupling.csv"
    coupling.write_text("AccessionNumber,ProjectName,subjectid,eventname\n"
                        "ACC1,P,S1,baseline\nNOSUCH,P,S2,baseline\n"
                        "ACC9,P,S3,baseline\nACC2,P,S4,baseline\n")
    res = gw.run("retrieve", "--file", str(coupling), check=False)
    assert res.returncode == 1, res.stdout + res.stderr  # NOSUCH was not found
    out = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    assert out["ACC1"] == f"moved {2 * IMAGES} image(s) of 1 study(ies)"
    assert out["ACC2"] == f"moved {2 * IMAGES} image(s) of 1 study(ies)"
    assert out["NOSUCH"] == "not found"
    assert out["ACC9"] == "received already"
    want = {studies[a]["study"]: 2 * IMAGES for a in ("ACC1", "ACC2", "ACC9")}
    assert archived_studies(gw) == want  # ACC3 not moved, ACC9 not twice

    # the retrieved studies arrive as any others; asking again moves nothing
    wait_for(lambda: set(want) <= registered(gw), 60, "retrieved studies registered")
    again = gw.run("retrieve", "--accession", "ACC1", "--accession", "ACC2")
    assert again.stdout.count("received already") == 2
    assert archived_studies(gw) == want

    audit = [json.loads(x) for x in (gw.datadir / "logs" / "audit.log").read_text().splitlines()]
    entries = [e for e in audit if e["action"] == "retrieve"]
    assert [len(e["details"]["lines"]) for e in entries] == [4, 2]
    assert entries[0]["details"]["images"] == 4 * IMAGES
    logs = "".join(p.read_text(errors="replace") for p in (gw.datadir / "logs").rglob("*")
                   if p.is_file() and p.name != "audit.log")
    logs += "".join(p.read_text(errors="replace") for p in gw.datadir.glob("*.test.log"))
    audit_text = (gw.datadir / "logs" / "audit.log").read_text()
    assert "retrieve ref:" in logs
    for acc in ("ACC1", "ACC2", "ACC9", "NOSUCH"):
        assert acc not in logs + res.stderr + audit_text


def test_pacs_down_fails_each_line(setup):
    gw, pacs, _studies = setup
    pacs.stop(kill=True)
    res = gw.run("retrieve", "--accession", "ACC1", "--accession", "ACC2", check=False)
    assert res.returncode == 1
    lines = [x for x in res.stdout.splitlines() if x.startswith("ACC")]
    assert len(lines) == 2 and all("failed" in x and "cannot be reached" in x for x in lines)
    assert "Traceback" not in res.stderr
    assert archived_studies(gw) == {}


def test_bad_accession_and_no_peer(tmp_path):
    gw = Gateway(tmp_path / "data", free_port())
    res = gw.run("retrieve", "--accession", "ACC*", check=False)
    assert res.returncode == 2 and "CLINICAL_PACS" in res.stderr  # no peer configured
    gw2 = Gateway(tmp_path / "data2", free_port(), {
        "CLINICAL_PACS": {"aetitle": "PACS", "host": "127.0.0.1", "port": free_port()}})
    res = gw2.run("retrieve", "--accession", "ACC*", check=False)
    assert res.returncode == 1 and res.stdout.startswith("ACC*: invalid")


def test_coupling_report_button_retrieves_the_missing_lines(setup):
    from fastapi.testclient import TestClient

    from fiona.control.base import Project
    from fiona.web.app import create_app
    from fiona.web.users import UserStore
    from webapp import PASSWORD, csrf_of, login

    gw, pacs, studies = setup
    config = load(str(gw.config))
    open_control_plane(config).save_project(Project("A", naming=r"^A[0-9]{3}$"))
    users = UserStore(gw.datadir)
    users.add("alice", PASSWORD, ["project:A:assign"])
    client = TestClient(create_app(config), follow_redirects=False)
    assert login(client, "alice").status_code == 303
    page = client.post("/coupling", data={"csrf_token": csrf_of(client.get("/coupling").text)},
                       files={"file": ("c.csv", b"ACC1,A,A001,baseline\nACC2,A,A002,baseline\n"
                                                b"ACC3,B,B003,baseline\n", "text/csv")})
    assert page.status_code == 200
    assert "Retrieve 2 study(ies) of A" in page.text and "of B" not in page.text
    form = {"csrf_token": csrf_of(page.text), "project": "A", "accession": ["ACC1", "ACC2"]}
    assert client.post("/coupling/retrieve", data={**form, "csrf_token": ""}).status_code == 403
    done = client.post("/coupling/retrieve", data=form)
    assert done.status_code == 200, done.text
    assert done.text.count(f"moved {2 * IMAGES} image(s)") == 2
    assert set(archived_studies(gw)) == {studies["ACC1"]["study"], studies["ACC2"]["study"]}
    # an accession that is not on project A's coupling list is refused
    refused = client.post("/coupling/retrieve", data={**form, "accession": ["ACC9"]})
    assert refused.status_code >= 400 and set(archived_studies(gw)) == {
        studies["ACC1"]["study"], studies["ACC2"]["study"]}


def test_pacs_that_does_not_know_fiona_refuses_on_the_line(tmp_path):
    """Without FIONA among Orthanc's modalities the C-MOVE is refused: said on the line."""
    with Orthanc(tmp_path, extra={"DicomAlwaysAllowMove": True}) as pacs:
        study = make_study(tmp_path / "src", n_series=1, images_per_series=2, accession="ACC5")
        for path in study["files"]:
            pacs.post("/instances", path.read_bytes())
        gw = Gateway(tmp_path / "data", free_port(), {
            "CLINICAL_PACS": {"aetitle": pacs.aet, "host": "127.0.0.1",
                              "port": pacs.dicom_port}})
        res = gw.run("retrieve", "--accession", "ACC5", check=False)
    assert res.returncode == 1
    assert res.stdout.startswith("ACC5: refused (") and "refused a C-MOVE: status 0x" in res.stdout


@pytest.mark.parametrize("value, error", [
    ({"aetitle": "PACS", "host": "127.0.0.1"}, "missing required key CLINICAL_PACS.port"),
    ({"aetitle": "PACS", "host": "127.0.0.1", "port": 0}, "CLINICAL_PACS.port"),
    ({"aetitle": "A\\B", "host": "127.0.0.1", "port": 104}, "CLINICAL_PACS.aetitle"),
    ({"aetitle": "PACS", "host": "", "port": 104}, "CLINICAL_PACS.host"),
    ("PACS@host:104", "CLINICAL_PACS must be an object"),
])
def test_clinical_pacs_config_is_checked(tmp_path, value, error):
    gw = Gateway(tmp_path / "data", free_port())
    raw = json.loads(gw.config.read_text())
    gw.config.write_text(json.dumps({**raw, "CLINICAL_PACS": value}))
    res = gw.run("config", "check", check=False)
    assert res.returncode == 2 and error in res.stderr
