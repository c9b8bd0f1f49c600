"""Applications (/apply, /admin/applications) and e-mail notifications (`fiona notify`),
against a real SMTP server on loopback (aiosmtpd) and the in-process web site of webapp.py.

Checked: a refused application (bad regex, ethics end before start, a taken or short acronym)
says why and stores nothing; apply -> approve makes the project as `fiona project add` does and
the applicant gets mail; subscribers get the digests they chose and nobody else's; no message
carries an identifier; a mail server that is down loses no notice; digests keep their
interval; the REDCap store round-trips through the emulator."""

from __future__ import annotations

import email
import email.policy
import json
import re
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiosmtpd.controller import Controller

from fiona.apply.store import Application, open_store
from fiona.config import load
from fiona.control.base import Project, held_message, now_iso
from fiona.export.jobs import READY, JobStore
from fiona.notify.job import Notifier
from helpers import free_port
from webapp import WebSite, csrf_of

ACCESSION = "ACCSECRET77"
ERROR_TEXT = "peer refused Doe^Jane 0101"


class Inbox:
    """An aiosmtpd handler that keeps every message."""

    def __init__(self):
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's API
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode()))
        return "250 OK"

    def to(self, address: str) -> list[str]:
        """The subject and decoded body of each message to `address`."""
        out = []
        for rcpts, text in self.messages:
            if address in rcpts:
                msg = email.message_from_string(text, policy=email.policy.default)
                out.append(f"{msg['Subject']}\n{msg.get_content()}")
        return out


@pytest.fixture(scope="module")
def smtp():
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
def site(tmp_path: Path, smtp) -> WebSite:
    s = WebSite(tmp_path)
    s.clock.advance(0)
    raw = json.loads(s.gw.config.read_text())
    raw["SMTP"] = {"host": "127.0.0.1", "port": smtp[1], "starttls": False,
                   "from": "fiona@example.org"}
    raw["EXPORTS"] = {"url": "https://fiona.example.org"}
    s.gw.config.write_text(json.dumps(raw))
    s.config = load(str(s.gw.config))
    smtp[0].messages.clear()
    return s


class Disk:
    """disk_usage as a test wants it: below or above the watermarks."""

    def __init__(self, percent: float = 10):
        self.percent = percent

    def __call__(self, path):
        return SimpleNamespace(total=1000, used=int(10 * self.percent),
                               free=1000 - int(10 * self.percent))


def notifier(site: WebSite, disk: Disk, smtp_port: int | None = None) -> Notifier:
    config = site.config
    if smtp_port is not None:
        config = replace(config, smtp={**config.smtp, "port": smtp_port})
    return Notifier(config, config.site(), site.control, site.clock, disk)


def form(client, page: str) -> str:
    return csrf_of(client.get(page).text)


PROJECT_FORM = {"project": "STUDY1", "long_name": "A study of one", "pi": "Dr Who",
                "pi_email": "pi@example.org", "naming": r"^S[0-9]{3}$",
                "events": "baseline, followup", "ethics_number": "REK-2026/123",
                "rec_start": "2026-01-01", "rec_end": "2027-12-31",
                "end_action": "deleted after 5 years", "email": "alice@example.org"}


def test_refused_applications_say_why_and_store_nothing(site: WebSite):
    site.control.save_project(Project("TAKEN1", naming=r"^T[0-9]+$"))
    alice = site.client("alice")
    token = form(alice, "/apply")
    for change, message in (({"naming": "^S[0-9"}, "is not a valid regular expression"),
                            ({"rec_end": "2025-12-31"}, "before it starts"),
                            ({"project": "taken1"}, "is taken"),
                            ({"project": "ABC"}, "5 to 32 letters or digits"),
                            ({"project": "AB-CDE"}, "5 to 32 letters or digits"),
                            ({"events": ""}, "at least one event"),
                            ({"pi_email": "nobody"}, "is not an e-mail address")):
        r = alice.post("/apply/project", data={**PROJECT_FORM, **change, "csrf_token": token})
        assert r.status_code == 400, change
        assert message in r.text, (change, r.text[:2000])
        assert 'value="A study of one"' in r.text  # the form keeps what was typed
    r = alice.post("/apply/role", data={"project": "NOPE1", "right": "assign", "reason": "x",
                                        "email": "alice@example.org", "csrf_token": token})
    assert r.status_code == 404
    r = alice.post("/apply/role", data={"project": "A", "right": "assign", "reason": "x",
                                        "email": "alice@example.org", "csrf_token": token})
    assert r.status_code == 400 and "already" in r.text
    assert open_store(site.gw.datadir, site.control).all() == []
    assert site.audit("application submitted") == []
    r = alice.get("/api/apply/example", params={"naming": r"^S[0-9]{3}$"})
    assert r.status_code == 200 and re.fullmatch(r"S[0-9]{3}", r.json()["example"])
    r = alice.get("/api/apply/example", params={"naming": "^S[0-9"})
    assert r.status_code == 400 and "not a valid regular expression" in r.json()["detail"]
    assert [p.name for p in site.control.projects()] == ["A", "B", "TAKEN1"]


