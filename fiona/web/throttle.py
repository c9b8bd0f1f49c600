"""Login throttling against password guessing: per user name and per client address.

A key (a user name or an address) may fail `free` times; each failure after that locks the key
for a delay that doubles (2 s, 4 s, 8 s, ...) up to `max_delay` (15 minutes: a temporary
lockout). While a key is locked, attempts are refused without checking the password, so a
guesser gets a handful of tries per quarter hour instead of thousands. A successful login
clears its user name; a key is forgotten `forget` seconds after its last failure (its entry is
deleted by the next failure of any key).

The counts are durable, in table `login_throttle` of the web sessions' SQLite file (mode 0600,
`sessions.open_database`): restarting or crashing `fiona web` does not reset a lockout, and
several web workers share one count. Keys are stored as keyed hashes (HMAC with the site key,
`control.keyed`), never a user name or address in clear, and the table is bounded to `max_keys`
entries so a flood of made-up names cannot fill the disk. Times are wall-clock seconds from an
injectable `Clock` (a monotonic clock does not survive a reboot); a lock never reports more
than `max_delay`, even when the wall clock was set back.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from ..control.keyed import Keyed
from .sessions import open_database


class Throttle:
    """One kind of key ("user" or "address") and its free failures, in a shared table."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, kind: str, free: int,
                 clock: Clock = SYSTEM_CLOCK, max_delay: float = 900.0,
                 forget: float = 3600.0, max_keys: int = 10000):
        self.db, self.lock, self.kind = db, lock, kind
        self.free = free
        self.clock = clock
        self.max_delay = max_delay
        self.forget = forget
        self.max_keys = max_keys

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0: now)."""
        with self.lock:
            row = self.db.execute("SELECT locked_until FROM login_throttle "
                                  "WHERE kind = ? AND key = ?", (self.kind, key)).fetchone()
        if row is None:
            return 0.0
        return min(max(0.0, row[0] - self.clock.time()), self.max_delay)

    def failed(self, key: str) -> float:
        """Record a failure; returns the lock it starts in seconds (0: none yet)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")  # one count across web workers
            try:
                delay = self._failed(key, self.clock.time())
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        return delay

    def _failed(self, key: str, now: float) -> float:
        self.db.execute("DELETE FROM login_throttle WHERE kind = ? AND last < ? AND "
                        "locked_until <= ?", (self.kind, now - self.forget, now))
        row = self.db.execute("SELECT failures FROM login_throttle WHERE kind = ? AND key = ?",
                              (self.kind, key)).fetchone()
        failures = (row[0] if row else 0) + 1
        over = failures - self.free
        delay = min(2.0 ** over, self.max_delay) if over > 0 else 0.0
        self.db.execute("INSERT OR REPLACE INTO login_throttle VALUES (?, ?, ?, ?, ?)",
                        (self.kind, key, failures, now, now + delay))
        if row is None:
            self.db.execute(
                "DELETE FROM login_throttle WHERE kind = ? AND key IN (SELECT key FROM "
                "login_throttle WHERE kind = ? ORDER BY last LIMIT max(0, (SELECT COUNT(*) "
                "FROM login_throttle WHERE kind = ?) - ?))",
                (self.kind, self.kind, self.kind, self.max_keys))
        return delay

    def succeeded(self, key: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM login_throttle WHERE kind = ? AND key = ?",
                            (self.kind, key))


class LoginThrottle:
    """The two throttles a login passes: its user name (5 free failures) and its client address
    (20, as several people may share one address behind a proxy or NAT), kept in `path`."""

    def __init__(self, path: Path, keyed: Keyed, clock: Clock = SYSTEM_CLOCK):
        self.keyed = keyed
        db = open_database(Path(path))
        db.execute("CREATE TABLE IF NOT EXISTS login_throttle (kind TEXT NOT NULL, "
                   "key TEXT NOT NULL, failures INTEGER NOT NULL, last REAL NOT NULL, "
                   "locked_until REAL NOT NULL, PRIMARY KEY (kind, key))")
        db.execute("CREATE INDEX IF NOT EXISTS login_throttle_last "
                   "ON login_throttle (kind, last)")
        lock = threading.Lock()
        self.users = Throttle(db, lock, "user", 5, clock)
        self.addresses = Throttle(db, lock, "address", 20, clock)

    def _user_key(self, name: str) -> str:
        return self.keyed.hash(name[:128].lower(), "LoginThrottleUser")

    def _address_key(self, address: str) -> str:
        return self.keyed.hash(address, "LoginThrottleAddress")

    def wait(self, name: str, address: str) -> float:
        return max(self.users.wait(self._user_key(name)),
                   self.addresses.wait(self._address_key(address)))

    def failed(self, name: str, address: str) -> float:
        return max(self.users.failed(self._user_key(name)),
                   self.addresses.failed(self._address_key(address)))

    def succeeded(self, name: str) -> None:
        self.users.succeeded(self._user_key(name))
