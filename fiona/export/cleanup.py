"""`fiona clear-exports` (the original clearExports, SPEC §10): keep the exports folder small.

- work folders under `exports/tmp/` (and half-written files beside the zips) older than a day
  are removed: the worker that made them died, and it starts such a job over anyway;
- a ready export past its `expires` (EXPORTS.retention_days after it was made) loses its zip,
  `.sha256` and manifest; its job stays, state "expired", so the page can say what happened;
- while the exports file system is above EXPORTS.cleanup_percent, the oldest ready exports go
  too, before their time;
- a failed job is forgotten the retention time after it failed, an expired one the retention
  time after its zip went.

Open jobs (queued or being made) are never touched. One log line and one audit entry per
export removed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from .. import audit
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config
from .jobs import EXPIRED, FAILED, OPEN, READY, Job, JobStore
from .worker import disk_percent

log = logging.getLogger("fiona.clearexports")
STALE_AFTER = timedelta(days=1)


@dataclass
class Report:
    temp_removed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)      #: job ids whose zip went
    forgotten: list[str] = field(default_factory=list)    #: job ids whose job file went


class ExportCleanup:
    """One run for one site; the clock and the disk usage are injectable for tests."""

    def __init__(self, config: Config, datadir: Path, actor: str, clock: Clock = SYSTEM_CLOCK,
                 usage: Callable[[Path], float] = disk_percent):
        self.store = JobStore(datadir, clock)
        self.tree = self.store.tree
        self.datadir = datadir
        self.actor = actor
        self.retention = timedelta(days=config.exports["retention_days"])
        self.watermark = config.exports["cleanup_percent"]
        self.usage = usage

    def run(self) -> Report:
        report = Report()
        now = self.store.now()
        jobs = self.store.all()
        active = {j.id for j in jobs if j.state in OPEN}
        self._stale_temp(now, active, report)
        for job in jobs:
            if job.state == READY and job.expires and _time(job.expires) <= now:
                self._expire(job, "past its retention", report)
        if self.tree.exports.is_dir():
            ready = sorted((j for j in jobs if j.state == READY),
                           key=lambda j: (j.finished or "", j.id))
            for job in ready:
                if self.usage(self.tree.exports) <= self.watermark:
                    break
                self._expire(job, f"disk above EXPORTS.cleanup_percent {self.watermark:g}%",
                             report)
        for job in jobs:
            since = job.expires if job.state == EXPIRED else job.finished
            if job.state in (FAILED, EXPIRED) and since and \
                    _time(since) + self.retention <= now:
                self.store.remove(job)
                report.forgotten.append(job.id)
        return report

    def _stale_temp(self, now: datetime, active: set[str], report: Report) -> None:
        """Work folders and half-written files older than a day, of no open job."""
        candidates: list[Path] = []
        if self.tree.export_tmp.is_dir():
            candidates += [p for p in self.tree.export_tmp.iterdir() if p.name not in active]
        if self.tree.exports.is_dir():
            candidates += [p for p in self.tree.exports.glob(".*") if p.is_file()]
        for path in candidates:
            age = now - datetime.fromtimestamp(path.lstat().st_mtime, tz=now.tzinfo)
            if age < STALE_AFTER:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            report.temp_removed.append(path.name)
            log.info("removed stale export work file %s", path.name)

    def _expire(self, job: Job, why: str, report: Report) -> None:
        if job.zip:
            for suffix in ("", ".sha256", ".manifest.csv"):
                (self.tree.exports / f"{job.zip}{suffix}").unlink(missing_ok=True)
        job.state, job.expires = EXPIRED, self.store.stamp()
        self.store.save(job)
        report.expired.append(job.id)
        audit.append(self.datadir, self.actor, "export-expired",
                     {"job": job.id, "project": job.project, "zip": job.zip, "why": why})
        log.info("removed export %s of job %s (project %s): %s", job.zip, job.id,
                 job.project, why)


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def run(config: Config, args: argparse.Namespace) -> int:
    """`fiona clear-exports`: 0 with a summary on stdout."""
    from ..actions import OsActor
    from ..daemon import setup_logging

    site = config.site(args.site)
    setup_logging(site, "clearExports", args.verbose)
    report = ExportCleanup(config, site.datadir, OsActor.current().name).run()
    print(f"removed {len(report.expired)} export(s), {len(report.temp_removed)} stale work "
          f"folder(s) or file(s); forgot {len(report.forgotten)} finished job(s)",
          file=sys.stdout)
    return 0
