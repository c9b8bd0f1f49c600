"""The identifying values of a source dataset, collected before de-identification.

`Identifiers.from_dataset(source)` collects, at every depth: patient and person names (the
whole name, each name part and word of 3 or more characters, and the usual ways of writing the
parts together), patient IDs, other patient IDs, accession number, study ID, institution name,
address, telephone numbers, the birth date, specimen and container identifiers (the attributes
and the identifier content items of the specimen module, `fiona.deid.specimen`), and every
original instance UID (any UI value that
is not a well-known standard UID or a class-like attribute, see `is_class_like_uid`).

Two users need them, so they live here and not in either: the engine's clean action cuts them
out of free text (`Identifiers.scrub_pattern`), and the verification gate
(`fiona.deid.gate.check`) searches the output for them. Keeping them apart from both breaks the
old engine <-> gate import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from .specimen import identifier_text

#: UI attributes that name classes or coding schemes, not instances: never replaced
_CLASS_LIKE = frozenset({"CodingSchemeUID", "ContextUID", "MappingResourceUID"})

MIN_LEN = 3
SHORT_NUMBER = 6

NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                 "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                 "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician")
ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "SpecimenIdentifier",
               "ContainerIdentifier", "SpecimenAccessionNumber", "SlideIdentifier")
TEXT_KEYWORDS = ("InstitutionName", "PatientAddress", "PatientTelephoneNumbers")
DATE_KEYWORDS = ("PatientBirthDate",)
_KIND = {tag_for_keyword(kw): (kw, cls)
         for kws, cls in ((NAME_KEYWORDS, "name"), (ID_KEYWORDS, "id"), (TEXT_KEYWORDS, "text"),
                          (DATE_KEYWORDS, "date")) for kw in kws}

_NAME_CACHE: dict[tuple, list[tuple[str, str]]] = {}
_NEEDLE_CACHE: dict[tuple, Needle] = {}

def is_class_like_uid(keyword: str | None) -> bool:
    """A UI attribute that names a class or coding scheme (its value is never replaced)."""
    return bool(keyword and (keyword.endswith(("ClassUID", "SyntaxUID")) or
                             keyword in _CLASS_LIKE))


def is_well_known_uid(value: str) -> bool:
    """A UID of the standard (SOP class, transfer syntax, ...) that pydicom knows."""
    return value in UID_dictionary


@dataclass(frozen=True)
class Needle:
    text: str                  # casefolded
    kind: str                  # what it is, for messages (never the value)
    cls: str                   # "name", "id", "text", "date", "uid"
    raw: tuple[bytes, ...]     # lowered encodings for the byte search
    trigger_only: bool         # a raw hit only leads to the element search


def values_of(value) -> list:
    """The values of a (possibly multi-valued) element value."""
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


class Identifiers:
    """The identifying values of one source dataset (see the module doc). Its repr shows only
    counts, never values."""

    def __init__(self) -> None:
        self.needles: list[Needle] = []
        self._seen: set[tuple[str, str]] = set()
        self.encodings: list[str] = ["utf-8", "latin-1"]
        self.non_ascii = False

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for n in self.needles:
            kinds[n.cls] = kinds.get(n.cls, 0) + 1
        return f"Identifiers({kinds})"

    def __len__(self) -> int:
        return len(self.needles)

    def texts(self) -> list[str]:
        """The (casefolded) identifying values; for tests and cleaning, never for logs."""
        return [n.text for n in self.needles]

    @classmethod
    def from_dataset(cls, ds: Dataset, uids: bool = True) -> Identifiers:
        """Collect from the SOURCE dataset (before de-identification); `uids=False` leaves out
        the instance UIDs (for the Retain UIDs Option)."""
        ids = cls()
        charset = ds.get("SpecificCharacterSet")
        if charset:
            try:
                for enc in convert_encodings(charset):
                    if enc not in ids.encodings:
                        ids.encodings.append(enc)
            except Exception:  # an unknown character set: the defaults stay
                pass
        meta = getattr(ds, "file_meta", None)
        if meta is not None and uids:
            ids._collect(meta, uids)
        ids._collect(ds, uids)
        return ids

    def _collect(self, ds: Dataset, uids: bool) -> None:
        d = ds._dict
        specimen = identifier_text(ds)
        if specimen:
            self.add(specimen, "source specimen identifier", "id")
        for tag in list(d):
            elem = d[tag]
            vr = elem.VR
            if vr is None:
                if (tag >> 16) & 1:
                    continue
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    continue
            if vr == "SQ":
                for item in ds[tag].value or ():
                    self._collect(item, uids)
                continue
            kind = _KIND.get(tag)
            if kind is not None:
                self._add_value(ds[tag].value, *kind)
            elif vr == "UI" and uids:
                kw = keyword_for_tag(tag) if not (tag >> 16) & 1 else ""
                if is_class_like_uid(kw):
                    continue
                value = elem.value
                if isinstance(value, bytes):
                    values = value.decode("ascii", "replace").split("\\")
                elif isinstance(value, str):
                    values = [value]
                else:
                    values = list(value or ())
                for v in values:
                    v = str(v).strip("\x00 ")
                    if v and not is_well_known_uid(v):
                        self.add(v, f"original {kw or 'UID'}", "uid")

    def _add_value(self, value, keyword: str, cls: str) -> None:
        if value is None or value == "":
            return
        for v in values_of(value):
            text = str(v).strip()
            if not text:
                continue
            if cls == "name":
                self._add_name(text, keyword)
            else:
                self.add(text, f"source {keyword}", cls)

    def _add_name(self, text: str, keyword: str) -> None:
        key = (text, keyword, tuple(self.encodings))
        found = _NAME_CACHE.get(key)
        if found is None:
            found = []
            for group in text.split("="):
                parts = [p.strip() for p in group.split("^") if p.strip()]
                if not parts:
                    continue
                found.append(("^".join(parts), f"source {keyword}"))
                words = []
                for p in parts:
                    found.append((p, f"source {keyword} (name part)"))
                    words += [w for w in re.split(r"[\s,.\-']+", p) if w]
                for w in words:
                    found.append((w, f"source {keyword} (name part)"))
                if len(words) > 1:
                    # parts written together; with a separator between them only needed when
                    # a part is too short to be searched on its own
                    seps = ("",) if min(len(w) for w in words) >= MIN_LEN else \
                        ("", " ", ",", ", ", "_", ".", "^")
                    orders = {tuple(words), tuple(words[::-1])}
                    if len(words) <= 5:  # family^given^middle is also written given middle family
                        for w in (words, words[::-1]):
                            orders.update(tuple(w[i:] + w[:i]) for i in range(len(w)))
                    for seq in sorted(orders):
                        for sep in seps:
                            found.append((sep.join(seq), f"source {keyword}"))
            if len(_NAME_CACHE) > 4096:
                _NAME_CACHE.clear()
            _NAME_CACHE[key] = found
        for t, kind in found:
            self.add(t, kind, "name")

    def add(self, text: str, kind: str, cls: str) -> None:
        t = text.strip().casefold()
        if len(t) < MIN_LEN or (t, cls) in self._seen:
            return
        self._seen.add((t, cls))
        key = (t, text, kind, cls, tuple(self.encodings))
        needle = _NEEDLE_CACHE.get(key)
        if needle is None:
            raws = []
            for enc in self.encodings:
                try:
                    b = text.strip().encode(enc).lower()
                except (UnicodeError, LookupError):
                    continue
                if b and b not in raws:
                    raws.append(b)
            trigger = cls == "date" or (t.isdigit() and len(t) < SHORT_NUMBER)
            needle = Needle(t, kind, cls, tuple(raws), trigger)
            if len(_NEEDLE_CACHE) > 16384:
                _NEEDLE_CACHE.clear()
            _NEEDLE_CACHE[key] = needle
        if not t.isascii():
            self.non_ascii = True
        self.needles.append(needle)

    def scrub_pattern(self) -> re.Pattern | None:
        """A regex that finds these values (not UIDs) in free text, for the clean action."""
        parts = []
        for n in sorted(self.needles, key=lambda n: -len(n.text)):
            if n.cls == "uid":
                continue
            left = r"(?<!\d)" if n.text[0].isdigit() else r"(?<![^\W\d_])" \
                if n.text[0].isalpha() else ""
            right = r"(?!\d)" if n.text[-1].isdigit() else r"(?![^\W\d_])" \
                if n.text[-1].isalpha() else ""
            parts.append(left + re.escape(n.text) + right)
        return re.compile("|".join(parts), re.IGNORECASE) if parts else None
