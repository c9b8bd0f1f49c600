"""Documents as a new series of an existing study: a PDF as Encapsulated PDF, a PNG or JPEG
image as Secondary Capture. The patient and study attributes are copied from an archived
object of the study, so the new series joins it and is de-identified, masked (secondary
captures are checked for burned-in text) and gated like the rest. Neither the file name nor
any text from the document goes into a header: file names often carry patient names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ..tree import Tree
from .kinds import PDF

#: the study attributes a new series takes from its study
STUDY_ATTRIBUTES = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription",
                    "InstitutionName")
SERIES_NUMBER = 9001
MAX_PIXELS = 100_000_000


class DocumentError(ValueError):
    """The document cannot become a series of that study; the text says why."""


def study_template(tree: Tree, study: str) -> Dataset:
    """The study attributes, from one archived object of `study`."""
    folder = tree.study_archive(study)
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # try the next object
            continue
        out = Dataset()
        for keyword in STUDY_ATTRIBUTES:
            if keyword in ds:
                out[keyword] = ds[keyword]
        return out
    raise DocumentError(f"study {study} has no archived object here to add a series to")


def _base(template: Dataset, sop_class: str, modality: str, description: str) -> Dataset:
    ds = Dataset()
    ds.update(template)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.SeriesDescription = description
    ds.ConversionType = "WSD"
    return ds


def _pdf(ds: Dataset, source: Path) -> None:
    data = source.read_bytes()
    if len(data) % 2:
        data += b"\x00"
    ds.DocumentTitle = "Attached document"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.BurnedInAnnotation = "YES"
    ds.EncapsulatedDocument = data


def _image(ds: Dataset, source: Path) -> None:
    try:
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise DocumentError(f"{source.name} has {opened.width}x{opened.height} "
                                    f"pixels, more than {MAX_PIXELS}")
            arr = np.asarray(opened.convert("L" if opened.mode in ("1", "L", "I;16")
                                            else "RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise DocumentError(f"the image cannot be read ({exc})") from None
    ds.Rows, ds.Columns = arr.shape[:2]
    rgb = arr.ndim == 3
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = arr.tobytes()


def make(tree: Tree, study: str, source: Path, kind: str, out: Path) -> Path:
    """The Part-10 file of `source` as a new series of `study`, written under `out`."""
    template = study_template(tree, study)
    if kind == PDF:
        ds = _base(template, EncapsulatedPDFStorage, "DOC", "Attached document")
        _pdf(ds, source)
    else:
        ds = _base(template, SecondaryCaptureImageStorage, "OT", "Attached image")
        _image(ds, source)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
