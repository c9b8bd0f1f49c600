#!/usr/bin/env python3
"""De-identification benchmark: FIONA against pydicom read+write, deid and dicognito, in one run.

What is measured: files/s of in-process wall-clock time (perf_counter) for one tool to read every
file of the same corpus of MR images (256x256 uint16 pixels, ~130 KB each, a realistic header:
patient name and ID, birth date, accession number, referring physician, operator, institution,
station, study/series/instance UIDs, dates), de-identify it and write the result to a fresh output
folder. Per-run set-up (FIONA's Deidentifier, deid's recipe, dicognito's Anonymizer) is inside the
timed region; creating the corpus and removing the output folders are not. Rows:

  pydicom read+write  dcmread + save_as of each file: the floor, no de-identification at all.
  FIONA anonymize     fiona.deid.anonymize.anonymize_folder(corpus, out, settings, "default"),
                      what `fiona anonymize` runs: PS3.15 Annex E with the Modified Dates option,
                      keyed UIDs and date shift, project values and markers, the verification gate
                      on the exact bytes of every file, atomic writes to <series>/<sop>.dcm.
  FIONA engine        dcmread + Deidentifier.apply + save_as(enforce_file_format=True): the engine
                      alone, without the gate and FIONA's write path.
  deid                pydicom/deid with its default recipe (deid/data/deid.dicom), the documented
                      workflow per file: get_identifiers(ds), the recipe's variables (entity_id,
                      item_id, entity_timestamp, item_timestamp) added to the lookup,
                      replace_identifiers(ds, ids=..., deid=recipe, save=True, output_folder=...).
                      The recipe is parsed once per run, not once per file as deid does when no
                      recipe is passed (which is slower still).
  deid replace-only   the same without get_identifiers (the variables passed as ids directly): the
                      cheapest way to call deid, shown so the ratio is not flattered.
  dicognito           Anonymizer().anonymize(ds) (one Anonymizer per run, as its docs advise for a
                      study) + save_as.

What the others do less, or differently (checked on the output, see the "source values left"
column, which lists the source's identifying values still found in the first output file):
neither runs a verification gate, so neither would notice a leak. deid's default recipe is a
blacklist by keyword: it removes names, IDs, dates, times and every attribute whose name contains
"UID" (SOP Class and Instance UID, Study/Series Instance UID, MediaStorageSOPInstanceUID), so its
output is no longer a valid, loadable DICOM object, and it keeps what the list does not name
(e.g. InstitutionName, StationName, private tags, free text). dicognito replaces names, IDs,
UIDs, addresses, institution and station with random look-alikes and shifts dates, but walks
only a fixed list of attributes and keeps free text and private tags; no Annex E table.

Every tool processes the same corpus in every repetition; tools are interleaved and their order
rotates per repetition, so a noisy neighbour hurts all of them alike. Before the timed runs each
tool de-identifies a few files untimed (imports and caches warm). Only the median per tool is
compared. Targets: FIONA anonymize / pydicom read+write >= 0.6, FIONA anonymize / deid >= 3.
`--profile N` adds a cProfile of one extra anonymize_folder run (top N by cumulative time).
deid and dicognito are installed with pip when missing (--no-install: print the command, exit 2).
Temporary data goes under $TMPDIR (default /tmp).

Run from the repository root:  python bench/deid.py [--images 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# this file is named deid.py: its own folder must not shadow the deid package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from bench.common import (  # noqa: E402 (repo root)
    count_files,
    make_corpus,
    profile,
    progress,
    run_in_scratch,
)

N_SERIES = 5
WARMUP_FILES = 10
PROJECT, PARTICIPANT, PROFILE = "BENCH", "SUBJ0001", "default"
#: the PyPI packages of the other tools, and the module each provides
PACKAGES = {"deid": "deid", "dicognito": "dicognito"}
#: source attributes whose values must not survive de-identification (checked on the output)
SOURCE_IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                      "ReferringPhysicianName", "OperatorsName", "InstitutionName",
                      "StationName", "StudyInstanceUID")


def ensure_packages(install: bool) -> bool:
    """Import deid and dicognito, installing them with pip first when missing (and allowed)."""
    missing = [pkg for pkg, mod in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return True
    cmd = [sys.executable, "-m", "pip", "install", *missing]
    if not install:
        print(f"missing {', '.join(missing)}: {' '.join(cmd)}", file=sys.stderr)
        return False
    progress(f"{', '.join(missing)} not installed; installing: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"pip failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return False
    importlib.invalidate_caches()
    return all(importlib.util.find_spec(mod) is not None for mod in PACKAGES.values())


def first_file(root: Path) -> Path | None:
    for dirpath, dirnames, names in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(names):
            if not name.startswith("."):
                return Path(dirpath) / name
    return None


class Tool(ABC):
    """One de-identifier: `run` reads every file of `files`, de-identifies, writes into `out`."""

    name: str

    def setup(self, corpus: Path, files: list[Path]) -> None:  # noqa: B027 - optional hook
        """Once per benchmark, untimed (imports, keys); most tools need nothing."""

    @abstractmethod
    def run(self, corpus: Path, files: list[Path], out: Path) -> None:
        """The timed part; `out` exists and is empty."""


class PydicomReadWrite(Tool):
    name = "pydicom read+write"

    def run(self, corpus, files, out):
        for path in files:
            ds = pydicom.dcmread(path)
            ds.save_as(out / path.name)


class FionaAnonymize(Tool):
    name = "FIONA anonymize"

    def setup(self, corpus, files):
        from fiona.deid.anonymize import anonymize_folder
        from fiona.deid.engine import Settings

        self.anonymize_folder = anonymize_folder
        self.settings = Settings(project=PROJECT, participant=PARTICIPANT, key=os.urandom(32))

    def run(self, corpus, files, out):
        out.rmdir()  # anonymize_folder creates it (and would remove it again on a gate stop)
        report = self.anonymize_folder(corpus, out, self.settings, PROFILE)
        if report.written != len(files) or report.failed or report.skipped:
            raise RuntimeError(f"FIONA anonymize: {report.summary()}; failed {report.failed[:3]}"
                               f" skipped {report.skipped[:3]}")


class FionaEngine(Tool):
    name = "FIONA engine"

    def setup(self, corpus, files):
        from fiona.deid.engine import Deidentifier, Settings, with_profile

        self.Deidentifier = Deidentifier
        self.settings = with_profile(Settings(project=PROJECT, participant=PARTICIPANT,
                                              key=os.urandom(32)), PROFILE)

    def run(self, corpus, files, out):
        engine = self.Deidentifier(self.settings)
        for path in files:
            ds = pydicom.dcmread(path)
            engine.apply(ds)
            ds.save_as(out / path.name, enforce_file_format=True)


class Deid(Tool):
    name = "deid"
    get_identifiers_first = True

    def setup(self, corpus, files):
        from deid.config import DeidRecipe
        from deid.dicom import get_identifiers, replace_identifiers
        from deid.logger import bot
        from deid.logger.message import QUIET

        bot.level = QUIET  # it would print a line per file otherwise
        self.DeidRecipe = DeidRecipe
        self.get_identifiers, self.replace_identifiers = get_identifiers, replace_identifiers

    def run(self, corpus, files, out):
        recipe = self.DeidRecipe()  # the default recipe
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path)
            # the values the default recipe's ADD lines take (var:...)
            variables = {"entity_id": PARTICIPANT, "item_id": f"ITEM{i:05d}",
                         "entity_timestamp": "19000101", "item_timestamp": "20000101"}
            if self.get_identifiers_first:
                ids = self.get_identifiers(ds)
                for lookup in ids.values():
                    lookup.update(variables)
            else:
                ids = {os.path.abspath(ds.filename): variables}
            self.replace_identifiers(ds, ids=ids, deid=recipe, save=True,
                                     output_folder=str(out), overwrite=True)


class DeidReplaceOnly(Deid):
    name = "deid replace-only"
    get_identifiers_first = False


class Dicognito(Tool):
    name = "dicognito"

    def setup(self, corpus, files):
        from dicognito.anonymizer import Anonymizer

        self.Anonymizer = Anonymizer

    def run(self, corpus, files, out):
        anonymizer = self.Anonymizer()
        for path in files:
            ds = pydicom.dcmread(path)
            anonymizer.anonymize(ds)
            ds.save_as(out / path.name)


TOOLS: tuple[type[Tool], ...] = (PydicomReadWrite, FionaAnonymize, FionaEngine, Deid,
                                 DeidReplaceOnly, Dicognito)
PYDICOM, FIONA, ENGINE, DEID, DEID_LEAN, DICOGNITO = (cls.name for cls in TOOLS)


def source_values(path: Path) -> dict[str, list[str]]:
    """Identifying values of a source file: keyword -> strings to look for (names: each part)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values: dict[str, list[str]] = {}
    for keyword in SOURCE_IDENTIFIERS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            continue
        parts = [p for p in value.replace("^", " ").split() if len(p) >= 3] \
            if keyword.endswith("Name") and "^" in value else [value]
        values[keyword] = parts
    return values


