#!/usr/bin/env python3
"""Export benchmark: FIONA's export engine against `zip` and dcm2niix, in one run.

The corpus: one study of 500 MR images (256x256 uint16 pixels, a realistic header, ~130 KB
each) in 5 series, de-identified by FIONA's pipeline and delivered to a `folder` destination
as the forwarder does (`<research>/<mapped study>/<series>/<SOP>.dcm`, a completed transfer
request in the local control plane). Creating and delivering it is not timed. Then, each the
same number of times, interleaved, their order rotating per repetition (so a noisy neighbour
hurts all alike), wall-clock time (perf_counter) of:

  FIONA dicom    fiona.export.job.run(...) with type `dicom`: the function `fiona export
                 --project BENCH --type dicom --out DIR` runs after parsing its arguments
                 (read back from the folder destination through the export profile `default`,
                 the dicom layout, README, MANIFEST.csv with every file's SHA-256, the zip
                 (deflate level 1), `.sha256` and manifest beside it, fsync, audit entry).
                 In-process, so Python's start and imports (the same for every export) are
                 not counted.
  zip -r         `zip -r -q OUT.zip <study folder>` (Info-ZIP, its default level 6) on the same
                 delivered files: the floor for "a zip of these files".
  zip -r -1      the same at deflate level 1, the level FIONA uses (no target: for reference).
  FIONA nifti    the same with type `nifti`: dcm2niix per series (`-z y -b y -ba y`), names,
                 the zip.
  dcm2niix       `dcm2niix -z y -b y -ba y -o OUT <study folder>` alone, the same binary
                 (the `dcm2niix` wheel), on the same folder: the floor for the conversion.

The CPU time each used (user + system, with its child processes: getrusage) is printed too,
as it depends less on what else runs on the machine. Only the median wall-clock time per row
is compared. Targets: FIONA dicom >= 0.8 x zip's speed (zip's median time / FIONA's >= 0.8)
and FIONA nifti <= 1.25 x dcm2niix's median time. Each output is checked (file count in the
zip, NIfTI images made) and the zip sizes are printed, so a faster but emptier or looser
export would show. FIONA fsyncs its zip before renaming it to its final name (a zip under
that name is complete), zip and dcm2niix do not: the time an fsync of their output takes
afterwards is printed beside them, untimed. Exit status 1 when a target is missed.
`--profile N` adds a cProfile of one more FIONA dicom and nifti export (top N functions).
Temporary data goes under $TMPDIR (default /tmp).

Run from the repository root:  python bench/export.py [--images 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dcm2niix  # noqa: E402

from bench.common import (  # noqa: E402
    free_port,
    make_corpus,
    profile,
    progress,
    run_in_scratch,
)

N_SERIES = 5
PROJECT, PARTICIPANT, EVENT = "BENCH", "P0001", "baseline"
ZIP = "/usr/bin/zip"  # Debian's Info-ZIP (the Makefile's SYSTEM_PACKAGES)
DCM2NIIX_ARGS = ("-z", "y", "-b", "y", "-ba", "y")  # what fiona.export.nifti passes
TARGET_DICOM = 0.8   # FIONA dicom speed / zip speed, at least
TARGET_NIFTI = 1.25  # FIONA nifti time / dcm2niix time, at most


class Site:
    """A FIONA installation whose project BENCH has one study delivered to a folder
    destination, as after `fiona up` forwarded it."""

    def __init__(self, root: Path, corpus: list[Path]):
        from fiona.bootstrap import init
        from fiona.config import load, read_secret
        from fiona.control import open_control_plane
        from fiona.control.base import TransferRequest, now_iso
        from fiona.deid.pipeline import Pipeline, read, settings_for

        self.research = root / "research"
        self.research.mkdir()
        cfg = init(root / "data", port=free_port(), ip="127.0.0.1", extra={
            "DESTINATIONS": {"research": {"type": "folder", "path": str(self.research)}}})
        subprocess.run([sys.executable, "-m", "fiona", "--config", str(cfg), "project", "add",
                        PROJECT, "--naming", "^P[0-9]{4}$", "--events", EVENT],
                       check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        self.config = load(str(cfg))
        self.site = self.config.site()
        self.control = open_control_plane(self.config, self.site)
        key = read_secret(self.site.datadir / "config" / "secret.key")
        pipeline = Pipeline(settings_for(self.control.project(PROJECT), PARTICIPANT, EVENT,
                                         key, self.site.datadir))
        original = str(read(corpus[0]).StudyInstanceUID)
        mapped = pipeline.mapped_uid(original)
        self.study = self.research / mapped
        for path in corpus:
            result = pipeline.process(read(path))
            folder = self.study / result.series_uid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{result.sop_uid}.dcm").write_bytes(result.encoded)
        self.control.add_participant(PROJECT, PARTICIPANT)
        req = self.control.add_request(TransferRequest(original, PROJECT, PARTICIPANT, EVENT,
                                                       now_iso()))
        req.mapped_uid, req.complete = mapped, True
        req.done_revision = req.revision
        self.control.update_request(req)
        self.files = sorted(self.study.glob("*/*.dcm"))

    def export(self, kind: str, out: Path) -> Path:
        """One export, as `fiona export --type KIND --out OUT` makes it; the zip's path."""
        from fiona.export.job import ExportRequest, run

        result = run(self.config, self.site, self.control,
                     ExportRequest(PROJECT, kind, "bench", out=out))
        if result.report.problems:
            raise RuntimeError(f"FIONA {kind}: {result.report.problems[:3]}")
        return result.zip


