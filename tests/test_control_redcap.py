"""The `redcap` control plane against the REDCap API emulator (real HTTP, the deployed data
dictionaries in config/redcap/): every interface method round-trips, errors name the project,
and methods export only the records and forms they need."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fiona.config import ConfigError, parse
from fiona.control import BACKENDS, open_control_plane
from fiona.control.base import (
    ControlPlaneError,
    CouplingRow,
    Project,
    RoutingRule,
    Series,
    Study,
    TransferRequest,
    Unavailable,
)
from fiona.control.keyed import Keyed
from fiona.control.local import LocalControlPlane
from fiona.control.redcap import RedcapControlPlane
from redcap_emulator import DICTIONARIES_DIR, RedcapEmulator

TOKENS = {
    "Incoming": "A" * 32,
    "Routing": "B" * 32,
    "CouplingList": "C" * 32,
    "AutoID": "D" * 32,
    "DataTransferProjects": "E" * 32,
    "PROJ": "F" * 32,
}


class Clock:
    """The emulator's server time, moved by the test instead of sleeping."""

    def __init__(self):
        self.now = datetime(2024, 5, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 10) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock):
    emulator = RedcapEmulator(clock=clock)
    emulator.add_from_manifest(TOKENS, research_events=("baseline", "followup"))
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def cp(emu) -> RedcapControlPlane:
    return RedcapControlPlane(emu.url, dict(TOKENS), timeout=5)


def calls(emu, since: int = 0, **match) -> list[dict]:
    return [r for r in emu.requests[since:] if all(r.get(k) == v for k, v in match.items())]


def a_study(uid: str = "1.2.3.4", arrival: str = "2024-05-01 10:00:00", **kw) -> Study:
    keyed = Keyed(b"k" * 32)
    values = dict(
        uid=uid, patient_name_hash=keyed.patient_name("Doe^John"),
        patient_id_hash=keyed.patient_id("01017012345"), institution="Hospital",
        calling_ae="MODALITY", called_ae="FIONA", description="MR Brain", date="20240501",
        time="101500", accession="ACC1", arrival=arrival,
        series=[Series(uid=f"{uid}.1", description="T1", date="20240501", time="101600",
                       num_files=176, sequence_name="*tfl3d1_16ns", classify_types=["T1", "MPR"],
                       modality="MR"),
                Series(uid=f"{uid}.2", description="DWI", num_files=30, modality="MR")])
    values.update(kw)
    return Study(**values)


# --- connection and errors --------------------------------------------------------------------
def test_connection_checks_every_token(cp, emu):
    cp.test_connection()
    asked = {r["project"] for r in calls(emu, content="project")}
    assert asked == set(TOKENS)


def test_invalid_token_names_the_project(emu):
    cp = RedcapControlPlane(emu.url, {**TOKENS, "Routing": "X" * 32})
    with pytest.raises(ControlPlaneError) as err:
        cp.test_connection()
    assert "Routing" in str(err.value) and "tokens.json" in str(err.value)
    assert not isinstance(err.value, Unavailable)
    with pytest.raises(ControlPlaneError, match="refused the API token for project Routing"):
        cp.routing_rules()


def test_missing_token_names_project_and_file(emu, tmp_path):
    tokens = {k: v for k, v in TOKENS.items() if k != "AutoID"}
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens))
    path.chmod(0o600)
    cp = RedcapControlPlane.from_config({"type": "redcap", "url": emu.url, "tokens": str(path),
                                         "verify_tls": True})
    with pytest.raises(ControlPlaneError) as err:
        cp.autoid("PROJ", "abc")
    assert "AutoID" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ControlPlaneError, match="AutoID"):
        cp.test_connection()


def test_stopped_emulator_is_unavailable(cp, emu):
    cp.register_study(a_study())
    emu.stop()
    with pytest.raises(Unavailable) as err:
        cp.studies()
    assert emu.url in str(err.value) and "Incoming" in str(err.value)
    with pytest.raises(Unavailable, match="DataTransferProjects"):
        cp.projects()
    emu.restart()
    assert [s.uid for s in cp.studies()] == ["1.2.3.4"]