def test_apply_approve_makes_the_project_and_mails_the_applicant(site: WebSite, smtp):
    inbox = smtp[0]
    disk = Disk()
    notifier(site, disk).run()  # the first run records the past
    site.users.add("carol", "correct horse battery", ["project:B:review"])
    alice, carol = site.client("alice"), site.client("carol")
    r = alice.post("/apply/project", data={**PROJECT_FORM, "csrf_token": form(alice, "/apply")})
    assert r.status_code == 303
    page = alice.get(r.headers["location"]).text
    example = re.search(r"A participant ID your rule allows: (\S+)\.", page).group(1)
    assert re.fullmatch(r"^S[0-9]{3}$", example)
    r = alice.post("/apply/project", data={**PROJECT_FORM, "csrf_token": form(alice, "/apply")})
    assert r.status_code == 400 and "is taken" in r.text  # a pending application holds it
    r = carol.post("/apply/role", data={"project": "A", "right": "review", "reason": "QA",
                                        "email": "carol@example.org",
                                        "csrf_token": form(carol, "/apply")})
    assert r.status_code == 303
    assert carol.get("/admin/applications", headers={"Accept": "text/html"}).status_code == 403

    admin = site.client("admin")
    listing = admin.get("/admin/applications").text
    ids = re.findall(r'class="application-row" data-id="([^"]+)"', listing)
    assert len(ids) == 2 and "REK-2026/123" in listing and example in listing
    store = open_store(site.gw.datadir, site.control)
    project_app = next(a for a in store.all() if a.kind == "project")
    role_app = next(a for a in store.all() if a.kind == "role")
    token = form(admin, "/admin/applications")
    r = admin.post(f"/admin/applications/{project_app.id}/approve", data={"csrf_token": token})
    assert r.status_code == 303 and "created" in admin.get(r.headers["location"]).text
    r = admin.post(f"/admin/applications/{role_app.id}/reject",
                   data={"csrf_token": token, "reason": ""})
    assert r.status_code == 400  # a rejection needs its reason
    r = admin.post(f"/admin/applications/{role_app.id}/reject",
                   data={"csrf_token": token, "reason": "ask your PI first"})
    assert r.status_code == 303
    r = admin.post(f"/admin/applications/{role_app.id}/approve", data={"csrf_token": token})
    assert r.status_code == 400  # decided already

    project = site.control.project("STUDY1")
    assert (project.naming, project.events, project.rec_start, project.rec_end,
            project.contact, project.contact_email) == (
        r"^S[0-9]{3}$", ["baseline", "followup"], "2026-01-01", "2027-12-31", "Dr Who",
        "pi@example.org")
    assert site.users.get("alice").can("STUDY1", "assign")
    assert not site.users.get("carol").can("A")
    added = site.audit("project added")[-1]
    assert added["user"] == "admin" and added["details"]["project"] == "STUDY1"
    assert [e["details"]["id"] for e in site.audit("application submitted")] == \
        [project_app.id, role_app.id]
    assert site.audit("application approved")[-1]["details"]["id"] == project_app.id
    assert site.audit("application rejected")[-1]["details"]["note"] == "ask your PI first"
    assert "approved" in alice.get("/apply").text and "rejected" in carol.get("/apply").text

    report = notifier(site, disk).run()
    assert report.sent == 2 and not report.failed
    (to_alice,) = inbox.to("alice@example.org")
    assert "project STUDY1 was approved" in to_alice
    (to_carol,) = inbox.to("carol@example.org")
    assert "the review role in project A was rejected; the admin's note is on" in to_carol
    # the admin's free text stays on the page (it may say anything), as do directory hints
    assert "ask your PI first" not in to_carol and "alice has" not in to_alice


