"""The web application (SPEC §9): login, roles, CSRF, Assign, coupling, Review, Status, audit.

Starlette's TestClient drives `fiona.web.app.create_app` on a real data tree (conftest's
Gateway); one test sends a study with DCMTK storescu through the running daemons."""

from __future__ import annotations

import html
import json
import re
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from dicomgen import make_study
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import Project, Series, Study, now_iso
from fiona.web.app import create_app
from fiona.web.users import UserStore
from helpers import Gateway, free_port, wait_for

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
                                          time="101500", accession=accession,
                                          arrival=arrival or now_iso(), calling_ae="STORESCU",
                                          series=series))
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


@pytest.mark.e2e  # starts daemons
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


@pytest.mark.e2e  # starts daemons
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


# --- privacy: who sees identified data (issue 8 §1, §2, §10) ---------------------------------
def _request_for(site: Site, made: dict, project: str, participant: str) -> None:
    from fiona.actions import Actions, OsActor
    Actions.open(site.config).assign(OsActor("test"), made["study"], project, participant,
                                     "baseline")


def _views(site: Site, user: str) -> list[dict]:
    return [e["details"] for e in site.audit()
            if e["action"] == "view identified" and e["user"] == user]


def test_study_of_another_project_is_invisible(site: Site):
    """A study requested for B is not shown to A's assigners: not on the list, not as a page,
    not in the preview (which showed its clear header), not in the API."""
    made = site.study("ACCB")
    _request_for(site, made, "B", "B001")
    uid = made["study"]
    alice = site.client("alice")
    t = token(alice)
    assert uid not in alice.get("/assign?all=1").text
    assert 'id="no-studies"' in alice.get("/assign?all=1&q=ACCB").text
    assert alice.get(f"/assign/{uid}").status_code == 404
    r = alice.post(f"/assign/{uid}/confirm", data={
        "project": "A", "participant": "A001", "event": "baseline", "csrf_token": t})
    assert r.status_code == 404 and "Doe^Jane" not in r.text and "PAT0001" not in r.text
    assert alice.get(f"/api/study/{uid}").status_code == 404
    assert uid not in json.dumps(alice.get("/api/studies?waiting=false").json())
    r = alice.post("/api/assign", json={"study_uid": uid, "project": "A",
                                        "participant": "A001", "event": "baseline"},
                   headers={"X-CSRF-Token": t})
    assert r.status_code == 404
    assert [r.project for r in site.control.requests(uid)] == ["B"]
    assert _views(site, "alice") == []
    # B's assigner and the admin see it
    for user in ("bob", "admin"):
        c = site.client(user)
        assert c.get(f"/assign/{uid}").status_code == 200
        assert "ACCB" in c.get("/assign?all=1").text
        assert c.get(f"/api/study/{uid}").json()["accession"] == "ACCB"


def test_every_display_of_identified_values_is_audited(site: Site):
    made = site.study("ACCV")
    uid = made["study"]
    alice = site.client("alice")
    alice.get("/assign")
    page = alice.get(f"/assign/{uid}")
    alice.post(f"/assign/{uid}/confirm", data={"project": "A", "participant": "A042",
                                               "event": "baseline",
                                               "csrf_token": csrf_of(page.text)})
    alice.get(f"/api/study/{uid}")
    alice.get("/api/studies")
    views = _views(site, "alice")
    assert [v["shown"] for v in views] == ["assign list", "study page", "preview", "api study",
                                           "api studies"]
    assert all(v["studies"] == [uid] for v in views)
    assert views[0]["fields"] == ["accession"]
    preview_fields = views[2]["fields"]
    assert "Patient's Name" in preview_fields and "Patient ID" in preview_fields
    assert "Patient's Birth Date" in preview_fields
    text = (site.gw.datadir / "logs" / "audit.log").read_text()
    assert "Doe^Jane" not in text and "PAT0001" not in text and "ACCV" not in text


