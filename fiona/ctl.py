"""`fiona ctl start|stop|restart|status|wake DAEMON [--site NAME]`: the daemons outside systemd.

"Running" has one definition: the daemon's pid file is locked (`fiona.daemon.PidFile`; the lock
goes with the process, so a pid file left by a killed daemon reads as stopped and its pid, maybe
reused by an unrelated process by now, is never signalled). `start` detaches the daemon with
python-daemon's `DaemonContext` (new session, cwd /, umask 027, output to logs/<name>.out, the pid
lock taken by the context) and returns only once the daemon says it is ready, through a pipe
whose end it inherits (`fiona.daemon.ready`); end-of-file on that pipe means it died starting.

Exit codes are LSB's: 0 done / running, 1 failed, 2 unknown daemon or site (a usage error),
3 stopped (status).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, Site
from .daemon import READY_FD_VAR, DaemonError, PidFile, lock_state
from .journal import WakeupSender
from .suite import DAEMONS, Daemon
from .tree import ensure_dir

OK, FAILED, USAGE, STOPPED = 0, 1, 2, 3
ACTIONS = ("start", "stop", "restart", "status", "wake")
START_TIMEOUT = float(os.environ.get("FIONA_START_TIMEOUT", "30"))
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """One daemon of one site: what the actions work on."""

    config: Config
    daemon: Daemon
    site: Site

    @property
    def name(self) -> str:
        """The original name admins know, with the site: storescpdCT."""
        return f"{self.daemon.files}{self.daemon.suffix(self.site)}"

    def pid(self) -> int | None:
        """The pid of the running daemon, None when its pid file is not locked."""
        running, pid = lock_state(self.daemon.pid_path(self.site))
        return int(pid) if running and pid.isdigit() else None


def add_parser(sub, site_arg) -> None:  # noqa: ANN001 - argparse's private subparsers type
    names = ", ".join(d.command for d in DAEMONS)
    p = sub.add_parser("ctl", help="start, stop or query a daemon outside systemd",
                       description="Control one daemon without systemd. DAEMON is its subcommand "
                       f"({names}) or its original name (storectl.sh, ...). Exit codes (LSB): 0 "
                       "ok/running, 1 failed, 2 unknown daemon or site, 3 stopped.")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("daemon", metavar="DAEMON")
    site_arg(p)
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for start "
                   f"(default {START_TIMEOUT:g}, $FIONA_START_TIMEOUT) or stop ({STOP_TIMEOUT:g})")


def run(config: Config, args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .suite import UnknownDaemon, daemon

    try:
        entry = daemon(args.daemon)
        site = config.site(args.site if entry.per_site else None)
    except UnknownDaemon as exc:
        print(f"fiona ctl: {exc}", file=sys.stderr)
        return USAGE
    except ConfigError as exc:
        print(f"fiona ctl: {'; '.join(exc.errors)}", file=sys.stderr)
        return USAGE
    target = Target(config, entry, site)
    if args.action == "status":
        return status(target)
    if args.action == "start":
        return start(target, args.timeout or START_TIMEOUT, args.verbose)
    if args.action == "stop":
        return stop(target, args.timeout or STOP_TIMEOUT)
    if args.action == "restart":
        code = stop(target, args.timeout or STOP_TIMEOUT)
        return code if code != OK else start(target, args.timeout or START_TIMEOUT,
                                             args.verbose)
    return wake(target)


def status(target: Target) -> int:
    pid = target.pid()
    log = target.daemon.log_path(target.site)
    if pid:
        print(f"{target.name} is running (pid {pid}, log {log})")
        return OK
    _running, stale = lock_state(target.daemon.pid_path(target.site))
    print(f"{target.name} is stopped" + (f" (stale pid file {target.daemon.pid_path(target.site)}"
                                         f" names pid {stale})" if stale else ""))
    return STOPPED


def start(target: Target, timeout: float, verbose: bool = False) -> int:
    pid = target.pid()
    if pid:
        print(f"{target.name} is already running (pid {pid})")
        return OK
    console = target.daemon.console_path(target.site)
    ensure_dir(console.parent)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the detached daemon
        os.close(read_end)
        _daemonize(target, write_end, console, verbose)
    os.close(write_end)
    os.waitpid(child, 0)  # the intermediate process exits as soon as the daemon is detached
    try:
        said = _read_ready(read_end, timeout)
    finally:
        os.close(read_end)
    if said is None:
        print(f"fiona ctl: {target.name} is not ready after {timeout:g} s; see "
              f"{target.daemon.log_path(target.site)} and {console}", file=sys.stderr)
        return FAILED
    pid = target.pid()
    if not said or not pid:
        tail = _tail(console)
        print(f"fiona ctl: {target.name} exited during start-up"
              + (f"; last lines of {console}:\n{tail}" if tail else ""), file=sys.stderr)
        return FAILED
    print(f"{target.name} started (pid {pid}, log {target.daemon.log_path(target.site)})")
    return OK


def _daemonize(target: Target, ready_fd: int, console: Path, verbose: bool) -> None:
    """In the forked child: detach, take the pid lock, run the daemon, exit. Never returns."""
    from daemon import DaemonContext

    from . import cli

    code = 1
    try:
        with open(console, "ab") as out:
            context = DaemonContext(working_directory="/", umask=0o027, detach_process=True,
                                    stdout=out, stderr=out, files_preserve=[ready_fd],
                                    pidfile=PidFile(target.site, target.daemon),
                                    signal_map={})
            try:
                context.open()
            except DaemonError as exc:
                print(f"fiona: {exc}", file=sys.stderr, flush=True)
                os._exit(1)
            os.environ[READY_FD_VAR] = str(ready_fd)
            argv = ["--config", str(target.config.path), *(["-v"] if verbose else []),
                    target.daemon.command]
            if target.daemon.per_site and target.site.name:
                argv += ["--site", target.site.name]
            code = cli.main(argv)
            context.close()
    except BaseException:  # noqa: BLE001 - report whatever ended the daemon, then exit
        import traceback

        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_ready(fd: int, timeout: float) -> bytes | None:
    """What the daemon wrote before closing its end (b"ready\\n", or b"" when it died), None
    when it said nothing within `timeout`."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return None
        chunk = os.read(fd, 64)
        if not chunk or b"\n" in data + chunk:
            return data + chunk


