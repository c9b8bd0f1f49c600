"""Studies de-identified in their quiet period (issue 10), in process on a fake clock, with the
receiver's handler, the indexer, the arrival detector and the forwarder's classes and a folder
destination:

- a coupled study is de-identified while its quiet period runs, deciding and sending nothing;
  its request then sends those files (and de-identifies only a late series), byte for byte
  what the request alone makes;
- what was prepared for one assignment is never sent for another;
- a file the gate stops is met again by the request, which stops there and sends nothing after;
- a prepared study that no request takes is removed, and so is what a killed forwarder left;
- a link a killed indexer left under its temporary name is not taken for another image;
- a file that cannot be de-identified ahead is left to the request, and not tried again (the
  log names the kind of error only);
- a backlog of quiet studies is asked about a few at a time, each once until it changes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from dicomgen import make_study
from fiona.control.base import Project, TransferRequest, now_iso
from fiona.send.forward import Forwarder
from fiona.send.prepare import ASK_EVERY_SECONDS, ASKS_PER_STEP, PREPARE_AFTER_SECONDS
from inprocess import LocalSite

QUIET = 16.0
ACCESSION = "ACC0001"   # make_study's
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture
def site(tmp_path):
    s = LocalSite.create(tmp_path, STUDY_QUIET_SECONDS=QUIET, DESTINATIONS={
        "research": {"type": "folder", "path": str(tmp_path / "research")}})
    s.control.save_project(Project("PROJ", naming=r"^P[0-9]{4}$", events=["baseline"]))
    assert s.assigner().upload_coupling(f"{ACCESSION},PROJ,P0001,baseline\n").accepted == 1
    yield s
    s.close()


def forwarder(site: LocalSite) -> Forwarder:
    return Forwarder(site.config, site.site, site.control, site.clock, workers=1)


def prepare(fwd: Forwarder) -> bool:
    """One idle turn of the forwarder's loop, not interrupted."""
    return fwd.preparer.step(fwd.preparer.in_progress(), lambda: False)


def prepared(fwd: Forwarder) -> list[Path]:
    return sorted(fwd.tree.work.glob("prepared-*/*.dcm"))


def send_due(fwd: Forwarder) -> None:
    for req in fwd.due():
        fwd.process(req)


def arrive_and_send(site: LocalSite, fwd: Forwarder) -> None:
    site.clock.advance(QUIET)
    site.detector().step()
    send_due(fwd)


def delivered(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (tmp_path / "research").rglob("*.dcm")}


def test_a_coupled_study_is_prepared_in_its_quiet_period_and_sent_from_there(
        site, tmp_path, caplog):
    made = make_study(tmp_path / "s", n_series=2, images_per_series=5, seed=1)
    site.arrive(made["files"])
    fwd = forwarder(site)
    assert not prepare(fwd)                          # the sender may not be done yet
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert prepare(fwd) and len(prepared(fwd)) == 10
    assert not prepare(fwd)                          # nothing new to prepare
    assert site.control.study(made["study"]) is None        # nothing decided ...
    assert site.control.requests(made["study"]) == [] and not delivered(tmp_path)  # ... or sent

    late = make_study(tmp_path / "late", n_series=1, images_per_series=5, seed=2,
                      study_uid=made["study"])
    site.arrive(late["files"])                       # a late series, not prepared
    with caplog.at_level(logging.INFO, logger="fiona"):
        arrive_and_send(site, fwd)
    [req] = site.control.requests(made["study"])
    assert req.complete and req.participant == "P0001"
    assert "15 files in 3 series sent and verified" in caplog.text
    assert "10 de-identified ahead" in caplog.text
    assert not any(fwd.tree.work.iterdir())      # the prepared files are gone
    sent = delivered(tmp_path)
    assert len(sent) == 15

    caplog.clear()
    shutil.rmtree(tmp_path / "research")
    assert site.assigner().resend("PROJ", made["study"]) == 1
    with caplog.at_level(logging.INFO, logger="fiona"):
        send_due(fwd)                                # the request alone, nothing prepared
    assert "0 de-identified ahead" in caplog.text
    assert delivered(tmp_path) == sent


def test_what_was_prepared_for_one_participant_is_never_sent_for_another(
        site, tmp_path, caplog):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=4, seed=3)
    site.arrive(made["files"])
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert prepare(fwd) and len(prepared(fwd)) == 4  # for P0001, as the coupling list says
    site.control.add_request(TransferRequest(made["study"], "PROJ", "P0002", "baseline",
                                             requested=now_iso(site.clock)))  # by hand
    with caplog.at_level(logging.INFO, logger="fiona"):
        arrive_and_send(site, fwd)                   # the coupling row is refused then
    assert "0 de-identified ahead" in caplog.text
    sent = delivered(tmp_path)
    assert len(sent) == 4
    assert {pydicom.dcmread(DicomBytesIO(data)).PatientID for data in sent.values()} == {
        "P0002"}
    assert not prepared(fwd)


def test_what_was_prepared_under_other_project_options_is_never_sent(site, tmp_path, caplog):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=4, seed=6)
    ps = pydicom.dcmread(made["files"][0])           # a presentation state in the series
    ps.Modality, ps.SOPClassUID = "PR", GSPS
    ps.SOPInstanceUID = ps.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ps.file_meta.MediaStorageSOPClassUID = GSPS
    ps.save_as(tmp_path / "s" / "ps.dcm", enforce_file_format=True)
    site.arrive([*made["files"], tmp_path / "s" / "ps.dcm"])
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert prepare(fwd) and len(prepared(fwd)) == 5  # the project keeps presentation states
    project = site.control.project("PROJ")
    project.features = {0}                           # ... until it drops them
    site.control.save_project(project)
    with caplog.at_level(logging.INFO, logger="fiona"):
        arrive_and_send(site, fwd)
    assert "4 files in 1 series sent and verified" in caplog.text
    assert "1 dropped" in caplog.text and "0 de-identified ahead" in caplog.text
    assert len(delivered(tmp_path)) == 4


