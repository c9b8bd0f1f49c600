#!/usr/bin/env python3
"""End to end: how long after the last image arrives is the whole study verified in the
research PACS, compared with the time DCMTK needs to send the study to FIONA.

One command, loopback only:

    python bench/e2e.py [--images 1000] [--series 4] [--quiet 3] [--associations 4]
                        [--workers N]

It starts Orthanc (the research PACS) and `fiona up` on a scratch data folder with a project
and a coupling row for the study, then sends one study of `--images` 256x256 MR images in
`--series` series with DCMTK `storescu` (one association, TCP_NODELAY=1); the forwarder sends
to Orthanc over `--associations` parallel associations. While the study goes
through, it polls the control plane and Orthanc every 50 ms and samples each daemon's resident
memory (the forwarder's de-identification workers too). It prints:

- send: storescu's time for the whole study (its last image is acknowledged when it exits);
- last-in -> in-PACS: from then until the study's transfer request is complete (the forwarder
  has verified every series in Orthanc), and its ratio to the send time;
- stages, seen from outside: quiet period (configured), arrival (last image in + quiet ->
  transfer request exists), de-identify (request -> first image in Orthanc), send (first ->
  last image in Orthanc) and verify (last image in Orthanc -> request complete); with the
  pooled forwarder, de-identifying and sending overlap, so "de-identify" is only the time
  until the first image leaves; the forwarder de-identifies a coupled study in its quiet
  period already (`fiona.send.prepare`), so most files are ready when the request comes;
- the forwarder's own line for the request (how many files were de-identified ahead; the
  de-identify-and-send and verify times as it logs them);
- each daemon's peak RSS;
- the goal (issue 10): (last-in -> in-PACS - quiet) <= 1.5 x send time;
- the de-identification rate of the forwarder's pool (`fiona.send.pool`) against one process
  on the same corpus (goal: >= 1.6 x on 2 cores), unless --no-deid-rate.

Exit status 0 when the study arrived complete (the goal lines are figures, not a pass/fail).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # orthanc.py lives there

from bench.common import (  # noqa: E402 (repo root)
    PeakRss,
    fiona_daemon_pid,
    free_port,
    log_tail,
    port_open,
    progress,
    run_in_scratch,
    stop_process,
    tree_cpu_seconds,
    wait_idle,
    wait_until,
)
from bench.soak_faults import DAEMONS  # noqa: E402
from fiona.bootstrap import init  # noqa: E402
from fiona.config import load  # noqa: E402
from fiona.control import open_control_plane  # noqa: E402
from fiona.tree import Tree  # noqa: E402
from orthanc import Orthanc  # noqa: E402
from tests.dicomgen import make_study  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's; a same-named pynetdicom shim may be earlier on PATH
ACCESSION = "E2E0001"
POLL = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images in the study")
    p.add_argument("--series", type=int, default=4, help="series in the study")
    p.add_argument("--quiet", type=int, default=3, help="STUDY_QUIET_SECONDS")
    p.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    p.add_argument("--workers", type=int, default=0,
                   help="de-identification processes for the rate figure (default: cores)")
    p.add_argument("--associations", type=int, default=4, choices=range(1, 5),
                   help="parallel associations from the forwarder to Orthanc (the destination "
                        "setting `associations`, 1-4; default 4, as FIONA's)")
    p.add_argument("--no-deid-rate", action="store_true", help="skip the pool rate figure")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data)")
    return p.parse_args(argv)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def pool_processes(forwarder: int | None) -> dict[str, int]:
    """The forwarder's de-identification workers (children of its fork server), by name."""
    found: dict[str, int] = {}
    for child in children(forwarder) if forwarder else []:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in cmdline:
            found["forwarder fork server"] = child
            for i, worker in enumerate(children(child), start=1):
                found[f"forwarder worker {i}"] = worker
    return found


