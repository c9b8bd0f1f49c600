"""The forwarding daemon (`fiona anonymize-and-send`; original `anonymizeAndSend.py`).

It takes pending transfer requests oldest first, de-identifies the study's series into a work
folder inside the data tree (the archived originals stay untouched, and no unredacted copy is
ever written), sends to the destination, verifies arrival once every file is sent, and writes
the outcome back to the control plane. De-identifying and sending overlap: a pool of processes
(one per core, `fiona.send.pool`) runs the pipeline, gate included, on every file, while the
files already de-identified go out over the destination's parallel associations
(`Destination.send_stream`). A file that fails the verification gate (or its masking) stops the
whole request there: nothing after it is sent, and the request fails with the reason. Nothing is
marked sent before the destination holds every file; a forwarder killed mid-request leaves it
pending and does it again, into the same de-identified study. While it has no request, the
forwarder de-identifies the studies in their quiet period whose arrival is going to make one
(`fiona.send.prepare`), so that the request finds most files done.

A request is pending while its revision is above the revision the forwarder last did
(`TransferRequest.pending`); the forwarder completes exactly the revision it read, so a resend
made while it was sending keeps the request pending. A peer that is down keeps the request
pending and is retried with back-off (`fiona.backoff`, BACKOFF_SECONDS); a permanent failure
(the gate, a study gone from disk, a refused object) records the attempt time as `transferred`
with the error flags and message and marks the revision done, so it is not retried until
someone asks again (resend). A request for a project that is inactive or outside its ethics
approval period is held: it stays pending with the reason as its message and goes once the
project is open again. Mapped UIDs are keyed and deterministic, so a request that is repeated
after a crash or a late series lands in the same de-identified study and the destination
overwrites, never duplicates. Time comes from an injectable `Clock`, so tests advance it
instead of sleeping.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ..backoff import Backoff, Schedule
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site, read_secret
from ..control import open_control_plane
from ..control.base import (
    ControlPlane,
    ControlPlaneError,
    Project,
    TransferRequest,
    Unavailable,
    held_message,
    now_iso,
)
from ..daemon import running
from ..deid.gate import GateError
from ..deid.pipeline import Pipeline, ProjectRules, quarantine_gate_failure, settings_for
from ..journal import WakeupListener
from ..suite import FORWARDER
from ..tree import Tree, ensure_dir, instance_links
from .destinations import Destination, DestinationError, DestinationUnavailable, open_destination
from .pool import DeidPool, Done, Job, Stopped
from .prepare import Preparer, outputs

log = logging.getLogger(FORWARDER.logger)

POLL_SECONDS = 10.0
#: how often an idle forwarder looks for studies in their quiet period to prepare
PREPARE_POLL_SECONDS = 0.5
#: changed requests are asked for from this long before the last look (clocks may differ)
POLL_OVERLAP = timedelta(minutes=10)
BACKOFF_SECONDS = (5, 15, 60, 300)
#: a held request (project closed) is looked at again after this long
HOLD_SECONDS = 60
ERROR_DEID, ERROR_SEND, MASKED = 1, 2, 3


class PermanentFailure(Exception):
    """The request cannot succeed as it is; `flag` says which stage failed."""

    def __init__(self, flag: int, message: str):
        super().__init__(message)
        self.flag = flag


def destination_name(config: Config, project: Project) -> str:
    """Where a project's studies go: DESTINATIONS.research, else the first destination."""
    return "research" if "research" in config.destinations else next(iter(config.destinations))


def identity(req: TransferRequest) -> tuple[str, int]:
    """What names a request from one read to the next: a reassign changes its key
    (participant, event), not its instance."""
    return (req.study_uid, req.instance)


@dataclass
class Outcome:
    files: int = 0
    dropped: int = 0
    masked: int = 0
    #: files de-identified ahead, in the study's quiet period
    prepared: int = 0
    series: dict[str, int] = field(default_factory=dict)   # mapped series UID -> files
    mapped_study: str = ""
    #: seconds from the start of the request: first file out, every file sent, verified
    first_out: float = 0.0
    sent: float = 0.0
    verified: float = 0.0


