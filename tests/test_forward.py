"""End to end with real peers: DCMTK storescu -> FIONA (all daemons) -> Orthanc as the
research PACS, driven by a coupling-list row, with no manual step."""

from __future__ import annotations

import io
import shutil
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from dicomgen import make_study, part10
from fiona.config import load
from fiona.control import open_control_plane
from fiona.deid.pixels import ocr_words
from helpers import Gateway, free_port, wait_for
from orthanc import Orthanc

DAEMONS = ("storescp", "process-single-file", "detect-study-arrival", "anonymize-and-send")


def gateway_for(tmp_path: Path, pacs: Orthanc) -> Gateway:
    gw = Gateway(tmp_path / "data", free_port(), {
        "STUDY_QUIET_SECONDS": 2,
        "DESTINATIONS": {"research": {"type": "dicom", "aetitle": pacs.aet, "host": "127.0.0.1",
                                      "port": pacs.dicom_port}}})
    gw.run("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline,followup")
    for daemon in DAEMONS:
        gw.start(daemon)
    return gw


def requests(gw: Gateway, study_uid: str):
    return open_control_plane(load(str(gw.config))).requests(study_uid)


def completed(gw: Gateway, study_uid: str, revision: int = 1):
    """The study's request once its `revision` (or a later one) is sent."""
    def done():
        reqs = requests(gw, study_uid)
        return reqs[0] if reqs and reqs[0].complete and reqs[0].done_revision >= revision \
            else None
    return wait_for(done, 180, f"the request for {study_uid} to complete")


def couple(gw: Gateway, tmp_path: Path, accession: str, participant: str, event: str) -> None:
    csv = tmp_path / f"{accession}.csv"
    csv.write_text(f"{accession},PROJ,{participant},{event}\n")
    gw.run("coupling", "upload", str(csv))


def test_study_arrives_deidentified_in_orthanc_and_late_series_joins(tmp_path, orthanc):
    gw = gateway_for(tmp_path, orthanc)
    study = make_study(tmp_path / "s", n_series=4, images_per_series=5, patient_id="NID0101",
                       patient_name="Hansen^Ingrid", accession="E2E1")
    late = tmp_path / "late"
    late.mkdir()
    for f in study["files"]:
        if f.name.startswith("s04"):
            f.rename(late / f.name)
    couple(gw, tmp_path, "E2E1", "P0001", "followup")
    assert gw.storescu(tmp_path / "s").returncode == 0
    req = completed(gw, study["study"])
    assert req.mapped_uid and req.mapped_uid != study["study"] and not req.error_message

    [pacs_study] = orthanc.studies()
    tags = orthanc.tags(orthanc.instances_of(pacs_study)[0]["ID"])
    assert tags["PatientID"] == "P0001" and tags["PatientName"] == "P0001"
    assert tags["InstitutionName"] == "PROJ"
    assert tags["ClinicalTrialTimePointID"] == "followup"
    assert tags["StudyInstanceUID"] == req.mapped_uid
    assert tags["PatientIdentityRemoved"] == "YES"
    assert "Hansen" not in str(tags) and "NID0101" not in str(tags) and "E2E1" not in str(tags)
    assert orthanc.series_counts(req.mapped_uid) and \
        sum(orthanc.series_counts(req.mapped_uid).values()) == 15

    # a late fourth series joins the same de-identified study
    assert gw.storescu(late).returncode == 0  # at once: no waiting for the clock to tick
    completed(gw, study["study"], revision=req.revision + 1)
    assert len(orthanc.studies()) == 1
    counts = orthanc.series_counts(req.mapped_uid)
    assert len(counts) == 4 and sum(counts.values()) == 20


def test_orthanc_down_during_send_retries_without_duplicates(tmp_path, orthanc):
    gw = gateway_for(tmp_path, orthanc)
    study = make_study(tmp_path / "s", n_series=2, images_per_series=5, accession="DOWN1")
    orthanc.stop()
    couple(gw, tmp_path, "DOWN1", "P0002", "baseline")
    assert gw.storescu(tmp_path / "s").returncode == 0
    log = gw.tree.logs / "anonymizeAndSend.log"
    wait_for(lambda: log.exists() and "retrying" in log.read_text(), 120,
             "the forwarder to report the destination down")
    assert not requests(gw, study["study"])[0].complete
    orthanc.start()
    req = completed(gw, study["study"])
    assert len(orthanc.studies()) == 1
    assert sum(orthanc.series_counts(req.mapped_uid).values()) == 10


