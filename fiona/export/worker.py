"""`fiona export-worker`: the daemon that makes queued exports (the original's createZipFile
job), one at a time, woken through its pipe when a job is queued.

Durability: the jobs are files (`fiona.export.jobs`); on start the worker takes every open job,
queued or in progress when it died. The zip of a job carries the job id in its name and appears
under that name only once complete (`pack.pack`), so a job whose zip exists is marked ready
without being made again (a kill between the rename and the job file's update makes no second
zip), and a job without one starts over from a clean slate (its work folder and half-written
files beside the zip are removed first: nothing half-made is ever offered).

A research PACS (or control plane) that cannot be reached leaves the job queued: it waits with
back-off and says so in `waiting`. Any other error fails the job with its reason. The password
is unsealed only for the run and erased from the job file when the zip exists.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path

from ..backoff import Backoff, Schedule
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, ConfigError, Site, read_secret
from ..control.base import ControlPlaneError
from ..daemon import running
from ..journal import WakeupListener, WakeupSender
from ..suite import EXPORTER
from ..tree import Tree
from . import mail
from .jobs import (
    CONVERTING,
    FAILED,
    IN_PROGRESS,
    OPEN,
    PACKING,
    QUEUED,
    READY,
    RETRIEVING,
    Job,
    JobError,
    JobStore,
    unseal,
)
from .profile import ProfileError
from .retrieve import ExportError, ExportUnavailable

log = logging.getLogger("fiona.exportworker")

#: waits of a job whose source is unavailable: 30 s doubling to 16 min, then every 16 min
RETRY = Schedule.doubling(30.0, 6)
POLL_SECONDS = 5.0          #: how often the worker looks for jobs when nobody wakes it
PROGRESS_SECONDS = 1.0      #: at most one job file write per this many seconds for progress
PHASES = {"retrieving": RETRIEVING, "converting": CONVERTING, "packing": PACKING}


def wake(site: Site) -> None:
    """Wake the worker after a job was queued; harmless when it is not running (it polls)."""
    sender = WakeupSender(EXPORTER.pipe_path(site))
    sender.notify("jobs")
    sender.close()


def disk_percent(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return 100.0 * usage.used / usage.total if usage.total else 0.0


class Worker:
    """Makes the jobs of one site; `due` and `process` are the daemon's loop, testable alone."""

    def __init__(self, config: Config, site: Site, clock: Clock = SYSTEM_CLOCK,
                 schedule: Schedule = RETRY, usage=disk_percent):
        self.config = config
        self.site = site
        self.tree = Tree(site.datadir)
        self.store = JobStore(site.datadir, clock)
        self.clock = clock
        self.backoff = Backoff(schedule, clock)
        self.usage = usage

    def due(self) -> list[Job]:
        """Open jobs whose wait (if any) is over, oldest first."""
        return [j for j in self.store.all() if j.state in OPEN and self.backoff.due(j.id)]

    def process(self, job: Job) -> None:
        """Take `job` as far as it goes now: ready, failed, or queued again to wait."""
        finished = self.finished_zip(job.id)
        if finished is not None:
            log.info("export job %s: its zip %s exists already", job.id, finished.name)
            self._ready(job, finished, job.problems)
            return
        if job.state in IN_PROGRESS:
            log.info("export job %s was %s when the worker stopped: starting it over",
                     job.id, job.state)
        self.remove_leftovers(job.id)
        self.tree.exports.mkdir(parents=True, exist_ok=True)
        percent = self.usage(self.tree.exports)
        if percent >= self.config.exports["refuse_percent"]:
            self._fail(job, f"the exports disk is {percent:.0f}% full (EXPORTS.refuse_percent "
                            f"{self.config.exports['refuse_percent']:g}); remove old exports "
                            f"(fiona clear-exports) and try again")
            return
        job.state, job.started, job.waiting, job.done, job.total = (
            RETRIEVING, self.store.stamp(), "", 0, 0)
        self.store.save(job)
        password = None
        try:
            if job.sealed_password:
                password = unseal(self._secret(), job.id, job.sealed_password)
            result = self._run(job, password)
        except ExportUnavailable as exc:
            delay = self.backoff.failed(job.id)
            job.state, job.done, job.total = QUEUED, 0, 0
            job.waiting = (f"{exc}; trying again after "
                           f"{self.store.stamp(timedelta(seconds=delay))}")
            self.store.save(job)
            log.warning("export job %s waits %.0f s: %s", job.id, delay, exc)
        except (ExportError, ProfileError, ControlPlaneError, ConfigError, JobError,
                OSError, ValueError) as exc:
            self.remove_leftovers(job.id)
            self._fail(job, str(exc) or type(exc).__name__)
        else:
            self._ready(job, result.zip, result.report.problems)

    def _run(self, job: Job, password: bytes | None):
        from ..control import open_control_plane
        from .job import ExportRequest
        from .job import run as run_export

        saved_at = self.clock.monotonic()

        def progress(phase: str, done: int, total: int) -> None:
            nonlocal saved_at
            state = PHASES.get(phase, job.state)
            now = self.clock.monotonic()
            job.done, job.total = done, total
            if state != job.state or now - saved_at >= PROGRESS_SECONDS or \
                    (total and done == total):
                job.state, saved_at = state, now
                self.store.save(job)

        request = ExportRequest(job.project, job.type, job.requester, job.participant,
                                job.event, job.study, job.profile, password, None,
                                job.noassign, job.id)
        return run_export(self.config, self.site, open_control_plane(self.config, self.site),
                          request, progress)

    def _secret(self) -> bytes:
        return read_secret(self.tree.config / "secret.key")

    def finished_zip(self, job_id: str) -> Path | None:
        """The complete zip of job `job_id`, if the worker made it already."""
        found = [p for p in self.tree.exports.glob(f"*_{job_id}.zip")
                 if not p.name.startswith(".")]
        return found[0] if found else None

    def remove_leftovers(self, job_id: str) -> None:
        """What a killed run of the job left: its work folder and half-written files."""
        shutil.rmtree(self.tree.export_tmp / job_id, ignore_errors=True)
        for path in self.tree.exports.glob(f"*_{job_id}.zip?*"):
            path.unlink(missing_ok=True)

    def _ready(self, job: Job, zipped: Path, problems: list[str]) -> None:
        job.state, job.zip, job.problems, job.waiting, job.reason = (
            READY, zipped.name, list(problems), "", "")
        job.sealed_password = None  # the zip exists: the password is no longer needed
        job.finished = self.store.stamp()
        job.expires = self.store.stamp(timedelta(days=self.config.exports["retention_days"]))
        job.done = job.total = max(job.done, job.total)
        self.store.save(job)
        self.backoff.succeeded(job.id)
        log.info("export job %s ready: %s (expires %s)", job.id, zipped.name, job.expires)
        self._mail(job)

    def _fail(self, job: Job, reason: str) -> None:
        job.state, job.reason, job.waiting = FAILED, reason, ""
        job.sealed_password = None
        job.finished = self.store.stamp()
        self.store.save(job)
        self.backoff.succeeded(job.id)
        log.warning("export job %s failed: %s", job.id, reason)

    def _mail(self, job: Job) -> None:
        """Tell the requester; a mail server that fails is logged, never fatal."""
        smtp = self.config.smtp
        if not smtp or not job.email or job.mailed:
            return
        try:
            mail.send_ready(job, smtp, mail.link(job, self.config.exports, self.config.web))
        except mail.MailError as exc:
            log.warning("export job %s: the ready mail was not sent: %s", job.id, exc)
            return
        job.mailed = True
        self.store.save(job)
        log.info("export job %s: ready mail sent", job.id)


def run(config: Config, site_name: str | None, verbose: bool = False) -> int:
    """The daemon: make due jobs, then sleep until woken, a wait is over or POLL_SECONDS."""
    site = config.site(site_name)
    with running(site, EXPORTER.command, verbose) as stop:
        listener = WakeupListener(EXPORTER.pipe_path(site))
        worker = Worker(config, site)
        log.info("export worker started for %s", site.datadir)
        try:
            while not stop.is_set():
                for job in worker.due():
                    if stop.is_set():
                        break
                    worker.process(job)
                wait = worker.backoff.next_wait()
                listener.wait(min(wait, POLL_SECONDS) if wait else POLL_SECONDS)
        finally:
            listener.close()
        log.info("export worker stopped")
    return 0