def test_digests_reach_their_subscribers_only_without_identifiers_and_survive_mail_down(
        site: WebSite, smtp):
    inbox = smtp[0]
    disk = Disk(10)
    site.gw.run("notify")  # the CLI's first run on the site: records the past, mails nothing
    alice, bob, admin = site.client("alice"), site.client("bob"), site.client("admin")
    subs = {alice: ("alice@example.org", ["A:routed", "A:failed", "A:held", "A:export",
                                                "A:ethics"]),
            bob: ("bob@example.org", ["B:routed"]),
            admin: ("admin@example.org", [":failing", ":disk"])}
    for client, (address, chosen) in subs.items():
        r = client.post("/notifications", data={"email": address, "every_minutes": "60",
                                                "sub": chosen,
                                                "csrf_token": form(client, "/notifications")})
        assert r.status_code == 303, r.text
    r = alice.post("/notifications", data={"email": "alice@example.org", "sub": ["B:routed"],
                                           "csrf_token": form(alice, "/notifications")})
    assert r.status_code == 400 and "you cannot choose" in r.text
    r = bob.post("/notifications", data={"email": "bob@example.org", "sub": [":disk"],
                                         "csrf_token": form(bob, "/notifications")})
    assert r.status_code == 400  # admin kinds are for admins

    # what happens: a study for A, a failed one for B, an export, an ethics end, a full disk
    uid_a = site.study(accession=ACCESSION)
    site.request(uid_a, "A", "A001")
    uid_b = site.study(accession=ACCESSION + "B")
    failed = site.request(uid_b, "B", "B002")
    site.control.update_request(replace(failed, transferred=now_iso(), error_flags={2},
                                        error_message=ERROR_TEXT, done_revision=1))
    jobs = JobStore(site.gw.datadir)
    job = jobs.new(project="A", type="dicom", requester="alice", participant="A001")
    job.state = READY
    jobs.save(job)
    ends = (site.clock.now() + timedelta(days=10)).date().isoformat()
    site.control.save_project(replace(site.control.project("A"), rec_end=ends))
    held = site.request(site.study(accession=ACCESSION + "C"), "A", "A003")
    site.control.update_request(replace(held, error_message=held_message("project A is "
                                                                         "inactive")))
    disk.percent = 99

    down = notifier(site, disk, smtp_port=free_port())  # nobody listens there
    report = down.run()
    assert report.queued == 8 and report.sent == 0 and len(report.failed) == 1
    assert "the 2 digests after it are kept" in report.failed[0]
    assert inbox.messages == []
    assert notifier(site, disk, smtp_port=free_port()).run().queued == 0  # seen, kept queued

    report = notifier(site, disk).run()
    assert report.sent == 3 and report.queued == 0 and not report.failed
    (to_alice,) = inbox.to("alice@example.org")
    assert "participant A001, event baseline: a study was assigned" in to_alice
    assert f"https://fiona.example.org/exports/{job.id}" in to_alice
    assert f"ethics approval ends on {ends}" in to_alice and "B002" not in to_alice
    assert "participant A003, event baseline: the transfer is held" in to_alice
    (to_bob,) = inbox.to("bob@example.org")
    assert "B002" in to_bob and "failed" not in to_bob and "A001" not in to_bob
    (to_admin,) = inbox.to("admin@example.org")
    assert "B002, event baseline: the transfer failed" in to_admin and "99" in to_admin
    assert "A001" not in to_admin  # admins chose site-wide notices only
    for text in [t for rcpts, _ in inbox.messages for r in rcpts for t in inbox.to(r)]:
        for secret in (ACCESSION, uid_a, uid_b, ERROR_TEXT, "Doe", "Jane", "MR Head"):
            assert secret not in text, secret

    # a digest at most every 60 minutes: a new event waits, then goes
    inbox.messages.clear()
    site.request(site.study(accession="X2"), "A", "A002")
    assert notifier(site, disk).run().sent == 0 and inbox.messages == []
    site.clock.advance(61 * 60)
    assert notifier(site, disk).run().sent == 1
    (later,) = inbox.to("alice@example.org")
    assert "A002" in later and "A001" not in later