def _text_image(path: Path) -> str:
    """A secondary capture with burned-in text, as a scanner console screenshot has."""
    img = Image.new("L", (512, 512), 10)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=40)
    draw.text((30, 200), "HANSEN INGRID 1980", fill=250, font=font)
    ds = part10(SecondaryCaptureImageStorage)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Hansen^Ingrid", "NID0303", "OCR1"
    ds.Modality, ds.StudyDate, ds.StudyTime = "OT", "20260101", "120000"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 512, 512, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.asarray(img, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds.StudyInstanceUID


def test_burned_in_text_is_masked_before_it_leaves(tmp_path, orthanc):
    gw = gateway_for(tmp_path, orthanc)
    folder = tmp_path / "sc"
    folder.mkdir()
    study_uid = _text_image(folder / "sc.dcm")
    assert ocr_words(pydicom.dcmread(folder / "sc.dcm").pixel_array)  # readable before
    couple(gw, tmp_path, "OCR1", "P0003", "baseline")
    assert gw.storescu(folder).returncode == 0
    req = completed(gw, study_uid)
    [instance] = orthanc.instances_of(orthanc.studies()[0])
    with urllib.request.urlopen(f"{orthanc.http}/instances/{instance['ID']}/file") as answer:
        received = pydicom.dcmread(io.BytesIO(answer.read()))
    assert ocr_words(received.pixel_array) == []
    assert received.BurnedInAnnotation == "NO"
    assert 3 in req.error_flags  # "pixel masking done" is recorded on the request


def test_forwarder_killed_mid_send_resumes_into_the_same_study(tmp_path, orthanc):
    gw = gateway_for(tmp_path, orthanc)
    study = make_study(tmp_path / "s", n_series=3, images_per_series=100, accession="KILL1")
    couple(gw, tmp_path, "KILL1", "P0004", "baseline")
    assert gw.storescu(tmp_path / "s").returncode == 0
    wait_for(lambda: orthanc.count() > 0, 180, "the send to begin")
    forwarder = gw.procs.pop("anonymize-and-send")
    forwarder.send_signal(signal.SIGKILL)
    forwarder.wait()
    assert not requests(gw, study["study"])[0].complete
    gw.start("anonymize-and-send")
    req = completed(gw, study["study"])
    assert len(orthanc.studies()) == 1
    assert sum(orthanc.series_counts(req.mapped_uid).values()) == 300


def test_forwarder_killed_after_preparing_a_study_sends_it_once_when_it_arrives(
        tmp_path, orthanc):
    """The forwarder de-identifies a coupled study while it waits for its arrival (the arrival
    daemon is held back, so the study waits as long as that takes) and sends nothing; killed
    with SIGKILL then and restarted, it removes what it had prepared and prepares again; when
    the study arrives, its request sends it exactly once."""
    gw = gateway_for(tmp_path, orthanc)
    gw.stop("detect-study-arrival")
    study = make_study(tmp_path / "s", n_series=2, images_per_series=30, accession="PREP1")
    couple(gw, tmp_path, "PREP1", "P0005", "baseline")
    assert gw.storescu(tmp_path / "s").returncode == 0
    log = gw.tree.logs / "anonymizeAndSend.log"

    def prepared(since: int = 0) -> bool:
        return log.exists() and "60 files de-identified ahead of its arrival" in \
            log.read_text()[since:]
    wait_for(prepared, 180, "the study to be de-identified ahead")
    work = gw.tree.work
    [folder] = list(work.glob("prepared-*"))
    assert len(list(folder.glob("*.dcm"))) == 60
    forwarder = gw.procs.pop("anonymize-and-send")
    forwarder.send_signal(signal.SIGKILL)
    forwarder.wait()
    restarted = len(log.read_text())
    gw.start("anonymize-and-send")
    wait_for(lambda: prepared(restarted), 180, "the restarted forwarder to prepare it again")
    assert not folder.exists() and len(list(work.glob("prepared-*"))) == 1
    assert orthanc.count() == 0 and requests(gw, study["study"]) == []
    gw.start("detect-study-arrival")
    req = completed(gw, study["study"])
    assert len(orthanc.studies()) == 1
    assert sorted(orthanc.series_counts(req.mapped_uid).values()) == [30, 30]
    assert "60 de-identified ahead" in log.read_text()
    assert not list(work.iterdir())


def test_a_study_gone_from_disk_fails_with_that_message(tmp_path, orthanc):
    gw = gateway_for(tmp_path, orthanc)
    gw.stop("anonymize-and-send")
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2, accession="GONE1")
    assert gw.storescu(tmp_path / "s").returncode == 0
    wait_for(lambda: open_control_plane(load(str(gw.config))).study(study["study"]), 60,
             "the study to be registered")
    gw.run("assign", study["study"], "--project", "PROJ", "--participant", "P0005",
           "--event", "baseline")
    shutil.rmtree(gw.tree.raw / study["study"])
    gw.start("anonymize-and-send")

    def failed():
        [req] = requests(gw, study["study"])
        return req if req.error_message else None
    req = wait_for(failed, 60, "the request to fail")
    assert "gone from disk" in req.error_message and 1 in req.error_flags
    assert not req.complete and not req.pending  # not retried until someone resends
    assert orthanc.count() == 0
