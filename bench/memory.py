#!/usr/bin/env python3
"""Memory check: the receiver and the indexer stay below a bound (200 MB RSS) through one
large study (10,000 small images by default).

Both daemons run as processes exactly as systemd starts them; one DCMTK `storescu`
association sends the whole study; their resident memory is sampled from /proc every 0.25 s
until every image is in its series JSON. A study this size is where per-image state that is
never released (a list of every file, every UID, a series JSON held per image) shows up.
Memory is not timing: the bound holds on any machine, so a test runs this.

Run from the repository root:  python bench/memory.py [--images 10000] [--limit-mb 200]
Prints `memory: receiver peak X MB, indexer peak Y MB ...` last; exits 1 above the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402 (repo root)
    PeakRss,
    free_port,
    log_tail,
    port_open,
    progress,
    run_in_scratch,
    stop_process,
    wait_until,
)
from fiona.bootstrap import init  # noqa: E402
from fiona.tree import Tree  # noqa: E402
from tests.dicomgen import make_study  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's; a same-named pynetdicom shim may be earlier on PATH
N_SERIES = 4
DAEMONS = {"receiver": "storescp", "indexer": "process-single-file"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="images in the study")
    p.add_argument("--limit-mb", type=float, default=200.0, help="RSS bound per daemon")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p.parse_args(argv)


def indexed(tree: Tree, study: str, series: list[str]) -> int:
    total = 0
    for uid in series:
        try:
            total += json.loads(tree.series_json(study, uid).read_text()).get("NumFiles", 0)
        except (OSError, ValueError):
            pass
    return total


def measure(args: argparse.Namespace, root: Path) -> dict:
    progress(f"writing one study of {args.images} 64x64 images in {N_SERIES} series ...")
    study = make_study(root / "study", N_SERIES, -(-args.images // N_SERIES), rows=64, cols=64)
    for extra in study["files"][args.images:]:
        extra.unlink()
    port = free_port()
    config = init(root / "data", port=port, ip="127.0.0.1")
    tree = Tree(root / "data")
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs: dict[str, subprocess.Popen] = {}
    log = root / "daemons.log"
    try:
        with open(log, "ab") as out:
            for name, sub in DAEMONS.items():
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "fiona", "--config", str(config), sub],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=REPO, env=env, start_new_session=True)
        wait_until(lambda: port_open(port), 60, "the receiver", procs["receiver"])
        with PeakRss(lambda: {name: p.pid for name, p in procs.items()}) as rss:
            t0 = time.monotonic()
            progress("sending with one storescu association ...")
            sent = subprocess.run([STORESCU, "+sd", "-aec", "FIONA", "127.0.0.1", str(port),
                                   str(root / "study")], capture_output=True, text=True, env=env,
                                  timeout=1800)
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed ({sent.returncode}): {sent.stderr[-2000:]}")
            wait_until(lambda: indexed(tree, study["study"], study["series"]) >= args.images,
                       1800, "indexing", procs["indexer"], interval=0.5)
            seconds = time.monotonic() - t0
    except BaseException:
        print(f"--- last lines of {log}:\n{log_tail(log)}", file=sys.stderr)
        raise
    finally:
        for proc in procs.values():
            stop_process(proc)
    peaks = {name: round(rss.peak.get(name, 0.0), 1) for name in DAEMONS}
    return {"images": args.images, "seconds": round(seconds, 1), "peak_rss_mb": peaks,
            "limit_mb": args.limit_mb}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict = {}

    def body(root: Path) -> dict:
        figures.update(measure(args, root))
        return figures

    status = run_in_scratch(args, "fiona-memory-", body)
    if status != 0 or not figures:
        return status or 1
    peaks = figures["peak_rss_mb"]
    over = [name for name, mb in peaks.items() if mb > args.limit_mb]
    print(f"memory: images {figures['images']} in {figures['seconds']} s, "
          + ", ".join(f"peak RSS {name} {mb} MB" for name, mb in peaks.items())
          + f", limit {args.limit_mb:g} MB: " + (f"OVER ({', '.join(over)})" if over else "ok"),
          flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
