"""Assignment rules (fiona.control.assign) in process, on the local control plane and a fake
clock: manual assignment, coupling lists, routing rules, auto-ID, amendments, one
participant per study and project (and the administrator's move), closed projects, and log
lines without identifiers. The arrival daemon's share is in test_rules_arrival.py, the same
rules through the daemons in test_arrival.py."""

from __future__ import annotations

import logging
import re
from datetime import datetime

import pytest

from fiona.control.assign import Arrival, Refused
from fiona.control.base import ControlPlaneError, Project, RoutingRule, Study, TransferRequest
from inprocess import LocalSite

PATIENT_ID = "01019912345"
PATIENT_NAME = "Nordmann^Kari"
ACCESSION = "ACC778899"


@pytest.fixture
def site(tmp_path):
    s = LocalSite.create(tmp_path)
    s.control.save_project(Project("PROJ", naming=r"^P[0-9]{4}$", events=["baseline", "followup"]))
    yield s
    s.close()


def study(site: LocalSite, uid: str, accession: str = "", called: str = "FIONA",
          calling: str = "STORESCU") -> Study:
    s = Study(uid, accession=accession, called_ae=called, calling_ae=calling,
              arrival="2026-01-01 12:00:00")
    site.control.register_study(s)
    return s


def arrival(s: Study, patient_id: str = PATIENT_ID, patient_name: str = PATIENT_NAME) -> Arrival:
    return Arrival(s, patient_id=patient_id, patient_name=patient_name)


def forwarded(site: LocalSite, req: TransferRequest) -> None:
    """What the forwarder writes back when it has sent a request's study."""
    req.transferred, req.mapped_uid, req.complete = "2026-01-01 12:00:00", "2.25.99", True
    req.done_revision = req.revision
    site.control.update_request(req)
    assert not site.control.requests(req.study_uid)[0].pending


# --- manual assignment -------------------------------------------------------------------------
def test_assign_once_with_the_clock_time(site):
    study(site, "1.2.3")
    a = site.assigner()
    req = a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    assert req.pending and req.source == "assign"
    assert req.requested == site.clock.now().replace(microsecond=0).isoformat(sep=" ")
    assert a.request("1.2.3", "PROJ", "P0001", "baseline", "assign") is None
    assert len(site.control.requests("1.2.3")) == 1
    assert site.control.participants("PROJ") == ["P0001"]
    with pytest.raises(ControlPlaneError, match=re.escape("^P[0-9]{4}$")):
        a.request("1.2.3", "PROJ", "X1", "baseline", "assign")
    with pytest.raises(ControlPlaneError, match="no event 'nope'.*baseline, followup"):
        a.request("1.2.3", "PROJ", "P0001", "nope", "assign")


def test_second_participant_in_a_project_is_refused_naming_the_first(site):
    study(site, "1.2.3")
    site.control.save_project(Project("OTHER", naming=r"^O[0-9]+$", events=["v1"]))
    a = site.assigner()
    a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    for participant, event in (("P0002", "baseline"), ("P0001", "followup")):
        with pytest.raises(Refused) as err:
            a.request("1.2.3", "PROJ", participant, event, "assign")
        text = str(err.value)
        assert "participant P0001 (event baseline)" in text and "reassign" in text
        assert "overwrite" in text
    # another project de-identifies to other UIDs: allowed
    assert a.request("1.2.3", "OTHER", "O7", "v1", "assign") is not None
    assert [(r.project, r.participant) for r in site.control.requests("1.2.3")] == \
        [("PROJ", "P0001"), ("OTHER", "O7")]


def test_reassign_moves_the_study_and_sends_it_again(site):
    study(site, "1.2.3")
    a = site.assigner()
    req = a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    forwarded(site, req)
    site.clock.advance(60)
    moved = a.reassign("1.2.3", "PROJ", "P0002")
    [stored] = site.control.requests("1.2.3")
    assert stored.instance == req.instance  # the same request, not a second one
    assert (stored.participant, stored.event, stored.source) == ("P0002", "baseline", "reassign")
    assert stored.pending and moved.pending
    assert stored.requested == site.clock.now().replace(microsecond=0).isoformat(sep=" ")
    assert "P0002" in site.control.participants("PROJ")
    # now P0002 holds it: P0001 is refused, naming P0002
    with pytest.raises(Refused, match="participant P0002"):
        a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    assert a.reassign("1.2.3", "PROJ", "P0002", "followup").event == "followup"
    with pytest.raises(ControlPlaneError, match=re.escape("^P[0-9]{4}$")):
        a.reassign("1.2.3", "PROJ", "bad")
    with pytest.raises(ControlPlaneError, match="no request in project PROJ"):
        a.reassign("9.9.9", "PROJ", "P0003")


