"""The pages as people use them: the Assign list's sorting, date range, status column and
empty states, long values that cannot stretch a page, readable dates, confirmation pages for
browsers without JavaScript, polls that do not keep a session alive, and no inline script or
style anywhere (the Content-Security-Policy forbids them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fiona.web import context
from webapp import WebSite

TEMPLATES = Path(context.__file__).parent / "templates"


@pytest.fixture
def site(tmp_path: Path) -> WebSite:
    return WebSite(tmp_path)


def uids_in(page: str) -> list[str]:
    return re.findall(r'class="study-row" data-uid="([^"]+)"', page)


@pytest.mark.parametrize("value, time, shown", [
    ("2025-06-14 05:30:12", "", "2025-06-14 05:30"),
    ("2025-06-14T05:30:12+02:00", "", "2025-06-14 05:30"),
    ("20250614", "053012.5", "2025-06-14 05:30"),
    ("20250614", "", "2025-06-14"),
    ("", "", ""),
    ("soon", "", "soon")])
def test_one_readable_form_for_every_date(value, time, shown):
    assert context.when(value, time) == shown


def test_templates_have_no_inline_script_or_style():
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), path.name
        assert not re.search(r"\sstyle=|<style|\son[a-z]+=", text), path.name


def test_a_long_value_is_cut_on_the_page_with_the_full_value_on_hover(site: WebSite):
    long_text = "T1 MPRAGE " + "x" * 30000
    uid = site.study(description=long_text)
    admin = site.client("admin")
    for url in ("/assign", f"/assign/{uid}"):
        page = admin.get(url).text
        assert "x" * 4001 not in page, url
        assert re.search(r'<span class="long" title="T1 MPRAGE x{3990}', page), url


def test_assign_list_sorts_filters_by_date_range_and_shows_status(site: WebSite):
    old = site.study("ACC-B", "Brain", date="20260101", arrival="2026-01-02 08:00:00")
    mid = site.study("ACC-C", "Abdomen", date="20260301", arrival="2026-03-01 09:00:00")
    new = site.study("ACC-A", "Chest", date="20260601", arrival="2026-06-01 10:00:00")
    alice = site.client("alice")
    assert uids_in(alice.get("/assign").text) == [new, mid, old]  # newest arrival first
    assert uids_in(alice.get("/assign?sort=description&order=asc").text) == [mid, old, new]
    assert uids_in(alice.get("/assign?sort=accession&order=desc").text) == [mid, old, new]
    assert uids_in(alice.get("/assign?sort=bogus").text) == [new, mid, old]
    page = alice.get("/assign?sort=date&order=asc").text
    assert 'aria-sort="ascending"' in page and uids_in(page) == [old, mid, new]
    # the sort link of a sorted column turns the order round and keeps the filter
    link = re.search(r'id="sort-date" href="([^"]+)"', page).group(1)
    assert "order=desc" in link
    page = alice.get("/assign?q=ACC&sort=date&order=asc").text
    assert "q=ACC" in re.search(r'id="sort-date" href="([^"]+)"', page).group(1)
    # a date range, on the study date or the arrival day
    assert uids_in(alice.get("/assign?from=2026-02-01&to=2026-04-30").text) == [mid]
    assert uids_in(alice.get("/assign?from=2026-03-02").text) == [new]
    assert uids_in(alice.get("/assign?to=2026-01-01").text) == [old]
    assert uids_in(alice.get("/assign?from=2026-01-02&to=2026-01-02").text) == [old]
    assert "2026-03-01 10:15" in page  # the study date and time, readable

    # assigned studies leave the list; "include assigned" shows them with their status
    site.request(mid, "A", "A001")
    site.request(old, "B", "B001")
    assert uids_in(alice.get("/assign").text) == [new]
    page = alice.get("/assign?all=1").text
    assert uids_in(page) == [new, mid]  # alice sees nothing of B's study (fiona.access)
    status = re.findall(r'<td class="study-status">(.*?)</td>', page)
    assert "waiting" in status[0] and "A: pending" in status[1]
    page = site.client("admin").get("/assign?all=1&sort=status&order=asc").text
    assert uids_in(page)[1:] == [mid, old] and "B: pending" in page


def test_the_empty_list_says_whether_nothing_waits_or_nothing_matches(site: WebSite):
    alice = site.client("alice")
    page = alice.get("/assign").text
    assert 'class="empty nothing-waiting"' in page and "Nothing is waiting" in page
    site.study("ACC1")
    page = alice.get("/assign?q=no-such-study").text
    assert 'class="empty no-match"' in page and "No study matches the filter" in page
    assert 'id="clear-filter"' in page
    assert 'id="no-studies"' not in alice.get("/assign").text


def test_confirmation_pages_for_browsers_without_javascript(site: WebSite):
    uid = site.study()
    site.request(uid, "A", "A001")
    admin, alice = site.client("admin"), site.client("alice")
    page = admin.get("/status").text
    # the switch form asks first: a GET to the confirmation page, which posts the change
    assert re.search(r'<form method="get" action="/status/switch" class="confirm-form" '
                     r'data-post="/status/switch"', page)
    confirm = admin.get("/status/switch?part=receive&value=0")
    assert confirm.status_code == 200 and 'action="/status/switch"' in confirm.text
    assert 'name="value" value="0"' in confirm.text
    assert (site.gw.datadir / "config" / "enabled").read_text().strip() == "111"  # not yet
    assert alice.get("/status/switch?part=receive&value=0").status_code == 403
    assert admin.get("/status/switch?part=nothing").status_code == 404
    confirm = admin.get(f"/assign/{uid}/resend?project=A")
    assert confirm.status_code == 200 and f'action="/assign/{uid}/resend"' in confirm.text
    assert admin.get(f"/assign/{uid}/resend?project=B").status_code == 404
    assert alice.get(f"/assign/{uid}/resend?project=A").status_code == 403


def test_a_poll_does_not_keep_an_idle_session_alive(site: WebSite):
    poller, worker = site.client("alice"), site.client("alice")
    poll = {"X-Fiona-Poll": "1"}
    site.clock.advance(20 * 60)
    assert poller.get("/api/status", headers=poll).status_code == 200
    assert worker.get("/api/status").status_code == 200  # a person at work
    site.clock.advance(20 * 60)  # 40 minutes since the poller's last click: idle limit 30
    assert poller.get("/api/status", headers=poll).status_code == 401
    assert worker.get("/api/status").status_code == 200


def test_status_shows_the_scans_and_the_last_heartbeat(site: WebSite):
    """Issue 9: the Status page shows active, finished and failed scans (MPPS), and issue 13
    the last heartbeat, as `fiona status` does."""
    from fiona.ops.heartbeat import DONE, LOG_NAME
    from fiona.scanner.steps import Steps

    Steps(site.gw.datadir).conclude("1.2.3.4", "failed", ["1.2.3.4.1"], 0.0)
    logs = site.gw.datadir / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{LOG_NAME}.log").write_text(f"2026-11-29 10:00:00,000 INFO [fiona.heartbeat] "
                                         f"{DONE} all receivers answered\n")
    page = site.client("alice").get("/status").text
    assert 'id="scans-failed">1<' in page and 'id="scans-active">0<' in page
    assert "Last heartbeat: 2026-11-29 10:00" in page and "all receivers answered" in page


def test_a_bad_field_and_a_server_bug_answer_with_pages_not_raw_errors(site: WebSite, caplog):
    c = site.client("alice")
    html = {"accept": "text/html"}
    r = c.get("/assign?page=SECRETVALUE", headers=html)
    assert r.status_code == 422 and "text/html" in r.headers["content-type"]
    assert 'id="error-title"' in r.text and "page" in r.text
    assert "SECRETVALUE" not in r.text                     # the value typed is not echoed
    assert c.get("/api/studies?page=x").headers["content-type"].startswith("application/json")

    def boom():
        raise RuntimeError("Doe^Jane")                     # a message that would identify
    site.app.add_api_route("/boom", boom)
    site.app.add_api_route("/api/boom", boom)
    c = TestClient(site.app, raise_server_exceptions=False, follow_redirects=False)
    c.cookies = site.client("alice").cookies
    with caplog.at_level("ERROR", logger="fiona.web"):
        page = c.get("/boom", headers=html)
        api = c.get("/api/boom")
    assert page.status_code == 500 and 'id="error-title"' in page.text
    ref = re.search(r"reference ([0-9a-f]{8})", page.text).group(1)
    assert api.status_code == 500 and "reference" in api.json()["detail"]
    assert page.headers["x-content-type-options"] == "nosniff"
    logged = caplog.text
    assert ref in logged and "RuntimeError" in logged and "Doe^Jane" not in logged
    assert "Traceback" not in logged
