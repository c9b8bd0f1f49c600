"""The clean action (C): every row of Table E.1-1 that is C under some option has a written-down
rule (fiona/deid/clean.py), a hostile value in it never survives, and a well-formed one
survives (dates shifted) as the option says. Also: no engine <-> gate import cycle.

Each C row is tested under each option that makes it C, on a dataset read back from bytes
(raw elements, the path files take); the output passes the verification gate.
"""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomgen import roundtrip, to_bytes
from fiona.deid.clean import RULE_VRS, RULES, Rule, clean_text, rule_for, shift_dt, valid_tz
from fiona.deid.engine import DEFAULT_OPTIONS, Deidentifier, resolve_combined
from fiona.deid.gate import check
from fiona.deid.identifiers import Identifiers
from fiona.deid.table import Row, default_table
from test_deid import base_dataset, settings

TABLE = default_table()
SHIFT = -400


def _c_rows() -> list[tuple[Row, str]]:
    """(row, option) for every row and every option under which the row is C."""
    rows = list(TABLE.exact.values()) + TABLE.masked + [TABLE.private]
    return [(r, o) for r in rows for o, c in sorted(r.options.items()) if c == "C"]


C_ROWS = _c_rows()
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR"),      # hostile on purpose
              pytest.mark.filterwarnings("ignore:The value length")]


def _name(row: Row) -> str:
    return row.keyword or (row.name or "").replace(" ", "_")


def _vr(row: Row) -> str | None:
    try:
        return dictionary_VR(row.tag) if row.mask is None else row.vr
    except KeyError:
        return row.vr


# --- the rule table ------------------------------------------------------------------------------
def test_every_c_row_has_exactly_one_rule_that_fits_its_vr():
    names = {_name(r) for r, _o in C_ROWS}
    assert len(C_ROWS) > 300
    missing = sorted(n for n in names if rule_for(n, None) is None)
    assert not missing, f"C rows without a clean rule: {missing}"
    stale = sorted(set(RULES) - names)
    assert not stale, f"rules for rows that are not C: {stale}"
    for row, _o in C_ROWS:
        rule, vr = RULES[_name(row)], _vr(row)
        if vr is None or rule in (Rule.SAFE_PRIVATE, Rule.BINARY) and row.mask is not None:
            continue                          # VR unknown to the dictionary; masked groups
        assert vr in RULE_VRS[rule], (_name(row), vr, rule)
        # the fallback is a code that never keeps the value
        assert resolve_combined(row.basic, row.keyword) in ("X", "Z", "D"), _name(row)


def test_rule_lookup_by_masked_row_name():
    assert rule_for(None, "Curve Data") is Rule.BINARY
    assert rule_for(None, "Private Attributes") is Rule.SAFE_PRIVATE
    assert rule_for("OverlayComments", "Overlay Comments") is Rule.NARRATIVE
    assert rule_for("NotARow", None) is None


# --- strict forms --------------------------------------------------------------------------------
@pytest.mark.parametrize("value,ok", [
    ("+0100", True), ("-0330", True), ("+0545", True), ("+1400", True), ("-1200", True),
    ("+0000", True), ("-0000", False), ("+1415", False), ("-1300", False), ("+0110", False),
    ("0100", False), ("+01:00", False), ("+0100 Kari", False), ("Hansen", False), ("", False)])
def test_timezone_offset_form(value, ok):
    assert valid_tz(value) is ok


def test_datetime_shift_keeps_precision_time_and_offset():
    assert shift_dt("20260314101530.25+0100", -1) == "20260313101530.25+0100"
    assert shift_dt("202603", 31) == "202604"
    assert shift_dt("2026", -400) == "2024"
    for bad in ("20260314251500", "20261314", "20260230", "20260314101500+1900",
                "2026-03-14T10:15", "20260314 Hansen"):
        with pytest.raises(ValueError):
            shift_dt(bad, 1)


@pytest.mark.parametrize("text,gone,kept", [
    ("MR head 14.03.2026", ["14.03.2026"], "MR head"),
    ("CT 2026-03-14 thorax", ["2026-03-14"], "CT thorax"),
    ("seen 14 March 2026", ["14 March 2026"], "seen"),
    ("seen March 14, 2026", ["March 14, 2026"], "seen"),
    ("acq 10:15:30 ok", ["10:15:30"], "acq ok"),
    ("ID NID12345678 x", ["NID12345678"], "ID x"),
    ("call +47 55 97 40 00 now", ["55 97 40 00"], "call now"),
    ("t1_mprage_sag b1000 1.0mm", [], "t1_mprage_sag b1000 1.0mm"),
])
def test_clean_text_cuts_dates_times_and_long_numbers(text, gone, kept):
    out = clean_text(text, None)
    assert out == kept
    assert not any(g in out for g in gone)