# --- closed projects ---------------------------------------------------------------------------
@pytest.mark.parametrize("today,open_", [
    ("2026-02-28", False), ("2026-03-01", True), ("2026-06-30", True), ("2026-07-01", False)])
def test_ethics_approval_period_on_the_clock(tmp_path, today, open_):
    s = LocalSite.create(tmp_path, start=datetime.fromisoformat(f"{today} 09:00:00"))
    try:
        s.control.save_project(Project("REC", naming=r"^R[0-9]$", rec_start="2026-03-01",
                                       rec_end="2026-06-30"))
        study(s, "1.2.3")
        a = s.assigner()
        if open_:
            assert a.request("1.2.3", "REC", "R1", "baseline", "assign") is not None
        else:
            with pytest.raises(Refused, match="project REC's ethics approval (starts on "
                                              "2026-03-01|ended on 2026-06-30)"):
                a.request("1.2.3", "REC", "R1", "baseline", "assign")
            assert s.control.requests() == []
    finally:
        s.close()


def test_inactive_project_takes_nothing_by_any_path(site, caplog):
    site.control.save_project(Project("OLD", naming=r"^A[0-9]+$", events=["v1"], active=False,
                                      use_autoid=True, autoid_aetitle="AUTOAE"))
    site.control.save_routing_rule(RoutingRule("old", "OLD", "v1", patient_id_regex="A[0-9]+"))
    s = study(site, "1.2.3", accession="ACC1", called="AUTOAE")
    a = site.assigner()
    with pytest.raises(Refused, match="project OLD is inactive"):
        a.request("1.2.3", "OLD", "A1", "v1", "assign")
    report = a.upload_coupling("ACC1,OLD,A1,v1\n")
    assert [(x.status, x.detail) for x in report.lines] == \
        [("refused", "project OLD is inactive; it takes no new studies")]
    with caplog.at_level(logging.INFO, logger="fiona"):
        assert a.on_arrival(arrival(s, patient_id="A42"), amendment=False) == []
    assert site.control.requests() == [] and site.control.autoid_values("OLD") == set()
    assert caplog.text.count("project OLD is inactive") == 2  # routing and auto-ID


def test_amendment_is_not_sent_to_a_project_closed_since(site, caplog):
    s = study(site, "1.2.3")
    a = site.assigner()
    forwarded(site, a.request("1.2.3", "PROJ", "P0001", "baseline", "assign"))
    site.control.save_project(Project("PROJ", naming=r"^P[0-9]{4}$", events=["baseline"],
                                      rec_end=site.clock.now().date().isoformat()))
    site.clock.advance(24 * 3600)
    with caplog.at_level(logging.INFO, logger="fiona"):
        assert a.on_arrival(arrival(s), amendment=True) == []
    assert not site.control.requests("1.2.3")[0].pending
    assert "late series not sent to project PROJ" in caplog.text


# --- coupling lists ----------------------------------------------------------------------------
def test_coupling_rows_before_and_after_the_study(site):
    a = site.assigner()
    report = a.upload_coupling("AccessionNumber,ProjectName,subjectid,eventname\n"
                               "ACC1,PROJ,P0001,baseline\n")
    assert [x.status for x in report.lines] == ["accepted"] and report.requests == []
    early = study(site, "1.2.1", accession="ACC1")
    [req] = a.on_arrival(arrival(early), amendment=False)
    assert (req.participant, req.event, req.source) == ("P0001", "baseline", "coupling")

    study(site, "1.2.2", accession="ACC2")
    report = a.upload_coupling("ACC2,PROJ,P0002,followup\n")
    [late] = report.requests
    assert (late.study_uid, late.participant, late.event) == ("1.2.2", "P0002", "followup")
    # the same rows again: listed already, no second request
    again = a.upload_coupling("ACC1,PROJ,P0001,baseline\nACC2,PROJ,P0002,followup\n")
    assert [x.status for x in again.lines] == ["duplicate", "duplicate"]
    assert len(site.control.requests()) == 2


def test_coupling_conflicts_name_their_lines(site):
    report = site.assigner().upload_coupling("ACC1,PROJ,P0001,baseline\n"
                                             "ACC1,PROJ,P0002,baseline\n"
                                             "ACC3,PROJ,P0003,baseline\n"
                                             "ACC4,PROJ,nope,baseline\n"
                                             "ACC5,NOPROJ,P0005,baseline\n"
                                             "ACC6,PROJ\n")
    got = {x.line: (x.status, x.detail) for x in report.lines}
    assert got[1][0] == got[2][0] == "conflict" and "lines 1, 2" in got[1][1]
    assert got[3] == ("accepted", "")
    assert got[4][0] == "bad participant ID" and "^P[0-9]{4}$" in got[4][1]
    assert got[5] == ("unknown project", "NOPROJ") and got[6][0] == "malformed"
    assert [r.accession for r in site.control.coupling_rows()] == ["ACC3"]


