"""The service layer (`fiona.actions`): the `fiona` command and the web pages take each action
through it, so both make the same request, the same audit line (the CLI's naming the OS user)
and wake the forwarder; refusals leave nothing behind."""

from __future__ import annotations

import getpass
import json
import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from fiona.actions import Actions, Forbidden, NotFound
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import Project, Study, now_iso
from fiona.suite import FORWARDER
from fiona.web.app import create_app
from fiona.web.users import UserStore
from helpers import Gateway, free_port

PASSWORD = "correct horse battery"
OS_USER = f"os:{getpass.getuser()}"


class Site:
    def __init__(self, tmp: Path):
        self.gw = Gateway(tmp / "data", free_port())
        self.config = load(str(self.gw.config))
        self.control = open_control_plane(self.config)
        self.control.save_project(Project("A", naming=r"^A[0-9]{3}$", events=["baseline"]))
        self.users = UserStore(self.gw.datadir)
        self.users.add("alice", PASSWORD, ["project:A:assign"])
        self.users.add("bob", PASSWORD, ["project:B:assign"])
        self.control.save_project(Project("B", naming=r"^B[0-9]{3}$", events=["baseline"]))

    def study(self, accession: str) -> str:
        uid = generate_uid()
        self.control.register_study(Study(uid, accession=accession, arrival=now_iso()))
        return uid

    def audit(self) -> list[dict]:
        path = self.gw.datadir / "logs" / "audit.log"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def web(self, user: str) -> tuple[TestClient, str]:
        client = TestClient(create_app(self.config), follow_redirects=False)
        login = client.get("/login").text
        form_token = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
        r = client.post("/login", data={"username": user, "password": PASSWORD,
                                        "csrf_token": form_token})
        assert r.status_code == 303, r.text
        return client, client.get("/api/session").json()["csrf_token"]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
def forwarder_pipe(site: Site):
    """The forwarder's wake-up pipe with a reader, as the running forwarder holds it."""
    path = FORWARDER.pipe_path(site.config.site(None))
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    yield lambda: os.read(fd, 4096)
    os.close(fd)


def _normal(entry: dict, study: str, participant: str) -> dict:
    """An audit entry without its stamps, study and participant: what must be equal between
    the CLI's and the web's line for the same action."""
    text = json.dumps({k: v for k, v in entry.items()
                       if k not in ("n", "time", "prev", "mac", "user")})
    out = json.loads(text.replace(study, "STUDY").replace(participant, "PARTICIPANT"))
    out["details"].pop("instance", None)
    return out


