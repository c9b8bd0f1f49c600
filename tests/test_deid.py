"""De-identification: the Annex E table, the engine, the verification gate, `fiona anonymize`.

Per-action tests run against a small table written here (so each code is tested in isolation);
the option, marker and canary tests run against the shipped table (fiona/deid/annex_e.json).
Every action is checked at the top level and two sequences deep, on datasets built in memory
(pydicom DataElements) and on the same datasets read back from bytes (raw elements, the path
files take).
"""

from __future__ import annotations

import copy
import io
import re
import subprocess
import sys
import warnings
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage

from dicomgen import part10, roundtrip, to_bytes
from fiona.deid.anonymize import anonymize_folder
from fiona.deid.clean import Rule, rule_for
from fiona.deid.engine import (
    DEFAULT_OPTIONS,
    Deidentifier,
    Settings,
    load_profile,
    resolve_combined,
    with_profile,
)
from fiona.deid.gate import GateError, check
from fiona.deid.identifiers import Identifiers, is_class_like_uid, is_well_known_uid
from fiona.deid.table import Table, default_table

KEY = b"0123456789abcdef0123456789abcdef"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def settings(**kw) -> Settings:
    kw.setdefault("project", "PROJ")
    kw.setdefault("participant", "P0001")
    return Settings(key=KEY, **kw)




ROOT = "1.2.826.0.1.3680043.8.498."


def base_dataset(sop: str = ROOT + "10001", study: str = ROOT + "20001",
                 series: str = ROOT + "30001", implicit: bool = False) -> Dataset:
    ds = part10(MRImageStorage, sop, implicit=implicit)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "MR"
    ds.PatientName = "Hansen^Kari^Marie"
    ds.PatientID = "NID12345678"
    ds.PatientBirthDate = "19800517"
    ds.AccessionNumber = "ACC778899"
    ds.StudyDate, ds.StudyTime = "20260314", "101500"
    ds.InstitutionName = "Haukeland University Hospital"
    ds.Manufacturer = "SIEMENS"
    return ds


def nest(ds: Dataset, elem_setter) -> Dataset:
    """Put an element two unlisted sequences deep: ReferencedSeriesSequence[0].
    ReferencedSeriesSequence[0] (not in Table E.1-1, so kept and walked)."""
    inner = Dataset()
    elem_setter(inner)
    middle = Dataset()
    middle.ReferencedSeriesSequence = Sequence([inner])
    ds.ReferencedSeriesSequence = Sequence([middle])
    return ds


def at_depth(ds: Dataset, depth: int) -> Dataset:
    return ds if depth == 0 else ds.ReferencedSeriesSequence[0].ReferencedSeriesSequence[0]


# --- a small table: one row per action code -------------------------------------------------------
def row(keyword: str, basic: str, options: dict | None = None) -> dict:
    tag = tag_for_keyword(keyword)
    return {"tag": f"{tag:08X}", "mask": None, "keyword": keyword, "vr": dictionary_VR(tag),
            "basic": basic, "options": options or {}}


SMALL = {
    "edition": "test1",
    "options": {"rtnLongModifDatesOpt": {"code": {"value": "113107", "scheme": "DCM",
                                                  "meaning": "Retain Longitudinal Temporal "
                                                             "Information Modified Dates Option"}}},
    "rows": [
        row("InstitutionalDepartmentName", "D"),
        row("ReferringPhysicianName", "Z"),
        row("PatientAddress", "X"),
        row("Manufacturer", "K"),
        row("StudyDate", "Z", {"rtnLongModifDatesOpt": "C", "rtnLongFullDatesOpt": "K"}),
        row("StudyDescription", "X", {"cleanDescOpt": "C"}),
        row("SOPInstanceUID", "U"),
        row("StudyInstanceUID", "U"),
        row("SeriesInstanceUID", "U"),
        row("FrameOfReferenceUID", "U"),
        row("ReferencedSOPInstanceUID", "U"),
        row("PhysiciansOfRecord", "Z/D"),          # not Type 1: Z
        row("ContentDate", "Z/D"),                 # Type 1: D
        row("PerformingPhysicianName", "X/Z"),     # not Type 2: X
        row("PatientSexNeutered", "X/Z"),          # Type 2: Z
        row("ProtocolName", "X/D"),                # X
        row("StationName", "X/Z/D"),               # X
        row("DeviceSerialNumber", "X/Z/D"),        # Type 1: D
        row("ReferencedPatientSequence", "X/Z/U*"),  # X
        row("ReferencedImageSequence", "X/Z/U*"),    # kept, UIDs replaced
        row("PatientName", "Z"), row("PatientID", "Z"), row("AccessionNumber", "Z"),
        row("PatientBirthDate", "Z"), row("InstitutionName", "X/Z/D"),
        {"tag": "GGGGEEEE", "mask": "00010000", "value": "00010000", "keyword": None,
         "name": "Private Attributes", "vr": None, "basic": "X",
         "options": {"rtnSafePrivOpt": "C"}},
        {"tag": "50XXXXXX", "mask": "FF000000", "value": "50000000", "keyword": None,
         "name": "Curve Data", "vr": None, "basic": "X", "options": {}},
        {"tag": "60XX3000", "mask": "FF00FFFF", "value": "60003000", "keyword": "OverlayData",
         "name": "Overlay Data", "vr": "OB/OW", "basic": "X", "options": {}},
    ],
}


@pytest.fixture(scope="module")
def small() -> Table:
    return Table(SMALL, "test table")


