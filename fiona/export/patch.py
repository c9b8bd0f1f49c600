"""An export profile's edits made on the bytes of a DICOM file, without decoding and encoding
the rest of it.

An export from a folder destination hands out files that are valid Part-10 files already, and
a profile changes a few top-level elements of each (the default one removes the emptied patient
sex and birth date). Decoding every element with pydicom and encoding it again cost more than
the rest of such an export; here the file is walked once, element by element with the values
left raw, each edited element is encoded on its own by pydicom and spliced in, and every other
byte is copied as it was. Where that is not plainly safe (no Part-10 header, a deflated or
big-endian transfer syntax, group length elements that would go stale, elements out of order, a
sequence, a value that is not ASCII or that pydicom cannot encode), `patch` returns None and the
caller decodes and writes the whole data set as before. Both ways give the same data set
(tests/test_export.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import UID

from .profile import REMOVE, Edit

_PREAMBLE = 128


@dataclass(frozen=True)
class Parsed:
    """A Part-10 file's bytes, its data set (values still raw) and where each top-level
    element of the data set is in the bytes."""

    data: bytes
    dataset: Dataset
    spans: dict[int, tuple[int, int]]   # tag -> (start, end), in file order
    implicit: bool


def parse(data: bytes) -> Parsed | None:
    """`data` walked once; None when it is not a Part-10 file this module can edit."""
    if data[_PREAMBLE:_PREAMBLE + 4] != b"DICM":
        return None
    fp = BytesIO(data)
    fp.seek(_PREAMBLE + 4)
    meta = read_dataset(fp, False, True, stop_when=lambda tag, _vr, _len: tag.group != 2)
    syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    if not syntax.is_transfer_syntax or syntax.is_deflated or not syntax.is_little_endian:
        return None
    implicit = syntax.is_implicit_VR
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    spans: dict[int, tuple[int, int]] = {}
    start = fp.tell()
    for elem in data_element_generator(fp, implicit, True):
        end = fp.tell()
        tag = int(elem.tag)
        if tag & 0xFFFF == 0 or (spans and tag <= next(reversed(spans))):
            return None  # a group length would go stale; elements out of order
        elements[elem.tag], spans[tag] = elem, (start, end)
        start = end
    dataset = Dataset(elements)
    encoding: str | list[str] = "iso8859"
    if "SpecificCharacterSet" in dataset:
        encoding = convert_encodings(dataset.SpecificCharacterSet)
    dataset.set_original_encoding(implicit, True, encoding)
    dataset.file_meta = FileMetaDataset(meta)
    dataset.preamble = data[:_PREAMBLE]
    return Parsed(data, dataset, spans, implicit)


def patch(parsed: Parsed, edits: list[Edit]) -> bytes | None:
    """The file's bytes with `edits` made (the elements they remove cut out, the others
    encoded and put in their place or in tag order), or None when the caller must decode and
    write the data set instead."""
    changes = []
    for edit in edits:
        tag = tag_for_keyword(edit.keyword)
        if tag is None or tag >> 16 == 2:
            return None
        encoded = b"" if edit.value is REMOVE else _encode(parsed, tag, edit.value)
        if encoded is None:
            return None
        changes.append((tag, encoded))
    pieces, pos = [], 0
    for tag, encoded in sorted(changes):
        if tag in parsed.spans:
            start, end = parsed.spans[tag]
        else:  # a new element: before the first one with a higher tag
            start = end = next((s for t, (s, _e) in parsed.spans.items() if t > tag),
                               len(parsed.data))
        pieces += [parsed.data[pos:start], encoded]
        pos = end
    pieces.append(parsed.data[pos:])
    return b"".join(pieces)


def _encode(parsed: Parsed, tag: int, value: object) -> bytes | None:
    """One element as the file encodes it, or None."""
    if value is not None and not (isinstance(value, str) and value.isascii()):
        return None
    try:
        vr = parsed.dataset[tag].VR if tag in parsed.dataset else dictionary_VR(tag)
        if vr == "SQ" or " or " in vr:
            return None
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, parsed.implicit
        write_data_element(fp, DataElement(tag, vr, value))
    except Exception:  # whatever pydicom cannot encode goes the slow way, which reports it
        return None
    return fp.getvalue()
