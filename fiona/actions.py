"""What people do to the gateway, once for the web pages and the `fiona` command alike: assign
a study, upload a coupling list, ask for a resend, flip an `enabled` switch, see identified
values, and (admins) manage web users and projects. Each action checks who may do it, applies
its rules (`fiona.control.assign`, `check_project`, the user store's), writes its audit entry
and wakes the forwarder; the callers only translate arguments and results.

The CLI acts as `OsActor` (audited as `os:<login name>`): whoever can run `fiona` on the
server can read the data tree anyway, so the OS user holds every right.
"""

from __future__ import annotations

import csv
import getpass
import io
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from . import audit
from .access import Actor, may_see, may_see_identified
from .config import ENABLED_PARTS, Config, Site, read_switches, write_switches
from .control import open_control_plane
from .control.assign import COUPLING_HEADER, Assigner, CouplingReport
from .control.base import ControlPlane, Project, Study, TransferRequest
from .control.keyed import Keyed
from .daemon import notify_forwarder
from .deid.pipeline import check_profile
from .scanner.retrieve import Line as RetrievalLine
from .scanner.retrieve import Peer
from .scanner.retrieve import retrieve as retrieve_by_accession
from .web.sessions import SessionStore, sessions_path
from .web.users import User, UserError, UserStore, check_role

log = logging.getLogger("fiona.actions")


class ActionError(Exception):
    """An action was not taken; the text says why, for the person who asked."""


class Forbidden(ActionError):
    """The actor lacks the role the action needs."""


class NotFound(ActionError):
    """The study or project does not exist, or the actor may not know that it does."""


class Invalid(ActionError):
    """An argument is not one of the allowed values."""


@dataclass(frozen=True)
class OsActor:
    """The OS user running `fiona`: every right, audited under its login name."""

    login: str

    @classmethod
    def current(cls) -> OsActor:
        return cls(getpass.getuser())

    @property
    def name(self) -> str:
        return f"os:{self.login}"

    @property
    def admin(self) -> bool:
        return True

    def can(self, project: str, right: str | None = None) -> bool:
        return True

    def has_right(self, right: str) -> bool:
        return True


@dataclass
class AssignResult:
    created: bool
    request: TransferRequest | None = None
    new_participant: bool = False

    @property
    def code(self) -> str:
        """The message code pages show (never free text in a URL)."""
        return "created" if self.created else "exists"


#: a project's acronym: the key in coupling lists, REDCap and the roles `project:P:right`
PROJECT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EVENT_NAME = re.compile(r"^[A-Za-z0-9_. -]{1,100}$")


def check_project(project: Project) -> None:
    """The rules a project must meet before it is saved, for the web and `fiona project add`:
    a usable name, a participant-ID rule that is a valid regular expression, at least one
    event, and an ethics period of real dates in order."""
    if not PROJECT_NAME.match(project.name):
        raise Invalid(f"project name {project.name!r}: 1 to 64 letters, digits and _.- only")
    if not project.naming.strip():
        raise Invalid("the participant-ID rule must not be empty")
    try:
        re.compile(project.naming)
    except re.error as exc:
        raise Invalid(f"participant-ID rule {project.naming!r} is not a valid regular "
                      f"expression: {exc}") from None
    if not project.events:
        raise Invalid("a project needs at least one event, e.g. baseline")
    for event in project.events:
        if not EVENT_NAME.match(event):
            raise Invalid(f"event {event!r}: letters, digits, spaces and _.- only")
    if not set(project.features) <= {0, 1, 2}:
        raise Invalid("features are 0 (drop PR), 1 (never pixel-mask), "
                      "2 (drop secondary captures)")
    ends = []
    for which, text in (("start", project.rec_start), ("end", project.rec_end)):
        try:
            ends.append(date.fromisoformat(text) if text else None)
            if text and not re.fullmatch(r"\d{4}-\d\d-\d\d", text):
                raise ValueError(text)
        except ValueError:
            raise Invalid(f"ethics approval {which} {text!r} is not a date YYYY-MM-DD") from None
    if ends[0] and ends[1] and ends[0] > ends[1]:
        raise Invalid(f"the ethics approval ends ({ends[1]}) before it starts ({ends[0]})")


def _coupling_projects(text: str) -> set[str]:
    """The project names a coupling-list CSV mentions (to check roles before storing it)."""
    column = COUPLING_HEADER.index("ProjectName")
    return {fields[column].strip() for fields in csv.reader(io.StringIO(text))
            if len(fields) > column}


