"""`fiona reindex` (the original's "send to me", `s2m.sh`): run the indexer and classification
again over files already in the archive, without the network.

For each selected study (by StudyInstanceUID, by PatientID read from the archived headers, or
by archive modification time within the last N days) it removes the study's raw/ folder (series
links and series JSONs), its participants/ and srs/ links, and indexes every archived file
again with the indexer's own code (`Indexer.index_file`) and the site's current
classifyRules.json: after a rule change, or when raw/ was lost or damaged. Files are taken in
arrival order (the receiver journal's order where it still holds the files, then modification
time), as the indexer first saw them, so a series JSON comes out as it was built on arrival
(modification times alone are coarse: the kernel stamps files with a clock tick, so several
files of a fast sender share one); the sender (IncomingConnection) is taken from the
receiver's journal where it still holds the file's line, else from the study's old series
JSONs. Running it twice
gives the same tree. Nothing is announced to the arrival detector: the study did not arrive
again, so nothing is assigned or forwarded again. Run it while the study is not arriving.

Selecting by PatientID reads headers only; the ID is never logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site
from ..journal import RECEIVED, FileEvent, JournalReader
from ..tree import ARCHIVE_PREFIX, InvalidValue, Tree, valid_uid
from .header import CONNECTION
from .indexer import Indexer, load_rules

log = logging.getLogger("fiona.reindex")

COMMAND = "reindex"
DAY = 86400.0

Progress = Callable[[str], None]


@dataclass
class Result:
    studies: int = 0
    files: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Received:
    """What the receiver journal still says of one archived file."""

    order: int
    sender: tuple[str, str, str]


def _files(folder: Path, journal: dict[str, Received] | None = None) -> list[os.DirEntry]:
    """A study's archived files in arrival order (hidden temporary files left out): by
    modification time, ties broken by the journal's order, then by name."""
    journal = journal or {}
    entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    last = len(journal)

    def key(e: os.DirEntry) -> tuple[int, int, str]:
        seen = journal.get(e.path)
        return (e.stat().st_mtime_ns, seen.order if seen else last, e.name)

    return sorted(entries, key=key)


def select_studies(tree: Tree, study: str | None = None, patient: str | None = None,
                   last_days: float | None = None, clock: Clock = SYSTEM_CLOCK) -> list[str]:
    """The archived studies one selector names, sorted."""
    archived = tree.archived_studies()
    if study is not None:
        uid = valid_uid(study, "StudyInstanceUID")
        return [uid] if uid in archived else []
    if patient is not None:
        return sorted(s for s in archived if _patient_of(tree, s) == patient.strip())
    if last_days is not None:
        since = clock.time() - last_days * DAY
        return sorted(s for s in archived
                      if any(e.stat().st_mtime >= since for e in _files(tree.study_archive(s))))
    raise ValueError("select a study, a patient or a number of days")


def _patient_of(tree: Tree, study: str) -> str | None:
    """The PatientID in the first readable header of a study's archived files."""
    for entry in _files(tree.study_archive(study)):
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True,
                                 specific_tags=["PatientID"])
        except Exception:  # an unreadable file: try the next one
            continue
        return str(ds.get("PatientID", "") or "").strip()
    return None


def _received(tree: Tree, studies: set[str]) -> dict[str, Received]:
    """archive file path -> its place and sender in the journal lines it still holds."""
    out: dict[str, Received] = {}
    for line, _pos in JournalReader(tree.journal, RECEIVED, "reindex").read(limit=10**12):
        try:
            event = FileEvent.parse(line)
        except InvalidValue:
            continue
        if event.study_dir.name[len(ARCHIVE_PREFIX):] in studies:
            out.setdefault(str(event.study_dir / event.name),
                           Received(len(out), (event.caller, event.called, event.ip)))
    return out


