"""The verification gate: nothing leaves FIONA while it still holds an identifying value of its
source (SPEC §7 step 4).

The identifying values of the source are collected before de-identification by
`fiona.deid.identifiers.Identifiers.from_dataset(source)` (names and name parts, IDs, accession
number, specimen and container identifiers, institution, address, telephone numbers, birth date,
original instance UIDs).

`check(ds_out, encoded, ids, allowed)` raises `GateError` when one of them is found in the
de-identified output:

- The encoded file (`encoded`, the exact bytes that would leave) is searched first, case
  insensitively, for every identifier in the encodings that can carry it (UTF-8, Latin-1, the
  source's character sets). Any hit, and any source identifier that is not plain ASCII, leads to
  a search of every element at every depth (file meta, sequences, text, person names, UIDs,
  binary values) of `ds_out`, so the error names the element, e.g. "(0010,0010) PatientName" or
  "ReferencedStudySequence[0].(0008,1155) ReferencedSOPInstanceUID". A hit in the bytes that no
  element explains is reported as "raw bytes at offset N".
- A match must stand on its own: the characters around it must not continue it (a name part
  "Ann" does not match inside "Annotation", an ID "123" not inside "41234"; a UID not inside a
  longer UID), but a digit may follow a letter ("DOE123" matches "Doe").
- Identifiers shorter than 3 characters are ignored. Native pixel data (image samples) is not
  searched: text in it is burned-in text, the masking stage's job, and a 3-letter name occurs
  by chance in megabytes of samples. Encapsulated (compressed) pixel data, which can carry text
  in JPEG comments and the like, is searched for identifiers of 6 or more characters (the
  whole-name forms of shorter name parts included). Dates (the birth date) and IDs
  of fewer than 6 digits are searched in element values only, never alone in the raw bytes
  (they occur by chance in binary data and as numbers), and never in numeric (IS, DS) values.
- A name part found only in code strings (CS: defined terms such as ImageType "NORM") does not
  count: CS holds no free text, and a patient called Norm must not stop every Siemens series.
- Values that are legitimately present are passed in `allowed` (e.g. the participant ID when it
  equals the source PatientID under routing): an identifier equal to an allowed value is not
  searched, an element whose whole value is allowed is skipped, and a hit inside an occurrence
  of an allowed value does not count. The texts FIONA itself writes as markers (code meanings,
  the DeidentificationMethod header, the shipped profiles' names, YES/MODIFIED, dummy values,
  the implementation version name) are always allowed, so a patient called Fiona is no hit.
- Neither the error message nor `GateError.value` carries the identifying value itself (it
  would end up in logs and REDCap): `value` says which source identifier was found.
"""

from __future__ import annotations

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from .engine import _DUMMY_TEXT, FIONA_VERSION, method_prefix, profile_names
from .identifiers import Identifiers, Needle, values_of
from .table import BASIC_PROFILE, STANDARD_OPTIONS, default_table

PIXEL_MIN_LEN = 6

_PIXEL_TAGS = (BaseTag(0x7FE00010), BaseTag(0x7FE00008), BaseTag(0x7FE00009))
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_NUMERIC_TEXT = frozenset({"DS", "IS"})


def _authored() -> frozenset[str]:
    """The texts FIONA writes itself (markers, dummies, the shipped profiles' names): always
    allowed, whatever the caller passes."""
    out = {m for _c, m in STANDARD_OPTIONS.values()} | {BASIC_PROFILE[1]} | \
        {"YES", "MODIFIED", "UNMODIFIED", "REMOVED", "DCM"} | set(_DUMMY_TEXT.values()) | \
        {f"FIONA_{FIONA_VERSION}"[:16]}
    try:
        out.add(method_prefix(default_table().edition))
    except Exception:  # no table: the engine cannot run either
        pass
    for name in profile_names():
        out.add(f"FIONA profile {name}"[:64])
    return frozenset(v.casefold() for v in out)


AUTHORED = _authored()


class GateError(Exception):
    """An identifying value of the source is in the output. `path` names the element (or "raw
    bytes at offset N"); `value` names the source identifier found, never its text."""

    def __init__(self, path: str, value: str):
        self.path = path
        self.value = value
        super().__init__(f"identifying value ({value}) found in {path}")



def _ccls(ch: str) -> str | None:
    if ch.isdigit():
        return "d"
    if ch.isalpha():
        return "a"
    return None


def _bcls(b: int) -> str | None:
    if 48 <= b <= 57:
        return "d"
    if 97 <= b <= 122 or 65 <= b <= 90 or b >= 128:
        return "a"
    return None


# --- searching ---------------------------------------------------------------------------------
def _find_str(hay: str, needle: str, cls: str, start: int = 0) -> int:
    n = len(needle)
    if cls == "uid":
        while True:
            i = hay.find(needle, start)
            if i < 0:
                return -1
            before = hay[i - 1] if i else ""
            after = hay[i + n] if i + n < len(hay) else ""
            if not (before and (before.isdigit() or before == ".")) and \
                    not (after and (after.isdigit() or after == ".")):
                return i
            start = i + 1
    first, last = _ccls(needle[0]), _ccls(needle[-1])
    while True:
        i = hay.find(needle, start)
        if i < 0:
            return -1
        ok = True
        if first and i and _ccls(hay[i - 1]) == first:
            ok = False
        if ok and last and i + n < len(hay) and _ccls(hay[i + n]) == last:
            ok = False
        if ok:
            return i
        start = i + 1


