"""Where applications are kept: in the control plane chosen by `CONTROL_PLANE.type`.

- `local`: the table `applications` in `DATADIR/site/applications.db` (SQLite, WAL), next to
  the control plane's `fiona.db` and with its own connection, so the control plane's schema is
  not touched;
- `redcap`: the REDCap project `Applications` (data dictionary `config/redcap/Applications.csv`,
  token `"Applications"` in tokens.json), one record per application, through the same API
  client as the control plane.

A store only keeps and returns `Application` records; the rules (what may be applied for,
who decides) are in `fiona.apply.service`.
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..control.base import ControlPlane, ControlPlaneError
from ..tree import ensure_dir

if TYPE_CHECKING:
    from ..control.redcap import RedcapControlPlane

PROJECT, ROLE = "project", "role"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"


@dataclass
class Application:
    """One application. `kind` PROJECT: a new project `project` with the fields below;
    `kind` ROLE: the right `right` in the existing project `project`."""

    id: str
    kind: str
    applicant: str                 # the web user who applied
    email: str                     # where the decision is mailed
    created: str
    project: str                   # the acronym
    right: str = ""                # ROLE: assign, export or review
    long_name: str = ""
    pi: str = ""                   # principal investigator
    pi_email: str = ""
    naming: str = ""               # participant-ID rule (regex)
    example: str = ""              # a participant ID that matches it, shown to the applicant
    events: list[str] = field(default_factory=list)
    ethics_number: str = ""
    rec_start: str = ""
    rec_end: str = ""
    end_action: str = ""           # what happens to the data at the end of the project
    reason: str = ""               # ROLE: why the applicant needs it
    state: str = PENDING
    decided_by: str = ""
    decided: str = ""
    decision_note: str = ""        # the reason of a rejection, or what approval did


class ApplicationStore(ABC):
    """Applications, newest first."""

    @abstractmethod
    def add(self, app: Application) -> None: ...

    @abstractmethod
    def save(self, app: Application) -> None:
        """Write an existing application's current state (a decision)."""

    @abstractmethod
    def all(self) -> list[Application]: ...

    def get(self, app_id: str) -> Application | None:
        return next((a for a in self.all() if a.id == app_id), None)


def _from_dict(values: dict) -> Application:
    known = {f.name for f in fields(Application)}
    return Application(**{k: v for k, v in values.items() if k in known})


class LocalApplications(ApplicationStore):
    """SQLite: one row per application, its fields as JSON (nothing in it is identifying)."""

    def __init__(self, path: Path):
        ensure_dir(path.parent)
        self.path = path
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS applications (id TEXT PRIMARY KEY, "
                       "created TEXT NOT NULL, data TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        self.path.chmod(0o640)
        return db

    def add(self, app: Application) -> None:
        with self._db() as db:
            db.execute("INSERT INTO applications VALUES (?, ?, ?)",
                       (app.id, app.created, json.dumps(asdict(app))))

    def save(self, app: Application) -> None:
        with self._db() as db:
            if db.execute("UPDATE applications SET data = ? WHERE id = ?",
                          (json.dumps(asdict(app)), app.id)).rowcount != 1:
                raise ControlPlaneError(f"no application {app.id}")

    def all(self) -> list[Application]:
        with self._db() as db:
            rows = db.execute("SELECT data FROM applications ORDER BY created DESC, id").fetchall()
        return [_from_dict(json.loads(r[0])) for r in rows]


#: the REDCap project (tokens.json key) and its record-id field
REDCAP_PROJECT = "Applications"
RECORD_ID = "record_id"
#: Application attribute -> REDCap field (events: comma-separated)
REDCAP_FIELDS = {f.name: f"app_{f.name}" for f in fields(Application) if f.name != "id"}


class RedcapApplications(ApplicationStore):
    """The REDCap project `Applications` through the control plane's API client."""

    def __init__(self, api: ControlPlane):
        from ..control.redcap import RedcapControlPlane

        if not isinstance(api, RedcapControlPlane):
            raise ControlPlaneError("REDCap applications need the redcap control plane")
        if not api.has_token(REDCAP_PROJECT):
            raise ControlPlaneError(
                f"no API token for REDCap project {REDCAP_PROJECT!r} in {api.tokens_file}: "
                f"create it from config/redcap/Applications.csv and add its token there")
        self.api: RedcapControlPlane = api

    @staticmethod
    def _row(app: Application) -> dict[str, str]:
        row = {RECORD_ID: app.id}
        for attr, name in REDCAP_FIELDS.items():
            value = getattr(app, attr)
            row[name] = ",".join(value) if attr == "events" else str(value)
        return row

    @staticmethod
    def _app(row: dict) -> Application:
        values: dict = {attr: row.get(name, "") for attr, name in REDCAP_FIELDS.items()}
        values["events"] = [e for e in values["events"].split(",") if e]
        return Application(id=row.get(RECORD_ID, ""), **values)

    def add(self, app: Application) -> None:
        self.api.import_rows(REDCAP_PROJECT, [self._row(app)])

    def save(self, app: Application) -> None:
        self.api.import_rows(REDCAP_PROJECT, [self._row(app)],
                             overwrite=True)

    def all(self) -> list[Application]:
        rows = self.api.export(REDCAP_PROJECT)
        apps = [self._app(r) for r in rows if r.get(RECORD_ID)]
        return sorted(apps, key=lambda a: (a.created, a.id), reverse=True)


def open_store(datadir: Path, control: ControlPlane) -> ApplicationStore:
    """The store of the control plane in use: REDCap's project, else the local table."""
    if getattr(control, "kind", "local") == "redcap":
        return RedcapApplications(control)
    return LocalApplications(Path(datadir) / "site" / "applications.db")
