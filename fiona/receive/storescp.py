"""The receiver daemon (`fiona storescp`; original `storectl.sh start`).

C-STORE and C-ECHO on DICOMIP:DICOMPORT for any called AE title (the called AE is recorded, as
it routes studies to projects). While the first character of the `enabled` file is 0 it refuses
new associations and lets the ones in progress finish.

One process runs Python's bytecode on one core at a time, so the receiver runs
RECEIVER_PROCESSES processes (default 1) that accept on the one listening socket:
the daemon (pid file, log, `fiona ctl`) binds it and serves, and starts the others as its
workers (`python -m fiona.receive.worker`). Each worker files, fsyncs and
journals on its own (the journal is shared under a lock: `fiona.journal`), so every object is
durable before its success status whichever process took it; the receipts of a worker that
died are journaled again by the daemon (`fiona.receive.receipts`). The workers die with the daemon
(SIGKILL from the kernel if it dies, so none lives on holding the port), stop when it stops,
and are started again if one dies. The daemon writes a byte to each worker's stdin every
second; a worker that has not heard from it for DAEMON_SILENCE_SECONDS refuses new
associations, so a hung daemon shows as a hung receiver (its C-ECHO fails and the heartbeat
restarts it) rather than one that answers from its workers alone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from ..config import Config, Site, is_enabled, load
from ..daemon import DaemonError, log_to, ready, running, stop_event
from ..suite import INDEXER, RECEIVER
from ..tree import Tree
from .store import StoreHandler
from .ul import AcceptorServer, Association

log = logging.getLogger(RECEIVER.logger)

#: how long stopping workers get to finish their associations (`fiona up` allows 40 s)
WORKER_STOP_SECONDS = 35.0
#: a worker refuses new associations when the daemon has been silent this long
DAEMON_SILENCE_SECONDS = 5.0


class DaemonBeat:
    """A worker's view of its daemon, which writes a byte to the worker's stdin every second."""

    def __init__(self, fd: int = 0):
        self.last = time.monotonic()
        self._fd = fd
        threading.Thread(target=self._listen, name="daemon-beat", daemon=True).start()

    def _listen(self) -> None:
        while True:
            try:
                if not os.read(self._fd, 64):
                    return  # the daemon is gone: the kernel's SIGKILL follows
            except OSError:
                return
            self.last = time.monotonic()

    def heard(self) -> bool:
        return time.monotonic() - self.last < DAEMON_SILENCE_SECONDS


class Receiver(StoreHandler):
    """The store handler plus the association log line and the `enabled` switch."""

    def __init__(self, config: Config, site: Site, daemon: DaemonBeat | None = None):
        """`daemon`: in a worker process, how it hears from the daemon."""
        super().__init__(Tree(site.datadir), config.refuse_store_percent,
                         INDEXER.pipe_path(site), shared=config.receiver_processes > 1,
                         join=daemon is not None)
        self.site = site
        self.daemon = daemon
        self._enabled = True
        self._checked = 0.0
        self._daemon_heard = True

    def on_closed(self, association: Association, how: str) -> None:
        seconds = time.monotonic() - association.started
        level = logging.INFO if how == "released" else logging.WARNING
        log.log(level, "association %s -> %s from %s: %d stored, %d failed, %d bytes, %.2f s, %s",
                association.calling_ae, association.called_ae, association.peer_ip,
                association.stored, association.failed, association.bytes, seconds, how)

    def accepting(self) -> bool:
        """The receive switch of the `enabled` file, read at most once a second; in a worker,
        also whether the daemon was heard from lately."""
        if self.daemon is not None:
            heard = self.daemon.heard()
            if heard != self._daemon_heard:
                log.log(logging.INFO if heard else logging.ERROR, "receiver worker pid %d: %s",
                        os.getpid(), "the daemon is heard from again" if heard else
                        f"no word from the daemon (pid {os.getppid()}) for "
                        f"{DAEMON_SILENCE_SECONDS:g} s: refusing new associations")
                self._daemon_heard = heard
            if not heard:
                return False
        now = time.monotonic()
        if now - self._checked > 1.0:
            self._checked = now
            enabled = is_enabled(self.site.datadir, "receive")
            if enabled != self._enabled:
                log.warning("receiver %s by %s", "enabled" if enabled else "disabled (refusing "
                            "new associations)", self.site.datadir / "config" / "enabled")
            self._enabled = enabled
        return self._enabled


def make_server(config: Config, site: Site) -> tuple[AcceptorServer, Receiver]:
    receiver = Receiver(config, site)
    server = AcceptorServer(site.ip, site.port, receiver, accepting=receiver.accepting)
    server.bind()
    return server, receiver


def serve(server: AcceptorServer, receiver: Receiver, stop: threading.Event,
          workers: Workers | None = None) -> None:
    """Accept on a thread until `stop` (ticking the workers every second meanwhile, and
    telling them to stop first), then finish the associations in progress."""
    thread = threading.Thread(target=server.serve_forever, name="storescp-accept",
                              daemon=True)
    thread.start()
    while not stop.wait(1.0 if workers else None):
        if workers:
            workers.tick()
    if workers:
        workers.terminate()
    log.info("stopping: finishing associations in progress")
    server.shutdown()
    thread.join(5)
    receiver.close()


class Workers:
    """The daemon's worker processes, accepting on its listening socket."""

    def __init__(self, config: Config, site: Site, listen_fd: int, count: int, verbose: bool,
                 on_exit: Callable[[int], None]):
        """`on_exit(pid)`: after a worker died (its receipts are recovered)."""
        self.cmd = [sys.executable, "-m", "fiona.receive.worker", "--config", str(config.path),
                    "--listen-fd", str(listen_fd), "--parent", str(os.getpid())]
        if site.name:
            self.cmd += ["--site", site.name]
        if verbose:
            self.cmd.append("-v")
        self.fd = listen_fd
        self.on_exit = on_exit
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.beats: list[int] = [-1] * count  # each worker's stdin (`DaemonBeat`)

    def tick(self) -> None:
        """Start every worker that is not running (from the main thread: the kernel's
        parent-death signal follows the thread that started a process), and tell each that
        the daemon lives (`DaemonBeat`)."""
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                try:
                    os.write(self.beats[i], b".")
                except OSError:  # full (the worker is stuck) or closed (it is exiting)
                    pass
                continue
            if proc is not None:
                log.error("receiver worker %d (pid %d) exited with status %s; starting it "
                          "again", i + 1, proc.pid, proc.returncode)
                self.on_exit(proc.pid)
                os.close(self.beats[i])
            read, self.beats[i] = os.pipe()
            os.set_blocking(self.beats[i], False)
            try:
                self.procs[i] = subprocess.Popen(self.cmd, pass_fds=(self.fd,), stdin=read)
            finally:
                os.close(read)

    def terminate(self) -> None:
        """SIGTERM to all: they refuse new associations and finish those in progress."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM to all, then wait for them to finish their associations."""
        self.terminate()
        running = [p for p in self.procs if p is not None and p.poll() is None]
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("receiver worker pid %d did not stop in %.0f s; killing it",
                          proc.pid, WORKER_STOP_SECONDS)
                proc.kill()
                proc.wait()
        for fd in self.beats:
            if fd >= 0:
                os.close(fd)