class Actions:
    """The actions on one site's control plane."""

    def __init__(self, site: Site, control: ControlPlane, keyed: Keyed):
        self.site = site
        self.datadir = site.datadir
        self.control = control
        self.keyed = keyed
        audit.audit_key(self.datadir)  # no action when its audit entry could not be written

    @classmethod
    def open(cls, config: Config, site_name: str | None = None) -> Actions:
        site = config.site(site_name)
        return cls(site, open_control_plane(config, site), Keyed.from_datadir(site.datadir))

    # --- shared --------------------------------------------------------------------------------
    def audit(self, actor: Actor, action: str, **details: Any) -> None:
        audit.append(self.datadir, actor.name, action, details)

    def _wake_forwarder(self) -> None:
        try:
            notify_forwarder(self.site)
        except OSError as exc:  # the forwarder polls as a fallback; the request is stored
            log.warning("could not wake the forwarder: %s", exc)

    def _project_names(self) -> list[str]:
        return [p.name for p in self.control.projects()]

    def _need(self, actor: Actor, project: str, right: str | None) -> None:
        if project not in self._project_names():
            raise NotFound(f"no project {project!r}")
        if not actor.can(project, right):
            raise Forbidden(f"you have no {right or 'role'} in project {project}")

    def projects_of(self, study_uid: str) -> set[str]:
        """The projects a study is requested for (none: it is waiting)."""
        return {r.project for r in self.control.requests(study_uid)}

    def study(self, actor: Actor, study_uid: str) -> Study:
        """The study, if `actor` may see it (`fiona.access`); else NotFound, so that nobody
        learns which studies other projects hold."""
        study = self.control.study(study_uid)
        if study is None or not may_see(actor, self.projects_of(study_uid)):
            raise NotFound(f"no study {study_uid}")
        return study

    def viewed(self, actor: Actor, shown: str, fields: Iterable[str],
               study_uids: Iterable[str]) -> None:
        """Audit one display of identified values: who, which studies, what was shown."""
        uids = list(study_uids)
        fields = list(fields)
        if uids and fields:
            self.audit(actor, "view identified", shown=shown, fields=fields, studies=uids)

    # --- actions -------------------------------------------------------------------------------
    def check_assign(self, actor: Actor, study_uid: str, project: str, participant: str,
                     event: str) -> tuple[Project, TransferRequest | None]:
        """Everything `assign` checks, without making the request (for the confirm page):
        the project and the request that exists already, if any. Raises Forbidden, NotFound,
        or ControlPlaneError with the refusal of the assignment rules (naming rule, event,
        inactive project, ethics period, a study already assigned to another participant)."""
        self._need(actor, project, "assign")
        study = self.study(actor, study_uid)
        if not may_see_identified(actor, self.projects_of(study.uid)):
            raise Forbidden(f"you have no assign role for study {study.uid}")
        assigner = Assigner(self.control, self.keyed)
        proj = assigner.checked(project, participant.strip(), event)
        return proj, assigner.existing(study.uid, project, participant.strip(), event)

    def assign(self, actor: Actor, study_uid: str, project: str, participant: str,
               event: str) -> AssignResult:
        """Request `study_uid` for (project, participant, event); raises as `check_assign`."""
        participant = participant.strip()
        self.check_assign(actor, study_uid, project, participant, event)
        new_participant = participant not in self.control.participants(project)
        req = Assigner(self.control, self.keyed).request(study_uid, project, participant, event,
                                                         "assign")
        if req is None:
            return AssignResult(False)
        if new_participant:
            self.audit(actor, "new participant", project=project, participant=participant)
        self._audit_request(actor, "assign", req)
        self._wake_forwarder()
        return AssignResult(True, req, new_participant)

    def move(self, actor: Actor, study_uid: str, project: str, participant: str,
             event: str | None = None) -> TransferRequest:
        """Admins: give the study's request in `project` another participant (and event); it is
        sent again, replacing the de-identified study at the destination."""
        if not actor.admin:
            raise Forbidden("only admins can move a study to another participant")
        self._need(actor, project, None)
        self.study(actor, study_uid)
        before = [(r.participant, r.event) for r in self.control.requests(study_uid)
                  if r.project == project]
        req = Assigner(self.control, self.keyed).reassign(study_uid, project,
                                                          participant.strip(), event)
        self.audit(actor, "move", study_uid=study_uid, project=project,
                   before=[f"{p}/{e}" for p, e in before], participant=req.participant,
                   event=req.event, instance=req.instance)
        self._wake_forwarder()
        return req

    def _audit_request(self, actor: Actor, action: str, req: TransferRequest) -> None:
        self.audit(actor, action, study_uid=req.study_uid, project=req.project,
                   participant=req.participant, event=req.event, instance=req.instance)

    def upload_coupling(self, actor: Actor, text: str, filename: str = "") -> CouplingReport:
        """A coupling list: each line checked and reported; one audit line for the upload and
        one per request it created. Forbidden when a row names a project where `actor` has
        no assign role (nothing is stored then)."""
        for project in sorted(_coupling_projects(text) & set(self._project_names())):
            if not actor.can(project, "assign"):
                raise Forbidden(f"you have no assign role in project {project}")
        report = Assigner(self.control, self.keyed).upload_coupling(text)
        self.audit(actor, "coupling upload", file=filename, accepted=report.accepted,
                   lines=len(report.lines), requests=len(report.requests))
        for req in report.requests:
            self._audit_request(actor, "coupling request", req)
        if report.requests:
            self._wake_forwarder()
        return report

    def resend(self, actor: Actor, project: str, study_uid: str | None = None) -> int:
        """Ask again for the transferred requests of a project (or of one study); admins only.
        Returns how many."""
        if not actor.admin:
            raise Forbidden("only admins can resend")
        self._need(actor, project, None)
        if study_uid is not None:
            self.study(actor, study_uid)
        n = Assigner(self.control, self.keyed).resend(project, study_uid)
        self.audit(actor, "resend", study_uid=study_uid or "", project=project, requests=n)
        if n:
            self._wake_forwarder()
        return n

    def retrieve(self, actor: Actor, peer: Peer, accessions: Iterable[str] | None = None,
                 project: str | None = None,
                 progress: Callable[[str], None] | None = None) -> list[RetrievalLine]:
        """Ask the clinical PACS (`peer`) for the studies of these accession numbers that have
        not arrived and move them here (`fiona.scanner.retrieve`). With `project`, the actor
        needs the assign role there and only the project's coupling-list rows are asked for
        (all of them by default); without, only admins (the CLI) may name any accession.
        One audit entry, accession numbers by keyed reference."""
        if project is not None:
            self._need(actor, project, "assign")
            listed = [r.accession for r in self.control.coupling_rows() if r.project == project]
            accessions = listed if accessions is None else list(accessions)
            if set(accessions) - set(listed):
                raise Invalid(f"only accession numbers on project {project}'s coupling list "
                              f"can be retrieved for it")
        elif not actor.admin:
            raise Forbidden("only admins can retrieve studies outside a project's coupling list")
        studies = self.control.studies(include_hidden=True)
        lines = retrieve_by_accession(
            peer, self.site.aetitle, dict.fromkeys(accessions or ()),
            {s.accession for s in studies if s.accession}, {s.uid for s in studies},
            self.keyed, progress)
        self.audit(actor, "retrieve", pacs=peer.label, project=project or "",
                   images=sum(x.images for x in lines),
                   lines=[{"accession": self.keyed.ref(x.accession), "status": x.status,
                           "images": x.images, "studies": x.studies} for x in lines])
        return lines

    def set_switch(self, actor: Actor, part: str, on: bool) -> bool:
        """Set one character of the `enabled` file (admins only); returns whether it changed."""
        if not actor.admin:
            raise Forbidden("only admins can change the switches")
        if part not in ENABLED_PARTS:
            raise Invalid(f"unknown switch {part!r}; known: {', '.join(ENABLED_PARTS)}")
        state = read_switches(self.datadir)
        before = state[part]
        state[part] = on
        write_switches(self.datadir, state)
        self.audit(actor, "switch", part=part, before="1" if before else "0",
                   after="1" if on else "0")
        return before != on

    # --- administration (admins only) ----------------------------------------------------------
    def need_admin(self, actor: Actor, what: str) -> None:
        """Admins only: anyone else is refused, and the attempt is audited."""
        if not actor.admin:
            self.audit(actor, "admin refused", what=what)
            raise Forbidden(f"only admins can {what}")

    def _users(self) -> UserStore:
        return UserStore(self.datadir)

    def _end_sessions(self, name: str) -> int:
        return SessionStore(sessions_path(self.datadir)).end_user(name)

    def users(self, actor: Actor) -> list[User]:
        """The local web users (directory users are managed in the directory)."""
        self.need_admin(actor, "manage users")
        store = self._users()
        return [u for u in (store.get(n) for n in store.names()) if u is not None]

    @staticmethod
    def _checked_roles(roles: Iterable[str]) -> list[str]:
        """The roles, each checked, without repeats. A role may name a project that does not
        exist yet (users are often set up before their project)."""
        out = []
        for role in dict.fromkeys(r.strip() for r in roles if r.strip()):
            try:
                out.append(check_role(role))
            except UserError as exc:
                raise Invalid(str(exc)) from None
        return out

    def _keep_an_admin(self, name: str, roles: list[str]) -> None:
        """Refuse a change that would leave no local admin (nobody could manage users)."""
        store = self._users()
        others = [n for n in store.names() if n != name and (u := store.get(n)) and u.admin]
        if "admin" not in roles and not others:
            raise Invalid(f"{name} is the last admin; make another user admin first")

    def save_user(self, actor: Actor, name: str, roles: Iterable[str],
                  password: str | None = None, new: bool = True) -> str | None:
        """Add a user (`new`: refused when the name exists) or, for `fiona user add`, add or
        update one. Without `password` the user gets a one-time password, returned here once
        and never stored in clear, to be changed at the first login."""
        self.need_admin(actor, "manage users")
        store = self._users()
        exists = store.get(name) is not None
        if new and exists:
            raise Invalid(f"user {name!r} exists already")
        roles = self._checked_roles(roles)
        if not roles:
            raise Invalid("give the user at least one role")
        if exists:
            self._keep_an_admin(name, roles)
        one_time = secrets.token_urlsafe(12) if password is None else None
        try:
            store.add(name, password or one_time, roles, one_time=one_time is not None)
        except UserError as exc:
            raise Invalid(str(exc)) from None
        ended = self._end_sessions(name) if exists and password is not None else 0
        self.audit(actor, "user updated" if exists else "user added", user=name, roles=roles,
                   one_time_password=one_time is not None,
                   **({"sessions_ended": ended} if ended else {}))
        return one_time

    def _existing_user(self, name: str) -> User:
        user = self._users().get(name)
        if user is None:
            raise NotFound(f"no user {name!r}")
        return user

    def set_roles(self, actor: Actor, name: str, roles: Iterable[str]) -> None:
        """Give a user other roles; they apply from the user's next request."""
        self.need_admin(actor, "manage users")
        user = self._existing_user(name)
        roles = self._checked_roles(roles)
        if not roles:
            raise Invalid("give the user at least one role, or remove the user")
        self._keep_an_admin(name, roles)
        self._users().add(name, None, roles, one_time=user.one_time)
        self.audit(actor, "user roles set", user=name, before=user.roles, after=roles)

    def reset_password(self, actor: Actor, name: str) -> str:
        """A new one-time password for `name` (returned once), ending all its sessions."""
        self.need_admin(actor, "manage users")
        user = self._existing_user(name)
        password = secrets.token_urlsafe(12)
        self._users().add(name, password, user.roles, one_time=True)
        ended = self._end_sessions(name)
        self.audit(actor, "user password reset", user=name, sessions_ended=ended)
        return password

    def remove_user(self, actor: Actor, name: str) -> None:
        """Remove a user and end its sessions; never oneself, never the last admin."""
        self.need_admin(actor, "manage users")
        self._existing_user(name)
        if name == actor.name:
            raise Invalid("you cannot remove yourself; another admin can")
        self._keep_an_admin(name, [])
        self._users().remove(name)
        ended = self._end_sessions(name)
        self.audit(actor, "user removed", user=name, sessions_ended=ended)

    def save_project(self, actor: Actor, project: Project, new: bool | None = None) -> Project:
        """Add (`new` True), change (`new` False) or add-or-change (None, `fiona project add`)
        a project, after `check_project`."""
        self.need_admin(actor, "manage projects")
        exists = project.name in self._project_names()
        if new is True and exists:
            raise Invalid(f"project {project.name} exists already")
        if new is False and not exists:
            raise NotFound(f"no project {project.name!r}")
        check_project(project)
        try:
            check_profile(project.deid_profile, self.datadir)
        except ValueError as exc:
            raise Invalid(f"project {project.name}: {exc}") from None
        self.control.save_project(project)
        self.audit(actor, "project changed" if exists else "project added", project=project.name,
                   naming=project.naming, events=project.events, active=project.active,
                   rec_start=project.rec_start, rec_end=project.rec_end,
                   deid_profile=project.deid_profile)
        return project

    def edited_project(self, name: str, **fields: Any) -> Project:
        """The project `name` with `fields` changed (everything else kept), or a new one."""
        existing = next((p for p in self.control.projects() if p.name == name), None)
        return replace(existing or Project(name=name), **fields)
