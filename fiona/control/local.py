"""The `local` control plane: SQLite in `DATADIR/site/fiona.db`.

For a single machine and for tests. WAL mode lets the daemons and the command line use the
database at once; every write is one transaction, so a killed process leaves either the whole
change or none of it. Records that people never query by field (projects, studies, routing
rules) are kept as JSON next to their key.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from ..tree import FILE_MODE
from .base import (
    ControlPlane,
    ControlPlaneError,
    CouplingRow,
    InventoryEntry,
    Project,
    RoutingRule,
    Series,
    Study,
    TransferRequest,
    check_inventory_scope,
    now_iso,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    project TEXT NOT NULL, participant TEXT NOT NULL, PRIMARY KEY (project, participant));
CREATE TABLE IF NOT EXISTS studies (
    uid TEXT PRIMARY KEY, arrival TEXT NOT NULL, hidden INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    study_uid TEXT NOT NULL, uid TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (study_uid, uid));
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL, project TEXT NOT NULL, participant TEXT NOT NULL,
    event TEXT NOT NULL, requested TEXT NOT NULL, transferred TEXT NOT NULL DEFAULT '',
    mapped_uid TEXT NOT NULL DEFAULT '', error_flags TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '', active_proc_time REAL NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '',
    revision INTEGER NOT NULL DEFAULT 1, done_revision INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_uid, project, participant, event));
CREATE TABLE IF NOT EXISTS coupling (
    id INTEGER PRIMARY KEY AUTOINCREMENT, accession TEXT NOT NULL, study_uid TEXT NOT NULL,
    project TEXT NOT NULL, participant TEXT NOT NULL, event TEXT NOT NULL, added TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routing (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS autoid (
    project TEXT NOT NULL, hash TEXT NOT NULL, value TEXT NOT NULL, method TEXT NOT NULL,
    PRIMARY KEY (project, hash), UNIQUE (project, value));
CREATE TABLE IF NOT EXISTS imaging (
    project TEXT NOT NULL, participant TEXT NOT NULL, event TEXT NOT NULL,
    study_uid TEXT NOT NULL, mapped_uid TEXT NOT NULL, description TEXT NOT NULL,
    PRIMARY KEY (project, participant, event, mapped_uid));
CREATE TABLE IF NOT EXISTS inventory (
    study_uid TEXT PRIMARY KEY, project TEXT NOT NULL, participant TEXT NOT NULL,
    event TEXT NOT NULL, study_date TEXT NOT NULL, series INTEGER NOT NULL,
    instances INTEGER NOT NULL, modalities TEXT NOT NULL, first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS inventory_project ON inventory (project);
"""


def _project_json(p: Project) -> str:
    data = asdict(p)
    data["features"] = sorted(p.features)
    return json.dumps(data)


def _project(data: str) -> Project:
    raw = json.loads(data)
    raw["features"] = set(raw.get("features", []))
    raw["pixel_exclusions"] = [tuple(x) for x in raw.get("pixel_exclusions", [])]
    return Project(**raw)


