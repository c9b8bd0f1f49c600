"""The indexer's rules in process, on a fake clock: what one file produces (links, series JSON,
arrival file), catch-up from the journal after a stop, idempotent replay, one write per
batch, forgetting quiet series, and files it cannot index. Files are filed by the
receiver's own handler; the daemon itself is tested in test_receive.py and test_recovery.py."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest

from dicomgen import make_study
from fiona.index.indexer import IDLE_EVICT_SECONDS, Indexer, load_rules
from fiona.journal import JournalWriter
from inprocess import LocalSite


@pytest.fixture
def site(tmp_path):
    s = LocalSite.create(tmp_path)
    yield s
    s.close()


def series_json(site: LocalSite, study: str, series: str) -> dict:
    return json.loads(site.tree.series_json(study, series).read_text())


def test_one_study_makes_links_series_jsons_and_arrival_files(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=2, images_per_series=3, patient_id="PAT 7/../x",
                      seed=1)
    site.receive(made["files"], calling="MODALITY")
    assert site.index() == 6
    study = made["study"]
    for series in made["series"]:
        links = sorted(site.tree.series_dir(study, series).iterdir())
        assert len(links) == 3 and all(link.is_symlink() and link.resolve().parent ==
                                       site.tree.study_archive(study) for link in links)
        record = series_json(site, study, series)
        assert record["NumFiles"] == 3 and record["SeriesInstanceUID"] == series
        assert record["IncomingConnection"] == {"AETitleCaller": "MODALITY",
                                                "AETitleCalled": "FIONA",
                                                "CallerIP": "127.0.0.1"}
        assert "SIEMENS" in record["ClassifyType"]
        assert record["SliceLocation"] == -9.0  # the lowest of the series
        assert (site.tree.arrived / f"MODALITY FIONA 127.0.0.1 {study} {series}").exists()
    # the PatientID becomes one safe folder name, never a path
    [patient] = list(site.tree.participants.iterdir())
    assert patient.name == "PAT 7_.._x"
    [visit] = list(patient.iterdir())
    assert visit.name == "20260314_101500" and visit.resolve() == site.tree.raw / study
    assert site.indexer.reader.caught_up()


def test_a_backlog_does_not_lengthen_the_quiet_period(site, tmp_path):
    """The series arrival file is dated when its last image was received, not when the
    indexer got to it: an indexer an hour behind must not keep the study from arriving."""
    made = make_study(tmp_path / "s", n_series=1, images_per_series=2, seed=4)
    site.receive(made["files"])
    archived = sorted(site.tree.study_archive(made["study"]).iterdir())
    hour_ago = archived[0].stat().st_mtime - 3600
    for path in archived:
        os.utime(path, (hour_ago, hour_ago))
    site.indexer.drain()                    # not site.index(): that stamps the fake clock
    touch = site.tree.arrived / f"STORESCU FIONA 127.0.0.1 {made['study']} {made['series'][0]}"
    assert touch.stat().st_mtime == hour_ago


def test_series_json_written_once_per_batch(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=4, seed=2)
    site.receive(made["files"])
    path = site.tree.series_json(made["study"], made["series"][0])
    assert site.indexer.index_pending() == 4
    assert not path.exists() and not site.indexer.reader.caught_up()
    site.indexer.flush()
    assert series_json(site, made["study"], made["series"][0])["NumFiles"] == 4
    assert site.indexer.reader.caught_up()


def test_catch_up_after_a_stop_and_replay_is_harmless(site, tmp_path):
    first = make_study(tmp_path / "a", n_series=1, images_per_series=3, seed=3)
    site.receive(first["files"])
    site.index()
    later = make_study(tmp_path / "b", n_series=1, images_per_series=2, seed=4,
                       study_uid=first["study"])
    site.receive(later["files"])  # while the indexer is "down"

    restarted = Indexer(site.site, load_rules(site.site), site.clock)
    assert restarted.drain() == 2  # only what came after its committed position
    assert series_json(site, first["study"], later["series"][0])["NumFiles"] == 2

    # killed after indexing but before committing: the lines are indexed again, same result
    pos = site.tree.journal / "received.indexer.pos"
    assert pos.exists()
    pos.unlink()
    replay = Indexer(site.site, load_rules(site.site), site.clock)
    assert replay.drain() == 5
    assert series_json(site, first["study"], first["series"][0])["NumFiles"] == 3
    assert series_json(site, first["study"], later["series"][0])["NumFiles"] == 2
    labels = series_json(site, first["study"], first["series"][0])["ClassifyType"]
    assert labels and len(labels) == len(set(labels))


def test_quiet_series_are_forgotten_on_the_clock_and_continued_from_disk(site, tmp_path):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=3, seed=5)
    files = made["files"]
    site.receive(files[:2])
    site.index()
    key = (made["study"], made["series"][0])
    assert key in site.indexer.series
    site.clock.advance(IDLE_EVICT_SECONDS - 1)
    site.indexer.flush()
    assert key in site.indexer.series
    site.clock.advance(2)
    site.indexer.flush()
    assert key not in site.indexer.series
    site.receive(files[2:])
    site.index()
    assert series_json(site, *key)["NumFiles"] == 3


def test_files_that_cannot_be_indexed_are_held_without_their_message_in_the_log(site, tmp_path,
                                                                                 caplog):
    made = make_study(tmp_path / "s", n_series=1, images_per_series=2, seed=6)
    site.receive(made["files"][:1])
    study_dir = site.tree.study_archive(made["study"])
    (study_dir / "MR.1.2.3.4").write_bytes(b"not DICOM: Nordmann^Kari")
    gone = f"STORESCU,FIONA,127.0.0.1,{study_dir},MR.1.2.3.5"
    bad = f"STORESCU,FIONA,127.0.0.1,{study_dir},MR.1.2.3.4"
    outside = "STORESCU,FIONA,127.0.0.1,/etc,passwd"
    journal = JournalWriter(site.tree.journal, "received")
    for line in (gone, bad, outside):
        journal.append(line)
    journal.close()
    site.receive(made["files"][1:])
    with caplog.at_level(logging.INFO, logger="fiona"):
        assert site.index() == 5
    assert series_json(site, made["study"], made["series"][0])["NumFiles"] == 2
    assert "MR.1.2.3.5 but the file is gone" in caplog.text
    held = sorted((site.tree.quarantine / "index").iterdir())
    assert len(held) == 2
    lines = {(h / "journal-line.txt").read_text() for h in held}
    assert lines == {bad, outside}
    for h in held:
        reason = json.loads((h / "reason.json").read_text())["reason"]
        assert reason.startswith("cannot index: ") and "error.txt" in reason
        assert (h / "error.txt").read_text()
        assert os.stat(h / "error.txt").st_mode & 0o007 == 0
    assert "Kari" not in caplog.text


def test_a_siemens_series_decodes_its_protocol_once_and_keeps_each_diffusion_entry(
        site, tmp_path, monkeypatch):
    """The CSA series header (the protocol text, ~1.8 ms an image to decode) describes the
    series: its fields come from the first image; each image's diffusion entry is its own."""
    import gzip

    import nibabel
    import pydicom
    from pydicom.uid import generate_uid

    from fiona.index import header

    src = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "siemens_dwi_1000.dcm.gz"
    files = []
    for n in range(3):
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress(src.read_bytes())))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(tmp_path / f"dwi{n}.dcm")
        ds.save_as(files[-1])
    decoded = []
    real = header.siemens_series_fields
    monkeypatch.setattr(header, "siemens_series_fields",
                        lambda ds: decoded.append(ds.SOPInstanceUID) or real(ds))
    site.receive(files)
    assert site.index() == 3
    record = series_json(site, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert record["NumSlices"] == 48 and record["OSLevel"] == "VB17A"
    assert len(decoded) == 1
    assert sorted(e["SOPInstanceUID"] for e in record["siemensDiffusionInformation"]) == sorted(
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)
