"""The indexer daemon (`fiona process-single-file`; original `processSingleFile3.py start`).

It consumes the receiver's journal from its durable position: on start it replays whatever
arrived while it was down, then it sleeps on the wake-up pipe (or a short timeout) and reads
again. For each file it links the instance into raw/, participants/ and srs/, touches the
series arrival file (dated when the file was received, so an indexer working off a backlog does
not lengthen the study's quiet period) and merges the image into its series JSON; JSONs are
written and the journal position committed once per batch, so a burst of images costs one
write per series.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from .. import quarantine
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site
from ..daemon import running
from ..journal import RECEIVED, FileEvent, JournalReader, Position, WakeupListener
from ..suite import INDEXER
from ..tree import (
    Tree,
    arrival_name,
    safe_name,
    symlink,
    touch,
    valid_uid,
)
from .classify import RuleSet
from .csa import siemens_diffusion_entry
from .header import ImageRecord
from .labels import LabelMemo
from .series import SeriesRecord

log = logging.getLogger(INDEXER.logger)

CONSUMER = "indexer"
BATCH = 500
IDLE_EVICT_SECONDS = 600


def read_image(path: Path) -> Dataset:
    """The header of an archived file (pixel data is never read here)."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def _date_time(ds: Dataset) -> str:
    """`<StudyDate>_<StudyTime>` for participants/, digits only, `unknown` where missing."""
    date = "".join(c for c in str(ds.get("StudyDate", "") or "") if c.isdigit()) or "unknown"
    time_ = str(ds.get("StudyTime", "") or "").split(".")[0]
    time_ = "".join(c for c in time_ if c.isdigit()) or "unknown"
    return f"{date}_{time_}"


def journal_reader(tree: Tree) -> JournalReader:
    """The indexer's read position in the receiver's journal (one definition of its names)."""
    return JournalReader(tree.journal, RECEIVED, CONSUMER)


def caught_up(tree: Tree) -> bool:
    """True when the indexer (in any process) has taken in every file the receiver
    journalled, so the series JSONs are complete (asked by the arrival detector)."""
    return journal_reader(tree).caught_up()


