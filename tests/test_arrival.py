"""Study arrival, the control plane and automatic assignment: the same behaviour on both
backends (local SQLite, and REDCap through the REDCap API emulator in tests/)."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dicomgen import make_study
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import ControlPlane, now_iso
from helpers import Gateway, free_port, wait_for
from redcap_emulator import RedcapEmulator

pytestmark = pytest.mark.e2e  # the gateways here run their daemons

CONTROL_TOKENS = ["Incoming", "Routing", "CouplingList", "AutoID", "DataTransferProjects"]
PROJECTS = ["PROJ", "ROUTED", "AUTO"]


@dataclass
class Backend:
    name: str
    extra: dict
    emulator: RedcapEmulator | None = None
    tokens: dict[str, str] = field(default_factory=dict)


def _redcap(tmp_path: Path) -> Backend:
    emulator = RedcapEmulator()
    tokens = {name: f"{i:032X}" for i, name in enumerate(CONTROL_TOKENS + PROJECTS, start=1)}
    emulator.add_from_manifest(tokens)
    url = emulator.start()
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    tokens_file.chmod(0o600)
    return Backend("redcap", {"CONTROL_PLANE": {"type": "redcap", "url": url,
                                                "tokens": str(tokens_file)}}, emulator, tokens)


@pytest.fixture(params=["local", "redcap"])
def backend(request, tmp_path: Path):
    """One control-plane backend: local SQLite, or REDCap through the emulator."""
    if request.param == "local":
        yield Backend("local", {"CONTROL_PLANE": {"type": "local"}})
        return
    b = _redcap(tmp_path)
    yield b
    b.emulator.stop()


@pytest.fixture
def redcap(tmp_path: Path):
    """The REDCap backend alone, for faults only REDCap can have (down, bad token)."""
    b = _redcap(tmp_path)
    yield b
    b.emulator.stop()


def make(tmp_path: Path, backend: Backend, quiet: float = 2.0) -> Gateway:
    gw = Gateway(tmp_path / "data", free_port(), {**backend.extra, "STUDY_QUIET_SECONDS": quiet})
    gw.run("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline,followup")
    return gw


def control(gw: Gateway) -> ControlPlane:
    return open_control_plane(load(str(gw.config)))


def wait_study(gw: Gateway, uid: str, series: int, timeout: float = 60):
    def registered():
        s = control(gw).study(uid)
        return s if s and len(s.series) == series else None
    return wait_for(registered, timeout, f"study {uid} with {series} series in the control plane")


def requests_of(gw: Gateway, uid: str):
    return control(gw).requests(uid)


def start_all(gw: Gateway) -> None:
    for daemon in ("storescp", "process-single-file", "detect-study-arrival"):
        gw.start(daemon)


def arrival_log(gw: Gateway) -> str:
    path = gw.tree.logs / "detectStudyArrival.log"
    return path.read_text() if path.exists() else ""


def test_study_becomes_incoming_and_coupling_rows_before_and_after(tmp_path, backend):
    gw = make(tmp_path, backend)
    before = make_study(tmp_path / "a", n_series=2, images_per_series=3, accession="ACC1",
                        patient_id="PAT1", seed=1)
    after = make_study(tmp_path / "b", n_series=1, images_per_series=3, accession="ACC2",
                       patient_id="PAT2", seed=2)
    (tmp_path / "early.csv").write_text("AccessionNumber,ProjectName,subjectid,eventname\n"
                                        "ACC1,PROJ,P0001,baseline\n")
    assert "1 row(s) accepted" in gw.run("coupling", "upload", str(tmp_path / "early.csv")).stdout
    start_all(gw)
    assert gw.storescu(tmp_path / "a", tmp_path / "b").returncode == 0

    study = wait_study(gw, before["study"], 2)
    assert study.accession == "ACC1" and study.calling_ae == "STORESCU"
    assert study.called_ae == "FIONA" and sum(s.num_files for s in study.series) == 6
    assert {s.uid for s in study.series} == set(before["series"])
    assert "PAT1" not in study.patient_id_hash and len(study.patient_id_hash) == 64
    wait_for(lambda: requests_of(gw, before["study"]), 30, "the coupling request")

    wait_study(gw, after["study"], 1)
    assert requests_of(gw, after["study"]) == []
    (tmp_path / "late.csv").write_text("ACC2,PROJ,P0002,followup\n")
    report = gw.run("coupling", "upload", str(tmp_path / "late.csv")).stdout
    assert "1 request(s) made" in report

    for uid, who in ((before["study"], ("PROJ", "P0001", "baseline")),
                     (after["study"], ("PROJ", "P0002", "followup"))):
        [req] = requests_of(gw, uid)
        assert (req.project, req.participant, req.event) == who and req.pending
    # uploading the same rows again makes no second request
    gw.run("coupling", "upload", str(tmp_path / "early.csv"))
    gw.run("coupling", "upload", str(tmp_path / "late.csv"))
    assert len(requests_of(gw, before["study"])) == 1 and len(requests_of(gw, after["study"])) == 1
    assert "P0001" in control(gw).participants("PROJ")


def test_conflicting_coupling_rows_are_refused_with_line_numbers(tmp_path, backend):
    gw = make(tmp_path, backend)
    (tmp_path / "cl.csv").write_text("AccessionNumber,ProjectName,subjectid,eventname\n"
                                     "ACC1,PROJ,P0001,baseline\n"
                                     "ACC1,PROJ,P0002,baseline\n"
                                     "ACC3,PROJ,P0003,baseline\n"
                                     "ACC4,PROJ,nope,baseline\n"
                                     "ACC5,NOPROJ,P0005,baseline\n")
    res = gw.run("coupling", "upload", str(tmp_path / "cl.csv"), check=False)
    assert res.returncode == 1
    out = res.stdout
    assert "line 2: conflict" in out and "line 3: conflict" in out and "lines 2, 3" in out
    assert "line 4: accepted" in out
    assert "line 5: bad participant ID" in out and "^P[0-9]{4}$" in out
    assert "line 6: unknown project" in out
    assert [r.accession for r in control(gw).coupling_rows()] == ["ACC3"]


def test_routing_rule_and_autoid(tmp_path, backend):
    gw = make(tmp_path, backend)
    gw.run("project", "add", "ROUTED", "--naming", "^SUBJ[0-9]+$", "--events", "scan")
    gw.run("routing", "add", "trial", "--project", "ROUTED", "--event", "scan",
           "--calling-ae", "TRIALSCU", "--patient-id-regex", "SUBJ[0-9]+")
    gw.run("project", "add", "AUTO", "--naming", "^AU[0-9]{5}$", "--events", "visit1",
           "--autoid-aetitle", "FIONAAUTO")
    routed = make_study(tmp_path / "r", n_series=1, images_per_series=2, patient_id="SUBJ042",
                        accession="R1", seed=3)
    not_routed = make_study(tmp_path / "n", n_series=1, images_per_series=2,
                            patient_id="OTHER9", accession="R2", seed=4)
    auto1 = make_study(tmp_path / "a1", n_series=1, images_per_series=2, patient_id="12345678901",
                       accession="A1", seed=5)
    auto2 = make_study(tmp_path / "a2", n_series=1, images_per_series=2, patient_id="12345678901",
                       accession="A2", seed=6)
    other = make_study(tmp_path / "a3", n_series=1, images_per_series=2, patient_id="98765432109",
                       accession="A3", seed=7)
    start_all(gw)
    assert gw.storescu(tmp_path / "r", tmp_path / "n", aet="TRIALSCU").returncode == 0
    assert gw.storescu(tmp_path / "a1", aec="FIONAAUTO").returncode == 0
    wait_for(lambda: requests_of(gw, auto1["study"]), 60, "the first auto-ID request")
    assert gw.storescu(tmp_path / "a2", tmp_path / "a3", aec="FIONAAUTO").returncode == 0

    wait_for(lambda: requests_of(gw, routed["study"]), 60, "the routing request")
    [req] = requests_of(gw, routed["study"])
    assert (req.project, req.participant, req.event, req.source) == \
        ("ROUTED", "SUBJ042", "scan", "routing")
    wait_study(gw, not_routed["study"], 1)
    ids = []
    for study in (auto1, auto2, other):
        wait_for(lambda s=study: requests_of(gw, s["study"]), 60, "an auto-ID request")
        [r] = requests_of(gw, study["study"])
        assert r.project == "AUTO" and r.event == "visit1" and r.source == "autoid"
        ids.append(r.participant)
    assert ids[0] == ids[1] != ids[2]  # same patient, same ID; another patient, another ID
    assert all(len(i) == 7 and i.startswith("AU") for i in ids)
    assert requests_of(gw, not_routed["study"]) == []


def test_late_series_resend_and_wrong_participant(tmp_path, backend):
    gw = make(tmp_path, backend)
    study = make_study(tmp_path / "s", n_series=2, images_per_series=3, accession="L1", seed=8)
    late = make_study(tmp_path / "late", n_series=3, images_per_series=2, accession="L1",
                      study_uid=study["study"], seed=9)
    for f in late["files"]:
        if not f.name.startswith("s03"):
            f.unlink()
    start_all(gw)
    assert gw.storescu(tmp_path / "s").returncode == 0
    wait_study(gw, study["study"], 2)

    bad = gw.run("assign", study["study"], "--project", "PROJ", "--participant", "X1",
                 "--event", "baseline", check=False)
    assert bad.returncode == 1 and "^P[0-9]{4}$" in bad.stderr
    gw.run("assign", study["study"], "--project", "PROJ", "--participant", "P0100",
           "--event", "baseline")
    again = gw.run("assign", study["study"], "--project", "PROJ", "--participant", "P0100",
                   "--event", "baseline")
    assert "exists already" in again.stdout
    [req] = requests_of(gw, study["study"])
    # de-identification and forwarding (a later stage) mark the request done
    cp = control(gw)
    req.transferred, req.mapped_uid, req.complete = now_iso(), "2.25.1234", True
    req.done_revision = req.revision
    cp.update_request(req)
    assert not requests_of(gw, study["study"])[0].pending

    assert gw.storescu(tmp_path / "late").returncode == 0  # the late fourth series
    wait_study(gw, study["study"], 3)
    wait_for(lambda: requests_of(gw, study["study"])[0].pending, 60, "the follow-up request")
    [req] = requests_of(gw, study["study"])
    assert req.source == "amendment" and (req.participant, req.event) == ("P0100", "baseline")
    assert len(control(gw).studies()) == 1

    req.transferred, req.complete, req.done_revision = now_iso(), True, req.revision
    control(gw).update_request(req)  # done in the same second as the resend below
    assert "1 request(s)" in gw.run("resend", "--project", "PROJ").stdout
    assert requests_of(gw, study["study"])[0].pending
    assert "1 forwarded" in gw.run("populate-projects").stdout
    [mirror] = control(gw).imaging("PROJ")
    assert mirror["participant"] == "P0100" and mirror["study_uid"] == "2.25.1234"


@pytest.mark.parametrize("quiet,amended", [(10.0, False), (2.0, True)])
def test_two_bursts_make_one_study(tmp_path, backend, quiet, amended):
    gw = make(tmp_path, backend, quiet=quiet)
    study = make_study(tmp_path / "s", n_series=2, images_per_series=3, seed=10)
    first = tmp_path / "burst1"
    second = tmp_path / "burst2"
    first.mkdir()
    second.mkdir()
    for f in study["files"]:
        f.rename((first if f.name.startswith("s01") else second) / f.name)
    start_all(gw)
    assert gw.storescu(first).returncode == 0
    if amended:  # the second burst comes after the first one's arrival
        wait_for(lambda: f"study {study['study']} arrived" in arrival_log(gw), 90,
                 "the first burst to arrive")
    # else it comes at once, well inside the 10 s quiet period (a fixed pause raced a detector
    # that started late under load)
    assert gw.storescu(second).returncode == 0
    wait_study(gw, study["study"], 2, timeout=90)
    wait_for(lambda: not any(gw.tree.arrived.iterdir()), 60, "the touch files to be removed")
    log = arrival_log(gw)
    assert len(control(gw).studies()) == 1
    assert log.count(f"study {study['study']} arrived") == 1
    assert (f"study {study['study']} amended" in log) == amended


def test_arrival_daemon_killed_and_restarted_loses_nothing(tmp_path, backend):
    gw = make(tmp_path, backend, quiet=3.0)
    study = make_study(tmp_path / "s", n_series=1, images_per_series=4, seed=11)
    gw.start("storescp")
    gw.start("process-single-file")
    detector = gw.start("detect-study-arrival")
    assert gw.storescu(tmp_path / "s").returncode == 0
    detector.send_signal(signal.SIGKILL)  # before the quiet period is over
    detector.wait()
    gw.procs.pop("detect-study-arrival")
    assert control(gw).study(study["study"]) is None
    gw.start("detect-study-arrival")
    wait_study(gw, study["study"], 1)


def test_redcap_down_arrivals_wait(tmp_path, redcap):
    gw = make(tmp_path, redcap)
    start_all(gw)
    redcap.emulator.stop()
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2, seed=13)
    assert gw.storescu(tmp_path / "s").returncode == 0  # reception never needs REDCap
    wait_for(lambda: "unreachable" in arrival_log(gw), 60, "the log line about REDCap")
    redcap.emulator.restart()  # the back-off itself is tested on a clock in test_rules_arrival
    wait_study(gw, study["study"], 1, timeout=90)
    assert "waits" in arrival_log(gw)


def test_invalid_token_names_the_project(tmp_path, redcap):
    gw = make(tmp_path, redcap)
    tokens_file = Path(redcap.extra["CONTROL_PLANE"]["tokens"])
    tokens = json.loads(tokens_file.read_text())
    tokens["Incoming"] = "0" * 32
    tokens_file.write_text(json.dumps(tokens))
    res = gw.run("incoming", "list", check=False)
    assert res.returncode == 1 and "Incoming" in res.stderr and "token" in res.stderr


def test_stored_records_never_hold_clear_identifiers(tmp_path, backend):
    gw = make(tmp_path, backend)
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2, patient_id="NID12345678",
                       patient_name="Nordmann^Kari", accession="C1", seed=14)
    (tmp_path / "cl.csv").write_text("C1,PROJ,P0007,baseline\n")
    gw.run("coupling", "upload", str(tmp_path / "cl.csv"))
    start_all(gw)
    assert gw.storescu(tmp_path / "s").returncode == 0
    wait_for(lambda: requests_of(gw, study["study"]), 60, "the request")
    if backend.emulator is not None:
        dump = json.dumps([backend.emulator.stored(t) for t in backend.tokens.values()])
    else:
        dump = "".join(p.read_bytes().decode("latin-1")
                       for p in gw.tree.site.glob("fiona.db*"))
    for clear in ("NID12345678", "Nordmann", "Kari"):
        assert clear not in dump, f"{clear} stored in clear text"


def test_coupling_row_entered_in_redcap_after_the_study(tmp_path, redcap):
    """Researchers may type the coupling row into REDCap itself; the daemon polls for rows
    changed since its last look (dateRangeBegin), not the whole list."""
    import urllib.parse
    import urllib.request

    gw = make(tmp_path, redcap)
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2, accession="RC1", seed=15)
    start_all(gw)
    assert gw.storescu(tmp_path / "s").returncode == 0
    wait_study(gw, study["study"], 1)

    def polls() -> list[dict]:
        return [r for r in redcap.emulator.requests if r["project"] == "CouplingList"
                and r["content"] == "record" and r.get("action", "export") == "export"]

    # the arrival read the whole list, and so does the daemon's first sweep after it (for rows
    # entered while it was down): the row must come after both, or they find it
    wait_for(lambda: len(polls()) >= 2, 60, "the arrival daemon's first sweep of the list")
    row = {"record_id": "1", "cl_accessionnumber": "RC1", "cl_projectname": "PROJ",
           "cl_subjectid": "P0042", "cl_eventname": "followup", "cl_studyinstanceuid": "",
           "cl_date": ""}
    body = urllib.parse.urlencode({"token": redcap.tokens["CouplingList"], "content": "record",
                                   "format": "json", "type": "flat",
                                   "data": json.dumps([row])}).encode()
    with urllib.request.urlopen(redcap.emulator.url, body) as answer:
        assert json.load(answer)["count"] == 1
    wait_for(lambda: requests_of(gw, study["study"]), 60, "the request from the REDCap row")
    [req] = requests_of(gw, study["study"])
    assert (req.participant, req.event, req.source) == ("P0042", "followup", "coupling")
    assert any("dateRangeBegin" in r["params"] for r in polls())
