"""The series JSON, kept in memory while a series arrives and written once per batch.

The system FIONA replaces rewrote the whole JSON for every image and counted messages rather than
instances. Here each image is merged into an in-memory record, and the file is written
atomically when the indexer finishes a batch. Merging is idempotent, because after a crash the
indexer replays journal lines it may already have applied: NumFiles counts the distinct
instance links in the series folder, the slice location is a minimum, labels are a set, and
diffusion entries are keyed by SOPInstanceUID.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tree import atomic_write, series_links
from .csa import SIEMENS_FIELDS
from .header import ImageRecord


@dataclass
class SeriesRecord:
    """One series JSON while it is being built."""

    path: Path            # raw/<Study>/<Series>.json
    folder: Path          # raw/<Study>/<Series>/ with one link per instance
    data: dict[str, Any] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def load(cls, path: Path, folder: Path) -> SeriesRecord:
        """Continue from the JSON on disk (after a restart), or start empty."""
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        return cls(path, folder, data)

    def add(self, image: ImageRecord, labels: list[str], series_level: frozenset[str],
            diffusion: dict | None) -> None:
        """Merge one image: its fields, its classification labels and its diffusion entry.
        A field the series already has is not even read from the image (the first image's
        value stands), which spares converting it. The Siemens fields come from the CSA
        headers, which describe the series (the protocol, the mosaic): once an image gave
        any of them, later images' headers are not decoded for the rest (~1.8 ms an image
        for the series header's protocol text, measured on nibabel's Siemens test files)."""
        data = self.data
        first = not data
        siemens_read = any(key in data for key in SIEMENS_FIELDS)
        for key in image.names():
            if not (first or key == "SliceLocation" or key not in data):
                continue
            if siemens_read and key in SIEMENS_FIELDS:
                continue
            value = image.get(key)
            if value is None:
                continue
            if key == "SliceLocation":
                new = _number(value)
                if new is not None:
                    old = _number(data.get(key))
                    if old is None or new < old:
                        data[key] = value
            else:
                data[key] = value
        had = set(data.get("ClassifyType", []))
        now = set(labels)
        if first:
            merged = now
        else:
            # plain labels: any image; SeriesLevel labels: every image so far
            merged = {t for t in had | now if t not in series_level}
            merged |= {t for t in had & now if t in series_level}
        order = [t for t in data.get("ClassifyType", []) if t in merged]
        order += [t for t in labels if t in merged and t not in order]
        data["ClassifyType"] = order
        if diffusion is not None:
            entries = data.setdefault("siemensDiffusionInformation", [])
            if all(e.get("SOPInstanceUID") != diffusion.get("SOPInstanceUID") for e in entries):
                entries.append(diffusion)
        self.dirty = True

    def flush(self) -> None:
        """Write the JSON (durably: the journal position is committed after this)."""
        if not self.dirty:
            return
        try:
            self.data["NumFiles"] = len(series_links(self.folder))
        except FileNotFoundError:
            self.data["NumFiles"] = 0
        atomic_write(self.path, (json.dumps(self.data, indent=1, sort_keys=True) + "\n").encode())
        self.dirty = False


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