def test_table_lookup_exact_masked_private_and_options():
    t = default_table()
    assert t.edition == "2026c"
    none, modif = frozenset(), frozenset({"rtnLongModifDatesOpt"})
    assert t.action(0x00100010, none, False) == "Z"                    # PatientName
    assert t.action(0x00080020, modif, False) == "C"                   # StudyDate, option on
    assert t.action(0x00080020, none, False) == "Z"
    assert t.action(0x00080020, frozenset({"rtnLongFullDatesOpt"}), False) == "K"
    assert t.action(0x60023000, none, False) == "X"                    # overlay data, masked
    assert t.action(0x50020010, none, False) == "X"                    # curve, masked
    assert t.action(0x00291010, none, True) == "X"                     # private row
    assert t.action(0x00291010, frozenset({"rtnSafePrivOpt"}), True) == "C"
    assert t.action(0x00080016, none, False) is None                   # SOPClassUID: not listed
    assert t.action(0x00181000, none, False) == "X/Z/D"                # combined, as in the table
    assert t.action(0x00181000, frozenset({"rtnDevIdOpt"}), False) == "K"


def test_combined_codes_resolve_to_one_action():
    assert resolve_combined("X/Z", "PerformingPhysicianName") == "X"
    assert resolve_combined("X/Z", "PatientSexNeutered") == "Z"
    assert resolve_combined("X/D", "ProtocolName") == "X"
    assert resolve_combined("X/Z/D", "DeviceSerialNumber") == "D"
    assert resolve_combined("X/Z/D", "StationName") == "X"
    assert resolve_combined("Z/D", "ContentDate") == "D"
    assert resolve_combined("Z/D", "PhysiciansOfRecord") == "Z"
    assert resolve_combined("X/Z/U*", "ReferencedImageSequence") == "U"
    assert resolve_combined("X/Z/U*", "ReferencedPatientSequence") == "X"


