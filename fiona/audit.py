"""The audit trail: `DATADIR/logs/audit.log`, JSON lines in a keyed chain, with its head anchored
apart from the log.

Each line is `{"n", "time", "user", "action", "details", "prev", "mac"}`:
- `n` counts entries from 1;
- `prev` is the previous line's `mac` (64 zeros for the first);
- `mac` is HMAC-SHA256, under a key derived from `DATADIR/config/secret.key`
  (HMAC(secret, "fiona-audit-v1")), of the line's bytes up to `,"mac":`.
Without the key, nobody can edit a line or recompute the chain after an edit. The head
(`n` and `mac` of the last line) is also written, atomically and 0600, to
`DATADIR/config/audit.head`, so that cutting lines off the end, or deleting the whole log, is
detected as well.

Appends take an exclusive `fcntl` lock on the log, so several processes (web workers, CLI jobs)
can write safely; the head is written under the same lock. Every logged field is capped
(`cap`), so an attacker-chosen value (a 1 MB user name at login) cannot grow the log.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import read_secret
from .tree import atomic_write

GENESIS = "0" * 64
MODE = 0o640
HEAD_MODE = 0o600
KEY_LABEL = b"fiona-audit-v1"
MAX_TEXT = 256          # characters of any one string value
MAX_ITEMS = 50          # items of any one list or dict
MAX_DEPTH = 4
_MAC = re.compile(rb'^(.*),"mac":"([0-9a-f]{64})"\}$', re.S)


class AuditError(Exception):
    """The audit trail cannot be written (no key); the text says why."""


def audit_path(datadir: Path) -> Path:
    return Path(datadir) / "logs" / "audit.log"


def head_path(datadir: Path) -> Path:
    """The anchor: kept in config/, apart from logs/ (which may be shipped or rotated)."""
    return Path(datadir) / "config" / "audit.head"


def audit_key(datadir: Path) -> bytes:
    """The chain's key, derived from the site secret so that no second secret must be kept."""
    secret = read_secret(Path(datadir) / "config" / "secret.key")
    return hmac.new(secret, KEY_LABEL, hashlib.sha256).digest()


def cap(value: Any, depth: int = 0) -> Any:
    """`value` with every string cut to MAX_TEXT characters and every list or dict to MAX_ITEMS
    items (each cut says how much it left out); other types become strings."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else \
            value[:MAX_TEXT] + f"…[+{len(value) - MAX_TEXT} chars]"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= MAX_DEPTH:
        return cap(str(value), depth)
    if isinstance(value, dict):
        items = list(value.items())
        out = {cap(str(k), depth + 1): cap(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"+{len(items) - MAX_ITEMS} keys"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        out_list = [cap(v, depth + 1) for v in seq[:MAX_ITEMS]]
        if len(seq) > MAX_ITEMS:
            out_list.append(f"…[+{len(seq) - MAX_ITEMS} items]")
        return out_list
    return cap(str(value), depth)


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _seal(key: bytes, entry: dict) -> tuple[bytes, str]:
    """The line for `entry` (without newline), its JSON with `mac` added as the last field;
    and that MAC."""
    body = json.dumps(entry, separators=(",", ":"), ensure_ascii=True).encode()
    mac = _mac(key, body[:-1])
    return body[:-1] + b',"mac":"' + mac.encode() + b'"}', mac


def _open(line: bytes, key: bytes) -> dict | None:
    """The entry of a line whose MAC holds, else None."""
    m = _MAC.match(line)
    if m is None or not hmac.compare_digest(_mac(key, m.group(1)), m.group(2).decode()):
        return None
    try:
        entry = json.loads(m.group(1) + b"}")
    except ValueError:
        return None
    entry["mac"] = m.group(2).decode()
    return entry if isinstance(entry, dict) else None


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


def read_head(datadir: Path) -> dict | None:
    try:
        head = json.loads(head_path(datadir).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"n": -1, "mac": ""}
    return head if isinstance(head, dict) else {"n": -1, "mac": ""}


def append(datadir: Path, user: str, action: str, details: dict[str, Any] | None = None) -> dict:
    """Append one entry (fields capped) and move the head anchor; return the entry."""
    key = audit_key(datadir)
    path = audit_path(datadir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, MODE)
    try:
        os.fchmod(fd, MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        previous = _open(last, key) if last else None
        entry = {"n": int(previous["n"]) + 1 if previous else 1,
                 "time": datetime.now(UTC).isoformat(timespec="seconds"),
                 "user": cap(user or ""), "action": cap(action), "details": cap(details or {}),
                 "prev": previous["mac"] if previous else GENESIS}
        line, entry["mac"] = _seal(key, entry)
        os.write(fd, line + b"\n")
        os.fsync(fd)
        atomic_write(head_path(datadir), json.dumps({"n": entry["n"], "mac": entry["mac"]})
                     .encode() + b"\n", mode=HEAD_MODE)
    finally:
        os.close(fd)  # closing releases the lock
    return entry


def verify(datadir: Path) -> tuple[int, str | None]:
    """(number of entries, None) when the chain holds and ends where the head anchor says;
    else (line number, message) naming the first problem."""
    key = audit_key(datadir)
    head = read_head(datadir)
    anchored = head.get("n") if head else None
    path = audit_path(datadir)
    prev, count, mac_at_head = GENESIS, 0, None
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        if anchored:
            return 0, (f"the log is gone, but its head anchor {head_path(datadir)} records "
                       f"{anchored} entries")
        return 0, None
    with fh:
        for number, raw in enumerate(fh, start=1):
            entry = _open(raw.rstrip(b"\n"), key)
            if entry is None:
                return number, (f"line {number} was changed after it was written (its MAC does "
                                f"not match), or is not an audit entry")
            if entry.get("prev") != prev or entry.get("n") != number:
                return number, (f"line {number}: chain broken: lines before it were removed, "
                                f"inserted or reordered")
            prev, count = entry["mac"], number
            if number == anchored:
                mac_at_head = entry["mac"]
    if head is None:
        return count, (f"no head anchor {head_path(datadir)}: the end of the log cannot be "
                       f"checked")
    if not isinstance(anchored, int) or anchored < 0:
        return count, f"the head anchor {head_path(datadir)} is unreadable"
    if anchored > count:
        return count, (f"the log ends at entry {count}, but its head anchor records "
                       f"{anchored}: lines were cut off the end")
    # entries after the anchor can only come from a crash between append and anchor update
    # (every line's MAC holds, so they were written with the key)
    if anchored and not hmac.compare_digest(mac_at_head or "", str(head.get("mac", ""))):
        return anchored, (f"line {anchored} is not the entry the head anchor recorded: the "
                          f"log was rewritten")
    return count, None
