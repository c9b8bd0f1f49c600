"""The arrival daemon (`fiona detect-study-arrival`; original `detectStudyArrival.sh`).

A study has arrived when none of its `.arrived/` touch files changed for STUDY_QUIET_SECONDS
(and the indexer has caught up, so its series JSONs are complete). The indexer dates a series
touch file when its image was received, so the quiet period counts from the last image in,
however far the indexer runs behind. Then the study and its series are registered in the
control plane, the automatic assignment rules run, the arrival workflows run, and the touch
files seen are removed. A series that arrives later touches the files again and makes an
*amendment* of the same study, never a second study.

The touch files on disk are the truth: inotify (watchdog) only wakes the loop early, a rescan
at start picks up whatever arrived while the daemon was down, and a touch file is removed only
after the study is registered, so a kill at any moment loses nothing. While the control plane
cannot be reached, arrivals wait and are retried.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..backoff import Backoff, Schedule
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site
from ..control import open_control_plane
from ..control.assign import Arrival, Assigner
from ..control.base import ControlPlane, ControlPlaneError, Series, Study, Unavailable, now_iso
from ..control.keyed import Keyed
from ..daemon import notify_forwarder, running
from ..index.header import CONNECTION
from ..index.indexer import caught_up as index_caught_up
from ..suite import ARRIVAL
from ..tree import InvalidValue, Tree, arrival_study
from .workflows import Workflow

log = logging.getLogger(ARRIVAL.logger)

RETRY_SECONDS = (2, 5, 10, 30)
#: a quiet study whose series JSONs are not written yet is looked at again after this
INDEXER_WAIT_SECONDS = 5
COUPLING_SWEEP_SECONDS = 15
#: rows are asked for from this long before the last sweep: the control plane's clock may
#: differ from ours, and a row seen twice makes no second request
SWEEP_OVERLAP = timedelta(minutes=10)


@dataclass(frozen=True)
class TouchFile:
    path: Path
    study: str
    mtime: float

    @classmethod
    def parse(cls, path: Path) -> TouchFile:
        """A touch file (`fiona.tree.arrival_name`) with its modification time."""
        return cls(path, arrival_study(path.name), path.stat().st_mtime)


def touch_files(tree: Tree, invalid: Callable[[InvalidValue], None] = lambda exc: None,
                ) -> dict[str, list[TouchFile]]:
    """The studies in `.arrived/` with their touch files; a file whose name is not one goes
    to `invalid`."""
    by_study: dict[str, list[TouchFile]] = {}
    for entry in os.scandir(tree.arrived):
        try:
            touch = TouchFile.parse(Path(entry.path))
        except FileNotFoundError:
            continue
        except InvalidValue as exc:
            invalid(exc)
            continue
        by_study.setdefault(touch.study, []).append(touch)
    return by_study


def study_from_series(tree: Tree, study_uid: str) -> Arrival | None:
    """The study as its series JSONs describe it, with the clear identifiers for matching."""
    folder = tree.raw / study_uid
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("study %s: cannot read %s: %s", study_uid, path.name, exc)
    if not records:
        return None
    first = records[0]
    conn = first.get(CONNECTION, {})
    series = [Series(uid=r["SeriesInstanceUID"], description=str(r.get("SeriesDescription", "")),
                     date=str(r.get("StudyDate", "")), time=str(r.get("SeriesTime", "")),
                     num_files=int(r.get("NumFiles", 0)),
                     sequence_name=str(r.get("SequenceName", "")),
                     classify_types=list(r.get("ClassifyType", [])),
                     modality=str(r.get("Modality", "")))
              for r in records if r.get("SeriesInstanceUID")]
    study = Study(uid=study_uid, institution=str(first.get("InstitutionName", "")),
                  calling_ae=conn.get("AETitleCaller", ""), called_ae=conn.get("AETitleCalled", ""),
                  description=str(first.get("StudyDescription", "")),
                  date=str(first.get("StudyDate", "")), time=str(first.get("StudyTime", "")),
                  accession=str(first.get("AccessionNumber", "")), series=series)
    return Arrival(study, patient_id=str(first.get("PatientID", "")),
                   patient_name=str(first.get("PatientName", "")))


class _Wake(FileSystemEventHandler):
    """Wakes the loop when a touch file appears. A touch of an existing one only moves its
    study's quiet period later, which the loop's own timer covers, so those are not watched:
    the receiver and the indexer touch a file for every image, and a wake-up and a rescan of
    `.arrived/` for each cost this daemon ~0.3 ms of CPU per image while the sender and the
    receiver need the cores (bench/ingest.py)."""

    #: the inotify events asked for (watchdog builds the kernel's mask from them)
    EVENTS = [FileCreatedEvent, FileMovedEvent]

    def __init__(self, event: threading.Event):
        self.event = event

    def on_any_event(self, event) -> None:  # noqa: ANN001 - watchdog's signature
        self.event.set()


class ArrivalDetector:
    """Turns quiet studies into registered, assigned studies; one per site. `clock` decides
    when a study is quiet and when a retry is due (tests advance a FakeClock)."""

    def __init__(self, config: Config, site: Site, control: ControlPlane, keyed: Keyed,
                 clock: Clock = SYSTEM_CLOCK):
        self.site = site
        self.node = config.node
        self.tree = Tree(site.datadir).make()
        self.quiet = config.study_quiet_seconds
        self.control = control
        self.keyed = keyed
        self.clock = clock
        self.assigner = Assigner(control, keyed, clock)
        self.workflows = [Workflow.from_config(w) for w in config.workflows]
        self._backoff = Backoff(Schedule(RETRY_SECONDS), clock)
        self.arrivals = 0

    def touch_files(self) -> dict[str, list[TouchFile]]:
        return touch_files(self.tree, lambda exc: log.error("%s; remove it from %s", exc,
                                                            self.tree.arrived))

    def due(self) -> tuple[list[tuple[str, list[TouchFile]]], float]:
        """Studies quiet long enough, and the seconds until the next one will be."""
        now = self.clock.time()
        ready, wait = [], 60.0
        for study, files in self.touch_files().items():
            remaining = max(f.mtime for f in files) + self.quiet - now
            remaining = max(remaining, self._backoff.remaining(study))
            if remaining <= 0:
                ready.append((study, files))
            else:
                wait = min(wait, remaining)
        return ready, wait

    def process(self, study_uid: str, files: list[TouchFile]) -> bool:
        """Register, assign, run workflows, then remove the touch files we saw; False when
        the study has no series JSON yet (it is looked at again later)."""
        arrival = study_from_series(self.tree, study_uid)
        if arrival is None:
            log.warning("study %s: no series indexed yet; waiting for the indexer", study_uid)
            self._backoff.hold(study_uid, INDEXER_WAIT_SECONDS)
            return False
        study = arrival.study
        known = self.control.study(study_uid)
        amendment = known is not None
        study.arrival = known.arrival if known else now_iso(self.clock)
        study.patient_id_hash = self.keyed.patient_id(arrival.patient_id)
        study.patient_name_hash = self.keyed.patient_name(arrival.patient_name)
        study.node = self.node
        try:
            stored = self.control.register_study(study)
            if stored.node and stored.node != self.node:  # a split study: report, not merge
                log.warning("study %s is split: node %s holds it, this node %s received "
                            "series of it too; they are not merged or sent from here (see "
                            "fiona status)", study_uid, stored.node, self.node)
                made = []
            else:
                made = self.assigner.on_arrival(arrival, amendment)
        except ControlPlaneError as exc:  # its text may quote a value the backend refused
            raise type(exc)(self.keyed.redact(str(exc), *arrival.identifiers)) from None
        if made:
            notify_forwarder(self.site)
        log.info("study %s %s: %d series, %d files, from %s to %s; %d request(s)", study_uid,
                 "amended" if amendment else "arrived", len(study.series),
                 sum(s.num_files for s in study.series), study.calling_ae, study.called_ae,
                 len(made))
        for workflow in self.workflows:
            workflow.run(study_uid, [s.uid for s in study.series], self.tree.raw / study_uid,
                         lambda text: self.keyed.redact(text, *arrival.identifiers))
        for touch in files:
            try:
                if touch.path.stat().st_mtime == touch.mtime:
                    touch.path.unlink()
            except FileNotFoundError:
                pass
        self.arrivals += 1
        return True

    def step(self) -> float:
        """Process what is due; returns how long to sleep at most."""
        ready, wait = self.due()
        if ready and not index_caught_up(self.tree):
            return 1.0  # series JSONs are still being written
        for study_uid, files in ready:
            try:
                if self.process(study_uid, files):
                    self._backoff.succeeded(study_uid)
            except ControlPlaneError as exc:
                delay = self._backoff.failed(study_uid)
                if isinstance(exc, Unavailable):
                    log.warning("study %s waits: the control plane is unreachable (%s); "
                                "retrying in %d s", study_uid, exc, delay)
                else:
                    log.error("study %s waits: the control plane refused it (%s); retrying in "
                              "%d s", study_uid, exc, delay)
        retry = self._backoff.next_wait()
        return wait if retry is None else min(wait, retry)

    def sweep_coupling(self, since: datetime | None) -> None:
        """Coupling rows entered in the control plane itself (REDCap) since `since` (all of
        them at start, for rows entered while the daemon was down)."""
        fetch = getattr(self.control, "coupling_rows_since", None)
        if fetch is None:
            return  # the local backend applies rows when they are uploaded
        if since is None:
            rows = self.control.coupling_rows()
        else:
            rows = fetch((since - SWEEP_OVERLAP).isoformat(sep=" ", timespec="seconds"))
        if rows:
            made = self.assigner.apply_coupling(rows)
            if made:
                notify_forwarder(self.site)
            log.info("coupling list: %d new row(s), %d request(s)", len(rows), len(made))

    def run(self, stop: threading.Event) -> None:
        wake = threading.Event()
        observer = Observer()
        observer.schedule(_Wake(wake), str(self.tree.arrived), recursive=False,
                          event_filter=_Wake.EVENTS)
        observer.start()
        last_sweep, since = 0.0, None  # type: float, datetime | None
        try:
            while not stop.is_set():
                wait = self.step()
                if self.clock.monotonic() - last_sweep > COUPLING_SWEEP_SECONDS:
                    stamp = self.clock.now()
                    try:
                        self.sweep_coupling(since)
                        since = stamp
                    except Unavailable as exc:
                        log.warning("coupling list not checked: %s", exc)
                    last_sweep = self.clock.monotonic()
                wake.wait(max(0.2, min(wait, 5.0)))
                wake.clear()
        finally:
            observer.stop()
            observer.join(5)


def run(config: Config, site_name: str | None, verbose: bool = False) -> int:
    site = config.site(site_name)
    with running(site, ARRIVAL.command, verbose) as stop:
        detector = ArrivalDetector(config, site, open_control_plane(config, site),
                                   Keyed.from_datadir(site.datadir))
        log.info("arrival detector for %s: quiet period %g s, control plane %s", site.datadir,
                 config.study_quiet_seconds, detector.control.kind)
        detector.run(stop)
    return 0
