#!/usr/bin/env python3
"""Ingest benchmark: FIONA's receiver against DCMTK storescp and Orthanc, in one run.

What is measured: the wall-clock time to send the same corpus of MR images (256x256 uint16
pixels with a realistic header, ~130 KB each) to each receiver on 127.0.0.1 with DCMTK
`storescu`, once over one association and once over 8 parallel ones (the corpus split into 8
disjoint parts, one storescu each), from the start of the first storescu to the exit of the last.
files/s = images / seconds. A run counts only if every storescu exits 0 and the receiver holds
every image afterwards (files on disk; Orthanc's /statistics CountInstances). For FIONA the
time until the indexer has recorded every image in its series JSONs is reported as well;
receive files/s is the headline.

Every receiver starts fresh with empty storage for every run; targets are interleaved and
their order rotates per repetition, so a noisy neighbour hurts all of them alike. The storage
of every run is removed only at the end, with the scratch folder: on the development machine
removing each run's storage (~130 MB, thousands of files) before the next run slowed the
targets after it, storescp most (its medians 1,152-1,873 files/s in six benches that removed
it, 1,693-2,811 in three that kept it; the cause was not pinned down: the disk is a virtual
one, mounted with `discard`). Keeping it needs ~1 GB of free space per repetition (four
targets, two ways, ~130 MB each with the default corpus). Only the median per target is
compared. Note that FIONA makes every file (and its journal line) durable before it answers,
while storescp and Orthanc do not; how many syncs that takes depends on the disk, and the
bench prints which way applies (one per image on XFS or an ext4 with its journal, two on an
ext4 without one). So a fourth target, "storescp+fsync", is storescp with each object and
then its folder fsynced before the response (bench/durable_storescp.c, compiled with cc and
preloaded): its ratio to storescp is what durability alone costs on this disk, the most any
receiver that keeps FIONA's promise can reach here. Temporary data goes under $TMPDIR
(default /tmp).

Run from the repository root:  python bench/ingest.py [--images 1000] [--repeat 3] [--parallel 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402 (repo root)
    count_files,
    free_port,
    log_tail,
    make_corpus,
    port_open,
    progress,
    run_in_scratch,
    stop_process,
    wait_idle,
    wait_until,
)
from fiona.tree import filesystem_type, metadata_journaled_together  # noqa: E402

#: DCMTK's sender; the `storescu` on PATH may be a pynetdicom shim
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
#: compiles the durable storescp's shim
CC = "/usr/bin/cc"
SHIM = REPO / "bench" / "durable_storescp.c"
N_SERIES = 4
START_TIMEOUT = 60.0
SEND_TIMEOUT = 600.0
INDEX_TIMEOUT = 600.0
STOP_TIMEOUT = 45.0  # `fiona up` gives its daemons 40 s to finish
#: without it DCMTK and Orthanc wait ~40 ms per image on delayed ACKs
BASE_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Target(ABC):
    """One receiver, started fresh in its own folder for one run."""

    name: str
    aetitle: str

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env or BASE_ENV,
                                         cwd=self.workdir, start_new_session=True)
        return self.proc

    @abstractmethod
    def start(self) -> None:
        """Start and return once the receiver accepts associations."""

    @abstractmethod
    def received(self) -> int:
        """How many images the receiver holds now."""

    def after_send(self, t0: float, images: int) -> dict:
        """Extra measurements once the send is over (FIONA: indexing)."""
        return {}

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, STOP_TIMEOUT)


class Fiona(Target):
    name, aetitle = "FIONA", "FIONA"
    #: RECEIVER_PROCESSES (None: FIONA's default)
    processes: int | None = None

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.data = workdir / "data"
        self.env = {**BASE_ENV,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                os.environ.get("PYTHONPATH")]))}
        self.env.pop("FIONA_CONFIG", None)

    def start(self) -> None:
        fiona = [sys.executable, "-m", "fiona"]
        subprocess.run(fiona + ["init", "--data", str(self.data), "--port", str(self.port),
                                "--ip", "127.0.0.1"], check=True, env=self.env,
                       cwd=self.workdir, stdout=subprocess.DEVNULL)
        config = self.data / "config" / "config.json"
        if self.processes is not None:
            settings = json.loads(config.read_text())
            config.write_text(json.dumps({**settings, "RECEIVER_PROCESSES": self.processes}))
        proc = self.spawn(fiona + ["--config", str(config), "up"], self.env)
        wait_until(lambda: port_open(self.port), START_TIMEOUT, "fiona up", proc)

    def received(self) -> int:
        return count_files(self.data / "site" / "archive")

    def indexed(self) -> int:
        """Images the indexer has recorded: NumFiles summed over the series JSONs."""
        total = 0
        for path in (self.data / "site" / "raw").glob("*/*.json"):
            try:
                total += int(json.loads(path.read_bytes()).get("NumFiles", 0))
            except (OSError, ValueError):
                pass  # replaced while we read it; the next poll sees the new one
        return total

    def after_send(self, t0: float, images: int) -> dict:
        wait_until(lambda: self.indexed() >= images, INDEX_TIMEOUT, "FIONA indexing",
                   self.proc)
        seconds = time.perf_counter() - t0
        return {"index_seconds": seconds, "index_files_per_s": images / seconds}


class DcmtkStorescp(Target):
    name, aetitle = "storescp", "STORESCP"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.out = workdir / "out"

    def start(self) -> None:
        self.out.mkdir()
        # --fork: one process per association, DCMTK's way to take parallel associations
        proc = self.spawn([STORESCP, "--fork", "-od", str(self.out), str(self.port)])
        wait_until(lambda: port_open(self.port), START_TIMEOUT, "storescp", proc)

    def received(self) -> int:
        return count_files(self.out)


class DurableStorescp(DcmtkStorescp):
    """storescp with each object and its folder fsynced before its response
    (bench/durable_storescp.c, preloaded): what durability alone costs on this disk, so that
    FIONA's ratio to storescp can be read against the best a durable receiver gets here."""

    name, aetitle = "storescp+fsync", "STORESCP"
    #: the compiled shim (set by `measure`)
    shim: Path | None = None

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        assert self.shim is not None
        return super().spawn(cmd, {**BASE_ENV, "LD_PRELOAD": str(self.shim)})


