"""One export, start to end: retrieve (or, for NoAssign, de-identify) into a work folder, build
the type's layout, pack one zip, audit. Used by `fiona export` (synchronously) and by the
export worker.

The work folder is `DATADIR/site/exports/tmp/<job>/`, inside the data tree; it is removed at
the end whatever happens. The zip appears under its final name only when complete
(`pack.pack`). The password is passed through to the packer and appears in no log, audit entry
or file.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .. import audit
from ..config import Config, Site, read_secret
from ..control.base import ControlPlane
from ..tree import Tree, ensure_dir

# the type modules register their types on import
from . import bids, dicom, nifti, noassign, pure, spectroscopy  # noqa: F401
from .names import clean
from .pack import About, pack
from .profile import load as load_profile
from .retrieve import Collector, ExportError, original_characteristics, retrieve
from .types import REGISTRY, ExportReport, ExportType, StudyInput

log = logging.getLogger("fiona.export")

#: phase, done, total (total 0 while unknown)
Progress = Callable[[str, int, int], None]


@dataclass
class ExportRequest:
    project: str
    type: str
    requester: str
    participant: str | None = None
    event: str | None = None
    study: str | None = None
    profile: str = "default"
    password: bytes | None = field(default=None, repr=False)
    out: Path | None = None
    noassign: bool = False
    job: str = ""  #: the export job's id (the worker's; a new one when empty)


@dataclass
class ExportResult:
    zip: Path
    files: int
    report: ExportReport


def exports_dir(datadir: Path) -> Path:
    return Tree(Path(datadir)).exports


def export_type(name: str, datadir: Path | None = None) -> ExportType:
    """A new instance of the export type `name` for the site at `datadir`, or ExportError
    naming the known types."""
    if name not in REGISTRY:
        raise ExportError(f"no export type {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](datadir)


def run(config: Config, site: Site, control: ControlPlane, req: ExportRequest,
        progress: Progress | None = None) -> ExportResult:
    """Make the export `req` asks for; ExportError (or ExportUnavailable) when it cannot."""
    kind = export_type(req.type, site.datadir)
    profile = load_profile(req.profile, site.datadir)
    tree = Tree(site.datadir)
    key = read_secret(site.datadir / "config" / "secret.key")
    job = req.job or uuid.uuid4().hex[:12]
    work = ensure_dir(tree.export_tmp / job)
    tell = progress or (lambda phase, done, total: None)
    try:
        objects = ensure_dir(work / "objects")
        collector = Collector(objects, profile, lambda n: tell("retrieving", n, 0))
        if req.noassign:
            _proj, sel, pipeline = noassign.prepare(control, tree, key, req.project,
                                                    req.participant, req.event, req.study)
            studies = [collector.study(req.project, sel, noassign.objects(tree, pipeline, sel),
                                       noassign.labels(pipeline),
                                       original_characteristics(tree, sel.original))]
        else:
            studies, collector = retrieve(config, control, tree, key, req.project,
                                          req.participant, req.event, req.study, profile,
                                          objects, collector.progress)
        report = ExportReport(total=sum(len(s.files) for st in studies for s in st.series))
        layout = ensure_dir(work / "layout")
        tell("converting", 0, report.total)
        kind.build(studies, layout, report)
        if not report.files:
            raise ExportError(f"nothing to export: the {req.type} layout took no file of the "
                              f"{collector.count} retrieved"
                              + (f" ({'; '.join(report.problems[:5])})" if report.problems
                                 else ""))
        now = datetime.now(UTC)
        name = f"{clean(req.project)}_{clean(req.type)}_{now:%Y%m%dT%H%M%SZ}_{job}.zip"
        target = Path(req.out or exports_dir(site.datadir)) / name
        about = _about(req, studies, now, report.problems + sorted(set(collector.dropped)))
        zipped = pack(layout, about, work, target, req.password,
                      lambda done, total: tell("packing", done, total))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    audit.append(site.datadir, req.requester, "export-noassign" if req.noassign else "export",
                 {"project": req.project, "type": req.type, "profile": req.profile,
                  "studies": [s.uid for s in studies], "files": len(report.files),
                  "encrypted": bool(req.password), "zip": zipped.name})
    log.info("export %s of project %s (%s, profile %s): %d files in %d studies -> %s%s",
             job, req.project, req.type, req.profile, len(report.files), len(studies),
             zipped.name, " (encrypted)" if req.password else "")
    return ExportResult(zipped, len(report.files), report)


def _about(req: ExportRequest, studies: list[StudyInput], now: datetime,
           problems: list[str]) -> About:
    what = f"{req.type} export of project {req.project}" + \
        (" (NoAssign: de-identified at export)" if req.noassign else "")
    return About(what, req.requester, now.isoformat(timespec="seconds"), req.type, req.profile,
                 req.project, tuple(sorted({s.participant for s in studies})),
                 tuple(sorted({s.event for s in studies})), tuple(problems))
