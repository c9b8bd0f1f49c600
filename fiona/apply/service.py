"""Applying for a new project or for a role on one, and the admins' decision.

Every rule is checked before anything is stored (a refused application leaves no trace but
its message). Approval goes through `fiona.actions` exactly as `fiona project add` and
`fiona user` do (`Actions.save_project`, `Actions.set_roles`), so a project made from an
application meets the same rules and leaves the same audit entries. Every step is audited
("application ..."), and the applicant's notice of the decision is queued for `fiona notify`
(`fiona.notify.store`), so a mail server that is down delays it and loses nothing. The notice
says the decision, not the admin's note: that is free text (it may name anyone) and, for a
directory user, an instruction for admins; the applicant reads it on the Apply page.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from re import _constants as c  # type: ignore[attr-defined]
from re import _parser
from typing import Any

import rstr
from rstr.xeger import STAR_PLUS_LIMIT

from ..access import Actor
from ..actions import Actions, Invalid, NotFound, check_project
from ..clock import SYSTEM_CLOCK, Clock
from ..control.base import Project
from ..mail import valid_address
from ..notify.store import DIRECT, Event, NotifyStore
from ..web.users import RIGHTS, UserStore
from .store import APPROVED, PENDING, PROJECT, REJECTED, ROLE, Application, ApplicationStore

#: a new project's acronym: at least 5 letters or digits (the key in REDCap, roles and paths)
ACRONYM = re.compile(r"^[A-Za-z0-9]{5,32}$")
MAX_TEXT = 2000
EXAMPLE_TRIES = 20
#: the longest example ID built (participant IDs are short; this bounds a request's work)
MAX_EXAMPLE = 1000


def _longest(items: Any, groups: dict[int, int]) -> int:
    """The longest string `rstr.xeger` can make from a parsed pattern: each repeat stops at
    STAR_PLUS_LIMIT, but nested repeats multiply, so a short rule can ask for billions."""
    total = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            total += min(av[1], STAR_PLUS_LIMIT) * _longest(av[2], groups)
        elif op is c.SUBPATTERN:
            width = _longest(av[3], groups)
            if av[0] is not None:
                groups[av[0]] = width
            total += width
        elif op is c.ATOMIC_GROUP:
            total += _longest(av, groups)
        elif op is c.BRANCH:
            total += max(_longest(b, groups) for b in av[1])
        elif op is c.GROUPREF_EXISTS:
            total += max(_longest(b, groups) for b in av[1:] if b is not None)
        elif op is c.GROUPREF:
            total += groups.get(av, 0)
        elif op not in (c.ASSERT, c.ASSERT_NOT, c.AT):
            total += 1
    return total


def example_id(naming: str) -> str:
    """A participant ID that matches `naming`, to show the applicant what the rule allows;
    Invalid when the rule does not compile, when an example could be too long to build (any
    logged-in user may ask), or when none can be made from it."""
    try:
        re.compile(naming)
    except re.error as exc:
        raise Invalid(f"the participant-ID rule {naming!r} is not a valid regular expression: "
                      f"{exc}") from None
    if _longest(_parser.parse(naming), {}) > MAX_EXAMPLE:
        raise Invalid(f"the participant-ID rule {naming!r} allows IDs too long to show an "
                      f"example (more than {MAX_EXAMPLE} characters); bound its repeats")
    for _ in range(EXAMPLE_TRIES):
        try:
            candidate = rstr.xeger(naming)
        except (re.error, ValueError, IndexError, KeyError):
            break
        if re.fullmatch(naming, candidate):
            return candidate
    raise Invalid(f"no participant ID matches the rule {naming!r}; write a rule such as "
                  f"^ABC[0-9]{{3}}$")


def _text(value: str, what: str, required: bool = True) -> str:
    value = (value or "").strip()
    if required and not value:
        raise Invalid(f"{what} is missing")
    if len(value) > MAX_TEXT:
        raise Invalid(f"{what}: at most {MAX_TEXT} characters")
    return value


def _address(value: str, what: str) -> str:
    value = (value or "").strip()
    if not valid_address(value):
        raise Invalid(f"{what} {value!r} is not an e-mail address")
    return value


class Applications:
    """The applications of one site, for the web pages."""

    def __init__(self, acts: Actions, store: ApplicationStore, clock: Clock = SYSTEM_CLOCK):
        self.acts = acts
        self.store = store
        self.notices = NotifyStore(acts.datadir)
        self.clock = clock

    def _now(self) -> str:
        return self.clock.now().isoformat(timespec="seconds")

    def _new_id(self) -> str:
        return f"{self.clock.now():%Y%m%d}-{secrets.token_hex(4)}"

    # --- applying ------------------------------------------------------------------------------
    def project_of(self, app: Application) -> Project:
        return Project(name=app.project, naming=app.naming, events=list(app.events),
                       long_name=app.long_name, contact=app.pi, contact_email=app.pi_email,
                       rec_start=app.rec_start, rec_end=app.rec_end, active=True)

    def _taken(self, acronym: str) -> bool:
        key = acronym.lower()
        return any(p.name.lower() == key for p in self.acts.control.projects()) or any(
            a.kind == PROJECT and a.state == PENDING and a.project.lower() == key
            for a in self.store.all())

    def check_project_application(self, app: Application) -> Application:
        """The application with its example ID, or Invalid naming the first problem."""
        if not ACRONYM.fullmatch(app.project):
            raise Invalid(f"acronym {app.project!r}: 5 to 32 letters or digits, nothing else")
        if self._taken(app.project):
            raise Invalid(f"the acronym {app.project} is taken (by a project or a pending "
                          f"application); choose another")
        app = replace(app, long_name=_text(app.long_name, "the project's full name"),
                      pi=_text(app.pi, "the principal investigator"),
                      pi_email=_address(app.pi_email, "the principal investigator's e-mail"),
                      ethics_number=_text(app.ethics_number, "the ethics approval number"),
                      end_action=_text(app.end_action, "what happens at the end of the project"),
                      rec_start=_text(app.rec_start, "the ethics approval start"),
                      rec_end=_text(app.rec_end, "the ethics approval end"))
        app.example = example_id(app.naming)
        check_project(self.project_of(app))
        return app

    def apply_project(self, actor: Actor, *, project: str, long_name: str, pi: str,
                      pi_email: str, naming: str, events: list[str], ethics_number: str,
                      rec_start: str, rec_end: str, end_action: str, email: str) -> Application:
        app = Application(
            id=self._new_id(), kind=PROJECT, applicant=actor.name,
            email=_address(email, "your e-mail"), created=self._now(),
            project=(project or "").strip(), long_name=long_name, pi=pi, pi_email=pi_email,
            naming=(naming or "").strip(), events=[e.strip() for e in events if e.strip()],
            ethics_number=ethics_number, rec_start=rec_start, rec_end=rec_end,
            end_action=end_action)
        app = self.check_project_application(app)
        self.store.add(app)
        self.acts.audit(actor, "application submitted", id=app.id, kind=PROJECT,
                        project=app.project, ethics_number=app.ethics_number)
        return app

    def apply_role(self, actor: Actor, *, project: str, right: str, reason: str,
                   email: str) -> Application:
        project = (project or "").strip()
        if project not in [p.name for p in self.acts.control.projects()]:
            raise NotFound(f"no project {project!r}")
        if right not in RIGHTS:
            raise Invalid(f"the role must be one of {', '.join(RIGHTS)}")
        if actor.can(project, right):
            raise Invalid(f"you have the {right} role in {project} already")
        if any(a.kind == ROLE and a.state == PENDING and a.applicant == actor.name and
               a.project == project and a.right == right for a in self.store.all()):
            raise Invalid(f"you have applied for the {right} role in {project} already")
        app = Application(id=self._new_id(), kind=ROLE, applicant=actor.name,
                          email=_address(email, "your e-mail"), created=self._now(),
                          project=project, right=right,
                          reason=_text(reason, "why you need the role"))
        self.store.add(app)
        self.acts.audit(actor, "application submitted", id=app.id, kind=ROLE, project=project,
                        right=right)
        return app

    def mine(self, actor: Actor) -> list[Application]:
        return [a for a in self.store.all() if a.applicant == actor.name]

    # --- deciding (admins) ---------------------------------------------------------------------
    def all(self, actor: Actor) -> list[Application]:
        self.acts.need_admin(actor, "decide applications")
        return self.store.all()

    def _pending(self, actor: Actor, app_id: str) -> Application:
        self.acts.need_admin(actor, "decide applications")
        app = self.store.get(app_id)
        if app is None:
            raise NotFound(f"no application {app_id!r}")
        if app.state != PENDING:
            raise Invalid(f"application {app.id} was {app.state} already")
        return app

    def _grant(self, actor: Actor, app: Application, roles: list[str]) -> str:
        """Give the applicant `roles` as `fiona user` would; a directory user (no local
        account) gets them through the directory's groups, which the note says."""
        local = UserStore(self.acts.datadir).get(app.applicant)
        if local is None:
            return (f"{app.applicant} logs in through the directory: add them to the group "
                    f"that gives {', '.join(roles)} (WEB.ldap.role_groups)")
        self.acts.set_roles(actor, app.applicant, list(dict.fromkeys(local.roles + roles)))
        return f"{app.applicant} has {', '.join(roles)}"

    def approve(self, actor: Actor, app_id: str) -> Application:
        app = self._pending(actor, app_id)
        if app.kind == PROJECT:
            self.acts.save_project(actor, self.project_of(app), new=True)
            note = f"project {app.project} created; " + self._grant(
                actor, app, [f"project:{app.project}:{r}" for r in RIGHTS])
        else:
            note = self._grant(actor, app, [f"project:{app.project}:{app.right}"])
        return self._decide(actor, app, APPROVED, note)

    def reject(self, actor: Actor, app_id: str, reason: str) -> Application:
        app = self._pending(actor, app_id)
        return self._decide(actor, app, REJECTED, _text(reason, "the reason for the rejection"))

    def _decide(self, actor: Actor, app: Application, state: str, note: str) -> Application:
        app = replace(app, state=state, decided_by=actor.name, decided=self._now(),
                      decision_note=note)
        self.store.save(app)
        what = (f"your application for project {app.project}" if app.kind == PROJECT else
                f"your application for the {app.right} role in project {app.project}")
        self.notices.queue(app.applicant, app.email, Event(
            f"application:{app.id}:{state}", DIRECT, app.project,
            f"{what} was {state}; the admin's note is on the Apply page"), self._now())
        self.acts.audit(actor, f"application {state}", id=app.id, kind=app.kind,
                        project=app.project, applicant=app.applicant, note=note,
                        notice="queued for fiona notify")
        return app