def _bounded_bytes(low: bytes, i: int, n: int, needle: bytes, cls: str) -> bool:
    if cls == "uid":
        if i and (48 <= low[i - 1] <= 57 or low[i - 1] == 46):
            return False
        j = i + n
        return not (j < len(low) and (48 <= low[j] <= 57 or low[j] == 46))
    first, last = _bcls(needle[0]), _bcls(needle[-1])
    if first and i and _bcls(low[i - 1]) == first:
        return False
    j = i + n
    if last and j < len(low) and _bcls(low[j]) == last:
        return False
    return True


def _covered(low: bytes, i: int, n: int, allowed: list[bytes]) -> bool:
    """Is [i, i+n) inside an occurrence of an allowed value?"""
    for a in allowed:
        la = len(a)
        if la < n:
            continue
        s = low.find(a, max(0, i + n - la), i + la)
        while 0 <= s <= i:
            if s + la >= i + n:
                return True
            s = low.find(a, s + 1, i + la)
    return False


def _find_bytes(low: bytes, needle: bytes, cls: str, skip: tuple[int, int] | None,
                allowed: list[bytes]) -> int:
    return _find_bytes_from(low, needle, cls, skip, allowed, 0)


def _find_bytes_from(low: bytes, needle: bytes, cls: str, skip: tuple[int, int] | None,
                     allowed: list[bytes], start: int) -> int:
    """The first occurrence of `needle` at or after `start` that stands on its own, lies
    outside `skip` and is not part of an allowed value; -1 if none."""
    n = len(needle)
    while True:
        i = low.find(needle, start)
        if i < 0:
            return -1
        start = i + 1
        if skip and skip[0] <= i < skip[1]:
            start = skip[1]
            continue
        if _bounded_bytes(low, i, n, needle, cls) and not _covered(low, i, n, allowed):
            return i


def _is_encapsulated(value: bytes | bytearray) -> bool:
    return value[:4] in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")


def _pixel_region(ds: Dataset, encoded: bytes) -> tuple[int, int, bool] | None:
    """(start, end, encapsulated) of the pixel data value in `encoded`, if there is one."""
    for t in _PIXEL_TAGS:
        elem = ds._dict.get(t)
        if elem is None:
            continue
        value = elem.value
        if not isinstance(value, (bytes, bytearray)) or len(value) < 64:
            continue
        n = len(value)
        end = len(encoded)
        for e in (end, end - 1):
            if e >= n and encoded[e - n:e] == value:
                return e - n, e, _is_encapsulated(value)
        i = encoded.find(value)
        if i >= 0:
            return i, i + n, _is_encapsulated(value)
    return None


def _segments(ds: Dataset, encoded: bytes) -> list[tuple[bytes, int, bool]]:
    """The lowered parts of `encoded` to search: (bytes, offset, is pixel data). Native pixel
    data is image samples, not text, and is not searched (burned-in text is the masking
    stage's job); encapsulated (compressed) pixel data can carry text in JPEG comments and
    similar, and is searched for identifiers of PIXEL_MIN_LEN or more characters."""
    region = _pixel_region(ds, encoded)
    if region is None:
        return [(encoded.lower(), 0, False)]
    start, end, encapsulated = region
    out = [(encoded[:start].lower(), 0, False), (encoded[end:].lower(), end, False)]
    if encapsulated:
        out.append((encoded[start:end].lower(), start, True))
    return out


