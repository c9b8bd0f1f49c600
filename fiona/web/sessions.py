"""Server-side web sessions: `DATADIR/site/web-sessions.sqlite` (mode 0600).

The cookie carries only a random id; the server keeps who is logged in and the session's values
(the CSRF token). That is what makes a session revocable: logout deletes it, a password change
deletes every session of that user, and a session ends after `idle` seconds without a request
or `lifetime` seconds after login, whichever comes first. The table stores the SHA-256 of the
id, not the id, so a copy of the file does not hand out live cookies.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock

IDLE_SECONDS = 30 * 60
LIFETIME_SECONDS = 12 * 3600


@dataclass
class Session:
    id: str
    user: str
    created: float
    values: dict[str, Any] = field(default_factory=dict)


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def sessions_path(datadir: Path) -> Path:
    return Path(datadir) / "site" / "web-sessions.sqlite"


def open_database(path: Path) -> sqlite3.Connection:
    """The sessions' SQLite file (created with mode 0600), in autocommit and WAL mode, for
    threads of one process and for several processes; login throttling (`throttle`) keeps its
    table in the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    return db


class SessionStore:
    """Sessions in SQLite; safe for the threads of one web process and for several processes."""

    def __init__(self, path: Path, clock: Clock = SYSTEM_CLOCK, idle: float = IDLE_SECONDS,
                 lifetime: float = LIFETIME_SECONDS):
        self.path = Path(path)
        self.clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._db = open_database(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY, "
                         "user TEXT NOT NULL, created REAL NOT NULL, seen REAL NOT NULL, "
                         "data TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user)")

    def _sql(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def create(self, user: str, values: dict[str, Any]) -> Session:
        """A new session for `user` (after a login); also drops expired ones."""
        now = self.clock.time()
        self._sql("DELETE FROM sessions WHERE seen < ? OR created < ?",
                  (now - self.idle, now - self.lifetime))
        session = Session(secrets.token_urlsafe(32), user, now, dict(values))
        self._sql("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                  (_key(session.id), user, now, now, json.dumps(session.values)))
        return session

    def get(self, session_id: str, touch: bool = True) -> Session | None:
        """The live session with this id, its idle time restarted (unless `touch` is False: a
        page polling for status is not a person at work); None when unknown or expired (an
        expired one is deleted)."""
        if not session_id:
            return None
        key, now = _key(session_id), self.clock.time()
        rows = self._sql("SELECT user, created, seen, data FROM sessions WHERE key = ?", (key,))
        if not rows:
            return None
        user, created, seen, data = rows[0]
        if now - seen > self.idle or now - created > self.lifetime:
            self._sql("DELETE FROM sessions WHERE key = ?", (key,))
            return None
        if touch:
            self._sql("UPDATE sessions SET seen = ? WHERE key = ?", (now, key))
        return Session(session_id, user, created, json.loads(data))

    def save(self, session: Session) -> None:
        self._sql("UPDATE sessions SET data = ? WHERE key = ?",
                  (json.dumps(session.values), _key(session.id)))

    def end(self, session_id: str) -> None:
        self._sql("DELETE FROM sessions WHERE key = ?", (_key(session_id),))

    def end_user(self, user: str) -> int:
        """End every session of `user` (password changed); returns how many there were."""
        count = self._sql("SELECT COUNT(*) FROM sessions WHERE user = ?", (user,))[0][0]
        self._sql("DELETE FROM sessions WHERE user = ?", (user,))
        return count
