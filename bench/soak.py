#!/usr/bin/env python3
"""Soak: the whole gateway under load and combined faults, then its invariants checked.

One command, loopback only, bounded in time:

    python bench/soak.py [--minutes 5] [--seed 1] [--control redcap|local] [--small]

It starts Orthanc (the research PACS), the REDCap emulator behind a fault proxy (or, with
`--control local`, the SQLite control plane), writes a configuration with three projects
(coupling rows for most studies, a routing rule and auto-ID for some, a few studies left
unassigned) and runs `fiona up`. For the first 75 % of `--minutes` it sends a seeded stream of
studies (1 to 500 images, `--small`: 1 to 20; 1 to 4 series; 30 % RLE-compressed; a quarter
of the multi-series ones with a last series sent after the study has arrived; some coupling
rows uploaded only after their study) from eight concurrent senders (DCMTK storescu and
dcmsend with TCP_NODELAY=1, pynetdicom with TCP_NODELAY on its socket). Sending pauses while
more than a bounded number of acknowledged images wait to reach Orthanc, so the end can drain.
Meanwhile it injects every fault of `bench/soak_faults.py` once at seeded times. Then it waits
for quiet (at most max(90 s, 40 % of --minutes) past the end) and checks the invariants of
`bench/soak_check.py`. The last line is the figures:

    soak: studies S, images I, faults F, lost 0, duplicates 0, ..., peak RSS receiver X MB, ...

Exit status 0 when every invariant holds, 1 otherwise (each failure is printed above it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # orthanc.py and redcap_emulator.py live there

from bench.common import (  # noqa: E402 (repo root)
    PeakRss,
    fiona_daemon_pid,
    free_port,
    log_tail,
    port_open,
    progress,
    run_in_scratch,
    stop_process,
    wait_until,
)
from bench.soak_check import Checker, Outcome, tracebacks  # noqa: E402
from bench.soak_faults import DAEMONS, Injector, RedcapFaults, schedule  # noqa: E402
from bench.soak_send import Job, Ledger, Senders, Spec, Writer, plan  # noqa: E402
from fiona.bootstrap import init  # noqa: E402
from fiona.config import load  # noqa: E402
from fiona.control import open_control_plane  # noqa: E402
from fiona.tree import Tree  # noqa: E402
from orthanc import Orthanc  # noqa: E402
from redcap_emulator import RedcapEmulator  # noqa: E402

CONTROL_TOKENS = ["Incoming", "Routing", "CouplingList", "AutoID", "DataTransferProjects"]
PROJECTS = {  # name -> (naming rule, events, extra `fiona project add` arguments)
    "PROJ": ("^P[0-9]{4}$", "baseline", []),
    "ROUTED": ("^SUBJ[0-9]+$", "scan", []),
    "AUTO": ("^AU[0-9]{5}$", "visit1", ["--autoid-aetitle", "FIONAAUTO"]),
}
QUIET_SECONDS = 3
#: acknowledged images not yet in Orthanc above which no new study is started
FORWARD_BACKLOG = {"small": 400, "full": 3000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="load and fault phase")
    p.add_argument("--seed", type=int, default=1, help="seeds studies, senders and faults")
    p.add_argument("--control", choices=["redcap", "local"], default="redcap")
    p.add_argument("--small", action="store_true", help="studies of 1 to 20 images")
    p.add_argument("--rss-bound-mb", type=float, default=300.0,
                   help="no daemon's peak RSS may exceed this")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data)")
    return p.parse_args(argv)


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.root = root
        self.total = args.minutes * 60
        self.rng = random.Random(args.seed)
        self.outcome = Outcome()
        self.stop = threading.Event()
        self.up: subprocess.Popen | None = None
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "TCP_NODELAY": "1"}
        self.env.pop("FIONA_CONFIG", None)

    def say(self, text: str) -> None:
        progress(f"[{time.monotonic() - self.t0:6.1f} s] {text}" if hasattr(self, "t0")
                 else text)

    def fiona(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "fiona", "--config", str(self.config), *args],
                             capture_output=True, text=True, env=self.env, timeout=300,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"fiona {' '.join(args)}: {res.stdout}{res.stderr}")
        return res.stdout

    # --- set-up ----------------------------------------------------------------------------
    def control_plane(self) -> dict:
        if self.args.control == "local":
            self.redcap = None
            return {"type": "local"}
        self.emulator = RedcapEmulator()
        tokens = {name: f"{i:032X}" for i, name in
                  enumerate(CONTROL_TOKENS + list(PROJECTS), start=1)}
        self.emulator.add_from_manifest(tokens)
        self.redcap = RedcapFaults(self.emulator.start())
        tokens_file = self.root / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        tokens_file.chmod(0o600)
        return {"type": "redcap", "url": self.redcap.start(), "tokens": str(tokens_file)}

    def set_up(self) -> list[Spec]:
        self.pacs = Orthanc(self.root).start()
        self.port, web_port = free_port(), free_port()
        self.config = init(self.root / "data", port=self.port, ip="127.0.0.1", extra={
            "CONTROL_PLANE": self.control_plane(),
            "STUDY_QUIET_SECONDS": QUIET_SECONDS,
            "DESTINATIONS": {"research": {"type": "dicom", "aetitle": self.pacs.aet,
                                          "host": "127.0.0.1", "port": self.pacs.dicom_port}},
            "WEB": {"host": "127.0.0.1", "port": web_port}})
        self.tree = Tree(self.root / "data")
        for name, (naming, events, extra) in PROJECTS.items():
            self.fiona("project", "add", name, "--naming", naming, "--events", events, *extra)
        self.fiona("routing", "add", "trial", "--project", "ROUTED", "--event", "scan",
                   "--calling-ae", "TRIALSCU", "--patient-id-regex", "SUBJ[0-9]+")
        specs = plan(self.rng, int(4 * self.total), 20 if self.args.small else 500)
        self.couple([s for s in specs if s.kind == "coupled" and not s.late_coupling])
        with open(self.root / "up.log", "ab") as log:
            self.up = subprocess.Popen(
                [sys.executable, "-m", "fiona", "--config", str(self.config), "up"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                env=self.env, start_new_session=True)
        wait_until(lambda: port_open(self.port) and all(self.pids().values()), 120,
                   "fiona up", self.up, interval=0.2)
        return specs

    def couple(self, specs: list[Spec]) -> None:
        if not specs:
            return
        path = self.root / f"coupling-{time.monotonic_ns()}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["AccessionNumber", "ProjectName", "subjectid", "eventname"])
            for s in specs:
                writer.writerow([s.accession, "PROJ", s.participant, "baseline"])
        self.fiona("coupling", "upload", str(path))

    def pids(self) -> dict[str, int | None]:
        run = self.tree.run
        return {name: fiona_daemon_pid(run, pid_name, sub)
                for name, (pid_name, sub) in DAEMONS.items()}

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        progress(f"soak: {self.args.minutes:g} min, seed {self.args.seed}, control "
                 f"{self.args.control}, {'small' if self.args.small else 'mixed'} studies, "
                 f"scratch {self.root}")
        specs = self.set_up()
        ledger = Ledger()
        faults = schedule(self.rng, self.total, self.redcap is not None)
        self.injector = Injector(faults, self.tree.run, self.config, self.pacs, self.redcap,
                                 self.say)
        writer = Writer(specs, self.root / "studies")
        self.t0 = time.monotonic()
        senders = Senders(self.port, random.Random(self.args.seed + 1), ledger,
                          self.t0 + 0.9 * self.total, self.root / "senders.log")
        injector = threading.Thread(target=self.injector.run, args=(self.t0, self.stop),
                                    daemon=True)
        try:
            with PeakRss(self.pids) as rss:
                senders.start()
                injector.start()
                late_done = threading.Event()
                coupler = threading.Thread(target=self.couple_late, args=(ledger, late_done),
                                           daemon=True)
                coupler.start()
                self.dispatch(writer, senders, ledger)
                injector.join()
                self.injector.join()
                self.say("faults done")
                senders.stop()
                late_done.set()
                coupler.join()
                self.say(f"load done: {len(ledger.acked)} images acknowledged; "
                         "waiting for quiet")
                self.drain(ledger)
                self.outcome.figures["peak RSS MB"] = {k: round(v) for k, v in rss.peak.items()}
        finally:
            self.stop.set()
            self.injector.resume_forwarder()
            writer.close()
            self.tear_down()
        return self.figures(ledger)

    def dispatch(self, writer: Writer, senders: Senders, ledger: Ledger) -> None:
        """Start studies until 75 % of the time, holding back while the senders or the
        forwarder lag; then wait (up to 95 %) for the senders to finish."""
        end = self.t0 + 0.75 * self.total
        cap = FORWARD_BACKLOG["small" if self.args.small else "full"]
        in_pacs, checked = 0, 0.0
        while time.monotonic() < end:
            if time.monotonic() - checked > 2:
                checked = time.monotonic()
                try:
                    in_pacs = self.pacs.count()
                except OSError:
                    pass  # Orthanc is down (a fault): keep the last count
            if senders.backlog() >= 8 or len(ledger.acked) - in_pacs > cap:
                time.sleep(0.2)
                continue
            nxt = writer.next()
            if nxt is None:
                break
            spec, written = nxt
            with ledger.lock:
                ledger.studies[written.study] = spec
            if spec.late:
                late = Job(spec, written, written.files[-1])
                first = [p for files in written.files[:-1] for p in files]
                senders.submit(Job(spec, written, first, then=late,
                                   then_delay=QUIET_SECONDS + self.rng.uniform(3, 10)))
            else:
                senders.submit(Job(spec, written, [p for f in written.files for p in f]))
        self.say(f"no new studies; {len(ledger.studies)} started")
        deadline = self.t0 + 0.95 * self.total
        while not senders.idle() and time.monotonic() < deadline:
            time.sleep(0.5)

    def couple_late(self, ledger: Ledger, done: threading.Event) -> None:
        """On a thread: upload the coupling rows of late-coupled studies some seconds after
        they were sent (so the row comes after the study), the rest once `done` is set. A
        failing upload (REDCap faults) is tried again."""
        uploaded: set[str] = set()
        failed_at_end = 0
        while True:
            final = done.wait(3.0)
            now = time.monotonic()
            with ledger.lock:
                due = [uid for uid, spec in ledger.studies.items()
                       if spec.kind == "coupled" and spec.late_coupling and uid not in uploaded
                       and (final or now - ledger.sent_at.get(uid, now) > 5)]
                specs = [ledger.studies[uid] for uid in due]
            try:
                self.couple(specs)
                uploaded.update(due)
            except RuntimeError as exc:
                self.say(f"late coupling rows not uploaded yet: {str(exc).strip()[:160]}")
                failed_at_end += final
                if failed_at_end > 10:
                    self.outcome.fail(f"late coupling rows could not be uploaded: {exc}")
                    return
                time.sleep(2.0)
                continue
            if final:
                return

    def drain(self, ledger: Ledger) -> None:
        config = load(str(self.config))
        self.checker = Checker(self.tree, lambda: open_control_plane(config), self.pacs, ledger)
        deadline = max(time.monotonic(), self.t0 + self.total) + max(90.0, 0.4 * self.total)
        why = self.checker.wait_quiet(deadline, self.say)
        if why:
            self.outcome.fail(f"not quiet by the deadline: {why}")
        self.say("checking invariants")
        self.checker.check(self.outcome)

    def tear_down(self) -> None:
        if self.up is not None:
            stop_process(self.up, 60)
            if self.up.returncode != 0:
                self.outcome.fail(f"fiona up exited with {self.up.returncode}: "
                                  f"{log_tail(self.root / 'up.log', 5)}")
        self.pacs.stop(kill=True)
        if self.redcap is not None:
            self.redcap.stop()
            self.emulator.stop()

    def figures(self, ledger: Ledger) -> dict:
        out = self.outcome
        logs = sorted(self.tree.logs.glob("*.log")) + [self.root / "up.log"]
        found = tracebacks(logs)
        out.figures["tracebacks"] = len(found)
        if found:
            out.fail(f"tracebacks in the logs: {', '.join(found[:10])}")
        for err in self.injector.errors:
            out.fail(f"fault not injected: {err}")
        for name, mb in out.figures.get("peak RSS MB", {}).items():
            if mb > self.args.rss_bound_mb:
                out.fail(f"{name} peak RSS {mb} MB above {self.args.rss_bound_mb:g} MB")
        sent = {study for study, _ in ledger.acked.values()}
        return {"studies": len(sent), "images": len(ledger.acked),
                "faults": self.injector.done, "sender attempts failed": ledger.failures,
                "images by sender": ledger.by_sender, **out.figures,
                "control": self.args.control, "seed": self.args.seed,
                "seconds": round(time.monotonic() - self.t0), "failures": out.failures}


def summary_line(f: dict) -> str:
    rss = ", ".join(f"peak RSS {k} {v} MB" for k, v in f.get("peak RSS MB", {}).items())
    keys = ("lost", "duplicates", "stuck", "identifiers found", "tracebacks",
            "studies in Orthanc", "instances in Orthanc")
    parts = [f"studies {f['studies']}", f"images {f['images']}", f"faults {f['faults']}"]
    parts += [f"{k} {f[k]}" for k in keys if k in f]
    return (f"soak: {', '.join(parts)}, {rss}, control {f['control']}, seed {f['seed']}, "
            f"{f['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict = {}

    def body(root: Path) -> dict:
        figures.update(Soak(args, root).run())
        return figures

    status = run_in_scratch(args, "fiona-soak-", body)
    if status != 0 or not figures:
        return status or 1
    for failure in figures["failures"]:
        print(f"FAILED: {failure}", flush=True)
    print(summary_line(figures), flush=True)
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
