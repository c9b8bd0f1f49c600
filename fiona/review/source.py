"""Where Review reads a project's de-identified output: one interface, two kinds.

- `FolderSource`: the files of a `folder` destination under the studies the control plane
  mapped for the project, all of them up to `cap` (then "based on N of M files").
- `PacsSource`: a `dicom` destination (the research PACS): the studies it holds for the
  project and their series' instance counts by C-FIND, and a sample of `review_sample`
  instances per series (evenly spread) read by C-GET, cached per series (`cache.py`), at most
  MAX_FETCH headers per view (the series left over are read by the next views). A PACS that
  is down or refuses gives a `Review` with `error` set instead of an exception, so the page
  still shows.

Either way the figures say how many files they are based on (`Review.based_on`).
`open_source` picks the project's destination as the forwarder does
(`send.forward.destination_name`), and a folder destination when that one is not DICOM.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from ..clock import SYSTEM_CLOCK, Clock
from ..config import DESTINATION_KEYS, Config
from ..control.base import ControlPlane, Project
from ..send.destinations import DestinationError, DestinationUnavailable
from ..send.forward import destination_name
from ..tree import InvalidValue, valid_uid
from .cache import Entry, ReviewCache
from .pacs import Instance, ReviewError, ReviewPacs, matchable
from .tags import TagSummary

log = logging.getLogger(__name__)

MAX_FILES = 5000  # a folder's files read per view
MAX_FETCH = 500   # PACS headers retrieved per view; the next view reads the next series


@dataclass
class Review:
    """A project's figures and what they rest on: `files` headers read of `files_total`."""

    project: str
    kind: str                      # "folder", "dicom", or "" when no destination can be read
    destination: str | None        # the folder, or AE@host:port of the PACS
    studies: int = 0
    files: int = 0
    files_total: int = 0
    sample: int | None = None      # headers read per series (PACS)
    fetched: int = 0               # headers retrieved from the PACS for this view
    unread_series: int = 0         # series left for a later view (MAX_FETCH reached)
    error: str = ""
    tags: list[dict[str, Any]] = field(default_factory=list)

    @property
    def based_on(self) -> str:
        if self.files == self.files_total:
            return f"based on {self.files} file{'' if self.files == 1 else 's'}"
        return f"based on {self.files} of {self.files_total} files"

    def as_dict(self) -> dict[str, Any]:
        return {"project": self.project, "kind": self.kind, "destination": self.destination,
                "studies": self.studies, "files": self.files, "files_total": self.files_total,
                "based_on": self.based_on, "sample": self.sample,
                "unread_series": self.unread_series, "error": self.error, "tags": self.tags}


class ReviewSource(ABC):
    kind: str = ""

    @abstractmethod
    def review(self, project: str) -> Review:
        """The project's figures; never raises for an unreachable destination."""


class FolderSource(ReviewSource):
    """`<root>/<mapped StudyInstanceUID>/<series>/<SOPInstanceUID>.dcm` (FolderDestination)."""

    kind = "folder"

    def __init__(self, root: Path, control: ControlPlane, cap: int = MAX_FILES):
        self.root = root
        self.control = control
        self.cap = cap

    def review(self, project: str) -> Review:
        result = Review(project, self.kind, str(self.root))
        mapped = sorted({r.mapped_uid for r in self.control.requests()
                         if r.project == project and r.mapped_uid})
        files: list[Path] = []
        for uid in mapped:
            try:
                files += sorted((self.root / valid_uid(uid)).glob("*/*.dcm"))
            except InvalidValue:
                continue
        summary = TagSummary()
        for path in files[:self.cap]:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # any unreadable file: it is counted as not read
                log.warning("review: cannot read %s: %s", path, type(exc).__name__)
                continue
            summary.add(ds)
            result.files += 1
        result.studies, result.files_total, result.tags = len(mapped), len(files), summary.rows()
        return result


@dataclass
class _Todo:
    study: str
    series: str
    instances: int
    chosen: list[Instance]


