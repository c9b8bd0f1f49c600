"""Attach end to end (issue 15): `fiona attach` files a whole-slide image (a small pyramidal
tiled OME-TIFF made here with tifffile, converted by the real wsidicomizer) and a DICOM zip
"from a CD"; the receiver's indexer and arrival daemons and the forwarder take them to Orthanc
as the research PACS, de-identified under the pseudonym, without label or overview images."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pydicom
import tifffile

from dicomgen import make_study
from fiona.config import load
from fiona.control import open_control_plane
from helpers import Gateway, free_port, wait_for

DAEMONS = ("process-single-file", "detect-study-arrival", "anonymize-and-send")
WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def ome_tiff(path: Path) -> Path:
    """A 3-level pyramid of 256x256 JPEG tiles, as scanners write (level 0: 1024x1024)."""
    image = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg",
            "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=2, resolution=(4e4, 4e4),
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
                  **opts)
        for level in (2, 4):
            tif.write(image[::level, ::level], subfiletype=1,
                      resolution=(4e4 / level, 4e4 / level), **opts)
    return path


def test_slide_and_cd_arrive_deidentified_in_orthanc(tmp_path, orthanc):
    gw = Gateway(tmp_path / "data", free_port(), {
        "STUDY_QUIET_SECONDS": 2,
        "DESTINATIONS": {"research": {"type": "dicom", "aetitle": orthanc.aet,
                                      "host": "127.0.0.1", "port": orthanc.dicom_port}}})
    # the project de-identifies with the pathology profile (Clean Structured Content): the
    # stain codes go to research, the biopsy id as a keyed replacement
    gw.run("project", "add", "PATH", "--naming", "^P[0-9]{4}$", "--events", "baseline",
           "--deid-profile", "pathology")
    for daemon in DAEMONS:
        gw.start(daemon)
    cd = make_study(tmp_path / "cd", n_series=1, images_per_series=3,
                    patient_name="Hansen^Ingrid", patient_id="NID0101", accession="CD1")
    with zipfile.ZipFile(tmp_path / "cd.zip", "w") as z:
        for f in cd["files"]:
            z.write(f, f"DICOM/{f.name}")
    out = gw.run("attach", "--project", "PATH", "--participant", "P0001", "--event",
                 "baseline", "--stain", "hematoxylin and eosin", "--specimen", "colon biopsy",
                 "--block", "A1", "--slide", "3", "--biopsy", "BIOPSY-SECRET-1",
                 str(ome_tiff(tmp_path / "slide.ome.tiff")),
                 str(tmp_path / "cd.zip")).stdout
    assert "as wsi" in out and "as dicom" in out

    control = open_control_plane(load(str(gw.config)))
    def sent():
        reqs = [r for r in control.requests() if r.project == "PATH"]
        return reqs if len(reqs) == 2 and all(r.complete for r in reqs) else None
    reqs = wait_for(sent, 240, "both attached studies to be sent")
    assert all(not r.error_message and r.participant == "P0001" for r in reqs)

    slide = next(r.mapped_uid for r in reqs if r.study_uid != cd["study"])
    instances = [orthanc.tags(i["ID"]) for i in orthanc.instances_of(slide)]
    assert {t["SOPClassUID"] for t in instances} == {WSI_CLASS}
    assert len(instances) == 3  # the three levels: no label, overview or thumbnail
    assert all(t["ImageType"].split("\\")[2] == "VOLUME" for t in instances)
    assert all(t["PatientID"] == "P0001" for t in instances)
    assert all("hematoxylin stain" in str(t) and "water soluble eosin stain" in str(t)
               for t in instances)
    assert len({t["SpecimenDescriptionSequence"][0]["SpecimenUID"] for t in instances}) == 1
    for i in orthanc.instances_of(slide):
        assert b"BIOPSY-SECRET-1" not in orthanc.get_bytes(f"/instances/{i['ID']}/file")
    # the form's pathology is in the archived slide; PS3.15's profile decides what leaves
    source = next(r.study_uid for r in reqs if r.study_uid != cd["study"])
    archived = pydicom.dcmread(next(gw.tree.study_archive(source).iterdir()),
                               stop_before_pixels=True)
    assert archived.ContainerIdentifier == "3" and archived.PatientID == "P0001"
    [specimen] = archived.SpecimenDescriptionSequence
    assert specimen.SpecimenShortDescription == "colon biopsy"
    stains = {code.CodeMeaning for step in specimen.SpecimenPreparationSequence
              for item in step.SpecimenPreparationStepContentItemSequence
              for code in item.get("ConceptCodeSequence", [])}
    assert {"hematoxylin stain", "water soluble eosin stain"} <= stains

    cd_tags = orthanc.tags(orthanc.instances_of(
        next(r.mapped_uid for r in reqs if r.study_uid == cd["study"]))[0]["ID"])
    assert cd_tags["PatientID"] == "P0001" and cd_tags["PatientIdentityRemoved"] == "YES"
    assert "Hansen" not in str(cd_tags) and "NID0101" not in str(cd_tags)
