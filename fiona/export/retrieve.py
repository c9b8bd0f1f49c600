"""Gathering a project's de-identified studies for an export, from where they were delivered.

Which studies: the completed transfer requests of the control plane (a request's
`mapped_uid` is the de-identified StudyInstanceUID) and, when reading from the research PACS,
the studies its inventory lists for the project that no request names (delivered by another
FIONA; no original is known for them, so no labels or patient characteristics), filtered by
participant, event and study (its original or de-identified UID).

Where from: the project's destination as the forwarder picks it
(`send.forward.destination_name`): a `folder` destination by reading its files
(`<root>/<mapped study>/<series>/<SOP>.dcm`), a `dicom` destination (the research PACS) by
C-FIND and C-GET through Review's PACS client (storage contexts with SCP role selection,
TCP_NODELAY). Never the clinical archive: an export holds only what passed the gate.

Every object is passed through the export profile and written as `<work>/<mapped study>/
<series>/<SOP>.dcm` (a file of a folder destination is linked when the profile changes
nothing in it, and edited on its bytes by `patch` where it can: decoding and encoding every
element cost more than the rest of an export). The series' classification labels are those
of the ORIGINAL series, found through the pipeline's keyed UID mapping of the series JSONs
under raw/<Study>/. A research PACS that cannot be reached raises `ExportUnavailable` (a
worker waits and tries again).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from ..config import Config
from ..control.base import ControlPlane, ControlPlaneError, Project, Unavailable
from ..deid.pipeline import Pipeline, ProjectRules, settings_for
from ..review.pacs import ReviewPacs
from ..send.destinations import DestinationError, DestinationUnavailable
from ..send.forward import destination_name
from ..tree import InvalidValue, Tree, instance_links, valid_uid
from . import patch
from .names import place
from .profile import Characteristics, ExportProfile
from .types import SeriesInput, StudyInput

log = logging.getLogger("fiona.export")
MAX_LISTED = 30  # names listed in an error message

Progress = Callable[[int], None]


class ExportError(Exception):
    """The export cannot be made as asked; the text says why (and what exists)."""


class ExportUnavailable(ExportError):
    """Where the studies were delivered cannot be reached now: try again later."""


@dataclass(frozen=True)
class Selected:
    """One study chosen for an export: its original and de-identified UIDs."""

    original: str
    mapped: str
    participant: str
    event: str


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED]) or "none"
    return shown + (f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def check_request(control: ControlPlane, project: str, participant: str | None,
                  event: str | None) -> Project:
    """The project, after checking that it, the participant and the event exist; ExportError
    naming what does exist otherwise."""
    try:
        proj = control.project(project)
        if event is not None:
            proj.check_event(event)
        known = sorted(control.participants(project))
    except Unavailable as exc:
        raise ExportUnavailable(f"the control plane is unavailable: {exc}") from None
    except ControlPlaneError as exc:
        raise ExportError(str(exc)) from None
    if participant is not None and participant not in known:
        raise ExportError(f"project {project} has no participant {participant!r}; its "
                          f"participants are: {listing(known)}")
    return proj


def select(control: ControlPlane, project: str, participant: str | None = None,
           event: str | None = None, study: str | None = None, inventory: bool = False
           ) -> list[Selected]:
    """The project's delivered studies matching the filters (ExportError when none); with
    `inventory`, also those the research PACS's inventory lists."""
    found: dict[str, Selected] = {}
    try:
        requests = control.requests()
        listed = control.inventory(project) if inventory else []
    except Unavailable as exc:
        raise ExportUnavailable(f"the control plane is unavailable: {exc}") from None
    for req in requests:
        if req.project != project or not req.complete or not req.mapped_uid:
            continue
        if participant is not None and req.participant != participant:
            continue
        if event is not None and req.event != event:
            continue
        found[req.mapped_uid] = Selected(req.study_uid, req.mapped_uid, req.participant,
                                         req.event)
    for entry in listed:  # delivered otherwise (another FIONA, by hand)
        if entry.study_uid in found or entry.project != project:
            continue
        if (participant is None or entry.participant == participant) and \
                (event is None or entry.event == event):
            found[entry.study_uid] = Selected("", entry.study_uid, entry.participant,
                                              entry.event)
    chosen = [s for s in found.values() if study is None or study in (s.original, s.mapped)]
    if not chosen:
        what = " ".join(f"{k} {v}" for k, v in (("participant", participant), ("event", event))
                        if v is not None)
        if study is not None:
            raise ExportError(f"study {study} is not among the delivered studies of project "
                              f"{project}{' ' + what if what else ''}; they are: "
                              f"{listing(sorted(found))}")
        raise ExportError(f"project {project}{' ' + what if what else ''} has no delivered "
                          f"study to export")
    return sorted(chosen, key=lambda s: (s.participant, s.event, s.mapped))