class Row(ABC):
    """One measured command: `run` makes its output inside `out` (an empty folder)."""

    name: str

    def __init__(self, site: Site):
        self.site = site

    @abstractmethod
    def run(self, out: Path) -> None:
        """The timed part."""

    @abstractmethod
    def check(self, out: Path) -> str:
        """What the output holds (raises when it is short); untimed."""

    def check_zip(self, zip_path: Path) -> str:
        """A zip of the study: every .dcm in it."""
        with zipfile.ZipFile(zip_path) as zf:
            dcm = sum(n.endswith(".dcm") for n in zf.namelist())
        if dcm != len(self.site.files):
            raise RuntimeError(f"{self.name}: {dcm} of {len(self.site.files)} files in the zip")
        return f"{dcm} .dcm, {_mb(zip_path)}"

    def fsync(self, out: Path) -> str:
        """For a peer, which writes without fsync: the time to fsync its output afterwards
        (untimed: for reference, since FIONA's time includes fsyncing its zip)."""
        t0 = time.perf_counter()
        for path in out.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return f", then fsync {time.perf_counter() - t0:.2f} s"


class Fiona(Row):
    """An export of type `kind`."""

    kind = ""

    def run(self, out):
        self.site.export(self.kind, out)

    def fsync(self, out):
        return ""  # done: the zip is fsynced before it gets its name


class FionaDicom(Fiona):
    name, kind = "FIONA dicom", "dicom"

    def check(self, out):
        (zip_path,) = out.glob("*.zip")
        return self.check_zip(zip_path)


class Zip(Row):
    name = "zip -r"
    options: tuple[str, ...] = ()

    def run(self, out):
        subprocess.run([ZIP, "-r", "-q", *self.options, str(out / "study.zip"),
                        self.site.study.name], cwd=self.site.study.parent, check=True)

    def check(self, out):
        return self.check_zip(out / "study.zip")


class ZipFast(Zip):
    name = "zip -r -1"
    options = ("-1",)


class FionaNifti(Fiona):
    name, kind = "FIONA nifti", "nifti"

    def check(self, out):
        (zip_path,) = out.glob("*.zip")
        with zipfile.ZipFile(zip_path) as zf:
            images = sum(n.endswith(".nii.gz") for n in zf.namelist())
        if images < N_SERIES:
            raise RuntimeError(f"{self.name}: {images} NIfTI images for {N_SERIES} series")
        return f"{images} .nii.gz, {_mb(zip_path)}"