# --- each action, top level and nested, in memory and from bytes --------------------------------
CASES = [
    # keyword, VR value, expectation
    ("InstitutionalDepartmentName", "Neuroradiology Dept", "D"),
    ("ReferringPhysicianName", "Smith^Anna", "Z"),
    ("PatientAddress", "Storgata 1, Bergen", "X"),
    ("Manufacturer", "SIEMENS", "K"),
    ("StudyDate", "20240229", "C"),
    ("FrameOfReferenceUID", "1.2.826.0.1.3680043.8.498.777", "U"),
    ("PhysiciansOfRecord", "Berg^Ola", "Z"),
    ("ContentDate", "20240301", "D"),
    ("PerformingPhysicianName", "Lie^Per", "X"),
    ("PatientSexNeutered", "ALTERED", "Z"),
    ("ProtocolName", "Hansen head protocol", "X"),
    ("StationName", "MRC12345", "X"),
    ("DeviceSerialNumber", "SN-4711", "D"),
]


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("keyword,value,expect", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_action(small, keyword, value, expect, depth, raw):
    ds = base_dataset()
    if depth:
        nest(ds, lambda item: setattr(item, keyword, value))
    else:
        setattr(ds, keyword, value)
    if raw:
        ds = roundtrip(ds)
    engine = Deidentifier(settings(), small)
    engine.apply(ds)
    ds = roundtrip(ds)              # what leaves is what was written
    target = at_depth(ds, depth)
    if expect == "X":
        assert keyword not in target
        return
    assert keyword in target
    out = target[keyword].value
    if expect == "Z":
        assert out in (None, "", b"")
    elif expect == "D":
        assert out not in (None, "") and str(out) != value
    elif expect == "K":
        assert str(out) == value
    elif expect == "C":
        shifted = date(2024, 2, 29) + timedelta(days=engine.shift())
        assert str(out) == shifted.strftime("%Y%m%d")
    elif expect == "U":
        assert str(out) == engine.uid(value) and UID_RE.match(str(out))


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_x_z_u_star_keeps_type1_reference_sequences_with_replaced_uids(small, raw):
    ds = base_dataset()
    ref = Dataset()
    ref.ReferencedSOPClassUID = MRImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.555"
    ds.ReferencedImageSequence = Sequence([ref])
    pat = Dataset()
    pat.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.556"
    ds.ReferencedPatientSequence = Sequence([pat])
    if raw:
        ds = roundtrip(ds)
    engine = Deidentifier(settings(), small)
    ds = roundtrip(engine.apply(ds))
    assert "ReferencedPatientSequence" not in ds
    item = ds.ReferencedImageSequence[0]
    assert item.ReferencedSOPClassUID == MRImageStorage             # a class UID is kept
    assert item.ReferencedSOPInstanceUID == engine.uid("1.2.826.0.1.3680043.8.498.555")


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_z_and_d_on_sequences_and_unlisted_sequence_items(raw):
    ds = base_dataset()
    content = Dataset()
    content.TextValue = "Patient Hansen was seen"
    ds.ContentSequence = Sequence([content])                  # D in 2026c: one empty item
    req = Dataset()
    req.RequestedProcedureID = "RP-99"
    ds.RequestAttributesSequence = Sequence([req])            # X
    ds = roundtrip(ds) if raw else ds
    ds = roundtrip(Deidentifier(settings()).apply(ds))
    assert len(ds.ContentSequence) == 1 and len(ds.ContentSequence[0]) == 0
    assert "RequestAttributesSequence" not in ds


def test_clean_structured_content_cleans_free_text_in_content_items():
    ds = base_dataset()
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "Kari Hansen, NID12345678, seen by Smith"
    item.DateTime = "20260314101500"
    ds.ContentSequence = Sequence([item])
    opts = DEFAULT_OPTIONS | {"cleanStructContOpt"}
    engine = Deidentifier(settings(options=opts))
    out = roundtrip(engine.apply(roundtrip(ds)))
    text = out.ContentSequence[0].TextValue
    assert "Hansen" not in text and "Kari" not in text and "NID12345678" not in text
    assert "seen by Smith" in text                       # not an identifier of the source
    assert out.ContentSequence[0].DateTime != "20260314101500"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == \
        ["113100", "113104", "113107"]


# --- options switch exactly the rows the table says --------------------------------------------
_SAMPLE = {"AE": "AETITLE1", "AS": "042Y", "CS": "VALUE1", "DA": "20200315",
           "DT": "20200315123456", "TM": "123456", "DS": "1.5", "IS": "7", "LO": "some text",
           "LT": "some text", "SH": "short", "ST": "some text", "UC": "some text",
           "UT": "some text", "PN": "Other^Person", "UI": "1.2.826.0.1.3680043.8.498.4242",
           "UR": "http://example.org/x", "US": 5, "SS": -5, "UL": 5, "SL": -5, "FL": 1.5,
           "FD": 2.5}
_WRITTEN_BY_FIONA = {"PatientID", "PatientName", "InstitutionName", "ClinicalTrialTimePointID",
                     "ClinicalTrialTimePointDescription", "PatientIdentityRemoved",
                     "DeidentificationMethod", "LongitudinalTemporalInformationModified"}


def _all_rows_dataset(table: Table) -> tuple[Dataset, list[int]]:
    ds = base_dataset()
    tags = []
    for tag in table.exact:
        if tag >> 16 in (0, 2):        # command group (always removed), file meta
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        kw = keyword_for_tag(tag)
        if vr not in _SAMPLE or kw in _WRITTEN_BY_FIONA:
            continue
        value = _SAMPLE[vr]
        if vr in ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"):
            # unique (a shared value would be an identifier), and letters only (a descriptor
            # cleaner cuts long numbers out)
            value = "V" + f"{tag:08X}".translate(str.maketrans("0123456789", "GHIJKLMNOP"))
        if kw == "TimezoneOffsetFromUTC":
            value = "+0100"                    # a cleaned offset is kept only when well-formed
        ds.add_new(tag, vr, value)
        tags.append(tag)
    return ds, tags


def _outcome(ds: Dataset, tag: int):
    if tag not in ds:
        return "<absent>"
    v = ds[tag].value
    return "<empty>" if v in (None, "", b"") else str(v)


OPTION_CASES = [
    ("rtnPatCharsOpt", DEFAULT_OPTIONS), ("rtnDevIdOpt", DEFAULT_OPTIONS),
    ("rtnInstIdOpt", DEFAULT_OPTIONS), ("cleanDescOpt", DEFAULT_OPTIONS),
    ("cleanStructContOpt", DEFAULT_OPTIONS), ("cleanGraphOpt", DEFAULT_OPTIONS),
    ("rtnUIDsOpt", DEFAULT_OPTIONS), ("rtnSafePrivOpt", DEFAULT_OPTIONS),
    ("rtnLongModifDatesOpt", frozenset()), ("rtnLongFullDatesOpt", frozenset()),
]


@pytest.mark.parametrize("option,base", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_switch_exactly_the_rows_the_table_says(option, base):
    table = default_table()
    ds, tags = _all_rows_dataset(table)
    without = Deidentifier(settings(options=base)).apply(copy.deepcopy(ds))
    with_ = Deidentifier(settings(options=base | {option})).apply(copy.deepcopy(ds))
    changed = {tag for tag in tags if _outcome(without, tag) != _outcome(with_, tag)}
    expected = set()
    for tag in tags:
        kw = keyword_for_tag(tag)
        a = resolve_combined(table.exact[tag].code(base), kw)
        b = resolve_combined(table.exact[tag].code(base | {option}), kw)
        if b == "C" and rule_for(kw, None) in (Rule.NARRATIVE, Rule.BINARY):
            b = resolve_combined(table.exact[tag].basic, kw)     # never kept: the basic code
        if a != b:
            expected.add(tag)
    names = lambda s: sorted(keyword_for_tag(t) for t in s)  # noqa: E731
    assert names(changed) == names(expected)


def test_named_options_keep_what_they_say():
    ds = base_dataset()
    ds.PatientAge, ds.PatientSex, ds.PatientWeight = "045Y", "F", "61.5"
    ds.DeviceSerialNumber, ds.StationName = "SN-4711", "MRC12345"
    ds.StudyDescription = "MR head for Hansen"
    plain = Deidentifier(settings()).apply(copy.deepcopy(ds))
    assert "PatientAge" not in plain and not plain.PatientSex and "PatientWeight" not in plain
    assert plain.DeviceSerialNumber == "ANONYMIZED" and "StationName" not in plain
    assert "StudyDescription" not in plain
    with_option = lambda o: Deidentifier(  # noqa: E731
        settings(options=DEFAULT_OPTIONS | {o})).apply(copy.deepcopy(ds))
    chars = with_option("rtnPatCharsOpt")
    assert (chars.PatientAge, chars.PatientSex, str(chars.PatientWeight)) == ("045Y", "F", "61.5")
    dev = with_option("rtnDevIdOpt")
    assert (dev.DeviceSerialNumber, dev.StationName) == ("SN-4711", "MRC12345")
    desc = with_option("cleanDescOpt")
    assert desc.StudyDescription.strip() == "MR head for"          # cleaned of the name


def test_date_options_and_temporal_marker():
    ds = base_dataset()
    ds.AcquisitionDate = "20260314"
    full = Deidentifier(settings(options=frozenset({"rtnLongFullDatesOpt"}))).apply(
        copy.deepcopy(ds))
    assert full.StudyDate == "20260314"
    assert full.LongitudinalTemporalInformationModified == "UNMODIFIED"
    none = Deidentifier(settings(options=frozenset())).apply(copy.deepcopy(ds))
    assert not none.StudyDate and "AcquisitionDate" not in none
    assert none.LongitudinalTemporalInformationModified == "REMOVED"
    modif = Deidentifier(settings()).apply(copy.deepcopy(ds))
    assert modif.StudyDate != "20260314"
    assert modif.LongitudinalTemporalInformationModified == "MODIFIED"
    assert modif.StudyTime == "101500"                                # TM kept


# --- UIDs ---------------------------------------------------------------------------------------
SAMPLE_UIDS = ["1.2.840.113619.2.55.3.604688119.969.1268071029.320",
               "1.3.12.2.1107.5.2.43.66012.2026031410150012345678901",
               "2.25.12345678901234567890123456789012345678", "1.2.3"]


def test_uids_are_valid_stable_and_per_project():
    a = Deidentifier(settings())
    b = Deidentifier(settings())
    other = Deidentifier(settings(project="OTHER"))
    for u in SAMPLE_UIDS:
        m = a.uid(u)
        assert UID_RE.match(m) and len(m) <= 64 and m.startswith("2.25.")
        assert m == b.uid(u) and m != other.uid(u) and m != u
    assert len({a.uid(u) for u in SAMPLE_UIDS}) == len(SAMPLE_UIDS)
    long_root = Deidentifier(settings(uid_prefix="1.2.826.0.1.3680043.10.543.1234567.89."))
    for u in SAMPLE_UIDS:
        m = long_root.uid(u)
        assert UID_RE.match(m) and len(m) <= 64
    assert a.uid("") == ""


def test_uids_are_the_same_in_another_process():
    code = ("from fiona.deid.engine import Deidentifier, Settings; import sys; "
            f"d = Deidentifier(Settings(project='PROJ', participant='X', key={KEY!r})); "
            f"print(' '.join(d.uid(u) for u in {SAMPLE_UIDS!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    here = Deidentifier(settings(participant="X"))
    assert out == [here.uid(u) for u in SAMPLE_UIDS]


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_references_resolve_to_the_mapped_files(tmp_path):
    a = base_dataset(sop="1.2.826.0.1.3680043.8.498.1001")
    a.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.9001"
    b = base_dataset(sop="1.2.826.0.1.3680043.8.498.1002", implicit=True)
    ref = Dataset()
    ref.ReferencedSOPClassUID = MRImageStorage
    ref.ReferencedSOPInstanceUID = a.SOPInstanceUID
    b.ReferencedImageSequence = Sequence([ref])
    src = Dataset()
    src.ReferencedSOPClassUID = MRImageStorage
    src.ReferencedSOPInstanceUID = a.SOPInstanceUID
    b.SourceImageSequence = Sequence([src])
    nest(b, lambda item: setattr(item, "SeriesInstanceUID", a.SeriesInstanceUID))
    write(a, tmp_path / "in" / "a.dcm")
    write(b, tmp_path / "in" / "sub" / "b.dcm")
    report = anonymize_folder(tmp_path / "in", tmp_path / "out", settings())
    assert report.written == 2 and report.counts["series"] == 1
    files = {p.name: pydicom.dcmread(p) for p in (tmp_path / "out").rglob("*.dcm")}
    engine = Deidentifier(settings())
    out_a = files[f"{engine.uid(a.SOPInstanceUID)}.dcm"]
    out_b = files[f"{engine.uid(b.SOPInstanceUID)}.dcm"]
    assert out_b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out_a.SOPInstanceUID
    assert out_b.SourceImageSequence[0].ReferencedSOPInstanceUID == out_a.SOPInstanceUID
    assert at_depth(out_b, 2).SeriesInstanceUID == out_a.SeriesInstanceUID
    for out in (out_a, out_b):
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.StudyInstanceUID == engine.uid(a.StudyInstanceUID)
        path = tmp_path / "out" / out.SeriesInstanceUID / f"{out.SOPInstanceUID}.dcm"
        assert path.exists()
    assert out_b.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


# --- dates ---------------------------------------------------------------------------------------
def test_shift_is_keyed_per_participant_and_never_zero():
    shifts = {p: Deidentifier(settings(participant=p)).shift() for p in
              (f"P{i:04d}" for i in range(50))}
    assert all(-3650 <= s <= -365 for s in shifts.values())
    assert len(set(shifts.values())) > 40
    assert Deidentifier(settings(participant="P0001")).shift() == shifts["P0001"]
    tiny = [Deidentifier(settings(participant=f"Q{i}", shift_range=(-1, 1))).shift()
            for i in range(40)]
    assert set(tiny) == {-1, 1}
    with pytest.raises(ValueError):
        settings(date_shift_days=0)
    assert Deidentifier(with_profile(settings(), "compat42")).shift() == 42


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_dates_shift_at_every_depth_and_keep_intervals(raw):
    def study(day: str, participant: str) -> Dataset:
        ds = base_dataset()
        ds.StudyDate = day
        ds.AcquisitionDateTime = day + "101530.250000+0100"
        nest(ds, lambda item: (setattr(item, "StudyDate", day),
                               setattr(item, "ScheduledProcedureStepStartDate", day)))
        ds = roundtrip(ds) if raw else ds
        return Deidentifier(settings(participant=participant)).apply(ds)

    def days(ds: Dataset, where: Dataset | None = None) -> date:
        v = str((where or ds).StudyDate)
        return date(int(v[:4]), int(v[4:6]), int(v[6:8]))

    first, second = study("20250101", "P0001"), study("20250315", "P0001")
    assert (days(second) - days(first)).days == (date(2025, 3, 15) - date(2025, 1, 1)).days
    shift = Deidentifier(settings(participant="P0001")).shift()
    assert days(first) == date(2025, 1, 1) + timedelta(days=shift)
    inner = at_depth(first, 2)
    assert inner.StudyDate == first.StudyDate
    assert inner.ScheduledProcedureStepStartDate == first.StudyDate
    dt = str(first.AcquisitionDateTime)
    assert dt[:8] == str(first.StudyDate) and dt[8:] == "101530.250000+0100"
    other = study("20250101", "P0002")
    assert other.StudyDate != first.StudyDate


def test_partial_and_unparsable_dates():
    ds = base_dataset()
    ds.AcquisitionDateTime = "2025"
    ds.add_new(0x00181200, "DA", "2025-01-01 oops")                   # DateOfLastCalibration
    out = Deidentifier(settings(date_shift_days=-400)).apply(ds)
    assert out.AcquisitionDateTime == "2023"
    assert not out.get("DateOfLastCalibration")              # C row, malformed: basic X


# --- private elements, curves, overlays ---------------------------------------------------------
def private_dataset() -> Dataset:
    ds = base_dataset()
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0A, "US", 20)                         # NumberOfImagesInMosaic
    block.add_new(0x0C, "LO", "Hansen secret")
    csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01Hansen^Kari" + b"\x00" * 5)
    item = Dataset()
    item.PatientName = "Hansen^Kari"
    item.StudyDate = "20260314"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.10001"
    inner = item.private_block(0x0043, "ACME 1.1", create=True)
    inner.add_new(0x01, "LO", "Hansen hidden")
    inner.add_new(0x02, "DA", "20260314")
    seq = ds.private_block(0x0041, "ACME 1.1", create=True)
    seq.add_new(0x10, "SQ", Sequence([item]))
    ds.add_new(0x50000010, "US", 2)                       # curve
    ds.add_new(0x50003000, "OW", b"\x00\x01" * 4)
    ds.add_new(0x60000010, "US", 8)                       # overlay rows
    ds.add_new(0x60000022, "LO", "Hansen overlay")        # overlay description
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 4)
    return ds


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_private_elements_curves_and_overlays_removed(raw):
    ds = private_dataset()
    ds = roundtrip(ds) if raw else ds
    out = roundtrip(Deidentifier(settings()).apply(ds))
    assert not [e.tag for e in out if e.tag.is_private]
    assert not [e.tag for e in out if e.tag.group in (0x5000, 0x6000)]
    assert b"Hansen" not in to_bytes(out)


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_safe_private_list_keeps_listed_elements_and_cleans_kept_sequences(raw):
    ds = private_dataset()
    ds = roundtrip(ds) if raw else ds
    s = settings(safe_private=(("SIEMENS MR HEADER", 0x0A), ("ACME 1.1", 0x10),
                               ("ACME 1.1", 0x02)))
    assert "rtnSafePrivOpt" in s.options
    engine = Deidentifier(s)
    out = roundtrip(engine.apply(ds))
    private = sorted(int(e.tag) for e in out if e.tag.is_private)
    assert private == [0x00190010, 0x0019100A, 0x00410010, 0x00411010]
    assert out.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value == 20
    item = out.private_block(0x0041, "ACME 1.1")[0x10].value[0]
    assert not item.PatientName                                    # Z at depth
    assert item.StudyDate == (date(2026, 3, 14) + timedelta(days=engine.shift())).strftime("%Y%m%d")
    assert item.ReferencedSOPInstanceUID == engine.uid("1.2.826.0.1.3680043.8.498.10001")
    inner = sorted(int(e.tag) for e in item if e.tag.is_private)
    assert inner == [0x00430010, 0x00431002]                       # listed one kept, other gone
    assert str(item[0x00431002].value) == item.StudyDate           # shifted too
    assert b"Hansen" not in to_bytes(out)
    codes = [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113111"]


# --- markers, project values, import rule, profiles ---------------------------------------------
def test_markers_list_exactly_the_options_applied():
    ds = Deidentifier(settings(event="followup")).apply(base_dataset())
    assert ds.PatientIdentityRemoved == "YES"
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in
            ds.DeidentificationMethodCodeSequence] == [("113100", "DCM"), ("113107", "DCM")]
    assert ds.DeidentificationMethodCodeSequence[1].CodeMeaning == \
        "Retain Longitudinal Temporal Information Modified Dates Option"
    method = list(ds.DeidentificationMethod)
    assert method[0].startswith("FIONA ") and "2026c" in method[0]
    assert "Retain Longitudinal Temporal Information Modified Dates Option" in method
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert (ds.PatientID, ds.PatientName, ds.InstitutionName) == ("P0001", "P0001", "PROJ")
    assert ds.ClinicalTrialTimePointID == "followup" == ds.ClinicalTrialTimePointDescription
    opts = frozenset({"rtnLongModifDatesOpt", "rtnPatCharsOpt", "rtnDevIdOpt"})
    ds = roundtrip(Deidentifier(settings(options=opts, institution="MMIV")).apply(
        roundtrip(base_dataset())))
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == \
        ["113100", "113107", "113108", "113109"]
    assert ds.InstitutionName == "MMIV" and "ClinicalTrialTimePointID" not in ds


def test_settings_are_validated():
    with pytest.raises(ValueError):
        settings(options=frozenset({"rtnLongModifDatesOpt", "rtnLongFullDatesOpt"}))
    with pytest.raises(ValueError):
        Deidentifier(settings(options=frozenset({"noSuchOpt"})))
    with pytest.raises(ValueError):
        settings(uid_prefix="2.025.")
    with pytest.raises(ValueError):
        Settings(project="P", participant="X", key=b"short")
    with pytest.raises(ValueError):
        load_profile("../etc/passwd")
    with pytest.raises(ValueError):
        with_profile(settings(), {"options": [], "kep": ["PatientName"]})


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_import_rule_keeps_named_groups_after_deidentification(raw):
    ds = base_dataset()
    ds.SeriesDescription = "Hansen_t1_mprage_sag_run2"
    ds = roundtrip(ds) if raw else ds
    rule = {"tag": "0008,103E",
            "regexp": r"(?P<seq>t[12])_(?:mprage)_(?P<plane>sag|tra)_(?P<run>run\d)?"}
    out = Deidentifier(settings(extra={"import_rule": rule})).apply(ds)
    assert out.SeriesDescription == "t1_sag_run2"
    ds2 = base_dataset()
    ds2.SeriesDescription = "Hansen localizer"
    rule["tag"] = "SeriesDescription"
    out2 = Deidentifier(settings(extra={"import_rule": rule})).apply(ds2)
    assert out2.SeriesDescription == ""


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_a_remove_rule_removes_at_top_level_and_nested(raw):
    ds = base_dataset()
    ds.SoftwareVersions = "syngo MR XA30"                       # not in the table: kept
    nest(ds, lambda item: (setattr(item, "Manufacturer", "SIEMENS"),
                           setattr(item, "SoftwareVersions", "syngo MR XA30")))
    ds = roundtrip(ds) if raw else ds
    profile = {"name": "strict", "options": ["rtnLongModifDatesOpt"],
               "remove": ["Manufacturer", "SoftwareVersions"],
               "replace": {"ManufacturerModelName": "MODEL"}}
    nest_model = at_depth(ds, 2)
    nest_model.ManufacturerModelName = "Prisma"
    out = roundtrip(Deidentifier(with_profile(settings(), profile)).apply(ds))
    for where in (out, at_depth(out, 2)):
        assert "Manufacturer" not in where and "SoftwareVersions" not in where
        assert where.ManufacturerModelName == "MODEL"
    assert "FIONA profile strict" in list(out.DeidentificationMethod)
    kept = Deidentifier(settings()).apply(roundtrip(base_dataset()) if raw else base_dataset())
    assert kept.Manufacturer == "SIEMENS"


def test_shipped_profiles():
    default = load_profile("default")
    assert default["options"] == ["rtnLongModifDatesOpt"] and default["date_shift_days"] is None
    compat = load_profile("compat42")
    assert compat["date_shift_days"] == 42
    s = with_profile(settings(), "compat42")
    ds = Deidentifier(s).apply(base_dataset())
    assert ds.StudyDate == "20260425"
    # a whole profile may ride in `extra` (as the forwarder passes it) if it agrees
    Deidentifier(settings(extra=dict(default)))
    with pytest.raises(ValueError):
        Deidentifier(settings(extra=dict(compat)))


# --- the gate -------------------------------------------------------------------------------------
def test_gate_blocks_a_profile_that_keeps_patient_name(tmp_path):
    write(base_dataset(), tmp_path / "in" / "a.dcm")
    write(base_dataset(sop="1.2.826.0.1.3680043.8.498.10002"), tmp_path / "in" / "b.dcm")
    bad = {"name": "leaky", "options": ["rtnLongModifDatesOpt"], "keep": ["PatientName"]}
    with pytest.raises(GateError) as err:
        anonymize_folder(tmp_path / "in", tmp_path / "out", settings(), bad)
    assert err.value.path == "(0010,0010) PatientName"
    assert "(0010,0010) PatientName" in str(err.value)
    assert "Hansen" not in str(err.value) and "Hansen" not in err.value.value
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))