def stop(target: Target, timeout: float, report: bool = True) -> int:
    """SIGTERM (and SIGCONT, so a stopped process gets it) to the lock holder, then wait for
    the lock to go; a stale pid file is removed under its lock, nobody is signalled. With
    `report`, say what happened on stdout or stderr."""
    pidfile = target.daemon.pid_path(target.site)
    pid = target.pid()
    if not pid:
        PidFile.remove_stale(pidfile)
        if report:
            print(f"{target.name} is not running")
        return OK
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
    deadline = time.monotonic() + timeout
    while target.pid() == pid or _alive(pid):
        if time.monotonic() >= deadline:
            if report:
                print(f"fiona ctl: {target.name} (pid {pid}) is still running {timeout:g} s "
                      f"after SIGTERM; see {target.daemon.log_path(target.site)}",
                      file=sys.stderr)
            return FAILED
        time.sleep(0.1)
    if report:
        print(f"{target.name} stopped (was pid {pid})")
    return OK


def kill(target: Target, grace: float) -> int | None:
    """For a hung daemon (the heartbeat): stop it, and SIGKILL the lock holder when it has not
    gone after `grace` seconds. Returns the pid it stopped, None when none ran."""
    pid = target.pid()
    if not pid:
        return None
    if stop(target, grace, report=False) != OK and target.pid() == pid:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    return pid


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wake(target: Target) -> int:
    """One line to the daemon's wake-up pipe, never blocking; nothing is lost when the daemon
    is not running (its work is in the journal or the control plane)."""
    if not target.daemon.pipe:
        with_pipe = ", ".join(d.command for d in DAEMONS if d.pipe)
        print(f"fiona ctl: {target.daemon.command} has no wake-up pipe; these have: {with_pipe}",
              file=sys.stderr)
        return USAGE
    pipe = target.daemon.pipe_path(target.site)
    if pipe.exists() and not pipe.is_fifo():
        print(f"fiona ctl: {pipe} is not a named pipe; refusing to write to it", file=sys.stderr)
        return FAILED
    if not target.pid():
        print(f"{target.name} is not running; nothing is lost: its work waits in the journal "
              f"and it catches up when it starts (fiona ctl start {target.daemon.command})")
        return OK
    sender = WakeupSender(pipe)
    sender.notify("wakeup")
    sender.close()
    print(f"woke {target.name} up ({pipe})")
    return OK


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
