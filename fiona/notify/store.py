"""The notification state of one site, `DATADIR/site/notify.db` (SQLite, WAL):

- `prefs`: per user, the address digests go to, at most how often (minutes), when the last
  digest went, and (for directory users, who have no local account) the roles they had when
  they last saved their subscriptions;
- `subs`: (user, project, kind) rows; admin kinds use the project "" (the whole site);
- `seen`: the durable cursor: the key of every event already turned into notices, so a run
  that is killed, or a mail server that is down, neither repeats nor loses a notice;
- `queue`: notices per user, kept until their digest was accepted by the mail server (`sent`
  says when), or withheld because their reader may no longer see them (`withheld <when>`).

Nothing identifying is stored: notices carry projects, pseudonyms, counts and links.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..access import Actor
from ..tree import ensure_dir

#: kinds a user may choose per project
PROJECT_KINDS = {
    "routed": "a study is assigned or routed to the project",
    "failed": "a transfer failed",
    "held": "a transfer is held (the project is closed or outside its ethics period)",
    "export": "an export is ready",
    "ethics": "the ethics approval period ends within 30 days",
}
#: kinds only admins may choose, for the whole site
ADMIN_KINDS = {
    "receiver": "the DICOM receiver is not running",
    "disk": "the disk is above a watermark",
    "failing": "requests are failing (any project)",
}
#: notices that need no subscription (the decision on one's own application)
DIRECT = "application"
DEFAULT_EVERY_MINUTES = 60
MIN_EVERY, MAX_EVERY = 5, 7 * 24 * 60


def may_hear(actor: Actor, project: str, kind: str) -> bool:
    """Whether `actor` may hear of `kind` for `project` ("" for the whole site): a project kind
    for a project they may see, a site kind as an admin. Checked when they choose, and again
    with their roles of the day before each notice (roles change)."""
    if kind in PROJECT_KINDS:
        return bool(project) and actor.can(project)
    return kind in ADMIN_KINDS and not project and actor.admin


@dataclass
class Prefs:
    user: str
    email: str
    every_minutes: int = DEFAULT_EVERY_MINUTES
    last_sent: str = ""
    roles: list[str] | None = None


@dataclass
class Notice:
    id: int
    user: str
    email: str
    kind: str
    project: str
    text: str
    created: str


@dataclass
class Event:
    """Something that happened, found in durable state; `key` names it uniquely and for good."""

    key: str
    kind: str
    project: str     # "" for site-wide (admin) events
    text: str


class NotifyStore:
    def __init__(self, datadir: Path):
        self.path = Path(datadir) / "site" / "notify.db"
        ensure_dir(self.path.parent)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS prefs (user TEXT PRIMARY KEY, email TEXT NOT NULL,
                    every_minutes INTEGER NOT NULL, last_sent TEXT NOT NULL DEFAULT '',
                    roles TEXT);
                CREATE TABLE IF NOT EXISTS subs (user TEXT NOT NULL, project TEXT NOT NULL,
                    kind TEXT NOT NULL, PRIMARY KEY (user, project, kind));
                CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, at TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT,
                    user TEXT NOT NULL, email TEXT NOT NULL, key TEXT NOT NULL,
                    kind TEXT NOT NULL, project TEXT NOT NULL, text TEXT NOT NULL,
                    created TEXT NOT NULL, sent TEXT NOT NULL DEFAULT '',
                    UNIQUE (user, key));
            """)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        self.path.chmod(0o640)
        return db

    # --- subscriptions ---------------------------------------------------------------------
    def prefs(self, user: str) -> Prefs | None:
        with self._db() as db:
            row = db.execute("SELECT user, email, every_minutes, last_sent, roles FROM prefs "
                             "WHERE user = ?", (user,)).fetchone()
        if row is None:
            return None
        return Prefs(row[0], row[1], row[2], row[3], json.loads(row[4]) if row[4] else None)

    def subscriptions(self, user: str) -> set[tuple[str, str]]:
        with self._db() as db:
            return {(p, k) for p, k in db.execute(
                "SELECT project, kind FROM subs WHERE user = ?", (user,))}

    def subscribe(self, prefs: Prefs, subs: Iterable[tuple[str, str]]) -> None:
        """Replace the user's preferences and subscriptions in one transaction."""
        with self._db() as db:
            db.execute("INSERT INTO prefs (user, email, every_minutes, roles) VALUES (?,?,?,?) "
                       "ON CONFLICT (user) DO UPDATE SET email = excluded.email, "
                       "every_minutes = excluded.every_minutes, roles = excluded.roles",
                       (prefs.user, prefs.email, prefs.every_minutes,
                        json.dumps(prefs.roles) if prefs.roles is not None else None))
            db.execute("DELETE FROM subs WHERE user = ?", (prefs.user,))
            db.executemany("INSERT INTO subs VALUES (?, ?, ?)",
                           [(prefs.user, p, k) for p, k in sorted(set(subs))])

    def refresh_roles(self, user: str, roles: list[str]) -> None:
        """A directory user's roles as their login just found them: the notify job has no
        other way to learn that a group no longer gives them a project, and would otherwise
        keep mailing them its notices (local accounts are read from users.json instead)."""
        with self._db() as db:
            db.execute("UPDATE prefs SET roles = ? WHERE user = ? AND roles IS NOT NULL",
                       (json.dumps(roles), user))

    def subscribers(self) -> list[tuple[Prefs, set[tuple[str, str]]]]:
        users = []
        with self._db() as db:
            names = [r[0] for r in db.execute("SELECT user FROM prefs ORDER BY user")]
        for name in names:
            prefs = self.prefs(name)
            if prefs is not None:
                users.append((prefs, self.subscriptions(name)))
        return users

    # --- the cursor and the queue ----------------------------------------------------------
    def state(self, name: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_state(self, name: str, value: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO state VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                       "value = excluded.value", (name, value))

    def unseen(self, keys: Iterable[str]) -> set[str]:
        keys = list(dict.fromkeys(keys))
        with self._db() as db:
            seen = {k for (k,) in db.execute("SELECT key FROM seen")}
        return {k for k in keys if k not in seen}

    def record(self, events: list[Event], notices: list[tuple[str, str, Event]],
               now: str) -> None:
        """Queue `notices` (user, address, event) and mark `events` seen, in one transaction:
        a crash leaves either both or neither."""
        with self._db() as db:
            db.executemany("INSERT OR IGNORE INTO queue (user, email, key, kind, project, text, "
                           "created) VALUES (?,?,?,?,?,?,?)",
                           [(u, a, e.key, e.kind, e.project, e.text, now)
                            for u, a, e in notices])
            db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)",
                           [(e.key, now) for e in events])

    def queue(self, user: str, email: str, event: Event, now: str) -> None:
        """Queue one notice for `user` directly (no subscription needed), e.g. a decision."""
        self.record([], [(user, email, event)], now)

    def unsent(self) -> list[Notice]:
        with self._db() as db:
            rows = db.execute("SELECT id, user, email, kind, project, text, created FROM queue "
                              "WHERE sent = '' ORDER BY id").fetchall()
        return [Notice(*r) for r in rows]

    def withhold(self, ids: list[int], now: str) -> None:
        """Take notices out of the queue unsent (their reader may no longer see them)."""
        with self._db() as db:
            db.executemany("UPDATE queue SET sent = ? WHERE id = ?",
                           [(f"withheld {now}", i) for i in ids])

    def mark_sent(self, user: str, ids: list[int], now: str) -> None:
        with self._db() as db:
            db.executemany("UPDATE queue SET sent = ? WHERE id = ?", [(now, i) for i in ids])
            db.execute("INSERT INTO prefs (user, email, every_minutes, last_sent) "
                       "VALUES (?, '', ?, ?) ON CONFLICT (user) DO UPDATE SET "
                       "last_sent = excluded.last_sent", (user, DEFAULT_EVERY_MINUTES, now))