def test_gate_names_nested_elements_and_raw_bytes():
    src = base_dataset()
    ids = Identifiers.from_dataset(src)
    assert "hansen" in ids.texts() and "nid12345678" in ids.texts()
    assert "Hansen" not in repr(ids)
    out = Deidentifier(settings()).apply(base_dataset())
    check(out, to_bytes(out), ids, {"P0001"})                    # clean
    leaky = copy.deepcopy(out)
    nest(leaky, lambda item: setattr(item, "ReferencedSOPInstanceUID", src.SOPInstanceUID))
    with pytest.raises(GateError) as err:
        check(leaky, to_bytes(leaky), ids, {"P0001"})
    assert err.value.path == ("ReferencedSeriesSequence[0].ReferencedSeriesSequence[0]."
                              "(0008,1155) ReferencedSOPInstanceUID")
    blob = copy.deepcopy(out)
    blob.add_new(0x00420011, "OB", b"%PDF KARI HANSEN%")          # EncapsulatedDocument
    with pytest.raises(GateError) as err:
        check(blob, to_bytes(blob), ids, {"P0001"})
    assert err.value.path == "(0042,0011) EncapsulatedDocument"
    birth = copy.deepcopy(out)
    birth.ContentDate = "19800517"
    with pytest.raises(GateError):
        check(birth, to_bytes(birth), ids, {"P0001"})
    # stand-alone words only: "Kari" is not in "Karius", "123" not in "41234"
    fine = copy.deepcopy(out)
    fine.SeriesDescription = "Karius Hansenite"
    check(fine, to_bytes(fine), ids, {"P0001"})
    squashed = copy.deepcopy(out)
    squashed.SeriesDescription = "karimariehansen"
    with pytest.raises(GateError):
        check(squashed, to_bytes(squashed), ids, {"P0001"})