class Forwarder:
    """Processes transfer requests for one site."""

    def __init__(self, config: Config, site: Site, control: ControlPlane,
                 clock: Clock = SYSTEM_CLOCK, workers: int | None = None):
        self.config = config
        self.clock = clock
        self.site = site
        self.tree = Tree(site.datadir).make()
        self.control = control
        self.key = read_secret(site.datadir / "config" / "secret.key")
        self._backoff = Backoff(Schedule(BACKOFF_SECONDS), clock)
        self._pending: dict[tuple[str, int], TransferRequest] = {}
        self._since: str | None = None
        #: de-identification processes (default one per core; 1: in this process)
        self.pool = DeidPool(workers)
        #: de-identifies studies in their quiet period, ahead of their requests
        self.preparer = Preparer(self.tree, control, self.key, self.pool, clock,
                                 config.study_quiet_seconds)

    # --- one request --------------------------------------------------------------------------
    def process(self, req: TransferRequest) -> None:
        """Do revision `req.revision` of a request: send it, hold it, back off or fail."""
        started = self.clock.monotonic()
        key, ident = req.key(), identity(req)
        try:
            project = self.control.project(req.project)
            reason = project.approval_problem(self.clock.now().date())
            if reason:
                self.preparer.discard(req.study_uid, req.project)  # it may be held for days
                self._hold(req, reason)
                return
            outcome = self._deidentify_and_send(req, project)
        except PermanentFailure as exc:
            self._pending.pop(ident, None)
            self._finish(req, started, error=(exc.flag, str(exc)))
            log.error("request %s/%s/%s for study %s failed: %s", *key[1:], key[0], exc)
            return
        except (DestinationUnavailable, Unavailable) as exc:
            self._retry_later(req, exc)
            return
        except Exception as exc:  # a bug or an unreadable file must not stop the daemon
            log.exception("request for study %s failed unexpectedly", req.study_uid)
            self._pending.pop(ident, None)
            self._finish(req, started, error=(ERROR_DEID, f"internal error: "
                                              f"{type(exc).__name__}: {str(exc)[:300]}"))
            return
        self._backoff.succeeded(ident)
        self._pending.pop(ident, None)
        req.mapped_uid = outcome.mapped_study
        self._finish(req, started, masked=outcome.masked > 0)
        log.info("study %s -> %s/%s/%s: %d files in %d series sent and verified as %s "
                 "(%d dropped, %d masked, %d de-identified ahead); de-identified and sent in "
                 "%.2f s (first file out after %.2f s), verified in %.2f s", req.study_uid,
                 req.project, req.participant, req.event, outcome.files, len(outcome.series),
                 outcome.mapped_study, outcome.dropped, outcome.masked, outcome.prepared,
                 outcome.sent, outcome.first_out, outcome.verified - outcome.sent)

    def process_claimed(self, req: TransferRequest) -> None:
        """`process` a request of the batch `due` claimed if this forwarder still holds it
        (the claim renewed): sending the batch's earlier requests may outlast the lease, and
        another forwarder that took the request then must be its only sender."""
        if self.control.renew_claim(req):
            self.process(req)
        else:
            self._pending.pop(identity(req), None)

    def _retry_later(self, req: TransferRequest, exc: Exception) -> None:
        """Keep the request pending and try again later, waiting longer each time; a
        destination's reason shows on the request (written when it changes)."""
        delay = self._backoff.failed(identity(req))
        log.warning("study %s for %s: destination unavailable (%s); retrying in %d s",
                    req.study_uid, req.project, exc, delay)
        message = f"destination unavailable, retrying: {exc}"
        if isinstance(exc, DestinationUnavailable) and (req.error_message != message
                                                        or req.error_flags):
            req.error_message, req.error_flags, req.complete = message, set(), False
            self.control.update_request(req)  # done_revision unchanged: still pending

    def _hold(self, req: TransferRequest, reason: str) -> None:
        """Keep the request pending, neither sent nor failed, with the reason on it (written
        once, not at every look); look again after HOLD_SECONDS."""
        self._backoff.hold(identity(req), HOLD_SECONDS)
        message = held_message(reason)
        if req.error_message == message and not req.error_flags:
            return
        req.error_message, req.error_flags, req.complete = message, set(), False
        self.control.update_request(req)  # done_revision unchanged: still pending
        log.warning("request for study %s held: %s", req.study_uid, reason)

    def _finish(self, req: TransferRequest, started: float, error: tuple[int, str] | None = None,
                masked: bool = False) -> None:
        """Record the outcome of the revision this forwarder read, and only that one."""
        req.transferred = now_iso(self.clock)
        req.done_revision = req.revision
        req.active_proc_time = round(self.clock.monotonic() - started, 3)
        req.error_flags = {error[0]} if error else ({MASKED} if masked else set())
        req.error_message = error[1] if error else ""
        req.complete = error is None
        self.control.update_request(req)

    def _deidentify_and_send(self, req: TransferRequest, project: Project) -> Outcome:
        study_dir = self.tree.raw / req.study_uid
        if not study_dir.is_dir():
            raise PermanentFailure(ERROR_DEID, f"study {req.study_uid} is gone from disk "
                                               f"({study_dir}); it cannot be sent")
        try:
            destination = open_destination(destination_name(self.config, project), self.config)
        except DestinationError as exc:
            raise PermanentFailure(ERROR_SEND, f"send: {exc}") from None
        work = ensure_dir(self.tree.work / f"{req.project}-{uuid.uuid4().hex[:12]}")
        try:
            return self._stream(req, project, study_dir, work, destination)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.preparer.discard(req.study_uid, req.project)

    def _stream(self, req: TransferRequest, project: Project, study_dir: Path, work: Path,
                destination: Destination) -> Outcome:
        """De-identify into `work` while sending what is done; verify once at the end."""
        study = self.control.study(req.study_uid)
        labels = {s.uid: s.classify_types for s in study.series} if study else {}
        try:
            settings = settings_for(project, req.participant, req.event, self.key,
                                    self.site.datadir)
        except ValueError as exc:
            raise PermanentFailure(ERROR_DEID, f"project {project.name}: {exc}; correct the "
                                   f"project and resend") from None
        rules = ProjectRules.of(project, labels)
        outcome = Outcome(mapped_study=Pipeline(settings, rules).mapped_uid(req.study_uid))
        sources = instance_links(study_dir)
        started = self.clock.monotonic()
        ready = self.preparer.ready(req, settings, rules, sources)
        files = self._outputs(req, Job.of(settings, rules, work), sources, ready, outcome,
                              started)
        try:
            result = destination.send_stream(files)
        except (DestinationUnavailable, PermanentFailure):
            raise
        except DestinationError as exc:
            raise PermanentFailure(ERROR_SEND, f"send: {exc}") from None
        finally:
            files.close()  # the pool's queued work is dropped, its running work awaited
        if not outcome.files:
            raise PermanentFailure(ERROR_DEID, "nothing to send: every series was dropped by "
                                               "the project's options")
        if result.failed:
            sop, reason = result.failed[0]
            raise PermanentFailure(ERROR_SEND, f"send: {len(result.failed)} object(s) refused, "
                                               f"e.g. {sop}: {reason}")
        outcome.sent = self.clock.monotonic() - started
        counts = destination.count_instances(outcome.mapped_study)
        for series, expected in outcome.series.items():
            if counts.get(series, 0) < expected:
                raise PermanentFailure(ERROR_SEND, (
                    f"verification: series {series} has {counts.get(series, 0)} of {expected} "
                    f"instances at the destination"))
        outcome.verified = self.clock.monotonic() - started
        return outcome

    def _outputs(self, req: TransferRequest, job: Job, sources: list[Path],
                 ready: dict[Path, Done], outcome: Outcome,
                 started: float) -> Generator[Path, None, None]:
        """The de-identified files of `sources` in order (those in `ready` prepared ahead),
        counted into `outcome`; a file stopped by the gate (handed to the quarantine) or by
        its masking raises PermanentFailure, so the sender takes nothing more."""
        for done in outputs(self.pool, job, sources, ready):
            if isinstance(done, Stopped):
                error = done.error()
                if isinstance(error, GateError):
                    quarantine_gate_failure(self.tree, error, f"{req.key()}\n{done.source}\n",
                                            {"study_uid": req.study_uid, "project": req.project})
                    raise PermanentFailure(ERROR_DEID, f"verification gate: {error}; nothing "
                                                       f"more of the study is sent")
                raise PermanentFailure(ERROR_DEID, f"{error}; the study is held, nothing more "
                                                   f"of it is sent")
            if done.dropped or done.path is None:
                outcome.dropped += 1
                continue
            outcome.masked += done.masked
            outcome.prepared += done.source in ready
            outcome.files += 1
            outcome.series[done.series_uid] = outcome.series.get(done.series_uid, 0) + 1
            if outcome.files == 1:
                outcome.first_out = self.clock.monotonic() - started
            yield done.path

    # --- the loop -------------------------------------------------------------------------------
    def due(self) -> list[TransferRequest]:
        """Pending requests whose retry time has come, oldest first. A backend that can say
        what changed (REDCap) is asked only for that after the first full look."""
        fetch = getattr(self.control, "requests_since", None)
        stamp = self.clock.now() - POLL_OVERLAP
        if fetch is None or self._since is None:
            mine = self.control.pending_requests(node=self.config.node, claim=True)
            self._pending = {identity(r): r for r in mine}
        else:
            for r in fetch(self._since, node=self.config.node):
                if r.pending:
                    self._pending[identity(r)] = r
                else:
                    self._pending.pop(identity(r), None)
        self._since = stamp.isoformat(sep=" ", timespec="seconds")
        return sorted((r for r in self._pending.values() if self._backoff.due(identity(r))),
                      key=lambda r: r.requested)

    def run(self, stop: threading.Event) -> None:
        listener = WakeupListener(FORWARDER.pipe_path(self.site))
        self.pool.start()
        self.preparer.clear()
        try:
            while not stop.is_set():
                receiving = self.preparer.in_progress()  # before the requests are read
                try:
                    work = self.due()
                except (Unavailable, ControlPlaneError) as exc:
                    log.warning("cannot read transfer requests: %s; retrying", exc)
                    work = []
                for req in work:
                    if stop.is_set():
                        break
                    try:
                        self.process_claimed(req)
                    except (Unavailable, ControlPlaneError) as exc:
                        log.warning("request for study %s not written back: %s",
                                    req.study_uid, exc)
                self.preparer.forget(receiving, {r.study_uid for r in self._pending.values()})
                if work:
                    listener.wait(0.1)
                else:
                    self._idle(stop, listener)
        finally:
            listener.close()
            self.pool.close()

    def _idle(self, stop: threading.Event, listener: WakeupListener) -> None:
        """Until woken, or POLL_SECONDS: prepare the studies in their quiet period. The
        times here are real, as the pipe's wait is."""
        deadline = time.monotonic() + POLL_SECONDS
        while not stop.is_set():
            try:
                busy = self.preparer.step(self.preparer.in_progress(),
                                          lambda: stop.is_set() or listener.poked())
            except Exception as exc:  # only an optimisation: the request does it all again
                log.warning("preparing studies ahead of their arrival failed (%s); trying "
                            "again in %g s", type(exc).__name__, POLL_SECONDS)
                listener.wait(max(0.0, deadline - time.monotonic()))
                return
            left = deadline - time.monotonic()
            if listener.poked():
                listener.wait(0)
                return
            if left <= 0 or (not busy and listener.wait(min(left, PREPARE_POLL_SECONDS))):
                return


def run(config: Config, site_name: str | None, verbose: bool = False) -> int:
    site = config.site(site_name)
    with running(site, FORWARDER.command, verbose) as stop:
        forwarder = Forwarder(config, site, open_control_plane(config, site))
        log.info("forwarder for %s: destinations %s", site.datadir,
                 ", ".join(config.destinations))
        forwarder.run(stop)
    return 0