def test_server_error_is_unavailable():
    class Failing(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"error": "database is down"}'
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/"
        cp = RedcapControlPlane(url, dict(TOKENS), timeout=5)
        with pytest.raises(Unavailable) as err:
            cp.routing_rules()
        assert "503" in str(err.value) and "Routing" in str(err.value) and url in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_bad_request_carries_redcap_error_and_project(cp):
    with pytest.raises(ControlPlaneError) as err:
        cp.export("Incoming", fields=["no_such_field"])
    assert "no_such_field" in str(err.value) and "Incoming" in str(err.value)


def test_verify_tls_cannot_be_turned_off(emu):
    with pytest.raises(ControlPlaneError, match="TLS"):
        RedcapControlPlane(emu.url, TOKENS, verify_tls=False)


# --- tokens file and the registry -------------------------------------------------------------
def test_tokens_file_mode_0644_refused(tmp_path, emu):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        RedcapControlPlane.from_config({"url": emu.url, "tokens": str(path)})
    path.chmod(0o600)
    cp = RedcapControlPlane.from_config({"url": emu.url, "tokens": str(path)})
    cp.test_connection()


def test_tokens_file_bad_json_names_the_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('{"Incoming": "abc",}')
    path.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        RedcapControlPlane.from_config({"url": "https://r/api/", "tokens": str(path)})
    assert str(path) in str(err.value) and "JSON" in str(err.value)
    path.write_text('["abc"]')
    with pytest.raises(ConfigError, match="tokens.json"):
        RedcapControlPlane.from_config({"url": "https://r/api/", "tokens": str(path)})


def test_registry_opens_both_backends(tmp_path, emu):
    assert set(BACKENDS) >= {"local", "redcap"}
    (tmp_path / "site").mkdir()
    local = open_control_plane(parse({"DATADIR": str(tmp_path)}, tmp_path / "config.json"))
    assert isinstance(local, LocalControlPlane) and local.kind == "local"
    assert local.path == tmp_path / "site" / "fiona.db"

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    tokens.chmod(0o600)
    config = parse({"DATADIR": str(tmp_path),
                    "CONTROL_PLANE": {"type": "redcap", "url": emu.url, "tokens": str(tokens)}},
                   tmp_path / "config.json")
    cp = open_control_plane(config)
    assert isinstance(cp, RedcapControlPlane) and cp.kind == "redcap"
    cp.test_connection()


# --- projects and participants ----------------------------------------------------------------
def full_project(name: str = "PROJ") -> Project:
    return Project(name=name, naming=r"^PROJ[0-9]{3}$", events=["baseline", "followup"],
                   long_name="A project", contact="Ann Researcher", contact_email="ann@example.org",
                   active=True, use_autoid=True, autoid_aetitle="PROJAE", features={0, 2},
                   rec_start="2024-01-01", rec_end="2026-12-31", import_rule_tag="0008,1030",
                   import_rule_regexp=r"^(?P<keep>\w+)",
                   pixel_exclusions=[("0008,0060", "^US$"), ("0008,1090", "Voluson")])


def test_projects_round_trip(cp, emu):
    p = full_project()
    other = Project(name="OTHER", active=False)
    cp.save_project(p)
    cp.save_project(other)
    assert cp.projects() == [other, p]
    start = len(emu.requests)
    assert cp.project("PROJ") == p
    (export,) = calls(emu, start)
    assert export["params"]["records"] == ["PROJ"]

    p.pixel_exclusions = [("0018,1030", "^scout")]
    p.features = set()
    p.use_autoid = False
    p.contact = ""
    cp.save_project(p)
    assert cp.project("PROJ") == p
    with pytest.raises(ControlPlaneError, match="no project 'NOPE'"):
        cp.project("NOPE")