def check(ds_out: Dataset, encoded: bytes, ids: Identifiers,
          allowed: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise GateError if an identifier of the source is in `ds_out` or `encoded` (see the
    module doc)."""
    allowed_cf = {a.strip().casefold() for a in allowed if a and a.strip()} | AUTHORED
    needles = [n for n in ids.needles if n.text not in allowed_cf]
    if not needles:
        return
    allowed_raw = _allowed_raw(frozenset(allowed_cf), tuple(ids.encodings))
    segments = _segments(ds_out, encoded)
    hits: list[tuple[int, Needle]] = []
    for nd in needles:
        short = len(nd.text) < PIXEL_MIN_LEN
        found = -1
        for seg, offset, pixel in segments:
            if pixel and short:
                continue
            for raw in nd.raw:
                i = _find_bytes(seg, raw, nd.cls, None, allowed_raw)
                if i >= 0:
                    found = offset + i
                    break
            if found >= 0:
                hits.append((found, nd))
                break
    if not hits and not ids.non_ascii:
        return
    exempt: dict[Needle, int] = {}
    _check_elements(ds_out, needles, allowed_cf, allowed_raw, ids.encodings, exempt)
    for i, nd in sorted(hits, key=lambda h: h[0]):
        if nd.trigger_only:
            continue
        if nd in exempt:    # a name part that occurs only as a code string (e.g. "NORM")
            count = max(sum(_count_bytes(seg, raw, nd.cls, None, allowed_raw)
                            for seg, _o, pixel in segments if not (pixel and len(nd.text) <
                                                                   PIXEL_MIN_LEN))
                        for raw in nd.raw)
            if count <= exempt[nd]:
                continue
        raise GateError(f"raw bytes at offset {i}", nd.kind)


_ALLOWED_RAW: dict[tuple, list[bytes]] = {}


def _allowed_raw(allowed_cf: frozenset[str], encodings: tuple[str, ...]) -> list[bytes]:
    key = (allowed_cf, encodings)
    out = _ALLOWED_RAW.get(key)
    if out is None:
        out = []
        for a in sorted(allowed_cf):
            for enc in encodings:
                try:
                    b = a.encode(enc).lower()
                except (UnicodeError, LookupError):
                    continue
                if b not in out:
                    out.append(b)
        if len(_ALLOWED_RAW) > 256:
            _ALLOWED_RAW.clear()
        _ALLOWED_RAW[key] = out
    return out


def _count_bytes(low: bytes, needle: bytes, cls: str, skip: tuple[int, int] | None,
                 allowed: list[bytes]) -> int:
    n, start = 0, 0
    while True:
        i = _find_bytes_from(low, needle, cls, skip, allowed, start)
        if i < 0:
            return n
        n += 1
        start = i + 1


def _name(tag: int) -> str:
    return keyword_for_tag(tag) if not (tag >> 16) & 1 else ""


def _leaf(tag: int) -> str:
    kw = _name(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {kw}" if kw else "")


def _check_elements(ds: Dataset, needles: list[Needle], allowed_cf: set[str],
                    allowed_raw: list[bytes], encodings: list[str], exempt: dict,
                    prefix: str = "") -> None:
    meta = getattr(ds, "file_meta", None)
    if not prefix and meta is not None:
        _check_elements(meta, needles, allowed_cf, allowed_raw, encodings, exempt, "file_meta.")
    for elem in ds:
        tag = int(elem.tag)
        vr = elem.VR
        if vr == "SQ":
            seq_name = _name(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            for i, item in enumerate(elem.value or ()):
                _check_elements(item, needles, allowed_cf, allowed_raw, encodings, exempt,
                                f"{prefix}{seq_name}[{i}].")
            continue
        value = elem.value
        if value is None or value == "" or value == b"":
            continue
        path = prefix + _leaf(tag)
        if isinstance(value, (bytes, bytearray)):
            if vr in _TEXT_VRS or vr in _NUMERIC_TEXT:
                value = bytes(value).decode("latin-1")
            else:
                _check_binary(bytes(value), tag, path, needles, allowed_raw)
                continue
        for v in values_of(value):
            text = str(v)
            cf = text.strip("\x00 ").casefold()
            if not cf or cf in allowed_cf:
                continue
            for nd in needles:
                if vr in _NUMERIC_TEXT and (nd.cls == "date" or nd.text.isdigit()):
                    continue
                if nd.cls == "uid":
                    hit = cf == nd.text if vr == "UI" else _find_str(cf, nd.text, "uid") >= 0
                elif nd.cls == "date" and vr == "DT":
                    hit = cf.startswith(nd.text)
                else:
                    hit = _find_str(cf, nd.text, nd.cls) >= 0
                if hit and not _covered_str(cf, nd.text, nd.cls, allowed_cf):
                    if vr == "CS" and nd.cls == "name":
                        # a code string (defined terms, 16 upper-case characters) is no place
                        # for a name: "NORM" in ImageType is not the patient Norm
                        exempt[nd] = exempt.get(nd, 0) + _count_str(cf, nd.text)
                        continue
                    raise GateError(path, nd.kind)


def _count_str(hay: str, needle: str) -> int:
    n, start = 0, 0
    while True:
        i = _find_str(hay, needle, "name", start)
        if i < 0:
            return n
        n += 1
        start = i + 1


def _covered_str(hay: str, needle: str, cls: str, allowed_cf: set[str]) -> bool:
    """Every bounded occurrence of `needle` in `hay` lies inside an allowed value."""
    low = hay.encode("utf-8", "replace")
    nb = needle.encode("utf-8", "replace")
    allowed = [a.encode("utf-8", "replace") for a in allowed_cf if len(a) >= len(needle)]
    start = 0
    while True:
        i = low.find(nb, start)
        if i < 0:
            return True
        start = i + 1
        if _bounded_bytes(low, i, len(nb), nb, cls) and not _covered(low, i, len(nb), allowed):
            return False


def _check_binary(value: bytes, tag: int, path: str, needles: list[Needle],
                  allowed_raw: list[bytes]) -> None:
    pixel = tag in _PIXEL_TAGS
    if pixel and not _is_encapsulated(value):
        return                         # image samples (see _segments)
    low = value.lower()
    for nd in needles:
        if nd.trigger_only or (pixel and len(nd.text) < PIXEL_MIN_LEN):
            continue
        for raw in nd.raw:
            if _find_bytes(low, raw, nd.cls, None, allowed_raw) >= 0:
                raise GateError(path, nd.kind)
