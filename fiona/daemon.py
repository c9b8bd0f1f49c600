"""What every long-running daemon shares: its log file, pid file, pipe names and stop signal."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pydicom.config

from .config import Site
from .journal import WakeupSender
from .tree import FILE_MODE, Tree, atomic_write

#: subcommand -> the name of its log and pid files (the original script names, which admins know)
FILE_NAMES = {"storescp": "storescpd", "process-single-file": "processSingleFile",
              "detect-study-arrival": "detectStudyArrival",
              "anonymize-and-send": "anonymizeAndSend", "web": "web"}

PIPE_INDEXER = "processSingleFilePipe"
PIPE_FORWARDER = "anonymizeAndSendPipe"


def pipe_path(site: Site, name: str) -> Path:
    """A daemon's wake-up pipe. It lives in the site's `run/` folder (mode 0750) rather than
    in /tmp, where any local user could create it first and read or block the messages."""
    return Tree(site.datadir).run / f".{name}{site.suffix}"


def notify_forwarder(site: Site) -> None:
    """Wake the forwarder after new or renewed requests; harmless when it is not running
    (it polls as a fallback)."""
    sender = WakeupSender(pipe_path(site, PIPE_FORWARDER))
    sender.notify("requests")
    sender.close()


#: third-party loggers whose INFO is noise, or worse (pynetdicom logs every C-FIND response
#: data set, identifiers included): WARNING and up only, everything with -v
QUIET_LOGGERS = ("pynetdicom", "pydicom", "urllib3", "watchdog", "uvicorn.access")

#: set by `fiona up` in its daemons' environment: the daemon exits when that process dies
SUPERVISOR_VAR = "FIONA_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


class DaemonError(Exception):
    """A daemon cannot start; the text says why and what to do."""


def setup_logging(site: Site, daemon: str, verbose: bool = False) -> Path:
    """Log to `logs/<daemon><SITE>.log`, and to stderr when that is a terminal (under
    systemd or the bin/ scripts stderr is not, and the file alone keeps the log).

    pydicom's warnings about invalid values are silenced: the daemons validate what they use
    and log their own, actionable message instead."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    tree = Tree(site.datadir).make()
    path = tree.logs / f"{daemon}{site.suffix}.log"
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
        root.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    return path


class PidFile:
    """`run/<daemon><SITE>.pid`, locked while the daemon lives, removed when it exits, so a
    second instance for the same site refuses to start instead of competing."""

    def __init__(self, site: Site, daemon: str):
        self.path = Tree(site.datadir).make().run / f"{daemon}{site.suffix}.pid"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise DaemonError(f"{daemon} for {site.datadir} is already running (pid {other}); "
                              f"stop it first (bin/storectl.sh stop, or systemctl stop)") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)


@contextmanager
def running(site: Site, daemon: str, verbose: bool = False) -> Iterator[threading.Event]:
    """Set up logging, claim the pid file, and yield the stop event (SIGTERM/SIGINT)."""
    setup_logging(site, daemon, verbose)
    pid = PidFile(site, daemon)
    try:
        stop = stop_event()
        die_with_supervisor()
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
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise DaemonError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if str(os.getppid()) != supervisor:
        raise DaemonError(f"the supervisor (pid {supervisor}) that started this daemon is gone")


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a daemon finishes the work in hand and exits."""
    event = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return event