class Dcm2niix(Row):
    name = "dcm2niix"

    def run(self, out):
        subprocess.run([dcm2niix.bin, *DCM2NIIX_ARGS, "-o", str(out), str(self.site.study)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def check(self, out):
        images = len(list(out.glob("*.nii.gz")))
        if images < N_SERIES:
            raise RuntimeError(f"{self.name}: {images} NIfTI images for {N_SERIES} series")
        return f"{images} .nii.gz"


ROWS: tuple[type[Row], ...] = (FionaDicom, Zip, ZipFast, FionaNifti, Dcm2niix)


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def cpu_seconds() -> float:
    """User and system CPU time of this process and its waited-for children so far."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_once(row: Row, root: Path, label: str) -> tuple[float, float, str]:
    """One timed run of `row` into a fresh folder (removed after its check): wall-clock
    seconds, CPU seconds (this process and its children) and what the output holds."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=root))
    try:
        gc.collect()
        c0, t0 = cpu_seconds(), time.perf_counter()
        row.run(out)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        what = row.check(out) + row.fsync(out)
        if label:
            progress(f"{label} {row.name:<12} {seconds:6.2f} s  (CPU {cpu:5.2f} s)   {what}")
        return seconds, cpu, what
    finally:
        shutil.rmtree(out, ignore_errors=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(seconds: dict[str, list[float]], cpu: dict[str, list[float]],
           outputs: dict[str, str], images: int) -> dict:
    """Print the table, the ratios and PASS/FAIL per target; the same as a dict."""
    progress(f"\n{'command':<12} {'median s':>9} {'images/s':>9} {'CPU s':>6}   "
             f"{'runs (s)':<22} output")
    median = {}
    for cls in ROWS:
        median[cls.name] = statistics.median(seconds[cls.name])
        runs = " ".join(f"{s:.2f}" for s in seconds[cls.name])
        progress(f"{cls.name:<12} {median[cls.name]:>9.2f} {images / median[cls.name]:>9.1f}"
                 f" {statistics.median(cpu[cls.name]):>6.2f}   {runs:<22} {outputs[cls.name]}")
    dicom = median[Zip.name] / median[FionaDicom.name]
    nifti = median[FionaNifti.name] / median[Dcm2niix.name]
    passed = {"dicom": dicom >= TARGET_DICOM, "nifti": nifti <= TARGET_NIFTI}
    progress(f"\nFIONA dicom speed / zip speed = {dicom:.2f} (target >= {TARGET_DICOM}) "
             f"{verdict(passed['dicom'])}")
    progress(f"FIONA nifti time / dcm2niix time = {nifti:.2f} (target <= {TARGET_NIFTI}) "
             f"{verdict(passed['nifti'])}")
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    progress(f"the same in CPU time (no target): zip / FIONA dicom = "
             f"{cpu_median[Zip.name] / cpu_median[FionaDicom.name]:.2f}, FIONA nifti / "
             f"dcm2niix = {cpu_median[FionaNifti.name] / cpu_median[Dcm2niix.name]:.2f}")
    return {"images": images, "seconds": seconds, "median_seconds": median,
            "cpu_seconds": cpu, "outputs": outputs,
            "ratios": {"FIONA dicom speed / zip speed": dicom,
                       "FIONA nifti time / dcm2niix time": nifti},
            "targets": {"FIONA dicom speed / zip speed": f">= {TARGET_DICOM}",
                        "FIONA nifti time / dcm2niix time": f"<= {TARGET_NIFTI}"},
            "passed": passed, "cpus": os.cpu_count()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="study size (default 500)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per command, interleaved (default 3)")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="also cProfile one FIONA dicom and nifti export, top N functions")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.images < N_SERIES or args.repeat < 1 or args.profile < 0:
        p.error(f"--images must be at least {N_SERIES}, --repeat at least 1, --profile >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not os.access(ZIP, os.X_OK):
        print(f"{ZIP} is missing: `make system-deps` installs the Debian package zip",
              file=sys.stderr)
        return 2
    verdicts: dict[str, bool] = {}

    def body(root: Path) -> dict:
        summary = measure(args, root)
        verdicts.update(summary["passed"])
        return summary

    status = run_in_scratch(args, "fiona-bench-export-", body)
    return status or (0 if all(verdicts.values()) else 1)


def measure(args: argparse.Namespace, root: Path) -> dict:
    progress(f"generating {args.images} MR images (256x256) under {root} ...")
    corpus = make_corpus(root, args.images, N_SERIES)
    progress("de-identifying and delivering them to a folder destination ...")
    site = Site(root, corpus)
    size = sum(f.stat().st_size for f in site.files)
    progress(f"delivered: {len(site.files)} files, {size / 1e6:.1f} MB, {N_SERIES} series")
    rows = [cls(site) for cls in ROWS]
    for row in rows:  # warm: page cache, imports, the binaries
        run_once(row, root, "")
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    outputs: dict[str, str] = {}
    for rep in range(args.repeat):
        k = rep % len(rows)
        for row in rows[k:] + rows[:k]:
            s, c, outputs[row.name] = run_once(row, root, f"[run {rep + 1}/{args.repeat}]")
            seconds.setdefault(row.name, []).append(s)
            cpu.setdefault(row.name, []).append(c)
    summary = report(seconds, cpu, outputs, len(site.files))
    if args.profile:
        for row in (rows[ROWS.index(FionaDicom)], rows[ROWS.index(FionaNifti)]):
            progress(f"\ncProfile of one more {row.name} export:")
            text = profile(row.run, root, args.profile)
            progress(text)
            summary.setdefault("profile", {})[row.name] = text
    return summary


if __name__ == "__main__":
    sys.exit(main())
