"""The arrival detector's rules in process, on a fake clock: the quiet period, waiting for the
indexer, one study from several bursts, amendments, arrival workflows. Files are filed by
the receiver's own handler and indexed by the indexer's class; the daemons as processes are
tested in test_arrival.py."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from dicomgen import make_study
from fiona.arrive.detector import RETRY_SECONDS, ArrivalDetector
from fiona.control.base import Project
from fiona.control.redcap import RedcapControlPlane
from inprocess import LocalSite
from redcap_emulator import DICTIONARIES_DIR, RedcapEmulator

QUIET = 16.0


@pytest.fixture
def site(tmp_path):
    s = LocalSite.create(tmp_path, STUDY_QUIET_SECONDS=QUIET)
    s.control.save_project(Project("PROJ", naming=r"^P[0-9]{4}$", events=["baseline"]))
    yield s
    s.close()


def test_a_study_arrives_when_its_quiet_period_is_over(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=2, images_per_series=3, seed=1)
    site.arrive(made["files"])
    detector = site.detector()
    assert detector.step() == pytest.approx(QUIET, abs=1)  # sleep until the study is due
    site.clock.advance(QUIET - 1)
    detector.step()
    assert site.control.study(made["study"]) is None and detector.arrivals == 0
    assert any(site.tree.arrived.iterdir())

    site.clock.advance(2)
    detector.step()
    study = site.control.study(made["study"])
    assert {s.uid for s in study.series} == set(made["series"])
    assert sum(s.num_files for s in study.series) == 6
    assert (study.calling_ae, study.called_ae) == ("STORESCU", "FIONA")
    assert study.arrival == site.clock.now().replace(microsecond=0).isoformat(sep=" ")
    assert not any(site.tree.arrived.iterdir()) and detector.arrivals == 1


def test_a_quiet_study_waits_for_the_indexer(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=2, seed=2)
    site.receive(made["files"])  # in the journal, not indexed yet
    detector = site.detector()
    site.clock.advance(QUIET + 1)
    detector.step()
    assert site.control.study(made["study"]) is None

    site.index()  # the indexer catches up; its touch files start a new quiet period
    site.clock.advance(QUIET + 1)
    detector.step()
    assert len(site.control.study(made["study"]).series) == 1


def test_touch_file_without_series_is_retried_on_the_clock(site, tmp_path, caplog):
    (site.tree.arrived / "STORESCU FIONA 127.0.0.1 scp_1.2.826.1").touch()
    detector = site.detector()
    site.clock.advance(QUIET + 1)
    with caplog.at_level(logging.INFO, logger="fiona"):
        assert detector.step() <= 5
        detector.step()  # not yet due again
        assert caplog.text.count("no series indexed yet") == 1
        site.clock.advance(5)
        detector.step()
    assert caplog.text.count("no series indexed yet") == 2
    assert site.control.study("1.2.826.1") is None
    assert (site.tree.arrived / "STORESCU FIONA 127.0.0.1 scp_1.2.826.1").exists()


def test_a_second_burst_inside_the_quiet_period_makes_one_study(site, tmp_path, caplog):
    made = make_study(tmp_path / "s", n_series=2, images_per_series=2, seed=3)
    first = [f for f in made["files"] if f.name.startswith("s01")]
    second = [f for f in made["files"] if f.name.startswith("s02")]
    detector = site.detector()
    site.arrive(first)
    site.clock.advance(QUIET - 2)
    detector.step()
    site.arrive(second)
    site.clock.advance(QUIET - 2)  # quiet since the first burst, not since the second
    detector.step()
    assert site.control.study(made["study"]) is None
    site.clock.advance(3)
    with caplog.at_level(logging.INFO, logger="fiona"):
        detector.step()
    assert len(site.control.study(made["study"]).series) == 2
    assert f"study {made['study']} arrived" in caplog.text and "amended" not in caplog.text


def test_a_late_series_amends_the_study_and_asks_again(site, tmp_path, caplog):
    made = make_study(tmp_path / "s", n_series=2, images_per_series=2, accession="L1", seed=4)
    late = make_study(tmp_path / "late", n_series=3, images_per_series=2, accession="L1",
                      study_uid=made["study"], seed=5)
    assert site.assigner().upload_coupling("L1,PROJ,P0100,baseline\n").accepted == 1
    detector = site.detector()
    site.arrive(made["files"])
    site.clock.advance(QUIET + 1)
    detector.step()
    [req] = site.control.requests(made["study"])
    assert (req.participant, req.source) == ("P0100", "coupling")
    req.transferred, req.mapped_uid, req.complete = "2026-01-01 12:00:00", "2.25.7", True
    req.done_revision = req.revision
    site.control.update_request(req)

    site.arrive([f for f in late["files"] if f.name.startswith("s03")])
    site.clock.advance(QUIET + 1)
    with caplog.at_level(logging.INFO, logger="fiona"):
        detector.step()
    assert f"study {made['study']} amended" in caplog.text
    assert len(site.control.studies()) == 1
    assert len(site.control.study(made["study"]).series) == 3
    [req] = site.control.requests(made["study"])
    assert req.pending and (req.participant, req.source) == ("P0100", "amendment")
    assert not any(site.tree.arrived.iterdir())


def test_routing_and_autoid_on_arrival(site, tmp_path):
    """The rules get the clear PatientID and PatientName from the series JSONs."""
    site.control.save_project(Project("AUTO", naming=r"^AU[0-9]{5}$", events=["visit1"],
                                      use_autoid=True, autoid_aetitle="FIONAAUTO"))
    a = make_study(tmp_path / "a", n_series=1, images_per_series=1, patient_id="PAT1", seed=6)
    b = make_study(tmp_path / "b", n_series=1, images_per_series=1, patient_id="PAT1", seed=7)
    detector = site.detector()
    site.arrive(a["files"], called="FIONAAUTO")
    site.arrive(b["files"], called="FIONAAUTO")
    site.clock.advance(QUIET + 1)
    detector.step()
    [ra] = site.control.requests(a["study"])
    [rb] = site.control.requests(b["study"])
    assert ra.participant == rb.participant and ra.source == "autoid"
    assert site.control.study(a["study"]).patient_id_hash == site.keyed.patient_id("PAT1")


def test_workflow_runs_on_arrival_and_its_output_is_logged_without_identifiers(tmp_path, caplog):
    marker = tmp_path / "ran.txt"
    script = ("import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2]); "
              "print('cannot convert Nordmann^Kari 01019912345 ACC55', file=sys.stderr); "
              "sys.exit(3)")
    site = LocalSite.create(tmp_path, STUDY_QUIET_SECONDS=QUIET, ARRIVAL_WORKFLOWS=[
        {"name": "convert", "command": [sys.executable, "-c", script, str(marker),
                                        "@StudyInstanceUID@"]}])
    try:
        made = make_study(tmp_path / "s", n_series=1, images_per_series=1,
                          patient_id="01019912345", patient_name="Nordmann^Kari",
                          accession="ACC55", seed=8)
        detector = site.detector()
        site.arrive(made["files"])
        site.clock.advance(QUIET + 1)
        with caplog.at_level(logging.INFO, logger="fiona"):
            detector.step()
    finally:
        site.close()
    assert marker.read_text() == made["study"]
    assert "workflow convert for study" in caplog.text and "exited 3" in caplog.text
    for clear in ("Nordmann", "Kari", "01019912345", "ACC55"):
        assert clear not in caplog.text


def redcap_control_plane(dictionaries: Path = DICTIONARIES_DIR
                          ) -> tuple[RedcapEmulator, RedcapControlPlane]:
    """The control-plane projects in a running REDCap emulator, and a client for them."""
    emulator = RedcapEmulator(dictionaries)
    tokens = {name: f"{i:032X}" for i, name in enumerate(
        ["Incoming", "Routing", "CouplingList", "AutoID", "DataTransferProjects"], start=1)}
    emulator.add_from_manifest(tokens)
    return emulator, RedcapControlPlane(emulator.start(), tokens, timeout=30)


def test_control_plane_down_arrival_waits_and_is_retried_on_the_clock(tmp_path, caplog):
    """REDCap down: the study waits with a log line, retries back off on the clock, and it
    arrives once REDCap is back; nothing is lost meanwhile."""
    emulator, redcap = redcap_control_plane()
    site = LocalSite.create(tmp_path, STUDY_QUIET_SECONDS=QUIET)
    try:
        detector = ArrivalDetector(site.config, site.site, redcap, site.keyed, site.clock)
        made = make_study(tmp_path / "s", n_series=1, images_per_series=2, seed=9)
        site.arrive(made["files"])
        emulator.stop()
        site.clock.advance(QUIET + 1)
        first, second = RETRY_SECONDS[:2]
        with caplog.at_level(logging.WARNING, logger="fiona"):
            assert detector.step() == first
            site.clock.advance(first - 1)
            assert detector.step() == pytest.approx(1)
            assert caplog.text.count("the control plane is unreachable") == 1
            site.clock.advance(1)
            assert detector.step() == second
            assert caplog.text.count("the control plane is unreachable") == 2
        assert any(site.tree.arrived.iterdir())
        emulator.restart()
        site.clock.advance(second)
        detector.step()
        assert len(redcap.study(made["study"]).series) == 1
        assert not any(site.tree.arrived.iterdir())
    finally:
        emulator.stop()
        site.close()


@pytest.mark.parametrize("call", ["autoid", "add_request"])
def test_control_plane_lost_between_the_study_and_its_request_retries_the_rules(
        tmp_path, caplog, call):
    """REDCap goes down after the study is registered, while auto-ID looks up the patient
    (or the request is written): the study waits like any other and gets its one request
    once REDCap is back, instead of being done with and never sent."""
    emulator, redcap = redcap_control_plane()
    redcap.save_project(Project("AUTO", naming=r"^AU[0-9]{5}$", events=["visit1"],
                                use_autoid=True, autoid_aetitle="FIONAAUTO"))
    site = LocalSite.create(tmp_path, STUDY_QUIET_SECONDS=QUIET)
    real = getattr(redcap, call)

    def lost_on_first_call(*args, **kwargs):
        setattr(redcap, call, real)
        emulator.stop()
        return real(*args, **kwargs)

    setattr(redcap, call, lost_on_first_call)
    try:
        detector = ArrivalDetector(site.config, site.site, redcap, site.keyed, site.clock)
        made = make_study(tmp_path / "s", n_series=1, images_per_series=2, seed=11)
        site.arrive(made["files"], called="FIONAAUTO")
        site.clock.advance(QUIET + 1)
        with caplog.at_level(logging.WARNING, logger="fiona"):
            assert detector.step() == RETRY_SECONDS[0]
        assert "the control plane is unreachable" in caplog.text
        assert "not applied" not in caplog.text
        assert any(site.tree.arrived.iterdir())          # the study waits
        emulator.restart()
        site.clock.advance(RETRY_SECONDS[0])
        detector.step()
        [req] = redcap.requests(made["study"])
        assert (req.project, req.source) == ("AUTO", "autoid")
        assert not any(site.tree.arrived.iterdir())
    finally:
        emulator.stop()
        site.close()


def test_control_plane_refusal_waits_and_is_logged_without_identifiers(tmp_path, caplog):
    """A REDCap whose Incoming project validates the accession number as an integer refuses
    the study, quoting the value: the detector keeps running, retries, and logs the refusal
    with the accession number replaced by its keyed reference."""
    dictionaries = tmp_path / "redcap"
    shutil.copytree(DICTIONARIES_DIR, dictionaries)
    incoming = dictionaries / "Incoming.csv"
    incoming.write_text(incoming.read_text().replace(
        "study_accession_number,incoming_studies,,text,Accession number,,,",
        "study_accession_number,incoming_studies,,text,Accession number,,,integer"))
    emulator, redcap = redcap_control_plane(dictionaries)
    site = LocalSite.create(tmp_path, STUDY_QUIET_SECONDS=QUIET)
    try:
        detector = ArrivalDetector(site.config, site.site, redcap, site.keyed, site.clock)
        made = make_study(tmp_path / "s", n_series=1, images_per_series=1, accession="ACC9Z",
                          seed=10)
        site.arrive(made["files"])
        site.clock.advance(QUIET + 1)
        with caplog.at_level(logging.WARNING, logger="fiona"):
            assert detector.step() == RETRY_SECONDS[0]
        assert "the control plane refused it" in caplog.text
        assert "ref:" in caplog.text and "ACC9Z" not in caplog.text
        assert any(site.tree.arrived.iterdir()) and redcap.study(made["study"]) is None
    finally:
        emulator.stop()
        site.close()
