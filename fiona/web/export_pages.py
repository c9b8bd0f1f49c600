"""Exports: ask for a project's de-identified studies as a zip, watch it being made, download
it; and the JSON endpoints the page polls.

The rules (who may ask and download, what a request is checked for, the audit entries, waking
the export worker) are `fiona.export.orders`, shared with `fiona export --queue`; this module
translates forms and answers. Downloads are Starlette's `FileResponse`, which answers HTTP
Range requests (206 with Content-Range, 416 for a range outside the file), so a broken
download resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse

from ..actions import ActionError, Invalid
from ..clock import SYSTEM_CLOCK
from ..control.base import ControlPlaneError
from ..export import orders
from ..export.jobs import FAILED, IN_PROGRESS, OPEN, READY, Job, JobError, JobStore
from ..export.profile import ProfileError
from ..export.profile import names as profile_names
from ..export.retrieve import ExportError, ExportUnavailable
from ..export.types import REGISTRY
from ..tree import valid_uid
from . import csrf
from .context import Ctx, client_address, ctx, current_user, render
from .outcomes import actions, http_error
from .users import User

router = APIRouter()
log = logging.getLogger("fiona.web")

#: at most this many jobs from one form (one per picked study)
MAX_JOBS = 20
MESSAGES = {"queued": "Export requested: it is made in the background; this page shows its "
                      "progress.",
            "queued-many": "Exports requested, one per study: they are made in the "
                           "background; this page shows their progress."}
MEDIA = {"zip": "application/zip", "sha256": "text/plain", "manifest": "text/csv"}


@dataclass
class ExportForm:
    """The request form's fields, as typed (shown again after a refusal; never the password)."""

    project: str = ""
    participant: str = ""
    event: str = ""
    since: str = ""
    until: str = ""
    type: str = "dicom"
    profile: str = "default"
    email: str = ""
    studies: tuple[str, ...] = ()


def _day(value: str) -> str:
    """`YYYY-MM-DD` (a date input) as `YYYYMMDD`; "" for anything else."""
    text = value.strip().replace("-", "")
    return text if len(text) == 8 and text.isdigit() else ""


def _projects(c: Ctx, user: User) -> list[dict]:
    """The projects the user may export, with their events."""
    return [{"name": p.name, "events": p.events} for p in c.control.projects()
            if user.can(p.name, "export")]


def _candidates(c: Ctx, form: ExportForm) -> list[dict]:
    """The project's delivered studies matching the form's filters, to pick from."""
    if not form.project:
        return []
    since, until = _day(form.since), _day(form.until)
    rows = []
    for sel, date in orders.delivered(c.control, form.project, form.participant or None,
                                      form.event or None):
        if (since and (not date or date < since)) or (until and (not date or date > until)):
            continue
        rows.append({"uid": sel.mapped, "participant": sel.participant, "event": sel.event,
                     "date": date})
    return rows


def _orders(c: Ctx, form: ExportForm, password: bytes | None) -> list[orders.Order]:
    """What the form asks for: one export per picked study; with a date range and no pick, one
    per study in the range; otherwise one for the project (and participant, event)."""
    def order(study: str | None = None, participant: str | None = None,
              event: str | None = None) -> orders.Order:
        return orders.Order(form.project, form.type, participant or form.participant or None,
                            event or form.event or None, study, form.profile or "default",
                            email=form.email.strip() or None, password=password)

    if not form.studies and not (form.since or form.until):
        return [order()]
    known = {r["uid"]: r for r in _candidates(c, form)}
    picked = list(form.studies) or list(known)
    if not picked:
        raise Invalid("no delivered study of the project matches the filter")
    unknown = [uid for uid in picked if uid not in known]
    if unknown:
        raise Invalid(f"not among the delivered studies that match the filter: "
                      f"{', '.join(unknown[:5])}")
    if len(picked) > MAX_JOBS:
        raise Invalid(f"{len(picked)} studies: pick at most {MAX_JOBS} (one export each), or "
                      f"export by participant or event instead")
    return [order(uid, known[uid]["participant"], known[uid]["event"]) for uid in picked]


