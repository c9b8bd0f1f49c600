"""One contract for every control-plane backend: the same tests run against the local SQLite
backend (a file in tmp_path), the REDCap backend (the REDCap API emulator over real HTTP,
with the deployed data dictionaries) and the PostgreSQL backend (a real server on loopback,
a fresh database per test). What the rest of FIONA relies on is here: projects,
participants, incoming studies, transfer requests (idempotent creation also under concurrent
writers, resend by revision, outcome, failure, pending list, reassign), coupling rows, routing
rules, auto-ID and the mirror into research projects."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import pytest

from fiona.clock import SYSTEM_CLOCK, FakeClock
from fiona.control.base import (
    ControlPlane,
    ControlPlaneError,
    CouplingRow,
    InventoryEntry,
    Project,
    RoutingRule,
    Series,
    Study,
    TransferRequest,
    held_message,
)
from fiona.control.local import LocalControlPlane
from fiona.control.postgres import PostgresControlPlane
from fiona.control.redcap import RedcapControlPlane
from fiona.control.sql import CLAIM_BATCH, CLAIM_SECONDS
from postgres import postgres_server
from redcap_emulator import RedcapEmulator

TOKENS = {"Incoming": "A" * 32, "Routing": "B" * 32, "CouplingList": "C" * 32,
          "AutoID": "D" * 32, "DataTransferProjects": "E" * 32, "PROJ": "F" * 32,
          "WhatIsInIDS7": "G" * 32}

Factory = Callable[[], ControlPlane]


pg_server = pytest.fixture(scope="session")(postgres_server)


@pytest.fixture(params=["local", "redcap", "postgres"])
def make_cp(request, tmp_path) -> Factory:
    """Makes clients of one backend's store; each is what one FIONA process would hold."""
    if request.param == "local":
        path = tmp_path / "fiona.db"
        yield lambda: LocalControlPlane(path)
        return
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_server").database()
        yield lambda: PostgresControlPlane(dsn)
        return
    emulator = RedcapEmulator()
    emulator.add_from_manifest(TOKENS, research_events=("baseline", "followup"))
    emulator.start()
    try:
        yield lambda: RedcapControlPlane(emulator.url, dict(TOKENS), timeout=30)
    finally:
        emulator.stop()


@pytest.fixture
def cp(make_cp) -> ControlPlane:
    return make_cp()


def a_request(study: str = "1.1", project: str = "PROJ", participant: str = "P0001",
              event: str = "baseline", requested: str = "2024-05-01 11:00:00",
              source: str = "assign") -> TransferRequest:
    return TransferRequest(study, project, participant, event, requested, source=source)


def a_study(uid: str, arrival: str = "2024-05-01 10:00:00") -> Study:
    return Study(uid=uid, patient_name_hash="a" * 64, patient_id_hash="b" * 64,
                 institution="Hospital", calling_ae="MODALITY", called_ae="FIONA",
                 description="MR Brain", date="20240501", time="101500", accession="ACC1",
                 arrival=arrival,
                 series=[Series(uid=f"{uid}.1", description="T1", num_files=176,
                                classify_types=["T1", "MPR"], modality="MR")])


# --- projects and participants ----------------------------------------------------------------
def test_projects(cp):
    proj = Project("PROJ", naming="^P[0-9]{4}$", events=["baseline", "followup"],
                   long_name="A study", contact="Kari", contact_email="kari@example.org",
                   use_autoid=True, autoid_aetitle="PROJAE", features={0, 2},
                   rec_start="2024-01-01", rec_end="2026-12-31",
                   pixel_exclusions=[("0008,0060", "^US$")], deid_profile="pathology")
    cp.save_project(proj)
    cp.save_project(Project("OTHER", active=False))
    assert cp.project("PROJ") == proj
    assert cp.project("OTHER").deid_profile == "default"
    assert [p.name for p in cp.projects()] == ["OTHER", "PROJ"]
    assert not cp.project("OTHER").active
    proj.pixel_exclusions = []
    cp.save_project(proj)
    assert cp.project("PROJ").pixel_exclusions == []
    with pytest.raises(ControlPlaneError, match="no project 'NONE'.*OTHER, PROJ"):
        cp.project("NONE")


