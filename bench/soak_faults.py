"""The soak's faults: a seeded schedule, and what carries each one out.

- SIGKILL of each daemon (receiver, indexer, arrival, forwarder, web): `fiona up` restarts a
  daemon that exited after 5 s, as it does in production, so the harness only kills.
- SIGSTOP of the forwarder, SIGCONT some seconds later.
- Orthanc (the research PACS) stopped and started again.
- REDCap answering 500 for half the fault and not answering at all (the client's timeout
  fires) for the other half: a small HTTP proxy in front of the REDCap emulator, so the
  emulator stays as it is.
- The disk watermark crossed: `DISK.refuse_store_percent` is lowered to 1 % in config.json
  (any used disk is above it) and the receiver is restarted to read it (SIGTERM; `fiona up`
  starts it again); it then refuses every C-STORE with 0xA700 while it keeps running. Then
  the old value is written back and the receiver restarted again. This needs no privileges
  (no loop device or tmpfs to mount and fill).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.common import fiona_daemon_pid
from fiona.tree import atomic_write

#: name in the report -> (pid file name, subcommand)
DAEMONS = {"receiver": ("storescpd", "storescp"),
           "indexer": ("processSingleFile", "process-single-file"),
           "arrival": ("detectStudyArrival", "detect-study-arrival"),
           "forwarder": ("anonymizeAndSend", "anonymize-and-send"),
           "web": ("web", "web")}


class RedcapFaults:
    """An HTTP proxy for the REDCap API: passes requests on, or answers 500, or holds them
    unanswered until the fault ends (the client's own timeout decides when it gives up)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.mode = "pass"
        self.changed = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.mode == "error":
                    self._answer(500, "text/html", b"<h1>Internal Server Error</h1>")
                    return
                if proxy.mode == "hang":
                    while proxy.mode == "hang":
                        proxy.changed.wait(1.0)
                    self.close_connection = True
                    return  # the connection closes without an answer
                req = urllib.request.Request(proxy.upstream, data=body, method="POST", headers={
                    "Content-Type": self.headers.get("Content-Type",
                                                     "application/x-www-form-urlencoded")})
                try:
                    with urllib.request.urlopen(req, timeout=60) as rsp:
                        self._answer(rsp.status, rsp.headers.get("Content-Type", ""), rsp.read())
                except urllib.error.HTTPError as err:
                    self._answer(err.code, err.headers.get("Content-Type", ""), err.read())
                except OSError:
                    self.close_connection = True  # upstream down: so are we

            def _answer(self, status: int, ctype: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Silent."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="redcap-faults")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def set(self, mode: str) -> None:
        self.mode = mode
        self.changed.set()
        self.changed.clear()

    def stop(self) -> None:
        self.set("pass")
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Fault:
    at: float          # seconds after the start of the load
    kind: str          # kill, stop-forwarder, orthanc-down, redcap-faults, disk-full
    target: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        what = f"{self.kind} {self.target}".strip()
        return f"{what} at {self.at:.0f} s" + (f" for {self.seconds:.0f} s" if self.seconds else "")


def schedule(rng: random.Random, total: float, redcap: bool) -> list[Fault]:
    """Every fault once, at seeded times in the first 65 % of the load phase `total`, so that
    what they leave pending has time to drain. Durations shrink for short runs."""
    def at() -> float:
        return rng.uniform(0.05 * total, 0.6 * total)

    scale = min(1.0, total / 300)
    faults = [Fault(at(), "kill", name) for name in DAEMONS]
    faults.append(Fault(at(), "stop-forwarder", seconds=rng.uniform(10, 20) * scale + 3))
    faults.append(Fault(at(), "orthanc-down", seconds=rng.uniform(10, 25) * scale + 3))
    faults.append(Fault(at(), "disk-full", seconds=rng.uniform(10, 15) * scale + 4))
    if redcap:
        faults.append(Fault(at(), "redcap-faults", seconds=max(20.0, 60 * scale)))
    return sorted(faults, key=lambda f: f.at)


class Injector:
    """Carries out a schedule on threads (faults may overlap), logging each to `say`."""

    def __init__(self, faults: list[Fault], run_dir: Path, config: Path, orthanc,
                 redcap: RedcapFaults | None, say: Callable[[str], None]):
        self.faults = faults
        self.run_dir = run_dir
        self.config = config
        self.orthanc = orthanc
        self.redcap = redcap
        self.say = say
        self.done = 0
        self.errors: list[str] = []
        self._stopped_forwarder: int | None = None
        self._config_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def run(self, t0: float, stop: threading.Event) -> None:
        for fault in self.faults:
            if stop.wait(max(0.0, t0 + fault.at - time.monotonic())):
                return
            t = threading.Thread(target=self._one, args=(fault, stop), daemon=True,
                                 name=f"fault-{fault.kind}")
            t.start()
            self._threads.append(t)

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def _one(self, fault: Fault, stop: threading.Event) -> None:
        self.say(f"fault: {fault}")
        try:
            getattr(self, "_" + fault.kind.replace("-", "_"))(fault, stop)
            self.done += 1
        except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
            self.errors.append(f"{fault}: {exc!r}")
        finally:
            self.resume_forwarder()

    def pid(self, name: str, timeout: float = 30.0) -> int:
        """The live pid of a daemon, waiting while `fiona up` restarts it."""
        pid_name, sub = DAEMONS[name]
        deadline = time.monotonic() + timeout
        while (pid := fiona_daemon_pid(self.run_dir, pid_name, sub)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} is not running")
            time.sleep(0.2)
        return pid

    def _kill(self, fault: Fault, stop: threading.Event) -> None:
        os.kill(self.pid(fault.target), signal.SIGKILL)

    def _stop_forwarder(self, fault: Fault, stop: threading.Event) -> None:
        self._stopped_forwarder = pid = self.pid("forwarder")
        os.kill(pid, signal.SIGSTOP)
        stop.wait(fault.seconds)

    def resume_forwarder(self) -> None:
        pid, self._stopped_forwarder = self._stopped_forwarder, None
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _orthanc_down(self, fault: Fault, stop: threading.Event) -> None:
        self.orthanc.stop()
        stop.wait(fault.seconds)
        self.orthanc.start()

    def _redcap_faults(self, fault: Fault, stop: threading.Event) -> None:
        assert self.redcap is not None
        try:
            self.redcap.set("error")
            if not stop.wait(fault.seconds / 2):
                self.redcap.set("hang")
                stop.wait(fault.seconds / 2)
        finally:
            self.redcap.set("pass")

    def _disk_full(self, fault: Fault, stop: threading.Event) -> None:
        with self._config_lock:
            original = self.config.read_bytes()
            config = json.loads(original)
            config["DISK"] = {"refuse_store_percent": 1, "cleanup_percent": 0}
            atomic_write(self.config, (json.dumps(config, indent=2) + "\n").encode())
            try:
                self._restart_receiver()
                stop.wait(fault.seconds)
            finally:
                atomic_write(self.config, original)
                self._restart_receiver()

    def _restart_receiver(self) -> None:
        old = self.pid("receiver")
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while fiona_daemon_pid(self.run_dir, *DAEMONS["receiver"]) in (old, None):
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver did not come back after SIGTERM")
            time.sleep(0.2)
