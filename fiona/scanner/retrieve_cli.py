"""`fiona retrieve`: the command-line side of retrieval by accession (`fiona.scanner.retrieve`),
through the same action as the web's button (`Actions.retrieve`), audited under the OS user."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from ..config import Config
from ..control.assign import COUPLING_HEADER

COMMAND = "retrieve"


def add_parser(sub, site_arg) -> None:
    p = sub.add_parser(COMMAND, help="fetch studies by accession number from the clinical PACS",
                       description="Ask the clinical PACS (CLINICAL_PACS, else SCANNERAETITLE@"
                       "SCANNERIP:SCANNERPORT) for each accession number FIONA has not received: "
                       "C-FIND at STUDY level, then C-MOVE to FIONA's DICOMAETITLE (declare it "
                       "at the PACS). One result line per accession; exit 1 unless every study "
                       "was moved or is here already. Audited.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--accession", action="append", metavar="A",
                       help="an accession number (repeatable)")
    which.add_argument("--file", type=Path, metavar="CSV",
                       help="a coupling list (AccessionNumber,ProjectName,subjectid,eventname)")
    site_arg(p)


def accessions_of(text: str) -> list[str]:
    """The accession numbers of a coupling-list CSV (first column; header line optional)."""
    out = []
    for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        if number == 1 and [f.strip() for f in fields[:4]] == COUPLING_HEADER:
            continue
        if fields and fields[0].strip():
            out.append(fields[0].strip())
    return out


def run(config: Config, args: argparse.Namespace) -> int:
    from ..actions import ActionError, Actions, OsActor
    from ..control.base import ControlPlaneError
    from ..daemon import setup_logging
    from .retrieve import Peer

    if args.file is not None:
        try:
            accessions = accessions_of(args.file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            print(f"fiona retrieve: cannot read {args.file}: {exc}", file=sys.stderr)
            return 1
    else:
        accessions = args.accession
    peer = Peer.from_config(config)
    setup_logging(config.site(args.site), COMMAND, args.verbose)
    tty = sys.stderr.isatty()

    def progress(text: str) -> None:
        if tty:
            print(f"\r{text}\033[K", end="", file=sys.stderr, flush=True)

    try:
        lines = Actions.open(config, args.site).retrieve(OsActor.current(), peer, accessions,
                                                         progress=progress)
    except (ActionError, ControlPlaneError) as exc:
        print(f"fiona retrieve: {exc}", file=sys.stderr)
        return 1
    if tty:
        print("\r\033[K", end="", file=sys.stderr)
    for line in lines:
        print(f"{line.accession}: {line.text()}")
    moved = sum(x.images for x in lines)
    print(f"{len(lines)} accession number(s) from {peer.label}, {moved} image(s) moved")
    return 0 if all(x.ok for x in lines) else 1