def test_coupling_row_for_a_study_assigned_to_another_participant_is_refused(site):
    study(site, "1.2.3", accession="ACC1")
    a = site.assigner()
    a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    report = a.upload_coupling("ACC1,PROJ,P0002,baseline\n")
    [line] = report.lines
    assert line.status == "refused" and "participant P0001" in line.detail
    assert report.requests == [] and site.control.coupling_rows() == []
    assert [r.participant for r in site.control.requests("1.2.3")] == ["P0001"]


# --- routing rules -----------------------------------------------------------------------------
def test_routing_rules_match_ae_titles_and_anchored_patterns(site):
    site.control.save_project(Project("ROUTED", naming=r"^SUBJ[0-9]+$", events=["scan"]))
    site.control.save_routing_rule(RoutingRule("trial", "ROUTED", "scan", calling_ae="TRIALSCU",
                                               patient_id_regex="SUBJ[0-9]+"))
    site.control.save_routing_rule(RoutingRule("byname", "ROUTED", "scan", called_ae="NAMES",
                                               patient_name_regex="SUBJ[0-9]+"))
    site.control.save_routing_rule(RoutingRule("off", "ROUTED", "scan", active=False,
                                               patient_id_regex=".*"))
    a = site.assigner()
    cases = [("1.1", "TRIALSCU", "FIONA", "SUBJ042", "x", "SUBJ042"),
             ("1.2", "OTHERSCU", "FIONA", "SUBJ043", "x", None),       # calling AE differs
             ("1.3", "TRIALSCU", "FIONA", "xSUBJ044", "x", None),      # anchored
             ("1.4", "ANY", "NAMES", "", "SUBJ045", "SUBJ045")]        # by PatientName
    for uid, calling, called, pid, name, expected in cases:
        s = study(site, uid, called=called, calling=calling)
        made = a.on_arrival(arrival(s, patient_id=pid, patient_name=name), amendment=False)
        assert [r.participant for r in made] == ([expected] if expected else []), uid
        if made:
            assert (made[0].project, made[0].event, made[0].source) == \
                ("ROUTED", "scan", "routing")


def test_routing_does_not_take_a_study_from_its_participant(site, caplog):
    site.control.save_routing_rule(RoutingRule("r", "PROJ", "baseline",
                                               patient_id_regex="P[0-9]{4}"))
    s = study(site, "1.2.3")
    site.assigner().request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    with caplog.at_level(logging.INFO, logger="fiona"):
        assert site.assigner().on_arrival(arrival(s, patient_id="P0777"), False) == []
    assert [r.participant for r in site.control.requests("1.2.3")] == ["P0001"]
    assert "routing rule for project PROJ not applied" in caplog.text
    assert "P0777" not in caplog.text and "P0001" not in caplog.text


# --- what arrival will ask for ------------------------------------------------------------------
def test_expected_names_the_requests_arrival_makes_and_writes_nothing(site):
    """The forwarder de-identifies a study in its quiet period for what `expected` names: it
    must be exactly what the arrival then asks for, by the same rules, without writing."""
    site.control.save_project(Project("ROUTED", naming=r"^SUBJ[0-9]+$", events=["scan"]))
    site.control.save_routing_rule(RoutingRule("trial", "ROUTED", "scan", calling_ae="TRIALSCU",
                                               patient_id_regex="SUBJ[0-9]+"))
    a = site.assigner()
    assert a.upload_coupling(f"{ACCESSION},PROJ,P0001,baseline\n").accepted == 1
    s = study(site, "1.2.3", accession=ACCESSION, calling="TRIALSCU")
    incoming = arrival(s, patient_id="SUBJ042")
    expected = a.expected(incoming)
    assert expected == [("PROJ", "P0001", "baseline"), ("ROUTED", "SUBJ042", "scan")]
    assert site.control.requests("1.2.3") == [] and site.control.participants("PROJ") == []
    made = a.on_arrival(incoming, amendment=False)
    assert [(r.project, r.participant, r.event) for r in made] == expected
    site.control.save_project(Project("ROUTED", naming=r"^SUBJ[0-9]+$", events=["scan"],
                                      active=False))   # closed: its rule makes no request
    assert a.expected(incoming) == [("PROJ", "P0001", "baseline")]