def test_participants_in_the_project_redcap(cp, emu):
    cp.save_project(full_project())
    assert cp.participants("PROJ") == []
    cp.add_participant("PROJ", "PROJ001")
    cp.add_participant("PROJ", "PROJ001")
    cp.add_participant("PROJ", "PROJ002")
    assert cp.participants("PROJ") == ["PROJ001", "PROJ002"]
    rows = emu.stored(TOKENS["PROJ"])
    assert {(r["record_id"], r["redcap_event_name"]) for r in rows} == {
        ("PROJ001", "baseline_arm_1"), ("PROJ002", "baseline_arm_1")}


def test_participants_without_a_project_redcap_come_from_transfers(cp, emu):
    cp.save_project(Project(name="NOREDCAP"))
    cp.add_participant("NOREDCAP", "X1")   # no token: nothing to create
    assert cp.participants("NOREDCAP") == []
    cp.register_study(a_study())
    cp.add_request(TransferRequest("1.2.3.4", "NOREDCAP", "X1", "baseline", "2024-05-01 11:00:00"))
    cp.add_request(TransferRequest("1.2.3.4", "PROJ", "P9", "baseline", "2024-05-01 11:00:00"))
    assert cp.participants("NOREDCAP") == ["X1"]


# --- incoming studies -------------------------------------------------------------------------
def test_register_study_round_trip_in_one_import(cp, emu):
    study = a_study()
    start = len(emu.requests)
    cp.register_study(study)
    assert len(calls(emu, start, action="import")) == 1
    assert cp.study("1.2.3.4") == study
    assert cp.studies() == [study]
    assert cp.study("9.9.9") is None


def test_register_study_merges_series_by_uid(cp, emu):
    study = a_study()
    cp.register_study(study)
    amended = a_study(series=[Series(uid="1.2.3.4.3", description="late", num_files=5),
                              Series(uid="1.2.3.4.1", description="T1", num_files=177,
                                     classify_types=[])])
    cp.register_study(amended)
    got = cp.study("1.2.3.4")
    assert [s.uid for s in got.series] == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]
    assert got.series[0] == amended.series[1]           # updated in place
    assert got.series[1] == study.series[1]             # kept
    assert got.series[2] == amended.series[0]           # added
    instances = {r["series_instance_uid"]: r["redcap_repeat_instance"]
                 for r in emu.stored(TOKENS["Incoming"])
                 if r["redcap_repeat_instrument"] == "series"}
    assert instances == {"1.2.3.4.1": 1, "1.2.3.4.2": 2, "1.2.3.4.3": 3}


def test_incoming_never_holds_clear_patient_identifiers(cp, emu):
    study = a_study()
    cp.register_study(study)
    got = cp.study(study.uid)
    assert got.patient_name_hash == study.patient_name_hash
    assert got.patient_id_hash == study.patient_id_hash
    stored = json.dumps(emu.stored(TOKENS["Incoming"]))
    assert "Doe" not in stored and "01017012345" not in stored
    (base,) = [r for r in emu.stored(TOKENS["Incoming"]) if not r["redcap_repeat_instrument"]]
    assert base["study_patient_name"] == study.patient_name_hash
    assert base["study_patient_id"] == study.patient_id_hash
    assert len(base["study_patient_id"]) == 64


def test_hide_studies_before(cp, emu):
    cp.register_study(a_study("1.1", arrival="2024-04-01 08:00:00"))   # old, unassigned
    cp.register_study(a_study("1.2", arrival="2024-04-01 09:00:00"))   # old, assigned
    cp.register_study(a_study("1.3", arrival="2024-04-30 09:00:00"))   # recent
    cp.add_request(TransferRequest("1.2", "PROJ", "PROJ001", "baseline", "2024-04-02 10:00:00"))
    assert cp.hide_studies_before(datetime(2024, 4, 24)) == 1
    assert cp.hide_studies_before(datetime(2024, 4, 24)) == 0
    assert [s.uid for s in cp.studies()] == ["1.3", "1.2"]
    everything = cp.studies(include_hidden=True)
    assert [(s.uid, s.hidden) for s in everything] == [("1.3", False), ("1.2", False),
                                                       ("1.1", True)]
    cp.register_study(a_study("1.1", arrival="2024-04-01 08:00:00"))   # re-registered
    assert cp.study("1.1").hidden
    stored = [r for r in emu.stored(TOKENS["Incoming"])
              if r["study_instance_uid"] == "1.1" and not r["redcap_repeat_instrument"]]
    assert stored[0]["study_removed_date"]


