"""A structural check of an encoded data set: every element's declared length fits.

pydicom reads a truncated value silently as a shorter one, so a file cut off in the middle of
its pixel data would be filed as if it were whole. This walk follows the element headers (and
the items of undefined-length sequences and encapsulated pixel data) to the last byte without
decoding any value; it costs microseconds per object.
"""

from __future__ import annotations

import struct

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD


class Malformed(ValueError):
    """The bytes do not form a well-structured data set; the text says where."""


class Truncated(Malformed):
    """The data set ends before an element, item or sequence it has begun."""


class _Walker:
    def __init__(self, data: bytes, implicit: bool, little: bool, wanted: frozenset[int]):
        self.data = data
        self.implicit = implicit
        self.e = "<" if little else ">"
        self.n = len(data)
        self.wanted = wanted
        self.found: dict[int, bytes] = {}

    def _need(self, pos: int, size: int, what: str) -> None:
        if pos + size > self.n:
            raise Truncated(f"data set is truncated: {what} at byte {pos} needs {size} bytes, "
                            f"{self.n - pos} remain")

    def dataset(self, pos: int, in_item: bool) -> int:
        """Walk elements from `pos`; inside an undefined-length item, stop after its end."""
        while pos < self.n:
            self._need(pos, 8, "element header")
            group, elem = struct.unpack_from(self.e + "HH", self.data, pos)
            if group == 0xFFFE:
                if elem == ITEM_END and in_item:
                    return pos + 8
                raise Malformed(f"unexpected delimiter (FFFE,{elem:04X}) at byte {pos}")
            if self.implicit:
                length = struct.unpack_from(self.e + "I", self.data, pos + 4)[0]
                pos += 8
            else:
                vr = self.data[pos + 4:pos + 6]
                if vr in _LONG_VRS:
                    self._need(pos, 12, f"header of ({group:04X},{elem:04X})")
                    length = struct.unpack_from(self.e + "I", self.data, pos + 8)[0]
                    pos += 12
                elif vr.isalpha() and vr.isupper():
                    length = struct.unpack_from(self.e + "H", self.data, pos + 6)[0]
                    pos += 8
                else:
                    raise Malformed(f"element ({group:04X},{elem:04X}) at byte {pos} has no "
                                    f"valid VR ({vr!r})")
            if length == UNDEFINED:
                pos = self.items(pos)
            else:
                self._need(pos, length, f"value of ({group:04X},{elem:04X})")
                tag = group << 16 | elem
                if not in_item and tag in self.wanted:
                    self.found[tag] = self.data[pos:pos + length]
                pos += length
        if in_item:
            raise Truncated("data set is truncated inside a sequence item")
        return pos

    def items(self, pos: int) -> int:
        """Items of an undefined-length sequence or pixel data, up to the sequence end."""
        while True:
            self._need(pos, 8, "item header")
            group, elem = struct.unpack_from(self.e + "HH", self.data, pos)
            length = struct.unpack_from(self.e + "I", self.data, pos + 4)[0]
            pos += 8
            if group != 0xFFFE:
                raise Malformed(f"expected an item at byte {pos - 8}, found "
                                f"({group:04X},{elem:04X})")
            if elem == SEQUENCE_END:
                return pos
            if elem != ITEM:
                raise Malformed(f"unexpected (FFFE,{elem:04X}) at byte {pos - 8}")
            if length == UNDEFINED:
                pos = self.dataset(pos, in_item=True)
            else:
                self._need(pos, length, "item value")
                pos += length


def scan(data: bytes, implicit: bool, little: bool, wanted: frozenset[int]
         ) -> dict[int, bytes] | None:
    """Check that `data` is complete and return the raw values of the `wanted` top-level tags.

    Raises Truncated if the data set ends inside an element, item or sequence. Some devices
    write implicit VR under an explicit transfer syntax (pydicom detects and reads that), so a
    walk that fails on structure is tried again with the other VR encoding; where neither walk
    reaches the end for a reason other than truncation, None is returned and the caller lets
    pydicom judge the data set rather than refusing it here."""
    if not data:
        raise Truncated("the data set is empty")
    walker = _Walker(data, implicit, little, wanted)
    try:
        walker.dataset(0, in_item=False)
        return walker.found
    except Truncated:
        raise
    except Malformed as exc:
        first = exc
    walker = _Walker(data, not implicit, little, wanted)
    try:
        walker.dataset(0, in_item=False)
        return walker.found
    except Truncated as exc:  # refuse rather than file an object that may be incomplete
        declared = "implicit" if implicit else "explicit"
        raise Truncated(f"as {declared} VR: {first}; as the other VR: {exc}") from None
    except Malformed:
        return None
