"""The `local` control plane: SQLite in `DATADIR/site/fiona.db`.

For a single machine and for tests. The statements are `fiona.control.sql`'s, shared with
PostgreSQL; this module adds the connection, the schema upgrade of older databases and the
transactions. WAL mode lets the daemons and the command line use the database at once; a write
transaction takes the write lock at once (`BEGIN IMMEDIATE`), so writers are serialized and no
lock upgrade deadlocks between daemons.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from ..tree import FILE_MODE
from .base import ControlPlaneError
from .sql import SCHEMA, SqlControlPlane

#: columns added since the first schema: (table, column, definition, statement run once after)
UPGRADES = (
    ("requests", "revision", "INTEGER NOT NULL DEFAULT 1", ""),
    # an old request is done if it was transferred at or after it was last requested (the
    # rule the revisions replace)
    ("requests", "done_revision", "INTEGER NOT NULL DEFAULT 0",
     "UPDATE requests SET done_revision = 1 WHERE transferred != '' AND requested <= transferred"),
    ("requests", "claimed_by", "TEXT NOT NULL DEFAULT ''", ""),
    ("requests", "claimed_until", "REAL NOT NULL DEFAULT 0", ""),
    # studies and inventory lines from before nodes have none: every node's (`takes`)
    ("studies", "node", "TEXT NOT NULL DEFAULT ''", ""),
    ("inventory", "node", "TEXT NOT NULL DEFAULT ''", ""),
)


class LocalControlPlane(SqlControlPlane):
    kind = "local"

    def __init__(self, path: Path, clock: Clock = SYSTEM_CLOCK, holder: str = ""):
        super().__init__(clock, holder)
        self.path = path
        self._local = threading.local()
        db = self._db()
        self._migrate()  # before the schema's indexes, which may name an added column
        db.executescript(SCHEMA.format(id="INTEGER PRIMARY KEY AUTOINCREMENT", float="REAL"))
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

    def _read(self) -> sqlite3.Connection:
        return self._db()

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

    def _duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _migrate(self) -> None:
        """Bring a database made by an older FIONA up to SCHEMA by adding the UPGRADES'
        columns it lacks, each once, also when several processes start at once."""
        def missing(db: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
            have = {(t, r["name"]) for t in {u[0] for u in UPGRADES}
                    for r in db.execute(f"PRAGMA table_info({t})")}
            tables = {t for t, _ in have}  # a table not there yet is made whole by SCHEMA
            return [u for u in UPGRADES if u[0] in tables and (u[0], u[1]) not in have]

        if not missing(self._db()):
            return
        with self._tx() as db:  # missing again: another process may have done some
            for table, column, definition, after in missing(db):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if after:
                    db.execute(after)

    def test_connection(self) -> None:
        try:
            self._db().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"cannot use {self.path}: {exc}") from None