def run(config: Config, site_name: str | None, verbose: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then finish the associations in progress."""
    site = config.site(site_name)
    with running(site, RECEIVER.command, verbose) as stop:
        try:
            server, receiver = make_server(config, site)
        except OSError as exc:
            raise DaemonError(f"cannot listen on {site.ip}:{site.port}: {exc.strerror}; is "
                              f"another receiver using DICOMPORT {site.port}? Stop it or "
                              f"choose another port in {config.path}") from None
        log.info("FIONA receiver listening on %s:%d as %s (data under %s, %d process%s)",
                 site.ip, server.port, site.aetitle, site.datadir, config.receiver_processes,
                 "" if config.receiver_processes == 1 else "es")
        workers = Workers(config, site, server.listening_fd(), config.receiver_processes - 1,
                          verbose, receiver.receipts.recover)
        workers.tick()
        ready()
        if not receiver.accepting():
            log.warning("the receiver is switched off in %s: associations are refused until "
                        "its first character is 1", site.datadir / "config" / "enabled")
        try:
            serve(server, receiver, stop, workers)
        finally:
            workers.stop()
    return 0


def run_worker(config_path: str, site_name: str | None, listen_fd: int,
               verbose: bool) -> int:
    """A worker process (`fiona.receive.worker`): serve on the daemon's listening socket until
    SIGTERM, then finish the associations in progress."""
    stop = stop_event()
    config = load(config_path)
    site = config.site(site_name)
    log_to(RECEIVER.log_path(site), verbose)
    receiver = Receiver(config, site, DaemonBeat())
    server = AcceptorServer(site.ip, site.port, receiver, accepting=receiver.accepting)
    server.adopt(socket.socket(fileno=listen_fd))
    serve(server, receiver, stop)
    return 0