def test_participants(cp):
    cp.add_participant("PROJ", "P0002")
    cp.add_participant("PROJ", "P0001")
    cp.add_participant("PROJ", "P0001")               # idempotent
    assert cp.participants("PROJ") == ["P0001", "P0002"]


# --- incoming studies -----------------------------------------------------------------------
def test_incoming_studies(cp):
    cp.register_study(a_study("1.1", arrival="2024-04-01 08:00:00"))
    cp.register_study(a_study("1.2", arrival="2024-04-01 09:00:00"))
    cp.register_study(a_study("1.3", arrival="2024-04-30 09:00:00"))
    assert [s.uid for s in cp.studies()] == ["1.3", "1.2", "1.1"]
    assert cp.study("1.1") == a_study("1.1", arrival="2024-04-01 08:00:00")
    assert cp.study("9.9") is None
    late = a_study("1.1", arrival="2024-04-01 08:00:00")
    late.series.append(Series(uid="1.1.2", description="DWI", num_files=30, modality="MR"))
    cp.register_study(late)                           # series merge by UID
    assert [s.uid for s in cp.study("1.1").series] == ["1.1.1", "1.1.2"]

    cp.add_request(a_request("1.2"))                  # assigned: stays on the list
    assert cp.hide_studies_before(datetime(2024, 4, 24)) == 1
    assert [s.uid for s in cp.studies()] == ["1.3", "1.2"]
    assert cp.study("1.1").hidden
    assert len(cp.studies(include_hidden=True)) == 3


# --- transfer requests ------------------------------------------------------------------------
def test_request_create_and_idempotency(cp):
    made = cp.add_request(a_request())
    assert made.instance > 0 and (made.revision, made.done_revision) == (1, 0)
    assert made.pending and not made.complete and made.source == "assign"
    assert cp.add_request(a_request(requested="2024-05-01 12:00:00")) == made
    # per (study, project): another participant or event gets the stored request back
    assert cp.add_request(a_request(participant="P0009", event="followup")) == made
    other = cp.add_request(a_request(project="OTHER", participant="O1"))
    assert other.instance != made.instance
    assert sorted(cp.requests("1.1"), key=lambda r: r.project) == [other, made]
    assert cp.requests("9.9") == []


def test_request_outcome_failure_and_pending_list(cp):
    first = cp.add_request(a_request("1.1", requested="2024-05-01 11:00:02"))
    second = cp.add_request(a_request("1.2", requested="2024-05-01 11:00:01"))
    assert cp.pending_requests() == [second, first]   # oldest first

    first.transferred, first.mapped_uid, first.complete = "2024-05-01 11:05:00", "2.25.9", True
    first.error_flags, first.active_proc_time, first.done_revision = {3}, 1.5, first.revision
    cp.update_request(first)
    [stored] = cp.requests("1.1")
    assert stored == first and not stored.pending

    second.transferred, second.error_flags, second.done_revision = "2024-05-01 11:06:00", {2}, 1
    second.error_message = "send: association rejected by PACS"
    cp.update_request(second)
    [failed] = cp.requests("1.2")
    assert failed.error_flags == {2} and "rejected" in failed.error_message
    assert not failed.pending and not failed.complete
    assert cp.pending_requests() == []


def test_resend_raises_the_revision_whatever_the_clock_says(cp):
    req = cp.add_request(a_request())
    req.transferred, req.complete, req.done_revision = req.requested, True, 1
    cp.update_request(req)
    again = cp.request_again(req, requested=req.requested)   # the same second
    assert (again.revision, again.done_revision, again.source) == (2, 1, "assign")
    assert again.pending and not again.complete
    amended = cp.request_again(again, "amendment")
    assert (amended.revision, amended.source) == (3, "amendment") and amended.requested
    assert cp.pending_requests() == [amended]


