"""The `fiona inventory` subcommand: its parser (imported with every `fiona` command, so it
imports nothing heavy) and its run, which takes the inventory (`fiona.ops.inventory`), prints
the outcome and logs one line with counts to `logs/inventory.log`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..config import Config, ConfigError

COMMAND = "inventory"


def add_parser(sub: argparse._SubParsersAction, site_arg: Callable) -> None:
    """Register `fiona inventory` on the `fiona` parser."""
    p = sub.add_parser(COMMAND, help="list what the research PACS holds, in the control plane "
                       "(whatIsInIDS7)",
                       description="Ask the research PACS (a dicom destination) by C-FIND which "
                       "studies it holds, of one project (InstitutionName) or of every project, "
                       "with participant, event, study date, series and image counts and "
                       "modalities, and store that as the inventory in the control plane "
                       "(local table; REDCap project WhatIsInIDS7), removing studies the PACS "
                       "no longer holds. Answers the PACS cuts off at its result limit are "
                       "split by PatientID wildcard until complete. When the PACS cannot be "
                       "reached or fails a query, the stored inventory is kept and the exit "
                       "code is 1.")
    p.add_argument("--project", help="only this project (default: every project)")
    p.add_argument("--destination", metavar="NAME", help="the dicom destination to ask "
                   "(default: DESTINATIONS.research if it is dicom, else the first dicom one)")
    p.add_argument("--limit", type=int, metavar="N", help="the PACS stops at N results without "
                   "saying so: treat an answer of N or more as cut off")
    site_arg(p)


def destination(config: Config, name: str | None) -> tuple[str, dict[str, Any]]:
    """The dicom destination the inventory asks: `name`, else "research" if it is dicom, else
    the first dicom one; a ConfigError when there is none."""
    dicom = {n: s for n, s in config.destinations.items() if s.get("type") == "dicom"}
    if name is None:
        name = "research" if "research" in dicom else next(iter(dicom), None)
    if name is None or name not in dicom:
        which = f"dicom destination {name!r}" if name else "dicom destination"
        raise ConfigError([f"DESTINATIONS has no {which} to take an inventory of (dicom ones: "
                           f"{', '.join(dicom) or 'none'}); the inventory asks the research "
                           f"PACS by C-FIND"], config.path)
    return name, dicom[name]


def run(config: Config, args: argparse.Namespace) -> int:
    """`fiona inventory`: 0 stored, 1 stopped with a reason (the stored inventory kept)."""
    from ..control import open_control_plane
    from ..control.base import ControlPlaneError
    from ..daemon import setup_logging
    from .inventory import Inventory, InventoryError, ResearchPacs, log

    site = config.site(args.site)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(["--limit must be at least 1"])
    name, settings = destination(config, args.destination)
    pacs = ResearchPacs(name, settings, args.limit)
    setup_logging(site, "inventory", args.verbose)
    tty = sys.stderr.isatty()

    def progress(text: str) -> None:
        if tty:
            print(f"\r\x1b[Kinventory: {text}", end="", file=sys.stderr, flush=True)

    try:
        control = open_control_plane(config, site)
        if args.project is not None:
            control.project(args.project)  # a known project: catches typos
        report = Inventory(pacs, control, progress=progress).run(args.project)
    except (InventoryError, ControlPlaneError) as exc:
        if tty:
            print(file=sys.stderr)
        log.error("inventory failed, the stored inventory is kept: %s", exc)
        print(f"fiona inventory: {exc}; the stored inventory is kept", file=sys.stderr)
        return 1
    if tty:
        print(file=sys.stderr)
    log.info("%s", report.line())
    print(report.line())
    if report.without_patient_id:
        print(f"warning: {report.without_patient_id} studies without PatientID; with a cut-off "
              f"answer such studies cannot all be found", file=sys.stderr)
    return 0