def test_review_role_sees_its_project_without_identified_values(site: Site):
    made = site.study("ACCR")
    _request_for(site, made, "A", "A007")
    UserStore(site.gw.datadir).add("rita", PASSWORD, ["project:A:review"])
    rita = site.client("rita")
    rows = rita.get("/api/studies?project=A").json()["studies"]
    assert [r["uid"] for r in rows] == [made["study"]] and rows[0]["accession"] == ""
    assert rita.get(f"/assign/{made['study']}").status_code == 403
    assert _views(site, "rita") == []
    alice_rows = site.client("alice").get("/api/studies?project=A").json()["studies"]
    assert alice_rows[0]["accession"] == "ACCR"


def test_status_error_lines_only_for_admins(site: Site):
    log = site.gw.tree.logs / "storescpd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("2026-11-29 10:00:00 ERROR fiona.receive: refused PAT0001 from /srv/x\n")
    alice = site.client("alice")
    for text in (alice.get("/status").text, json.dumps(alice.get("/api/status").json())):
        assert "PAT0001" not in text and "/srv/x" not in text
        assert str(site.gw.datadir) not in text
    row = next(d for d in alice.get("/api/status").json()["daemons"] if d["name"] == "storescp")
    assert row["last_error_at"] == "2026-11-29 10:00:00" and "last_error" not in row
    admin = site.client("admin")
    assert "PAT0001" in admin.get("/status").text
    row = next(d for d in admin.get("/api/status").json()["daemons"] if d["name"] == "storescp")
    assert "PAT0001" in row["last_error"]


def test_pages_show_no_free_text_from_the_url(site: Site):
    made = site.study()
    alice = site.client("alice")
    bait = "Call 555-0100 to claim your prize"
    page = alice.get(f"/assign/{made['study']}", params={"msg": bait, "done": bait}).text
    assert bait not in page and 'id="message"' not in page
    assert 'id="message"' in alice.get(f"/assign/{made['study']}?done=created").text
    # a request named in the URL is shown only to its project's users
    _request_for(site, made, "A", "A001")
    instance = site.control.requests(made["study"])[0].instance
    url = f"/assign/{made['study']}?done=created&instance={instance}"
    assert "A/A001/baseline: Request created" in alice.get(url).text
    admin = site.client("admin")
    assert bait not in admin.get("/status", params={"msg": bait, "done": bait}).text
    t = csrf_of(admin.get("/status").text)
    r = admin.post("/status/switch", data={"part": "receive", "value": "0", "csrf_token": t})
    assert r.headers["location"] == "/status?done=switch"


def test_preview_failure_hides_exception_text_from_non_admins(site: Site):
    made = site.study()
    for folder in site.gw.tree.raw.joinpath(made["study"]).iterdir():
        if folder.is_dir():
            for f in folder.iterdir():
                f.write_bytes(b"not DICOM at all")
    form = {"project": "A", "participant": "A001", "event": "baseline"}
    alice = site.client("alice")
    form["csrf_token"] = token(alice)
    page = alice.post(f"/assign/{made['study']}/confirm", data=form).text
    assert 'id="preview-error"' in page and "the preview failed" in page
    assert "DICM" not in page and "force=True" not in page
    admin = site.client("admin")
    form["csrf_token"] = token(admin)
    assert "DICM" in admin.post(f"/assign/{made['study']}/confirm", data=form).text


