"""Asking for an export and fetching it: the rules the Exports page, its JSON API and
`fiona export --queue` share, once.

- Who may ask: the export role in the project (`project:P:export`, admins, the OS user of the
  CLI). A refusal is audited, as is every request.
- What a request is checked for before it is queued: the export type and profile exist, the
  project, participant (for NoAssign: one its naming rule allows) and event exist (a control
  plane that cannot be reached lets the job wait in the worker instead), an e-mail address
  only where the site can mail. The password
  is sealed at once (`jobs.seal`) and never written in clear.
- Who may download a finished export: users with the project's export role now (the requester
  too only while they hold it); every download and every refusal is audited.
- Which jobs a user sees: their own that they may download (admins: all).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .. import audit
from ..access import Actor
from ..actions import Forbidden, Invalid, NotFound
from ..config import Config, Site, read_secret
from ..control.base import ControlPlane
from ..tree import Tree
from .job import export_type
from .jobs import READY, Job, JobError, JobStore, job_path
from .profile import load as load_profile
from .retrieve import ExportError, ExportUnavailable, Selected, check_request, select
from .worker import wake

log = logging.getLogger("fiona.export")

#: what a download may fetch of a ready export: the zip and the two files beside it
PARTS = {"zip": "", "sha256": ".sha256", "manifest": ".manifest.csv"}
#: finished jobs of a project an estimate is made from (the most recent)
ESTIMATE_FROM = 10


@dataclass
class Order:
    """One export as asked for; `password` only travels to `request`, which seals it."""

    project: str
    type: str
    participant: str | None = None
    event: str | None = None
    study: str | None = None
    profile: str = "default"
    noassign: bool = False
    email: str | None = None
    password: bytes | None = field(default=None, repr=False)


def need_export_role(datadir: Path, actor: Actor, project: str, what: str) -> None:
    """Forbidden (audited) unless `actor` has the export role in `project`."""
    if actor.can(project, "export"):
        return
    audit.append(datadir, actor.name, "export-refused", {"project": project, "what": what})
    raise Forbidden(f"you have no export role in project {project}")


def request(config: Config, site: Site, control: ControlPlane, actor: Actor,
            order: Order) -> Job:
    """Queue `order` for the export worker and wake it; the job. Forbidden without the export
    role; ExportError, ProfileError, JobError (all ValueErrors or ExportErrors) naming what is
    wrong with the request."""
    need_export_role(site.datadir, actor, order.project, "request")
    if order.email and not config.smtp:
        raise Invalid("this FIONA cannot send mail (no SMTP config key)")
    export_type(order.type, site.datadir)
    load_profile(order.profile, site.datadir)
    try:
        # NoAssign may name a new participant: it must only match the naming rule
        proj = check_request(control, order.project,
                             None if order.noassign else order.participant, order.event)
        if order.noassign:
            proj.check_participant(order.participant or "")
    except ExportUnavailable:
        pass  # the worker waits for the control plane
    secret = read_secret(Tree(site.datadir).config / "secret.key") if order.password else b""
    job = JobStore(site.datadir).new(
        order.password, secret, project=order.project, type=order.type, requester=actor.name,
        participant=order.participant, event=order.event, study=order.study,
        profile=order.profile, noassign=order.noassign, email=order.email or None)
    audit.append(site.datadir, actor.name, "export-requested",
                 {"job": job.id, "project": job.project, "type": job.type,
                  "profile": job.profile, "participant": job.participant, "event": job.event,
                  "study": job.study, "noassign": job.noassign,
                  "encrypted": bool(order.password), "mail": bool(job.email)})
    log.info("export job %s queued by %s: project %s, %s", job.id, actor.name, job.project,
             job.type)
    wake(site)
    return job


def delivered(control: ControlPlane, project: str, participant: str | None = None,
              event: str | None = None) -> list[tuple[Selected, str]]:
    """The project's delivered studies (matching the filters) with their study dates
    (YYYYMMDD or ""), to pick from; none when there are none."""
    try:
        found = select(control, project, participant, event)
    except ExportUnavailable:
        raise
    except ExportError:  # nothing delivered (yet)
        return []
    out = []
    for sel in found:
        study = control.study(sel.original) if sel.original else None
        out.append((sel, study.date if study else ""))
    return out


def may_download(actor: Actor, job: Job) -> bool:
    """The project's export role, held now: a requester whose role was withdrawn has lost
    their exports too (the role is what allows de-identified data out)."""
    return actor.can(job.project, "export")


def visible(datadir: Path, actor: Actor) -> list[Job]:
    """The jobs `actor` sees on the Exports page, newest first: their own that they may still
    download (admins: all)."""
    jobs = [j for j in JobStore(datadir).all()
            if actor.admin or (j.requester == actor.name and may_download(actor, j))]
    return jobs[::-1]


def load(datadir: Path, job_id: str) -> Job:
    """The job `job_id`: Invalid for a string that is no job id, NotFound for an unknown one."""
    store = JobStore(datadir)
    try:
        job_path(store.tree, job_id)
    except JobError as exc:
        raise Invalid(str(exc)) from None
    try:
        return store.load(job_id)
    except JobError as exc:
        raise NotFound(str(exc)) from None


def allowed(datadir: Path, actor: Actor, job_id: str, address: str = "") -> Job:
    """The job `job_id` when `actor` may download it; Invalid, NotFound or Forbidden (audited,
    and not naming the job's project) otherwise."""
    job = load(datadir, job_id)
    if not may_download(actor, job):
        audit.append(datadir, actor.name, "export-download-refused",
                     {"job": job.id, "project": job.project, "address": address})
        raise Forbidden(f"export {job.id} is not for you: it needs the export role in its "
                        f"project")
    return job


def download(datadir: Path, actor: Actor, job_id: str, part: str = "zip",
             address: str = "") -> Path:
    """The file of ready export `job_id` to send (`part`: zip, sha256 or manifest), after
    checking who asks; audited, refusals too. Invalid, NotFound or Forbidden otherwise."""
    if part not in PARTS:
        raise NotFound(f"an export has no {part!r}; it has {', '.join(PARTS)}")
    job = allowed(datadir, actor, job_id, address)
    if job.state != READY or not job.zip:
        raise NotFound(f"export {job.id} is {job.state}: there is nothing to download")
    path = Tree(datadir).exports / f"{job.zip}{PARTS[part]}"
    if not path.is_file():
        raise NotFound(f"the file of export {job.id} is gone")
    audit.append(datadir, actor.name, "export-download",
                 {"job": job.id, "project": job.project, "file": path.name,
                  "address": address})
    return path


def _seconds(job: Job) -> float | None:
    if not job.started or not job.finished:
        return None
    return (datetime.fromisoformat(job.finished) - datetime.fromisoformat(job.started)
            ).total_seconds()


def estimate(jobs: list[Job], project: str) -> float | None:
    """How long an export of `project` takes, in seconds: the median of the project's last
    ESTIMATE_FROM ready jobs; None without any."""
    past = [s for j in sorted(jobs, key=lambda j: j.finished or "")
            if j.project == project and j.state == READY and (s := _seconds(j)) is not None]
    return statistics.median(past[-ESTIMATE_FROM:]) if past else None