def _old_sender(tree: Tree, study: str) -> tuple[str, str, str]:
    """The sender an old series JSON of the study recorded, if any."""
    try:
        names = sorted(p for p in tree.study_raw(study).glob("*.json"))
    except OSError:
        names = []
    for path in names:
        try:
            conn = json.loads(path.read_text()).get(CONNECTION) or {}
        except (OSError, ValueError, AttributeError):
            continue
        if conn:
            return (str(conn.get("AETitleCaller", "")), str(conn.get("AETitleCalled", "")),
                    str(conn.get("CallerIP", "")))
    return ("", "", "")


def _clear(tree: Tree, study: str) -> None:
    """Remove what the indexer built for a study: raw/<study>, its participants/ links and
    its srs/ folders."""
    raw = tree.study_raw(study)
    if tree.participants.is_dir():
        for patient in os.scandir(tree.participants):
            if not patient.is_dir(follow_symlinks=False):
                continue
            for link in os.scandir(patient.path):
                if link.is_symlink() and os.readlink(link.path).rstrip("/").endswith(
                        f"/raw/{study}"):
                    os.unlink(link.path)
            if not os.listdir(patient.path):
                os.rmdir(patient.path)
    if tree.srs.is_dir():
        for maker in os.scandir(tree.srs):
            shutil.rmtree(Path(maker.path) / study, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)


def reindex(site: Site, studies: Iterable[str], progress: Progress | None = None) -> Result:
    """Rebuild raw/, participants/, srs/ and the series JSONs of `studies` from the archive."""
    progress = progress or (lambda _text: None)
    studies = list(studies)
    tree = Tree(site.datadir)
    indexer = Indexer(site, load_rules(site))
    received = _received(tree, set(studies))
    result = Result()
    for n, study in enumerate(studies, 1):
        fallback = _old_sender(tree, study)
        _clear(tree, study)
        folder = tree.study_archive(study)
        files = _files(folder, received)
        for i, entry in enumerate(files, 1):
            seen = received.get(entry.path)
            caller, called, ip = seen.sender if seen else fallback
            try:
                indexer.index_file(FileEvent(caller, called, ip, folder, entry.name),
                                   announce=False)
                result.files += 1
            except Exception as exc:  # one bad file must not stop the others
                result.failed += 1
                log.error("reindex of study %s: %s cannot be indexed (%s)", study, entry.name,
                          type(exc).__name__)
            if i % 50 == 0 or i == len(files):
                progress(f"study {n}/{len(studies)}: {i}/{len(files)} files")
        indexer.flush()
        indexer.series.clear()
        result.studies += 1
    log.info("reindexed %d studies, %d files (%d failed)", result.studies, result.files,
             result.failed)
    return result


def add_parser(sub, site_arg) -> None:
    p = sub.add_parser(COMMAND, help="rebuild raw/ and the series JSONs from the archive "
                       "(s2m.sh)", description="Index archived files again, without the "
                       "network: raw/ links, participants/ and srs/ links and the series JSONs "
                       "(with the site's current classifyRules.json) of the selected studies "
                       "are rebuilt. Idempotent. Nothing is assigned or forwarded again.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="one StudyInstanceUID")
    which.add_argument("--patient", metavar="ID",
                       help="every study whose archived headers carry this PatientID")
    which.add_argument("--last-days", type=float, metavar="N",
                       help="every study with an archived file modified in the last N days")
    site_arg(p)


def run(config: Config, args: argparse.Namespace) -> int:
    from ..daemon import setup_logging

    site = config.site(args.site)
    setup_logging(site, COMMAND, args.verbose)
    tree = Tree(site.datadir)
    try:
        studies = select_studies(tree, args.study, args.patient, args.last_days)
    except InvalidValue as exc:
        print(f"fiona reindex: {exc}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def progress(text: str) -> None:
        if tty:
            print(f"\r{text}\033[K", end="", file=sys.stderr, flush=True)

    result = reindex(site, studies, progress)
    if tty:
        print("\r\033[K", end="", file=sys.stderr)
    print(f"reindexed {result.studies} study(ies), {result.files} file(s)"
          + (f", {result.failed} could not be indexed (see the log)" if result.failed else ""))
    if not studies:
        print("fiona reindex: no archived study matches", file=sys.stderr)
    return 1 if result.failed or not studies else 0