# --- refusals of the assignment rules, and the admin's move (issue 8 §7, §8) ----------------
def test_refusals_are_shown_on_the_confirm_page_and_api(site: Site):
    made = site.study()
    uid = made["study"]
    site.control.save_project(Project("C", naming=r"^C[0-9]{3}$", events=["baseline"],
                                      active=False))
    site.control.save_project(Project("D", naming=r"^D[0-9]{3}$", events=["baseline"],
                                      rec_start="2020-01-01", rec_end="2021-12-31"))
    admin = site.client("admin")
    t = token(admin)
    for project, reason in (("C", "project C is inactive"),
                            ("D", "project D's ethics approval ended on 2021-12-31")):
        form = {"project": project, "participant": f"{project}001", "event": "baseline",
                "csrf_token": t}
        r = admin.post(f"/assign/{uid}/confirm", data=form)
        assert r.status_code == 400 and reason in html.unescape(r.text)
        assert "Doe^Jane" not in r.text
        assert 'id="error"' in r.text
        r = admin.post("/api/assign", json={k: v for k, v in form.items() if k != "csrf_token"}
                       | {"study_uid": uid}, headers={"X-CSRF-Token": t})
        assert r.status_code == 400 and reason in r.json()["detail"]
    assert site.control.requests(uid) == []
    # a second participant for the same study in one project names the first
    alice = site.client("alice")
    t = token(alice)
    assert alice.post("/api/assign", json={"study_uid": uid, "project": "A",
                                           "participant": "A001", "event": "baseline"},
                      headers={"X-CSRF-Token": t}).status_code == 200
    form = {"project": "A", "participant": "A002", "event": "baseline", "csrf_token": t}
    r = alice.post(f"/assign/{uid}/confirm", data=form)
    assert r.status_code == 400 and "participant A001" in r.text and "Doe^Jane" not in r.text
    r = alice.post(f"/assign/{uid}/send", data=form)
    assert r.status_code == 400 and "participant A001" in r.text
    r = alice.post("/api/assign", json={"study_uid": uid, "project": "A", "participant": "A002",
                                        "event": "baseline"}, headers={"X-CSRF-Token": t})
    assert r.status_code == 400 and "participant A001" in r.json()["detail"]
    assert [x.participant for x in site.control.requests(uid)] == ["A001"]
    # only admins move; the page offers it to them
    assert 'class="move"' not in alice.get(f"/assign/{uid}").text
    r = alice.post(f"/assign/{uid}/move", data=form)
    assert r.status_code == 403
    r = alice.post("/api/move", json={"study_uid": uid, "project": "A", "participant": "A002"},
                   headers={"X-CSRF-Token": t})
    assert r.status_code == 403
    admin = site.client("admin")
    page = admin.get(f"/assign/{uid}").text
    assert 'class="move"' in page
    r = admin.post(f"/assign/{uid}/move", data={"project": "A", "participant": "A002",
                                                "event": "", "csrf_token": csrf_of(page)})
    assert r.status_code == 303
    assert "A/A002/baseline: The study was moved" in admin.get(r.headers["location"]).text
    assert [x.participant for x in site.control.requests(uid)] == ["A002"]
    move = [e for e in site.audit() if e["action"] == "move"]
    assert move[-1]["user"] == "admin" and move[-1]["details"]["before"] == ["A001/baseline"]
    assert move[-1]["details"]["participant"] == "A002"


def test_coupling_upload_audits_each_request(site: Site):
    a = site.study("ACC21", seed=1)
    b = site.study("ACC22", seed=2)
    alice = site.client("alice")
    r = alice.post("/api/coupling", json={"csv": "ACC21,A,A021,baseline\nACC22,A,A022,baseline\n"},
                   headers={"X-CSRF-Token": token(alice)})
    assert r.json()["requests"] == 2
    lines = [e for e in site.audit() if e["action"] == "coupling request"]
    assert sorted((e["details"]["study_uid"], e["details"]["participant"]) for e in lines) == \
        sorted([(a["study"], "A021"), (b["study"], "A022")])
    assert all(e["user"] == "alice" for e in lines)


def test_assign_list_pages_and_audits_each_page(site: Site, monkeypatch):
    from fiona.web import assign_pages
    monkeypatch.setattr(assign_pages, "PAGE_SIZE", 1)
    older = site.study("ACCP1", seed=1, arrival="2026-11-01 10:00:00")
    newer = site.study("ACCP2", seed=2, arrival="2026-11-02 10:00:00")
    alice = site.client("alice")
    first = alice.get("/assign").text
    assert "2 studies, page 1 of 2" in first and newer["study"] in first
    assert older["study"] not in first
    link = re.search(r'href="(/assign\?[^"]+)" id="page-next"', first).group(1)
    second = alice.get(html.unescape(link)).text
    assert older["study"] in second and newer["study"] not in second
    assert [v["studies"] for v in _views(site, "alice")] == [[newer["study"]], [older["study"]]]
    api = alice.get("/api/studies?page=2").json()
    assert api["total"] == 2 and [r["uid"] for r in api["studies"]] == [older["study"]]
