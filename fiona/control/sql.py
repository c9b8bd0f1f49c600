"""The control plane in an SQL database: one implementation for SQLite (`local`) and
PostgreSQL (`postgres`).

The statements are written once in the SQL both speak (`INSERT … ON CONFLICT`, `RETURNING`,
`?` placeholders that the PostgreSQL backend turns into `%s`); a backend supplies only its
connection, its schema's column types and transactions. Records that people never query by
field (projects, studies, routing rules) are kept as JSON next to their key. Every write is one
transaction, so a killed process leaves either the whole change or none of it.

Requests are read with their study's node (a join: a request never stores a node of its own),
and a forwarder may *claim* the pending requests it reads (`pending_requests(claim=True)`):
a claim is a lease in the row (`claimed_by`, `claimed_until`), taken in the same transaction
that selects the rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's write lock serializes
writers anyway), so two forwarders on one index never take the same request, and a killed
forwarder's claims return when their lease runs out.
"""

from __future__ import annotations

import json
import uuid
from abc import abstractmethod
from contextlib import AbstractContextManager
from dataclasses import asdict
from datetime import datetime
from typing import Any, Protocol

from ..clock import SYSTEM_CLOCK, Clock
from .base import (
    HELD_PREFIX,
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
    registration,
)

#: how long a forwarder's claim on a request lasts: longer than sending a batch of studies
#: takes, short enough that a killed forwarder's requests go again the same hour
CLAIM_SECONDS = 1800.0
#: at most this many requests are claimed at once, so two forwarders share the work
CLAIM_BATCH = 8

