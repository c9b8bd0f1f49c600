"""Admin pages (users and projects) and the actions behind them (`fiona.actions`), which
`fiona user add` and `fiona project add` share: admin only (403 and an audit entry for anyone
else), CSRF on every form, POST-redirect-GET, rules checked before saving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fiona.actions import Actions, Invalid, OsActor
from fiona.control.base import Project
from webapp import PASSWORD, WebSite, csrf_of, login


@pytest.fixture
def site(tmp_path: Path) -> WebSite:
    return WebSite(tmp_path)


def post(client, url: str, **data):
    token = csrf_of(client.get("/admin/users" if "users" in url else "/admin/projects").text)
    return client.post(url, data={"csrf_token": token, **data})


def test_admin_pages_are_for_admins_only_and_refusals_are_audited(site: WebSite):
    alice = site.client("alice")
    for url in ("/admin/users", "/admin/users/bob", "/admin/projects", "/admin/projects/new",
                "/admin/projects/A", "/admin/users/bob/remove"):
        r = alice.get(url, headers={"Accept": "text/html"})
        assert r.status_code == 403, url
        assert 'id="back"' in r.text  # an HTML error page with a way back
    token = csrf_of(alice.get("/assign").text)
    for url, data in (("/admin/users", {"name": "mallory", "admin": "1"}),
                      ("/admin/users/bob/roles", {"admin": "1"}),
                      ("/admin/users/bob/reset", {}), ("/admin/users/bob/remove", {}),
                      ("/admin/projects", {"name": "C", "naming": ".*", "events": "x"}),
                      ("/admin/projects/A", {"naming": ".*", "events": "x", "active": "1"})):
        assert alice.post(url, data={"csrf_token": token, **data}).status_code == 403, url
    assert site.users.get("mallory") is None and not site.users.get("bob").admin
    assert [p.name for p in site.control.projects()] == ["A", "B"]
    refused = site.audit("admin refused")
    assert len(refused) == 12 and {e["user"] for e in refused} == {"alice"}
    # and a form without the CSRF token does nothing, for admins too
    admin = site.client("admin")
    assert admin.post("/admin/users", data={"name": "eve", "admin": "1"}).status_code == 403
    assert site.users.get("eve") is None


def test_an_admin_adds_a_user_who_gets_a_one_time_password_shown_once(site: WebSite):
    admin = site.client("admin")
    r = post(admin, "/admin/users", name="carol", role=["project:A:assign", "project:B:review"])
    assert r.status_code == 303 and r.headers["location"] == "/admin/users?done=added&name=carol"
    page = admin.get(r.headers["location"]).text
    password = re.search(r'id="one-time-password">([^<]+)<', page).group(1)
    assert password not in r.headers["location"] and "User carol added." in page
    assert 'id="one-time-password"' not in admin.get("/admin/users").text  # shown only once
    assert site.users.get("carol").roles == ["project:A:assign", "project:B:review"]
    entry = site.audit("user added")[-1]
    assert entry["user"] == "admin" and entry["details"]["user"] == "carol"
    assert password not in (site.gw.datadir / "logs" / "audit.log").read_text()
    # carol logs in with it and must choose her own password first
    carol = site.client()
    r = login(carol, "carol", password)
    assert r.status_code == 303 and r.headers["location"] == "/password"
    # the same name again is refused with a message, nothing changes
    r = post(admin, "/admin/users", name="carol", admin="1")
    assert r.status_code == 400 and "exists already" in r.text
    assert not site.users.get("carol").admin
    # a role must be a role, a name a valid user name
    r = post(admin, "/admin/users", name="dave", role=["project:A:everything"])
    assert r.status_code == 400 and "must be admin or project:P:assign" in r.text
    r = post(admin, "/admin/users", name="a b", admin="1")
    assert r.status_code == 400 and site.users.get("a b") is None


def test_roles_reset_and_removal_take_effect_at_once(site: WebSite):
    admin, bob = site.client("admin"), site.client("bob")
    r = post(admin, "/admin/users/bob/roles", role=["project:A:review"])
    assert r.status_code == 303
    assert site.users.get("bob").roles == ["project:A:review"]
    assert bob.get("/assign").status_code == 403  # no assign role any more
    entry = site.audit("user roles set")[-1]["details"]
    assert entry == {"user": "bob", "before": ["project:B:assign"], "after": ["project:A:review"]}

    # a reset: the old password stops working and bob's sessions end
    r = post(admin, "/admin/users/bob/reset")
    assert r.status_code == 303
    new = re.search(r'id="one-time-password">([^<]+)<', admin.get(r.headers["location"]).text)
    assert bob.get("/status").status_code == 303  # back to the login page
    assert login(site.client(), "bob", PASSWORD).status_code == 401
    assert login(site.client(), "bob", new.group(1)).headers["location"] == "/password"
    assert site.audit("user password reset")[-1]["details"]["sessions_ended"] == 1

    # removal, behind a confirmation page for browsers without JavaScript
    confirm = admin.get("/admin/users/bob/remove")
    assert confirm.status_code == 200 and 'id="confirm-yes"' in confirm.text
    r = post(admin, "/admin/users/bob/remove")
    assert r.status_code == 303 and site.users.get("bob") is None
    assert "User bob removed." in admin.get(r.headers["location"]).text
    assert site.audit("user removed")[-1]["details"]["user"] == "bob"


def test_the_last_admin_stays_and_nobody_removes_themselves(site: WebSite):
    admin = site.client("admin")
    r = post(admin, "/admin/users/admin/roles", role=["project:A:assign"])
    assert r.status_code == 400 and "last admin" in r.text
    assert site.users.get("admin").admin
    r = post(admin, "/admin/users/admin/remove")
    assert r.status_code == 400 and site.users.get("admin") is not None
    assert 'id="remove-user"' not in admin.get("/admin/users/admin").text
    # with a second admin, the first may step down
    assert post(admin, "/admin/users/alice/roles", admin="1").status_code == 303
    assert post(admin, "/admin/users/admin/roles", role=["project:B:review"]).status_code == 303


def test_a_message_names_only_real_entries(site: WebSite):
    admin = site.client("admin")
    bait = "Your session expired, call 555-0100"
    for url in ("/admin/users", "/admin/projects"):
        page = admin.get(url, params={"done": "added", "name": bait}).text
        assert bait not in page and 'id="message"' not in page
    assert "User alice removed" not in admin.get("/admin/users?done=removed&name=alice").text


def test_projects_are_added_and_edited_with_their_rules_checked(site: WebSite):
    admin = site.client("admin")
    form = {"name": "C", "long_name": "Cohort C", "naming": "^C[0-9{3}$", "events": "v1, v2",
            "active": "1", "rec_start": "2026-01-01", "rec_end": "2027-12-31"}
    r = post(admin, "/admin/projects", **form)
    assert r.status_code == 400 and "not a valid regular expression" in r.text
    assert 'value="^C[0-9{3}$"' in r.text  # the form keeps what was typed
    assert "C" not in [p.name for p in site.control.projects()]
    for bad, why in (({"events": ""}, "at least one event"),
                     ({"rec_end": "2025-12-31"}, "ends (2025-12-31) before it starts"),
                     ({"rec_start": "1.1.2026"}, "not a date YYYY-MM-DD"),
                     ({"name": "C/../x"}, "letters, digits and _.- only")):
        r = post(admin, "/admin/projects", **{**form, "naming": "^C[0-9]{3}$", **bad})
        assert r.status_code == 400 and why in r.text, bad
    r = post(admin, "/admin/projects", **{**form, "naming": "^C[0-9]{3}$"})
    assert r.status_code == 303 and r.headers["location"] == "/admin/projects?done=added&name=C"
    assert "Project C added." in admin.get(r.headers["location"]).text
    c = site.control.project("C")
    assert (c.naming, c.events, c.active, c.rec_start, c.rec_end, c.long_name) == \
        ("^C[0-9]{3}$", ["v1", "v2"], True, "2026-01-01", "2027-12-31", "Cohort C")
    assert post(admin, "/admin/projects", **{**form, "naming": "x"}).status_code == 400

    # editing keeps what the page does not show (features, auto-ID), and can deactivate
    site.control.save_project(Project("A", naming=r"^A[0-9]{3}$", events=["baseline"],
                                      features={2}, use_autoid=True, autoid_aetitle="AUTO_A"))
    r = post(admin, "/admin/projects/A", naming=r"^A[0-9]{4}$", events="baseline,month6")
    assert r.status_code == 303
    a = site.control.project("A")
    assert (a.naming, a.events, a.active, a.features, a.autoid_aetitle) == \
        (r"^A[0-9]{4}$", ["baseline", "month6"], False, {2}, "AUTO_A")
    details = site.audit("project changed")[-1]["details"]
    assert details["project"] == "A" and details["active"] is False
    assert post(admin, "/admin/projects/NOPE", naming=".*", events="x").status_code == 404


def test_a_project_chooses_its_de_identification_profile_among_the_available_ones(
        site: WebSite):
    """Shipped profiles and the site's own are offered; anything else is refused, naming them."""
    own = site.gw.datadir / "config" / "profiles"
    own.mkdir(parents=True, exist_ok=True)
    (own / "mysite.json").write_text('{"options": ["rtnLongModifDatesOpt"]}')
    admin = site.client("admin")
    page = admin.get("/admin/projects/new").text
    assert re.findall(r'<option value="([^"]+)"', page) == \
        ["compat42", "default", "mysite", "pathology"]
    form = {"name": "P", "naming": ".*", "events": "baseline", "active": "1"}
    r = post(admin, "/admin/projects", **form, deid_profile="nope")
    assert r.status_code == 400
    assert "no de-identification profile &#39;nope&#39;; available: compat42, default, " \
        "mysite, pathology" in r.text
    assert post(admin, "/admin/projects", **form, deid_profile="mysite").status_code == 303
    assert site.control.project("P").deid_profile == "mysite"
    assert site.audit("project added")[-1]["details"]["deid_profile"] == "mysite"
    assert post(admin, "/admin/projects/P", naming=".*", events="baseline").status_code == 303
    assert site.control.project("P").deid_profile == "mysite"  # kept when the form omits it
    assert '<option value="mysite" selected>' in admin.get("/admin/projects/P").text
    assert "<code>mysite</code>" in admin.get("/admin/projects").text