def test_gate_allows_values_legitimately_present():
    src = base_dataset()
    src.PatientID = "P0001"                                      # routing: ID is the pseudonym
    ids = Identifiers.from_dataset(src)
    out = Deidentifier(settings()).apply(base_dataset())
    check(out, to_bytes(out), ids, {"P0001"})
    with pytest.raises(GateError):
        check(out, to_bytes(out), ids, set())


def test_gate_does_not_block_names_that_are_also_fiona_markers_or_code_strings():
    src = base_dataset()
    src.PatientName = "Fiona^Norm^Yes"
    ids = Identifiers.from_dataset(src)
    out = Deidentifier(settings()).apply(roundtrip(src))
    out.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
    check(out, to_bytes(out), ids, {"P0001"})              # FIONA markers, ImageType NORM
    out.ImageComments = "norm"
    with pytest.raises(GateError) as err:
        check(out, to_bytes(out), ids, {"P0001"})
    assert err.value.path == "(0020,4000) ImageComments"


def test_preamble_is_zeroed():
    ds = roundtrip(base_dataset())
    ds.preamble = b"II*\x00Hansen" + b"\x00" * 118
    out = Deidentifier(settings()).apply(ds)
    assert to_bytes(out)[:128] == b"\x00" * 128


def test_gate_searches_only_compressed_pixel_data_and_only_for_long_identifiers():
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    src = base_dataset()
    src.PatientName = "Lee^Bo"
    ids = Identifiers.from_dataset(src)
    out = Deidentifier(settings()).apply(base_dataset())
    out.Rows, out.Columns, out.BitsAllocated, out.BitsStored, out.HighBit = 16, 16, 8, 8, 7
    out.SamplesPerPixel, out.PixelRepresentation = 1, 0
    out.PhotometricInterpretation = "MONOCHROME2"
    out.PixelData = b"\x00" * 100 + b" LEE^BO " + b"\x00" * 148     # native: image samples
    check(out, to_bytes(out), ids, {"P0001"})

    def jpeg(comment: bytes) -> None:
        out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        out.PixelData = encapsulate([b"\xff\xd8\xff\xfe" + comment + b"\x00" * 200 + b"\xff\xd9"])
        out["PixelData"].VR = "OB"
        out["PixelData"].is_undefined_length = True

    jpeg(b" LEE ")                          # a 3-letter part alone: chance, not searched
    check(out, to_bytes(out), ids, {"P0001"})
    jpeg(b" LEE^BO ")                       # the whole name in a JPEG comment
    with pytest.raises(GateError) as err:
        check(out, to_bytes(out), ids, {"P0001"})
    assert err.value.path == "(7FE0,0010) PixelData"


