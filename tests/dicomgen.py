"""Synthetic but realistic studies for tests and benches: names, IDs, dates, accession numbers,
several series, real pixel data. Files are written as DICOM Part-10 with explicit VR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

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


def _image(study: str, series: str, series_number: int, number: int, desc: str, seq: str,
           tr: float, te: float, iop: list[int], patient_id: str, patient_name: str,
           accession: str, rows: int, cols: int, rng: np.random.Generator) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
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