class LocalControlPlane(ControlPlane):
    kind = "local"

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # runs in its own transaction
        self._migrate()
        path.chmod(FILE_MODE)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (no lock upgrade deadlocks between daemons)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring a database made by an older FIONA up to SCHEMA: requests got `revision` and
        `done_revision`; an old request is done if it was transferred at or after it was
        last requested (the rule the revisions replace)."""
        def missing(db: sqlite3.Connection) -> bool:
            columns = {r["name"] for r in db.execute("PRAGMA table_info(requests)")}
            return "revision" not in columns

        if not missing(self._db()):
            return
        with self._tx() as db:
            if missing(db):  # another process may have migrated while we waited
                db.execute("ALTER TABLE requests ADD COLUMN revision INTEGER NOT NULL DEFAULT 1")
                db.execute("ALTER TABLE requests ADD COLUMN done_revision INTEGER NOT NULL "
                           "DEFAULT 0")
                db.execute("UPDATE requests SET done_revision = 1 "
                           "WHERE transferred != '' AND requested <= transferred")

    def test_connection(self) -> None:
        try:
            self._db().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"cannot use {self.path}: {exc}") from None

    # --- projects and participants ------------------------------------------------------------
    def projects(self) -> list[Project]:
        rows = self._db().execute("SELECT data FROM projects ORDER BY name").fetchall()
        return [_project(r["data"]) for r in rows]

    def save_project(self, project: Project) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO projects (name, data) VALUES (?, ?)",
                       (project.name, _project_json(project)))

    def participants(self, project: str) -> list[str]:
        rows = self._db().execute("SELECT participant FROM participants WHERE project = ? "
                                  "ORDER BY participant", (project,)).fetchall()
        return [r["participant"] for r in rows]

    def add_participant(self, project: str, participant: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO participants VALUES (?, ?)", (project, participant))

    # --- incoming studies -----------------------------------------------------------------------
    def register_study(self, study: Study) -> None:
        data = asdict(study)
        series = data.pop("series")
        with self._tx() as db:
            old = db.execute("SELECT hidden FROM studies WHERE uid = ?", (study.uid,)).fetchone()
            db.execute("INSERT OR REPLACE INTO studies (uid, arrival, hidden, data) "
                       "VALUES (?, ?, ?, ?)", (study.uid, study.arrival,
                                               old["hidden"] if old else int(study.hidden),
                                               json.dumps(data)))
            for s in series:
                db.execute("INSERT OR REPLACE INTO series VALUES (?, ?, ?)",
                           (study.uid, s["uid"], json.dumps(s)))

    def studies(self, include_hidden: bool = False) -> list[Study]:
        db = self._db()
        where = "" if include_hidden else "WHERE hidden = 0"
        out = []
        for row in db.execute(f"SELECT uid, hidden, data FROM studies {where} "
                              f"ORDER BY arrival DESC").fetchall():
            data = json.loads(row["data"])
            data["hidden"] = bool(row["hidden"])
            series = db.execute("SELECT data FROM series WHERE study_uid = ? ORDER BY uid",
                                (row["uid"],)).fetchall()
            data["series"] = [Series(**json.loads(s["data"])) for s in series]
            out.append(Study(**data))
        return out

    def hide_studies_before(self, arrival_before: datetime) -> int:
        cutoff = arrival_before.replace(microsecond=0).isoformat(sep=" ")
        with self._tx() as db:
            cur = db.execute("UPDATE studies SET hidden = 1 WHERE hidden = 0 AND arrival < ? "
                             "AND uid NOT IN (SELECT study_uid FROM requests)", (cutoff,))
            return cur.rowcount

    # --- transfer requests ------------------------------------------------------------------------
    @staticmethod
    def _request(row: sqlite3.Row) -> TransferRequest:
        flags = {int(x) for x in row["error_flags"].split(",") if x}
        return TransferRequest(
            study_uid=row["study_uid"], project=row["project"], participant=row["participant"],
            event=row["event"], requested=row["requested"], instance=row["id"],
            transferred=row["transferred"], mapped_uid=row["mapped_uid"], error_flags=flags,
            error_message=row["error_message"], active_proc_time=row["active_proc_time"],
            complete=bool(row["complete"]), source=row["source"], revision=row["revision"],
            done_revision=row["done_revision"])

    def requests(self, study_uid: str | None = None) -> list[TransferRequest]:
        if study_uid is None:
            rows = self._db().execute("SELECT * FROM requests ORDER BY id").fetchall()
        else:
            rows = self._db().execute("SELECT * FROM requests WHERE study_uid = ? ORDER BY id",
                                      (study_uid,)).fetchall()
        return [self._request(r) for r in rows]

    def _stored(self, db: sqlite3.Connection, request: TransferRequest) -> TransferRequest:
        row = db.execute("SELECT * FROM requests WHERE id = ?", (request.instance,)).fetchone()
        if row is None:
            raise ControlPlaneError(f"request #{request.instance} for study "
                                    f"{request.study_uid} is not stored")
        return self._request(row)

    def add_request(self, request: TransferRequest) -> TransferRequest:
        """One INSERT ... SELECT ... WHERE NOT EXISTS: SQLite runs a statement under the
        database's write lock, so two processes adding at once cannot both insert."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO requests (study_uid, project, participant, event, requested, "
                "source) SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM requests "
                "WHERE study_uid = ? AND project = ?)",
                (*request.key(), request.requested, request.source, request.study_uid,
                 request.project))
            row = db.execute("SELECT * FROM requests WHERE study_uid = ? AND project = ? "
                             "ORDER BY id LIMIT 1", (request.study_uid, request.project)
                             ).fetchone()
        return self._request(row)

    def request_again(self, request: TransferRequest, source: str | None = None,
                      requested: str | None = None) -> TransferRequest:
        with self._tx() as db:
            db.execute("UPDATE requests SET revision = revision + 1, requested = ?, "
                       "complete = 0, source = COALESCE(?, source) WHERE id = ?",
                       (requested or now_iso(), source, request.instance))
            return self._stored(db, request)

    def reassign_request(self, request: TransferRequest, participant: str, event: str,
                         requested: str | None = None) -> TransferRequest:
        with self._tx() as db:
            db.execute("UPDATE requests SET participant = ?, event = ?, revision = revision + 1, "
                       "requested = ?, complete = 0, source = 'reassign' WHERE id = ?",
                       (participant, event, requested or now_iso(), request.instance))
            return self._stored(db, request)

    def update_request(self, request: TransferRequest) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE requests SET transferred = ?, mapped_uid = ?, error_flags = ?, "
                "error_message = ?, active_proc_time = ?, complete = ?, done_revision = ? "
                "WHERE id = ?",
                (request.transferred, request.mapped_uid,
                 ",".join(str(f) for f in sorted(request.error_flags)), request.error_message,
                 request.active_proc_time, int(request.complete), request.done_revision,
                 request.instance))

    # --- coupling lists, routing rules, auto-ID ------------------------------------------------
    def coupling_rows(self) -> list[CouplingRow]:
        rows = self._db().execute("SELECT * FROM coupling ORDER BY id").fetchall()
        return [CouplingRow(accession=r["accession"], project=r["project"],
                            participant=r["participant"], event=r["event"],
                            study_uid=r["study_uid"], added=r["added"], id=r["id"])
                for r in rows]

    def add_coupling_rows(self, rows: list[CouplingRow]) -> None:
        with self._tx() as db:
            for r in rows:
                cur = db.execute("INSERT INTO coupling (accession, study_uid, project, "
                                 "participant, event, added) VALUES (?, ?, ?, ?, ?, ?)",
                                 (r.accession, r.study_uid, r.project, r.participant, r.event,
                                  r.added))
                r.id = cur.lastrowid or 0  # always set after an INSERT

    def routing_rules(self) -> list[RoutingRule]:
        rows = self._db().execute("SELECT data FROM routing ORDER BY name").fetchall()
        return [RoutingRule(**json.loads(r["data"])) for r in rows]

    def save_routing_rule(self, rule: RoutingRule) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO routing VALUES (?, ?)",
                       (rule.name, json.dumps(asdict(rule))))

    def autoid(self, project: str, patient_hash: str) -> str | None:
        row = self._db().execute("SELECT value FROM autoid WHERE project = ? AND hash = ?",
                                 (project, patient_hash)).fetchone()
        return row["value"] if row else None

    def autoid_values(self, project: str) -> set[str]:
        rows = self._db().execute("SELECT value FROM autoid WHERE project = ?",
                                  (project,)).fetchall()
        return {r["value"] for r in rows}

    def save_autoid(self, project: str, patient_hash: str, value: str, method: str) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO autoid VALUES (?, ?, ?, ?)",
                           (project, patient_hash, value, method))
        except sqlite3.IntegrityError:
            raise ControlPlaneError(f"auto-ID {value!r} or this patient is taken in "
                                    f"{project} already") from None

    def mirror_forwarded(self, request: TransferRequest, description: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO participants VALUES (?, ?)",
                       (request.project, request.participant))
            db.execute("INSERT OR IGNORE INTO imaging VALUES (?, ?, ?, ?, ?, ?)",
                       (request.project, request.participant, request.event, request.study_uid,
                        request.mapped_uid, description))

    def imaging(self, project: str) -> list[dict]:
        rows = self._db().execute("SELECT participant, event, mapped_uid, description FROM "
                                  "imaging WHERE project = ?", (project,)).fetchall()
        return [{"participant": r["participant"], "event": r["event"],
                 "study_uid": r["mapped_uid"], "description": r["description"]} for r in rows]

    # --- inventory of the research PACS ------------------------------------------------------
    def inventory(self, project: str | None = None) -> list[InventoryEntry]:
        if project is None:
            rows = self._db().execute("SELECT * FROM inventory ORDER BY study_uid").fetchall()
        else:
            rows = self._db().execute("SELECT * FROM inventory WHERE project = ? "
                                      "ORDER BY study_uid", (project,)).fetchall()
        return [InventoryEntry(
            study_uid=r["study_uid"], project=r["project"], participant=r["participant"],
            event=r["event"], study_date=r["study_date"], series=r["series"],
            instances=r["instances"], modalities=[m for m in r["modalities"].split(",") if m],
            first_seen=r["first_seen"], last_seen=r["last_seen"]) for r in rows]

    def replace_inventory(self, project: str | None, entries: list[InventoryEntry]) -> None:
        """One transaction: readers see the old inventory or the new one, never a mix."""
        check_inventory_scope(project, entries)
        with self._tx() as db:
            if project is None:
                db.execute("DELETE FROM inventory")
            else:
                db.execute("DELETE FROM inventory WHERE project = ?", (project,))
            db.executemany(
                "INSERT OR REPLACE INTO inventory VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.study_uid, e.project, e.participant, e.event, e.study_date, e.series,
                  e.instances, ",".join(e.modalities), e.first_seen, e.last_seen)
                 for e in entries])