def test_studies_since(cp, emu, clock):
    cp.register_study(a_study("1.1"))
    clock.advance()
    mark = clock.now
    clock.advance()
    cp.register_study(a_study("1.2"))
    assert [s.uid for s in cp.studies_since(mark)] == ["1.2"]


# --- transfer requests ------------------------------------------------------------------------
def test_requests_round_trip(cp, emu):
    cp.register_study(a_study("1.1"))
    first = cp.add_request(TransferRequest("1.1", "PROJ", "PROJ001", "baseline",
                                           "2024-05-01 11:00:00", source="assign"))
    second = cp.add_request(TransferRequest("1.1", "OTHER", "O1", "followup",
                                            "2024-05-01 11:00:01", source="coupling"))
    assert first.instance != second.instance and (first.revision, first.done_revision) == (1, 0)
    assert 1 <= first.instance <= 32767 and 1 <= second.instance <= 32767
    assert cp.requests("1.1") == sorted([first, second], key=lambda r: r.instance)
    # idempotent per (study, project): the stored request comes back, nothing is added
    assert cp.add_request(TransferRequest("1.1", "PROJ", "PROJ009", "followup",
                                          "2024-05-01 12:00:00")) == first
    assert len(cp.requests("1.1")) == 2

    first.transferred = "2024-05-01 11:05:00"
    first.mapped_uid = "2.25.1234"
    first.error_flags = {2, 3}
    first.error_message = "send: association rejected"
    first.active_proc_time = 12.75
    first.complete = True
    first.done_revision = 1
    cp.update_request(first)
    assert first in cp.requests("1.1") and not first.pending

    first.error_flags = set()                    # cleared fields must be cleared in REDCap
    first.error_message = ""
    cp.update_request(first)
    assert first in cp.requests("1.1")
    again = cp.request_again(first, "amendment", "2024-05-01 11:05:00")  # the same second
    assert (again.revision, again.done_revision, again.source) == (2, 1, "amendment")
    assert again.pending and not again.complete and again.requested == "2024-05-01 11:05:00"
    assert again in cp.requests("1.1")
    assert cp.pending_requests() == [second, again]

    cp.register_study(a_study("1.2"))
    third = cp.add_request(TransferRequest("1.2", "PROJ", "PROJ002", "baseline",
                                           "2024-05-01 10:00:00", source="routing"))
    assert cp.pending_requests() == [third, second, again]
    # registering again does not touch the requests
    cp.register_study(a_study("1.1"))
    assert {r.instance for r in cp.requests("1.1")} == {first.instance, second.instance}


def test_forwarder_outcome_does_not_undo_a_resend(cp, emu):
    """The forwarder writes the outcome of the revision it read; a resend made meanwhile
    (revision 2) keeps the request pending."""
    cp.register_study(a_study("1.1"))
    read = cp.add_request(TransferRequest("1.1", "PROJ", "PROJ001", "baseline",
                                          "2024-05-01 11:00:00"))
    cp.request_again(read)
    read.done_revision, read.complete, read.transferred = read.revision, True, "2024-05-01 11:01:00"
    cp.update_request(read)
    [stored] = cp.requests("1.1")
    assert (stored.revision, stored.done_revision) == (2, 1) and stored.pending


def test_reassign_keeps_the_instance_and_raises_the_revision(cp, emu):
    cp.register_study(a_study("1.1"))
    req = cp.add_request(TransferRequest("1.1", "PROJ", "PROJ001", "baseline",
                                         "2024-05-01 11:00:00"))
    moved = cp.reassign_request(req, "PROJ002", "followup", "2024-05-01 12:00:00")
    assert (moved.instance, moved.participant, moved.event, moved.source, moved.revision) == \
        (req.instance, "PROJ002", "followup", "reassign", 2)
    assert cp.requests("1.1") == [moved]


