"""What every long-running daemon shares: its log file, its pid lock, readiness and stop signal.

The names of a daemon's files come from the suite table (`fiona.suite`); this module is how a
daemon uses them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pydicom.config

from .config import Site
from .journal import WakeupSender
from .parentdeath import die_with
from .suite import FORWARDER, STARTED, Daemon, daemon
from .tree import FILE_MODE, Tree, atomic_write, ensure_dir


def notify_forwarder(site: Site) -> None:
    """Wake the forwarder after new or renewed requests; harmless when it is not running
    (it polls as a fallback)."""
    sender = WakeupSender(FORWARDER.pipe_path(site))
    sender.notify("requests")
    sender.close()


#: third-party loggers whose INFO is noise, or worse (pynetdicom logs every C-FIND response
#: data set, identifiers included): WARNING and up only, everything with -v
QUIET_LOGGERS = ("pynetdicom", "pydicom", "urllib3", "watchdog", "uvicorn.access")


class NoTraceback(logging.Filter):
    """A third-party error without its traceback. pynetdicom logs a peer that drops the
    connection (the research PACS restarting) as an exception with a stack; FIONA's own line
    already says what happened and what it does next, and a traceback in a log means a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".")[0] in QUIET_LOGGERS:
            kind = record.exc_info[0].__name__ if record.exc_info[0] else "error"
            record.msg = f"{record.getMessage()} ({kind})"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


#: set by `fiona up` in its daemons' environment: the daemon exits when that process dies
SUPERVISOR_VAR = "FIONA_SUPERVISOR_PID"
#: set by `fiona ctl start`: the file descriptor on which the daemon says it is ready
READY_FD_VAR = "FIONA_READY_FD"


class DaemonError(Exception):
    """A daemon cannot start; the text says why and what to do."""


def setup_logging(site: Site, name: str, verbose: bool = False) -> Path:
    """Log to `logs/<name><SITE>.log` (the periodic jobs; daemons log through `running`)."""
    return log_to(Tree(site.datadir).make().logs / f"{name}{site.suffix}.log", verbose)


def log_to(path: Path, verbose: bool = False) -> Path:
    """Log to `path`, and to stderr when that is a terminal (under systemd or `fiona ctl`
    stderr is not, and the file alone keeps the log).

    pydicom's warnings about invalid values are silenced: the daemons validate what they use
    and log their own, actionable message instead."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    ensure_dir(path.parent)
    if not path.exists():
        atomic_write(path, b"", durable=False)
    os.chmod(path, FILE_MODE)
    fmt = logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if sys.stderr.isatty() or os.environ.get("FIONA_LOG_STDERR") == "1":
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        if not verbose:  # a filter on the handler sees the child loggers' records too
            handler.addFilter(NoTraceback())
        root.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    return path


def lock_state(pidfile: Path) -> tuple[bool, str]:
    """(running, pid): running when a process holds the pid file's lock; the pid is the file's
    text (that of a dead process when the file is stale)."""
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return False, ""
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, pid
        return False, pid
    finally:
        os.close(fd)


class PidFile:
    """`run/<files><SITE>.pid`, locked while the daemon lives, removed when it exits, so a
    second instance for the same site refuses to start instead of competing, and "running"
    means "the lock is held" (a file left by a killed daemon is stale, whatever pid it names).

    A context manager, so that `fiona ctl start` hands it to python-daemon's DaemonContext;
    `running` then finds the lock this process holds already."""

    _held: ClassVar[dict[Path, PidFile]] = {}

    def __init__(self, site: Site, entry: Daemon):
        self.path = entry.pid_path(site)
        self._hint = entry.stop_hint(site.name)
        self._what = f"{entry.command} for {site.datadir}"
        self._datadir = site.datadir
        self._fd: int | None = None

    def acquire(self) -> PidFile:
        """Lock the file and write our pid; the holder already, when this process has it."""
        held = PidFile._held.get(self.path)
        if held is not None:
            return held
        Tree(self._datadir).make()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DaemonError(f"{self._what} is already running (pid {other}); stop it "
                                  f"first: {self._hint}") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # else a stale file was removed under us: lock the new one
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        PidFile._held[self.path] = self
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        PidFile._held.pop(self.path, None)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PidFile:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def remove_stale(path: Path) -> None:
        """Remove the pid file of a dead daemon, under its lock (never one that is held)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)


def ready() -> None:
    """Say that this daemon is ready (its rule in the suite table): `fiona ctl start` returns
    then. Nothing happens when it was not started that way."""
    fd = os.environ.pop(READY_FD_VAR, None)
    if not fd:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except (OSError, ValueError):
        pass


@contextmanager
def running(site: Site, command: str, verbose: bool = False) -> Iterator[threading.Event]:
    """Set up logging, claim the pid file, and yield the stop event (SIGTERM/SIGINT). A daemon
    whose readiness rule is STARTED is ready here; the others call `ready` themselves."""
    entry = daemon(command)
    if entry.nice:
        os.nice(entry.nice)
    Tree(site.datadir).make()
    log_to(entry.log_path(site), verbose)
    pid = PidFile(site, entry).acquire()
    try:
        stop = stop_event()
        die_with_supervisor()
        if entry.ready == STARTED:
            ready()
        yield stop
    finally:
        pid.release()


def die_with_supervisor() -> None:
    """When started by a supervisor that names itself in $FIONA_SUPERVISOR_PID (`fiona up`),
    have the kernel send us SIGTERM when it dies, even by SIGKILL: we then finish the work in
    hand and exit, instead of living on as an orphan that holds the port. Set here, after
    exec, rather than in a preexec_fn (not safe with threads); a supervisor that died before
    this call is caught by comparing our parent with it."""
    supervisor = os.environ.pop(SUPERVISOR_VAR, None)  # not inherited by our own children
    if not supervisor:
        return
    problem = die_with(int(supervisor), signal.SIGTERM, "supervisor")
    if problem:
        raise DaemonError(problem)


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a daemon finishes the work in hand and exits."""
    event = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return event
