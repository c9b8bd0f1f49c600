"""DICOM PS3.15 Annex E, Table E.1-1 as data (`annex_e.json`, one named edition of the standard).

`Table.action(tag, options, private)` answers the table's action code for one attribute with a
set of profile options on:

- an option column overrides the `basic` column when that option is on; when several options
  that are on name the same row, the most retaining code wins (K, then C, then the others), as
  an option is a request to retain or to clean rather than remove;
- rows with an exact tag come first, then the rows with a mask (repeating groups such as
  (50xx,xxxx) curves and (60xx,3000) overlay data): a masked row matches tag `t` when
  `t & mask == value`;
- private elements (odd group) are answered by the table's "Private Attributes" row whatever
  their tag (basic X; C under the Retain Safe Private Option), or X if the table has none;
- an attribute the table does not list answers None.

Codes come back as the table has them, combined codes ("X/Z", "X/Z/U*", ...) included; the engine
resolves them (see `fiona.deid.engine.resolve_combined`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("annex_e.json")

#: option code precedence when several enabled options name the same row
_RETAIN_ORDER = {"K": 0, "C": 1}

#: the options of Table E.1-1 with their CID 7050 codes and meanings (used when a table file
#: carries no `options` section; the table's own section wins)
STANDARD_OPTIONS: dict[str, tuple[str, str]] = {
    "cleanGraphOpt": ("113103", "Clean Graphics Option"),
    "cleanStructContOpt": ("113104", "Clean Structured Content Option"),
    "cleanDescOpt": ("113105", "Clean Descriptors Option"),
    "rtnLongFullDatesOpt": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "rtnLongModifDatesOpt": ("113107",
                             "Retain Longitudinal Temporal Information Modified Dates Option"),
    "rtnPatCharsOpt": ("113108", "Retain Patient Characteristics Option"),
    "rtnDevIdOpt": ("113109", "Retain Device Identity Option"),
    "rtnUIDsOpt": ("113110", "Retain UIDs Option"),
    "rtnSafePrivOpt": ("113111", "Retain Safe Private Option"),
    "rtnInstIdOpt": ("113112", "Retain Institution Identity Option"),
}
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")


class TableError(ValueError):
    """The table file is missing or malformed."""


@dataclass(frozen=True)
class Row:
    tag: int              # exact tag, or the `value` of a masked row
    mask: int | None      # None: exact tag
    keyword: str | None
    vr: str | None
    basic: str
    options: dict[str, str]
    name: str | None = None   # the table's name for the row (masked rows may have no keyword)

    def code(self, options: frozenset[str]) -> str:
        hits = [c for name, c in self.options.items() if name in options]
        if not hits:
            return self.basic
        return min(hits, key=lambda c: _RETAIN_ORDER.get(c, 2))


class Table:
    """One edition of Table E.1-1, loaded from JSON (see module doc)."""

    def __init__(self, data: dict, source: str = "<dict>"):
        try:
            self.edition: str = str(data["edition"])
            rows = data["rows"]
        except (KeyError, TypeError) as exc:
            raise TableError(f"{source}: not an Annex E table (missing {exc})") from None
        self.source = source
        self.exact: dict[int, Row] = {}
        self.masked: list[Row] = []
        self.private: Row | None = None
        for i, r in enumerate(rows):
            try:
                row = self._row(r)
            except (KeyError, ValueError, TypeError) as exc:
                raise TableError(f"{source}: row {i} ({r!r:.80}) is malformed: {exc}") from None
            if row.mask is None:
                self.exact[row.tag] = row
            elif row.mask == 0x00010000 and row.tag == 0x00010000:
                self.private = row          # (gggg,eeee) where gggg is odd
            else:
                self.masked.append(row)
        # options: name -> (code value, code meaning)
        self.options: dict[str, tuple[str, str]] = dict(STANDARD_OPTIONS)
        for name, spec in (data.get("options") or {}).items():
            code = spec.get("code") if isinstance(spec, dict) else None
            fallback = STANDARD_OPTIONS.get(name, ("", name))[1]
            if isinstance(code, dict):
                self.options[name] = (str(code["value"]), str(code.get("meaning") or fallback))
            elif isinstance(code, str):
                self.options[name] = (code, fallback)
        basic = (data.get("other_methods") or {}).get("basicProfile", {}).get("code")
        self.basic_profile = ((str(basic["value"]), str(basic["meaning"])) if basic
                              else BASIC_PROFILE)
        self._cache: dict[tuple[int, frozenset[str], bool], str | None] = {}

    @staticmethod
    def _row(r: dict) -> Row:
        text = str(r["tag"]).upper().replace(",", "").replace("(", "").replace(")", "")
        mask = r.get("mask")
        if mask is None:
            tag, m = int(text, 16), None
        else:
            m = int(str(mask), 16)
            value = r.get("value")
            tag = int(str(value), 16) if value is not None else \
                int("".join(c if c in "0123456789ABCDEF" else "0" for c in text), 16)
        basic = str(r["basic"]).strip().upper()
        opts = {str(k): str(v).strip().upper() for k, v in (r.get("options") or {}).items()}
        return Row(tag, m, r.get("keyword"), r.get("vr"), basic, opts, r.get("name"))

    @classmethod
    def load(cls, path: str | Path | None = None) -> Table:
        p = Path(path) if path else DEFAULT_PATH
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TableError(f"Annex E table {p} is missing") from None
        except json.JSONDecodeError as exc:
            raise TableError(f"Annex E table {p} is not valid JSON: {exc}") from None
        return cls(data, str(p))

    def row(self, tag: int, private: bool = False) -> Row | None:
        """The row that governs `tag` (exact first, then masked), or the private row."""
        if private:
            return self.private
        row = self.exact.get(tag)
        if row is not None:
            return row
        for r in self.masked:
            if tag & r.mask == r.tag:  # type: ignore[operator]  # masked rows have a mask
                return r
        return None

    def action(self, tag: int, options: frozenset[str], private: bool) -> str | None:
        """The action code for `tag` with `options` on; None if the table does not list it."""
        key = (tag if not private else -1, options, private)
        try:
            return self._cache[key]
        except KeyError:
            pass
        row = self.row(tag, private)
        if row is None:
            code = "X" if private else None
        else:
            code = row.code(options)
        self._cache[key] = code
        return code


@lru_cache(maxsize=4)
def default_table(path: str | None = None) -> Table:
    """The table shipped with FIONA (loaded once per process)."""
    return Table.load(path)