# --- auto-ID -----------------------------------------------------------------------------------
def test_autoid_same_patient_same_id(site):
    site.control.save_project(Project("AUTO", naming=r"^AU[0-9]{5}$", events=["visit1"],
                                      use_autoid=True, autoid_aetitle="FIONAAUTO"))
    a = site.assigner()
    ids = []
    for uid, pid in (("1.1", "12345678901"), ("1.2", "12345678901"), ("1.3", "98765432109")):
        s = study(site, uid, called="FIONAAUTO")
        [req] = a.on_arrival(arrival(s, patient_id=pid), amendment=False)
        assert (req.project, req.event, req.source) == ("AUTO", "visit1", "autoid")
        ids.append(req.participant)
    assert ids[0] == ids[1] != ids[2]
    assert all(re.fullmatch(r"AU[0-9]{5}", i) for i in ids)
    # another AE title: no auto-ID
    assert a.on_arrival(arrival(study(site, "1.4"), patient_id="12345678901"), False) == []
    assert site.control.autoid_values("AUTO") == {ids[0], ids[2]}


def test_autoid_without_a_patient_id_is_logged(site, caplog):
    site.control.save_project(Project("AUTO", naming=r"^AU[0-9]{5}$", events=["visit1"],
                                      use_autoid=True, autoid_aetitle="FIONAAUTO"))
    with caplog.at_level(logging.INFO, logger="fiona"):
        made = site.assigner().on_arrival(arrival(study(site, "1.1", called="FIONAAUTO"),
                                                  patient_id=""), amendment=False)
    assert made == [] and "auto-ID needs a PatientID" in caplog.text


# --- amendments --------------------------------------------------------------------------------
def test_amendment_asks_again_for_sent_requests_only(site):
    s = study(site, "1.2.3")
    other = study(site, "1.2.4")
    a = site.assigner()
    sent = a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
    forwarded(site, sent)
    waiting = a.request("1.2.4", "PROJ", "P0002", "baseline", "assign")
    site.clock.advance(5)
    [again] = a.on_arrival(arrival(s), amendment=True)
    assert again.instance == sent.instance and again.source == "amendment"
    [stored] = site.control.requests("1.2.3")
    assert stored.pending and (stored.participant, stored.event) == ("P0001", "baseline")
    assert a.on_arrival(arrival(other), amendment=True) == []  # still pending: nothing to do
    assert site.control.requests("1.2.4")[0].instance == waiting.instance
    assert a.on_arrival(arrival(s), amendment=False) == []  # no rule matches: no new request


# --- no identifiers in log lines ---------------------------------------------------------------
def test_log_lines_name_no_identifiers(site, caplog):
    """Routing with a clear PatientID that breaks the project's naming rule, auto-ID, a
    coupling row by accession that meets a study assigned elsewhere, a manual assignment
    and a move: the log says what happened, by study UID and keyed reference only."""
    site.control.save_project(Project("ROUTED", naming=r"^SUBJ[0-9]+$", events=["scan"]))
    site.control.save_project(Project("AUTO", naming=r"^AU[0-9]{5}$", events=["visit1"],
                                      use_autoid=True, autoid_aetitle="FIONAAUTO"))
    site.control.save_routing_rule(RoutingRule("byid", "ROUTED", "scan",
                                               patient_id_regex="[0-9]+"))
    site.control.save_routing_rule(RoutingRule("byname", "PROJ", "baseline",
                                               patient_name_regex=".*Kari"))
    a = site.assigner()
    with caplog.at_level(logging.DEBUG):
        s = study(site, "1.2.3", accession=ACCESSION, called="FIONAAUTO")
        made = a.on_arrival(arrival(s), amendment=False)
        assert [r.project for r in made] == ["AUTO"]
        a.request("1.2.3", "PROJ", "P0001", "baseline", "assign")
        a.upload_coupling(f"{ACCESSION},PROJ,P0002,baseline\n")
        a.upload_coupling(f"{ACCESSION},ROUTED,SUBJ{PATIENT_ID},scan\n")
        a.on_arrival(arrival(s), amendment=True)
        a.reassign("1.2.3", "PROJ", "P0003")
    text = caplog.text
    assert "routing rule for project ROUTED not applied" in text
    assert "routing rule for project PROJ not applied" in text
    assert "ref:" in text and "1.2.3" in text
    for clear in (PATIENT_ID, "Nordmann", "Kari", ACCESSION, f"SUBJ{PATIENT_ID}"):
        assert clear.lower() not in text.lower(), f"{clear} in the log:\n{text}"
    participants = [r.participant for r in site.control.requests()]
    for participant in participants:
        assert participant not in text, f"participant {participant} in the log"