def test_anonymize_folder_report_and_skips(tmp_path):
    write(base_dataset(), tmp_path / "in" / "a.dcm")
    write(base_dataset(), tmp_path / "in" / "a_copy.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    report = anonymize_folder(tmp_path / "in", tmp_path / "out", settings())
    assert report.counts == {"written": 1, "skipped": 1, "failed": 0, "duplicates": 1,
                             "series": 1}
    again = anonymize_folder(tmp_path / "in", tmp_path / "out", settings())
    assert again.written == 1                                     # deterministic: overwritten


def test_cli_anonymize(tmp_path):
    from fiona.bootstrap import init
    from fiona.cli import main

    cfg = init(tmp_path / "data")
    write(base_dataset(), tmp_path / "in" / "a.dcm")
    rc = main(["--config", str(cfg), "anonymize", "--project", "PROJ", "--participant", "P0009",
               "--event", "baseline", str(tmp_path / "in"), str(tmp_path / "out")])
    assert rc == 0
    (out,) = list((tmp_path / "out").rglob("*.dcm"))
    ds = pydicom.dcmread(out)
    assert ds.PatientID == "P0009" and ds.ClinicalTrialTimePointID == "baseline"
    assert main(["--config", str(cfg), "anonymize", "--project", "PROJ", "--participant", "X",
                 "--profile", "nosuch", str(tmp_path / "in"), str(tmp_path / "out2")]) == 2


# --- canary: every text value of every pydicom test file -----------------------------------------
CANARY_SHIFT = -100_000          # shifted canary dates land centuries before any canary date


class Canaries:
    def __init__(self, start: int = 0):
        self.n = start                                       # unique across files
        self.tokens: list[tuple[bytes, bool, str]] = []     # (token, must vanish, where)

    def next(self) -> int:
        self.n += 1
        return self.n

    def token(self, vr: str) -> str | None:
        n = self.next()
        if vr in ("AE", "CS"):
            return f"CY{n:06d}"
        if vr == "AS":
            return f"{n % 1000:03d}W"
        if vr == "DA":
            return (date(1901, 1, 1) + timedelta(days=n)).strftime("%Y%m%d")
        if vr == "DT":
            return (date(1901, 1, 1) + timedelta(days=n)).strftime("%Y%m%d") + "121314"
        if vr == "TM":
            return f"111111.{n:06d}"
        if vr == "DS":
            return f"9{n:07d}.5"
        if vr == "IS":
            return f"7{n:07d}"
        if vr in ("LO", "LT", "SH", "ST", "UC", "UT", "PN"):
            return f"CANARY{n:06d}"
        if vr == "UI":
            return f"1.2.826.0.1.3680043.8.498.{1000000 + n}"
        return None


def _fate_vanishes(table: Table, opts: frozenset, tag: int, vr: str, in_meta: bool) -> bool:
    """Must a canary in this element be gone from the output (per the table, and FIONA's
    documented rules)? Kept (K), cleaned (C) and unlisted attributes may keep it."""
    if in_meta or (tag >> 16) & 1 or (0x6000 <= tag >> 16 <= 0x60FF) or vr in ("UI", "DA", "DT"):
        return True
    action = table.action(tag, opts, False)
    if action is None:
        return False
    return resolve_combined(action, keyword_for_tag(tag)) not in ("K", "C")


def _canary(ds: Dataset, can: Canaries, table: Table, opts: frozenset, where: str,
            in_meta: bool = False) -> None:
    for elem in list(ds):
        tag, vr = int(elem.tag), elem.VR
        if vr == "SQ":
            for item in elem.value or ():
                _canary(item, can, table, opts, where, in_meta)
            continue
        if tag == 0x00080005 or vr not in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT",
                                           "PN", "SH", "ST", "TM", "UC", "UT", "UI"):
            continue
        if vr == "UI":
            kw = keyword_for_tag(tag) if not elem.tag.is_private else ""
            values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) \
                else [elem.value]
            if is_class_like_uid(kw) or any(is_well_known_uid(str(v)) for v in values):
                continue
        token = can.token(vr)
        elem.value = token
        can.tokens.append((token.encode(), _fate_vanishes(table, opts, tag, vr, in_meta),
                           f"{where} {elem.tag} {token}"))