def test_applications_in_redcap_round_trip(tmp_path: Path):
    from fiona.control.redcap import RedcapControlPlane
    from redcap_emulator import RedcapEmulator

    tokens = {"DataTransferProjects": "E" * 32, "Applications": "F" * 32}
    emu = RedcapEmulator()
    emu.add_from_manifest(tokens)
    emu.start()
    try:
        store = open_store(tmp_path, RedcapControlPlane(emu.url, tokens, timeout=5))
        app = Application(id="20260101-abcd", kind="project", applicant="alice",
                          email="alice@example.org", created="2026-01-01T12:00:00",
                          project="STUDY1", naming=r"^S[0-9]{3}$", example="S123",
                          events=["baseline", "followup"], rec_start="2026-01-01",
                          rec_end="2027-01-01", end_action="deleted")
        store.add(app)
        assert store.all() == [app]
        decided = replace(app, state="rejected", decided_by="admin", decision_note="no")
        store.save(decided)
        assert store.get(app.id) == decided
    finally:
        emu.stop()


def test_a_user_without_roles_lands_on_apply_and_can_apply_for_a_role(site: WebSite):
    site.users.add("dave", "correct horse battery", [])
    dave = site.client("dave")
    assert dave.get("/").headers["location"] == "/apply"
    r = dave.post("/apply/role", data={"project": "B", "right": "export", "reason": "thesis",
                                       "email": "dave@example.org",
                                       "csrf_token": form(dave, "/apply")})
    assert r.status_code == 303
    assert "Your application for the export role in B was submitted" in \
        dave.get(r.headers["location"]).text
    (app,) = open_store(site.gw.datadir, site.control).all()
    admin = site.client("admin")
    r = admin.post(f"/admin/applications/{app.id}/approve",
                   data={"csrf_token": form(admin, "/admin/applications")})
    assert r.status_code == 303
    assert site.users.get("dave").roles == ["project:B:export"]
    assert site.audit("user roles set")[-1]["details"]["after"] == ["project:B:export"]


@pytest.mark.e2e
def test_a_directory_user_without_roles_applies_and_the_approval_says_where_to_grant_it(
        slapd, tmp_path: Path):
    from fiona.control import open_control_plane
    from fiona.notify.store import NotifyStore, Prefs
    from slapd import USERS
    from test_ldap import web_site

    site = web_site(tmp_path, slapd)
    control = open_control_plane(site.config)
    control.save_project(Project("PROJ1", naming=r"^P[0-9]+$"))
    # subscribed while a group gave her PROJ1 (the roles are kept with her subscriptions)
    notices = NotifyStore(site.gw.datadir)
    notices.subscribe(Prefs("carol", "carol@example.org", roles=["project:PROJ1:review"]),
                      {("PROJ1", "routed")})
    carol = site.client("carol", USERS["carol"][0])  # in the directory, in no group now
    assert carol.get("/api/session").json()["roles"] == []
    assert notices.prefs("carol").roles == []  # her login told the notices too
    assert carol.get("/").headers["location"] == "/apply"
    r = carol.post("/apply/role", data={"project": "PROJ1", "right": "review",
                                        "reason": "reading", "email": "carol@example.org",
                                        "csrf_token": form(carol, "/apply")})
    assert r.status_code == 303
    store = open_store(site.gw.datadir, control)
    (app,) = store.all()
    admin = site.client("admin")
    r = admin.post(f"/admin/applications/{app.id}/approve",
                   data={"csrf_token": form(admin, "/admin/applications")})
    assert r.status_code == 303
    decided = store.get(app.id)
    assert decided.state == "approved" and "WEB.ldap.role_groups" in decided.decision_note
    assert site.users.get("carol") is None  # no local account to shadow the directory login
    assert "approved" in carol.get("/apply").text
    page = carol.get("/notifications").text
    assert 'id="no-mail"' in page and 'id="no-projects"' in page  # no SMTP key on this site


def test_the_example_of_a_rule_with_nested_repeats_is_refused_not_built(site: WebSite):
    """rstr stops each repeat at 100, but nested ones multiply: a few characters of rule
    could make the web worker build a string of millions (or billions) of characters."""
    alice = site.client("alice")
    for naming in (r"(((a{100}){100}){100})", r"((((x*)*)*)*)", r"(ab{99}){50}\1\1"):
        r = alice.get("/api/apply/example", params={"naming": naming})
        assert r.status_code == 400 and "too long" in r.json()["detail"], naming
    r = alice.get("/api/apply/example", params={"naming": r"^(P|Q)[0-9]{2,8}-\1?$"})
    assert r.status_code == 200 and re.fullmatch(r"(P|Q)[0-9]{2,8}-\1?", r.json()["example"])