# --- where the de-identified objects are -------------------------------------------------------
class Source(ABC):
    @abstractmethod
    def objects(self, mapped: str) -> Iterator[Dataset | Path]:
        """The de-identified objects of study `mapped`: data sets, or the paths of files."""


class FolderSource(Source):
    """A `folder` destination: `<root>/<mapped study>/<series>/<SOP>.dcm`."""

    def __init__(self, root: Path):
        self.root = root

    def objects(self, mapped: str) -> Iterator[Path]:
        study = self.root / valid_uid(mapped, "StudyInstanceUID")
        if not study.is_dir():
            raise ExportError(f"study {mapped} is not in the folder destination {self.root}")
        yield from sorted(study.glob("*/*.dcm"))


class ExportPacs(ReviewPacs):
    """The research PACS read for an export: patient timeouts (an export may be large), a
    few connection attempts."""

    connect_attempts = 3
    connection_timeout = 10.0
    acse_timeout = 30.0
    dimse_timeout = 120.0
    network_timeout = 120.0


class PacsSource(Source):
    """A `dicom` destination: the study's instances by C-FIND, then C-GET."""

    def __init__(self, pacs: ReviewPacs):
        self.pacs = pacs

    def objects(self, mapped: str) -> Iterator[Dataset]:
        try:
            with self.pacs.finding() as assoc:
                wanted = [i for series in sorted(self.pacs.series_counts(assoc, mapped))
                          for i in self.pacs.instances(assoc, mapped, series)]
            if not wanted:
                raise ExportError(f"the research PACS {self.pacs.label} holds no instance of "
                                  f"study {mapped}")
            for _inst, ds in self.pacs.retrieve(wanted):
                yield ds
        except DestinationUnavailable as exc:
            raise ExportUnavailable(f"the research PACS {self.pacs.label} is unavailable: "
                                    f"{exc}") from None
        except DestinationError as exc:
            raise ExportError(f"the research PACS {self.pacs.label}: {exc}") from None


def open_source(config: Config, project: Project) -> Source:
    """Where the project's studies were delivered, as a Source."""
    if not config.destinations:
        raise ExportError(f"no destination is configured; project {project.name}'s studies "
                          f"cannot be read back")
    name = destination_name(config, project)
    settings = config.destinations[name]
    kind = settings.get("type")
    if kind == "folder":
        return FolderSource(Path(settings["path"]))
    if kind == "dicom":
        try:
            return PacsSource(ExportPacs(name, {k: v for k, v in settings.items()
                                                if k != "type"}))
        except DestinationError as exc:
            raise ExportError(f"destination {name!r}: {exc}") from None
    raise ExportError(f"destination {name!r} is of type {kind!r}, which an export cannot read "
                      f"back (folder or dicom)")


# --- what is known of the original study -------------------------------------------------------
def original_labels(tree: Tree, pipeline: Pipeline, original: str) -> dict[str, list[str]]:
    """De-identified SeriesInstanceUID -> ClassifyType of the original series (raw/ JSONs)."""
    labels: dict[str, list[str]] = {}
    if not original:
        return labels
    folder = tree.study_raw(valid_uid(original, "StudyInstanceUID"))
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            series = valid_uid(path.stem, "SeriesInstanceUID")
            types = json.loads(path.read_text()).get("ClassifyType", [])
        except (InvalidValue, OSError, ValueError, AttributeError):
            continue
        if isinstance(types, list):
            labels[pipeline.mapped_uid(series)] = [str(t) for t in types]
    return labels


