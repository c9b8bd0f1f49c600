"""`fiona up`: every daemon of the gateway in the foreground, for a first run and for benches.

Each daemon runs as its own process, exactly as systemd would run it, so they do not share one
interpreter lock and a crash of one does not take the others along; a daemon that exits is
restarted after a pause. Ctrl-C or SIGTERM stops them all cleanly, each finishing the work in
hand; if `fiona up` itself is killed (SIGKILL), its daemons exit too (daemon.die_with_supervisor),
so none is left holding the port.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import Config
from .daemon import SUPERVISOR_VAR
from .suite import DAEMONS

log = logging.getLogger("fiona.up")


def _commands(config: Config) -> list[list[str]]:
    base = [sys.executable, "-m", "fiona", "--config", str(config.path)]
    out = []
    for daemon in DAEMONS:
        if not daemon.wanted(config):
            continue
        sites = [s.name for s in config.all_sites()] if daemon.per_site else [""]
        for site in sites:
            out.append(base + [daemon.command] + (["--site", site] if site else []))
    return out


def _start(cmd: list[str]) -> subprocess.Popen:
    """A daemon that exits when this process dies (called from the main thread only: the
    kernel ties the daemon's death signal to the thread that started it)."""
    return subprocess.Popen(cmd, env={**os.environ, SUPERVISOR_VAR: str(os.getpid())})


def run(config: Config) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    procs: dict[tuple[str, ...], subprocess.Popen] = {}
    restarts: dict[tuple[str, ...], float] = {}
    for argv in _commands(config):
        procs[tuple(argv)] = _start(argv)
    for site in config.all_sites():
        print(f"FIONA is up: send DICOM to AE {site.aetitle} at {site.ip}:{site.port}, e.g.\n"
              f"  storescu -aec {site.aetitle} 127.0.0.1 {site.port} FILES...\n"
              f"data lands under {site.datadir}/site (archive/, raw/); logs in "
              f"{site.datadir}/logs. Ctrl-C stops.", flush=True)
    while not stop.wait(0.5):
        for cmd, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            due = restarts.setdefault(cmd, time.monotonic() + 5)
            if time.monotonic() >= due:
                log.warning("%s exited with %s; restarting", " ".join(cmd[4:]), proc.returncode)
                print(f"{' '.join(cmd[4:])} exited with status {proc.returncode}; restarting",
                      file=sys.stderr, flush=True)
                procs[cmd] = _start(list(cmd))
                del restarts[cmd]
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    print("FIONA stopped.", flush=True)
    return 0


def default_config_path() -> Path:
    """Where `fiona up` keeps its embedded-defaults config when none is named."""
    return Path("data") / "config" / "config.json"
