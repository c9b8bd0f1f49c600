"""A real PostgreSQL on loopback for the tests: Debian's `postgresql` binaries
(`/usr/lib/postgresql/*/bin`), `initdb` and `pg_ctl` as an unprivileged user (initdb refuses
root) in a temporary folder of its own, fsync off. One server per test session; each test
gets a fresh database (`Postgres.database`)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from helpers import free_port
from procs import session_wide

USER = "nobody"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is missing: install the Debian package "
                           f"`postgresql` (make test does)")
    return found[-1]


def _as_user(*argv: str) -> list[str]:
    return ["runuser", "-u", USER, "--", *argv] if os.geteuid() == 0 else list(argv)


class Postgres:
    """A running server: `dsn(dbname)` connects as the superuser `postgres` (trust on
    loopback)."""

    def __init__(self) -> None:
        # its own folder in /tmp, whatever TMPDIR says: the unprivileged user must reach
        # it (pytest's folders are 0700 root) and the socket path must stay short
        self.root = Path(tempfile.mkdtemp(prefix="fiona-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            shutil.chown(self.root, USER)
        subprocess.run(_as_user(_bin("initdb"), "-U", "postgres", "--auth=trust", "--no-sync",
                                "-D", str(self.data)), check=True, capture_output=True)
        subprocess.run(_as_user(_bin("pg_ctl"), "-w", "-D", str(self.data), "-l",
                                str(self.root / "log"), "start", "-o",
                                f"-c listen_addresses=127.0.0.1 -p {self.port} "
                                f"-k {self.root} -c fsync=off -c max_connections=200"),
                       check=True, capture_output=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres"

    def database(self) -> str:
        """A new, empty database; returns its dsn."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        subprocess.run(_as_user(_bin("pg_ctl"), "-m", "fast", "-w", "-D", str(self.data),
                                "stop"), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_server() -> Iterator[Postgres]:
    """For a session-scoped fixture: the server, stopped at the end also when a test fails
    (started `session_wide`, so the first test that needs it does not stop it)."""
    with session_wide():
        server = Postgres()
    try:
        yield server
    finally:
        server.stop()