def test_the_cli_uses_the_same_actions(site: WebSite, tmp_path: Path):
    pw = tmp_path / "pw"
    pw.write_text("a long enough passphrase\n")
    site.gw.run("user", "add", "erin", "--role", "project:A:export", "--password-file", str(pw))
    assert site.users.get("erin").roles == ["project:A:export"]
    entry = site.audit("user added")[-1]
    assert entry["user"].startswith("os:") and entry["details"]["user"] == "erin"
    res = site.gw.run("user", "add", "erin", "--role", "root", "--password-file", str(pw),
                      check=False)
    assert res.returncode == 1 and "must be admin or project:P:assign" in res.stderr
    res = site.gw.run("project", "add", "D", "--naming", "^D[0-9", "--events", "x", check=False)
    assert res.returncode == 1 and "not a valid regular expression" in res.stderr
    site.gw.run("project", "add", "D", "--naming", "^D[0-9]+$", "--events", "x,y",
                "--deid-profile", "pathology")
    assert site.control.project("D").events == ["x", "y"]
    assert site.control.project("D").deid_profile == "pathology"
    assert site.audit("project added")[-1]["user"].startswith("os:")
    # and the service layer refuses the same things for every caller
    acts = Actions.open(site.config)
    with pytest.raises(Invalid, match="last admin"):
        acts.remove_user(OsActor("root"), "admin")
