"""Assign: studies waiting, one study with its assignment form, confirm, history, resend, move,
coupling-list upload; and their JSON endpoints.

The actions themselves (rules, audit entries, forwarder wake-up) are `fiona.actions`; who may
see which study and its identified values is `fiona.access`. Every page or answer that shows
identified values (accession numbers, the "Before" column of the preview) is audited.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict
from math import ceil

from fastapi import APIRouter, Body, Depends, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse

from .. import audit
from ..access import IDENTIFIED_FIELDS, may_see, may_see_identified
from ..actions import ActionError
from ..control.base import ControlPlaneError, Study
from ..tree import InvalidValue, valid_uid
from . import csrf
from .context import Ctx, ctx, current_user, render
from .outcomes import actions, http_error
from .preview import first_image, preview
from .users import User

router = APIRouter()
log = logging.getLogger("fiona.web")

#: studies per page of the Assign list: one audit entry names every study a page shows
PAGE_SIZE = audit.MAX_ITEMS

#: what a page may say after a redirect: `?done=<code>[&instance=<request>]`, never free text
#: from the URL (the request it names is looked up, and shown only to its project's users)
MESSAGES = {"created": "Request created; the study will be de-identified and sent.",
            "exists": "This request exists already; nothing was changed.",
            "resent": "The project's requests for this study will be sent again.",
            "moved": "The study was moved to the new participant and will be sent again."}


def _uid(value: str) -> str:
    try:
        return valid_uid(value, "study UID")
    except InvalidValue as exc:
        raise HTTPException(400, str(exc)) from None


def _need_assign(user: User) -> None:
    if not user.has_right("assign"):
        raise HTTPException(403, "you have no assign role in any project")


def _member(c: Ctx, user: User, project: str) -> None:
    """404 for an unknown project, 403 without a role in it."""
    if project not in [p.name for p in c.control.projects()]:
        raise HTTPException(404, f"no project {project!r}")
    if not user.can(project):
        raise HTTPException(403, f"you have no role in project {project}")


def _study(c: Ctx, user: User, uid: str) -> Study:
    try:
        return actions(c).study(user, _uid(uid))
    except ActionError as exc:
        raise http_error(user, exc) from None


def study_row(study: Study, requested: bool, identified: bool = True) -> dict:
    row = {"uid": study.uid, "arrival": study.arrival, "date": study.date, "time": study.time,
           "description": study.description, "accession": study.accession,
           "modalities": sorted({s.modality for s in study.series if s.modality}),
           "series": len(study.series), "images": sum(s.num_files for s in study.series),
           "sender": study.calling_ae, "called": study.called_ae,
           "labels": sorted({t for s in study.series for t in s.classify_types}),
           "requested": requested, "node": study.node, "split_nodes": study.split_nodes}
    if not identified:
        for name in IDENTIFIED_FIELDS:
            row[name] = ""
    return row


def _status(req) -> str:
    return "failed" if req.error_flags else "pending" if req.pending else "complete"


def _day(value: str) -> str:
    """`YYYY-MM-DD` or `YYYYMMDD` as `YYYYMMDD` (for comparing days); "" when neither."""
    text = value.strip().replace("-", "")
    return text if len(text) == 8 and text.isdigit() else ""


def in_range(study: Study, since: str, until: str) -> bool:
    """Whether the study's date, or the day it arrived, lies in [since, until] (either end
    may be open)."""
    since, until = _day(since), _day(until)
    days = [d for d in (study.date, _day(study.arrival[:10])) if d]
    return any((not since or d >= since) and (not until or d <= until) for d in days)


#: the Assign list's sortable columns: the key each sorts by
SORT_KEYS = {
    "arrival": lambda r: r["arrival"], "date": lambda r: (r["date"], r["time"]),
    "description": lambda r: r["description"].lower(), "accession": lambda r: r["accession"],
    "modalities": lambda r: r["modalities"], "series": lambda r: r["series"],
    "images": lambda r: r["images"], "sender": lambda r: r["sender"],
    "node": lambda r: r["node"],
    "status": lambda r: [(x["project"], x["status"]) for x in r["requests"]]}


def studies(c: Ctx, user: User, q: str = "", date: str = "", waiting_only: bool = False,
            project: str = "", since: str = "", until: str = "", sort: str = "arrival",
            descending: bool = True, node: str = "") -> list[dict]:
    """The studies `user` may see (`fiona.access`), sorted (newest arrival first by default);
    identified fields blanked where the user may not see them. `project` keeps the studies
    requested for it; `date` is one day, `since`/`until` a range of study or arrival days;
    `node` the studies that node of the region holds.
    Each row names the requests of the projects the user has a role in, with their status."""
    requests_of: dict[str, list] = {}
    for r in c.control.requests():
        requests_of.setdefault(r.study_uid, []).append(r)
    if date:
        since = until = date
    rows = []
    for s in c.control.studies():
        reqs = requests_of.get(s.uid, [])
        projects = {r.project for r in reqs}
        if not may_see(user, projects) or (project and project not in projects):
            continue
        if waiting_only and projects:
            continue
        if node and s.node != node:
            continue
        if (since or until) and not in_range(s, since, until):
            continue
        row = study_row(s, bool(projects), may_see_identified(user, projects))
        if q and q.lower() not in " ".join(str(v) for v in row.values()).lower():
            continue
        row["requests"] = sorted(({"project": r.project, "status": _status(r)}
                                  for r in reqs if user.can(r.project)),
                                 key=lambda x: (x["project"], x["status"]))
        rows.append(row)
    rows.sort(key=SORT_KEYS.get(sort, SORT_KEYS["arrival"]), reverse=descending)
    return rows


def _page(c: Ctx, user: User, rows: list[dict], page: int, shown: str) -> list[dict]:
    """One page of rows, its display of identified values audited."""
    start = max(page - 1, 0) * PAGE_SIZE
    rows = rows[start:start + PAGE_SIZE]
    actions(c).viewed(user, shown, IDENTIFIED_FIELDS, [r["uid"] for r in rows if r["accession"]])
    return rows


def _history(c: Ctx, user: User, uid: str) -> list[dict]:
    out = []
    for r in c.control.requests(uid):
        if not user.can(r.project):
            continue
        d = asdict(r)
        d["error_flags"] = sorted(r.error_flags)
        d["status"] = _status(r)
        out.append(d)
    return sorted(out, key=lambda d: d["requested"], reverse=True)


def _assign_projects(c: Ctx, user: User) -> list:
    return [p for p in c.control.projects() if p.active and user.can(p.name, "assign")]


def _study_page(request: Request, c: Ctx, user: User, study: Study, status: int = 200,
                **extra):
    projects = _assign_projects(c, user)
    participants = {p.name: c.control.participants(p.name) for p in projects}
    actions(c).viewed(user, "study page", IDENTIFIED_FIELDS, [study.uid])
    return render(request, "study.html", status, study=study, projects=projects,
                  participants=participants, history=_history(c, user, study.uid), **extra)


def _refused(request: Request, c: Ctx, user: User, study: Study, exc: Exception, project: str,
             participant: str, event: str):
    """The study page again, with the refusal and the form as it was filled in."""
    error = http_error(user, exc)
    naming = ""
    if project in [p.name for p in c.control.projects()]:
        proj = c.control.project(project)
        try:
            proj.check_participant(participant)
        except ControlPlaneError:
            naming = proj.naming
    return _study_page(request, c, user, study, error.status_code, error=error.detail,
                       naming=naming, form={"project": project, "participant": participant,
                                            "event": event})


# --- pages ------------------------------------------------------------------------------------
@router.get("/assign", include_in_schema=False)
def assign_list(request: Request, q: str = "", date: str = "",
                since: str = Query("", alias="from"), until: str = Query("", alias="to"),
                all: int = 0, sort: str = "arrival", order: str = "desc", page: int = 1,
                node: str = "", user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    sort = sort if sort in SORT_KEYS else "arrival"
    order = "asc" if order == "asc" else "desc"
    if date:
        since = until = date
    rows = studies(c, user, q, waiting_only=not all, since=since, until=until, sort=sort,
                   descending=order == "desc", node=node)
    pages = max(ceil(len(rows) / PAGE_SIZE), 1)
    page = min(max(page, 1), pages)
    filtered = bool(q or since or until or node)
    # an empty list says why: nothing waiting at all, or nothing that matches the filter
    anything = bool(rows) or (filtered and bool(studies(c, user, waiting_only=not all)))
    query = {"q": q, "from": since, "to": until, "all": all, "sort": sort, "order": order,
             "node": node}
    nodes = sorted({s.node for s in c.control.studies()} | {c.config.node})
    return render(request, "assign.html", rows=_page(c, user, rows, page, "assign list"),
                  total=len(rows), page=page, pages=pages, q=q, since=since, until=until,
                  all=all, sort=sort, order=order, query=query, filtered=filtered,
                  anything=anything, node=node, nodes=nodes)


def _message(c: Ctx, user: User, study_uid: str, done: str, instance: int) -> str:
    text = MESSAGES.get(done, "")
    req = next((r for r in c.control.requests(study_uid)
                if instance and r.instance == instance and user.can(r.project)), None)
    return f"{req.project}/{req.participant}/{req.event}: {text}" if text and req else text


def _done(study: Study, code: str, instance: int | None = None) -> RedirectResponse:
    """Redirect after a POST, so that reloading the page cannot send the form again."""
    query = f"done={code}" + (f"&instance={instance}" if instance else "")
    return RedirectResponse(f"/assign/{study.uid}?{query}", status_code=303)


@router.get("/assign/{study_uid}", include_in_schema=False)
def assign_study(request: Request, study_uid: str, done: str = "", instance: int = 0,
                 user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    study = _study(c, user, study_uid)
    return _study_page(request, c, user, study,
                       message=_message(c, user, study.uid, done, instance))


@router.post("/assign/{study_uid}/confirm", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_confirm(request: Request, study_uid: str, project: str = Form(""),
                   participant: str = Form(""), event: str = Form(""),
                   user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    study = _study(c, user, study_uid)
    participant = participant.strip()
    try:
        proj, existing = actions(c).check_assign(user, study.uid, project, participant, event)
    except (ActionError, ControlPlaneError) as exc:
        return _refused(request, c, user, study, exc, project, participant, event)
    rows, preview_error = [], ""
    try:
        image = first_image(c.datadir, study.uid, [s.uid for s in study.series])
        if image is None:
            preview_error = "no image of this study is on disk (raw/) to preview"
        else:
            rows = preview(c.datadir, c.key, proj, participant, event, image,
                           {s.uid: s.classify_types for s in study.series})
    except Exception as exc:  # the preview must not block an assignment
        log.error("study %s: preview failed: %s", study.uid, type(exc).__name__)
        preview_error = f"preview failed: {exc}" if user.admin else "the preview failed"
    actions(c).viewed(user, "preview", [r["name"] for r in rows if r["changed"]], [study.uid])
    return render(request, "confirm.html", study=study, project=project,
                  participant=participant, event=event, rows=rows,
                  preview_error=preview_error, exists=existing is not None,
                  new_participant=participant not in c.control.participants(project))


@router.post("/assign/{study_uid}/send", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_send(request: Request, study_uid: str, project: str = Form(""),
                participant: str = Form(""), event: str = Form(""),
                user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _need_assign(user)
    study = _study(c, user, study_uid)
    try:
        result = actions(c).assign(user, study.uid, project, participant, event)
    except (ActionError, ControlPlaneError) as exc:
        return _refused(request, c, user, study, exc, project, participant, event)
    return _done(study, result.code, result.request.instance if result.request else None)


@router.get("/assign/{study_uid}/resend", include_in_schema=False)
def assign_resend_confirm(request: Request, study_uid: str, project: str = "",
                          user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    """The confirmation page for browsers without JavaScript (static/fiona.js asks in a
    dialog and posts directly)."""
    if not user.admin:
        raise HTTPException(403, "only admins can resend")
    study = _study(c, user, study_uid)
    if project not in actions(c).projects_of(study.uid):
        raise HTTPException(404, f"study {study.uid} has no request in project {project!r}")
    return render(request, "confirm_action.html", title="Resend",
                  question=f"Send study {study.uid} to {project} again? It is de-identified "
                  "again and replaces the copy at the destination.",
                  action=f"/assign/{study.uid}/resend", fields={"project": project},
                  label="Resend", back=f"/assign/{study.uid}")


@router.post("/assign/{study_uid}/resend", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_resend(request: Request, study_uid: str, project: str = Form(""),
                  user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    study = _study(c, user, study_uid)
    try:
        actions(c).resend(user, project, study.uid)
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    return _done(study, "resent")


@router.post("/assign/{study_uid}/move", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def assign_move(request: Request, study_uid: str, project: str = Form(""),
                participant: str = Form(""), event: str = Form(""),
                user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    study = _study(c, user, study_uid)
    try:
        req = actions(c).move(user, study.uid, project, participant, event or None)
    except (ActionError, ControlPlaneError) as exc:
        return _refused(request, c, user, study, exc, project, participant, event)
    return _done(study, "moved", req.instance)


@router.get("/coupling", include_in_schema=False)
def coupling_page(request: Request, user: User = Depends(current_user)):
    _need_assign(user)
    return render(request, "coupling.html", report=None)


def _coupling(c: Ctx, user: User, text: str, filename: str) -> dict:
    try:
        report = actions(c).upload_coupling(user, text, filename)
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    return {"lines": [{"line": x.line, "status": x.status, "detail": x.detail}
                      for x in report.lines],
            "accepted": report.accepted, "requests": len(report.requests),
            "retrievable": _retrievable(c, user, text, report.lines)}


def _retrievable(c: Ctx, user: User, text: str, lines) -> dict[str, list[str]]:
    """project -> accession numbers of the upload's stored lines whose studies have not
    arrived, for the projects where `user` may assign (the retrieve button's lines)."""
    stored = {x.line for x in lines if x.status in ("accepted", "duplicate")}
    here = {s.accession for s in c.control.studies(include_hidden=True) if s.accession}
    listed = {(r.project, r.accession) for r in c.control.coupling_rows()}
    out: dict[str, list[str]] = {}
    for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        if number in stored and len(fields) > 1:
            accession, project = fields[0].strip(), fields[1].strip()
            if ((project, accession) in listed and accession not in here
                    and user.can(project, "assign")):
                out.setdefault(project, []).append(accession)
    return {p: list(dict.fromkeys(a)) for p, a in sorted(out.items())}


@router.post("/coupling/retrieve", include_in_schema=False,
             dependencies=[Depends(csrf.require_csrf)])
def coupling_retrieve(request: Request, project: str = Form(""),
                      accession: list[str] = Form([]), user: User = Depends(current_user),
                      c: Ctx = Depends(ctx)):
    """The coupling report's button: fetch the listed studies from the clinical PACS."""
    from ..config import ConfigError
    from ..scanner.retrieve import Peer

    _need_assign(user)
    try:
        lines = actions(c).retrieve(user, Peer.from_config(c.config), accession, project)
    except ConfigError as exc:
        return render(request, "coupling.html", 409, report=None, error="; ".join(exc.errors))
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    return render(request, "coupling.html", report=None, retrieval=[
        {"accession": x.accession, "status": x.status, "text": x.text(), "ok": x.ok}
        for x in lines])


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
    return render(request, "coupling.html", report=_coupling(c, user, text, upload.filename or ""))


# --- JSON -------------------------------------------------------------------------------------
@router.get("/api/studies", tags=["assign"])
def api_studies(q: str = "", date: str = "", project: str = "", waiting: bool = True,
                page: int = 1, node: str = "", user: User = Depends(current_user),
                c: Ctx = Depends(ctx)) -> dict:
    """Studies in quarantine that the user may see, newest first, `PAGE_SIZE` a page (waiting:
    without a request); `project` limits to studies requested for that project (403 without a
    role in it), `node` to the studies that node of the region holds. Accession numbers are
    blank where the user may not see identified values."""
    if project:
        _member(c, user, project)
        rows = studies(c, user, q, date, project=project, node=node)
    else:
        _need_assign(user)
        rows = studies(c, user, q, date, waiting_only=waiting, node=node)
    return {"total": len(rows), "page": page, "page_size": PAGE_SIZE,
            "studies": _page(c, user, rows, page, "api studies")}


@router.get("/api/study/{study_uid}", tags=["assign"])
def api_study(study_uid: str, user: User = Depends(current_user),
              c: Ctx = Depends(ctx)) -> dict:
    """One study with its series and the requests of the user's projects (404 for a study
    that belongs to projects the user has no role in)."""
    _need_assign(user)
    study = _study(c, user, study_uid)
    actions(c).viewed(user, "api study", IDENTIFIED_FIELDS, [study.uid])
    history = _history(c, user, study.uid)
    return {**study_row(study, bool(actions(c).projects_of(study.uid))),
            "series_list": [asdict(s) for s in study.series], "requests": history}


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
    _member(c, user, project)
    return c.control.participants(project)


@router.get("/api/requests", tags=["assign"])
def api_requests(study_uid: str = "", project: str = "", user: User = Depends(current_user),
                 c: Ctx = Depends(ctx)) -> list[dict]:
    """Transfer requests of the user's projects (one study's or one project's)."""
    if project:
        _member(c, user, project)
    uid = _uid(study_uid) if study_uid else None
    out = []
    for r in c.control.requests(uid):
        if user.can(r.project) and (not project or r.project == project):
            d = asdict(r)
            d["error_flags"] = sorted(r.error_flags)
            d["status"] = _status(r)
            out.append(d)
    return out


@router.post("/api/assign", tags=["assign"], dependencies=[Depends(csrf.require_csrf)])
def api_assign(study_uid: str = Body(...), project: str = Body(...),
               participant: str = Body(...), event: str = Body(...),
               user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Create a transfer request. 400 with the rule that refused it: the naming rule for a
    bad participant ID, an inactive project or one outside its ethics period, a study already
    assigned in the project to another participant (admins: `/api/move`)."""
    _need_assign(user)
    try:
        result = actions(c).assign(user, _uid(study_uid), project, participant, event)
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    return {"created": result.created, "message": MESSAGES[result.code],
            "instance": result.request.instance if result.request else None}


@router.post("/api/move", tags=["assign"], dependencies=[Depends(csrf.require_csrf)])
def api_move(study_uid: str = Body(...), project: str = Body(...),
             participant: str = Body(...), event: str = Body(""),
             user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Admins: move a study's request in a project to another participant (and event); it is
    sent again under the new participant."""
    try:
        req = actions(c).move(user, _uid(study_uid), project, participant, event or None)
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    return {"moved": True, "instance": req.instance, "participant": req.participant,
            "event": req.event}


@router.post("/api/coupling", tags=["assign"], dependencies=[Depends(csrf.require_csrf)])
def api_coupling(csv_text: str = Body(..., embed=True, alias="csv"),
                 user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Upload a coupling list (`{"csv": "AccessionNumber,ProjectName,subjectid,eventname\\n..."}`);
    returns each line's status."""
    _need_assign(user)
    return _coupling(c, user, csv_text, "api")
