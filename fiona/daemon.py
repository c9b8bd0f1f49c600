"""What every long-running daemon shares: its log file, pid file, pipe names and stop signal."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import pydicom.config

from .config import Site
from .tree import FILE_MODE, Tree, atomic_write

PIPE_INDEXER = "processSingleFilePipe"


def pipe_path(site: Site, name: str) -> Path:
    """A daemon's wake-up pipe. It lives in the site's `run/` folder (mode 0750) rather than
    in /tmp, where any local user could create it first and read or block the messages."""
    return Tree(site.datadir).run / f".{name}{site.suffix}"


def setup_logging(site: Site, daemon: str, verbose: bool = False) -> Path:
    """Log to `logs/<daemon><SITE>.log` and to stderr; returns the log file path.

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
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    return path


def write_pid(site: Site, daemon: str) -> Path:
    path = Tree(site.datadir).make().run / f"{daemon}{site.suffix}.pid"
    atomic_write(path, f"{os.getpid()}\n".encode(), durable=False)
    return path


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a daemon finishes the work in hand and exits."""
    event = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return event
