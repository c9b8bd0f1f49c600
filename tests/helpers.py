"""Helpers for tests: a real FIONA data tree with its daemons as processes, DCMTK clients, waits.

Test modules import these by name (`from helpers import Gateway`); the fixtures that build on
them live in conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fiona.bootstrap import init
from fiona.tree import Tree
from procs import spawn

DCMTK_DIR = "/usr/bin"  # DCMTK's own tools, not same-named Python shims earlier on PATH


def dcmtk(tool: str) -> str:
    path = os.path.join(DCMTK_DIR, tool)
    if not os.access(path, os.X_OK):
        pytest.fail(f"DCMTK's {tool} is missing at {path}: `make test` installs the Debian "
                    f"package dcmtk")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port` (a server is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def in_threads(work: Callable[[int], object], count: int = 8, timeout: float = 60.0
               ) -> list[Exception]:
    """Run work(0) ... work(count - 1) at once, each on its own thread; the exceptions raised."""
    errors: list[Exception] = []

    def run(t: int) -> None:
        try:
            work(t)
        except Exception as exc:  # pragma: no cover - reported by the caller's assert
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Gateway:
    """A FIONA installation in a temporary folder, with its daemons as child processes."""

    def __init__(self, datadir: Path, port: int, extra_config: dict | None = None):
        self.datadir = datadir
        self.port = port
        self.config = init(datadir, port=port, ip="127.0.0.1", extra=extra_config)
        self.tree = Tree(datadir)
        self.procs: dict[str, subprocess.Popen] = {}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fiona", "--config", str(self.config), *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"fiona {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def start(self, daemon: str) -> subprocess.Popen:
        """Start a daemon, stopped at the end of the test by conftest's autouse fixture if
        the test does not stop it. It also exits if pytest dies (FIONA_SUPERVISOR_PID, as
        under `fiona up`): start it from pytest's main thread, whose exit would stop it."""
        env = {**os.environ, "FIONA_SUPERVISOR_PID": str(os.getpid())}
        with open(self.datadir / f"{daemon}.test.log", "ab") as log:
            proc = spawn(self.command(daemon), stdout=log, stderr=log, env=env)
        self.procs[daemon] = proc
        if daemon == "storescp":
            wait_for(lambda: listening(self.port), 20, "the receiver to listen")
        return proc

    def stop(self, daemon: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(daemon)
        proc.send_signal(sig)
        proc.wait(60)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def storescu(self, *paths: Path | str, aec: str = "FIONA", aet: str = "STORESCU",
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = [dcmtk("storescu"), "-v", "+sd", "-aet", aet, "-aec", aec, *extra,
               "127.0.0.1", str(self.port), *map(str, paths)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TCP_NODELAY": "1"})

    # --- what landed -----------------------------------------------------------------------
    def archive_files(self) -> list[Path]:
        return sorted(p for p in self.tree.archive.glob("scp_*/*") if not p.name.startswith("."))

    def series_json(self, study: str, series: str) -> dict | None:
        try:
            return json.loads(self.tree.series_json(study, series).read_text())
        except FileNotFoundError:
            return None

    def wait_indexed(self, study: str, series: str, count: int, timeout: float = 120) -> dict:
        def done():
            data = self.series_json(study, series)
            return data if data and data.get("NumFiles") == count else None
        return wait_for(done, timeout, f"series {series} indexed with {count} files")

    def quarantined(self, stage: str = "receive") -> list[dict]:
        return [json.loads(p.read_text())
                for p in sorted((self.tree.quarantine / stage).glob("*/reason.json"))]


def raw_c_store(port: int, payload: bytes, sop_class: str, sop_instance: str,
                transfer_syntax: str = "1.2.840.10008.1.2.1") -> int:
    """Send `payload` as the data set of a C-STORE exactly as given, with pynetdicom as the
    client (DCMTK's storescu refuses to send files it cannot parse). Returns the status."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE("RAWSCU")
    ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="FIONA")
    assert assoc.is_established, "the receiver refused the association"
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(payload)
        context = assoc._get_valid_context(sop_class, transfer_syntax, "scu")
        # pause the association's own reactor, as pynetdicom's send_c_store does, so that
        # the response comes to us
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, context.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()