def test_outcome_of_an_older_revision_keeps_the_request_pending(cp):
    read = cp.add_request(a_request())                        # the forwarder reads revision 1
    cp.request_again(read)                                    # a resend while it sends
    read.transferred, read.complete, read.done_revision = "2024-05-01 11:05:00", True, 1
    cp.update_request(read)
    [stored] = cp.requests("1.1")
    assert (stored.revision, stored.done_revision) == (2, 1) and stored.pending


def test_reassign(cp):
    req = cp.add_request(a_request())
    moved = cp.reassign_request(req, "P0002", "followup", "2024-05-02 08:00:00")
    assert (moved.instance, moved.participant, moved.event) == (req.instance, "P0002", "followup")
    assert (moved.revision, moved.source, moved.requested) == (2, "reassign",
                                                               "2024-05-02 08:00:00")
    assert cp.requests("1.1") == [moved]


def test_concurrent_writers_make_exactly_one_request_per_study_and_project(make_cp):
    """Writers add requests to the same studies at the same moment, round after round: a
    shared (study, PROJ) must not be doubled, and each writer's own project must not be
    lost (REDCap's former max+1 instances did both)."""
    writers, rounds = 2, 25
    clients = [make_cp() for _ in range(writers)]
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(n: int, cp: ControlPlane) -> None:
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                for project in ("PROJ", f"W{n}"):
                    got = cp.add_request(a_request(f"2.{r}", project, f"P000{n}"))
                    assert got.project == project and got.instance > 0
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    reqs = clients[0].requests()
    keys = sorted((r.study_uid, r.project) for r in reqs)
    expected = sorted((f"2.{r}", p) for r in range(rounds)
                      for p in ("PROJ", *(f"W{n}" for n in range(writers))))
    assert keys == expected
    assert len({(r.study_uid, r.instance) for r in reqs}) == len(reqs)


# --- coupling lists, routing rules, auto-ID, mirror --------------------------------------------
def test_coupling_rows(cp):
    rows = [CouplingRow("ACC1", "PROJ", "P0001", "baseline", added="2024-05-01 10:00:00"),
            CouplingRow("", "PROJ", "P0002", "followup", study_uid="1.2.3",
                        added="2024-05-01 10:00:00")]
    cp.add_coupling_rows(rows)
    assert [r.id for r in rows] == [1, 2]
    more = [CouplingRow("ACC3", "PROJ", "P0003", "baseline", added="2024-05-02 10:00:00")]
    cp.add_coupling_rows(more)
    assert more[0].id == 3
    assert cp.coupling_rows() == rows + more


def test_routing_rules(cp):
    rule = RoutingRule("pseudo", "PROJ", "baseline", called_ae="FIONA", calling_ae="MOD",
                       patient_id_regex="^P[0-9]{4}$", patient_name_regex="")
    cp.save_routing_rule(rule)
    cp.save_routing_rule(RoutingRule("another", "PROJ", "followup", active=False))
    assert [r.name for r in cp.routing_rules()] == ["another", "pseudo"]
    rule.active = False
    cp.save_routing_rule(rule)                        # update in place
    assert cp.routing_rules()[1] == rule


def test_autoid(cp):
    assert cp.autoid("PROJ", "h1") is None
    cp.save_autoid("PROJ", "h1", "AU00001", "random")
    cp.save_autoid("PROJ", "h2", "AU00002", "random")
    cp.save_autoid("OTHER", "h1", "AU00001", "random")  # per project
    assert cp.autoid("PROJ", "h1") == "AU00001"
    assert cp.autoid_values("PROJ") == {"AU00001", "AU00002"}
    with pytest.raises(ControlPlaneError, match="taken"):
        cp.save_autoid("PROJ", "h3", "AU00001", "random")
    with pytest.raises(ControlPlaneError, match="taken"):
        cp.save_autoid("PROJ", "h1", "AU00009", "random")