def original_characteristics(tree: Tree, original: str) -> Characteristics:
    """Sex, birth year and age at study from the first readable original object."""
    if not original:
        return Characteristics()
    folder = tree.study_raw(valid_uid(original, "StudyInstanceUID"))
    for path in instance_links(folder) if folder.is_dir() else ():
        try:
            return Characteristics.of(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception:  # an unreadable link: try the next one
            continue
    return Characteristics()


# --- into the work folder ----------------------------------------------------------------------
class Collector:
    """Writes objects through the export profile into `<work>/<study>/<series>/<SOP>.dcm` and
    builds the StudyInput of each study."""

    def __init__(self, work: Path, profile: ExportProfile, progress: Progress | None = None):
        self.work = work
        self.profile = profile
        self.progress = progress
        self.count = 0
        self.dropped: list[str] = []
        self.folders: set[Path] = set()

    def study(self, project: str, sel: Selected, objects: Iterable[Dataset | Path],
              labels: dict[str, list[str]], person: Characteristics) -> StudyInput:
        out = StudyInput(project, sel.participant, sel.event, sel.mapped)
        series: dict[str, SeriesInput] = {}
        folder = self.work / valid_uid(sel.mapped, "StudyInstanceUID")
        folder.mkdir(parents=True, exist_ok=True)
        for obj in objects:
            written = self._write(obj, folder, person)
            if written is None:
                continue
            ds, path = written
            uid = valid_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            if uid not in series:
                series[uid] = SeriesInput(uid, _number(ds.get("SeriesNumber")),
                                          str(ds.get("SeriesDescription", "") or ""), [],
                                          list(labels.get(uid, [])))
                out.date = out.date or str(ds.get("StudyDate", "") or "")
                out.time = out.time or str(ds.get("StudyTime", "") or "")
            series[uid].files.append(path)
            series[uid].sop_classes.add(str(ds.get("SOPClassUID", "")))
            self.count += 1
            if self.progress:
                self.progress(self.count)
        out.series = sorted(series.values(), key=lambda s: (s.number is None, s.number or 0,
                                                            s.uid))
        return out

    def _write(self, obj: Dataset | Path, folder: Path, person: Characteristics
               ) -> tuple[Dataset, Path] | None:
        """`obj` through the profile into `folder/<series>/<SOP>.dcm` (a folder per series,
        which dcm2niix can read as it is): (its data set, that path), or None when the
        profile drops it. A file the profile leaves as it is gets linked (or
        copied); one it edits is patched on its bytes where `patch` can; anything else is
        decoded, edited and written by pydicom."""
        parsed = patch.parse(obj.read_bytes()) if isinstance(obj, Path) else None
        ds = obj if isinstance(obj, Dataset) else parsed.dataset if parsed else \
            pydicom.dcmread(obj)
        why = self.profile.dropped(ds)
        if why:
            self.dropped.append(why)
            return None
        sop = valid_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        folder = folder / valid_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        path = folder / f"{sop}.dcm"
        if folder not in self.folders:
            folder.mkdir(exist_ok=True)
            self.folders.add(folder)
        edits = list(self.profile.edits(ds, person).values())
        if parsed and not edits:
            place(Path(obj), folder, path.name)
            return ds, path
        data = patch.patch(parsed, edits) if parsed else None
        if data is not None:
            path.write_bytes(data)
        else:
            self.profile.apply(ds, person)
            ds.save_as(path, enforce_file_format=True)
        return ds, path


def retrieve(config: Config, control: ControlPlane, tree: Tree, key: bytes, project: str,
             participant: str | None, event: str | None, study: str | None,
             profile: ExportProfile, work: Path, progress: Progress | None = None
             ) -> tuple[list[StudyInput], Collector]:
    """The selected de-identified studies, through the profile, in `work`."""
    proj = check_request(control, project, participant, event)
    source = open_source(config, proj)
    chosen = select(control, project, participant, event, study,
                    inventory=isinstance(source, PacsSource))
    collector = Collector(work, profile, progress)
    studies = []
    for sel in chosen:
        pipeline = Pipeline(settings_for(proj, sel.participant, sel.event, key, tree.datadir),
                            ProjectRules.of(proj))
        studies.append(collector.study(project, sel, source.objects(sel.mapped),
                                       original_labels(tree, pipeline, sel.original),
                                       original_characteristics(tree, sel.original)))
        log.debug("export of %s: study %s retrieved (%d objects so far)", project, sel.mapped,
                 collector.count)
    return studies, collector


def _number(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None
