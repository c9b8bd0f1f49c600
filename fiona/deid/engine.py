"""The de-identification engine: DICOM PS3.15 Annex E (Table E.1-1 as data) applied at every depth.

`Deidentifier(settings).apply(ds)` de-identifies one dataset in place (file meta included) in a
single walk over its elements; the action for each tag is worked out once per engine and cached.
Elements whose action is "keep" are never decoded (pydicom's raw elements are written back as
they were read), and replacement UIDs and dates are written as raw bytes, so de-identifying costs
little more than reading and writing the file.

Documented decisions
--------------------
Actions (the table's code for the tag with the options on; see `fiona.deid.table`):

- X remove; Z zero length (a sequence: no items); D a dummy value of the VR ("ANONYMIZED",
  0, 19000101, 8 zero bytes, ...; a UI: a keyed replacement; a sequence: one empty item, so
  no content of it survives); K keep (a sequence is kept and its items are de-identified);
  U keyed replacement UID. D on a specimen or container identifier is a keyed replacement
  (`fiona.deid.specimen.keyed_identifier`), so a slide's levels and a case's specimens keep
  pointing at each other.
- C (clean): what cleaning means is written down row by row in `fiona.deid.clean` (one rule
  per C row: DATE, DATETIME, TIME, TZ_OFFSET, DESCRIPTOR, NARRATIVE, BINARY, SEQUENCE). A value
  is kept (dates: shifted) only when it has the strict form of its rule; otherwise, and always
  for narrative free text and binary values, the row takes its basic-profile code (X, Z or D),
  so a cleaned value never survives verbatim unless it is well-formed. Descriptors keep their
  text with the source's identifiers, dates, times and long numbers cut out. A sequence is kept
  and de-identified item by item, and free text in it that the table does not list (e.g. an SR
  TextValue under Clean Structured Content) is cleaned the same way (coded values only of the
  source's identifiers).
- Specimen content items (`fiona.deid.specimen`): in SpecimenPreparationStepContentItemSequence
  (C under Clean Structured Content, else its parent sequence is Z) and
  SpecimenLocalizationContentItemSequence, coded, numeric and date items are kept, identifier
  TEXT items keyed, other TEXT items (free text) dropped unless the profile keeps TextValue.
- Combined codes (`resolve_combined`): the least destructive code that keeps the IOD valid is
  chosen from a fixed list of attributes that are Type 1 or Type 2 in common IODs:
  `TYPE1_ATTRIBUTES` take D (or Z for X/Z), `TYPE2_ATTRIBUTES` take Z (or D for X/D); X/Z/U*
  on a listed sequence keeps the sequence and replaces the UIDs in it; anything else takes the
  first code (X for X/Z, X/D, X/Z/D, X/Z/U*; Z for Z/D).
- Not in the table: kept, except that every UI value (see below) is replaced, a DA/DT is
  treated as a listed date (shifted under Modified Dates, kept under Full Dates, emptied
  otherwise), an element of an unknown
  public tag whose VR is unknown (implicit VR, or UN) is removed, and the whole group of an overlay
  (60xx, even) goes when its Overlay Data does (so overlay labels and descriptions go too).
  Group lengths (gggg,0000) outside the file meta and command elements (0000,eeee), which never
  belong in a stored object, are removed whatever the table says. The 128-byte preamble is
  zeroed (it can hold a TIFF header or vendor data).
- UIDs: every UI value at any depth is replaced by `uid()` unless it is a UID that pydicom
  knows (SOP classes, transfer syntaxes, ... `pydicom.uid.UID_dictionary`), the attribute is a
  class-like one (keyword ending in ClassUID or SyntaxUID, CodingSchemeUID, ContextUID,
  MappingResourceUID), or the table says K (Retain UIDs Option). `uid()` is
  "2.25." + int(HMAC-SHA256(key, "uid" NUL project NUL uid)[:16]) (at most 44 characters, no
  leading zeros): the same UID with the same key and project gives the same UID in every
  process, and another project gives another one.
- Dates: under the Modified Dates option every DA, DT (its date part; time and offset kept) at
  every depth is shifted by `shift()` days (added). `shift()` is the profile's fixed
  `date_shift_days` or HMAC(key, "date-shift" NUL project NUL participant) mapped into
  `shift_range` (never 0): constant per participant, so intervals between a participant's
  studies are kept, and different for different participants. A date that is not of the
  strict form (YYYYMMDD; DT as in `fiona.deid.clean`) is emptied, or for a C row takes the
  row's basic code.
- Private elements (odd groups) are removed with their private creators, except elements on
  `Settings.safe_private` ((creator, element offset) pairs): listing any turns the Retain Safe
  Private Option on (and it is then named in DeidentificationMethodCodeSequence), the listed
  elements and their creators are kept, and the elements inside a kept private sequence are
  de-identified like any other (dates shifted, UIDs replaced, private ones removed unless
  listed).
- File meta: MediaStorageSOPInstanceUID := the replaced SOPInstanceUID (so the two agree),
  ImplementationClassUID/VersionName := pydicom's / "FIONA"; source, sending and receiving AE
  titles and private information are removed.
- After the table, in this order: project values (PatientID, PatientName := participant;
  InstitutionName := `institution` or the project, also under the Retain Institution Identity
  Option; ClinicalTrialTimePointID and -Description := event when there is one) and markers
  (PatientIdentityRemoved YES, DeidentificationMethod: "FIONA <version> PS3.15 E.1-1
  <edition>", the code meanings and "FIONA profile <name>"; DeidentificationMethodCodeSequence
  with 113100 and one item per option applied, scheme DCM, CID 7050 meanings;
  LongitudinalTemporalInformationModified MODIFIED / UNMODIFIED / REMOVED), then the import
  rule, then the profile's keep/replace/remove (a remove also takes away a project value).
- Import rule (`extra["import_rule"] = {"tag": keyword or "gggg,eeee", "regexp": ...}`): the
  source value of the tag is matched (re.search) before de-identification; the named groups
  that matched are joined with "_" (in the order they appear in the pattern) and written to the
  tag AFTER de-identification, so the result survives even if the table removes the tag. No
  match writes an empty value (nothing of an unmatched value can leak).
- Profile (`config/profiles/NAME.json`, see `load_profile`, `with_profile`): `remove` removes
  the attribute at every depth; `keep` keeps the attribute's source value at every depth and
  restores the source value at the top level after the project values (so a misconfigured
  profile that keeps PatientName really leaks it, and the verification gate must stop it);
  `replace` writes a value at the top level and wherever the attribute occurs nested.

A Deidentifier caches per-tag plans, replacement UIDs and shifted dates; use one per thread.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, private_dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from .clean import CODE_KEYWORDS, RULE_VRS, Rule, clean_text, clean_value, rule_for, shift_values
from .identifiers import Identifiers, is_class_like_uid, is_well_known_uid
from .specimen import (
    CONTENT_ITEM_SEQUENCES,
    IDENTIFIER_KEYWORDS,
    ItemAction,
    item_action,
    keyed_identifier,
)
from .table import Table, default_table

try:  # the package version goes into DeidentificationMethod
    from .. import __version__ as FIONA_VERSION
except ImportError:  # pragma: no cover
    FIONA_VERSION = "0"

DEFAULT_OPTIONS = frozenset({"rtnLongModifDatesOpt"})
MODIF_DATES, FULL_DATES, SAFE_PRIV, RTN_UIDS = ("rtnLongModifDatesOpt", "rtnLongFullDatesOpt",
                                                "rtnSafePrivOpt", "rtnUIDsOpt")

#: attributes that are Type 1 in common IODs: a combined code takes D (X/Z: Z; X/Z/U*: U)
TYPE1_ATTRIBUTES = frozenset({
    "AcquisitionDateTime", "ContentDate", "ContentTime", "DeviceSerialNumber",
    "ObservationDateTime", "ReferencedImageSequence", "SourceImageSequence",
})
#: attributes that are Type 2 in common IODs: a combined code takes Z (X/D: D; X/Z/U*: U)
TYPE2_ATTRIBUTES = frozenset({
    "PatientSexNeutered", "AcquisitionContextSequence", "TreatmentMachineName", "ReviewerName",
    "RTPlanDate", "RTPlanTime", "ContrastBolusAgent", "ContentCreatorName", "PatientID",
})

_TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_DUMMY_TEXT = {"AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101",
               "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED",
               "LT": "ANONYMIZED", "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED",
               "UC": "ANONYMIZED", "UT": "ANONYMIZED", "UR": "urn:anonymized"}
_DUMMY_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}
_META_KEEP = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010})
_SOP_INSTANCE_UID = BaseTag(0x00080018)

#: a dataset's elements as pydicom keeps them (`Dataset._dict`): decoded or still raw
Elements = MutableMapping[BaseTag, DataElement | RawDataElement]

_IMPL_UID = PYDICOM_IMPLEMENTATION_UID.encode() + (b"\x00" if len(PYDICOM_IMPLEMENTATION_UID) & 1
                                                   else b"")
_META_IMPL_UID = RawDataElement(BaseTag(0x00020012), "UI", len(_IMPL_UID), _IMPL_UID, 0, False,
                                True)
_IMPL_NAME = f"FIONA_{FIONA_VERSION}"[:16].encode()
_IMPL_NAME += b" " if len(_IMPL_NAME) & 1 else b""
_META_IMPL_NAME = RawDataElement(BaseTag(0x00020013), "SH", len(_IMPL_NAME), _IMPL_NAME, 0, False,
                                 True)

# operations, worked out once per (tag, VR)
KEEP, DEL, EMPTY, DUMMY, UID, DATE, DATETIME, RECURSE, EMPTY_SQ, DUMMY_SQ, SCRUB, REPLACE, \
    RECURSE_CLEAN, SCRUB_CODE, CLEAN, KEYED, CONTENT_ITEMS = range(17)
_TEXT_VALUE = BaseTag(0x0040A160)

_UID_PREFIX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
#: the shipped profiles, package data (so a plain `pip install .` has them); a site's own
#: `DATADIR/config/profiles/NAME.json` comes first where callers pass that folder
SHIPPED_PROFILES = resources.files("fiona.deid") / "profiles"
PROFILE_KEYS = {"name", "description", "options", "date_shift_days", "keep", "remove", "replace",
                "uid_prefix", "shift_range"}
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resolve_combined(code: str, keyword: str | None) -> str:
    """One action for a combined code (see the module doc)."""
    if "/" not in code:
        return code
    parts = code.replace("*", "").split("/")
    if keyword in TYPE1_ATTRIBUTES:
        if "U" in parts:
            return "U"
        return "D" if "D" in parts else "Z"
    if keyword in TYPE2_ATTRIBUTES:
        if "U" in parts:
            return "U"
        return "Z" if "Z" in parts else "D"
    return parts[0]


@dataclass
class Settings:
    """What one de-identification needs. `key` is the bytes of DATADIR/config/secret.key.

    `safe_private` lists (private creator, element offset 0x00-0xFF) pairs whose private
    elements are kept; listing any turns the Retain Safe Private Option on. `extra` carries the
    profile's `keep`/`remove`/`replace` and the project's `import_rule`; it may hold a whole
    profile, whose `options` and `date_shift_days` must then agree with the fields here (build
    Settings from a profile with `with_profile`)."""

    project: str
    participant: str
    key: bytes
    event: str = ""
    options: frozenset[str] = DEFAULT_OPTIONS
    uid_prefix: str = "2.25."
    date_shift_days: int | None = None
    shift_range: tuple[int, int] = (-3650, -365)
    safe_private: tuple[tuple[str, int], ...] = ()
    institution: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = frozenset(self.options)
        if self.safe_private:
            self.options = self.options | {SAFE_PRIV}
        if not self.project or not self.participant:
            raise ValueError("Settings need a project and a participant")
        if not isinstance(self.key, bytes) or len(self.key) < 16:
            raise ValueError("the secret key must be at least 16 bytes")
        if MODIF_DATES in self.options and FULL_DATES in self.options:
            raise ValueError(f"options {MODIF_DATES} and {FULL_DATES} exclude each other")
        if self.date_shift_days == 0:
            raise ValueError("date_shift_days must not be 0 (dates would not be modified)")
        lo, hi = self.shift_range
        if lo > hi or lo == hi == 0:
            raise ValueError(f"shift_range {self.shift_range} is empty")
        if not _UID_PREFIX.match(self.uid_prefix) or len(self.uid_prefix) > 40:
            raise ValueError(f"uid_prefix {self.uid_prefix!r} must be a valid UID root ending "
                             f"in '.', at most 40 characters")
        for creator, offset in self.safe_private:
            if not isinstance(creator, str) or not 0 <= int(offset) <= 0xFF:
                raise ValueError(f"safe_private entry {(creator, offset)!r}: (creator, 0x00-0xFF)")


class Deidentifier:
    """De-identifies datasets for one (project, participant, event) with one key."""

    def __init__(self, settings: Settings, table: Table | None = None):
        self.settings = s = settings
        self.table = table or default_table()
        unknown = s.options - set(self.table.options)
        if unknown:
            raise ValueError(f"unknown de-identification option(s) {sorted(unknown)}; known: "
                             f"{sorted(self.table.options)}")
        extra = s.extra or {}
        if "options" in extra and frozenset(extra["options"]) | (
                {SAFE_PRIV} if s.safe_private else set()) != s.options:
            raise ValueError(f"profile options {sorted(extra['options'])} differ from the "
                             f"settings' {sorted(s.options)}; build the settings with "
                             f"with_profile()")
        if "date_shift_days" in extra and extra["date_shift_days"] != s.date_shift_days:
            raise ValueError("profile date_shift_days differs from the settings'; build the "
                             "settings with with_profile()")
        self._opts = s.options
        self._dates = ("shift" if MODIF_DATES in s.options else
                       "keep" if FULL_DATES in s.options else "remove")
        self._key = s.key
        self._project = s.project.encode("utf-8")
        self._uids: dict[str, str] = {}
        self._keyed: dict[str, str] = {}
        self._shifted: dict[str, str | None] = {}
        self._shift: int | None = None
        self._safe = {(c.strip(), int(o)) for c, o in s.safe_private}
        self._remove = {BaseTag(_tag(k)) for k in extra.get("remove", ())}
        self._keep = {BaseTag(_tag(k)) for k in extra.get("keep", ())}
        self._replace = {BaseTag(_tag(k)): v for k, v in (extra.get("replace") or {}).items()}
        self._plans: dict[int, tuple[str | None, int]] = {}
        self._plans_clean: dict[int, tuple[str | None, int]] = {}
        self._cleaning: dict[int, tuple[Rule, str]] = {}     # tag -> (rule, fallback code)
        rule = extra.get("import_rule")
        self._import: tuple[int, re.Pattern] | None = None
        if rule:
            self._import = (_tag(rule["tag"]), re.compile(rule["regexp"]))
        self._profile_name = str(extra.get("name") or "")
        self._scrub_re: re.Pattern | None = None
        # free text is cleaned (C) only under options other than the date and UID ones
        self._needs = any(c == "C" and n in self._opts and n not in (MODIF_DATES, FULL_DATES,
                                                                      RTN_UIDS)
                          for row in self.table.exact.values() for n, c in row.options.items())
        self._ops: dict[tuple[int, str, bool], int] = {}
        self._meta_action = self.table.action(0x00020003, self._opts, False)
        self._written_cache: dict[tuple[bool, bool], list[tuple[BaseTag, Any]]] = {}
        self._markers = self._marker_values()

    # --- keyed values ---------------------------------------------------------------------------
    def uid(self, uid: str) -> str:
        """The keyed replacement of `uid` (see the module doc); "" stays ""."""
        u = str(uid).strip("\x00 ")
        if not u:
            return ""
        out = self._uids.get(u)
        if out is None:
            digest = hmac.new(self._key, b"uid\x00" + self._project + b"\x00" + u.encode(),
                              hashlib.sha256).digest()
            prefix = self.settings.uid_prefix
            n = int.from_bytes(digest[:16], "big")
            room = 64 - len(prefix)
            if len(str(n)) > room:
                n %= 10 ** room
            out = self._uids[u] = prefix + str(n)
        return out

    def specimen_id(self, value: str) -> str:
        """The keyed replacement of a specimen or container identifier (cached)."""
        out = self._keyed.get(value)
        if out is None:
            out = self._keyed[value] = keyed_identifier(self._key, self.settings.project, value)
        return out

    def shift(self) -> int:
        """Days added to every date: fixed, or keyed per (key, project, participant); never 0."""
        if self._shift is None:
            s = self.settings
            if s.date_shift_days is not None:
                self._shift = int(s.date_shift_days)
            else:
                lo, hi = s.shift_range
                msg = b"date-shift\x00" + self._project + b"\x00" + s.participant.encode()
                n = int.from_bytes(hmac.new(self._key, msg, hashlib.sha256).digest()[:8], "big")
                count = hi - lo + 1 - (1 if lo <= 0 <= hi else 0)
                d = lo + n % count
                if lo <= 0 <= d:
                    d += 1
                self._shift = d
        return self._shift

    # --- the walk -------------------------------------------------------------------------------
    def apply(self, ds: Dataset, ids: Identifiers | None = None) -> Dataset:
        """De-identify `ds` in place (file meta too) and return it. `ids` (the Identifiers of
        the source) is used by the clean (C) action on free text; computed when needed."""
        if self._needs_identifiers() and ids is None:
            ids = Identifiers.from_dataset(ds, uids=False)
        self._scrub_re = ids.scrub_pattern() if ids is not None and self._needs_identifiers() \
            else None
        import_value = self._import_source(ds)
        kept = self._kept_source(ds)
        if getattr(ds, "preamble", None):
            ds.preamble = b"\x00" * 128          # may hold a TIFF header or vendor data
        self._walk(ds)
        self._file_meta(ds)
        # project values and markers: prepared once per encoding, written as raw elements
        d = ds._dict
        for tag, elem in self._written(ds):
            d[tag] = elem
        if import_value is not None:
            _put(ds, *import_value)
        # profile
        for tag, elem in kept.items():
            d[tag] = elem
        for tag, value in self._replace.items():
            _put(ds, tag, value)
        for tag in self._remove:
            d.pop(tag, None)
        return ds

    def _written(self, ds: Dataset) -> list[tuple[BaseTag, Any]]:
        """The elements written after the table: project values and markers. For a dataset
        read from a file (known encoding) they are raw elements encoded once per encoding."""
        implicit, little = ds.original_encoding
        # pydicom sets both or neither: (None, None) for a dataset not read from a file
        encoding = None if implicit is None or little is None else (implicit, little)
        if encoding is not None:
            cached = self._written_cache.get(encoding)
            if cached is not None:
                return cached
        s = self.settings
        method, codes, temporal = self._markers
        values: list[tuple[str, Any]] = [
            ("PatientID", s.participant), ("PatientName", s.participant),
            ("InstitutionName", s.institution or s.project)]
        if s.event:
            values += [("ClinicalTrialTimePointID", s.event),
                       ("ClinicalTrialTimePointDescription", s.event)]
        values += [("PatientIdentityRemoved", "YES"), ("DeidentificationMethod", method),
                   ("LongitudinalTemporalInformationModified", temporal)]
        out: list[tuple[BaseTag, Any]] = []
        for kw, value in values:
            tag = Tag(kw)
            vr = dictionary_VR(tag)
            text = "\\".join(value) if isinstance(value, list) else value
            if encoding is not None and text.isascii():
                raw = text.encode("ascii")
                if len(raw) & 1:
                    raw += b" "
                out.append((tag, RawDataElement(tag, vr, len(raw), raw, 0, *encoding)))
            else:
                out.append((tag, DataElement(tag, vr, value)))
        seq_tag = Tag("DeidentificationMethodCodeSequence")
        seq = DataElement(seq_tag, "SQ", Sequence([_code_item(v, m) for v, m in codes]))
        if encoding is None:
            out.append((seq_tag, seq))
            return out                     # encoding unknown: plain elements, not cached
        implicit, little = encoding
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        write_data_element(fp, seq)
        body = fp.getvalue()[8 if implicit else 12:]
        out.append((seq_tag, RawDataElement(seq_tag, "SQ", len(body), body, 0, implicit, little)))
        out.sort(key=lambda te: te[0])
        self._written_cache[encoding] = out
        return out

    def _needs_identifiers(self) -> bool:
        return self._needs

    def _walk(self, ds: Dataset, clean: bool = False) -> None:
        """Apply the plan to every element of `ds` and, through sequences, below it. `clean`:
        inside a sequence whose action is C (clean), where free text not in the table is
        cleaned too."""
        d = ds._dict
        plans = self._plans_clean if clean else self._plans
        private = False
        for tag in list(d):
            if (tag >> 16) & 1:
                private = True
                continue
            elem = d[tag]
            p = plans.get(tag)
            if p is None:
                p = plans[tag] = self._plan(tag, None, clean)
            vr = elem.VR
            if vr is None or vr == p[0]:
                op = p[1]
            else:
                if vr == "UN" and p[0] is not None and elem.is_raw:
                    elem = ds[tag]        # pydicom converts UN to the dictionary's VR
                    vr = elem.VR
                cached_op = self._ops.get((tag, vr, clean))
                if cached_op is None:
                    cached_op = self._ops[(tag, vr, clean)] = self._plan(tag, vr, clean)[1]
                op = cached_op
            if op == KEEP:
                continue
            if vr is None:
                vr = p[0]
            if op == RECURSE or op == RECURSE_CLEAN:
                if isinstance(elem, RawDataElement):
                    elem = ds[tag]
                for item in elem.value or ():
                    self._walk(item, clean or op == RECURSE_CLEAN)
            elif op == CONTENT_ITEMS:
                self._content_items(ds[tag], clean)
            elif op == CLEAN:
                assert vr is not None    # `_plan` gives CLEAN only for a VR of the rule's
                self._clean(ds, tag, elem, vr)
            else:
                self._do(ds, tag, elem, vr, op)
        if private:
            self._private(ds)

    def _do(self, ds: Dataset, tag: BaseTag, elem, vr: str | None, op: int) -> None:
        """One operation on one element that is not a sequence to walk."""
        d = ds._dict
        if op == DEL:
            del d[tag]
        elif op == UID:
            self._map_uids(d, tag, elem)
        elif op == DATE or op == DATETIME:
            self._shift_dates(d, tag, elem, op)
        elif op == EMPTY:
            _set(d, tag, elem, b"", None)
        elif op == DUMMY:
            _set_dummy(d, tag, elem, vr)
        elif op == EMPTY_SQ:
            ds[tag].value = []
        elif op == DUMMY_SQ:
            ds[tag].value = [Dataset()]
        elif op == SCRUB or op == SCRUB_CODE:
            self._scrub(ds, tag, op == SCRUB_CODE)
        elif op == REPLACE:
            _put(ds, tag, self._replace[tag])
        elif op == KEYED:
            elem = ds[tag]
            text = str(elem.value or "").strip()
            if text:
                elem.value = self.specimen_id(text)

    def _content_items(self, elem: DataElement, clean: bool) -> None:
        """A specimen content-item sequence, item by item (see `fiona.deid.specimen`)."""
        kept = []
        for item in elem.value or ():
            action = item_action(item, _TEXT_VALUE in self._keep)
            if action is ItemAction.DROP:
                continue
            source = str(item.get("TextValue", "") or "").strip()
            self._walk(item, clean)
            if action is ItemAction.KEY:
                item.TextValue = self.specimen_id(source) if source else ""
            kept.append(item)
        elem.value = kept

    def _plan(self, tag: int, vr: str | None, clean: bool = False) -> tuple[str | None, int]:
        """(dictionary VR, operation) for a public tag; `vr` overrides the dictionary's."""
        try:
            dvr = dictionary_VR(tag)
        except KeyError:
            dvr = None
        kw = keyword_for_tag(tag) or None
        v = vr or dvr
        if not tag & 0xFFFF or not tag >> 16:
            return dvr, DEL                       # group length; command group
        if tag in self._remove:
            return dvr, DEL
        if tag in self._replace:
            return dvr, REPLACE
        group = tag >> 16
        if 0x6000 <= group <= 0x60FF and tag & 0xFFFF != 0x3000 and \
                self._plan((group << 16) | 0x3000, "OB")[1] == DEL:
            return dvr, DEL                       # the overlay's data goes: so does the rest
        if tag in self._keep:
            action: str | None = "K"
        else:
            action = self.table.action(tag, self._opts, False)
            if action == "C" and v != "SQ":
                row = self.table.row(tag)
                assert row is not None    # `action` gave a code: the table has the row
                rule = rule_for(row.keyword, row.name)
                fallback = resolve_combined(row.basic, kw)
                if rule is None or rule in (Rule.NARRATIVE, Rule.BINARY) or \
                        v not in RULE_VRS[rule]:
                    action = fallback             # never kept: what the basic profile does
                else:
                    self._cleaning[tag] = (rule, fallback)
                    return dvr, CLEAN
            elif action is not None:
                action = resolve_combined(action, kw)
        return dvr, self._op(action, v, kw, clean)

    def _op(self, action: str | None, vr: str | None, kw: str | None,
            clean: bool = False) -> int:
        """The operation for a resolved action; C reaches here only for a sequence (the
        other C rows are resolved by `_plan` through `fiona.deid.clean`)."""
        if vr == "SQ":
            if action is None and kw in CONTENT_ITEM_SEQUENCES:
                return CONTENT_ITEMS
            if action == "C":
                return RECURSE_CLEAN
            return {"X": DEL, "Z": EMPTY_SQ, "D": DUMMY_SQ}.get(action or "", RECURSE)
        if action == "X" or action == "C":
            return DEL
        if action == "Z":
            return EMPTY
        if action == "D" and kw in IDENTIFIER_KEYWORDS and vr in _TEXT_VRS:
            return KEYED
        if action in ("D", "U"):
            return UID if vr == "UI" else DUMMY
        if action == "K":
            return KEEP
        # not in the table
        if vr is None or (vr == "UN" and kw is None):
            return DEL      # an unknown tag of unknown VR: it cannot be told what it holds
        if vr in ("DA", "DT"):
            return {"shift": DATE if vr == "DA" else DATETIME, "keep": KEEP,
                    "remove": EMPTY}[self._dates]
        if vr == "UI":
            return KEEP if RTN_UIDS in self._opts or is_class_like_uid(kw) else UID
        if clean and vr in _TEXT_VRS and vr not in ("AE", "AS", "CS"):
            return SCRUB_CODE if kw in CODE_KEYWORDS else SCRUB
        return KEEP

    def _clean(self, ds: Dataset, tag: BaseTag, elem, vr: str) -> None:
        """The clean action on one element (see `fiona.deid.clean`): the cleaned value, or
        the row's fallback when the value is not of the strict form of its rule."""
        rule, fallback = self._cleaning[tag]
        if rule is Rule.DESCRIPTOR and elem.is_raw:
            elem = ds[tag]                        # decoded in the dataset's character set
        value = elem.value
        if value is None or value == "" or value == b"":
            return
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else \
            "\\".join(str(v) for v in _values(value))
        out = clean_value(rule, vr, text, self._dates, self.shift, self._scrub_re)
        if out is None:
            self._do(ds, tag, elem, vr, self._op(fallback, vr, keyword_for_tag(tag)))
        elif out != text:
            if elem.is_raw:
                _set(ds._dict, tag, elem, _padded(out, b" "), None)
            else:
                elem.value = out.split("\\") if "\\" in out else out

    def _map_uids(self, d: Elements, tag: BaseTag, elem) -> None:
        if elem.is_raw:
            raw = elem.value
            if not raw:
                return
            text = raw.decode("ascii", "replace").rstrip("\x00 ")
            values = text.split("\\")
            new = "\\".join(v if is_well_known_uid(v.strip("\x00 ")) else self.uid(v)
                            for v in values)
            if new != text:
                _set(d, tag, elem, _padded(new, b"\x00"), None)
            return
        value = elem.value
        if value is None or value == "":
            return
        if isinstance(value, (list, tuple, MultiValue)):
            elem.value = [v if is_well_known_uid(v) else self.uid(v) for v in value]
        else:
            elem.value = value if is_well_known_uid(value) else self.uid(value)

    def _shift_one(self, text: str, dt: bool) -> str | None:
        key = ("T" if dt else "A") + text
        try:
            return self._shifted[key]
        except KeyError:
            pass
        out: str | None
        out = shift_values(text, dt, self.shift())
        self._shifted[key] = out
        return out

    def _shift_dates(self, d: Elements, tag: BaseTag, elem, op: int) -> None:
        dt = op == DATETIME
        if elem.is_raw:
            raw = elem.value
            if not raw:
                return
            text = raw.decode("ascii", "replace").rstrip("\x00 ")
            new = self._shift_one(text, dt)
            if new is None:
                _set(d, tag, elem, b"", None)
            elif new != text:
                _set(d, tag, elem, _padded(new, b" "), None)
            return
        value = elem.value
        if value is None or value == "":
            return
        text = "\\".join(str(v) for v in _values(value))
        new = self._shift_one(text, dt)
        elem.value = None if new is None else (new.split("\\") if "\\" in new else new)

    def _scrub(self, ds: Dataset, tag: int, codes_only: bool) -> None:
        """Free text not in the table, inside a cleaned sequence: `clean_text` on each value."""
        elem = ds[tag]
        if elem.value is None:
            return
        value = elem.value
        if isinstance(value, (list, tuple, MultiValue)):
            elem.value = [clean_text(str(v), self._scrub_re, codes_only) for v in value]
        else:
            elem.value = clean_text(str(value), self._scrub_re, codes_only)

    def _private(self, ds: Dataset) -> None:
        d = ds._dict
        tags = [t for t in d if (t >> 16) & 1]
        if not self._safe:
            for t in tags:
                del d[t]
            if hasattr(ds, "_private_blocks"):
                ds._private_blocks = {}
            return
        creators: dict[tuple[int, int], str] = {}
        for t in tags:
            e = t & 0xFFFF
            if 0x10 <= e <= 0xFF:
                value = ds[t].value
                creators[(t >> 16, e)] = str(value).strip() if value is not None else ""
        kept_blocks = set()
        for t in tags:
            e = t & 0xFFFF
            if e < 0x1000:
                continue
            creator = creators.get((t >> 16, e >> 8))
            if creator is None or (creator, e & 0xFF) not in self._safe:
                del d[t]
                continue
            kept_blocks.add((t >> 16, e >> 8))
            elem = d[t]
            vr = elem.VR
            if vr is None or vr == "UN":
                try:
                    vr = private_dictionary_VR(t, creator)
                except KeyError:
                    vr = "UN"
                if vr != "UN" and elem.is_raw:
                    elem = ds[t]
                    vr = elem.VR
            op = KEEP if vr == "UN" else self._op(None, vr, None)   # listed: kept as it is
            if op == RECURSE:
                for item in ds[t].value:
                    self._walk(item)
            elif op == UID:
                self._map_uids(d, t, elem)
            elif op in (DATE, DATETIME):
                self._shift_dates(d, t, elem, op)
            elif op == EMPTY:
                _set(d, t, elem, b"", None)
            elif op == DEL:
                del d[t]
        for t in tags:
            e = t & 0xFFFF
            if e < 0x1000 and (e < 0x10 or (t >> 16, e) not in kept_blocks):
                d.pop(t, None)
        if hasattr(ds, "_private_blocks"):
            ds._private_blocks = {}

    def _file_meta(self, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        d = meta._dict
        for t in list(d):
            if t not in _META_KEEP:
                del d[t]
        if self._meta_action != "K":
            sop = ds._dict.get(_SOP_INSTANCE_UID)
            if sop is not None:
                value = sop.value
                value = value.decode("ascii", "replace") if isinstance(value, bytes) \
                    else str(value)
                value = value.strip("\x00 ")
            elif 0x00020003 in d:
                value = self.uid(str(meta[0x00020003].value))
            else:
                value = ""
            if value:
                raw = value.encode("ascii", "replace")
                if len(raw) & 1:
                    raw += b"\x00"
                d[BaseTag(0x00020003)] = RawDataElement(BaseTag(0x00020003), "UI", len(raw),
                                                        raw, 0, False, True)
        d[BaseTag(0x00020012)] = _META_IMPL_UID
        d[BaseTag(0x00020013)] = _META_IMPL_NAME

    # --- before and after the table -------------------------------------------------------------
    def _import_source(self, ds: Dataset) -> tuple[int, str] | None:
        if self._import is None:
            return None
        tag, pattern = self._import
        elem = ds.get(tag)
        if elem is None or elem.value is None:
            return None
        m = pattern.search(str(elem.value))
        if not m:
            return tag, ""
        names = sorted(pattern.groupindex.items(), key=lambda kv: kv[1])
        return tag, "_".join(m.group(i) for _n, i in names if m.group(i))

    def _kept_source(self, ds: Dataset) -> dict[BaseTag, DataElement | RawDataElement]:
        out: dict[BaseTag, DataElement | RawDataElement] = {}
        for tag in self._keep:
            elem = ds._dict.get(tag)
            if elem is None:
                continue
            if elem.is_raw:
                if elem.VR == "SQ":
                    continue
                out[tag] = elem                    # immutable
            elif elem.VR != "SQ":
                out[tag] = copy.deepcopy(elem)
        return out

    def _marker_values(self) -> tuple[list[str], list[tuple[str, str]], str]:
        t = self.table
        codes = [t.basic_profile] + sorted(t.options[o] for o in self._opts)
        method = [method_prefix(t.edition)] + [m for _v, m in codes]
        if self._profile_name:
            method.append(f"FIONA profile {self._profile_name}"[:64])
        temporal = {"shift": "MODIFIED", "keep": "UNMODIFIED", "remove": "REMOVED"}[self._dates]
        return method, codes, temporal

    def authored_values(self) -> set[str]:
        """Values FIONA itself writes (markers, project values): legitimately in the output."""
        s = self.settings
        method, codes, temporal = self._markers
        out = set(method) | {m for _v, m in codes} | {temporal, "YES", s.participant,
                                                      s.institution or s.project}
        if s.event:
            out.add(s.event)
        return out


def method_prefix(edition: str) -> str:
    return f"FIONA {FIONA_VERSION} PS3.15 E.1-1 {edition}"


# --- helpers -----------------------------------------------------------------------------------
def _tag(key: Any) -> int:
    """A tag from a keyword, "gggg,eeee", "(gggg,eeee)", "ggggeeee" or an int."""
    if isinstance(key, int):
        return key
    text = str(key).strip()
    tag = tag_for_keyword(text)
    if tag is not None:
        return tag
    hexed = text.strip("()").replace(",", "").replace(" ", "")
    if re.fullmatch(r"[0-9A-Fa-f]{8}", hexed):
        return int(hexed, 16)
    raise ValueError(f"{key!r} is neither a DICOM keyword nor a tag like 0008,103E")


def _values(value) -> list:
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _set(d: Elements, tag: BaseTag, elem, raw: bytes, value: Any) -> None:
    if elem.is_raw:
        d[tag] = elem._replace(value=raw, length=len(raw))
    else:
        elem.value = value


def _padded(text: str, pad: bytes) -> bytes:
    """An ASCII value padded to even length (NUL for UI, space for text VRs)."""
    raw = text.encode("ascii")
    return raw + pad if len(raw) & 1 else raw


def _set_dummy(d: Elements, tag: BaseTag, elem, vr: str | None) -> None:
    if vr in _DUMMY_TEXT:
        text = _DUMMY_TEXT[vr]
        raw = text.encode("ascii")
        if len(raw) & 1:
            raw += b" "
        _set(d, tag, elem, raw, text)
    elif vr in _DUMMY_SIZE or (vr or "").startswith("US"):
        n = _DUMMY_SIZE.get(vr or "", 2)
        _set(d, tag, elem, bytes(n), 0)
    else:
        _set(d, tag, elem, bytes(8), bytes(8))


def _put(ds: Dataset, tag: int, value: Any) -> None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "LO"
    if vr == "SQ":
        raise ValueError(f"cannot write a plain value to sequence {keyword_for_tag(tag)}")
    if " or " in vr:
        vr = vr.split(" or ")[0]
    ds._dict[BaseTag(tag)] = DataElement(tag, vr, value)


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


# --- profiles ----------------------------------------------------------------------------------
def load_profile(name: str, directory: str | Path | None = None) -> dict:
    """The profile NAME.json in `directory` (default: the shipped profiles), validated, with
    defaults filled in."""
    if not _PROFILE_NAME.match(name or ""):
        raise ValueError(f"profile name {name!r} must be letters, digits, '_', '.', '-'")
    folder = Path(directory) if directory else SHIPPED_PROFILES
    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(profile_names(folder))
        raise ValueError(f"no de-identification profile {name!r} (known: {known})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {path} is not valid JSON: {exc}") from None
    return validate_profile(data, str(path))


def profile_names(folder: Path | Traversable = SHIPPED_PROFILES) -> list[str]:
    """The names of the profiles in `folder` (default: the shipped ones), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def site_profile(name: str, datadir: str | Path) -> dict:
    """Profile NAME as a site uses it: its own `DATADIR/config/profiles/NAME.json` where it has
    one, else the shipped profile."""
    site = Path(datadir) / "config" / "profiles"
    return load_profile(name, site if (site / f"{name}.json").is_file() else None)


def validate_profile(data: dict, where: str = "profile") -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a profile is a JSON object")
    unknown = set(data) - PROFILE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: "
                         f"{sorted(PROFILE_KEYS)}")
    out = {"name": str(data.get("name") or Path(where).stem),
           "options": list(data.get("options", sorted(DEFAULT_OPTIONS))),
           "date_shift_days": data.get("date_shift_days"),
           "keep": list(data.get("keep", [])), "remove": list(data.get("remove", [])),
           "replace": dict(data.get("replace", {})),
           "uid_prefix": data.get("uid_prefix", "2.25."),
           "shift_range": tuple(data.get("shift_range", (-3650, -365)))}
    prefix = out["uid_prefix"]
    if not (isinstance(prefix, str) and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.",
                                                     prefix) and len(prefix) <= 26):
        raise ValueError(f"{where}: uid_prefix must be a UID root ending in '.', at most 26 "
                         f"characters (e.g. \"2.25.\" or your organisation's root + \".\")")
    lo, hi = (out["shift_range"] + (0, 0))[:2]
    if not (len(out["shift_range"]) == 2 and all(isinstance(x, int) for x in (lo, hi))
            and lo < hi):
        raise ValueError(f"{where}: shift_range must be [low, high] days with low < high")
    if "description" in data:
        out["description"] = str(data["description"])
    unknown_opts = set(out["options"]) - set(default_table().options)
    if unknown_opts:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown_opts)}")
    dsd = out["date_shift_days"]
    if dsd is not None and (not isinstance(dsd, int) or isinstance(dsd, bool) or dsd == 0):
        raise ValueError(f"{where}: date_shift_days must be null or a non-zero integer")
    for key in ("keep", "remove", *out["replace"]):
        for kw in (out[key] if key in ("keep", "remove") else [key]):
            _tag(kw)                              # raises with the bad keyword named
    return out


def with_profile(settings: Settings, profile: dict | str | None) -> Settings:
    """`settings` with a profile's options, date shift and keep/remove/replace applied."""
    if profile is None:
        return settings
    p = load_profile(profile) if isinstance(profile, str) else validate_profile(profile)
    extra = dict(settings.extra)
    extra.update({k: p[k] for k in ("name", "keep", "remove", "replace")})
    extra.pop("options", None)
    extra.pop("date_shift_days", None)
    return replace(settings, options=frozenset(p["options"]),
                   date_shift_days=p["date_shift_days"], uid_prefix=p["uid_prefix"],
                   shift_range=p["shift_range"], extra=extra)