class Run:
    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.root = root
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "TCP_NODELAY": "1"}
        self.env.pop("FIONA_CONFIG", None)
        self.up: subprocess.Popen | None = None

    def fiona(self, *args: str) -> None:
        res = subprocess.run([sys.executable, "-m", "fiona", "--config", str(self.config), *args],
                             capture_output=True, text=True, env=self.env, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"fiona {' '.join(args)}: {res.stdout}{res.stderr}")

    def pids(self) -> dict[str, int | None]:
        found = {name: fiona_daemon_pid(self.tree.run, pid_name, sub)
                 for name, (pid_name, sub) in DAEMONS.items()}
        return {**found, **pool_processes(found.get("forwarder"))}

    def set_up(self) -> None:
        self.pacs = Orthanc(self.root).start()
        self.port = free_port()
        self.config = init(self.root / "data", port=self.port, ip="127.0.0.1", extra={
            "STUDY_QUIET_SECONDS": self.args.quiet,
            "DESTINATIONS": {"research": {"type": "dicom", "aetitle": self.pacs.aet,
                                          "host": "127.0.0.1", "port": self.pacs.dicom_port,
                                          "associations": self.args.associations}},
            "WEB": {"host": "127.0.0.1", "port": free_port()}})
        self.tree = Tree(self.root / "data")
        self.fiona("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline")
        coupling = self.root / "coupling.csv"
        with open(coupling, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["AccessionNumber", "ProjectName", "subjectid", "eventname"])
            writer.writerow([ACCESSION, "PROJ", "P0001", "baseline"])
        self.fiona("coupling", "upload", str(coupling))
        with open(self.root / "up.log", "ab") as log:
            self.up = subprocess.Popen(
                [sys.executable, "-m", "fiona", "--config", str(self.config), "up"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                env=self.env, start_new_session=True)
        wait_until(lambda: port_open(self.port) and all(self.pids().values()), 120,
                   "fiona up", self.up, interval=0.2)
        wait_idle(self.up, "fiona up")  # the send is timed against a gateway that is up

    def run(self) -> dict:
        per_series = -(-self.args.images // self.args.series)
        size = self.args.size
        progress(f"writing one study of {self.args.images} {size}x{size} MR images in "
                 f"{self.args.series} series ...")
        study = make_study(self.root / "study", self.args.series, per_series, rows=size,
                           cols=size, accession=ACCESSION)
        for extra in study["files"][self.args.images:]:
            extra.unlink()
        figures: dict = {"images": self.args.images, "series": self.args.series,
                         "quiet_s": self.args.quiet, "associations": self.args.associations}
        if not self.args.no_deid_rate:
            figures.update(deid_rate(self.root / "study", self.args.workers))
        try:
            self.set_up()
            control = open_control_plane(load(str(self.config)))
            with PeakRss(self.pids, interval=0.1) as rss:
                forwarder = self.pids()["forwarder"]
                assert forwarder is not None  # set_up waited for every daemon
                cpu0 = tree_cpu_seconds(forwarder)
                progress("sending with one storescu association (TCP_NODELAY=1) ...")
                t0 = time.monotonic()
                sent = subprocess.run([STORESCU, "+sd", "-aec", "FIONA", "127.0.0.1",
                                       str(self.port), str(self.root / "study")],
                                      capture_output=True, text=True, env=self.env,
                                      timeout=1800)
                last_in = time.monotonic()
                if sent.returncode != 0:
                    raise RuntimeError(f"storescu failed ({sent.returncode}): "
                                       f"{sent.stderr[-2000:]}")
                marks = self.watch(control, study["study"], last_in)
                figures["forwarder_cpu_s"] = round(tree_cpu_seconds(forwarder) - cpu0, 2)
            figures["peak_rss_mb"] = {k: round(v, 1) for k, v in sorted(rss.peak.items())}
        except BaseException:
            print(f"--- last lines of up.log:\n{log_tail(self.root / 'up.log')}",
                  file=sys.stderr)
            raise
        finally:
            if self.up is not None:
                stop_process(self.up, 60)
            self.pacs.stop(kill=True)
        send = last_in - t0
        total = marks["complete"] - last_in
        figures.update({
            "send_s": round(send, 2),
            "last_in_to_pacs_s": round(total, 2),
            "ratio": round(total / send, 2),
            "ratio_minus_quiet": round((total - self.args.quiet) / send, 2),
            "stages_s": {
                "quiet": self.args.quiet,
                "arrival": round(marks["request"] - last_in - self.args.quiet, 2),
                "until first image in PACS": round(marks["first"] - marks["request"], 2),
                "first -> last image in PACS": round(marks["last"] - marks["first"], 2),
                "last image in PACS -> verified": round(marks["complete"] - marks["last"], 2)},
            "forwarder_says": self.forwarder_line(),
            "in_orthanc": marks["count"]})
        figures["goal"] = total - self.args.quiet <= 1.5 * send
        return figures

    def watch(self, control, study_uid: str, last_in: float) -> dict:
        """Poll until the study's request is complete; the moments each stage was seen."""
        marks: dict = {}
        deadline = last_in + 900
        while "complete" not in marks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the study was not complete after 900 s: {marks}")
            now = time.monotonic()
            reqs = control.requests(study_uid)
            if reqs and "request" not in marks:
                marks["request"] = now
            count = self.pacs.count()
            if count and "first" not in marks:
                marks["first"] = now
            if count >= self.args.images and "last" not in marks:
                marks["last"] = now
            if reqs and reqs[0].complete:
                marks.setdefault("request", now)
                marks.setdefault("first", now)
                marks.setdefault("last", now)
                marks["complete"], marks["count"] = now, count
                if reqs[0].error_message:
                    raise RuntimeError(f"the request failed: {reqs[0].error_message}")
            if reqs and reqs[0].error_flags and not reqs[0].pending:
                raise RuntimeError(f"the request failed: {reqs[0].error_message}")
            time.sleep(POLL)
        return marks

    def forwarder_line(self) -> str:
        """The forwarder's log line that says how the request went (stage times)."""
        pattern = re.compile(r"(\d+ files in \d+ series sent and verified .*)")
        found = ""
        for log in sorted(self.tree.logs.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                m = pattern.search(line)
                if m:
                    found = m.group(1)
        return found


def deid_rate(corpus: Path, workers: int, repeat: int = 3) -> dict:
    """Files/s of the forwarder's de-identification (`fiona.send.pool`: the pipeline with its
    gate, outputs written), one process vs the pool (goal 4): the best of `repeat` interleaved
    runs each, so a busy neighbour hurts both alike; and the CPU time per file of each (what
    a pool adds in work; on a busy machine the wall-clock rate hides the parallelism)."""
    try:
        from fiona.deid.engine import Settings, site_profile, with_profile
        from fiona.deid.pipeline import ProjectRules
        from fiona.send.pool import DeidPool, Done, Job, cores
    except ImportError:  # a forwarder without a pool
        return {}
    n = workers or cores()
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    best = {1: 0.0, n: 0.0}
    cpu = {1: float("inf"), n: float("inf")}
    progress(f"de-identification rate: one process vs a pool of {n}, best of {repeat} ...")
    with tempfile.TemporaryDirectory(prefix="fiona-e2e-rate-") as tmp:
        settings = with_profile(Settings(project="BENCH", participant="P0001",
                                         key=os.urandom(32)), site_profile("default", tmp))
        for i in range(repeat):
            for size in (1, n):
                out = Path(tmp) / f"{size}-{i}"
                out.mkdir()
                with DeidPool(size) as pool:
                    cpu0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
                    done = sum(1 for o in pool.outputs(Job.of(settings, ProjectRules(), out),
                                                       files) if isinstance(o, Done) and o.path)
                    seconds, used = (time.perf_counter() - t0,
                                     tree_cpu_seconds(os.getpid()) - cpu0)
                if done != len(files):
                    raise RuntimeError(f"de-identified {done} of {len(files)} files")
                best[size] = max(best[size], done / seconds)
                cpu[size] = min(cpu[size], used / done)
    return {"deid_files_per_s": {"one process": round(best[1]), f"pool of {n}": round(best[n])},
            "deid_cpu_ms_per_file": {"one process": round(cpu[1] * 1000, 2),
                                     f"pool of {n}": round(cpu[n] * 1000, 2)},
            "deid_pool_ratio": round(best[n] / best[1], 2)}


def report(f: dict) -> str:
    lines = [f"study: {f['images']} images in {f['series']} series, quiet period "
             f"{f['quiet_s']} s, {f['associations']} association(s) from FIONA to Orthanc",
             f"send (DCMTK storescu -> FIONA): {f['send_s']:.2f} s",
             f"last image in -> whole study verified in Orthanc: {f['last_in_to_pacs_s']:.2f} s "
             f"= {f['ratio']:.2f} x send; without the quiet period "
             f"{f['last_in_to_pacs_s'] - f['quiet_s']:.2f} s = {f['ratio_minus_quiet']:.2f} x send",
             "stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in f["stages_s"].items()),
             f"forwarder: {f['forwarder_says'] or '(no stage line in its log)'}",
             f"forwarder CPU time for the study (its workers included): "
             f"{f['forwarder_cpu_s']:.2f} s",
             "peak RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in f["peak_rss_mb"].items())]
    if "deid_pool_ratio" in f:
        rates = ", ".join(f"{k} {v} files/s ({f['deid_cpu_ms_per_file'][k]} ms CPU per file)"
                          for k, v in f["deid_files_per_s"].items())
        lines.append(f"de-identification: {rates}: {f['deid_pool_ratio']:.2f} x one process "
                     f"(goal >= 1.6 x on 2 cores)")
    lines.append(f"goal (last-in -> in-PACS - quiet) <= 1.5 x send: "
                 f"{f['ratio_minus_quiet']:.2f} x: {'met' if f['goal'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict = {}

    def body(root: Path) -> dict:
        figures.update(Run(args, root).run())
        return figures

    status = run_in_scratch(args, "fiona-e2e-", body)
    if status != 0 or not figures:
        return status or 1
    print(report(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
