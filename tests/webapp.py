"""An in-process FIONA web site for page tests: a real data tree (conftest's Gateway, no
daemons), projects A and B, users admin, alice (A: assign, review) and bob (B: assign), and
Starlette's TestClient on `create_app` with a FakeClock. For tests/test_web_ui.py and
tests/test_web_admin.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

from fiona.clock import FakeClock
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import Project, Series, Study, TransferRequest, now_iso
from fiona.web.app import create_app
from fiona.web.users import UserStore
from helpers import Gateway, free_port

PASSWORD = "correct horse battery"


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client: TestClient, user: str, password: str = PASSWORD):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": user, "password": password,
                                       "csrf_token": token})


class WebSite:
    def __init__(self, tmp: Path):
        self.gw = Gateway(tmp / "data", free_port())
        self.config = load(str(self.gw.config))
        self.control = open_control_plane(self.config)
        self.control.save_project(Project("A", naming=r"^A[0-9]{3}$",
                                          events=["baseline", "followup"]))
        self.control.save_project(Project("B", naming=r"^B[0-9]{3}$", events=["baseline"]))
        self.users = UserStore(self.gw.datadir)
        self.users.add("admin", PASSWORD, ["admin"])
        self.users.add("alice", PASSWORD, ["project:A:assign", "project:A:review"])
        self.users.add("bob", PASSWORD, ["project:B:assign"])
        self.clock = FakeClock()
        self.app = create_app(self.config, clock=self.clock)
        self._n = 0

    def client(self, user: str | None = None, password: str = PASSWORD) -> TestClient:
        c = TestClient(self.app, follow_redirects=False)
        if user:
            r = login(c, user, password)
            assert r.status_code == 303, r.text
        return c

    def study(self, accession: str = "ACC1", description: str = "MR Head",
              date: str = "20260314", arrival: str = "", sender: str = "STORESCU") -> str:
        """A study registered in the control plane (no files: list and study pages only)."""
        self._n += 1
        uid = f"1.2.826.0.1.3680043.10.1234.{self._n}"
        self.control.register_study(Study(
            uid, description=description, date=date, time="101500", accession=accession,
            arrival=arrival or now_iso(), calling_ae=sender,
            series=[Series(uid=f"{uid}.1", description="t1", num_files=3, modality="MR")]))
        return uid

    def request(self, uid: str, project: str, participant: str) -> TransferRequest:
        req = TransferRequest(uid, project, participant, "baseline", now_iso())
        self.control.add_request(req)
        return next(r for r in self.control.requests(uid) if r.project == project)

    def audit(self, action: str | None = None) -> list[dict]:
        path = self.gw.datadir / "logs" / "audit.log"
        entries = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [e for e in entries if action is None or e["action"] == action]