class PacsSource(ReviewSource):
    """The research PACS, `sample` instances per series, cached; at most `max_fetch` headers
    are retrieved per view, so a first view of a large project answers in bounded time and
    each later view reads the series still missing."""

    kind = "dicom"

    def __init__(self, pacs: ReviewPacs, cache: ReviewCache, sample: int,
                 max_fetch: int = MAX_FETCH):
        self.pacs = pacs
        self.cache = cache
        self.sample = sample
        self.max_fetch = max_fetch

    def review(self, project: str) -> Review:
        result = Review(project, self.kind, self.pacs.label, sample=self.sample)
        summary = TagSummary()
        try:
            matchable(project)  # before any connection
            held, todo = self._list(project, summary, result)
        except ReviewError as exc:
            result.error = str(exc)
            return result
        except DestinationUnavailable as exc:
            result.error = f"The research PACS is unreachable: {exc}"
            return result
        except DestinationError as exc:
            result.error = f"The research PACS did not answer the query: {exc}"
            return result
        result.studies = len(held)
        result.files_total = sum(n for series in held.values() for n in series.values())
        self.cache.prune(project, {s: set(series) for s, series in held.items()})
        try:
            self._fetch(project, todo, summary, result)
        except DestinationUnavailable as exc:
            result.error = f"The research PACS became unreachable while reading headers: {exc}"
        except DestinationError as exc:
            result.error = f"The research PACS did not deliver headers: {exc}"
        result.tags = summary.rows()
        return result

    def _list(self, project: str, summary: TagSummary, result: Review
              ) -> tuple[dict[str, dict[str, int]], list[_Todo]]:
        """What the PACS holds (study -> series -> instances); cached series go into
        `summary`, the others come back with the instances chosen to read."""
        held: dict[str, dict[str, int]] = {}
        todo: list[_Todo] = []
        budget = self.max_fetch
        with self.pacs.finding() as assoc:
            for study in self.pacs.studies(assoc, project):
                held[study] = self.pacs.series_counts(assoc, study)
            for study, counts in held.items():
                for series, n in sorted(counts.items()):
                    entry = self.cache.get(project, study, series, n)
                    if entry is not None:
                        summary.merge(entry.summary)
                        result.files += entry.read
                    elif budget < min(self.sample, n):
                        result.unread_series += 1
                    else:
                        chosen = spread(self.pacs.instances(assoc, study, series), self.sample)
                        budget -= len(chosen)
                        todo.append(_Todo(study, series, n, chosen))
        return held, todo

    def _fetch(self, project: str, todo: list[_Todo], summary: TagSummary,
               result: Review) -> None:
        """C-GET the chosen instances; a series whose whole sample arrived is cached."""
        parts = {(t.study, t.series): (t, TagSummary(), [0]) for t in todo}
        wanted = [i for t in todo for i in t.chosen]
        try:
            for inst, ds in self.pacs.retrieve(wanted) if wanted else ():
                _todo, part, read = parts[(inst.study, inst.series)]
                part.add(ds)
                read[0] += 1
        finally:
            for t, part, read in parts.values():
                summary.merge(part)
                result.files += read[0]
                result.fetched += read[0]
                if read[0] == min(self.sample, t.instances):
                    self.cache.put(project, t.study, t.series, Entry(t.instances, read[0], part))


def spread(items: list[Instance], k: int) -> list[Instance]:
    """At most `k` of `items`, evenly spread from the first on (all when there are no more)."""
    n = len(items)
    return list(items) if n <= k else [items[i * n // k] for i in range(k)]


def folder_destination(config: Config) -> Path | None:
    """The folder destination Review reads: "research" if it is one, else the first."""
    dests = config.destinations or {}
    order = (["research"] if "research" in dests else []) + [n for n in dests if n != "research"]
    for name in order:
        if dests[name].get("type") == "folder":
            return Path(dests[name]["path"])
    return None


def open_source(config: Config, control: ControlPlane, project: Project, datadir: Path,
                clock: Clock = SYSTEM_CLOCK) -> ReviewSource | None:
    """The project's destination if it is a research PACS, else the folder destination
    (None without one); raises DestinationError for a PACS entry that is misconfigured."""
    if config.destinations:
        name = destination_name(config, project)
        settings = config.destinations[name]
        if settings.get("type") == "dicom":
            pacs = ReviewPacs(name, {k: v for k, v in settings.items() if k != "type"})
            hours, sample = (settings.get(k, DESTINATION_KEYS["dicom"][k][1])
                             for k in ("review_max_age_hours", "review_sample"))
            cache = ReviewCache.for_datadir(datadir, 3600 * float(hours), clock)
            return PacsSource(pacs, cache, int(sample))
    root = folder_destination(config)
    return FolderSource(root, control) if root is not None else None


def review(config: Config, control: ControlPlane, project: Project, datadir: Path,
           clock: Clock = SYSTEM_CLOCK) -> Review:
    """The project's figures from its destination (see `open_source`)."""
    try:
        source = open_source(config, control, project, datadir, clock)
    except DestinationError as exc:
        return Review(project.name, "dicom", None, error=f"The research PACS is misconfigured: "
                                                          f"{exc}")
    if source is None:
        return Review(project.name, "", None)
    return source.review(project.name)
