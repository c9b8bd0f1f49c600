"""Pages for applications and notifications:

- `/apply` (any logged-in user, also a directory user without roles): apply for a new project
  or for a role on an existing one, and see one's applications and their state;
- `/admin/applications` (admins): every application; approve or reject with a reason;
- `/notifications` (any logged-in user): the address, interval and kinds of notices per project.

Thin: the rules are `fiona.apply.service`'s and `fiona.notify.store`'s; refusals come back as
the form with its values and the message, and nothing is stored.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from ..actions import ActionError, Invalid
from ..apply.service import Applications, example_id
from ..apply.store import open_store
from ..control.base import ControlPlaneError
from ..mail import valid_address
from ..notify.store import (
    ADMIN_KINDS,
    DEFAULT_EVERY_MINUTES,
    MAX_EVERY,
    MIN_EVERY,
    PROJECT_KINDS,
    NotifyStore,
    Prefs,
    may_hear,
)
from . import csrf
from .context import Ctx, ctx, current_user, render
from .outcomes import actions, http_error
from .users import RIGHTS, User

router = APIRouter()
FORMS = [Depends(csrf.require_csrf)]
DONE = {"project": "Your application for project {project} was submitted (number {id}). "
                   "A participant ID your rule allows: {example}. You get an e-mail when an "
                   "admin has decided.",
        "role": "Your application for the {right} role in {project} was submitted (number "
                "{id}). You get an e-mail when an admin has decided."}
DECIDED = {"approved": "Application {id} approved: {note}",
           "rejected": "Application {id} rejected."}


def service(c: Ctx) -> Applications:
    return Applications(actions(c), open_store(c.datadir, c.control))


def _email_of(c: Ctx, user: User) -> str:
    prefs = NotifyStore(c.datadir).prefs(user.name)
    return prefs.email if prefs else ""


# --- applying --------------------------------------------------------------------------------
def _apply_page(request: Request, c: Ctx, user: User, status: int = 200, **extra):
    try:
        apps = service(c)
        mine, projects = apps.mine(user), [p.name for p in c.control.projects()]
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    extra.setdefault("form", {"email": _email_of(c, user)})
    return render(request, "apply.html", status, applications=mine, projects=projects,
                  rights=RIGHTS, **extra)


@router.get("/apply", include_in_schema=False)
def apply_page(request: Request, done: str = "", id: str = "",
               user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    message = ""
    if done in DONE:
        try:
            app = next((a for a in service(c).mine(user) if a.id == id), None)
        except ControlPlaneError as exc:
            raise http_error(user, exc) from None
        if app is not None:  # only one's own application, so a link cannot say anything else
            message = DONE[done].format(**vars(app))
    return _apply_page(request, c, user, message=message)


def _submitted(request: Request, c: Ctx, user: User, kind: str, form: dict, submit):
    try:
        app = submit()
    except (ActionError, ControlPlaneError) as exc:
        err = http_error(user, exc)
        return _apply_page(request, c, user, err.status_code, error=err.detail, form=form,
                           open_form=kind)
    return RedirectResponse(f"/apply?done={kind}&id={quote(app.id)}", status_code=303)


@router.post("/apply/project", include_in_schema=False, dependencies=FORMS)
def apply_project(request: Request, project: str = Form(""), long_name: str = Form(""),
                  pi: str = Form(""), pi_email: str = Form(""), naming: str = Form(""),
                  events: str = Form(""), ethics_number: str = Form(""),
                  rec_start: str = Form(""), rec_end: str = Form(""),
                  end_action: str = Form(""), email: str = Form(""),
                  user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    form = {"project": project, "long_name": long_name, "pi": pi, "pi_email": pi_email,
            "naming": naming, "events": events, "ethics_number": ethics_number,
            "rec_start": rec_start, "rec_end": rec_end, "end_action": end_action,
            "email": email}
    return _submitted(request, c, user, "project", form, lambda: service(c).apply_project(
        user, project=project, long_name=long_name, pi=pi, pi_email=pi_email, naming=naming,
        events=events.split(","), ethics_number=ethics_number, rec_start=rec_start,
        rec_end=rec_end, end_action=end_action, email=email))


@router.post("/apply/role", include_in_schema=False, dependencies=FORMS)
def apply_role(request: Request, project: str = Form(""), right: str = Form(""),
               reason: str = Form(""), email: str = Form(""),
               user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    form = {"role_project": project, "right": right, "reason": reason, "email": email}
    return _submitted(request, c, user, "role", form, lambda: service(c).apply_role(
        user, project=project, right=right, reason=reason, email=email))


@router.get("/api/apply/example", tags=["apply"])
def api_example(naming: str, user: User = Depends(current_user)) -> dict:
    """A participant ID that the rule `naming` allows (400 with the reason when none)."""
    try:
        return {"naming": naming, "example": example_id(naming)}
    except Invalid as exc:
        raise http_error(user, exc) from None


# --- deciding --------------------------------------------------------------------------------
@router.get("/admin/applications", include_in_schema=False)
def applications_page(request: Request, done: str = "", id: str = "",
                      user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    try:
        every = service(c).all(user)
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    decided = next((a for a in every if a.id == id and a.state == done), None)
    message = DECIDED[done].format(id=decided.id, note=decided.decision_note) \
        if decided is not None and done in DECIDED else ""
    return render(request, "admin_applications.html", applications=every, message=message)


def _decision(user: User, c: Ctx, decide):
    try:
        app = decide(service(c))
    except (ActionError, ControlPlaneError) as exc:
        raise http_error(user, exc) from None
    return RedirectResponse(f"/admin/applications?done={app.state}&id={quote(app.id)}",
                            status_code=303)


@router.post("/admin/applications/{app_id}/approve", include_in_schema=False,
             dependencies=FORMS)
def approve(app_id: str, user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    return _decision(user, c, lambda s: s.approve(user, app_id))


@router.post("/admin/applications/{app_id}/reject", include_in_schema=False,
             dependencies=FORMS)
def reject(app_id: str, reason: str = Form(""), user: User = Depends(current_user),
           c: Ctx = Depends(ctx)):
    return _decision(user, c, lambda s: s.reject(user, app_id, reason))


# --- notifications ---------------------------------------------------------------------------
def _notify_page(request: Request, c: Ctx, user: User, status: int = 200, **extra):
    store = NotifyStore(c.datadir)
    prefs = store.prefs(user.name) or Prefs(user.name, "")
    projects = [p.name for p in c.control.projects() if user.can(p.name)]
    return render(request, "notifications.html", status, prefs=prefs,
                  subs=store.subscriptions(user.name), projects=projects,
                  project_kinds=PROJECT_KINDS, admin_kinds=ADMIN_KINDS if user.admin else {},
                  min_every=MIN_EVERY, max_every=MAX_EVERY, mail=bool(c.config.smtp), **extra)


@router.get("/notifications", include_in_schema=False)
def notifications_page(request: Request, done: str = "", user: User = Depends(current_user),
                       c: Ctx = Depends(ctx)):
    return _notify_page(request, c, user,
                        message="Your notifications were saved." if done == "saved" else "")


@router.post("/notifications", include_in_schema=False, dependencies=FORMS)
def notifications_save(request: Request, email: str = Form(""),
                       every_minutes: int = Form(DEFAULT_EVERY_MINUTES),
                       sub: list[str] = Form([]), user: User = Depends(current_user),
                       c: Ctx = Depends(ctx)):
    """`sub` values are `PROJECT:KIND` (admin kinds: `:KIND`); anything the user may not
    choose is refused, not dropped silently."""
    email = email.strip()
    wanted, problems = set(), []
    for value in sub:
        project, _, kind = value.rpartition(":")
        if may_hear(user, project, kind):
            wanted.add((project, kind))
        else:
            problems.append(f"you cannot choose {value!r}")
    if wanted and not valid_address(email):
        problems.append(f"{email!r} is not an e-mail address")
    if not MIN_EVERY <= every_minutes <= MAX_EVERY:
        problems.append(f"digests go at most every {MIN_EVERY} to {MAX_EVERY} minutes")
    if problems:
        return _notify_page(request, c, user, 400, error="; ".join(problems))
    directory_roles = None if c.users.get(user.name) is not None else list(user.roles)
    NotifyStore(c.datadir).subscribe(Prefs(user.name, email, every_minutes,
                                           roles=directory_roles), wanted)
    c.audit(user.name, "notifications saved", email_set=bool(email),
            every_minutes=every_minutes, subscriptions=sorted(f"{p}:{k}" for p, k in wanted))
    return RedirectResponse("/notifications?done=saved", status_code=303)
