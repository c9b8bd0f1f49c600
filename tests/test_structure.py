"""Unit tests for fiona.receive.structure.scan: the structural completeness walk.

Data sets are encoded with pydicom 3 (`write_dataset` into a `DicomBytesIO` whose
`is_implicit_VR` / `is_little_endian` choose the encoding), then cut.

A cut exactly at a top-level element boundary is indistinguishable from a shorter complete
data set (DICOM has no overall length), so such a prefix is accepted; every other cut must
raise Truncated.
"""

from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from fiona.receive.structure import Invalid, Malformed, Truncated, scan

STUDY = 0x0020000D
SERIES = 0x0020000E
SOP = 0x00080018
PATIENT = 0x00100020
WANTED = frozenset({STUDY, SERIES, SOP, PATIENT})

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"
SOP_UID = "1.2.826.0.1.3680043.8.498.3"


def encode(ds: Dataset, implicit: bool, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def undefined_length_sequence() -> Sequence:
    items = []
    for i in range(2):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        item.ReferencedSOPInstanceUID = f"1.2.3.{i}"
        item.is_undefined_length_sequence_item = True
        items.append(item)
    return Sequence(items)


def make_dataset(*, sequence: bool = True, pixels: str | None = None) -> Dataset:
    """A small data set; `pixels` is None, "native" or "encapsulated"."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = SOP_UID
    ds.Modality = "MR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PAT0001"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.InstanceNumber = 7
    if sequence:
        ds.ReferencedImageSequence = undefined_length_sequence()
        ds["ReferencedImageSequence"].is_undefined_length = True
        # a defined-length sequence beside it
        code = Dataset()
        code.CodeValue = "T1"
        code.CodingSchemeDesignator = "99X"
        ds.ProcedureCodeSequence = Sequence([code])
    if pixels == "native":
        ds.Rows, ds.Columns, ds.BitsAllocated = 4, 4, 16
        ds.PixelData = bytes(range(32))
        ds["PixelData"].VR = "OW"
    elif pixels == "encapsulated":
        ds.PixelData = encapsulate([b"\x01" * 10, b"\x02" * 20, b"\x03" * 6])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return ds


def expected_values() -> dict[int, bytes]:
    return {STUDY: STUDY_UID.encode() + b"\x00", SERIES: SERIES_UID.encode() + b"\x00",
            SOP: SOP_UID.encode() + b"\x00", PATIENT: b"PAT0001 "}


def top_level_boundaries(ds: Dataset, implicit: bool, little: bool = True) -> set[int]:
    """Byte offsets where a top-level element ends (and 0 is not one: empty is Truncated)."""
    tags = sorted(ds.keys())
    ends = set()
    for k in range(1, len(tags) + 1):
        sub = Dataset()
        for tag in tags[:k]:
            sub.add(ds[tag])
        ends.add(len(encode(sub, implicit, little)))
    return ends


def offset_of(data: bytes, tag: int, little: bool = True) -> int:
    """Where the element header of `tag` starts (first occurrence)."""
    t = Tag(tag)
    needle = struct.pack("<HH" if little else ">HH", t.group, t.element)
    pos = data.find(needle)
    assert pos >= 0
    return pos


# ---------------------------------------------------------------- complete data sets

@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("pixels", [None, "native", "encapsulated"])
def test_complete_little_endian(implicit, pixels):
    data = encode(make_dataset(pixels=pixels), implicit)
    assert scan(data, implicit, True, WANTED) == expected_values()


def test_complete_explicit_big_endian():
    data = encode(make_dataset(pixels="native"), implicit=False, little=False)
    assert scan(data, False, False, WANTED) == expected_values()


def test_only_wanted_top_level_tags_are_returned():
    data = encode(make_dataset(), implicit=False)
    assert scan(data, False, True, frozenset({STUDY})) == {STUDY: STUDY_UID.encode() + b"\x00"}
    assert scan(data, False, True, frozenset()) == {}
    # ReferencedSOPInstanceUID only occurs inside sequence items: not a top-level value
    assert scan(data, False, True, frozenset({0x00081155})) == {}


def test_missing_wanted_tag_is_absent():
    ds = make_dataset(sequence=False)
    del ds.SeriesInstanceUID
    found = scan(encode(ds, False), False, True, WANTED)
    assert SERIES not in found and found[STUDY] == STUDY_UID.encode() + b"\x00"


@pytest.mark.parametrize("pixels", [None, "native", "encapsulated"])
def test_implicit_vr_under_explicit_transfer_syntax(pixels):
    data = encode(make_dataset(pixels=pixels), implicit=True)
    assert scan(data, False, True, WANTED) == expected_values()


# ---------------------------------------------------------------- truncation

def test_empty_is_truncated():
    with pytest.raises(Truncated):
        scan(b"", False, True, WANTED)
    with pytest.raises(Truncated):
        scan(b"", True, True, WANTED)


def test_truncated_is_malformed():
    assert issubclass(Truncated, Malformed) and issubclass(Malformed, ValueError)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_cut_inside_an_element_value(implicit):
    data = encode(make_dataset(sequence=False), implicit)
    start = offset_of(data, STUDY)
    for cut in (start + 3, start + 8, start + 12, start + 14):
        with pytest.raises(Truncated):
            scan(data[:cut], implicit, True, WANTED)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_cut_inside_an_undefined_length_sequence_item(implicit):
    data = encode(make_dataset(), implicit)
    start = offset_of(data, 0x00081140)  # ReferencedImageSequence
    item_end = data.find(struct.pack("<HHI", 0xFFFE, 0xE00D, 0), start)
    seq_end = data.find(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), start)
    assert start < item_end < seq_end
    # inside the first item, right after the item end, right before the sequence end
    for cut in (item_end - 5, item_end - 1, item_end, item_end + 8, seq_end, seq_end + 4):
        with pytest.raises(Truncated):
            scan(data[:cut], implicit, True, WANTED)
    assert scan(data[:seq_end + 8], implicit, True, WANTED)[SOP] == SOP_UID.encode() + b"\x00"


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_cut_inside_encapsulated_pixel_data(implicit):
    data = encode(make_dataset(sequence=False, pixels="encapsulated"), implicit)
    start = offset_of(data, 0x7FE00010)
    for cut in range(start + 1, len(data)):
        with pytest.raises(Truncated):
            scan(data[:cut], implicit, True, WANTED)
    assert scan(data, implicit, True, WANTED) == expected_values()


def test_cut_inside_native_pixel_data():
    data = encode(make_dataset(sequence=False, pixels="native"), implicit=False)
    with pytest.raises(Truncated):
        scan(data[:-1], False, True, WANTED)


@pytest.mark.parametrize("pixels", [None, "encapsulated"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_every_cut_is_truncated_except_at_element_boundaries(implicit, pixels):
    """A cut exactly at a top-level element boundary looks like a shorter complete data set
    and is accepted; every other prefix raises Truncated."""
    ds = make_dataset(pixels=pixels)
    data = encode(ds, implicit)
    boundaries = top_level_boundaries(ds, implicit)
    assert len(data) in boundaries and len(boundaries) == len(ds.keys())
    accepted = set()
    for cut in range(0, len(data) + 1):
        try:
            found = scan(data[:cut], implicit, True, WANTED)
        except Truncated:
            continue
        assert found is not None
        accepted.add(cut)
    assert accepted == boundaries


def test_every_cut_of_implicit_data_under_explicit_syntax():
    ds = make_dataset()
    data = encode(ds, implicit=True)
    boundaries = top_level_boundaries(ds, implicit=True)
    accepted = set()
    for cut in range(0, len(data) + 1):
        try:
            scan(data[:cut], False, True, WANTED)
        except Truncated:
            continue
        accepted.add(cut)
    assert accepted == boundaries


def test_every_cut_big_endian():
    ds = make_dataset(pixels="native")
    data = encode(ds, implicit=False, little=False)
    boundaries = top_level_boundaries(ds, implicit=False, little=False)
    accepted = set()
    for cut in range(0, len(data) + 1):
        try:
            scan(data[:cut], False, False, WANTED)
        except Truncated:
            continue
        accepted.add(cut)
    assert accepted == boundaries


def test_declared_length_beyond_the_end():
    """A length field larger than what follows (e.g. a sender that lied) is Truncated."""
    value = b"1.2.3\x00"
    data = struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", len(value) + 100) + value
    with pytest.raises(Truncated, match=r"\(0020,000D\)"):
        scan(data, False, True, WANTED)


# ---------------------------------------------------------------- not structure

def test_stray_delimiter_at_top_level_is_not_accepted():
    """An item delimiter outside any item is not a complete data set: scan refuses it
    (Malformed, or Truncated from the implicit-VR retry) or returns None for pydicom."""
    data = encode(make_dataset(sequence=False), implicit=False)
    bad = data + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    try:
        result = scan(bad, False, True, WANTED)
    except Malformed:
        result = None
    assert result is None


# ---------------------------------------------------------------- inside sequences (issue 12)
# Hand-encoded explicit VR little endian, so that each length can be made to lie.

def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def item(content: bytes, defined: bool = True) -> bytes:
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    return (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))


def sequence(group: int, elem: int, items: bytes, defined: bool = True) -> bytes:
    if defined:
        return el(group, elem, b"SQ", items)
    return (struct.pack("<HH2sHI", group, elem, b"SQ", 0, 0xFFFFFFFF) + items
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


CODE = el(0x0008, 0x0100, b"SH", b"T1") + el(0x0008, 0x0102, b"SH", b"99X ")
HEAD = el(0x0008, 0x0018, b"UI", SOP_UID.encode() + b"\x00")
TAIL = el(0x0020, 0x000D, b"UI", STUDY_UID.encode() + b"\x00")


def with_sequence(seq: bytes) -> bytes:
    """SOPInstanceUID, the sequence (as ProcedureCodeSequence, 0008,1032), StudyInstanceUID."""
    return HEAD + seq + TAIL


@pytest.mark.parametrize("defined_items", [True, False], ids=["items-defined", "items-undefined"])
@pytest.mark.parametrize("defined_seq", [True, False], ids=["seq-defined", "seq-undefined"])
def test_well_formed_sequences_of_every_length_kind(defined_seq, defined_items):
    inner = sequence(0x0040, 0xA043, item(CODE, defined_items), defined_seq)  # nested
    items = item(CODE, defined_items) + item(CODE + inner, defined_items)
    data = with_sequence(sequence(0x0008, 0x1032, items, defined_seq))
    assert scan(data, False, True, WANTED) == {SOP: SOP_UID.encode() + b"\x00",
                                                STUDY: STUDY_UID.encode() + b"\x00"}


def test_item_longer_than_its_defined_length_sequence():
    """An item declaring 968 bytes where only 703 remain in its sequence (the data set
    goes on after it) was skipped over with the sequence and stored."""
    body = CODE + el(0x0008, 0x0104, b"LO", b"x" * (703 - len(CODE) - 8))
    seq = el(0x0008, 0x1032, b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, 968) + body)
    data = with_sequence(seq) + el(0x0020, 0x000E, b"UI", b"1.2" + b"4" * 1000)
    with pytest.raises(Invalid, match="needs 968 bytes, but only 703 remain"):
        scan(data, False, True, WANTED)


def test_element_longer_than_its_defined_length_item():
    bad = CODE[:-6] + struct.pack("<H", 40) + CODE[-4:]  # (0008,0102) claims 40 bytes
    data = with_sequence(sequence(0x0008, 0x1032, item(bad) + item(CODE)))
    with pytest.raises(Invalid, match=r"value of \(0008,0102\)"):
        scan(data, False, True, WANTED)


def test_data_set_cut_inside_a_nested_item_is_truncated():
    inner = sequence(0x0040, 0xA043, item(CODE, False), defined=False)
    data = with_sequence(sequence(0x0008, 0x1032, item(CODE + inner, False), defined=False))
    cut = data.find(b"99X", data.find(b"\x40\x00\x43\xa0"))
    with pytest.raises(Truncated):
        scan(data[:cut], False, True, WANTED)


def test_undelimited_item_inside_a_defined_length_sequence():
    undelimited = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + CODE
    data = with_sequence(el(0x0008, 0x1032, b"SQ", undelimited))
    with pytest.raises(Invalid, match="item delimiter"):
        scan(data, False, True, WANTED)


def test_sequence_in_implicit_vr_is_walked_by_the_dictionary():
    ds = make_dataset(sequence=True)
    data = bytearray(encode(ds, implicit=True))
    # ProcedureCodeSequence (0008,1032) has a defined length; make its one item claim more
    at = offset_of(bytes(data), 0x00081032) + 8
    assert struct.unpack_from("<HH", data, at) == (0xFFFE, 0xE000)
    struct.pack_into("<I", data, at + 4, struct.unpack_from("<I", data, at + 4)[0] + 2)
    with pytest.raises(Malformed):
        scan(bytes(data), True, True, WANTED)


def test_un_of_undefined_length_holds_implicit_vr_items():
    implicit_code = struct.pack("<HHI", 0x0008, 0x0100, 2) + b"T1"
    un = (struct.pack("<HH2sHI", 0x0008, 0x1032, b"UN", 0, 0xFFFFFFFF) + item(implicit_code)
          + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    assert scan(with_sequence(un), False, True, WANTED)[STUDY] == STUDY_UID.encode() + b"\x00"


@pytest.mark.parametrize("where", ["top", "item"])
def test_repeated_and_unordered_tags_are_invalid(where):
    twice = CODE + el(0x0008, 0x0102, b"SH", b"99X ")
    swapped = el(0x0008, 0x0102, b"SH", b"99X ") + el(0x0008, 0x0100, b"SH", b"T1")
    for content, word in ((twice, "repeats"), (swapped, "comes after")):
        if where == "top":
            data = HEAD + TAIL + (TAIL if word == "repeats" else HEAD)
        else:
            data = with_sequence(sequence(0x0008, 0x1032, item(content)))
        with pytest.raises(Invalid, match=word):
            scan(data, False, True, WANTED)


def test_each_item_orders_its_own_tags():
    """The same tags in two items, and item tags below the sequence's own tag, are fine."""
    data = with_sequence(sequence(0x0008, 0x1032, item(CODE) + item(CODE), defined=False))
    assert scan(data, False, True, WANTED)[SOP] == SOP_UID.encode() + b"\x00"
