"""The `fiona export` subcommand: its parser (imported with every `fiona` command, so it
imports nothing heavy) and its run, which makes one export synchronously (`job.run`) with a
progress bar on a terminal. The password comes from a file or standard input (`-`), never from
the command line (where `ps` shows it), and is never logged or stored."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import Config

COMMAND = "export"
WORKER, CLEAR = "export-worker", "clear-exports"
COMMANDS = (COMMAND, WORKER, CLEAR)


def add_parser(sub: argparse._SubParsersAction, site_arg: Callable) -> None:
    """Register `fiona export`, `fiona export-worker` and `fiona clear-exports`."""
    p = sub.add_parser(COMMAND, help="export a project's de-identified studies as one zip",
                       description="Gather the de-identified studies of a project (optionally "
                       "one participant, event or study) from where they were delivered (a "
                       "folder destination or the research PACS by C-GET), apply an export "
                       "profile, lay them out by the export type and pack one zip with a "
                       "README, a manifest and a .sha256 beside it. With --noassign, a study "
                       "that waits unassigned at FIONA is de-identified for the project "
                       "directly (same pipeline and gate as the forwarder).")
    p.add_argument("--project", required=True)
    p.add_argument("--participant", metavar="ID")
    p.add_argument("--event", metavar="E")
    p.add_argument("--study", metavar="UID", help="original or de-identified StudyInstanceUID")
    p.add_argument("--type", required=True, metavar="TYPE",
                   help="dicom, pure, spectroscopy, nifti, bids")
    p.add_argument("--profile", default="default", metavar="NAME", help="export profile "
                   "(DATADIR/config/profiles/export/NAME.json, else the shipped one)")
    p.add_argument("--password-file", metavar="F", help="encrypt the zip (AES-256) with the "
                   "password in file F, or read from standard input with '-'")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the zip goes (default: DATADIR/site/exports)")
    p.add_argument("--noassign", action="store_true", help="de-identify a study waiting "
                   "unassigned (needs --study, --participant, --event)")
    p.add_argument("--queue", action="store_true", help="queue the export for the export "
                   "worker and print the job id, instead of making it now; the job file "
                   "(DATADIR/site/exports/jobs/ID.json) shows its state and progress")
    p.add_argument("--mail", metavar="ADDRESS", help="with --queue: mail ADDRESS when the "
                   "export is ready (needs the SMTP config key)")
    site_arg(p)

    p = sub.add_parser(WORKER, help="the export worker daemon (queued exports)",
                       description="Make the queued exports (`fiona export --queue`, the "
                       "Exports page) one at a time: on start every job that is queued or was "
                       "in progress, then whenever a job is queued. A research PACS that "
                       "cannot be reached makes the job wait with back-off. Runs in the "
                       "foreground until SIGTERM or Ctrl-C.")
    site_arg(p)

    p = sub.add_parser(CLEAR, help="remove expired exports and stale export work folders",
                       description="Remove export work folders older than a day, the exports "
                       "past EXPORTS.retention_days, and above EXPORTS.cleanup_percent of the "
                       "disk the oldest finished exports; failed jobs are forgotten after the "
                       "retention time. One log line and one audit entry per export removed.")
    site_arg(p)


def read_password(source: str | None) -> bytes | None:
    """The password from file `source` or standard input ("-"), without its line end."""
    if source is None:
        return None
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    password = data.rstrip(b"\r\n")
    if not password:
        raise ValueError("the password is empty")
    return password


def run(config: Config, args: argparse.Namespace) -> int:
    """One of COMMANDS."""
    if args.command == WORKER:
        from .worker import run as run_worker

        return run_worker(config, args.site, args.verbose)
    if args.command == CLEAR:
        from .cleanup import run as run_cleanup

        return run_cleanup(config, args)
    if args.queue:
        return queue(config, args)
    if args.mail:
        print("fiona export: --mail goes with --queue", file=sys.stderr)
        return 2
    return export_now(config, args)


def queue(config: Config, args: argparse.Namespace) -> int:
    """`fiona export --queue`: 0 with the job id on stdout, 1 with the reason on stderr. The
    request is checked and audited now by `orders.request`, as the Exports page's is (unknown
    names fail here, not in the worker); the password is sealed at once, never written in
    clear."""
    from ..actions import ActionError, OsActor
    from ..control import open_control_plane
    from ..control.base import ControlPlaneError
    from .orders import Order, request
    from .profile import ProfileError
    from .retrieve import ExportError

    site = config.site(args.site)
    if args.out:
        print("fiona export: --out does not go with --queue (queued exports go to "
              "DATADIR/site/exports)", file=sys.stderr)
        return 2
    if args.mail and not config.smtp:
        print("fiona export: --mail needs the SMTP config key", file=sys.stderr)
        return 2
    try:
        password = read_password(args.password_file)
        job = request(config, site, open_control_plane(config, site), OsActor.current(),
                      Order(args.project, args.type, args.participant, args.event, args.study,
                            args.profile, args.noassign, args.mail, password))
    except (ActionError, ExportError, ProfileError, ControlPlaneError, OSError,
            ValueError) as exc:
        print(f"fiona export: {exc}", file=sys.stderr)
        return 1
    print(job.id)
    return 0


def export_now(config: Config, args: argparse.Namespace) -> int:
    """`fiona export`: 0 with the zip's path on stdout, 1 with the reason on stderr."""
    from ..actions import OsActor
    from ..control import open_control_plane
    from ..control.base import ControlPlaneError
    from ..daemon import setup_logging
    from .job import ExportRequest
    from .job import run as run_export
    from .profile import ProfileError
    from .retrieve import ExportError

    site = config.site(args.site)
    setup_logging(site, "export", args.verbose)
    tty = sys.stderr.isatty()
    shown = {"phase": ""}  # the phase whose bar is on the current line ("" when none)

    def progress(phase: str, done: int, total: int) -> None:
        if not tty:
            return
        if shown["phase"] and shown["phase"] != phase:
            print(file=sys.stderr)  # keep the finished phase's line
        if total:
            filled = 30 * done // total
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        else:
            bar = f"{done} images"
        print(f"\r\x1b[Kexport: {phase} {bar}", end="", file=sys.stderr, flush=True)
        shown["phase"] = phase
        if total and done == total:
            print(file=sys.stderr)  # the bar is full: log lines may follow
            shown["phase"] = ""

    try:
        password = read_password(args.password_file)
        request = ExportRequest(args.project, args.type, OsActor.current().name, args.participant,
                                args.event, args.study, args.profile, password, args.out,
                                args.noassign)
        result = run_export(config, site, open_control_plane(config, site), request, progress)
    except (ExportError, ProfileError, ControlPlaneError, OSError, ValueError) as exc:
        if shown["phase"]:
            print(file=sys.stderr)
        print(f"fiona export: {exc}", file=sys.stderr)
        return 1
    for problem in result.report.problems:
        print(f"fiona export: not included: {problem}", file=sys.stderr)
    print(result.zip)
    return 0
