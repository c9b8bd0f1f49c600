"""A structural check of an encoded data set: every element's declared length fits.

pydicom reads a truncated value silently as a shorter one, so a file cut off in the middle of
its pixel data would be filed as if it were whole. This walk follows the element headers to
the last byte without decoding any value: into every sequence (defined or undefined length),
each of its items (defined or undefined length) and the fragments of encapsulated pixel data.
Every value must fit the data set, sequence or item that holds it, and within each data set or
item the tags must ascend (a tag repeated or out of order is refused). It costs microseconds
per object; bench/ingest.py measures the receiver with it.
"""

from __future__ import annotations

import struct

from pydicom.datadict import DicomDictionary

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
PIXEL_DATA = 0x7FE00010
#: implicit VR does not say which values are sequences; the data dictionary does
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


class Malformed(ValueError):
    """The bytes do not form a well-structured data set; the text says where."""


class Invalid(Malformed):
    """The walk followed the encoding and found what the standard forbids: a value longer
    than the sequence or item that holds it, a tag repeated or out of ascending order."""


class Truncated(Invalid):
    """The data set ends before an element, item or sequence it has begun."""


class _Walker:
    def __init__(self, data: bytes | bytearray, little: bool, wanted: frozenset[int]):
        self.data = data
        self.n = len(data)
        self.wanted = wanted
        self.found: dict[int, bytes] = {}
        e = "<" if little else ">"
        self.tag = struct.Struct(e + "HH").unpack_from
        self.u16 = struct.Struct(e + "H").unpack_from
        self.u32 = struct.Struct(e + "I").unpack_from
        self.header = struct.Struct(e + "HHI").unpack_from

    def _short(self, pos: int, size: int, end: int, what: str) -> None:
        """Raise for `size` bytes at `pos` that do not fit before `end`."""
        if pos + size > self.n:
            raise Truncated(f"data set is truncated: {what} at byte {pos} needs {size} bytes, "
                            f"{self.n - pos} remain")
        raise Invalid(f"{what} at byte {pos} needs {size} bytes, but only {end - pos} remain "
                      f"in the sequence or item that holds it")

    def dataset(self, pos: int, end: int, implicit: bool, delimited: bool, top: bool) -> int:
        """Walk the elements from `pos` to `end`; a `delimited` (undefined-length) item ends
        after its item delimiter instead. Returns where the walk ended."""
        data, tag_at, u32 = self.data, self.tag, self.u32
        last = -1
        while pos < end:
            if pos + 8 > end:
                self._short(pos, 8, end, "element header")
            group, elem = tag_at(data, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if elem == ITEM_END and delimited:
                    return pos + 8
                raise Malformed(f"unexpected delimiter (FFFE,{elem:04X}) at byte {pos}")
            if tag <= last:
                raise Invalid(f"({group:04X},{elem:04X}) at byte {pos} "
                              f"{'repeats' if tag == last else 'comes after'} "
                              f"({last >> 16:04X},{last & 0xFFFF:04X}): tags must ascend")
            last = tag
            if implicit:
                length = u32(data, pos + 4)[0]
                pos += 8
                sequence = tag in _SQ_TAGS or (length == UNDEFINED and tag != PIXEL_DATA)
            else:
                vr = bytes(data[pos + 4:pos + 6])  # hashable when data is a bytearray
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        self._short(pos, 12, end, f"header of ({group:04X},{elem:04X})")
                    length = u32(data, pos + 8)[0]
                    pos += 12
                elif vr.isalpha() and vr.isupper():
                    length = self.u16(data, pos + 6)[0]
                    pos += 8
                else:
                    raise Malformed(f"element ({group:04X},{elem:04X}) at byte {pos} has no "
                                    f"valid VR ({vr!r})")
                sequence = vr == b"SQ"
            if length == UNDEFINED:
                if sequence:
                    pos = self.items(pos, end, implicit, defined=False)
                elif not implicit and vr == b"UN":  # PS3.5 6.2.2: its items are implicit VR
                    pos = self.items(pos, end, True, defined=False)
                else:
                    pos = self.fragments(pos, end)
            else:
                if pos + length > end:
                    self._short(pos, length, end, f"value of ({group:04X},{elem:04X})")
                if sequence:
                    self.items(pos, pos + length, implicit, defined=True)
                elif top and tag in self.wanted:
                    self.found[tag] = bytes(data[pos:pos + length])
                pos += length
        if delimited:
            self._short(pos, 8, end, "item delimiter")
        return pos

    def items(self, pos: int, end: int, implicit: bool, defined: bool) -> int:
        """The items of a sequence: up to `end` if it has a `defined` length, else up to its
        sequence delimiter (before `end`). Each item is walked as a data set."""
        data, header = self.data, self.header
        while not defined or pos < end:
            if pos + 8 > end:
                self._short(pos, 8, end, "item header")
            group, elem, length = header(data, pos)
            if group != 0xFFFE:
                raise Malformed(f"expected an item at byte {pos}, found ({group:04X},{elem:04X})")
            pos += 8
            if elem == SEQUENCE_END and not defined:
                return pos
            if elem != ITEM:
                raise Malformed(f"unexpected (FFFE,{elem:04X}) at byte {pos - 8}")
            if length == UNDEFINED:
                pos = self.dataset(pos, end, implicit, delimited=True, top=False)
            else:
                if pos + length > end:
                    self._short(pos, length, end, "item value")
                self.dataset(pos, pos + length, implicit, delimited=False, top=False)
                pos += length
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated pixel data: defined-length items of raw bytes up to the delimiter."""
        data, header = self.data, self.header
        while True:
            if pos + 8 > end:
                self._short(pos, 8, end, "item header")
            group, elem, length = header(data, pos)
            pos += 8
            if group != 0xFFFE:
                raise Malformed(f"expected an item at byte {pos - 8}, found "
                                f"({group:04X},{elem:04X})")
            if elem == SEQUENCE_END:
                return pos
            if elem != ITEM or length == UNDEFINED:
                raise Malformed(f"unexpected (FFFE,{elem:04X}) of length {length:#x} at byte "
                                f"{pos - 8} in encapsulated data")
            if pos + length > end:
                self._short(pos, length, end, "fragment")
            pos += length


def _walk(data: bytes | bytearray, implicit: bool, little: bool, wanted: frozenset[int]
          ) -> dict[int, bytes]:
    walker = _Walker(data, little, wanted)
    walker.dataset(0, len(data), implicit, delimited=False, top=True)
    return walker.found


def scan(data: bytes | bytearray, implicit: bool, little: bool, wanted: frozenset[int]
         ) -> dict[int, bytes] | None:
    """Check that `data` is complete and return the raw values of the `wanted` top-level tags.

    Raises Truncated if the data set ends inside an element, item or sequence, and Invalid if
    a value overruns its sequence or item or tags do not ascend. Some devices write implicit
    VR under an explicit transfer syntax (pydicom detects and reads that), so a walk that
    cannot follow the encoding is tried again with the other VR encoding; where neither walk
    can, None is returned and the caller lets pydicom judge the data set rather than refusing
    it here."""
    if not data:
        raise Truncated("the data set is empty")
    try:
        return _walk(data, implicit, little, wanted)
    except Invalid:
        raise
    except Malformed as exc:
        first = exc
    try:
        return _walk(data, not implicit, little, wanted)
    except Invalid as exc:  # refuse rather than file an object that may be incomplete
        declared = "implicit" if implicit else "explicit"
        raise type(exc)(f"as {declared} VR: {first}; as the other VR: {exc}") from None
    except Malformed:
        return None
