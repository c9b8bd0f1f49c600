"""Web authentication, sessions and headers (issue 8, security items 3, 4, 5, 9, 10).

Starlette's TestClient drives `create_app` on a real data tree; time-based rules (throttling,
session timeouts) run on a `FakeClock` instead of sleeping."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import uvicorn
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect

from fiona.clock import FakeClock
from fiona.config import ConfigError, load
from fiona.web import users as users_module
from fiona.web.app import create_app, safe_next
from fiona.web.users import UserStore
from helpers import Gateway, free_port, wait_for

PASSWORD = "correct horse battery"
LONG = "ä" * 40 + " a passphrase far longer than bcrypt's seventy-two bytes"  # 130 bytes
TEMPLATES = Path(users_module.__file__).parent / "templates"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


class Site:
    def __init__(self, tmp: Path, web: dict | None = None):
        self.gw = Gateway(tmp / "data", free_port(), {"WEB": web} if web else None)
        self.config = load(str(self.gw.config))
        self.clock = FakeClock()
        self.users = UserStore(self.gw.datadir)
        self.users.add("admin", PASSWORD, ["admin"])
        self.users.add("alice", PASSWORD, ["project:A:assign"])
        self.app = create_app(self.config, clock=self.clock)

    def client(self, user: str | None = None, password: str = PASSWORD,
               address: str = "127.0.0.1", **kw) -> TestClient:
        c = TestClient(self.app, follow_redirects=False, client=(address, 50000), **kw)
        if user:
            r = login(c, user, password)
            assert r.status_code == 303, r.text
        return c

    def audit(self, action: str | None = None) -> list[dict]:
        path = self.gw.datadir / "logs" / "audit.log"
        entries = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [e for e in entries if action is None or e["action"] == action]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client: TestClient, user: str, password: str, **extra):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": user, "password": password,
                                       "csrf_token": token, **extra})


def change_password(client: TestClient, current: str, new: str, again: str | None = None):
    token = csrf_of(client.get("/password").text)
    return client.post("/password", data={"current": current, "password": new,
                                          "password2": new if again is None else again,
                                          "csrf_token": token})


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# --- 3. long passwords, equal cost --------------------------------------------------------------
def test_passwords_longer_than_72_bytes_work_everywhere(site: Site):
    assert len(LONG.encode()) > 72
    c = site.client()
    assert login(c, "alice", LONG).status_code == 401      # was HTTP 500 for existing users
    assert login(c, "nobody", LONG).status_code == 401
    c = site.client("alice")
    assert change_password(c, PASSWORD, LONG).status_code == 303  # was HTTP 500
    assert login(site.client(), "alice", LONG).status_code == 303
    # a password that differs only after byte 72 is another password
    assert login(site.client(), "alice", LONG[:-1] + "X").status_code == 401
    pw = site.gw.datadir.parent / "pw"
    pw.write_text(LONG + "\n")
    res = site.gw.run("user", "add", "carol", "--role", "admin", "--password-file", str(pw),
                      check=False)
    assert res.returncode == 0, res.stderr                  # `fiona user add` crashed
    assert login(site.client(), "carol", LONG).status_code == 303


def test_unknown_and_known_users_cost_one_bcrypt_check(site: Site, monkeypatch):
    site.users.check("nobody", "warm up the dummy hash")
    calls: list[str] = []
    real_check, real_hash = bcrypt.checkpw, bcrypt.hashpw
    monkeypatch.setattr(users_module.bcrypt, "checkpw",
                        lambda *a: calls.append("check") or real_check(*a))
    monkeypatch.setattr(users_module.bcrypt, "hashpw",
                        lambda *a: calls.append("hash") or real_hash(*a))
    for name in ("alice", "nobody", "x" * 5000):
        calls.clear()
        assert site.users.check(name, "a wrong password") is None
        assert calls == ["check"], name                    # unknown users took two rounds


def test_a_legacy_raw_bcrypt_hash_still_logs_in_and_is_rehashed(site: Site):
    path = site.gw.datadir / "config" / "users.json"
    data = json.loads(path.read_text())
    data["users"]["alice"] = {"roles": ["project:A:assign"], "one_time": False,
                              "hash": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt()).decode()}
    path.write_text(json.dumps(data))
    assert login(site.client(), "alice", "wrong" + PASSWORD).status_code == 401
    assert login(site.client(), "alice", PASSWORD).status_code == 303
    assert json.loads(path.read_text())["users"]["alice"]["scheme"] == users_module.SCHEME
    assert login(site.client(), "alice", PASSWORD).status_code == 303


# --- password policy ----------------------------------------------------------------------------
def test_password_policy_and_current_password_on_change(site: Site):
    c = site.client("alice")
    for current, new, again, why in [
            ("wrong current pw", "a good new passphrase", None, "current password is wrong"),
            (PASSWORD, "short pw", None, "at least 12 characters"),
            (PASSWORD, "Alice", None, "at least 12"),
            (PASSWORD, PASSWORD, None, "differ from the current"),
            (PASSWORD, "a good new passphrase", "another passphrase", "differ")]:
        r = change_password(c, current, new, again)
        assert r.status_code == 400 and why in r.text, (new, r.text)
    site.users.add("longname.user", PASSWORD, [])
    c = site.client("longname.user")
    r = change_password(c, PASSWORD, "LongName.User")
    assert r.status_code == 400 and "must not be the user name" in r.text
    assert site.audit("password change refused")
    pw = site.gw.datadir.parent / "pw"
    pw.write_text("too short\n")
    res = site.gw.run("user", "add", "dave", "--role", "admin", "--password-file", str(pw),
                      check=False)
    assert res.returncode == 1 and "at least 12 characters" in res.stderr
    assert "dave" not in site.users.names()


# --- 4. throttling ------------------------------------------------------------------------------
def test_wrong_passwords_lock_the_user_with_a_growing_delay(site: Site):
    c = site.client()
    for _ in range(5):
        assert login(c, "alice", "a wrong password").status_code == 401
    assert login(c, "alice", "a wrong password").status_code == 401   # 6th: locked 2 s
    r = login(c, "alice", PASSWORD)
    assert r.status_code == 429 and "Too many failed logins" in r.text   # was: success
    assert r.headers["Retry-After"] == "2"
    other = site.client(address="192.0.2.7")            # the lock is on the user, any address
    assert login(other, "alice", PASSWORD).status_code == 429
    assert login(other, "admin", PASSWORD).status_code == 303   # other users are not locked
    site.clock.advance(2)
    assert login(c, "alice", "a wrong password").status_code == 401   # 7th: locked 4 s
    site.clock.advance(3)
    assert login(c, "alice", PASSWORD).status_code == 429
    site.clock.advance(1)
    assert login(c, "alice", PASSWORD).status_code == 303
    refused = site.audit("login refused")
    assert refused and refused[0]["user"] == "alice" and refused[0]["details"]["retry_after"] == 2
    assert site.audit("login failed")[-1]["details"]["locked_seconds"] == 4
    # success cleared the count: five free failures again
    for _ in range(5):
        assert login(c, "alice", "a wrong password").status_code == 401
    assert login(c, "alice", PASSWORD).status_code == 303


def test_many_failures_end_in_a_temporary_lockout(site: Site):
    c = site.client()
    for _ in range(20):
        r = login(c, "alice", "a wrong password")
        assert r.status_code in (401, 429)
        site.clock.advance(1000)   # wait out each delay: the delay grows to the 15-min cap
    assert login(c, "alice", "a wrong password").status_code == 401
    assert site.audit("login failed")[-1]["details"]["locked_seconds"] == 900
    site.clock.advance(899)
    assert login(c, "alice", PASSWORD).status_code == 429
    site.clock.advance(1)
    assert login(c, "alice", PASSWORD).status_code == 303


def test_one_address_guessing_many_user_names_is_locked(site: Site):
    c = site.client(address="192.0.2.10")
    for i in range(21):
        assert login(c, f"guess{i}", "a wrong password").status_code == 401
    assert login(c, "admin", PASSWORD).status_code == 429
    assert login(site.client(address="192.0.2.11"), "admin", PASSWORD).status_code == 303


def test_the_lockout_survives_a_restart_and_is_kept_keyed(site: Site):
    """A restart of `fiona web` (a new app on the same data tree) or a second web worker sees
    the same failures: killing the web process does not reset a lockout."""
    c = site.client(address="192.0.2.20")
    for _ in range(6):
        assert login(c, "alice", "a wrong password").status_code == 401   # 6th: locked 2 s
    restarted = create_app(site.config, clock=site.clock)     # was: a fresh, empty throttle
    c = TestClient(restarted, follow_redirects=False, client=("192.0.2.20", 50000))
    r = login(c, "alice", PASSWORD)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    # kept as keyed hashes in the sessions' file (0600), never the name or address in clear
    path = site.gw.datadir / "site" / "web-sessions.sqlite"
    assert path.stat().st_mode & 0o777 == 0o600
    rows = sqlite3.connect(path).execute("SELECT kind, key FROM login_throttle").fetchall()
    assert sorted(kind for kind, _ in rows) == ["address", "user"]
    assert all(re.fullmatch("[0-9a-f]{64}", key) for _, key in rows), rows
    site.clock.advance(2)
    assert login(c, "alice", PASSWORD).status_code == 303


def test_old_throttle_entries_expire(site: Site):
    c = site.client(address="192.0.2.30")
    for i in range(3):
        assert login(c, f"guess{i}", "a wrong password").status_code == 401
    db = sqlite3.connect(site.gw.datadir / "site" / "web-sessions.sqlite")
    assert db.execute("SELECT COUNT(*) FROM login_throttle").fetchone()[0] == 4  # 3 names, 1 addr.
    site.clock.advance(2 * 3600)                              # past `forget`
    assert login(site.client(address="192.0.2.31"), "bob", "wrong").status_code == 401
    assert db.execute("SELECT COUNT(*) FROM login_throttle").fetchone()[0] == 2  # bob, .31


# --- 5. server-side sessions ----------------------------------------------------------------------
def test_logout_revokes_the_session_cookie(site: Site):
    c = site.client("alice")
    stolen = c.cookies.get("fiona_session")
    assert stolen and c.get("/api/session").status_code == 200
    r = c.post("/logout", data={"csrf_token": csrf_of(c.get("/assign").text)})
    assert r.status_code == 303
    thief = site.client(cookies={"fiona_session": stolen})
    assert thief.get("/api/session").status_code == 401     # worked for 12 h before
    assert site.audit("logout")[-1]["user"] == "alice"
    raw = (site.gw.datadir / "site" / "web-sessions.sqlite").read_bytes()
    assert stolen.encode() not in raw


def test_a_password_change_ends_every_other_session(site: Site):
    laptop, phone = site.client("alice"), site.client("alice")
    old_cookie = phone.cookies.get("fiona_session")
    assert change_password(laptop, PASSWORD, "a brand new passphrase").status_code == 303
    assert laptop.get("/api/session").status_code == 200    # the changing session goes on
    assert phone.get("/api/session").status_code == 401
    assert site.client(cookies={"fiona_session": old_cookie}).get("/api/session").status_code \
        == 401
    assert site.audit("password changed")[-1]["details"]["sessions_ended"] == 2


def test_idle_timeout_and_absolute_lifetime(site: Site):
    c = site.client("alice")
    site.clock.advance(29 * 60)
    assert c.get("/api/session").status_code == 200
    site.clock.advance(29 * 60)                               # active: idle time restarts
    assert c.get("/api/session").status_code == 200
    site.clock.advance(31 * 60)
    assert c.get("/api/session").status_code == 401
    c = site.client("alice")
    for _ in range(26):
        site.clock.advance(29 * 60)
        c.get("/api/session")
    assert c.get("/api/session").status_code == 401           # 12 h after login at most


def test_an_expired_session_returns_the_user_where_they_were(site: Site):
    c = site.client("alice")
    site.clock.advance(31 * 60)
    r = c.get("/assign?project=A&q=x")
    assert r.status_code == 303
    assert r.headers["location"] == "/login?expired=1&next=/assign%3Fproject%3DA%26q%3Dx"
    page = c.get(r.headers["location"])
    assert "Your session has ended" in page.text
    assert 'value="/assign?project=A&amp;q=x"' in page.text
    r = login(c, "alice", PASSWORD, next="/assign?project=A&q=x")
    assert r.headers["location"] == "/assign?project=A&q=x"
    r = login(site.client(), "alice", PASSWORD, next="//evil.example/x")
    assert r.headers["location"] == "/"


@pytest.mark.parametrize("value", ["//evil.example", "https://evil.example/", "/\\evil.example",
                                   "javascript:alert(1)", "/login", "/\r\nSet-Cookie: x=1", ""])
def test_next_is_a_path_on_this_server_only(value: str):
    assert safe_next(value) == "/"


def test_a_forged_session_id_is_refused(site: Site):
    c = site.client(cookies={"fiona_session": "made-up"})
    assert c.get("/api/session").status_code == 401
    assert c.get("/status").headers["location"].startswith("/login?expired=1")


# --- 9. trusted proxies -------------------------------------------------------------------------
def test_remote_user_only_from_trusted_proxies(tmp_path: Path):
    s = Site(tmp_path, {"auth": "remote-user", "trusted_proxies": ["10.9.0.0/24", "::1"]})
    s.users.add("carol", None, ["admin"])
    header = {"REMOTE_USER": "carol"}
    assert s.client(address="127.0.0.1").get("/api/status", headers=header).status_code == 401
    assert s.client(address="192.0.2.5").get("/api/status", headers=header).status_code == 401
    assert s.client(address="10.9.0.7").get("/api/status", headers=header).status_code == 200
    assert s.client(address="::1").get("/api/status", headers=header).status_code == 200
    with pytest.raises(ConfigError, match="needs WEB.trusted_proxies"):
        Site(tmp_path / "b", {"auth": "remote-user"})
    with pytest.raises(ConfigError, match="not an IP address"):
        Site(tmp_path / "c", {"trusted_proxies": ["proxy.example.org"]})


def test_forwarded_for_only_from_trusted_proxies(tmp_path: Path):
    s = Site(tmp_path, {"trusted_proxies": ["127.0.0.1"]})
    spoof = {"X-Forwarded-For": "198.51.100.1, 192.0.2.99"}
    login(s.client(address="192.0.2.50"), "alice", "wrong password", )
    login(s.client(address="192.0.2.50", headers=spoof), "alice", "wrong password")
    login(s.client(address="127.0.0.1", headers=spoof), "alice", "wrong password")
    login(s.client(address="127.0.0.1", headers={"X-Forwarded-For": "192.0.2.98, 127.0.0.1"}),
          "alice", "wrong password")
    assert [e["details"]["address"] for e in s.audit("login failed")] == \
        ["192.0.2.50", "192.0.2.50", "192.0.2.99", "192.0.2.98"]


# --- 10. headers, CSP, docs, error pages, cookies -----------------------------------------------
def test_security_headers_on_every_response(site: Site):
    c = site.client("admin")
    for path in ["/login", "/assign", "/status", "/api/session", "/api/status", "/docs",
                 "/openapi.json", "/no-such-page"]:
        h = c.get(path).headers
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "http" not in csp, path
        assert h["x-content-type-options"] == "nosniff", path
        assert h["referrer-policy"] == "no-referrer", path
        assert h["cache-control"] == "no-store", path
    anonymous = site.client().get("/status")
    assert anonymous.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in anonymous.headers["content-security-policy"]
    css = site.client().get("/static/fiona.css")
    assert css.status_code == 200 and "no-store" not in css.headers.get("cache-control", "")


def test_no_inline_script_or_style_in_any_template():
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), template.name
        assert "<style" not in text and not re.search(r"\sstyle=", text), template.name
        assert not re.search(r"\son[a-z]+=", text), template.name
        assert "//cdn" not in text and "https://" not in text, template.name


def test_docs_served_from_local_assets(site: Site):
    c = site.client("admin")
    html = c.get("/docs").text
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/swagger/swagger-ui-bundle.js" in sources
    for src in sources:
        assert src.startswith("/static/") or src.startswith("data:"), src
        if src.startswith("/static/"):
            assert c.get(src).status_code == 200, src
    assert site.client().get("/docs").status_code == 401


def test_browser_errors_are_pages_with_a_way_back(site: Site):
    c = site.client("alice")
    html = {"Accept": "text/html,application/xhtml+xml"}
    r = c.get("/status/no-such-thing", headers=html)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert 'id="back"' in r.text and 'href="/"' in r.text
    site.users.add("norole", PASSWORD, [])
    r = site.client("norole").get("/assign", headers=html)
    assert r.status_code == 403 and "<h1" in r.text and 'id="back"' in r.text
    assert c.get("/api/study/1.2.3").headers["content-type"] == "application/json"
    r = site.client().post("/coupling", headers=html, data={"x": "1"})
    assert r.status_code == 401 and 'href="/login"' in r.text


def test_secure_cookies_from_config(tmp_path: Path):
    s = Site(tmp_path, {"secure_cookies": True})
    c = TestClient(s.app, base_url="https://testserver", follow_redirects=False)
    r = login(c, "alice", PASSWORD)
    assert r.status_code == 303
    cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and
              v.startswith("fiona_session=")][0]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    plain = Site(tmp_path / "plain")
    r = login(plain.client(), "alice", PASSWORD)
    assert "Secure" not in r.headers["set-cookie"]


# --- in Chromium: the CSP holds for real pages, an expired session returns where it was ---------
@pytest.fixture
def served(site: Site) -> Iterator[str]:
    """The app on a loopback port, in this process so the test can move its FakeClock."""
    server = uvicorn.Server(uvicorn.Config(site.app, host="127.0.0.1", port=free_port(),
                                           log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_pages_and_docs_run_under_the_csp_in_chromium(page: Page, site: Site, served: str):
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(f"{served}/status")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#current-user")).to_have_text("admin")
    assert page.evaluate("getComputedStyle(document.querySelector('nav')).display") == "flex"
    page.goto(f"{served}/docs")
    expect(page.locator(".swagger-ui .info")).to_contain_text("FIONA")  # blank before: CDN
    expect(page.get_by_text("/api/session").first).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-docs.png"))
    page.goto(f"{served}/no-such-page")
    expect(page.locator("#error-title")).to_have_text("Not found")
    page.locator("#back").click()
    expect(page.locator("#current-user")).to_have_text("admin")
    assert violations == []


def test_an_expired_session_in_the_browser_comes_back_after_login(page: Page, site: Site,
                                                                    served: str):
    page.goto(f"{served}/login")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{served}/status?tab=queues")
    expect(page.locator("#current-user")).to_have_text("admin")
    site.clock.advance(31 * 60)
    page.reload()
    expect(page.locator("#expired")).to_contain_text("Your session has ended")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-session-expired.png"))
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{served}/status?tab=queues")
    expect(page.locator("#current-user")).to_have_text("admin")