def _page(request: Request, c: Ctx, user: User, form: ExportForm, status: int = 200,
          error: str = "", message: str = ""):
    projects = _projects(c, user)
    if form.project not in [p["name"] for p in projects]:  # nothing of others' projects
        form.project = projects[0]["name"] if len(projects) == 1 else ""
    try:
        candidates = _candidates(c, form)
    except (ExportUnavailable, ControlPlaneError) as exc:
        candidates = []
        error = error or f"The studies cannot be listed now: {_refusal(user, exc)[1]}"
    participants = []
    if form.project:
        try:
            participants = sorted(c.control.participants(form.project))
        except ControlPlaneError:
            participants = []
    events: list[str] = next((p["events"] for p in projects if p["name"] == form.project), [])
    return render(request, "exports.html", status, form=form, projects=projects,
                  participants=participants, events=events, candidates=candidates,
                  types=sorted((name, cls.description) for name, cls in REGISTRY.items()),
                  profiles=profile_names(c.datadir), mail=bool(c.config.smtp),
                  jobs=jobs(c, user), retention=c.config.exports["retention_days"],
                  error=error, message=message)


def job_row(job: Job, typical: float | None) -> dict:
    """One job as the page and `/api/exports` show it."""
    row = {k: getattr(job, k) for k in (
        "id", "project", "type", "profile", "participant", "event", "study", "requester",
        "state", "reason", "waiting", "done", "total", "created", "started", "finished",
        "expires", "problems", "noassign")}
    row["open"] = job.state in OPEN
    row["estimate"] = row["remaining"] = None  # seconds, from the project's past exports
    if typical is not None and job.state in OPEN:
        row["estimate"] = round(typical)
        if job.state in IN_PROGRESS and job.started:
            elapsed = (SYSTEM_CLOCK.now() - datetime.fromisoformat(job.started)).total_seconds()
            row["remaining"] = max(0, round(typical - elapsed))
    ready = job.state == READY and job.zip
    row["download"] = {part: f"/exports/{job.id}/{'download' if part == 'zip' else part}"
                       for part in orders.PARTS} if ready else None
    row["file"] = job.zip if ready else None
    row["reason"] = job.reason if job.state == FAILED else ""
    return row


def jobs(c: Ctx, user: User) -> list[dict]:
    """The user's jobs (admins: all), newest first, with the estimate of their project."""
    every = orders.visible(c.datadir, user)
    history = JobStore(c.datadir).all()
    typical = {p: orders.estimate(history, p) for p in {j.project for j in every}}
    return [job_row(j, typical[j.project]) for j in every]


def _submit(c: Ctx, user: User, form: ExportForm, password: str, password2: str) -> list[Job]:
    """Queue the form's exports; ActionError or a request error on refusal."""
    if password != password2:
        raise Invalid("the two passwords differ")
    if not form.project:
        raise Invalid("choose a project")
    orders.need_export_role(c.datadir, user, form.project, "request")
    secret = password.encode() if password else None
    return [orders.request(c.config, c.site, c.control, user, o)
            for o in _orders(c, form, secret)]


REFUSALS = (ActionError, ExportError, ProfileError, JobError, ControlPlaneError, ValueError)


def _refusal(user: User, exc: Exception) -> tuple[int, str]:
    """The status and text of a request that was refused; what cannot be reached now is 503,
    its technical detail for admins only (as `outcomes.http_error` does)."""
    if isinstance(exc, ExportUnavailable):
        return 503, str(exc) if user.admin else "the studies cannot be reached now; try again later"
    if isinstance(exc, (ActionError, ControlPlaneError)):
        error = http_error(user, exc)
        return error.status_code, str(error.detail)
    return 400, str(exc)


