"""The figures Review shows: every tag of a set of headers with its distinct values and counts.

A summary is built from datasets (`add`), merged across series (`merge`) and stored as JSON in
the PACS cache (`to_json`/`from_json`), so a cached series never needs its headers again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydicom.dataset import Dataset

PIXEL_DATA = 0x7FE00010
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
MAX_VALUE_CHARS = 200  # a long text is counted by its start, as the page shows no more


class TagSummary:
    """Tag key ("(gggg,eeee)", nested ones "(...) > (...)") -> name, VR and value counts."""

    def __init__(self) -> None:
        self.tags: dict[str, dict[str, Any]] = {}

    def add(self, ds: Dataset) -> None:
        """Count every element of `ds` at every depth (pixel data excepted)."""
        self._walk(ds, "")

    def _walk(self, ds: Dataset, prefix: str) -> None:
        for elem in ds:
            if elem.tag == PIXEL_DATA:
                continue
            key = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
            if elem.VR == "SQ":
                self._count(key, elem.name, elem.VR, f"(sequence, {len(elem.value)} items)")
                for item in elem.value:
                    self._walk(item, key + " > ")
            elif elem.VR in BINARY_VRS:
                self._count(key, elem.name, elem.VR, f"({elem.VR}, {len(elem.value or b'')} bytes)")
            else:
                self._count(key, elem.name, elem.VR, str(elem.value)[:MAX_VALUE_CHARS])

    def _count(self, key: str, name: str, vr: str, value: str, n: int = 1) -> None:
        entry = self.tags.setdefault(key, {"name": name, "vr": vr, "values": Counter()})
        entry["values"][value] += n

    def merge(self, other: TagSummary) -> None:
        for key, entry in other.tags.items():
            for value, n in entry["values"].items():
                self._count(key, entry["name"], entry["vr"], value, n)

    def rows(self) -> list[dict[str, Any]]:
        """What the page and the API show: tags in order, values most frequent first (equal
        counts by value, so the same headers give the same rows in any reading order)."""
        return [{"tag": k, "name": v["name"], "vr": v["vr"],
                 "values": [{"value": val, "count": n} for val, n in
                            sorted(v["values"].items(), key=lambda vn: (-vn[1], vn[0]))]}
                for k, v in sorted(self.tags.items())]

    def to_json(self) -> dict[str, Any]:
        return {k: {"name": v["name"], "vr": v["vr"], "values": dict(v["values"])}
                for k, v in self.tags.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TagSummary:
        """The summary `to_json` wrote; ValueError when `data` is not one."""
        summary = cls()
        try:
            for key, v in data.items():
                for value, n in v["values"].items():
                    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                        raise ValueError(f"count {n!r} of {key}")
                    summary._count(str(key), str(v["name"]), str(v["vr"]), str(value), n)
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a tag summary: {exc}") from None
        return summary