def test_clean_text_codes_only_cuts_just_the_source_identifiers():
    ids = Identifiers.from_dataset(base_dataset(), uids=False).scrub_pattern()
    assert clean_text("123456789", ids, codes_only=True) == "123456789"
    assert clean_text("NID12345678", ids, codes_only=True) == ""
    assert clean_text("Kari Hansen biopsy", ids) == "biopsy"


# --- every C row, hostile and well-formed values -------------------------------------------------
FRAGMENTS = ["Hansen", "Kari", "NID12345678", "ACC778899", "14.03.2026", "2026-03-14", "Storgata",
             "55 97 40 00", "10:15"]
HOSTILE_TEXT = ["Kari Hansen NID12345678 14.03.2026 ACC778899 tel 55 97 40 00",
                "Storgata 7 2026-03-14 10:15", "Hansen^Kari"]
HOSTILE = {
    Rule.DATE: ["Hansen 20260314", "2026-03-14", "20261345", "14.03.2026", "20260314\\Kari",
                "2026.03.14", "20260314-20260315"],
    Rule.DATETIME: ["20260314101500 Hansen", "2026-03-14T10:15", "20260314251500",
                    "20260314101500+1900", "Kari"],
    Rule.TIME: ["10:15 Hansen", "10:15", "2500", "Kari", "101500 Storgata"],
    Rule.TZ_OFFSET: ["Hansen", "+0100 Kari", "+1500", "+0110", "-0000", "Storgata 7"],
    Rule.DESCRIPTOR: HOSTILE_TEXT,
    Rule.NARRATIVE: HOSTILE_TEXT + ["a harmless comment"],
    Rule.BINARY: [b"Hansen^Kari 20260314 NID12345678 "],
}
SOURCE_DATES = {"20260314", "20260315"}           # StudyDate of the base dataset, and one more


def _leaf_rows() -> dict[tuple[str, Rule], list[tuple[Row, str]]]:
    """(option, rule) -> [(row, VR)] for every C row that is not a sequence or a masked row."""
    out: dict[tuple[str, Rule], list[tuple[Row, str]]] = {}
    for row, option in C_ROWS:
        if row.mask is not None or row is TABLE.private:
            continue
        rule = RULES[_name(row)]
        if rule is Rule.SEQUENCE:
            continue
        vr = _vr(row) or min(RULE_VRS[rule] - {"UC"})   # VR unknown to pydicom
        out.setdefault((option, rule), []).append((row, "OB" if vr == "OB or OW" else vr))
    return out


LEAF_ROWS = _leaf_rows()


def _run(rows: list[tuple[Row, str]], option: str, value) -> tuple[Dataset, bytes]:
    """Every row in `rows` holding `value`, read from bytes, de-identified with `option`
    (Modified Dates on), through the gate; the output read back, and its bytes."""
    ds = base_dataset()
    ds.ReferringPhysicianName = "Berg^Ola"
    ds.PatientAddress = "Storgata 7"
    for row, vr in rows:
        ds.add_new(row.tag, vr, value)
    src = roundtrip(ds)
    ids = Identifiers.from_dataset(src)
    engine = Deidentifier(settings(options=DEFAULT_OPTIONS | {option}, date_shift_days=SHIFT))
    out = engine.apply(src, ids)
    data = to_bytes(out)
    check(out, data, ids, engine.authored_values())           # the gate agrees
    return pydicom.dcmread(io.BytesIO(data)), data


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value if value is not None else "")


@pytest.mark.parametrize("option,rule", sorted(LEAF_ROWS, key=str), ids=str)
def test_hostile_values_never_survive_c_rows(option, rule):
    rows = LEAF_ROWS[(option, rule)]
    for value in HOSTILE[rule]:
        out, data = _run(rows, option, value)
        for frag in FRAGMENTS + sorted(SOURCE_DATES):
            assert frag.encode() not in data, (value, frag)
        for row, _vr in rows:
            elem = out.get(row.tag)
            shown = _text(None if elem is None else elem.value)
            where = (_name(row), value, shown)
            if rule is Rule.DESCRIPTOR and shown.strip():
                continue                      # what was left after cleaning (checked above)
            fallback = resolve_combined(row.basic, row.keyword)
            if fallback == "X":
                assert elem is None, where
            elif fallback == "Z":
                assert elem is not None and not shown.strip("\x00 "), where
            else:
                assert elem is not None and shown and shown != _text(value), where