def test_a_file_the_gate_stops_stops_its_request_however_much_was_prepared(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=2, images_per_series=5, patient_name="Hansen^Ingrid",
                      seed=4)
    # a file of the series sent second (raw/ orders series by UID), so some come before it
    leaky = next(f for f in sorted(made["files"])
                 if pydicom.dcmread(f).SeriesInstanceUID == max(made["series"]))
    ds = pydicom.dcmread(leaky)
    ds.SequenceName = "Ingrid Hansen"                # kept by the profile: a leak
    ds.save_as(leaky, enforce_file_format=True)
    site.arrive(made["files"])
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert prepare(fwd)
    ahead = len(prepared(fwd))
    assert 0 < ahead < 10                            # prepared up to the leaky file, not beyond
    assert not prepare(fwd)                          # and not tried again until more comes
    arrive_and_send(site, fwd)
    [req] = site.control.requests(made["study"])
    assert not req.complete and req.error_flags == {1}
    assert "verification gate" in req.error_message and "Hansen" not in req.error_message
    assert len(delivered(tmp_path)) <= ahead         # nothing after the leaky file
    assert list((fwd.tree.quarantine / "deidentify").glob("*/reason.json"))
    assert not any(fwd.tree.work.iterdir())


def test_prepared_files_no_request_takes_are_removed(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=3, seed=5)
    site.arrive(made["files"])
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert prepare(fwd) and prepared(fwd)
    project = site.control.project("PROJ")
    project.active = False                           # closed before the study arrived
    site.control.save_project(project)
    site.clock.advance(QUIET)
    site.detector().step()
    assert site.control.requests(made["study"]) == []
    assert not any(site.tree.arrived.iterdir())
    fwd.preparer.forget(fwd.preparer.in_progress(), pending=set())   # the loop's next turn
    assert not prepared(fwd) and not any(fwd.tree.work.iterdir())

    leftover = fwd.tree.work / "prepared-0123456789ab"      # a killed forwarder's
    leftover.mkdir()
    (leftover / "x.dcm").write_bytes(b"de-identified")
    forwarder(site).preparer.clear()                 # what a starting forwarder does
    assert not leftover.exists()


def test_a_link_a_killed_indexer_left_half_made_is_neither_counted_nor_sent_twice(
        site, tmp_path):
    """The indexer links an image under a temporary name, then renames it into place; killed
    in between it leaves that name behind, and the image is linked again when its journal
    line is replayed. The leftover is not an image of its own."""
    made = make_study(tmp_path / "s", n_series=1, images_per_series=3, seed=6)
    first, *rest = made["files"]
    site.arrive([first])
    series = site.tree.series_dir(made["study"], made["series"][0])
    [link] = list(series.iterdir())
    (series / f".tmp.{link.name}.99999").symlink_to(os.readlink(link))
    site.arrive(rest)
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert prepare(fwd) and len(prepared(fwd)) == 3
    arrive_and_send(site, fwd)
    assert [s.num_files for s in site.control.study(made["study"]).series] == [3]
    [req] = site.control.requests(made["study"])
    assert req.complete and not req.error_flags, req.error_message
    assert len(delivered(tmp_path)) == 3


def test_a_file_that_cannot_be_prepared_is_left_to_the_request_and_not_tried_again(
        site, tmp_path, caplog):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=3, seed=7)
    site.arrive(made["files"])
    series = site.tree.series_dir(made["study"], made["series"][0])
    (series / "0000-not-dicom").write_bytes(b"Doe^Jane " * 40)   # sorts first
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    with caplog.at_level(logging.INFO, logger="fiona"):
        assert prepare(fwd)
        assert not prepare(fwd)                      # not again until the study changes
    assert "de-identifying ahead of its arrival stopped (Unreadable)" in caplog.text
    assert "Doe" not in caplog.text


def test_the_control_plane_is_asked_about_a_backlog_a_few_studies_at_a_time_and_once(
        site, tmp_path, monkeypatch):
    """Six quiet studies nobody coupled (the arrival daemon is down, say): each is asked about
    once, ASKS_PER_STEP per look, and again only when it has changed and ASK_EVERY_SECONDS
    have passed, so a backlog does not become a stream of calls to REDCap."""
    for i in range(6):
        made = make_study(tmp_path / f"s{i}", n_series=1, images_per_series=1, seed=10 + i,
                          accession=f"OTHER{i}")
        site.arrive(made["files"])
    asked = []
    real = site.control.coupling_rows
    monkeypatch.setattr(site.control, "coupling_rows", lambda: asked.append(1) or real())
    fwd = forwarder(site)
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert not prepare(fwd) and len(asked) == ASKS_PER_STEP
    assert not prepare(fwd) and len(asked) == 6
    assert not prepare(fwd) and len(asked) == 6
    late = make_study(tmp_path / "late", n_series=1, images_per_series=1, seed=20,
                      study_uid=made["study"], accession="OTHER5")
    site.arrive(late["files"])                       # the last study changes
    site.clock.advance(PREPARE_AFTER_SECONDS)
    assert not prepare(fwd) and len(asked) == 6      # asked too recently
    site.clock.advance(ASK_EVERY_SECONDS)
    assert not prepare(fwd) and len(asked) == 7      # that one, again
    assert not prepared(fwd)
