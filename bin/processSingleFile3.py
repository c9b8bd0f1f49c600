#!/usr/bin/env python3
"""processSingleFile3.py start|stop|status|restart|send|test [args]

Control FIONA's indexer (`fiona process-single-file`) outside systemd, under the name the original
installation used. A thin wrapper: everything real happens in the `fiona` command, which this
script runs as a program (it imports nothing from fiona). On a systemd host prefer
`systemctl start fiona-process-single-file[@SITE]` (see systemd/); do not mix the two for a site.

  start            run the indexer detached (new session), unless the pid file names a live one
  stop             SIGTERM the indexer named by the pid file, wait up to 30 s
  status           "running (pid N)" or "stopped"; exit 0 when running, 3 when stopped
  restart          stop, then start
  send [TEXT...]   wake the indexer up now (one line to its pipe, never blocking). The pipe is
                   only a wake-up: the receiver's journal holds the work, so nothing is lost when
                   the indexer is not running - it replays the journal when it starts.
  test FILE...     show how classifyRules.json labels FILE(s) (`fiona classify --test`)

Options: --site NAME (one of SITES in config.json; default the main receiver), --config PATH
(default $FIONA_CONFIG, else /data/config/config.json).

Files (DATADIR from `fiona config check`):
  pid file  DATADIR/site/run/processSingleFile<SITE>.pid    (written by the indexer itself)
  pipe      DATADIR/site/run/.processSingleFilePipe<SITE>
  log       DATADIR/logs/processSingleFile<SITE>.log        (written by the indexer itself)
  console   DATADIR/logs/processSingleFile<SITE>.out        (stdout/stderr: start-up errors)

Exit codes (LSB): 0 success / running, 1 failure, 2 usage, 3 stopped (status),
4 status unknown (status with a broken config), 6 not configured (config error).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

PROG = "processSingleFile3.py"
DAEMON = "processSingleFile"
SUBCOMMAND = "process-single-file"
PIPE = ".processSingleFilePipe"
DEFAULT_CONFIG = "/data/config/config.json"
START_TIMEOUT = float(os.environ.get("FIONA_START_TIMEOUT", "30"))
STOP_TIMEOUT = 30.0
SITE_RE = re.compile(r"^[A-Za-z0-9_-]+$")

# exit codes
OK, FAILED, USAGE, STOPPED, UNKNOWN, NOT_CONFIGURED = 0, 1, 2, 3, 4, 6


class Failure(Exception):
    """An explained failure: the message is printed and the script exits with `code`."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


# --- the fiona command --------------------------------------------------------------------------
def fiona_command() -> tuple[list[str], dict[str, str]]:
    """`fiona` from PATH, else `python -m fiona` with this checkout on PYTHONPATH."""
    env = dict(os.environ)
    exe = shutil.which("fiona")
    if exe:
        return [exe], env
    repo = Path(__file__).resolve().parent.parent
    if (repo / "fiona" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "fiona"], env