def leftovers(out: Path, sources: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(source attributes whose value is still in the first output file, notes on validity).
    The values checked are the same in every file of the corpus (one patient, one study)."""
    path = first_file(out)
    if path is None:
        return ["(no output)"], []
    data = path.read_bytes().lower()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    left = [kw for kw, parts in sources.items() if any(p.lower().encode() in data for p in parts)]
    notes = [f"no {kw}" for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                   "SeriesInstanceUID") if kw not in ds]
    return left, notes


@dataclass
class Results:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    left: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, tool: str, seconds: float) -> None:
        self.seconds.setdefault(tool, []).append(seconds)

    def rates(self, tool: str, files: int) -> list[float]:
        return [files / s for s in self.seconds.get(tool, [])]


def run_once(tool: Tool, root: Path, corpus: Path, files: list[Path],
             label: str) -> tuple[float, Path]:
    """One timed run of `tool` into a fresh folder; returns (seconds, that folder)."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=root))
    try:
        gc.collect()
        t0 = time.perf_counter()
        tool.run(corpus, files, out)
        seconds = time.perf_counter() - t0
        got = count_files(out)
        if got != len(files):
            raise RuntimeError(f"{tool.name} wrote {got} of {len(files)} files")
        if label:
            progress(f"{label} {tool.name:<18} {len(files)} files in {seconds:6.2f} s = "
                     f"{len(files) / seconds:7.1f} files/s")
        return seconds, out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def report(results: Results, files: int) -> dict:
    """Print the table and the ratios; return the same as a JSON-able dict."""
    progress(f"\n{'tool':<18} {'median files/s':>14}   {'runs (files/s)':<24} "
             f"source values left (first output file)")
    medians = {}
    for cls in TOOLS:
        rates = results.rates(cls.name, files)
        medians[cls.name] = statistics.median(rates)
        left = results.left.get(cls.name, [])
        notes = results.notes.get(cls.name, [])
        extra = ", ".join(left) or "none"
        if notes:
            extra += f"  [{', '.join(notes)}]"
        progress(f"{cls.name:<18} {medians[cls.name]:>14.1f}   "
                 f"{' '.join(f'{r:.1f}' for r in rates):<24} {extra}")
    fiona = medians[FIONA]
    ratios = {"FIONA/pydicom": fiona / medians[PYDICOM], "FIONA/deid": fiona / medians[DEID],
              "FIONA/deid-replace-only": fiona / medians[DEID_LEAN],
              "FIONA/dicognito": fiona / medians[DICOGNITO],
              "engine/pydicom": medians[ENGINE] / medians[PYDICOM]}
    progress(f"\nFIONA / pydicom read+write = {ratios['FIONA/pydicom']:.2f} (target >= 0.6)")
    progress(f"FIONA / deid = {ratios['FIONA/deid']:.2f} (target >= 3)")
    progress(f"FIONA / deid replace-only = {ratios['FIONA/deid-replace-only']:.2f}")
    progress(f"FIONA / dicognito = {ratios['FIONA/dicognito']:.2f}")
    progress(f"FIONA engine alone / pydicom read+write = {ratios['engine/pydicom']:.2f}")
    return {
        "files": files,
        "tools": {cls.name: {"seconds": results.seconds[cls.name],
                             "files_per_s": results.rates(cls.name, files),
                             "median_files_per_s": medians[cls.name],
                             "source_values_left": results.left.get(cls.name, []),
                             "notes": results.notes.get(cls.name, [])} for cls in TOOLS},
        "ratios": ratios,
        "targets": {"FIONA/pydicom": 0.6, "FIONA/deid": 3.0},
        "versions": {"python": sys.version.split()[0], "pydicom": pydicom.__version__,
                     **{pkg: _version(pkg) for pkg in PACKAGES}},
        "cpus": os.cpu_count(),
    }


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="corpus size (default 500)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per tool, interleaved (default 3)")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="also cProfile one FIONA anonymize run and print the top N functions")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip install deid/dicognito when missing: print the command, exit 2")
    p.add_argument("--keep", action="store_true", help="keep the temporary corpus")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeat < 1 or args.profile < 0:
        p.error("--images and --repeat must be at least 1, --profile at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not ensure_packages(not args.no_install):
        return 2
    return run_in_scratch(args, "fiona-bench-deid-", lambda root: measure(args, root))


def measure(args: argparse.Namespace, root: Path) -> dict:
    progress(f"generating {args.images} MR images (256x256) under {root} ...")
    files = make_corpus(root, args.images, N_SERIES)
    corpus = root / "corpus"
    size = sum(f.stat().st_size for f in files)
    progress(f"corpus: {len(files)} files, {size / len(files) / 1024:.0f} KiB each")
    sources = source_values(files[0])
    tools = [cls() for cls in TOOLS]
    warm = root / "warm"
    warm.mkdir()
    for path in files[:WARMUP_FILES]:
        shutil.copy2(path, warm / path.name)
    warm_files = sorted(warm.iterdir())
    results = Results()
    for tool in tools:
        tool.setup(corpus, files)
        _s, out = run_once(tool, root, warm, warm_files, "")
        shutil.rmtree(out, ignore_errors=True)
    for rep in range(args.repeat):
        k = rep % len(tools)
        for tool in tools[k:] + tools[:k]:
            seconds, out = run_once(tool, root, corpus, files,
                                    f"[run {rep + 1}/{args.repeat}]")
            if tool.name not in results.left:  # the first output file of the first run
                left, notes = leftovers(out, sources)
                results.left[tool.name], results.notes[tool.name] = left, notes
            shutil.rmtree(out, ignore_errors=True)
            results.add(tool.name, seconds)
    summary = report(results, len(files))
    if args.profile:
        progress(f"\ncProfile of one more FIONA anonymize run ({len(files)} files):")
        fiona = tools[TOOLS.index(FionaAnonymize)]
        text = profile(lambda out: fiona.run(corpus, files, out), root, args.profile)
        progress(text)
        summary["profile"] = text
    return summary


if __name__ == "__main__":
    sys.exit(main())
