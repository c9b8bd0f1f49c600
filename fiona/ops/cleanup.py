"""`fiona clear-old-files` (original clearOldFiles): free disk space above the cleanup
watermark without ever losing data that was not delivered.

The original deleted the oldest studies whatever their state. Here a study goes only when every
one of its transfer requests is delivered (complete and verified, for the revision last asked
for: `fiona.status.request_state`), oldest arrival first, until the disk is below
`DISK.cleanup_percent`. A study with a pending, held or failed request stays, and so does one
that is still arriving: touch files in `.arrived/`, received files the indexer has not taken in
yet, or an archive folder changed within the last hour (a file is stored a moment before it is
journaled). An unassigned study (no request)
goes only when the admin allows it (`--include-unassigned` or `DISK.cleanup_unassigned`) and it
arrived more than `RETENTION_DAYS_UNASSIGNED` days ago. A study on disk that the control plane
does not know is never removed.

The same run prunes the records of scans (`fiona.scanner.steps`: MPPS steps, which carry patient
names, and scan outcomes) concluded more than `DISK.scan_retention_days` ago, whatever the disk
usage, never a record of a study still active; one audit entry (written first) and one log
line name the UIDs.

Everything is decided from one read of the control plane, and each study's requests are read
again just before it is removed (a resend may have come meanwhile); when the control plane cannot
be reached nothing is removed. Each removal is an audit entry (written first: no entry, no
removal) and one log line naming the study UID only. Time and disk usage are injectable, so
tests decide both.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from .. import audit
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, ConfigError, Site
from ..control.base import ControlPlane, ControlPlaneError, Study, TransferRequest
from ..scanner.steps import Pruning, Steps
from ..status import DELIVERED, request_state
from ..tree import Tree
from .study_files import StudyFiles, arrival_files, unindexed_studies

log = logging.getLogger("fiona.cleanup")

#: a study whose archive folder changed this recently is still arriving
RECENT_SECONDS = 3600
#: (used, total) bytes of the file system holding a path
DiskUsage = Callable[[Path], tuple[int, int]]


def disk_usage(path: Path) -> tuple[int, int]:
    usage = shutil.disk_usage(path)
    return usage.used, usage.total


class CleanupError(Exception):
    """Cleanup stopped; the text says why and that nothing (more) was removed."""


@dataclass
class Candidate:
    study: str
    arrival: str
    why: str                  # "delivered", or "unassigned since <arrival>"
    files: StudyFiles
    size: int


@dataclass
class Report:
    percent_before: float
    percent_after: float
    watermark: float
    removed: list[Candidate] = field(default_factory=list)
    kept: Counter[str] = field(default_factory=Counter)   # reason -> studies kept for it
    scans: Pruning = field(default_factory=Pruning)       # scan records removed (dry run: would be)


class Cleanup:
    """One run of clear-old-files for one site."""

    def __init__(self, config: Config, site: Site, control: ControlPlane, actor: str,
                 clock: Clock = SYSTEM_CLOCK, usage: DiskUsage = disk_usage,
                 include_unassigned: bool = False):
        self.config = config
        self.site = site
        self.tree = Tree(site.datadir)
        self.control = control
        self.actor = actor
        self.clock = clock
        self.usage = usage
        self.include_unassigned = include_unassigned or config.cleanup_unassigned

    def percent(self, freed: int = 0) -> float:
        used, total = self.usage(self.site.datadir)
        return 100.0 * max(0, used - freed) / total if total else 0.0

    # --- what may go ----------------------------------------------------------------------------
    def candidates(self) -> tuple[list[Candidate], Counter]:
        """The studies that may go, oldest arrival first, and why the others stay."""
        try:
            requests = self.control.requests()
            studies = {s.uid: s for s in self.control.studies(include_hidden=True)}
        except ControlPlaneError as exc:
            raise CleanupError(f"the control plane cannot be reached ({exc}); nothing was "
                               f"removed") from None
        by_study: dict[str, list[TransferRequest]] = {}
        for req in requests:
            by_study.setdefault(req.study_uid, []).append(req)
        out: list[Candidate] = []
        kept: Counter[str] = Counter()
        unindexed = unindexed_studies(self.tree)
        for uid in self.tree.archived_studies():
            why = self._arriving(uid, unindexed) or \
                self._may_go(uid, by_study.get(uid, []), studies.get(uid))
            if why.startswith("keep: "):
                kept[why[6:]] += 1
                continue
            files = StudyFiles.find(self.tree, uid)
            arrival = studies[uid].arrival if uid in studies else ""
            out.append(Candidate(uid, arrival, why, files, files.size()))
        out.sort(key=lambda c: (c.arrival, c.study))
        return out, kept

    def _arriving(self, uid: str, unindexed: set[str]) -> str:
        """"keep: still arriving" while files of the study may be on their way, else ""."""
        try:
            changed = self.tree.study_archive(uid).stat().st_mtime
        except FileNotFoundError:
            return "keep: gone meanwhile"
        if uid in unindexed or arrival_files(self.tree, uid) or \
                self.clock.time() - changed < RECENT_SECONDS:
            return "keep: still arriving"
        return ""

    def _may_go(self, uid: str, requests: list[TransferRequest], study: Study | None) -> str:
        """"delivered" or "unassigned since ..." when the study may go, else "keep: <why>"."""
        if requests:
            states = {request_state(r) for r in requests}
            if states != {DELIVERED}:
                return "keep: " + sorted(states - {DELIVERED})[0]
            return "delivered"
        if study is None:
            return "keep: not registered in the control plane"
        if not self.include_unassigned:
            return "keep: unassigned"
        try:
            arrived = datetime.fromisoformat(study.arrival)
        except ValueError:
            return "keep: unassigned, arrival time unreadable"
        if self.clock.now() - arrived < timedelta(days=self.config.retention_days_unassigned):
            return "keep: unassigned, within retention"
        return f"unassigned since {study.arrival}"

    def _still_may_go(self, candidate: Candidate) -> bool:
        """Look at the study's files and requests again just before removing it."""
        if self._arriving(candidate.study, unindexed_studies(self.tree)):
            return False
        try:
            requests = self.control.requests(candidate.study)
        except ControlPlaneError as exc:
            raise CleanupError(f"the control plane cannot be reached ({exc}); stopped before "
                               f"study {candidate.study}") from None
        if candidate.why == "delivered":
            return bool(requests) and all(request_state(r) == DELIVERED for r in requests)
        return not requests

    # --- the run ----------------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> Report:
        """Remove candidates, oldest first, until the disk is below the watermark (dry run:
        what would go, the usage estimated from the archived files' sizes), then old scan
        records (not when the studies' part stopped with CleanupError)."""
        report = self._free_disk(dry_run)
        report.scans = self.prune_scans(dry_run)
        return report

    def prune_scans(self, dry_run: bool = False) -> Pruning:
        """Remove the MPPS steps and scan outcomes concluded before the retention."""
        before = self.clock.time() - 86400 * self.config.scan_retention_days
        steps = Steps(self.site.datadir)
        pruning = steps.prunable(before)
        if dry_run or not (pruning.steps or pruning.scans):
            return pruning
        try:
            audit.append(self.site.datadir, self.actor, "prune scan records",
                         {"steps": pruning.steps, "scans": pruning.scans,
                          "retention_days": self.config.scan_retention_days})
        except (OSError, ConfigError, audit.AuditError) as exc:
            raise CleanupError(f"the audit entry for pruning scan records could not be "
                               f"written ({exc}); nothing was pruned") from None
        steps.prune(pruning, before)
        log.info("pruned %d MPPS step(s) %s and %d scan outcome(s) %s", len(pruning.steps),
                 " ".join(pruning.steps), len(pruning.scans), " ".join(pruning.scans))
        return pruning

    def _free_disk(self, dry_run: bool) -> Report:
        watermark = self.config.cleanup_percent
        before = self.percent()
        report = Report(before, before, watermark)
        if report.percent_before <= watermark:
            return report
        candidates, report.kept = self.candidates()
        freed = 0
        for candidate in candidates:
            if report.percent_after <= watermark:
                break
            if dry_run:
                freed += candidate.size
                report.percent_after = self.percent(freed)
                report.removed.append(candidate)
                continue
            if not self._still_may_go(candidate):
                report.kept["changed meanwhile"] += 1
                continue
            self._remove(candidate)
            report.removed.append(candidate)
            report.percent_after = self.percent()
        return report

    def _remove(self, candidate: Candidate) -> None:
        try:
            audit.append(self.site.datadir, self.actor, "remove study",
                         {"study": candidate.study, "why": candidate.why,
                          "bytes": candidate.size})
        except (OSError, ConfigError, audit.AuditError) as exc:
            raise CleanupError(f"the audit entry for study {candidate.study} could not be "
                               f"written ({exc}); stopped, nothing more was removed") from None
        candidate.files.remove()
        log.info("removed study %s (%s, %d bytes)", candidate.study, candidate.why,
                 candidate.size)
