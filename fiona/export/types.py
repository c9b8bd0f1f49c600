"""What every export type gets and gives, and the registry that finds a type by name.

An export type (dicom, pure, spectroscopy, nifti, bids, ...) turns de-identified studies that
were already retrieved from where they were delivered into a folder layout; packing (zip,
encryption, checksums, README) is done once for all types by the caller. One module per type,
found by name in `REGISTRY`, as the destinations are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SeriesInput:
    """One de-identified series, as retrieved for the export."""

    uid: str                           # the de-identified SeriesInstanceUID
    number: int | None                 # SeriesNumber, None when missing
    description: str                   # SeriesDescription after de-identification ("" if gone)
    files: list[Path]                  # the de-identified instances of the series
    labels: list[str] = field(default_factory=list)  # classification of the ORIGINAL series
    sop_classes: set[str] = field(default_factory=set)


@dataclass
class StudyInput:
    """One de-identified study of a project's participant and event."""

    project: str
    participant: str
    event: str
    uid: str                           # the de-identified StudyInstanceUID
    date: str = ""                     # StudyDate (shifted), YYYYMMDD or ""
    time: str = ""                     # StudyTime, HHMMSS or ""
    series: list[SeriesInput] = field(default_factory=list)


@dataclass
class ExportReport:
    """What a type wrote and what it could not do (a failed series is reported, the rest is
    delivered)."""

    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    done: int = 0                      # images handled so far, for progress
    total: int = 0


class ExportType(ABC):
    """Builds one layout under `out` (an empty folder inside the export's work folder)."""

    name: str = ""
    description: str = ""

    def __init__(self, datadir: Path | None = None) -> None:
        """`datadir`: the site's data folder, where a type with rules kept as data finds the
        site's override (DATADIR/config/...); None means the shipped defaults."""
        self.datadir = datadir

    @abstractmethod
    def build(self, studies: list[StudyInput], out: Path, report: ExportReport) -> None:
        """Write the layout; append written files and per-series problems to `report`; never
        write outside `out` (every name made from a DICOM value is sanitised first)."""


REGISTRY: dict[str, type[ExportType]] = {}


def register(cls: type[ExportType]) -> type[ExportType]:
    """Class decorator: make an export type available by its `name`."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"export type {cls.name!r} has no name or is registered twice")
    REGISTRY[cls.name] = cls
    return cls
