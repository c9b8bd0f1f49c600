"""What the benchmarks share: progress lines, the corpus, counting results, a scratch folder
that is removed (or kept with --keep) however the run ends, ports, waits, stopping a process
tree, and sampling a process's resident memory from /proc."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.dicomgen import make_study


def progress(text: str) -> None:
    print(text, flush=True)


def profile(run: Callable[[Path], object], root: Path, top: int) -> str:
    """cProfile of `run(out)`, `out` a fresh folder under `root` removed afterwards: the top
    `top` functions by cumulative and by own time, paths shortened to the repository,
    site-packages and the standard library."""
    out = Path(tempfile.mkdtemp(prefix="profile-", dir=root))
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        run(out)
        profiler.disable()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    result = text.getvalue()
    repo = Path(__file__).resolve().parents[1]
    for prefix in (str(repo), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]):
        result = result.replace(prefix + os.sep, "")
    return result


def count_files(root: Path) -> int:
    """Finished files under `root`; temporary '.tmp.*' names of writers in flight and hidden
    folders (FIONA's archive/.receipts) excluded."""
    total = 0
    for _dir, subs, names in os.walk(root):
        subs[:] = [s for s in subs if not s.startswith(".")]
        total += sum(1 for name in names if not name.startswith("."))
    return total


def make_corpus(root: Path, images: int, n_series: int) -> list[Path]:
    """One study of `images` 256x256 MR images in `n_series` series under root/corpus,
    written once and reused by every run."""
    per_series = -(-images // n_series)
    study = make_study(root / "corpus", n_series, per_series, rows=256, cols=256)
    for extra in study["files"][images:]:  # images not divisible by the series count
        extra.unlink()
    return sorted(study["files"][:images])


def run_in_scratch(args: argparse.Namespace, prefix: str,
                   body: Callable[[Path], dict]) -> int:
    """Run `body(scratch folder)`, write its summary to --json, clean up (unless --keep)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        summary = body(root)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
            progress(f"results written to {args.json}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A port the kernel just handed out, so parallel runs and other services do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(ready, timeout: float, what: str, proc: subprocess.Popen | None = None,
               interval: float = 0.05) -> None:
    """Poll `ready()` until true; fail early if `proc` died, so a crash is not a timeout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` and of its descendants alive now."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def wait_idle(proc: subprocess.Popen, what: str, timeout: float = 60.0, window: float = 0.5,
              busy: float = 0.05) -> None:
    """Return once `proc` and its descendants used less than `busy` of one core over `window`
    seconds. A target still starting (FIONA's web server and de-identification pool import
    for a second or two after its receiver listens) would otherwise take the cores from the
    timed send, and the send would measure the start-up instead."""
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(proc.pid)
    while True:
        time.sleep(window)
        now = tree_cpu_seconds(proc.pid)
        if now - before < busy * window:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still busy after {timeout:.0f} s")
        before = now


def stop_process(proc: subprocess.Popen, timeout: float = 45.0) -> None:
    """SIGTERM, then SIGKILL to its process group (start it with start_new_session=True, so
    its children go too and nothing else does)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a crashed or stuck parent
    except ProcessLookupError:
        pass
    proc.wait()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def rss_mb(pid: int) -> float | None:
    """Resident memory of a live process in MB (VmRSS from /proc), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def fiona_daemon_pid(run_dir: Path, pid_name: str, subcommand: str) -> int | None:
    """The pid in `run_dir/<pid_name>.pid` if that process is alive and is the FIONA daemon
    `subcommand` (a pid file left by a killed daemon may name a recycled pid)."""
    try:
        pid = int((run_dir / f"{pid_name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if subcommand.encode() in cmdline and b"fiona" in cmdline else None


class PeakRss:
    """Samples the resident memory of named processes every `interval` s on a thread and
    keeps each name's peak, across restarts (`pids()` is asked anew every time)."""

    def __init__(self, pids: Callable[[], dict[str, int | None]], interval: float = 0.25):
        self._pids = pids
        self._interval = interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval):
                return

    def sample(self) -> None:
        for name, pid in self._pids().items():
            mb = rss_mb(pid) if pid else None
            if mb is not None:
                self.peak[name] = max(self.peak.get(name, 0.0), mb)