@router.get("/exports", include_in_schema=False)
def exports_page(request: Request, project: str = "", participant: str = "", event: str = "",
                 since: str = "", until: str = "", done: str = "",
                 user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    form = ExportForm(project=project, participant=participant, event=event, since=since,
                      until=until)
    return _page(request, c, user, form, message=MESSAGES.get(done, ""))


@router.post("/exports", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
def exports_request(request: Request, project: str = Form(""), participant: str = Form(""),
                    event: str = Form(""), since: str = Form(""), until: str = Form(""),
                    type: str = Form("dicom"), profile: str = Form("default"),
                    email: str = Form(""), study: list[str] = Form([]),
                    password: str = Form(""), password2: str = Form(""),
                    user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    form = ExportForm(project, participant, event, since, until, type, profile or "default",
                      email, tuple(study))
    try:
        made = _submit(c, user, form, password, password2)
    except REFUSALS as exc:
        status, detail = _refusal(user, exc)
        return _page(request, c, user, form, status, error=detail)
    done = "queued" if len(made) == 1 else "queued-many"
    query = urlencode({"done": done, "project": form.project})
    return RedirectResponse(f"/exports?{query}", status_code=303)


@router.post("/exports/noassign/{study_uid}", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def exports_noassign(study_uid: str, project: str = Form(""), participant: str = Form(""),
                     event: str = Form(""), type: str = Form("dicom"),
                     user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    """NoAssign: the study page's button; a study waiting at FIONA de-identified straight into
    an export for the project (export role there), without a transfer request."""
    try:
        uid = valid_uid(study_uid, "study UID")
        actions(c).study(user, uid)  # NotFound for a study the user may not see
        orders.request(c.config, c.site, c.control, user,
                       orders.Order(project, type, participant, event or None, uid,
                                    noassign=True))
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    except REFUSALS as exc:
        raise HTTPException(400, str(exc)) from None
    return RedirectResponse(f"/exports?{urlencode({'done': 'queued', 'project': project})}",
                            status_code=303)


@router.get("/exports/{job_id}", include_in_schema=False)
def export_job(request: Request, job_id: str, user: User = Depends(current_user),
               c: Ctx = Depends(ctx)):
    """Where the "export ready" mail points: the Exports page at that job (for who may
    download it; the redirect names the job's project)."""
    try:
        job = orders.allowed(c.datadir, user, job_id, client_address(request))
    except ActionError as exc:
        raise http_error(user, exc) from None
    return RedirectResponse(f"/exports?{urlencode({'project': job.project})}#job-{job.id}",
                            status_code=303)


def _file(request: Request, c: Ctx, user: User, job_id: str, part: str) -> FileResponse:
    try:
        path = orders.download(c.datadir, user, job_id, part, client_address(request))
    except ActionError as exc:
        raise http_error(user, exc) from None
    return FileResponse(path, media_type=MEDIA[part], filename=path.name,
                        content_disposition_type="attachment")


@router.get("/exports/{job_id}/download", tags=["exports"])
def export_download(request: Request, job_id: str, user: User = Depends(current_user),
                    c: Ctx = Depends(ctx)) -> FileResponse:
    """The zip of a ready export (HTTP Range: a broken download resumes); for who holds
    the project's export role only; audited."""
    return _file(request, c, user, job_id, "zip")


@router.get("/exports/{job_id}/sha256", tags=["exports"])
def export_sha256(request: Request, job_id: str, user: User = Depends(current_user),
                  c: Ctx = Depends(ctx)) -> FileResponse:
    """The zip's SHA-256 in `sha256sum` format."""
    return _file(request, c, user, job_id, "sha256")


@router.get("/exports/{job_id}/manifest", tags=["exports"])
def export_manifest(request: Request, job_id: str, user: User = Depends(current_user),
                    c: Ctx = Depends(ctx)) -> FileResponse:
    """`name,sha256` of every file in the zip."""
    return _file(request, c, user, job_id, "manifest")


@router.get("/api/exports", tags=["exports"])
def api_exports(user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> list[dict]:
    """The user's exports (admins: all), newest first: state, progress (`done` of `total`),
    the reason of a failure, the estimate in seconds, expiry and download links."""
    return jobs(c, user)


@router.post("/api/exports", tags=["exports"], dependencies=[Depends(csrf.require_csrf)])
def api_request(project: str = Body(...), type: str = Body(...),
                participant: str = Body(""), event: str = Body(""), study: str = Body(""),
                profile: str = Body("default"), email: str = Body(""),
                password: str = Body(""), user: User = Depends(current_user),
                c: Ctx = Depends(ctx)) -> dict:
    """Queue an export (403 without the export role; 400 naming what is unknown)."""
    form = ExportForm(project, participant, event, type=type, profile=profile, email=email,
                studies=(study,) if study else ())
    try:
        made = _submit(c, user, form, password, password)
    except ActionError as exc:
        raise http_error(user, exc) from None
    except REFUSALS as exc:
        raise HTTPException(400, str(exc)) from None
    return {"jobs": [j.id for j in made]}