def test_mirror_forwarded(cp):
    req = cp.add_request(a_request())
    req.mapped_uid = "2.25.77"
    cp.mirror_forwarded(req, "MR Brain")
    cp.mirror_forwarded(req, "MR Brain")              # idempotent
    assert cp.imaging("PROJ") == [{"participant": "P0001", "event": "baseline",
                                   "study_uid": "2.25.77", "description": "MR Brain"}]
    assert "P0001" in cp.participants("PROJ")


# --- nodes of a region --------------------------------------------------------------------------
def test_each_node_reads_only_its_own_studies_pending_requests(make_cp):
    """Two nodes on one control plane: each study and request carries the node holding the
    study, and a node's pending list (what its forwarder takes) has only its own studies and
    those registered before nodes existed (no node), never the other node's."""
    a, b = make_cp(), make_cp()
    a.register_study(replace(a_study("1.1"), node="north"))
    b.register_study(replace(a_study("1.2"), node="south"))
    a.register_study(a_study("1.3"))                              # before nodes: everybody's
    for uid in ("1.1", "1.2", "1.3"):
        b.add_request(a_request(uid))
    assert {s.uid: s.node for s in a.studies()} == {"1.1": "north", "1.2": "south", "1.3": ""}
    assert {r.study_uid: r.node for r in a.requests()} == {"1.1": "north", "1.2": "south",
                                                           "1.3": ""}
    assert [r.study_uid for r in a.pending_requests(node="north")] == ["1.1", "1.3"]
    assert [r.study_uid for r in b.pending_requests(node="south")] == ["1.2", "1.3"]
    assert len(a.pending_requests()) == 3                          # no filter: all
    [req] = a.requests("1.1")
    assert a.request_again(req).node == "north"


def test_a_study_split_between_two_nodes_is_marked_not_merged(make_cp):
    """Series of one study sent to two hospitals: the second node's registration leaves the
    first node's study (and series) as they are and names the second node as split."""
    a, b = make_cp(), make_cp()
    first = a.register_study(replace(a_study("1.1"), node="north"))
    assert first.node == "north" and not first.split
    late = replace(a_study("1.1"), node="north")
    late.series.append(Series(uid="1.1.2", description="DWI", num_files=30, modality="MR"))
    assert [s.uid for s in a.register_study(late).series] == ["1.1.1", "1.1.2"]
    other = replace(a_study("1.1"), node="south",
                    series=[Series(uid="1.1.9", description="CT", num_files=3)])
    stored = b.register_study(other)
    assert (stored.node, stored.split_nodes) == ("north", ["south"])
    again = b.register_study(other)                               # reported once, not doubled
    assert again.split_nodes == ["south"]
    kept = a.study("1.1")
    assert kept.node == "north" and kept.split_nodes == ["south"]
    assert [s.uid for s in kept.series] == ["1.1.1", "1.1.2"]


def test_the_key_fingerprint_is_recorded_once(make_cp):
    a, b = make_cp(), make_cp()
    assert a.claim_key_fingerprint("hmac-sha256:aaaa") == "hmac-sha256:aaaa"
    assert b.claim_key_fingerprint("hmac-sha256:bbbb") == "hmac-sha256:aaaa"
    assert a.autoid_values("") == set() and a.autoid("", "hmac-sha256:aaaa") is None


# --- claims: several forwarders on one index ------------------------------------------------
@pytest.fixture(params=["local", "postgres"])
def make_sql(request, tmp_path) -> Callable[..., ControlPlane]:
    """Clients of one SQL store (the backends forwarders may share), with a clock."""
    if request.param == "local":
        path = tmp_path / "fiona.db"
        return lambda clock=SYSTEM_CLOCK, holder="": LocalControlPlane(path, clock, holder)
    dsn = request.getfixturevalue("pg_server").database()
    return lambda clock=SYSTEM_CLOCK, holder="": PostgresControlPlane(dsn, clock=clock,
                                                                      holder=holder)