class Orthanc(Target):
    name, aetitle = "Orthanc", "ORTHANC"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.http_port = free_port()

    def start(self) -> None:
        config = {
            "Name": "fiona-bench", "DicomAet": self.aetitle,
            "DicomPort": self.port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        proc = self.spawn([ORTHANC, str(path)])
        wait_until(lambda: self.http("/system") is not None, START_TIMEOUT, "Orthanc", proc)
        wait_until(lambda: port_open(self.port), START_TIMEOUT, "Orthanc DICOM port", proc)

    def http(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=5) as resp:
                return json.load(resp)
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def received(self) -> int:
        stats = self.http("/statistics")
        return int(stats["CountInstances"]) if stats else -1


TARGETS: tuple[type[Target], ...] = (Fiona, DcmtkStorescp, DurableStorescp, Orthanc)


@dataclass
class Results:
    """Per-target measurements of one way of sending (1 or N associations), in run order."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, target: str, seconds: float, extra: dict) -> None:
        self.seconds.setdefault(target, []).append(seconds)
        self.extra.setdefault(target, []).append(extra)

    def rates(self, target: str, images: int) -> list[float]:
        return [images / s for s in self.seconds.get(target, [])]


def split(files: list[Path], parts: int) -> list[list[Path]]:
    """`files` in `parts` disjoint runs of consecutive files (series stay mostly together)."""
    size = -(-len(files) // parts)
    return [files[i:i + size] for i in range(0, len(files), size)]


def send(target: Target, parts: list[list[Path]]) -> float:
    """One storescu association per part to `target`, all at once; seconds from the start of
    the first to the exit of the last."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", target.aetitle, "127.0.0.1", str(target.port),
                               *map(str, part)], env=BASE_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for part in parts]
    errors = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=SEND_TIMEOUT)
        if proc.returncode != 0:
            errors.append(f"storescu to {target.name} exited {proc.returncode}:\n"
                          f"{stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError("\n".join(errors))
    return seconds


def run_once(cls: type[Target], root: Path, parts: list[list[Path]], images: int,
             label: str) -> tuple[float, dict]:
    """Start `cls` fresh, send the corpus over len(parts) associations, check every image
    arrived, stop it."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{cls.name}-", dir=root))
    target = cls(workdir)
    try:
        target.start()
        assert target.proc is not None
        wait_idle(target.proc, target.name)
        # nothing left to write back (the corpus, an earlier target's files) when the clock
        # starts: it would slow the fsyncs of whichever target comes next
        os.sync()
        t0 = time.perf_counter()
        seconds = send(target, parts)
        got = target.received()
        if got != images:
            raise RuntimeError(f"{target.name} holds {got} of {images} images after the send")
        extra = target.after_send(t0, images)
    except BaseException:
        target.stop()
        print(f"--- last lines of {target.log}:\n{log_tail(target.log)}", file=sys.stderr)
        raise
    target.stop()  # its storage goes with the scratch folder at the end (see the docstring)
    line = f"{label} {target.name:<9} {images} files in {seconds:6.2f} s = " \
           f"{images / seconds:7.1f} files/s"
    if "index_seconds" in extra:
        line += f"  (indexed after {extra['index_seconds']:.2f} s = " \
                f"{extra['index_files_per_s']:.1f} files/s)"
    progress(line)
    return seconds, extra


def _row(name: str, rates: list[float], note: str = "") -> float:
    median = statistics.median(rates)
    progress(f"{name:<14} {median:>14.1f}   {' '.join(f'{r:.1f}' for r in rates)}{note}")
    return median


def report(results: Results, images: int, how: str) -> dict:
    """Print the table and the ratios of one way of sending (`how`); return the same as a
    JSON-able dict."""
    progress(f"\n{how}:\n{'target':<14} {'median files/s':>14}   runs (files/s)")
    medians = {cls.name: _row(cls.name, results.rates(cls.name, images)) for cls in TARGETS}
    index_rates = [e["index_files_per_s"] for e in results.extra[Fiona.name]]
    index_median = _row("FIONA indexed", index_rates, "   (send start -> all in series JSONs)")
    durable = DurableStorescp.name
    ratios = {"FIONA/Orthanc": medians["FIONA"] / medians["Orthanc"],
              "FIONA/storescp": medians["FIONA"] / medians["storescp"],
              f"FIONA/{durable}": medians["FIONA"] / medians[durable],
              f"{durable}/storescp": medians[durable] / medians["storescp"]}
    progress(f"\nFIONA / Orthanc  = {ratios['FIONA/Orthanc']:.2f} (target >= 1.0)")
    progress(f"FIONA / storescp = {ratios['FIONA/storescp']:.2f} (target >= 0.5)")
    progress(f"FIONA / {durable} = {ratios[f'FIONA/{durable}']:.2f}; {durable} / storescp = "
             f"{ratios[f'{durable}/storescp']:.2f} (the most a receiver that syncs each "
             "object and its folder before answering gets here)")
    return {
        "targets": {cls.name: {"seconds": results.seconds[cls.name],
                               "files_per_s": results.rates(cls.name, images),
                               "median_files_per_s": medians[cls.name]} for cls in TARGETS},
        "fiona_indexing": {"seconds": [e["index_seconds"] for e in results.extra[Fiona.name]],
                           "files_per_s": index_rates, "median_files_per_s": index_median},
        "ratios": ratios,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="corpus size (default 1000)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per target, interleaved (default 3)")
    p.add_argument("--parallel", type=int, default=8,
                   help="associations of the parallel runs (default 8)")
    p.add_argument("--processes", type=int, metavar="N",
                   help="FIONA's RECEIVER_PROCESSES (default: its own default)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary corpus, storage folders and logs")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeat < 1 or args.parallel < 2:
        p.error("--images and --repeat must be at least 1, --parallel at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the finally blocks stop the receivers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in (STORESCU, STORESCP, ORTHANC, CC):
        if not os.access(tool, os.X_OK):
            print(f"missing {tool}: apt-get install dcmtk orthanc gcc", file=sys.stderr)
            return 2
    return run_in_scratch(args, "fiona-bench-", lambda root: measure(args, root))


def measure(args: argparse.Namespace, root: Path) -> dict:
    progress(f"generating {args.images} MR images (256x256) under {root} ...")
    files = make_corpus(root, args.images, N_SERIES)
    DurableStorescp.shim = root / "durable_storescp.so"
    subprocess.run([CC, "-O2", "-shared", "-fPIC", "-o", str(DurableStorescp.shim), str(SHIM),
                    "-ldl"], check=True)
    size = sum(f.stat().st_size for f in files)
    progress(f"corpus: {args.images} files, {size / args.images / 1024:.0f} KiB each")
    one_commit = metadata_journaled_together(root, root)
    progress(f"FIONA's disk here ({filesystem_type(root) or 'unknown'}"
             f"{'' if one_commit else ', no journal that commits new names with a file'}): "
             + ("one fsync per image commits the file and both its links" if one_commit else
                "each image's file, then the receipts folder are synced, its study folder "
                "once a second"))
    ways = {"1 association": split(files, 1),
            f"{args.parallel} parallel associations": split(files, args.parallel)}
    results = {how: Results() for how in ways}
    Fiona.processes = args.processes
    for rep in range(args.repeat):
        order = TARGETS[rep % len(TARGETS):] + TARGETS[:rep % len(TARGETS)]
        for how, parts in ways.items():
            for cls in order:
                seconds, extra = run_once(cls, root, parts, args.images,
                                          f"[run {rep + 1}/{args.repeat}, {len(parts)}x]")
                results[how].add(cls.name, seconds, extra)
    return {"images": args.images, "cpus": os.cpu_count(), "one_commit": one_commit,
            **{how: report(results[how], args.images, how) for how in ways}}

if __name__ == "__main__":
    sys.exit(main())