def test_requests_made_before_revisions_keep_their_state(cp, emu):
    """Instances written by an older FIONA (blank revision fields, max+1 numbering) read as
    revision 1, done if transferred at or after they were requested."""
    cp.register_study(a_study("1.1"))
    cp.import_rows("Incoming", [
        {"study_instance_uid": "1.1", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": "1", "transfer_project_name": "PROJ",
         "transfer_name": "PROJ001", "transfer_event_name": "baseline",
         "transfer_requested_date": "2024-05-01 11:00:00", "transfer_date": "2024-05-01 11:00:00"},
        {"study_instance_uid": "1.1", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": "2", "transfer_project_name": "OTHER",
         "transfer_name": "O1", "transfer_event_name": "baseline",
         "transfer_requested_date": "2024-05-01 11:00:01", "transfer_date": "2024-05-01 11:00:00"}])
    done, waiting = cp.requests("1.1")
    assert (done.revision, done.done_revision, done.pending) == (1, 1, False)
    assert (waiting.revision, waiting.done_revision, waiting.pending) == (1, 0, True)
    assert cp.add_request(TransferRequest("1.1", "PROJ", "PROJ001", "baseline", "x")) == done
    assert cp.request_again(done, requested="2024-05-01 11:00:00").pending


@contextmanager
def legacy_redcap(tmp_path, dictionary: str, dropped: Callable[[str], bool]
                  ) -> Iterator[tuple[RedcapEmulator, RedcapControlPlane]]:
    """A REDCap made for an older FIONA: `dictionary` without the lines `dropped` picks,
    the control plane on it (no PROJ project)."""
    old = tmp_path / "dictionaries"
    shutil.copytree(DICTIONARIES_DIR, old)
    text = (old / dictionary).read_text().splitlines(keepends=True)
    (old / dictionary).write_text("".join(line for line in text if not dropped(line)))
    tokens = {k: v for k, v in TOKENS.items() if k != "PROJ"}
    legacy = RedcapEmulator(dictionaries_dir=old)
    legacy.add_from_manifest(tokens)
    legacy.start()
    try:
        yield legacy, RedcapControlPlane(legacy.url, tokens, timeout=5)
    finally:
        legacy.stop()


def test_an_incoming_project_without_revision_fields_is_named(emu, tmp_path):
    """A REDCap Incoming project made for an older FIONA: a clear error naming the fields."""
    with legacy_redcap(tmp_path, "Incoming.csv", lambda line: "_revision," in line) as (
            legacy, cp):
        with pytest.raises(ControlPlaneError, match="transfer_revision, transfer_done_revision"):
            cp.test_connection()
        with pytest.raises(ControlPlaneError, match="lacks the fields transfer_revision"):
            cp.register_study(a_study("1.1"))
        with pytest.raises(ControlPlaneError, match="lacks the fields transfer_revision"):
            cp.add_request(TransferRequest("1.1", "PROJ", "PROJ001", "baseline", "2024-05-01"))
        assert not legacy.stored(TOKENS["Incoming"])  # nothing half-written
        legacy.add_project("T" * 32, "Incoming2", "Incoming.csv", repeating=("series", "transfers"))
        cp.tokens["Incoming"] = "T" * 32  # a project with requests made before the fields
        cp.import_rows("Incoming", [{"study_instance_uid": "1.1",
                                     "redcap_repeat_instrument": "transfers",
                                     "redcap_repeat_instance": "1",
                                     "transfer_project_name": "PROJ"}])
        with pytest.raises(ControlPlaneError, match="lacks the fields transfer_revision"):
            cp.pending_requests()


