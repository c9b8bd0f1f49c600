"""The audit trail: `DATADIR/logs/audit.log`, JSON lines chained by the SHA-256 of the line before.

Each line is `{"time", "user", "action", "details", "prev"}`; `prev` is the hex SHA-256 of the
previous line's bytes (without its newline), 64 zeros for the first. Appends take an exclusive
`fcntl` lock on the file, so several processes (web workers, CLI jobs) can write safely.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MODE = 0o640


def audit_path(datadir: Path) -> Path:
    return Path(datadir) / "logs" / "audit.log"


def _last_line(fd: int) -> bytes:
    size = os.lseek(fd, 0, os.SEEK_END)
    chunk, pos, data = 4096, size, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        lines = data.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            return lines[-1]
    return b""


def append(datadir: Path, user: str, action: str, details: dict[str, Any] | None = None) -> dict:
    """Append one entry and return it."""
    path = audit_path(datadir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, MODE)
    try:
        os.fchmod(fd, MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "user": user or "", "action": action, "details": details or {},
                 "prev": hashlib.sha256(last).hexdigest() if last else GENESIS}
        line = json.dumps(entry, sort_keys=False, separators=(",", ":")) + "\n"
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return entry


def verify(path: Path) -> tuple[int, str | None]:
    """(number of entries, None) when the chain holds, else (line number, message) for the
    first line whose `prev` does not match (or that is not a JSON entry)."""
    prev = GENESIS
    count = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.rstrip(b"\n")
            try:
                entry = json.loads(line)
                recorded = entry["prev"]
            except (ValueError, KeyError, TypeError):
                return number, f"line {number} is not an audit entry (edited or truncated)"
            if recorded != prev:
                what = ("the chain must start with 64 zeros" if number == 1 else
                        f"line {number - 1} was changed after it was written, or line {number} was")
                return number, (f"line {number}: chain broken: its prev {recorded[:16]}... does "
                                f"not match the hash of the line before ({what})")
            prev = hashlib.sha256(line).hexdigest()
            count = number
    return count, None