def _well_formed(rule: Rule) -> list[tuple[str, str]]:
    """(value, expected output) that the option keeps (dates: shifted)."""
    day = (date(2025, 1, 2) + timedelta(days=SHIFT)).strftime("%Y%m%d")
    return {
        Rule.DATE: [("20250102", day), ("20250102\\20250102", f"{day}\\{day}")],
        Rule.DATETIME: [("20250102101530.25+0100", day + "101530.25+0100"),
                        ("20250102", day)],
        Rule.TIME: [("101530.123", "101530.123"), ("1015", "1015")],
        Rule.TZ_OFFSET: [("+0100", "+0100"), ("-0330", "-0330")],
        Rule.DESCRIPTOR: [("T1 MPRAGE sag", "T1 MPRAGE sag")],
    }.get(rule, [])


@pytest.mark.parametrize("option,rule", sorted(LEAF_ROWS, key=str), ids=str)
def test_well_formed_values_survive_c_rows_as_the_option_says(option, rule):
    rows = LEAF_ROWS[(option, rule)]
    for value, expected in _well_formed(rule):
        out, _data = _run(rows, option, value)
        for row, _vr in rows:
            assert _text(out[row.tag].value).strip() == expected, (_name(row), value)


def test_timezone_offset_with_text_is_removed_under_modified_dates():
    """Issue 12 §2: TimezoneOffsetFromUTC (C under Modified Dates) kept arbitrary text."""
    ds = base_dataset()
    ds.TimezoneOffsetFromUTC = "Storgata 7"
    out = Deidentifier(settings()).apply(roundtrip(ds))
    assert "TimezoneOffsetFromUTC" not in out
    ds.TimezoneOffsetFromUTC = "+0100"
    assert Deidentifier(settings()).apply(roundtrip(ds)).TimezoneOffsetFromUTC == "+0100"


@pytest.mark.parametrize("raw", [False, True], ids=["memory", "bytes"])
def test_descriptor_in_memory_and_from_bytes(raw):
    ds = base_dataset()
    ds.StudyDescription = "MR caput Hansen 14.03.2026 NID12345678"
    ds.SeriesDescription = "Hansen^Kari"
    ds = roundtrip(ds) if raw else ds
    out = Deidentifier(settings(options=DEFAULT_OPTIONS | {"cleanDescOpt"})).apply(ds)
    assert out.StudyDescription == "MR caput"
    assert "SeriesDescription" not in out          # nothing left: basic X


# --- sequences cleaned item by item --------------------------------------------------------------
def _seq_cases():
    for row, option in C_ROWS:
        if row.mask is None and RULES.get(_name(row)) is Rule.SEQUENCE:
            yield pytest.param(row, option, id=f"{_name(row)}-{option}")


@pytest.mark.parametrize("row,option", list(_seq_cases()))
def test_sequence_items_are_cleaned(row, option):
    ds = base_dataset()
    item = Dataset()
    item.CodeValue = "1234567"
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = "Kari Hansen 14.03.2026 finding"
    item.TextValue = "Seen 2026-03-14 10:15, NID12345678, tel 55 97 40 00"
    item.Date = "20260314"
    item.TimezoneOffsetFromUTC = "Storgata 7"
    ds.add_new(row.tag, "SQ", Sequence([item]))
    src = roundtrip(ds)
    ids = Identifiers.from_dataset(src)
    engine = Deidentifier(settings(options=DEFAULT_OPTIONS | {option}, date_shift_days=SHIFT))
    out = engine.apply(src, ids)
    data = to_bytes(out)
    check(out, data, ids, engine.authored_values())
    for frag in FRAGMENTS + sorted(SOURCE_DATES):
        assert frag.encode() not in data, frag
    got = pydicom.dcmread(io.BytesIO(data))[row.tag].value[0]
    assert got.CodeValue == "1234567" and got.CodingSchemeDesignator == "SCT"
    assert got.CodeMeaning == "finding"
    assert got.Date == (date(2026, 3, 14) + timedelta(days=SHIFT)).strftime("%Y%m%d")
    assert "TimezoneOffsetFromUTC" not in got


# --- graphics: curves and overlays ---------------------------------------------------------------
def test_clean_graphics_removes_curves_and_overlays_it_cannot_clean():
    ds = base_dataset()
    ds.add_new(0x50000022, "LO", "Hansen curve")
    ds.add_new(0x50003000, "OW", b"\x00\x01" * 4)
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60004000, "LT", "Kari Hansen 14.03.2026")
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 4)
    out = Deidentifier(settings(options=DEFAULT_OPTIONS | {"cleanGraphOpt"})).apply(roundtrip(ds))
    assert not [e.tag for e in out if e.tag.group in (0x5000, 0x6000)]


# --- modules -------------------------------------------------------------------------------------
def test_engine_does_not_import_the_gate():
    code = ("import sys, fiona.deid.engine, fiona.deid.clean, fiona.deid.identifiers; "
            "print('fiona.deid.gate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "False"