def test_requests_of_one_study_is_one_export_naming_the_record(cp, emu):
    cp.register_study(a_study("1.1"))
    cp.register_study(a_study("1.2"))
    cp.add_request(TransferRequest("1.1", "PROJ", "PROJ001", "baseline", "2024-05-01 11:00:00"))
    start = len(emu.requests)
    assert len(cp.requests("1.1")) == 1
    exports = calls(emu, start)
    assert len(exports) == 1
    (export,) = exports
    assert (export["project"], export["content"], export["action"]) == ("Incoming", "record",
                                                                        "export")
    assert export["params"]["records"] == ["1.1"]
    assert export["params"]["forms"] == ["transfers"]


def test_requests_since(cp, emu, clock):
    cp.register_study(a_study("1.1"))
    cp.register_study(a_study("1.2"))
    r1 = cp.add_request(TransferRequest("1.1", "PROJ", "A", "baseline", "2024-05-01 11:00:00"))
    clock.advance()
    mark = clock.now
    clock.advance()
    r2 = cp.add_request(TransferRequest("1.2", "PROJ", "B", "baseline", "2024-05-01 11:00:00"))
    assert cp.requests_since(mark) == [r2]
    clock.advance()
    mark = clock.now
    clock.advance()
    r1.transferred, r1.done_revision = "2024-05-01 11:01:00", 1
    cp.update_request(r1)
    assert cp.requests_since(mark.isoformat(sep=" ")) == [r1]


# --- coupling lists, routing rules, auto-ID ---------------------------------------------------
def test_coupling_rows_round_trip(cp, emu, clock):
    rows = [CouplingRow("ACC1", "PROJ", "PROJ001", "baseline", added="2024-05-01"),
            CouplingRow("", "PROJ", "PROJ002", "followup", study_uid="1.2.3", added="2024-05-01")]
    start = len(emu.requests)
    cp.add_coupling_rows(rows)
    assert len(calls(emu, start)) == 1
    assert [r.id for r in rows] == [1, 2]
    assert cp.coupling_rows() == rows
    clock.advance()
    mark = clock.now
    clock.advance()
    more = [CouplingRow("ACC3", "PROJ", "PROJ003", "baseline", added="2024-05-02")]
    cp.add_coupling_rows(more)
    assert more[0].id == 3
    assert cp.coupling_rows() == rows + more
    assert cp.coupling_rows_since(mark) == more
    cp.add_coupling_rows([])


def test_routing_rules_round_trip(cp):
    rule = RoutingRule("mr-pseudo", "PROJ", "baseline", active=True, called_ae="FIONA",
                       calling_ae="", patient_id_regex=r"PROJ\d{3}", patient_name_regex="")
    other = RoutingRule("ct", "PROJ", "followup", active=False, calling_ae="CT1")
    cp.save_routing_rule(rule)
    cp.save_routing_rule(other)
    assert cp.routing_rules() == [other, rule]
    rule.called_ae = ""
    rule.active = False
    cp.save_routing_rule(rule)
    assert cp.routing_rules() == [other, rule]


def test_autoid_round_trip(cp, emu):
    keyed = Keyed(b"k" * 32)
    h1, h2 = keyed.autoid("PROJ", "0101"), keyed.autoid("PROJ", "0202")
    assert cp.autoid("PROJ", h1) is None
    cp.save_autoid("PROJ", h1, "PROJ001", "random")
    cp.save_autoid("PROJ", h2, "PROJ002", "random")
    cp.save_autoid("OTHER", h1, "PROJ001", "random")       # another project: independent
    assert cp.autoid("PROJ", h1) == "PROJ001"
    assert cp.autoid("PROJ", h2) == "PROJ002"
    assert cp.autoid("OTHER", h2) is None
    assert cp.autoid_values("PROJ") == {"PROJ001", "PROJ002"}
    with pytest.raises(ControlPlaneError, match="taken"):
        cp.save_autoid("PROJ", h1, "PROJ003", "random")      # patient already mapped
    with pytest.raises(ControlPlaneError, match="taken"):
        cp.save_autoid("PROJ", keyed.autoid("PROJ", "0303"), "PROJ002", "random")
    stored = emu.stored(TOKENS["AutoID"])
    assert len(stored) == 3 and {r["autoid_hash"] for r in stored} == {h1, h2}
    autoid_exports = calls(emu, 0, project="AutoID", action="export")
    assert all(r["params"].get("filterLogic") for r in autoid_exports)


