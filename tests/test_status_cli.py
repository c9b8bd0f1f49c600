"""`fiona status`: the Status page's facts on the terminal, and an exit code for monitoring
(0 all well; 1 when a daemon is down, the disk is at the refuse watermark, requests failed or
the control plane cannot be reached)."""

from __future__ import annotations

import json
import os
from collections import namedtuple

from fiona import status
from fiona.config import load
from fiona.control.base import TransferRequest
from fiona.control.local import LocalControlPlane
from helpers import Gateway, free_port, wait_for

DAEMONS = ("storescp", "process-single-file", "detect-study-arrival", "anonymize-and-send",
           "web", "export-worker")
Usage = namedtuple("Usage", "total used free")


def a_request(study: str, **outcome) -> TransferRequest:
    req = TransferRequest(study, "PROJ", "P0001", "baseline", "2026-05-01 10:00:00")
    req.__dict__.update(outcome)
    return req


def record(cp: LocalControlPlane, study: str, **outcome) -> None:
    """Store a request and write an outcome on it, as the forwarder does."""
    stored = cp.add_request(a_request(study))
    stored.__dict__.update(outcome)
    cp.update_request(stored)


def test_request_states():
    assert status.request_state(a_request("1")) == status.PENDING
    assert status.request_state(a_request("1", error_message="held: project PROJ is "
                                          "inactive")) == status.HELD
    assert status.request_state(a_request("1", done_revision=1, complete=True)) == \
        status.DELIVERED
    # pixel masking done (flag 3) is a delivered request, not an error
    assert status.request_state(a_request("1", done_revision=1, complete=True,
                                          error_flags={3})) == status.DELIVERED
    assert status.request_state(a_request("1", done_revision=1, error_flags={2},
                                          error_message="send: refused")) == status.FAILED
    assert status.request_state(a_request("1", revision=2, done_revision=1,
                                          complete=False)) == status.PENDING


def test_attention_from_the_facts(tmp_path):
    gw = Gateway(tmp_path / "data", free_port())
    config = load(str(gw.config))
    site = config.site(None)
    cp = LocalControlPlane(gw.datadir / "site" / "fiona.db")
    record(cp, "1.2.3", done_revision=1, complete=True,
                                               error_flags={3})
    quiet = Usage(100, 50, 50)
    facts = status.gather(config, site, cp, admin=True, usage=lambda _p: quiet)
    assert facts["queues"]["requests_failed"] == 0
    assert status.attention(facts) == [f"daemon {d} is not running" for d in DAEMONS]
    full = status.gather(config, site, cp, admin=True, usage=lambda _p: Usage(100, 96, 4))
    assert full["disk"]["state"] == "refusing"
    assert any("refuse watermark" in line for line in status.attention(full))
    record(cp, "1.2.4", done_revision=1,
                                               error_message="send: refused")
    failing = status.gather(config, site, cp, admin=True, usage=lambda _p: quiet)
    assert "1 transfer request(s) failed" in status.attention(failing)
    assert "last_error" not in status.gather(config, site, cp, admin=False,
                                             usage=lambda _p: quiet)["daemons"][0]


def test_exit_codes_with_the_daemons_running_and_stopped(tmp_path):
    gw = Gateway(tmp_path / "data", free_port(), {"WEB": {"port": free_port()}})
    res = gw.run("status", check=False)
    assert res.returncode == 1 and "daemon storescp is not running" in res.stdout
    # a stale pid file of a dead process is not a running daemon
    (gw.tree.run / "storescpd.pid").write_text(f"{os.getpid() + 100000}\n")
    facts = json.loads(gw.run("status", "--json", check=False).stdout)
    assert not next(d for d in facts["daemons"] if d["name"] == "storescp")["running"]
    (gw.tree.run / "storescpd.pid").unlink()

    for daemon in DAEMONS:
        gw.start(daemon)
    wait_for(lambda: gw.run("status", check=False).returncode == 0, 60,
             "every daemon to hold its pid lock")
    res = gw.run("status", "--json")
    facts = json.loads(res.stdout)
    assert facts["attention"] == [] and all(d["running"] for d in facts["daemons"])
    assert set(facts) >= {"daemons", "queues", "disk", "quarantine", "switches"}
    assert "attention: none, all is well" in gw.run("status").stdout

    cp = LocalControlPlane(gw.datadir / "site" / "fiona.db")
    record(cp, "1.2.3", done_revision=1,
                                               error_message="send: refused")
    res = gw.run("status", check=False)
    assert res.returncode == 1 and "1 transfer request(s) failed" in res.stdout
    gw.stop("anonymize-and-send")
    res = gw.run("status", "--json", check=False)
    assert res.returncode == 1
    assert "daemon anonymize-and-send is not running" in json.loads(res.stdout)["attention"]


def test_quarantine_counts_per_stage(tmp_path):
    gw = Gateway(tmp_path / "data", free_port())
    for stage, n in (("receive", 2), ("deidentify", 1)):
        for i in range(n):
            (gw.tree.quarantine / stage / f"2026-{i}").mkdir(parents=True)
    facts = json.loads(gw.run("status", "--json", check=False).stdout)
    assert facts["quarantine"] == {"deidentify": 1, "receive": 2}


def test_unreachable_control_plane_needs_attention(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"Incoming": "A" * 32, "DataTransferProjects": "E" * 32}))
    tokens.chmod(0o600)
    gw = Gateway(tmp_path / "data", free_port(), {"CONTROL_PLANE": {
        "type": "redcap", "url": f"http://127.0.0.1:{free_port()}/api/",
        "tokens": str(tokens)}})
    res = gw.run("status", "--json", check=False)
    assert res.returncode == 1
    assert any(line.startswith("control plane unreachable")
               for line in json.loads(res.stdout)["attention"])