def test_two_forwarders_never_take_the_same_request(make_sql):
    """Two forwarders on one index claim, send and complete 200 requests: each is sent
    exactly once (SKIP LOCKED row locks on PostgreSQL, the write lock on SQLite)."""
    setup = make_sql()
    for n in range(200):
        setup.add_request(a_request(f"3.{n}", requested=f"2024-05-01 1{n // 60}:{n % 60:02d}:00"))
    sent: list[str] = []
    errors: list[BaseException] = []

    def forwarder() -> None:
        cp = make_sql()
        try:
            while work := cp.pending_requests(node="north", claim=True):
                for req in work:
                    sent.append(req.study_uid)
                    req.done_revision, req.complete = req.revision, True
                    cp.update_request(req)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=forwarder) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(sent) == 200 and len(set(sent)) == 200
    assert setup.pending_requests() == []


def test_a_killed_forwarders_claims_return_when_their_lease_ends(make_sql):
    clock = FakeClock()
    setup = make_sql(clock)
    setup.add_request(a_request("4.1"))
    dead, alive = make_sql(clock), make_sql(clock)
    assert [r.study_uid for r in dead.pending_requests(claim=True)] == ["4.1"]
    assert alive.pending_requests(claim=True) == []          # held by the other
    assert [r.study_uid for r in alive.pending_requests()] == ["4.1"]  # still pending
    clock.advance(CLAIM_SECONDS + 1)
    [req] = alive.pending_requests(claim=True)               # the lease ran out
    req.done_revision = req.revision
    alive.update_request(req)
    again = alive.request_again(req)                          # a resend: anyone's again
    assert [r.instance for r in dead.pending_requests(claim=True)] == [again.instance]


def test_a_claim_is_renewed_only_by_its_holder_before_its_lease_ends(make_sql):
    clock = FakeClock()
    slow, other = make_sql(clock, "gw1/north/main"), make_sql(clock, "gw2/north/main")
    slow.add_request(a_request("7.1"))
    [req] = slow.pending_requests(claim=True)
    assert not other.renew_claim(req)                        # not its claim
    clock.advance(CLAIM_SECONDS - 1)
    assert slow.renew_claim(req)                             # renewed: a whole lease again
    clock.advance(CLAIM_SECONDS - 1)
    assert other.pending_requests(claim=True) == []
    clock.advance(2)                                         # the lease ran out
    assert [r.instance for r in other.pending_requests(claim=True)] == [req.instance]
    assert not slow.renew_claim(req)                         # the slow one must not send it


def test_a_restarted_forwarder_takes_its_own_claims_back_at_once(make_sql):
    """The same holder (machine, node, site: `claim_holder`) after a restart need not wait
    for the lease of the claims it made before it was killed."""
    before = make_sql(holder="gw1/north/main")
    before.add_request(a_request("6.1"))
    assert len(before.pending_requests(claim=True)) == 1
    assert make_sql(holder="gw2/north/main").pending_requests(claim=True) == []
    assert len(make_sql(holder="gw1/north/main").pending_requests(claim=True)) == 1


def test_held_requests_do_not_crowd_out_the_claims(make_sql):
    cp = make_sql()
    for n in range(CLAIM_BATCH):
        held = cp.add_request(a_request(f"5.{n}", requested="2024-05-01 10:00:00"))
        held.error_message = held_message("project PROJ is inactive")
        cp.update_request(held)
    cp.add_request(a_request("5.new", requested="2024-05-02 10:00:00"))
    assert "5.new" in [r.study_uid for r in cp.pending_requests(claim=True)]


def test_inventory_lines_carry_the_node_that_delivered_them(cp):
    lines = [InventoryEntry("2.25.1", "PROJ", "P0001", "baseline", "2024-05-01", 1, 3, ["MR"],
                            "2024-05-02 10:00:00", "2024-05-02 10:00:00", node="north"),
             InventoryEntry("2.25.2", "PROJ", node="")]        # delivered otherwise
    cp.replace_inventory("PROJ", lines)
    assert cp.inventory("PROJ") == lines
