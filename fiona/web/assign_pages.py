"""Assign: studies waiting, one study with its assignment form, confirm, history, resend,
coupling-list upload; and their JSON endpoints."""

from __future__ import annotations

from urllib.parse import urlencode

import csv
import io
from dataclasses import asdict

from fastapi.responses import RedirectResponse
from fastapi import APIRouter, Body, Depends, Form, HTTPException, Request

from ..control.assign import Assigner
from ..control.base import ControlPlaneError, Study
from ..daemon import notify_forwarder
from ..tree import InvalidValue, valid_uid
from . import csrf
from .context import Ctx, ctx, current_user, render
from .preview import first_image, preview
from .users import User

router = APIRouter()


def _uid(value: str) -> str:
    try:
        return valid_uid(value, "study UID")
    except InvalidValue as exc:
        raise HTTPException(400, str(exc)) from None


def _need_assign(user: User) -> None:
    if not user.has_right("assign"):
        raise HTTPException(403, "you have no assign role in any project")


def _project_names(c: Ctx) -> list[str]:
    return [p.name for p in c.control.projects()]


def _check_project(c: Ctx, user: User, project: str, right: str | None = "assign") -> None:
    if project not in _project_names(c):
        raise HTTPException(404, f"no project {project!r}")
    if not user.can(project, right):
        raise HTTPException(403, f"you have no {right or 'role'} in project {project}")


def study_row(study: Study, requested: bool) -> dict:
    return {"uid": study.uid, "arrival": study.arrival, "date": study.date, "time": study.time,
            "description": study.description, "accession": study.accession,
            "modalities": sorted({s.modality for s in study.series if s.modality}),
            "series": len(study.series), "images": sum(s.num_files for s in study.series),
            "sender": study.calling_ae, "called": study.called_ae,
            "labels": sorted({t for s in study.series for t in s.classify_types}),
            "requested": requested}


def studies(c: Ctx, q: str = "", date: str = "", waiting_only: bool = False) -> list[dict]:
    requested = {r.study_uid for r in c.control.requests()}
    rows = []
    for s in c.control.studies():
        row = study_row(s, s.uid in requested)
        if waiting_only and row["requested"]:
            continue
        if date and date.replace("-", "") not in (s.date, s.arrival[:10].replace("-", "")):
            continue
        if q:
            hay = " ".join(str(v) for v in row.values()).lower()
            if q.lower() not in hay:
                continue
        rows.append(row)
    rows.sort(key=lambda r: r["arrival"], reverse=True)
    return rows


def _history(c: Ctx, user: User, uid: str) -> list[dict]:
    out = []
    for r in c.control.requests(uid):
        if not user.can(r.project):
            continue
        d = asdict(r)
        d["error_flags"] = sorted(r.error_flags)
        d["status"] = ("failed" if r.error_flags else "pending" if r.pending else "complete")
        out.append(d)
    return sorted(out, key=lambda d: d["requested"], reverse=True)


def _assign_projects(c: Ctx, user: User) -> list:
    return [p for p in c.control.projects() if p.active and user.can(p.name, "assign")]


def _study_or_404(c: Ctx, uid: str) -> Study:
    study = c.control.study(uid)
    if study is None:
        raise HTTPException(404, f"no study {uid}")
    return study


def _study_page(request: Request, c: Ctx, user: User, study: Study, status: int = 200,
                **extra):
    projects = _assign_projects(c, user)
    participants = {p.name: c.control.participants(p.name) for p in projects}
    return render(request, "study.html", status, study=study, projects=projects,
                  participants=participants, history=_history(c, user, study.uid), **extra)


def _do_assign(c: Ctx, user: User, uid: str, project: str, participant: str,
               event: str) -> dict:
    """Create the request; audit it (and a new participant). Raises ControlPlaneError."""
    _check_project(c, user, project)
    new_participant = participant not in c.control.participants(project)
    req = Assigner(c.control, c.keyed).request(uid, project, participant, event, "assign")
    if req is None:
        return {"created": False, "message": "this request exists already"}
    if new_participant:
        c.audit(user.name, "new participant", project=project, participant=participant)
    c.audit(user.name, "assign", study_uid=uid, project=project, participant=participant,
            event=event, instance=req.instance)
    try:
        notify_forwarder(c.site)
    except OSError:
        pass
    return {"created": True, "instance": req.instance,
            "message": f"request for {project}/{participant}/{event} created"}


