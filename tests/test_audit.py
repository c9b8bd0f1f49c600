"""`fiona audit verify`: the keyed chain of DATADIR/logs/audit.log holds after a real run and
breaks, naming the line, after a line is edited, deleted, cut off the end, or rewritten with
recomputed hashes; every logged field is capped."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fiona import audit
from helpers import Gateway, free_port


def _secret(datadir: Path) -> None:
    key = datadir / "config" / "secret.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("k" * 64 + "\n")
    key.chmod(0o600)


@pytest.fixture
def datadir(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    _secret(d)
    for i in range(5):
        audit.append(d, "alice", "assign", {"n": i})
    assert audit.verify(d) == (5, None)
    return d


def _lines(datadir: Path) -> list[str]:
    return audit.audit_path(datadir).read_text().splitlines()


def _write(datadir: Path, lines: list[str]) -> None:
    audit.audit_path(datadir).write_text("".join(x + "\n" for x in lines))


def test_verify_passes_then_names_the_edited_line(tmp_path: Path):
    gw = Gateway(tmp_path / "data", free_port())
    pw = tmp_path / "pw"
    pw.write_text("a long password\n")
    gw.run("user", "add", "alice", "--role", "project:A:assign", "--password-file", str(pw))
    gw.run("user", "add", "root", "--role", "admin", "--password-file", str(pw))
    for i in range(3):
        audit.append(gw.datadir, "alice", "assign", {"n": i})
    log = gw.datadir / "logs" / "audit.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    head = audit.head_path(gw.datadir)
    assert stat.S_IMODE(head.stat().st_mode) == 0o600
    assert json.loads(head.read_text())["n"] == 5
    res = gw.run("audit", "verify")
    assert "OK, 5 entries" in res.stdout
    lines = log.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["user"] = "mallory"
    lines[2] = json.dumps(entry, separators=(",", ":"))
    log.write_text("\n".join(lines) + "\n")
    res = gw.run("audit", "verify", check=False)
    assert res.returncode == 1
    assert "line 3 was changed" in res.stderr


def test_deleted_last_line_is_detected(datadir: Path):
    _write(datadir, _lines(datadir)[:-1])
    count, problem = audit.verify(datadir)
    assert problem and "cut off the end" in problem and count == 4


def test_edited_last_line_is_detected(datadir: Path):
    lines = _lines(datadir)
    lines[-1] = lines[-1].replace('"n":4}', '"n":40}')
    assert '"n":40}' in lines[-1]
    _write(datadir, lines)
    count, problem = audit.verify(datadir)
    assert count == 5 and problem.startswith("line 5 was changed after it was written")


def test_deleted_middle_line_is_detected(datadir: Path):
    lines = _lines(datadir)
    _write(datadir, lines[:2] + lines[3:])
    count, problem = audit.verify(datadir)
    assert count == 3 and "chain broken" in problem


def test_rewrite_with_recomputed_hashes_is_detected(datadir: Path):
    """The old chain's recipe (SHA-256 of the line before) cannot forge a line without the key,
    nor can rewriting the whole log and its anchor with a guessed key."""
    lines = _lines(datadir)
    rewritten, prev = [], audit.GENESIS
    for number, raw in enumerate(lines, start=1):
        entry = json.loads(raw)
        entry.pop("mac")
        entry["prev"] = prev
        if number == 3:
            entry["user"] = "mallory"
        body = json.dumps(entry, separators=(",", ":")).encode()
        mac = hashlib.sha256(body[:-1]).hexdigest()
        rewritten.append((body[:-1] + b',"mac":"' + mac.encode() + b'"}').decode())
        prev = mac
    _write(datadir, rewritten)
    audit.head_path(datadir).write_text(json.dumps({"n": 5, "mac": prev}))
    assert audit.verify(datadir)[0] == 1


def test_truncation_to_an_earlier_state_with_its_anchor_needs_the_anchor(datadir: Path):
    """Cutting the log back is caught by the anchor; deleting the anchor is reported too."""
    _write(datadir, _lines(datadir)[:3])
    assert "cut off the end" in audit.verify(datadir)[1]
    audit.head_path(datadir).unlink()
    assert "no head anchor" in audit.verify(datadir)[1]


def test_deleted_log_is_detected(datadir: Path):
    audit.audit_path(datadir).unlink()
    assert "the log is gone" in audit.verify(datadir)[1]


def test_every_field_is_capped(datadir: Path):
    before = audit.audit_path(datadir).stat().st_size
    entry = audit.append(datadir, "x" * 1_000_000, "login failed",
                         {"address": "y" * 1_000_000, "many": list(range(10_000)),
                          "nested": {"k" * 5000: {"a": {"b": {"c": {"d": "z" * 5000}}}}}})
    grown = audit.audit_path(datadir).stat().st_size - before
    assert grown < 5000
    assert entry["user"].startswith("x" * audit.MAX_TEXT) and "+999744 chars" in entry["user"]
    assert len(entry["details"]["many"]) == audit.MAX_ITEMS + 1
    assert audit.verify(datadir) == (6, None)


def test_crash_between_append_and_anchor_update_still_verifies(datadir: Path):
    head = audit.head_path(datadir).read_text()
    audit.append(datadir, "alice", "assign", {"n": 5})
    audit.head_path(datadir).write_text(head)  # as if the process died before moving the head
    assert audit.verify(datadir) == (6, None)


def test_concurrent_appends_keep_the_chain(tmp_path: Path):
    datadir = tmp_path / "d"
    _secret(datadir)
    code = ("import sys; from fiona import audit\n"
            "for i in range(40): audit.append(sys.argv[1], 'p', 'x', {'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(datadir)],
                              cwd=Path(__file__).parent.parent) for _ in range(4)]
    threads = [threading.Thread(target=lambda: [audit.append(datadir, "t", "y") for _ in range(20)])
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.wait(60) == 0 for p in procs)
    assert audit.verify(datadir) == (200, None)
    os.truncate(audit.audit_path(datadir), 10)
    assert audit.verify(datadir)[0] == 1