def test_the_smtp_password_never_crosses_the_network_in_clear(tmp_path: Path):
    """A server that offers AUTH without TLS (as a misconfigured or hostile one may): with
    `starttls` off, FIONA refuses to log in rather than send the password in clear."""
    from aiosmtpd.smtp import AuthResult

    from fiona.mail import MailError, deliver, message

    heard = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        heard.append(auth_data)
        return AuthResult(success=True)

    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=authenticator,
                           auth_require_tls=False)
    controller.start()
    try:
        secret = tmp_path / "smtp.password"
        secret.write_text("hunter2 secret")
        secret.chmod(0o600)
        smtp = {"host": "127.0.0.1", "port": port, "starttls": False, "user": "fiona",
                "password_file": secret, "from": "fiona@example.org"}
        with pytest.raises(MailError, match="starttls"):
            deliver(smtp, message(smtp, "a@example.org", "s", "b"))
    finally:
        controller.stop()
    assert heard == [] and inbox.messages == []


def alice_hears_of_studies_in_a(site: WebSite, disk: Disk) -> None:
    """The site's first notify run (the past recorded), then alice's subscription to A:routed."""
    notifier(site, disk).run()
    alice = site.client("alice")
    r = alice.post("/notifications", data={"email": "alice@example.org", "sub": ["A:routed"],
                                           "csrf_token": form(alice, "/notifications")})
    assert r.status_code == 303


def test_a_run_killed_between_sending_and_marking_mails_again_rather_than_lose(
        site: WebSite, smtp, monkeypatch):
    from fiona.notify.store import NotifyStore

    inbox, disk = smtp[0], Disk()
    alice_hears_of_studies_in_a(site, disk)
    site.request(site.study(accession="K1"), "A", "A009")
    mark_sent = NotifyStore.mark_sent

    def killed(self, *args):
        raise KeyboardInterrupt  # the run dies after the server accepted the digest

    monkeypatch.setattr(NotifyStore, "mark_sent", killed)
    with pytest.raises(KeyboardInterrupt):
        notifier(site, disk).run()
    monkeypatch.setattr(NotifyStore, "mark_sent", mark_sent)
    assert notifier(site, disk).run().sent == 1
    assert [("A009" in m) for m in inbox.to("alice@example.org")] == [True, True]
    assert notifier(site, disk).run().sent == 0


def test_notices_waiting_for_a_digest_are_withheld_from_who_lost_the_project(
        site: WebSite, smtp):
    """Roles change while notices wait (the mail server down, or a long interval): a digest
    carries only what its reader may still see; the rest is withheld, not kept for ever."""
    from fiona.notify.store import NotifyStore
    from webapp import PASSWORD

    inbox, disk = smtp[0], Disk()
    alice_hears_of_studies_in_a(site, disk)
    site.request(site.study(accession="W1"), "A", "A007")
    assert notifier(site, disk, smtp_port=free_port()).run().queued == 1  # mail server down
    site.users.add("alice", PASSWORD, ["project:B:review"])  # A withdrawn meanwhile
    assert notifier(site, disk).run().sent == 0
    assert inbox.to("alice@example.org") == []
    assert NotifyStore(site.gw.datadir).unsent() == []


def test_a_store_that_cannot_be_reached_is_a_clear_answer_not_a_crash(site: WebSite,
                                                                      monkeypatch):
    """The applications live in REDCap on such sites: REDCap down is a message."""
    from fiona.apply.store import LocalApplications
    from fiona.control.base import Unavailable

    def down(self):
        raise Unavailable("REDCap at https://redcap.example.org cannot be reached")

    monkeypatch.setattr(LocalApplications, "all", down)
    admin, alice = site.client("admin"), site.client("alice")
    for client, page in ((admin, "/admin/applications"), (alice, "/apply"),
                         (alice, "/apply?done=role&id=x")):
        r = client.get(page, headers={"Accept": "text/html"})
        assert r.status_code == 503 and "cannot be reached" in r.text, page