#: the schema; {id}, {real} and {float} are each backend's types
SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    project TEXT NOT NULL, participant TEXT NOT NULL, PRIMARY KEY (project, participant));
CREATE TABLE IF NOT EXISTS studies (
    uid TEXT PRIMARY KEY, arrival TEXT NOT NULL, hidden INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL, node TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS series (
    study_uid TEXT NOT NULL, uid TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (study_uid, uid));
CREATE TABLE IF NOT EXISTS requests (
    id {id},
    study_uid TEXT NOT NULL, project TEXT NOT NULL, participant TEXT NOT NULL,
    event TEXT NOT NULL, requested TEXT NOT NULL, transferred TEXT NOT NULL DEFAULT '',
    mapped_uid TEXT NOT NULL DEFAULT '', error_flags TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '', active_proc_time {float} NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '',
    revision INTEGER NOT NULL DEFAULT 1, done_revision INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT NOT NULL DEFAULT '', claimed_until {float} NOT NULL DEFAULT 0,
    UNIQUE (study_uid, project, participant, event));
CREATE TABLE IF NOT EXISTS coupling (
    id {id}, accession TEXT NOT NULL, study_uid TEXT NOT NULL,
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
    last_seen TEXT NOT NULL, node TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS inventory_project ON inventory (project);
CREATE INDEX IF NOT EXISTS requests_study ON requests (study_uid);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: a request with its study's node (requests never store a node of their own)
REQUESTS = ("SELECT requests.*, COALESCE(studies.node, '') AS node FROM requests "
            "LEFT JOIN studies ON studies.uid = requests.study_uid")
#: pending requests a node does (`fiona.control.base.takes`; the first parameter is the node
#: or NULL for every node's, the second the node again)
PENDING = ("requests.revision > requests.done_revision AND (CAST(? AS TEXT) IS NULL OR "
           "COALESCE(studies.node, '') IN ('', ?))")


class Db(Protocol):
    """What the backends' connections offer: `?` placeholders, rows addressable by name."""

    def execute(self, sql: str, args: Any = (), /) -> Any: ...

    def executemany(self, sql: str, rows: Any, /) -> Any: ...


def _project_json(p: Project) -> str:
    data = asdict(p)
    data["features"] = sorted(p.features)
    return json.dumps(data)


def _project(data: str) -> Project:
    raw = json.loads(data)
    raw["features"] = set(raw.get("features", []))
    raw["pixel_exclusions"] = [tuple(x) for x in raw.get("pixel_exclusions", [])]
    return Project(**raw)


def _request(row: Any) -> TransferRequest:
    flags = {int(x) for x in row["error_flags"].split(",") if x}
    return TransferRequest(
        study_uid=row["study_uid"], project=row["project"], participant=row["participant"],
        event=row["event"], requested=row["requested"], instance=row["id"],
        transferred=row["transferred"], mapped_uid=row["mapped_uid"], error_flags=flags,
        error_message=row["error_message"], active_proc_time=row["active_proc_time"],
        complete=bool(row["complete"]), source=row["source"], revision=row["revision"],
        done_revision=row["done_revision"], node=row["node"])


class SqlControlPlane(ControlPlane):
    """Everything but the connection: `_read` (a connection for reading) and `_tx` (one write
    transaction) come from the backend, as do `_duplicate` (its unique-violation error),
    `_lock_study` and `_claim_lock` (how the SELECT of claimable requests locks its rows)."""

    _claim_lock = ""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, holder: str = ""):
        """`holder` names this client in request claims: a forwarder restarted on the same
        machine and site takes its own claims back at once (`fiona.control.claim_holder`);
        by default a name of its own."""
        self.clock = clock
        self.holder = holder or uuid.uuid4().hex[:12]

    @abstractmethod
    def _read(self) -> Db: ...

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Db]: ...

    @abstractmethod
    def _duplicate(self, exc: Exception) -> bool:
        """Whether `exc` is the database refusing a duplicate key."""

    # --- projects and participants ------------------------------------------------------------
    def projects(self) -> list[Project]:
        rows = self._read().execute("SELECT data FROM projects ORDER BY name").fetchall()
        return [_project(r["data"]) for r in rows]

    def save_project(self, project: Project) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO projects (name, data) VALUES (?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET data = excluded.data", (project.name, _project_json(project)))

    def participants(self, project: str) -> list[str]:
        rows = self._read().execute("SELECT participant FROM participants WHERE project = ? "
                                    "ORDER BY participant", (project,)).fetchall()
        return [r["participant"] for r in rows]

    def add_participant(self, project: str, participant: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO participants VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (project, participant))

    # --- incoming studies -----------------------------------------------------------------------
    def register_study(self, study: Study) -> Study:
        with self._tx() as db:
            self._lock_study(db, study.uid)
            old = self._studies(db, "WHERE uid = ?", (study.uid,))
            stored = registration(old[0] if old else None, study)
            data = asdict(stored)
            series = data.pop("series")
            node = data.pop("node")
            db.execute("INSERT INTO studies (uid, arrival, hidden, data, node) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (uid) DO UPDATE SET "
                       "arrival = excluded.arrival, hidden = excluded.hidden, "
                       "data = excluded.data, node = excluded.node",
                       (stored.uid, stored.arrival, int(stored.hidden), json.dumps(data), node))
            db.executemany("INSERT INTO series VALUES (?, ?, ?) ON CONFLICT (study_uid, uid) "
                           "DO UPDATE SET data = excluded.data",
                           [(stored.uid, s["uid"], json.dumps(s)) for s in series])
        return stored

    @staticmethod
    def _studies(db: Db, where: str, args: tuple = ()) -> list[Study]:
        rows = db.execute(f"SELECT uid, hidden, data, node FROM studies {where}",
                          args).fetchall()
        out = []
        for row in rows:
            data = json.loads(row["data"])
            data["hidden"] = bool(row["hidden"])
            data["node"] = row["node"]
            series = db.execute("SELECT data FROM series WHERE study_uid = ? ORDER BY uid",
                                (row["uid"],)).fetchall()
            data["series"] = [Series(**json.loads(s["data"])) for s in series]
            out.append(Study(**data))
        return sorted(out, key=lambda s: s.arrival, reverse=True)

    def studies(self, include_hidden: bool = False) -> list[Study]:
        return self._studies(self._read(), "" if include_hidden else "WHERE hidden = 0")

    def study(self, uid: str) -> Study | None:
        found = self._studies(self._read(), "WHERE uid = ?", (uid,))
        return found[0] if found else None

    def hide_studies_before(self, arrival_before: datetime) -> int:
        cutoff = arrival_before.replace(microsecond=0).isoformat(sep=" ")
        with self._tx() as db:
            cur = db.execute("UPDATE studies SET hidden = 1 WHERE hidden = 0 AND arrival < ? "
                             "AND uid NOT IN (SELECT study_uid FROM requests)", (cutoff,))
            return int(cur.rowcount)

    # --- transfer requests ------------------------------------------------------------------------
    def requests(self, study_uid: str | None = None) -> list[TransferRequest]:
        if study_uid is None:
            rows = self._read().execute(f"{REQUESTS} ORDER BY requests.id").fetchall()
        else:
            rows = self._read().execute(f"{REQUESTS} WHERE study_uid = ? ORDER BY requests.id",
                                        (study_uid,)).fetchall()
        return [_request(r) for r in rows]

    def pending_requests(self, node: str | None = None,
                         claim: bool = False) -> list[TransferRequest]:
        """In the query: a node reads only its own studies' pending requests (`takes`). With
        `claim`, only requests no other client holds, at most CLAIM_BATCH, and this client
        holds them for CLAIM_SECONDS (again at every call while they are pending): the
        forwarders sharing one index divide the requests, none is taken twice. Held requests
        (project closed) come last, so they never crowd out requests that can go."""
        if not claim:
            rows = self._read().execute(f"{REQUESTS} WHERE {PENDING} "
                                        f"ORDER BY requested, requests.id", (node, node)).fetchall()
            return [_request(r) for r in rows]
        now = self.clock.time()
        with self._tx() as db:
            ids = [r["id"] for r in db.execute(
                f"SELECT requests.id FROM requests LEFT JOIN studies ON "
                f"studies.uid = requests.study_uid WHERE {PENDING} AND "
                f"(requests.claimed_by IN ('', ?) OR requests.claimed_until < ?) "
                f"ORDER BY substr(requests.error_message, 1, CAST(? AS INTEGER)) = ?, "
                f"requests.requested, requests.id LIMIT {CLAIM_BATCH}{self._claim_lock}",
                (node, node, self.holder, now, len(HELD_PREFIX), HELD_PREFIX)).fetchall()]
            if not ids:
                return []
            marks = ", ".join("?" * len(ids))
            db.execute(f"UPDATE requests SET claimed_by = ?, claimed_until = ? "
                       f"WHERE id IN ({marks})", (self.holder, now + CLAIM_SECONDS, *ids))
            rows = db.execute(f"{REQUESTS} WHERE requests.id IN ({marks}) "
                              f"ORDER BY requested, requests.id", ids).fetchall()
        return [_request(r) for r in rows]

    def renew_claim(self, request: TransferRequest) -> bool:
        """A lease that has not run out is renewed (only by its holder); one that ran out
        is lost even if nobody took it yet: `pending_requests(claim=True)` takes it again."""
        now = self.clock.time()
        with self._tx() as db:
            cur = db.execute("UPDATE requests SET claimed_until = ? WHERE id = ? AND "
                             "claimed_by = ? AND claimed_until >= ?",
                             (now + CLAIM_SECONDS, request.instance, self.holder, now))
            return int(cur.rowcount) == 1

    def _stored(self, db: Db, request: TransferRequest) -> TransferRequest:
        row = db.execute(f"{REQUESTS} WHERE requests.id = ?", (request.instance,)).fetchone()
        if row is None:
            raise ControlPlaneError(f"request #{request.instance} for study "
                                    f"{request.study_uid} is not stored")
        return _request(row)

    def add_request(self, request: TransferRequest) -> TransferRequest:
        """One INSERT … SELECT … WHERE NOT EXISTS, in a transaction that first locks the
        study (`_lock_study`), so two processes adding at once cannot both insert."""
        with self._tx() as db:
            self._lock_study(db, request.study_uid)
            db.execute(
                "INSERT INTO requests (study_uid, project, participant, event, requested, "
                "source) SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM requests "
                "WHERE study_uid = ? AND project = ?)",
                (*request.key(), request.requested, request.source, request.study_uid,
                 request.project))
            row = db.execute(f"{REQUESTS} WHERE study_uid = ? AND project = ? "
                             f"ORDER BY requests.id LIMIT 1",
                             (request.study_uid, request.project)).fetchone()
        return _request(row)

    def _lock_study(self, db: Db, study_uid: str) -> None:
        """Serialize the writers of one study and its requests until the transaction ends
        (nothing to do where a transaction holds the whole database's write lock)."""

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
        """The outcome; a claim on the request ends with the revision it was taken for."""
        with self._tx() as db:
            db.execute(
                "UPDATE requests SET transferred = ?, mapped_uid = ?, error_flags = ?, "
                "error_message = ?, active_proc_time = ?, complete = ?, done_revision = ?, "
                "claimed_until = CASE WHEN revision <= ? THEN 0 ELSE claimed_until END "
                "WHERE id = ?",
                (request.transferred, request.mapped_uid,
                 ",".join(str(f) for f in sorted(request.error_flags)), request.error_message,
                 request.active_proc_time, int(request.complete), request.done_revision,
                 request.done_revision, request.instance))

    # --- the region's shared key ----------------------------------------------------------------
    def claim_key_fingerprint(self, fingerprint: str) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES ('key_fingerprint', ?) ON CONFLICT DO NOTHING",
                       (fingerprint,))
            row = db.execute("SELECT value FROM meta WHERE name = 'key_fingerprint'").fetchone()
        return str(row["value"])

    # --- coupling lists, routing rules, auto-ID ------------------------------------------------
    def coupling_rows(self) -> list[CouplingRow]:
        rows = self._read().execute("SELECT * FROM coupling ORDER BY id").fetchall()
        return [CouplingRow(accession=r["accession"], project=r["project"],
                            participant=r["participant"], event=r["event"],
                            study_uid=r["study_uid"], added=r["added"], id=r["id"])
                for r in rows]

    def add_coupling_rows(self, rows: list[CouplingRow]) -> None:
        with self._tx() as db:
            for r in rows:
                row = db.execute("INSERT INTO coupling (accession, study_uid, project, "
                                 "participant, event, added) VALUES (?, ?, ?, ?, ?, ?) "
                                 "RETURNING id", (r.accession, r.study_uid, r.project,
                                                  r.participant, r.event, r.added)).fetchone()
                r.id = int(row["id"])

    def routing_rules(self) -> list[RoutingRule]:
        rows = self._read().execute("SELECT data FROM routing ORDER BY name").fetchall()
        return [RoutingRule(**json.loads(r["data"])) for r in rows]

    def save_routing_rule(self, rule: RoutingRule) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO routing VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                       "data = excluded.data", (rule.name, json.dumps(asdict(rule))))

    def autoid(self, project: str, patient_hash: str) -> str | None:
        row = self._read().execute("SELECT value FROM autoid WHERE project = ? AND hash = ?",
                                   (project, patient_hash)).fetchone()
        return row["value"] if row else None

    def autoid_values(self, project: str) -> set[str]:
        rows = self._read().execute("SELECT value FROM autoid WHERE project = ?",
                                    (project,)).fetchall()
        return {r["value"] for r in rows}

    def save_autoid(self, project: str, patient_hash: str, value: str, method: str) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO autoid VALUES (?, ?, ?, ?)",
                           (project, patient_hash, value, method))
        except Exception as exc:
            if not self._duplicate(exc):
                raise
            raise ControlPlaneError(f"auto-ID {value!r} or this patient is taken in "
                                    f"{project} already") from None

    def mirror_forwarded(self, request: TransferRequest, description: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO participants VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (request.project, request.participant))
            db.execute("INSERT INTO imaging VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (request.project, request.participant, request.event, request.study_uid,
                        request.mapped_uid, description))

    def imaging(self, project: str) -> list[dict]:
        rows = self._read().execute("SELECT participant, event, mapped_uid, description FROM "
                                    "imaging WHERE project = ?", (project,)).fetchall()
        return [{"participant": r["participant"], "event": r["event"],
                 "study_uid": r["mapped_uid"], "description": r["description"]} for r in rows]

    # --- inventory of the research PACS ------------------------------------------------------
    def inventory(self, project: str | None = None) -> list[InventoryEntry]:
        if project is None:
            rows = self._read().execute("SELECT * FROM inventory ORDER BY study_uid").fetchall()
        else:
            rows = self._read().execute("SELECT * FROM inventory WHERE project = ? "
                                        "ORDER BY study_uid", (project,)).fetchall()
        return [InventoryEntry(
            study_uid=r["study_uid"], project=r["project"], participant=r["participant"],
            event=r["event"], study_date=r["study_date"], series=r["series"],
            instances=r["instances"], modalities=[m for m in r["modalities"].split(",") if m],
            first_seen=r["first_seen"], last_seen=r["last_seen"], node=r["node"]) for r in rows]

    def replace_inventory(self, project: str | None, entries: list[InventoryEntry]) -> None:
        """One transaction: readers see the old inventory or the new one, never a mix."""
        check_inventory_scope(project, entries)
        with self._tx() as db:
            if project is None:
                db.execute("DELETE FROM inventory")
            else:
                db.execute("DELETE FROM inventory WHERE project = ?", (project,))
            db.executemany(
                "INSERT INTO inventory (study_uid, project, participant, event, study_date, "
                "series, instances, modalities, first_seen, last_seen, node) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (study_uid) DO UPDATE SET "
                "project = excluded.project, participant = excluded.participant, "
                "event = excluded.event, study_date = excluded.study_date, "
                "series = excluded.series, instances = excluded.instances, "
                "modalities = excluded.modalities, first_seen = excluded.first_seen, "
                "last_seen = excluded.last_seen, node = excluded.node",
                [(e.study_uid, e.project, e.participant, e.event, e.study_date, e.series,
                  e.instances, ",".join(e.modalities), e.first_seen, e.last_seen, e.node)
                 for e in entries])
