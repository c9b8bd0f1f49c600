"""Synthetic data sets for tests and benches, in one place: realistic studies (names, IDs,
dates, accession numbers, several series, real pixel data) written as DICOM Part-10 with
explicit VR, the Part-10 skeleton every hand-made data set starts from, secondary captures
with burned-in text, and Part-10 bytes and round trips."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SERIES = (
    ("t1_mprage_sag", "T1", "*tfl3d1_16ns", 2300.0, 2.98, [0, 1, 0, 0, 0, -1]),
    ("t2_tse_tra", "T2", "*tse2d1_15", 6000.0, 100.0, [1, 0, 0, 0, 1, 0]),
    ("ep2d_bold_rest", "fMRI", "epfid2d1_64", 2000.0, 30.0, [1, 0, 0, 0, 1, 0]),
    ("t2_flair_cor", "FLAIR", "*tir2d1_21", 9000.0, 81.0, [1, 0, 0, 0, 0, -1]),
)


def make_study(out: Path, n_series: int = 3, images_per_series: int = 70, *,
               patient_id: str = "PAT0001", patient_name: str = "Doe^Jane",
               accession: str = "ACC0001", rows: int = 64, cols: int = 64,
               study_uid: str | None = None, seed: int = 0) -> dict:
    """Write a study under `out`; returns {study, series: [uids], files: [paths]}."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study = study_uid or generate_uid()
    series_uids, files = [], []
    for s in range(n_series):
        desc, _kind, seq, tr, te, iop = SERIES[s % len(SERIES)]
        series = generate_uid()
        series_uids.append(series)
        for i in range(images_per_series):
            ds = _image(study, series, s + 1, i + 1, desc, seq, tr, te, iop, patient_id,
                        patient_name, accession, rows, cols, rng)
            path = out / f"s{s + 1:02d}_{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return {"study": study, "series": series_uids, "files": files}


def part10(sop_class: str, sop_instance: str | None = None, *,
           implicit: bool = False) -> Dataset:
    """A data set ready to be saved as a Part-10 file: file meta (little endian, explicit VR
    unless `implicit`), SOP class and instance (a new UID unless given)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """`ds` as the bytes of a Part-10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def roundtrip(ds: Dataset) -> Dataset:
    """`ds` written and read back: every element raw, as from a file."""
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def secondary_capture(arr: np.ndarray, photometric: str, bits_stored: int,
                      signed: bool = False) -> Dataset:
    """A screen capture (SC, modality OT, BurnedInAnnotation YES) of `arr`: (rows, cols) or
    (frames, rows, cols), with a trailing axis of 3 for colour."""
    ds = part10(SecondaryCaptureImageStorage)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^John", "PAT0001", "19800101"
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.SeriesDescription = "Screen capture"
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 3 if photometric in ("RGB", "YBR_FULL_422", "YBR_FULL") else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = arr.shape[-3:-1] if ds.SamplesPerPixel == 3 else arr.shape[-2:]
    if arr.ndim == (4 if ds.SamplesPerPixel == 3 else 3):
        ds.NumberOfFrames = arr.shape[0]
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.tobytes()
    return ds


def _image(study: str, series: str, series_number: int, number: int, desc: str, seq: str,
           tr: float, te: float, iop: list[int], patient_id: str, patient_name: str,
           accession: str, rows: int, cols: int, rng: np.random.Generator) -> Dataset:
    ds = part10(MRImageStorage)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.StudyDate, ds.StudyTime = "20260314", "101500"
    ds.SeriesDate, ds.SeriesTime = "20260314", f"{101500 + series_number * 100}"
    ds.AccessionNumber = accession
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Prisma"
    ds.InstitutionName = "Haukeland University Hospital"
    ds.ReferringPhysicianName = "Smith^Anna"
    ds.StationName = "MRC12345"
    ds.StudyDescription = "MR Head"
    ds.SeriesDescription = desc
    ds.OperatorsName = "Nordmann^Ola"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.SequenceName = seq
    ds.SliceThickness = "1.0"
    ds.RepetitionTime = str(tr)
    ds.EchoTime = str(te)
    ds.SoftwareVersions = "syngo MR XA30"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    ds.ImageOrientationPatient = iop
    ds.ImagePositionPatient = [0, 0, float(number)]
    ds.SliceLocation = str(float(number) - 10.0)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4000, (rows, cols), dtype=np.uint16).tobytes()
    return ds