def test_cli_and_web_make_the_same_request_and_audit_lines(site: Site, forwarder_pipe):
    by_cli, by_web = site.study("ACC1"), site.study("ACC2")
    site.gw.run("assign", by_cli, "--project", "A", "--participant", "A001", "--event",
                "baseline")
    assert forwarder_pipe() == b"requests\n"
    cli_lines = site.audit()
    client, token = site.web("alice")
    r = client.post("/api/assign", json={"study_uid": by_web, "project": "A",
                                         "participant": "A002", "event": "baseline"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["created"]
    assert forwarder_pipe() == b"requests\n"
    web_lines = [e for e in site.audit()[len(cli_lines):] if e["action"] != "login"]
    assert [e["user"] for e in cli_lines] == [OS_USER, OS_USER]
    assert [e["user"] for e in web_lines] == ["alice", "alice"]
    assert [e["action"] for e in cli_lines] == ["new participant", "assign"]
    assert [_normal(e, by_cli, "A001") for e in cli_lines] == \
        [_normal(e, by_web, "A002") for e in web_lines]
    [cli_req], [web_req] = site.control.requests(by_cli), site.control.requests(by_web)
    assert cli_req.source == web_req.source == "assign"
    assert (cli_req.project, cli_req.event, cli_req.pending) == \
        (web_req.project, web_req.event, web_req.pending)
    # the same refusal on both sides, and no audit line for it
    before = len(site.audit())
    res = site.gw.run("assign", by_cli, "--project", "A", "--participant", "A003", "--event",
                      "baseline", check=False)
    assert res.returncode == 1 and "participant A001" in res.stderr
    r = client.post("/api/assign", json={"study_uid": by_web, "project": "A",
                                         "participant": "A003", "event": "baseline"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and "participant A002" in r.json()["detail"]
    assert len(site.audit()) == before


def test_cli_coupling_upload_audits_the_upload_and_each_request(site: Site, tmp_path: Path,
                                                                forwarder_pipe):
    uid = site.study("ACC7")
    csv = tmp_path / "list.csv"
    csv.write_text("AccessionNumber,ProjectName,subjectid,eventname\nACC7,A,A007,baseline\n"
                   "ACC8,A,A008,baseline\n")
    res = site.gw.run("coupling", "upload", str(csv))
    assert "2 row(s) accepted, 1 request(s) made" in res.stdout
    assert forwarder_pipe() == b"requests\n"
    lines = site.audit()
    assert [(e["user"], e["action"]) for e in lines] == [(OS_USER, "coupling upload"),
                                                         (OS_USER, "coupling request")]
    assert lines[0]["details"] == {"file": "list.csv", "accepted": 2, "lines": 2, "requests": 1}
    assert lines[1]["details"]["study_uid"] == uid and lines[1]["details"]["participant"] == "A007"


def test_cli_switch_resend_and_move_are_audited_under_the_os_user(site: Site):
    uid = site.study("ACC9")
    site.gw.run("switch", "receive", "off")
    assert (site.gw.datadir / "config" / "enabled").read_text().strip() == "011"
    assert "already" in site.gw.run("switch", "receive", "off").stdout
    site.gw.run("assign", uid, "--project", "A", "--participant", "A001", "--event", "baseline")
    assert "0 request(s) of A" in site.gw.run("resend", "--project", "A", "--study", uid).stdout
    site.gw.run("move", uid, "--project", "A", "--participant", "A002")
    assert [r.participant for r in site.control.requests(uid)] == ["A002"]
    entries = [e for e in site.audit() if e["action"] in ("switch", "resend", "move")]
    assert [(e["user"], e["action"]) for e in entries] == [
        (OS_USER, "switch"), (OS_USER, "switch"), (OS_USER, "resend"), (OS_USER, "move")]
    assert entries[0]["details"] == {"part": "receive", "before": "1", "after": "0"}
    assert entries[2]["details"] == {"study_uid": uid, "project": "A", "requests": 0}
    assert entries[3]["details"]["before"] == ["A001/baseline"]
    res = site.gw.run("move", "1.2.3", "--project", "A", "--participant", "A002", check=False)
    assert res.returncode == 1 and "no study 1.2.3" in res.stderr


def test_actions_refuse_without_the_role_and_leave_nothing(site: Site):
    uid = site.study("ACC5")
    acts = Actions.open(site.config)
    alice, bob = site.users.get("alice"), site.users.get("bob")
    acts.assign(alice, uid, "A", "A005", "baseline")
    before = site.audit()
    with pytest.raises(NotFound):   # requested for A: bob (project B) may not even see it
        acts.assign(bob, uid, "B", "B005", "baseline")
    with pytest.raises(Forbidden):
        acts.assign(alice, uid, "B", "B005", "baseline")
    with pytest.raises(NotFound):
        acts.assign(alice, uid, "Z", "Z005", "baseline")
    with pytest.raises(Forbidden):
        acts.resend(alice, "A", uid)
    with pytest.raises(Forbidden):
        acts.move(alice, uid, "A", "A006")
    with pytest.raises(Forbidden):
        acts.set_switch(alice, "receive", False)
    with pytest.raises(Forbidden):
        acts.upload_coupling(bob, "ACC5,A,A009,baseline\n")
    assert site.audit() == before
    assert [(r.project, r.participant) for r in site.control.requests(uid)] == [("A", "A005")]
    assert site.control.coupling_rows() == []
    assert (site.gw.datadir / "config" / "enabled").read_text().strip() == "111"
