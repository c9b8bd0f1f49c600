"""Export profiles made on the bytes of a file (fiona/export/patch.py, the fast way for a
folder destination) give the same data set as decoding, editing and writing it with pydicom,
and the collector takes the fast way, the link or the slow way where each is due, one folder
per series."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study, part10, to_bytes
from fiona.export import patch
from fiona.export.nifti import _own_folder
from fiona.export.profile import Characteristics, parse
from fiona.export.retrieve import Collector, Selected

PERSON = Characteristics("F", "1980", "046Y")
PROFILES = {
    "default": {"drop": ["SR", "PR"]},
    "set, clear, keep": {"set": {"PatientIdentityRemoved": "YES", "BodyPartExamined": "HEAD",
                                 "StudyDescription": "exported"},
                         "clear": ["SeriesDescription", "AccessionNumber", "StationName"],
                         "patient": ["sex", "birth_year", "age"]},
    "set then clear": {"set": {"StudyComments": "x"}, "clear": ["StudyComments"],
                       "patient": ["age"]},
}


def _source(tmp: Path, implicit: bool = False) -> Path:
    made = make_study(tmp / "src", n_series=1, images_per_series=1, rows=8, cols=8)
    ds = pydicom.dcmread(made["files"][0])
    ds.PatientSex, ds.PatientBirthDate = "", ""   # emptied, as de-identification leaves them
    if implicit:
        skeleton = part10(ds.SOPClassUID, ds.SOPInstanceUID, implicit=True)
        ds.file_meta = skeleton.file_meta
    path = tmp / "in.dcm"
    path.write_bytes(to_bytes(ds))
    return path


def _slow(path: Path, profile, person) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    profile.apply(ds, person)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("name", list(PROFILES))
def test_a_patched_file_is_the_data_set_pydicom_would_write(tmp_path, name, implicit):
    path = _source(tmp_path, implicit)
    profile = parse(name, PROFILES[name], name)
    parsed = patch.parse(path.read_bytes())
    assert parsed is not None and parsed.implicit == implicit
    data = patch.patch(parsed, list(profile.edits(parsed.dataset, PERSON).values()))
    assert data is not None
    fast, slow = pydicom.dcmread(io.BytesIO(data)), _slow(path, profile, PERSON)
    assert fast == slow and fast.PixelData == slow.PixelData
    assert fast.file_meta.TransferSyntaxUID == slow.file_meta.TransferSyntaxUID


def test_what_patch_cannot_do_goes_the_slow_way(tmp_path):
    path = _source(tmp_path)
    parsed = patch.parse(path.read_bytes())
    assert parsed is not None
    not_ascii = parse("x", {"set": {"StudyDescription": "Hjerne æøå"}}, "x")
    assert patch.patch(parsed, list(not_ascii.edits(parsed.dataset).values())) is None
    assert patch.parse(path.read_bytes()[128:]) is None  # no Part-10 preamble


def test_the_collector_links_patches_or_writes_as_due(tmp_path):
    path = _source(tmp_path)
    sel = Selected("1.2.3", str(pydicom.dcmread(path).StudyInstanceUID), "P0001", "baseline")
    for name, body, same_inode in (("nothing", {}, True), ("default", {"drop": ["SR"]}, False),
                                   ("odd", {"set": {"StudyDescription": "æ"}}, False)):
        # "nothing" has nothing to change once the empty patient elements are gone
        source = path if name != "nothing" else tmp_path / "clean.dcm"
        if name == "nothing":
            ds = pydicom.dcmread(path)
            del ds.PatientSex, ds.PatientBirthDate
            source.write_bytes(to_bytes(ds))
        profile = parse(name, body, name)
        study = Collector(tmp_path / name, profile).study("PROJ", sel, [source], {}, PERSON)
        (written,) = study.series[0].files
        assert (written.stat().st_ino == source.stat().st_ino) == same_inode
        assert _own_folder(study.series[0].files) == written.parent  # dcm2niix reads it
        assert pydicom.dcmread(written) == _slow(source, profile, PERSON)
