"""`fiona audit verify`: the hash chain of DATADIR/logs/audit.log holds after a real run and
breaks, naming the line, after one line is edited."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

from helpers import Gateway, free_port
from fiona.web import audit


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
    res = gw.run("audit", "verify")
    assert "OK, 5 entries" in res.stdout
    lines = log.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["user"] = "mallory"
    lines[2] = json.dumps(entry, separators=(",", ":"))
    log.write_text("\n".join(lines) + "\n")
    res = gw.run("audit", "verify", check=False)
    assert res.returncode == 1
    assert "line 4" in res.stderr and "line 3 was changed" in res.stderr


def test_concurrent_appends_keep_the_chain(tmp_path: Path):
    datadir = tmp_path / "d"
    code = ("import sys; from fiona.web import audit\n"
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
    assert audit.verify(audit.audit_path(datadir)) == (200, None)
    os.truncate(audit.audit_path(datadir), 10)
    assert audit.verify(audit.audit_path(datadir))[0] == 1
