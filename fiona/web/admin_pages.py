"""Admin pages: web users (add, roles, one-time password, remove) and projects (add, edit).

Thin: every change is an action of `fiona.actions` (admins only, refusals audited, each change
an audit entry), the same that `fiona user add` and `fiona project add` use. After a POST the
browser is redirected (POST-redirect-GET) to a page that names the outcome by a fixed code;
a one-time password travels to that page once, in the server-side session, never in a URL.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse

from ..actions import ActionError, Actions
from ..control.base import ControlPlaneError
from ..deid.pipeline import available_profiles
from . import csrf
from .context import Ctx, ctx, current_user, render
from .outcomes import actions, http_error
from .users import RIGHTS, User

router = APIRouter(prefix="/admin")
ONE_TIME_KEY = "admin_one_time"
USER_DONE = {"added": "User {name} added.", "roles": "Roles of {name} saved.",
             "reset": "{name} has a new one-time password.", "removed": "User {name} removed."}
PROJECT_DONE = {"added": "Project {name} added.", "saved": "Project {name} saved."}
FORMS = [Depends(csrf.require_csrf)]


def _admin(c: Ctx, user: User, what: str) -> Actions:
    acts = actions(c)
    try:
        acts.need_admin(user, what)
    except ActionError as exc:
        raise http_error(user, exc) from None
    return acts


def _done_message(table: dict, done: str, name: str, known: bool) -> str:
    """The message for `?done=code&name=N`: fixed text, naming N only when it is a real
    entry (or, after removal, no longer one), so a crafted link cannot make the page say
    anything else."""
    text = table.get(done, "")
    return text.format(name=name) if text and known else ""


# --- users -----------------------------------------------------------------------------------
def _users_page(request: Request, c: Ctx, user: User, status: int = 200, **extra):
    acts = _admin(c, user, "manage users")
    return render(request, "admin_users.html", status, users=acts.users(user),
                  projects=[p.name for p in c.control.projects()], rights=RIGHTS, **extra)


@router.get("/users", include_in_schema=False)
def users_page(request: Request, done: str = "", name: str = "",
               user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _admin(c, user, "manage users")
    one_time = request.session.pop(ONE_TIME_KEY, None)
    exists = c.users.get(name) is not None
    known = exists if done != "removed" else not exists and bool(name)
    return _users_page(request, c, user, message=_done_message(USER_DONE, done, name, known),
                       one_time=one_time)


def _roles(admin: str, roles: list[str]) -> list[str]:
    return (["admin"] if admin else []) + roles


def _user_done(request: Request, code: str, name: str, one_time: str | None = None):
    if one_time:
        request.session[ONE_TIME_KEY] = {"user": name, "password": one_time}
    return RedirectResponse(f"/admin/users?done={code}&name={quote(name)}", status_code=303)


@router.post("/users", include_in_schema=False, dependencies=FORMS)
def user_add(request: Request, name: str = Form(""), admin: str = Form(""),
             role: list[str] = Form([]), user: User = Depends(current_user),
             c: Ctx = Depends(ctx)):
    acts = _admin(c, user, "manage users")
    name = name.strip()
    try:
        one_time = acts.save_user(user, name, _roles(admin, role))
    except ActionError as exc:
        err = http_error(user, exc)
        return _users_page(request, c, user, err.status_code, error=err.detail,
                           form={"name": name, "admin": admin, "roles": role})
    return _user_done(request, "added", name, one_time)


def _existing(c: Ctx, name: str) -> User:
    found = c.users.get(name)
    if found is None:
        raise HTTPException(404, f"no user {name!r}")
    return found


@router.get("/users/{name}", include_in_schema=False)
def user_page(request: Request, name: str, user: User = Depends(current_user),
              c: Ctx = Depends(ctx)):
    _admin(c, user, "manage users")
    return render(request, "admin_user.html", subject=_existing(c, name),
                  projects=[p.name for p in c.control.projects()], rights=RIGHTS)


@router.post("/users/{name}/roles", include_in_schema=False, dependencies=FORMS)
def user_roles(request: Request, name: str, admin: str = Form(""), role: list[str] = Form([]),
               user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    acts = _admin(c, user, "manage users")
    subject = _existing(c, name)
    try:
        acts.set_roles(user, subject.name, _roles(admin, role))
    except ActionError as exc:
        err = http_error(user, exc)
        return render(request, "admin_user.html", err.status_code, subject=subject,
                      projects=[p.name for p in c.control.projects()], rights=RIGHTS,
                      error=err.detail)
    return _user_done(request, "roles", subject.name)


def _confirm(request: Request, c: Ctx, user: User, name: str, what: str):
    """The confirmation page for browsers without JavaScript (fiona.js asks in a dialog)."""
    _admin(c, user, "manage users")
    subject = _existing(c, name)
    question = {"reset": f"Give {subject.name} a new one-time password? Their current "
                "password stops working and they are logged out everywhere.",
                "remove": f"Remove {subject.name}? They are logged out and cannot log in "
                "again."}[what]
    return render(request, "confirm_action.html", title=f"{what.capitalize()} {subject.name}",
                  question=question, action=f"/admin/users/{subject.name}/{what}", fields={},
                  label="Reset password" if what == "reset" else "Remove",
                  back=f"/admin/users/{subject.name}")


@router.get("/users/{name}/reset", include_in_schema=False)
def user_reset_confirm(request: Request, name: str, user: User = Depends(current_user),
                       c: Ctx = Depends(ctx)):
    return _confirm(request, c, user, name, "reset")


@router.get("/users/{name}/remove", include_in_schema=False)
def user_remove_confirm(request: Request, name: str, user: User = Depends(current_user),
                        c: Ctx = Depends(ctx)):
    return _confirm(request, c, user, name, "remove")


@router.post("/users/{name}/reset", include_in_schema=False, dependencies=FORMS)
def user_reset(request: Request, name: str, user: User = Depends(current_user),
               c: Ctx = Depends(ctx)):
    acts = _admin(c, user, "manage users")
    try:
        password = acts.reset_password(user, name)
    except ActionError as exc:
        raise http_error(user, exc) from None
    return _user_done(request, "reset", name, password)


@router.post("/users/{name}/remove", include_in_schema=False, dependencies=FORMS)
def user_remove(request: Request, name: str, user: User = Depends(current_user),
                c: Ctx = Depends(ctx)):
    acts = _admin(c, user, "manage users")
    try:
        acts.remove_user(user, name)
    except ActionError as exc:
        raise http_error(user, exc) from None
    return _user_done(request, "removed", name)


# --- projects --------------------------------------------------------------------------------
@router.get("/projects", include_in_schema=False)
def projects_page(request: Request, done: str = "", name: str = "",
                  user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    _admin(c, user, "manage projects")
    projects = c.control.projects()
    known = name in [p.name for p in projects]
    return render(request, "admin_projects.html", projects=projects,
                  message=_done_message(PROJECT_DONE, done, name, known))


def _project_form(request: Request, c: Ctx, project, new: bool, status: int = 200, **extra):
    return render(request, "admin_project.html", status, project=project, new=new,
                  profiles=available_profiles(c.datadir), **extra)


@router.get("/projects/new", include_in_schema=False)
def project_new(request: Request, user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    acts = _admin(c, user, "manage projects")
    return _project_form(request, c, acts.edited_project(""), True)


@router.get("/projects/{name}", include_in_schema=False)
def project_edit(request: Request, name: str, user: User = Depends(current_user),
                 c: Ctx = Depends(ctx)):
    _admin(c, user, "manage projects")
    project = next((p for p in c.control.projects() if p.name == name), None)
    if project is None:
        raise HTTPException(404, f"no project {name!r}")
    return _project_form(request, c, project, False)


def _save(request: Request, c: Ctx, user: User, new: bool, name: str, long_name: str,
          naming: str, events: str, active: str, rec_start: str, rec_end: str,
          deid_profile: str):
    acts = _admin(c, user, "manage projects")
    project = acts.edited_project(
        name.strip(), long_name=long_name.strip(), naming=naming.strip(),
        events=[e.strip() for e in events.split(",") if e.strip()], active=bool(active),
        rec_start=rec_start.strip(), rec_end=rec_end.strip(),
        **({"deid_profile": deid_profile.strip()} if deid_profile.strip() else {}))
    try:
        acts.save_project(user, project, new=new)
    except (ActionError, ControlPlaneError) as exc:
        err = http_error(user, exc)
        return _project_form(request, c, project, new, err.status_code, error=err.detail,
                             events_text=events)
    return RedirectResponse(f"/admin/projects?done={'added' if new else 'saved'}"
                            f"&name={quote(project.name)}", status_code=303)


@router.post("/projects", include_in_schema=False, dependencies=FORMS)
def project_add(request: Request, name: str = Form(""), long_name: str = Form(""),
                naming: str = Form(""), events: str = Form(""), active: str = Form(""),
                rec_start: str = Form(""), rec_end: str = Form(""),
                deid_profile: str = Form(""),
                user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    return _save(request, c, user, True, name, long_name, naming, events, active, rec_start,
                 rec_end, deid_profile)


@router.post("/projects/{name}", include_in_schema=False, dependencies=FORMS)
def project_save(request: Request, name: str, long_name: str = Form(""),
                 naming: str = Form(""), events: str = Form(""), active: str = Form(""),
                 rec_start: str = Form(""), rec_end: str = Form(""),
                 deid_profile: str = Form(""),
                 user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    return _save(request, c, user, False, name, long_name, naming, events, active, rec_start,
                 rec_end, deid_profile)
