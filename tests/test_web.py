"""The web application (SPEC §9): login, roles, CSRF, Assign, coupling, Review, Status, audit.

Starlette's TestClient drives `fiona.web.app.create_app` on a real data tree (conftest's
Gateway); one test sends a study with DCMTK storescu through the running daemons."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from helpers import Gateway, free_port, wait_for
from dicomgen import make_study
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import Project, Series, Study, now_iso
from fiona.web.app import create_app
from fiona.web.users import UserStore

PASSWORD = "correct horse battery"


class Site:
    def __init__(self, gw: Gateway, tmp: Path):
        self.gw = gw
        self.config = load(str(gw.config))
        self.control = open_control_plane(self.config)
        self.control.save_project(Project("A", naming=r"^A[0-9]{3}$",
                                          events=["baseline", "followup"]))
        self.control.save_project(Project("B", naming=r"^B[0-9]{3}$", events=["baseline"]))
        users = UserStore(gw.datadir)
        users.add("admin", PASSWORD, ["admin"])
        users.add("alice", PASSWORD, ["project:A:assign", "project:A:review"])
        users.add("bob", PASSWORD, ["project:B:assign"])
        self.tmp = tmp

    def study(self, accession: str = "ACC1", seed: int = 0, arrival: str = "") -> dict:
        """A study registered directly, with its files linked under raw/."""
        made = make_study(self.tmp / f"src-{accession}", n_series=2, images_per_series=2,
                          accession=accession, seed=seed)
        series = []
        for i, s_uid in enumerate(made["series"]):
            folder = self.gw.tree.series_dir(made["study"], s_uid)
            folder.mkdir(parents=True, exist_ok=True)
            files = [f for f in made["files"] if pydicom.dcmread(f).SeriesInstanceUID == s_uid]
            for f in files:
                shutil.copy(f, folder / f.name)
            series.append(Series(uid=s_uid, description=f"series {i}", num_files=len(files),
                                 modality="MR", classify_types=["mr"]))
        self.control.register_study(Study(made["study"], description="MR Head", date="20260314",
                                          time="101500", accession=accession, arrival=arrival or now_iso(),
                                          calling_ae="STORESCU", series=series))
        return made

    def client(self, user: str | None = None) -> TestClient:
        client = TestClient(create_app(self.config), follow_redirects=False)
        if user:
            r = login(client, user, PASSWORD)
            assert r.status_code == 303, r.text
        return client

    def audit(self) -> list[dict]:
        path = self.gw.datadir / "logs" / "audit.log"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client: TestClient, user: str, password: str):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": user, "password": password,
                                       "csrf_token": token})


def token(client: TestClient) -> str:
    return client.get("/api/session").json()["csrf_token"]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(Gateway(tmp_path / "data", free_port()), tmp_path)


# --- security ---------------------------------------------------------------------------------
def test_nothing_works_without_login(site: Site):
    made = site.study()
    c = site.client()
    for page in ["/", "/assign", f"/assign/{made['study']}", "/coupling", "/review",
                 "/review/A", "/status", "/password"]:
        r = c.get(page)
        assert r.status_code == 303 and r.headers["location"] == "/login", page
    for api in ["/api/studies", f"/api/study/{made['study']}", "/api/projects",
                "/api/participants?project=A", "/api/requests", "/api/status", "/api/session",
                "/api/review/A", "/docs", "/openapi.json"]:
        assert c.get(api).status_code == 401, api
    for post in ["/api/assign", "/api/coupling", f"/assign/{made['study']}/send", "/coupling",
                 "/status/switch", "/api/status/switch"]:
        assert c.post(post, data={"x": "1"}).status_code == 401, post
    assert site.control.requests() == []


def test_project_roles_are_enforced(site: Site):
    made = site.study()
    bob = site.client("bob")
    t = token(bob)
    assert bob.get("/api/participants?project=A").status_code == 403
    assert bob.get("/api/studies?project=A").status_code == 403
    assert bob.get("/review/A").status_code == 403
    assert bob.get("/api/review/A").status_code == 403
    r = bob.post("/api/assign", json={"study_uid": made["study"], "project": "A",
                                      "participant": "A001", "event": "baseline"},
                 headers={"X-CSRF-Token": t})
    assert r.status_code == 403
    r = bob.post(f"/assign/{made['study']}/send", data={
        "project": "A", "participant": "A001", "event": "baseline", "csrf_token": t})
    assert r.status_code == 403
    assert site.control.requests() == []
    # the form offers only bob's projects
    page = bob.get(f"/assign/{made['study']}").text
    assert 'value="B"' in page and 'value="A"' not in page
    assert [p["name"] for p in bob.get("/api/projects").json()] == ["B"]
    # and alice sees A
    alice = site.client("alice")
    assert alice.get("/api/participants?project=A").status_code == 200
    assert alice.get("/review/A").status_code == 200
    assert alice.get("/api/participants?project=B").status_code == 403


def test_post_without_csrf_token_is_refused(site: Site):
    made = site.study()
    admin = site.client("admin")
    r = admin.post("/api/assign", json={"study_uid": made["study"], "project": "A",
                                        "participant": "A001", "event": "baseline"})
    assert r.status_code == 403
    r = admin.post(f"/assign/{made['study']}/send", data={
        "project": "A", "participant": "A001", "event": "baseline"})
    assert r.status_code == 403
    r = admin.post("/status/switch", data={"part": "receive", "value": "0",
                                           "csrf_token": "forged"})
    assert r.status_code == 403
    assert site.control.requests() == []
    assert (site.gw.datadir / "config" / "enabled").read_text().strip() == "111"
    # a login form without the token is refused too
    fresh = site.client()
    assert fresh.post("/login", data={"username": "admin", "password": PASSWORD}).status_code \
        == 403


@pytest.mark.parametrize("bad", ["..%2F..%2Fconfig%2Fsecret.key", "..%2Fx", "1.2.3%2F..%2F..",
                                 "1.2..3", "%2E%2E%2Fetc%2Fpasswd"])
def test_path_like_values_are_refused(site: Site, bad: str):
    admin = site.client("admin")
    key = (site.gw.datadir / "config" / "secret.key").read_text().strip()
    for url in (f"/assign/{bad}", f"/api/study/{bad}", f"/api/requests?study_uid={bad}"):
        r = admin.get(url)
        assert r.status_code in (400, 404), url
        assert key not in r.text
    assert admin.get("/review/..%2F..%2Fconfig").status_code in (400, 404)
    assert admin.get("/api/participants?project=../../etc").status_code == 404


def test_passwords_are_not_stored_in_clear(site: Site):
    path = site.gw.datadir / "config" / "users.json"
    text = path.read_text()
    assert PASSWORD not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(text)["users"]["alice"]["hash"].startswith("$2")


def test_login_failure_is_audited(site: Site):
    c = site.client()
    r = login(c, "alice", "wrong password")
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    assert c.get("/assign").status_code == 303
    assert login(c, "alice", PASSWORD).status_code == 303
    actions = [(e["user"], e["action"]) for e in site.audit()]
    assert ("alice", "login failed") in actions and ("alice", "login") in actions
    assert PASSWORD not in (site.gw.datadir / "logs" / "audit.log").read_text()


def test_remote_user(tmp_path: Path):
    gw = Gateway(tmp_path / "data", free_port(), {"WEB": {"host": "127.0.0.1", "port": 8080,
                                                          "auth": "remote-user",
                                                          "trusted_proxies": ["127.0.0.1"]}})
    UserStore(gw.datadir).add("carol", None, ["admin"])
    c = TestClient(create_app(load(str(gw.config))), follow_redirects=False,
                   client=("127.0.0.1", 50000))
    assert c.get("/api/status").status_code == 401
    assert c.get("/api/status", headers={"REMOTE_USER": "mallory"}).status_code == 401
    assert c.get("/api/status", headers={"REMOTE_USER": "carol"}).status_code == 200


# --- functional -------------------------------------------------------------------------------
def test_assign_flow_creates_one_request(site: Site):
    made = site.study(arrival="2026-11-01 10:00:00")
    other = site.study("ACC2", seed=1, arrival="2026-11-02 09:00:00")
    alice = site.client("alice")
    page = alice.get("/assign").text
    assert made["study"] in page and "ACC1" in page and "STORESCU" in page
    assert page.index(other["study"]) < page.index(made["study"])  # newest first
    assert made["study"] not in alice.get("/assign?q=ACC2").text
    study_page = alice.get(f"/assign/{made['study']}").text
    t = csrf_of(study_page)
    form = {"project": "A", "participant": "A042", "event": "followup", "csrf_token": t}
    confirm = alice.post(f"/assign/{made['study']}/confirm", data=form)
    assert confirm.status_code == 200, confirm.text
    assert 'id="confirm-button"' in confirm.text and "series 1" in confirm.text
    assert "Doe^Jane" in confirm.text and "A042" in confirm.text  # before and after
    assert site.control.requests() == []  # nothing before the confirmation
    done = alice.post(f"/assign/{made['study']}/send", data=form, follow_redirects=True)
    assert done.status_code == 200 and "created" in done.text
    again = alice.post(f"/assign/{made['study']}/send", data=form, follow_redirects=True)
    assert again.status_code == 200
    reqs = site.control.requests(made["study"])
    assert len(reqs) == 1 and reqs[0].key() == (made["study"], "A", "A042", "followup")
    history = alice.get(f"/assign/{made['study']}").text
    assert "A042" in history and "pending" in history
    assert "A042" in alice.get("/api/participants?project=A").json()
    actions = [e["action"] for e in site.audit()]
    assert actions.count("assign") == 1 and actions.count("new participant") == 1
    # a failed request is highlighted with its message; admins get a resend button
    req = reqs[0]
    req.error_flags = {2}
    req.error_message = "association refused by RESEARCHPACS"
    site.control.update_request(req)
    page = site.client("admin").get(f"/assign/{made['study']}").text
    assert 'class="request failed"' in page and "association refused" in page
    assert 'class="resend"' in page
    assert 'class="resend"' not in alice.get(f"/assign/{made['study']}").text


def test_assign_json(site: Site):
    made = site.study()
    alice = site.client("alice")
    r = alice.post("/api/assign", json={"study_uid": made["study"], "project": "A",
                                        "participant": "A001", "event": "baseline"},
                   headers={"X-CSRF-Token": token(alice)})
    assert r.status_code == 200 and r.json()["created"]
    assert [x["participant"] for x in alice.get(f"/api/requests?study_uid={made['study']}")
            .json()] == ["A001"]


def test_bad_participant_shows_the_regex(site: Site):
    made = site.study()
    alice = site.client("alice")
    t = csrf_of(alice.get(f"/assign/{made['study']}").text)
    r = alice.post(f"/assign/{made['study']}/confirm", data={
        "project": "A", "participant": "../x", "event": "baseline", "csrf_token": t})
    assert r.status_code == 400
    assert 'id="naming-rule"' in r.text and "^A[0-9]{3}$" in r.text
    r = alice.post("/api/assign", json={"study_uid": made["study"], "project": "A",
                                        "participant": "Z9", "event": "baseline"},
                   headers={"X-CSRF-Token": t})
    assert r.status_code == 400 and "^A[0-9]{3}$" in r.json()["detail"]
    assert site.control.requests() == []


def test_coupling_upload_reports_each_line(site: Site):
    made = site.study("ACC7")
    alice = site.client("alice")
    t = csrf_of(alice.get("/coupling").text)
    text = ("AccessionNumber,ProjectName,subjectid,eventname\n"
            "ACC7,A,A007,baseline\n"
            "ACC8,A,bad id,baseline\n"
            "ACC9,A,A009,baseline\n"
            "ACC9,A,A010,baseline\n")
    r = alice.post("/coupling", data={"csrf_token": t},
                   files={"file": ("list.csv", text.encode(), "text/csv")})
    assert r.status_code == 200, r.text
    rows = re.findall(r'<td>(\d+)</td><td class="status">([^<]+)</td>', r.text)
    assert rows == [("2", "accepted"), ("3", "bad participant ID"), ("4", "conflict"),
                    ("5", "conflict")]
    assert [x.participant for x in site.control.requests(made["study"])] == ["A007"]
    assert any(e["action"] == "coupling upload" for e in site.audit())
    # bob may not upload rows for project A
    bob = site.client("bob")
    r = bob.post("/api/coupling", json={"csv": "ACC5,A,A005,baseline\n"},
                 headers={"X-CSRF-Token": token(bob)})
    assert r.status_code == 403


def test_status_page_and_switch(site: Site):
    site.study()
    admin = site.client("admin")
    page = admin.get("/status").text
    for name in ("storescp", "process-single-file", "detect-study-arrival",
                 "anonymize-and-send", "web"):
        assert f'data-name="{name}"' in page
    assert 'id="studies-waiting">1<' in page
    assert 'id="switch-receive"' in page
    r = admin.post("/status/switch", data={"part": "receive", "value": "0",
                                           "csrf_token": csrf_of(page)})
    assert r.status_code == 303
    assert (site.gw.datadir / "config" / "enabled").read_text().strip() == "011"
    entry = site.audit()[-1]
    assert entry["action"] == "switch" and entry["user"] == "admin"
    assert entry["details"] == {"part": "receive", "before": "1", "after": "0"}
    # others see the switches but cannot flip them
    alice = site.client("alice")
    assert 'id="switch-receive"' not in alice.get("/status").text
    r = alice.post("/api/status/switch", json={"part": "receive", "enabled": True},
                   headers={"X-CSRF-Token": token(alice)})
    assert r.status_code == 403
    assert admin.get("/api/status").json()["switches"][0] == {"part": "receive",
                                                              "enabled": False}


def test_review_lists_tags_of_the_output(site: Site):
    made = site.study()
    req = site.control.add_request  # a request whose output is in the research folder
    from fiona.control.base import TransferRequest
    r = req(TransferRequest(made["study"], "A", "A001", "baseline", requested=now_iso()))
    mapped = "2.25.12345"
    out = Path(site.config.destinations["research"]["path"]) / mapped / "2.25.6"
    out.mkdir(parents=True)
    for i, f in enumerate(made["files"][:2]):
        ds = pydicom.dcmread(f)
        ds.PatientName = "A001"
        ds.PatientID = "A001"
        ds.save_as(out / f"2.25.{i + 7}.dcm")
    r.mapped_uid, r.transferred = mapped, now_iso()
    site.control.update_request(r)
    alice = site.client("alice")
    data = alice.get("/api/review/A").json()
    assert data["files"] == 2
    by_name = {t["name"]: t for t in data["tags"]}
    assert by_name["Patient ID"]["values"] == [{"value": "A001", "count": 2}]
    assert "A001" in alice.get("/review/A").text


def test_study_sent_with_storescu_appears_in_assign(tmp_path: Path):
    gw = Gateway(tmp_path / "data", free_port(), {"STUDY_QUIET_SECONDS": 1})
    try:
        site = Site(gw, tmp_path)
        made = make_study(tmp_path / "sent", n_series=1, images_per_series=3,
                          accession="ACCSCU")
        for daemon in ("storescp", "process-single-file", "detect-study-arrival"):
            gw.start(daemon)
        assert gw.storescu(*made["files"]).returncode == 0
        wait_for(lambda: site.control.study(made["study"]), 90, "the study to arrive")
        alice = site.client("alice")
        assert "ACCSCU" in alice.get("/assign").text
        form = {"project": "A", "participant": "A100", "event": "baseline",
                "csrf_token": csrf_of(alice.get(f"/assign/{made['study']}").text)}
        confirm = alice.post(f"/assign/{made['study']}/confirm", data=form)
        assert "preview-error" not in confirm.text and "Doe^Jane" in confirm.text
        gw.start("anonymize-and-send")
        alice.post(f"/assign/{made['study']}/send", data=form, follow_redirects=True)
        assert len(site.control.requests(made["study"])) == 1
        wait_for(lambda: not site.control.requests(made["study"])[0].pending, 120,
                 "the request to be forwarded")
        page = alice.get(f"/assign/{made['study']}").text
        assert 'class="request complete"' in page
        review = alice.get("/api/review/A").json()
        assert review["files"] == 3
        names = {t["name"]: t for t in review["tags"]}
        assert names["Patient's Name"]["values"] == [{"value": "A100", "count": 3}]
        assert "Doe^Jane" not in alice.get("/review/A").text
    finally:
        gw.stop_all()


def test_first_start_admin_has_a_one_time_password(tmp_path: Path):
    """`fiona web` on a tree without users creates `admin`, prints its password once, serves
    the login page, and the admin must choose a new password first."""
    import subprocess
    import urllib.request

    gw = Gateway(tmp_path / "data", free_port())
    port = free_port()
    proc = subprocess.Popen(gw.command("web", "--port", str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        password = re.search(r"one-time password: (\S+)", first).group(1)

        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=1).status
            except OSError:
                return None
        wait_for(up, 30, "fiona web to serve /login")
        assert (gw.tree.run / "web.pid").exists()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert not (gw.tree.run / "web.pid").exists()
    assert password not in (gw.datadir / "config" / "users.json").read_text()
    c = TestClient(create_app(load(str(gw.config))), follow_redirects=False)
    r = login(c, "admin", password)
    assert r.headers["location"] == "/password"
    assert c.get("/status").headers["location"] == "/password"
    t = csrf_of(c.get("/password").text)
    r = c.post("/password", data={"current": password, "password": "a new password",
                                  "password2": "a new password", "csrf_token": t})
    assert r.status_code == 303
    assert c.get("/status").status_code == 200
    assert login(TestClient(create_app(load(str(gw.config))), follow_redirects=False),
                 "admin", password).status_code == 401
