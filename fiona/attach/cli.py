"""`fiona attach`: the Attach page's jobs from the command line, run at once (the OS user acts
with every right, audited as `os:<login>`; see `fiona.actions.OsActor`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import Config

COMMAND = "attach"
PATHOLOGY = ("specimen", "block", "slide", "stain", "biopsy")


def add_parser(sub: argparse._SubParsersAction, site_arg: Callable) -> None:
    p = sub.add_parser(COMMAND, help="attach data that did not come over DICOM to a "
                       "participant: DICOM media, whole-slide images, documents",
                       description="Each FILE becomes DICOM of the participant and event and "
                       "takes the received studies' path (index, request, de-identification, "
                       "gate, forwarding): a zip or folder of DICOM files from media (with or "
                       "without DICOMDIR), a whole-slide image (.svs, .ndpi, .tiff, .ome.tiff, "
                       "a zipped MIRAX slide ...) converted by wsidicomizer without label and "
                       "overview images, or with --study a PDF or PNG/JPEG image as a new "
                       "series of that study. Exit 1 when a file failed (nothing of it is "
                       "stored).")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--project", required=True)
    p.add_argument("--participant", required=True, metavar="ID")
    p.add_argument("--event", required=True, metavar="E")
    p.add_argument("--study", default="", metavar="UID",
                   help="documents: the existing study the new series joins")
    for name in PATHOLOGY:
        p.add_argument(f"--{name}", default="", help=f"whole-slide images: {name}")
    site_arg(p)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run(config: Config, args: argparse.Namespace) -> int:
    from ..actions import ActionError, OsActor
    from ..control.base import ControlPlaneError
    from .jobs import DONE
    from .service import Attacher

    attacher = Attacher(config, config.site(args.site))
    actor = OsActor.current()
    pathology = {k: getattr(args, k) for k in PATHOLOGY}
    failed = 0
    for path in args.files:
        if not path.exists():
            print(f"fiona attach: {path}: no such file or folder", file=sys.stderr)
            failed += 1
            continue
        try:
            job = attacher.create(actor, args.project, args.participant, args.event, path.name,
                                  _size(path), args.study, pathology, path.resolve())
        except (ActionError, ControlPlaneError, ValueError) as exc:
            print(f"fiona attach: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        job = attacher.run(job)
        if job.state != DONE:
            print(f"fiona attach: {path}: {job.reason}", file=sys.stderr)
            failed += 1
            continue
        extra = (f"; {len(job.not_dicom)} file(s) not DICOM, skipped: "
                 + ", ".join(job.not_dicom[:5])) if job.not_dicom else ""
        print(f"{path}: {job.done} object(s) of {len(job.studies)} study(ies) attached to "
              f"{job.project}/{job.participant}/{job.event} as {job.kind}{extra}")
    return 1 if failed else 0