class Context:
    """Where one site's indexer keeps its pid file, pipe and logs."""

    def __init__(self, config: str, site: str, action: str):
        self.config = config
        self.site = site
        self.action = action
        self.fiona, self.env = fiona_command()
        self.name = f"{DAEMON}{site}"
        self.datadir = self._datadir()
        self.run_dir = self.datadir / "site" / "run"
        self.log_dir = self.datadir / "logs"
        self.pid_file = self.run_dir / f"{self.name}.pid"
        self.pipe = self.run_dir / f"{PIPE}{site}"
        self.log_file = self.log_dir / f"{self.name}.log"
        self.out_file = self.log_dir / f"{self.name}.out"

    def argv(self, *args: str) -> list[str]:
        return [*self.fiona, "--config", self.config, *args]

    def site_args(self) -> list[str]:
        return ["--site", self.site] if self.site else []

    def _datadir(self) -> Path:
        """DATADIR of the site, from `fiona config check` (the same reading the daemon does)."""
        code = UNKNOWN if self.action == "status" else NOT_CONFIGURED
        res = subprocess.run(self.argv("config", "check"), env=self.env, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise Failure(f"cannot read the configuration {self.config} (see above)", code)
        try:
            cfg = json.loads(res.stdout)
            datadir = cfg["DATADIR"]
            if self.site:
                sites = cfg.get("SITES") or {}
                if self.site not in sites:
                    known = ", ".join(sorted(sites)) or "none"
                    raise Failure(f"unknown site {self.site!r}; SITES in {self.config} has: "
                                  f"{known}", code)
                datadir = sites[self.site]["DATADIR"]
        except (ValueError, KeyError, TypeError) as exc:
            raise Failure(f"unexpected output from 'fiona config check': {exc}", code) from None
        # `config check` shows SITES as written; fiona resolves a relative DATADIR against the
        # folder holding config.json
        path = Path(datadir)
        if not path.is_absolute():
            path = Path(os.path.normpath(Path(self.config).parent / path))
        return path

    # --- pid file and processes -----------------------------------------------------------------
    def pid_from_file(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and int(text) > 1 else None

    def running_pid(self) -> int | None:
        pid = self.pid_from_file()
        return pid if pid is not None and is_ours(pid) else None

    def remove_pid_file_if(self, pid: int | None) -> None:
        """The daemon leaves its pid file behind when it exits; drop it if it names `pid`."""
        if pid is not None and self.pid_from_file() == pid:
            try:
                self.pid_file.unlink()
            except FileNotFoundError:
                pass


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        text = ""
    if text:
        state = text.rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_ours(pid: int) -> bool:
    """`pid` is a live `fiona ... process-single-file` (pid numbers get reused)."""
    if not alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc to ask: trust the pid file
    names = [os.fsdecode(a) for a in argv]
    return any(Path(a).name == "fiona" for a in names) and SUBCOMMAND in names


# --- actions ------------------------------------------------------------------------------------
def do_status(ctx: Context) -> int:
    pid = ctx.running_pid()
    if pid:
        print(f"{ctx.name} is running (pid {pid}, log {ctx.log_file})")
        return OK
    stale = ctx.pid_from_file()
    if stale:
        print(f"{ctx.name} is stopped (stale pid file {ctx.pid_file} names pid {stale})")
    else:
        print(f"{ctx.name} is stopped")
    return STOPPED


def do_start(ctx: Context) -> int:
    pid = ctx.running_pid()
    if pid:
        print(f"{ctx.name} is already running (pid {pid})")
        return OK
    stale = ctx.pid_from_file()
    ctx.remove_pid_file_if(stale)
    os.umask(0o027)
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.out_file, "ab") as out:
        # a new session: no controlling terminal, no SIGHUP when the caller's terminal goes
        proc = subprocess.Popen(ctx.argv(SUBCOMMAND, *ctx.site_args()), env=ctx.env, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            ctx.remove_pid_file_if(proc.pid)
            tail = _tail(ctx.out_file)
            raise Failure(f"{ctx.name} exited during start-up (status {rc})"
                          + (f"; last lines of {ctx.out_file}:\n{tail}" if tail else ""))
        pid = ctx.running_pid()
        if pid:
            # the pid file is written first thing; give a start-up error a moment to show
            time.sleep(0.5)
            if proc.poll() is None:
                print(f"{ctx.name} started (pid {pid}, log {ctx.log_file})")
                return OK
            continue
        time.sleep(0.1)
    raise Failure(f"{ctx.name} (pid {proc.pid}) did not write {ctx.pid_file} within "
                  f"{START_TIMEOUT:g} s; see {ctx.out_file}")


def do_stop(ctx: Context) -> int:
    pid = ctx.running_pid()
    if not pid:
        ctx.remove_pid_file_if(ctx.pid_from_file())
        print(f"{ctx.name} is not running")
        return OK
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while alive(pid):
        if time.monotonic() >= deadline:
            raise Failure(f"{ctx.name} (pid {pid}) is still running {STOP_TIMEOUT:g} s after "
                          f"SIGTERM; see {ctx.log_file}")
        time.sleep(0.1)
    ctx.remove_pid_file_if(pid)
    print(f"{ctx.name} stopped (was pid {pid})")
    return OK


def do_send(ctx: Context, words: list[str]) -> int:
    """One line to the wake-up pipe, without blocking and without creating anything."""
    line = " ".join(words) or "wakeup"
    data = (line.replace("\r", " ").replace("\n", " ") + "\n").encode()[:4096]  # <= PIPE_BUF
    not_running = (f"{ctx.name} is not running (nobody reads {ctx.pipe}); nothing is lost: the "
                   f"receiver's journal keeps the work and the indexer replays it when it starts "
                   f"(`{PROG} start`)")
    try:
        st = os.lstat(ctx.pipe)
    except FileNotFoundError:
        print(not_running)
        return OK
    if not stat.S_ISFIFO(st.st_mode):
        raise Failure(f"{ctx.pipe} is not a named pipe; refusing to write to it")
    try:
        fd = os.open(ctx.pipe, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader / pipe just removed
            print(not_running)
            return OK
        raise Failure(f"cannot open {ctx.pipe}: {exc.strerror}") from None
    try:
        os.write(fd, data)
    except BlockingIOError:
        print(f"{ctx.name}'s pipe is full: the indexer is busy and will catch up from its journal")
        return OK
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            print(not_running)
            return OK
        raise Failure(f"cannot write to {ctx.pipe}: {exc.strerror}") from None
    finally:
        os.close(fd)
    print(f"woke {ctx.name} up ({ctx.pipe})")
    return OK


def do_test(ctx_args: argparse.Namespace, files: list[str]) -> int:
    fiona, env = fiona_command()
    argv = [*fiona, "--config", ctx_args.config, "classify",
            *(["--site", ctx_args.site] if ctx_args.site else []), "--test", *files]
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL).returncode


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Control FIONA's indexer (fiona process-single-file).",
        epilog="Exit codes: 0 ok/running, 1 failure, 2 usage, 3 stopped, 4 status unknown, "
        "6 not configured.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--site", metavar="NAME", default=argparse.SUPPRESS,
                        help="one of SITES in config.json (default: the main receiver)")
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config.json (default: $FIONA_CONFIG, else " + DEFAULT_CONFIG + ")")
    # the options are accepted before and after the action
    parser.add_argument("--site", metavar="NAME", default="",
                        help="one of SITES in config.json (default: the main receiver)")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config.json (default: $FIONA_CONFIG, else " + DEFAULT_CONFIG + ")")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("start", parents=[common], help="run the indexer detached")
    sub.add_parser("stop", parents=[common], help="SIGTERM the indexer and wait up to 30 s")
    sub.add_parser("status", parents=[common], help="running (exit 0) or stopped (exit 3)")
    sub.add_parser("restart", parents=[common], help="stop, then start")
    p = sub.add_parser("send", parents=[common], help="wake the indexer up now")
    p.add_argument("text", nargs="*", help="the line to write (default: wakeup); the indexer "
                   "reads its work from the journal, so the text is informational")
    p = sub.add_parser("test", parents=[common], help="classify FILEs with the site's rules")
    p.add_argument("files", nargs="+", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.site and not SITE_RE.match(args.site):
        print(f"{PROG}: invalid --site {args.site!r}: use letters, digits, '_' or '-'",
              file=sys.stderr)
        return USAGE
    args.config = os.path.abspath(args.config or os.environ.get("FIONA_CONFIG")
                                  or DEFAULT_CONFIG)
    try:
        if args.action == "test":
            return do_test(args, args.files)
        ctx = Context(args.config, args.site, args.action)
        if args.action == "start":
            return do_start(ctx)
        if args.action == "stop":
            return do_stop(ctx)
        if args.action == "status":
            return do_status(ctx)
        if args.action == "restart":
            do_stop(ctx)
            return do_start(ctx)
        if args.action == "send":
            return do_send(ctx, args.text)
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.action)


if __name__ == "__main__":
    sys.exit(main())