# --- mirror into the research project ---------------------------------------------------------
def test_mirror_forwarded_and_imaging(cp, emu):
    r = TransferRequest("1.1", "PROJ", "PROJ001", "followup", "2024-05-01 11:00:00",
                        mapped_uid="2.25.99")
    cp.mirror_forwarded(r, "MR Brain")
    cp.mirror_forwarded(r, "MR Brain")                        # idempotent
    r2 = TransferRequest("1.2", "PROJ", "PROJ001", "followup", "2024-05-02 11:00:00",
                         mapped_uid="2.25.100")
    cp.mirror_forwarded(r2, "CT Head")
    r3 = TransferRequest("1.3", "PROJ", "PROJ002", "baseline", "2024-05-02 11:00:00",
                         mapped_uid="2.25.101")
    cp.mirror_forwarded(r3, "")
    got = cp.imaging("PROJ")
    assert sorted(got, key=lambda d: d["study_uid"]) == [
        {"participant": "PROJ001", "event": "followup", "study_uid": "2.25.100",
         "description": "CT Head"},
        {"participant": "PROJ002", "event": "baseline", "study_uid": "2.25.101",
         "description": ""},
        {"participant": "PROJ001", "event": "followup", "study_uid": "2.25.99",
         "description": "MR Brain"},
    ]
    rows = [x for x in emu.stored(TOKENS["PROJ"]) if x["redcap_repeat_instrument"] == "imaging"]
    assert {(x["record_id"], x["redcap_event_name"], x["redcap_repeat_instance"]) for x in rows} \
        == {("PROJ001", "followup_arm_1", 1), ("PROJ001", "followup_arm_1", 2),
            ("PROJ002", "baseline_arm_1", 1)}
    assert "PROJ001" in cp.participants("PROJ")


def test_mirror_forwarded_needs_the_project_token(cp):
    r = TransferRequest("1.1", "NOREDCAP", "X1", "baseline", "2024-05-01 11:00:00",
                        mapped_uid="2.25.1")
    with pytest.raises(ControlPlaneError) as err:
        cp.mirror_forwarded(r, "x")
    assert "NOREDCAP" in str(err.value)
    assert cp.imaging("NOREDCAP") == []


def test_polling_exports_are_incremental(cp, emu, clock):
    """The helpers a daemon polls with send dateRangeBegin, not a full export."""
    start = len(emu.requests)
    cp.coupling_rows_since("2024-05-01 00:00:00")
    cp.requests_since(datetime(2024, 5, 1))
    sent = calls(emu, start, content="record")
    assert [r["params"]["dateRangeBegin"] for r in sent] == ["2024-05-01 00:00:00"] * 2


def test_an_incoming_project_without_node_fields_is_named(tmp_path):
    """An Incoming project from before regions: the error names the node fields to add."""
    with legacy_redcap(tmp_path, "Incoming.csv",
                       lambda line: line.startswith(("study_node", "study_split"))) as (_, cp):
        with pytest.raises(ControlPlaneError, match="lacks the fields study_node, "
                                                    "study_split_nodes.*Incoming.csv"):
            cp.register_study(a_study("1.1"))


def test_a_projects_project_without_the_profile_field_is_named(tmp_path):
    """DataTransferProjects from before per-project profiles: its projects read as profile
    "default"; saving one names the field to add instead of REDCap's import error."""
    with legacy_redcap(tmp_path, "DataTransferProjects.csv",
                       lambda line: line.startswith("project_deid_profile")) as (_, cp):
        cp.import_rows("DataTransferProjects", [{"record_id": "OLD", "project_events": "x"}])
        assert cp.project("OLD").deid_profile == "default"
        with pytest.raises(ControlPlaneError, match="lacks the field project_deid_profile.*"
                                                    "DataTransferProjects.csv"):
            cp.save_project(Project("NEW", deid_profile="pathology"))
        assert [p.name for p in cp.projects()] == ["OLD"]