class Indexer:
    """Turns archived files into the raw/ tree and series JSONs; one per site. `clock`
    decides when a quiet series is forgotten and when a burst is flushed."""

    def __init__(self, site: Site, rules: RuleSet, clock: Clock = SYSTEM_CLOCK):
        self.site = site
        self.clock = clock
        self.tree = Tree(site.datadir).make()
        self.rules = rules
        self.labels = LabelMemo(rules)
        self.reader = journal_reader(self.tree)
        self.series: dict[tuple[str, str], SeriesRecord] = {}
        self._touched: dict[tuple[str, str], float] = {}
        self._participant_links: dict[tuple[str, str], Path] = {}
        self.indexed = 0
        self._read_to: Position | None = None

    # --- one file ------------------------------------------------------------------------------
    def index_file(self, event: FileEvent, announce: bool = True) -> None:
        """Link one archived file and merge it into its series; `announce` touches the series
        arrival file for the detector (`fiona reindex` does not: nothing arrived)."""
        path = event.path(self.tree)
        ds = read_image(path)
        study = valid_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series = valid_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop = valid_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        record = self._series(study, series)
        symlink(path, self.tree.series_dir(study, series) / sop)
        self._link_participant(ds, study, series)
        if str(ds.get("Modality", "")) == "SR":
            maker = safe_name(ds.get("Manufacturer"), default="_")
            symlink(path, self.tree.srs / maker / study / sop)
        if announce:  # when the file was received, not now: a backlog is not a new arrival
            touch(self.tree.arrived / arrival_name(event.caller, event.called, event.ip, study,
                                                     series), at=os.stat(path).st_mtime)

        image = ImageRecord(ds, event.caller, event.called, event.ip)
        labels = self.labels.labels(image, ds)
        record.add(image, labels, self.rules.series_level, siemens_diffusion_entry(ds))
        self.indexed += 1

    def _link_participant(self, ds: Dataset, study: str, series: str) -> None:
        """participants/<PatientID>/<date>_<time> -> raw/<Study>, made for the first image of a
        series the indexer holds (the others name the same link), and again after the series
        was quiet long enough to be forgotten (a cleaned-up study sent again)."""
        link = self.tree.participants / safe_name(ds.get("PatientID"), default="unknown") / (
            _date_time(ds))
        if self._participant_links.get((study, series)) != link:
            symlink(self.tree.raw / study, link)
            self._participant_links[(study, series)] = link

    def _series(self, study: str, series: str) -> SeriesRecord:
        key = (study, series)
        record = self.series.get(key)
        if record is None:
            record = SeriesRecord.load(self.tree.series_json(study, series),
                                       self.tree.series_dir(study, series))
            self.series[key] = record
        self._touched[key] = self.clock.monotonic()
        return record

    # --- batches -------------------------------------------------------------------------------
    def index_pending(self, limit: int = BATCH) -> int:
        """Index up to `limit` journal lines after the last one read; returns the count."""
        count = 0
        for line, pos in self.reader.read(limit, start=self._read_to):
            self._read_to = pos
            count += 1
            try:
                self.index_file(FileEvent.parse(line))
            except FileNotFoundError as exc:
                log.error("journal names %s but the file is gone; skipped (was it deleted by "
                          "hand?)", exc.filename)
            except Exception as exc:  # one bad file must not stop the indexer
                self._hold(line, exc)
        return count

    def flush(self) -> None:
        """Write the changed series JSONs, then commit the journal position past them."""
        for record in self.series.values():
            record.flush()
        if self._read_to is not None and self._read_to != self.reader.position:
            self.reader.commit(self._read_to)
        self._evict()

    def drain(self) -> int:
        """Index everything the journal holds now and flush (for `--once` and tests)."""
        total = 0
        while n := self.index_pending():
            total += n
        self.flush()
        return total

    def _hold(self, line: str, exc: Exception) -> None:
        """Keep the journal line and the error in quarantine. The reason, which is also
        logged, names only the kind of error: a reader's message may quote a header value
        (a name, a birth date), so the message itself stays in the quarantine folder."""
        reason = f"cannot index: {type(exc).__name__} (the message is in error.txt)"
        quarantine.hold(self.tree, "index", reason,
                        {"journal-line.txt": line.encode(), "error.txt": str(exc).encode()},
                        {"journal_line": line[:500]},
                        "the file stays in the archive, unindexed; fix the cause (see "
                        "error.txt) and send the study again")

    def _evict(self) -> None:
        """Forget series that have been quiet for a while (their JSON is on disk)."""
        now = self.clock.monotonic()
        for key, seen in list(self._touched.items()):
            if now - seen > IDLE_EVICT_SECONDS and not self.series[key].dirty:
                del self.series[key]
                del self._touched[key]
                self._participant_links.pop(key, None)

    def run(self, stop: threading.Event, poll: float = 2.0, flush_every: float = 1.0,
            settle: float = 0.2) -> None:
        """Replay the journal, then follow it, woken by the pipe, until `stop` is set.

        JSONs are written when the journal has been quiet for `settle` seconds, and at least
        every `flush_every` seconds while files keep coming, so a burst costs one write per
        series rather than one per image."""
        listener = WakeupListener(INDEXER.pipe_path(self.site))
        pending, first = 0, 0.0
        last_line = self.clock.monotonic()
        try:
            while not stop.is_set():
                n = self.index_pending()
                if n and not pending:
                    first = self.clock.monotonic()
                pending += n
                if not pending:
                    if self.clock.monotonic() - last_line > INDEXER.quiet_limit / 4:
                        # the heartbeat takes an indexer silent past its limit for hung
                        log.info("idle at journal position %s", self.reader.position)
                        last_line = self.clock.monotonic()
                    listener.wait(poll)
                    continue
                if (n and self.clock.monotonic() - first < flush_every) or (
                        not n and listener.wait(settle)):
                    continue
                self.flush()
                log.info("indexed %d files in %.2f s", pending, self.clock.monotonic() - first)
                last_line = self.clock.monotonic()
                pending = 0
        finally:
            self.flush()
            listener.close()


def load_rules(site: Site) -> RuleSet:
    """The site's classifyRules.json, else the shipped default."""
    path = Tree(site.datadir).config / "classifyRules.json"
    return RuleSet.load(path) if path.exists() else RuleSet.shipped()


def run(config: Config, site_name: str | None, verbose: bool = False) -> int:
    site = config.site(site_name)
    with running(site, INDEXER.command, verbose) as stop:
        indexer = Indexer(site, load_rules(site))
        log.info("indexer for %s started at journal position %s", site.datadir,
                 indexer.reader.position)
        indexer.run(stop)
        log.info("indexer stopped after %d files", indexer.indexed)
    return 0