# --- pages ------------------------------------------------------------------------------------
@router.get("/assign", include_in_schema=False)
def assign_list(request: Request, q: str = "", date: str = "", all: int = 0,
                user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    return render(request, "assign.html", rows=studies(c, q, date, waiting_only=not all),
                  q=q, date=date, all=all)


@router.get("/assign/{study_uid}", include_in_schema=False)
def assign_study(request: Request, study_uid: str, user: User = Depends(current_user),
                 c: Ctx = Depends(ctx)):
    _need_assign(user)
    study = _study_or_404(c, _uid(study_uid))
    return _study_page(request, c, user, study, message=request.query_params.get("msg", ""))


@router.post("/assign/{study_uid}/confirm", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_confirm(request: Request, study_uid: str, project: str = Form(""),
                   participant: str = Form(""), event: str = Form(""),
                   user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    study = _study_or_404(c, _uid(study_uid))
    _check_project(c, user, project)
    proj = c.control.project(project)
    participant = participant.strip()
    try:
        proj.check_participant(participant)
        proj.check_event(event)
    except ControlPlaneError as exc:
        return _study_page(request, c, user, study, 400, error=str(exc), naming=proj.naming,
                           form={"project": project, "participant": participant,
                                 "event": event})
    rows, preview_error, image = [], "", None
    try:
        image = first_image(c.datadir, study.uid, [s.uid for s in study.series])
        if image is None:
            preview_error = "no image of this study is on disk (raw/) to preview"
        else:
            rows = preview(c.datadir, c.key, proj, participant, event, image)
    except Exception as exc:  # the preview must not block an assignment
        preview_error = f"preview failed: {exc}"
    return render(request, "confirm.html", study=study, project=project,
                  participant=participant, event=event, rows=rows,
                  preview_error=preview_error,
                  new_participant=participant not in c.control.participants(project))


@router.post("/assign/{study_uid}/send", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_send(request: Request, study_uid: str, project: str = Form(""),
                participant: str = Form(""), event: str = Form(""),
                user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    study = _study_or_404(c, _uid(study_uid))
    try:
        result = _do_assign(c, user, study.uid, project, participant.strip(), event)
    except ControlPlaneError as exc:
        naming = c.control.project(project).naming if project in _project_names(c) else ""
        return _study_page(request, c, user, study, 400, error=str(exc), naming=naming,
                           form={"project": project, "participant": participant,
                                 "event": event})
    # redirect after the POST, so that reloading the page cannot send the form again
    return RedirectResponse(f"/assign/{study.uid}?{urlencode({'msg': result['message']})}",
                            status_code=303)


@router.post("/assign/{study_uid}/resend", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_resend(request: Request, study_uid: str, project: str = Form(""),
                  user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    if not user.admin:
        raise HTTPException(403, "only admins can resend")
    study = _study_or_404(c, _uid(study_uid))
    _check_project(c, user, project)
    n = Assigner(c.control, c.keyed).resend(project, study.uid)
    c.audit(user.name, "resend", study_uid=study.uid, project=project, requests=n)
    try:
        notify_forwarder(c.site)
    except OSError:
        pass
    return _study_page(request, c, user, study, message=f"{n} request(s) asked for again")


def _coupling(c: Ctx, user: User, text: str, filename: str = "") -> dict:
    for fields in csv.reader(io.StringIO(text)):
        if len(fields) >= 4 and fields[1].strip() not in ("ProjectName", "") and \
                fields[1].strip() in _project_names(c) and not user.can(fields[1].strip(), "assign"):
            raise HTTPException(403, f"you have no assign role in project {fields[1].strip()}")
    report = Assigner(c.control, c.keyed).upload_coupling(text)
    lines = [{"line": x.line, "status": x.status, "detail": x.detail} for x in report.lines]
    c.audit(user.name, "coupling upload", file=filename, accepted=report.accepted,
            lines=len(lines), requests=len(report.requests))
    if report.requests:
        try:
            notify_forwarder(c.site)
        except OSError:
            pass
    return {"lines": lines, "accepted": report.accepted, "requests": len(report.requests)}


@router.get("/coupling", include_in_schema=False)
def coupling_page(request: Request, user: User = Depends(current_user)):
    _need_assign(user)
    return render(request, "coupling.html", report=None)


@router.post("/coupling", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
async def coupling_upload(request: Request, user: User = Depends(current_user),
                          c: Ctx = Depends(ctx)):
    _need_assign(user)
    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        return render(request, "coupling.html", 400, report=None, error="choose a CSV file")
    data = await upload.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    report = _coupling(c, user, text, upload.filename or "")
    return render(request, "coupling.html", report=report)


# --- JSON -------------------------------------------------------------------------------------
@router.get("/api/studies", tags=["assign"])
def api_studies(q: str = "", date: str = "", project: str = "", waiting: bool = True,
                user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> list[dict]:
    """Studies in quarantine, newest first (waiting: without a request); `project` limits
    to studies requested for that project (403 without a role in it)."""
    if project:
        _check_project(c, user, project, None)
        uids = {r.study_uid for r in c.control.requests() if r.project == project}
        return [r for r in studies(c, q, date) if r["uid"] in uids]
    _need_assign(user)
    return studies(c, q, date, waiting_only=waiting)


@router.get("/api/study/{study_uid}", tags=["assign"])
def api_study(study_uid: str, user: User = Depends(current_user),
              c: Ctx = Depends(ctx)) -> dict:
    """One study with its series and the requests of the user's projects."""
    _need_assign(user)
    study = _study_or_404(c, _uid(study_uid))
    return {**study_row(study, False), "series_list": [asdict(s) for s in study.series],
            "requests": _history(c, user, study.uid)}


@router.get("/api/projects", tags=["assign"])
def api_projects(user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> list[dict]:
    """The projects the user has a role in, with naming rule and events."""
    return [{"name": p.name, "naming": p.naming, "events": p.events, "active": p.active,
             "rights": [r for r in ("assign", "export", "review") if user.can(p.name, r)]}
            for p in c.control.projects() if user.can(p.name)]


@router.get("/api/participants", tags=["assign"])
def api_participants(project: str, user: User = Depends(current_user),
                     c: Ctx = Depends(ctx)) -> list[str]:
    """A project's participants (403 without a role in it)."""
    _check_project(c, user, project, None)
    return c.control.participants(project)


@router.get("/api/requests", tags=["assign"])
def api_requests(study_uid: str = "", project: str = "", user: User = Depends(current_user),
                 c: Ctx = Depends(ctx)) -> list[dict]:
    """Transfer requests of the user's projects (one study's or one project's)."""
    if project:
        _check_project(c, user, project, None)
    uid = _uid(study_uid) if study_uid else None
    out = []
    for r in c.control.requests(uid):
        if user.can(r.project) and (not project or r.project == project):
            d = asdict(r)
            d["error_flags"] = sorted(r.error_flags)
            d["status"] = "failed" if r.error_flags else "pending" if r.pending else "complete"
            out.append(d)
    return out


@router.post("/api/assign", tags=["assign"], dependencies=[Depends(csrf.require_csrf)])
def api_assign(study_uid: str = Body(...), project: str = Body(...),
               participant: str = Body(...), event: str = Body(...),
               user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Create a transfer request (400 with the naming rule for a bad participant ID)."""
    _need_assign(user)
    study = _study_or_404(c, _uid(study_uid))
    try:
        return _do_assign(c, user, study.uid, project, participant.strip(), event)
    except ControlPlaneError as exc:
        raise HTTPException(400, str(exc)) from None


@router.post("/api/coupling", tags=["assign"], dependencies=[Depends(csrf.require_csrf)])
def api_coupling(csv_text: str = Body(..., embed=True, alias="csv"),
                 user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Upload a coupling list (`{"csv": "AccessionNumber,ProjectName,subjectid,eventname\\n..."}`);
    returns each line's status."""
    _need_assign(user)
    return _coupling(c, user, csv_text, "api")