def _contains(data: bytes, token: bytes) -> bool:
    """`token` in `data` as a whole value: a numeric token inside a longer number (a random
    replacement UID has 39 digits) is chance, not a leak."""
    i = data.find(token)
    while i >= 0:
        before = data[i - 1:i]
        after = data[i + len(token):i + len(token) + 1]
        if not (before.isdigit() or before == b".") and not after.isdigit():
            return True
        i = data.find(token, i + 1)
    return False


def _pydicom_inputs():
    """pydicom's bundled test files that pydicom itself can read and write back (a few are
    deliberately broken: those are not inputs)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in sorted(get_testdata_files()):
            p = Path(f)
            if not p.is_file() or p.suffix in (".json", ".txt", ".gz", ".bz2", ".icc", ".dump"):
                continue
            try:
                ds = pydicom.dcmread(p, force=True)
                if len(ds) < 3:
                    continue
                to_bytes(ds)
            except Exception:
                continue
            out.append(p)
    return out


def test_canary_no_removed_or_replaced_value_survives(tmp_path):
    table = default_table()
    s = settings(date_shift_days=CANARY_SHIFT)
    opts = s.options
    engine = Deidentifier(s)
    allowed = engine.authored_values()
    inputs = _pydicom_inputs()
    assert len(inputs) > 60
    checked = vanished = 0
    folder_inputs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = 0
        for path in inputs:
            can = Canaries(n)
            ds = pydicom.dcmread(path, force=True)
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                _canary(meta, can, table, opts, path.name, in_meta=True)
            _canary(ds, can, table, opts, path.name)
            n = can.n
            try:
                src = pydicom.dcmread(io.BytesIO(to_bytes(ds)))     # raw elements, as from disk
            except Exception:
                continue                                         # canaries made it unwritable
            ids = Identifiers.from_dataset(src)
            out = engine.apply(src, ids)
            data = to_bytes(out)
            check(out, data, ids, allowed)                        # the gate agrees
            leaked = [w for tok, must, w in can.tokens if must and _contains(data, tok)]
            assert not leaked, f"canaries survived: {leaked[:10]}"
            checked += 1
            vanished += sum(1 for _t, must, _w in can.tokens if must)
            if "SOPInstanceUID" in src and "SeriesInstanceUID" in src:
                folder_inputs.append((path, ds, can))
    assert checked >= len(inputs) - 5 and vanished > 2000
    # the same through anonymize_folder, end to end
    for i, (path, ds, _can) in enumerate(folder_inputs):
        try:
            write(ds, tmp_path / "in" / f"{i:03d}_{path.name}")
        except Exception:
            continue
    report = anonymize_folder(tmp_path / "in", tmp_path / "out", s)
    assert report.written > 40
    everything = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*.dcm"))
    leaked = [w for _p, _ds, can in folder_inputs for tok, must, w in can.tokens
              if must and len(tok) > 4 and _contains(everything, tok)]  # AS: per file only
    assert not leaked, f"canaries survived anonymize_folder: {leaked[:10]}"


def test_profile_sets_uid_prefix_and_shift_range():
    """The UID root and the keyed date-shift range are profile data, not code."""
    from fiona.deid.engine import Deidentifier, Settings, with_profile

    base = Settings(project="P", participant="S1", key=b"k" * 32)
    tuned = with_profile(base, {"uid_prefix": "1.2.826.0.1.3680043.10.9.",
                                "shift_range": [-30, -10]})
    engine = Deidentifier(tuned)
    uid = engine.uid("1.2.3.4.5")
    assert uid.startswith("1.2.826.0.1.3680043.10.9.") and len(uid) <= 64
    assert re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", uid)
    assert -30 <= engine.shift() <= -10
    with pytest.raises(ValueError, match="uid_prefix"):
        with_profile(base, {"uid_prefix": "1.02."})
