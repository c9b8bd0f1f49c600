"""Who may see which incoming study, and its identified values: one rule for every page, API
endpoint and action.

A study in quarantine carries identified values: its accession number (on the Assign list, the
study page and the JSON API) and, in its DICOM headers, the patient's name, ID, birth date,
referring physician and more (the "Before" column of the de-identification preview).

- A study without any transfer request is waiting to be assigned: admins and every user with
  the assign role in some project see it, with its identified values, because choosing the
  project and participant needs them.
- Once a study is requested for a project, it belongs to that project: only admins and users
  with a role in one of its projects see it at all; of those, only admins and users with the
  assign role in one of its projects see its identified values (review and export roles work
  on de-identified output and see the study without its accession number).

Every display of identified values is audited by its caller (`fiona.actions.Actions.viewed`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

#: the fields of a study record (and of the rows built from it) that identify a patient
IDENTIFIED_FIELDS = ("accession",)


class Actor(Protocol):
    """Whoever acts: a web user (`fiona.web.users.User`) or the OS user of the CLI."""

    @property
    def name(self) -> str: ...

    @property
    def admin(self) -> bool: ...

    def can(self, project: str, right: str | None = None) -> bool: ...

    def has_right(self, right: str) -> bool: ...


def may_see(actor: Actor, projects: Iterable[str]) -> bool:
    """Whether `actor` may see a study that is requested for `projects` (none: waiting)."""
    projects = set(projects)
    if actor.admin:
        return True
    if not projects:
        return actor.has_right("assign")
    return any(actor.can(p) for p in projects)


def may_see_identified(actor: Actor, projects: Iterable[str]) -> bool:
    """Whether `actor` may see the identified values of a study requested for `projects`."""
    projects = set(projects)
    if actor.admin:
        return True
    if not projects:
        return actor.has_right("assign")
    return any(actor.can(p, "assign") for p in projects)
