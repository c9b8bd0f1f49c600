"""Browser tests: headless Chromium (Debian's `chromium`, driven by Playwright) against
`fiona web` started as a real process on loopback, with the whole chain running (storescp,
process-single-file, detect-study-arrival, anonymize-and-send to the default folder
destination) and studies sent with DCMTK's storescu.

Screenshots of every page land in `test-artifacts/` at the repository root (gitignored); the
confirm dialogs, the live status updates and the admin pages are driven as people use them."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from dicomgen import make_study  # noqa: E402
from helpers import Gateway, free_port, wait_for  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHAIN = ("storescp", "process-single-file", "detect-study-arrival", "anonymize-and-send")
NAMING = "^P[0-9]{4}$"
USER, PASSWORD = "alice", "correct horse battery staple 7"


class Site:
    def __init__(self, gw: Gateway, url: str, tmp: Path):
        self.gw, self.url, self.tmp = gw, url, tmp
        self._n = 0

    def send_study(self, accession: str) -> dict:
        """A small study sent with storescu; returns once the control plane knows it."""
        self._n += 1
        study = make_study(self.tmp / f"study{self._n}", n_series=2, images_per_series=3,
                           patient_id=f"NID{self._n:04d}", patient_name="Hansen^Ingrid",
                           accession=accession, seed=self._n)
        res = self.gw.storescu(self.tmp / f"study{self._n}")
        assert res.returncode == 0, res.stderr
        from fiona.config import load
        from fiona.control import open_control_plane
        cp = open_control_plane(load(str(self.gw.config)))
        wait_for(lambda: cp.study(study["study"]), 90, f"study {accession} to arrive")
        return study


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    web_port = free_port()
    gw = Gateway(tmp / "data", free_port(), {
        "STUDY_QUIET_SECONDS": 2, "WEB": {"host": "127.0.0.1", "port": web_port}})
    gw.run("project", "add", "PROJ", "--naming", NAMING, "--events", "baseline,followup")
    pw = tmp / "password"
    pw.write_text(PASSWORD + "\n")
    gw.run("user", "add", USER, "--role", "admin", "--password-file", str(pw))
    for daemon in (*CHAIN, "web"):
        gw.start(daemon)
    try:
        wait_for(lambda: _listening(web_port), 30, "fiona web to listen")
        ARTIFACTS.mkdir(exist_ok=True)
        yield Site(gw, f"http://127.0.0.1:{web_port}", tmp)
    finally:
        gw.stop_all()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


def login(page: Page, site: Site) -> None:
    page.goto(f"{site.url}/login")
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/assign$"))


def test_login_is_required_and_a_wrong_password_is_refused(page: Page, site: Site):
    page.goto(f"{site.url}/assign")
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(page.get_by_role("heading", name="FIONA login")).to_be_visible()
    shot(page, "login")
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#error")).to_contain_text("Wrong user name or password")
    expect(page.get_by_label("User name")).to_have_value(USER)
    shot(page, "login-failed")
    login(page, site)
    expect(page.get_by_role("heading", name="Studies waiting")).to_be_visible()
    expect(page.locator("#current-user")).to_have_text(USER)
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(f"{site.url}/status")
    expect(page).to_have_url(re.compile(r"/login$"))


def test_a_sent_study_is_assigned_in_the_browser_and_completes(page: Page, site: Site):
    study = site.send_study("WEBACC1")
    uid = study["study"]
    login(page, site)
    row = page.locator(f"tr.study-row[data-uid='{uid}']")
    expect(row).to_be_visible()
    expect(row).to_contain_text("WEBACC1")
    expect(row).to_contain_text("STORESCU")  # sender AE
    expect(row.locator("td").nth(5)).to_have_text("2")  # series
    expect(row.locator("td").nth(6)).to_have_text("6")  # images
    expect(row.locator("td.study-status")).to_have_text("waiting")
    shot(page, "assign")

    # the text filter
    page.get_by_label("Search").fill("no-such-accession")
    page.get_by_role("button", name="Filter").click()
    expect(row).to_have_count(0)
    expect(page.locator("#no-studies")).to_be_visible()
    page.get_by_label("Search").fill("WEBACC1")
    page.get_by_role("button", name="Filter").click()
    expect(row).to_be_visible()
    page.get_by_label("From").fill("2026-03-15")  # the study is of 2026-03-14, arrived today
    page.get_by_label("To").fill("2026-03-16")
    page.get_by_role("button", name="Filter").click()
    expect(row).to_have_count(0)
    expect(page.locator("#no-studies")).to_contain_text("No study matches the filter")
    page.get_by_label("From").fill("2026-03-14")
    page.get_by_label("To").fill("2026-03-14")
    page.get_by_role("button", name="Filter").click()
    expect(row).to_be_visible()

    row.get_by_role("link", name="Assign").click()
    expect(page).to_have_url(re.compile(rf"/assign/{re.escape(uid)}$"))
    expect(page.locator("#study-uid")).to_have_text(uid)
    expect(page.locator("#no-history")).to_be_visible()
    page.get_by_label("Project").select_option("PROJ")
    events = page.get_by_label("Event")
    expect(events.locator("option")).to_have_text(["baseline", "followup"])
    page.get_by_label("Participant").fill("P0101")
    events.select_option("followup")
    shot(page, "study")
    page.get_by_role("button", name="Review and confirm").click()

    # the confirm step: what will be sent, and the header before and after
    expect(page.get_by_role("heading", name=re.compile("Confirm"))).to_be_visible()
    summary = page.locator("#confirm-summary")
    expect(summary).to_contain_text("P0101")
    expect(summary).to_contain_text("new participant")
    expect(summary).to_contain_text("followup")
    expect(page.locator("#confirm-series tr")).to_have_count(3)  # header + 2 series
    expect(page.locator("#confirm-series")).to_contain_text("t1_mprage_sag")
    preview = page.locator("#preview")
    expect(page.locator("#preview-error")).to_have_count(0)
    name_row = preview.locator("tr", has_text="(0010,0010)")
    expect(name_row).to_contain_text("Hansen^Ingrid")
    expect(name_row).to_contain_text("P0101")
    shot(page, "confirm")
    page.get_by_role("button", name="Confirm and send").click()

    # back on the study page, the request is in the history and turns complete
    expect(page.locator("#message")).to_contain_text("PROJ/P0101/followup")
    request = page.locator("#history tr.request", has_text="P0101")
    expect(request).to_have_count(1)
    expect(request).to_contain_text("followup")

    # without a reload: static/fiona.js polls /api/requests and updates the row
    page.evaluate("window.fionaStayed = true")
    expect(request.locator("td.status")).to_have_text("complete", timeout=120_000)
    assert page.evaluate("window.fionaStayed === true"), "the page was reloaded"
    expect(request).to_have_count(1)
    mapped = request.locator("td").nth(6).inner_text().strip()
    assert re.fullmatch(r"[0-9.]+", mapped) and mapped != uid
    expect(request.locator("td.error-message")).to_have_text("")
    shot(page, "study-complete")

    # resend asks first, in a dialog; Cancel changes nothing
    page.get_by_role("button", name="Resend").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Send this study to PROJ again?")
    shot(page, "resend-dialog")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#message")).to_contain_text("PROJ/P0101/followup")
    page.get_by_role("button", name="Resend").click()
    dialog.get_by_role("button", name="Resend").click()
    expect(page).to_have_url(re.compile(r"done=resent"))
    expect(page.locator("#message")).to_contain_text("will be sent again")
    research = site.gw.datadir / "research"
    assert list(research.rglob("*")), "nothing reached the folder destination"

    # the study has left the waiting list, and Review shows the de-identified output
    page.get_by_role("link", name="Assign", exact=True).first.click()
    expect(page.locator(f"tr.study-row[data-uid='{uid}']")).to_have_count(0)
    page.get_by_role("link", name="Review").first.click()
    page.get_by_role("link", name="PROJ", exact=True).click()
    expect(page.get_by_role("heading", name="Review: PROJ")).to_be_visible()
    expect(page.locator("#review-summary")).to_contain_text("6 file(s) of 1 study")
    tags = page.locator("#review-tags")
    expect(tags.locator("tr", has_text="(0010,0020)")).to_contain_text("P0101 (6)")
    expect(tags).not_to_contain_text("Hansen")
    expect(tags).not_to_contain_text("WEBACC1")
    shot(page, "review")


def test_a_bad_participant_id_shows_the_project_rule(page: Page, site: Site):
    study = site.send_study("WEBACC2")
    login(page, site)
    page.goto(f"{site.url}/assign/{study['study']}")
    page.get_by_label("Project").select_option("PROJ")
    page.get_by_label("Participant").fill("patient-7")
    page.get_by_label("Event").select_option("baseline")
    page.get_by_role("button", name="Review and confirm").click()
    expect(page.locator("#error")).to_contain_text("patient-7")
    expect(page.locator("#naming-rule")).to_contain_text(NAMING)
    # the form keeps what was typed, so it can be corrected
    expect(page.get_by_label("Participant")).to_have_value("patient-7")
    expect(page.get_by_label("Event")).to_have_value("baseline")
    expect(page.locator("#no-history")).to_be_visible()
    shot(page, "bad-participant")


def test_a_coupling_list_upload_reports_each_line(page: Page, site: Site, tmp_path: Path):
    csv = tmp_path / "coupling.csv"
    csv.write_text("AccessionNumber,ProjectName,subjectid,eventname\n"
                   "CPL1,PROJ,P0201,baseline\n"       # line 2: accepted
                   "CPL2,PROJ,P0202,baseline\n"       # line 3: conflict with line 4
                   "CPL2,PROJ,P0203,baseline\n"       # line 4: conflict with line 3
                   "CPL3,PROJ,subject 9,baseline\n"   # line 5: bad participant ID
                   "CPL4,NOPROJ,P0204,baseline\n")    # line 6: unknown project
    login(page, site)
    page.get_by_role("link", name="Coupling list").click()
    expect(page.get_by_role("heading", name="Coupling-list upload")).to_be_visible()
    page.get_by_label("CSV file").set_input_files(str(csv))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#coupling-summary")).to_contain_text("1 line(s) accepted")
    report = page.locator("#coupling-report tr").filter(has=page.locator("td"))
    expect(report).to_have_count(5)
    expected = {2: "accepted", 3: "conflict", 4: "conflict", 5: "bad participant ID",
                6: "unknown project"}
    for i, (line, status) in enumerate(expected.items()):
        expect(report.nth(i).locator("td").first).to_have_text(str(line))
        expect(report.nth(i).locator("td.status")).to_have_text(status)
    expect(report.nth(1)).to_contain_text("lines 3, 4")
    expect(report.nth(3)).to_contain_text(NAMING)
    shot(page, "coupling")

    # a study whose accession is on the list is then assigned without anyone clicking
    study = site.send_study("CPL1")
    page.goto(f"{site.url}/assign/{study['study']}")
    request = page.locator("#history tr.request", has_text="P0201")

    def requested() -> bool:
        page.reload()
        return request.count() == 1
    wait_for(requested, 60, "the coupling list to make a request", interval=1)
    expect(request.locator("td").nth(8)).to_contain_text("coupling")


def test_status_page_shows_the_daemons_and_queues(page: Page, site: Site):
    login(page, site)
    page.get_by_role("link", name="Status", exact=True).click()
    expect(page.get_by_role("heading", name="Status", exact=True)).to_be_visible()
    shot(page, "status")
    for daemon in (*CHAIN, "web"):
        row = page.locator(f"#daemons tr[data-name='{daemon}']")
        expect(row).to_contain_text("running")
    expect(page.locator("#requests-failed")).to_have_text("0")
    expect(page.locator("#disk")).to_contain_text("% used")

    # a study that arrives shows in the queue without a reload
    waiting = int(page.locator("#studies-waiting").inner_text())
    page.evaluate("window.fionaStayed = true")
    site.send_study("WEBLIVE")
    expect(page.locator("#studies-waiting")).to_have_text(str(waiting + 1), timeout=30_000)
    assert page.evaluate("window.fionaStayed === true"), "the page was reloaded"


def test_turning_the_receiver_off_asks_first(page: Page, site: Site):
    login(page, site)
    page.goto(f"{site.url}/status")
    receive = page.locator("#switches tr[data-part='receive']")
    expect(receive.locator("td.state")).to_have_text("on")
    page.locator("#switch-receive").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("The receiver refuses new associations")
    shot(page, "status-switch-dialog")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(receive.locator("td.state")).to_have_text("on")
    assert (site.gw.datadir / "config" / "enabled").read_text().strip()[0] == "1"

    page.locator("#switch-receive").click()
    dialog.get_by_role("button", name="Turn off").click()
    expect(page).to_have_url(re.compile(r"/status\?done=switch$"))
    expect(receive.locator("td.state")).to_have_text("off")
    assert (site.gw.datadir / "config" / "enabled").read_text().strip()[0] == "0"
    shot(page, "status-receiver-off")
    page.locator("#switch-receive").click()  # turning on needs no confirmation
    expect(receive.locator("td.state")).to_have_text("on")



def test_without_javascript_a_confirmation_page_asks(site: Site, browser):
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        login(page, site)
        page.goto(f"{site.url}/status")
        page.locator("#switch-scanner").click()
        expect(page.locator("#confirm-question")).to_contain_text("Turn scanner off?")
        shot(page, "confirm-page")
        page.locator("#confirm-cancel").click()
        expect(page).to_have_url(re.compile(r"/status$"))
        assert (site.gw.datadir / "config" / "enabled").read_text().strip()[1] == "1"
        page.locator("#switch-scanner").click()
        page.locator("#confirm-yes").click()
        expect(page).to_have_url(re.compile(r"/status\?done=switch$"))
        expect(page.locator("#switches tr[data-part='scanner'] td.state")).to_have_text("off")
        page.locator("#switch-scanner").click()  # on again, no question
        expect(page.locator("#switches tr[data-part='scanner'] td.state")).to_have_text("on")
    finally:
        context.close()


def test_every_other_page_has_its_screenshot(page: Page, site: Site):
    login(page, site)
    page.goto(f"{site.url}/password")
    expect(page.get_by_role("heading", name="Choose a new password")).to_be_visible()
    shot(page, "password")
    page.goto(f"{site.url}/no/such/page")
    expect(page.locator("#error-title")).to_have_text("Not found")
    shot(page, "error-404")
    page.locator("#back").click()
    expect(page).to_have_url(re.compile(r"/assign$"))
    page.goto(f"{site.url}/review")
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    shot(page, "review-index")
    page.goto(f"{site.url}/docs")
    expect(page.locator(".swagger-ui .title").first).to_contain_text("FIONA", timeout=30_000)
    shot(page, "docs")


def test_an_admin_manages_users(page: Page, site: Site, browser):
    login(page, site)
    page.get_by_role("link", name="Users").click()
    expect(page.get_by_role("heading", name="Users")).to_be_visible()
    page.get_by_label("User name").fill("carol")
    page.get_by_label("PROJ assign").check()
    page.get_by_role("button", name="Add user").click()
    expect(page.locator("#message")).to_have_text("User carol added.")
    one_time = page.locator("#one-time-password").inner_text().strip()
    expect(page.locator("#users tr[data-name='carol']")).to_contain_text("project:PROJ:assign")
    shot(page, "admin-users")

    # carol logs in with it, must choose her own password, then works
    other = browser.new_context()
    try:
        carol = other.new_page()
        carol.goto(f"{site.url}/login")
        carol.get_by_label("User name").fill("carol")
        carol.get_by_label("Password").fill(one_time)
        carol.get_by_role("button", name="Log in").click()
        expect(carol).to_have_url(re.compile(r"/password$"))
        carol.get_by_label("Current password").fill(one_time)
        carol.get_by_label("New password").fill("carol's own long passphrase")
        carol.get_by_label("Again").fill("carol's own long passphrase")
        carol.get_by_role("button", name="Save password").click()
        expect(carol).to_have_url(re.compile(r"/assign$"))
        expect(carol.locator("#nav-users")).to_have_count(0)  # no admin pages for her
        carol.goto(f"{site.url}/admin/users")
        expect(carol.locator("#error-title")).to_have_text("Not allowed")
        shot(carol, "admin-forbidden")
    finally:
        other.close()

    # roles, then a password reset and the removal, each asked in a dialog
    page.locator("#users tr[data-name='carol']").get_by_role("link", name="Edit").click()
    expect(page.get_by_role("heading", name="User carol")).to_be_visible()
    page.get_by_label("PROJ review").check()
    page.get_by_role("button", name="Save roles").click()
    expect(page.locator("#message")).to_have_text("Roles of carol saved.")
    expect(page.locator("#users tr[data-name='carol']")).to_contain_text("project:PROJ:review")
    page.locator("#users tr[data-name='carol']").get_by_role("link", name="Edit").click()
    shot(page, "admin-user")
    page.get_by_role("button", name="Reset password").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text("new one-time password")
    dialog.get_by_role("button", name="Reset password").click()
    expect(page.locator("#one-time-password")).not_to_have_text(one_time)
    page.locator("#users tr[data-name='carol']").get_by_role("link", name="Edit").click()
    page.get_by_role("button", name="Remove").click()
    shot(page, "admin-user-remove-dialog")
    dialog.get_by_role("button", name="Remove").click()
    expect(page.locator("#message")).to_have_text("User carol removed.")
    expect(page.locator("#users tr[data-name='carol']")).to_have_count(0)


def test_an_admin_manages_projects(page: Page, site: Site):
    login(page, site)
    page.get_by_role("link", name="Projects").click()
    expect(page.locator("#projects tr[data-name='PROJ']")).to_contain_text("active")
    shot(page, "admin-projects")
    page.get_by_role("button", name="Add a project").click()
    page.get_by_label("Acronym").fill("NEWP")
    page.get_by_label("Full name").fill("A new project with a rather long descriptive name")
    page.get_by_label("Participant-ID rule").fill("^N[0-9")
    page.get_by_label("Events").fill("screening, month 6")
    page.get_by_label("From").fill("2026-01-01")
    page.get_by_label("Until").fill("2028-12-31")
    page.get_by_role("button", name="Add project").click()
    expect(page.locator("#error")).to_contain_text("not a valid regular expression")
    expect(page.get_by_label("Events")).to_have_value("screening, month 6")
    shot(page, "admin-project-error")
    page.get_by_label("Participant-ID rule").fill("^N[0-9]{3}$")
    page.get_by_role("button", name="Add project").click()
    expect(page.locator("#message")).to_have_text("Project NEWP added.")
    row = page.locator("#projects tr[data-name='NEWP']")
    expect(row).to_contain_text("month 6")
    expect(row).to_contain_text("2026-01-01 – 2028-12-31")
    row.get_by_role("link", name="Edit").click()
    shot(page, "admin-project")
    page.get_by_label("Active").uncheck()
    page.get_by_role("button", name="Save project").click()
    expect(page.locator("#message")).to_have_text("Project NEWP saved.")
    expect(row).to_contain_text("inactive")
    from fiona.config import load
    from fiona.control import open_control_plane
    project = open_control_plane(load(str(site.gw.config))).project("NEWP")
    assert (project.naming, project.events, project.active) == \
        ("^N[0-9]{3}$", ["screening", "month 6"], False)


def test_a_long_list_pages_sorts_and_never_stretches(page: Page, site: Site):
    """Last in the module: the studies it registers are waiting for the other tests too."""
    from fiona.config import load
    from fiona.control import open_control_plane
    from fiona.control.base import Series, Study
    cp = open_control_plane(load(str(site.gw.config)))
    for i in range(60):
        cp.register_study(Study(
            f"1.2.826.0.1.3680043.10.99.{i}", description=f"Bulk {i:02d} " + "x" * (
                30000 if i == 7 else 0), date=f"2019{1 + i % 12:02d}15", time="080000",
            accession=f"BULK{i:02d}", arrival=f"2020-01-01 10:{i:02d}:00",
            calling_ae="BULKSCU", series=[Series(uid=f"1.2.826.0.1.3680043.10.99.{i}.1",
                                                 num_files=1, modality="CT")]))
    login(page, site)
    page.get_by_label("Search").fill("BULK")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#studies-total")).to_have_text("60 studies, page 1 of 2")
    expect(page.locator("tr.study-row")).to_have_count(50)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"] + 1, f"the page is {width} px wide"
    shot(page, "assign-many")
    page.locator("#page-next").click()
    expect(page.locator("#studies-total")).to_have_text("60 studies, page 2 of 2")
    expect(page.locator("tr.study-row")).to_have_count(10)
    page.locator("#sort-accession").click()  # back to page 1, newest accession first
    expect(page.locator("tr.study-row").first).to_contain_text("BULK59")
    page.locator("#sort-accession").click()
    expect(page.locator("tr.study-row").first).to_contain_text("BULK00")
    expect(page.get_by_label("Search")).to_have_value("BULK")  # the filter stays
    long_cell = page.locator("tr.study-row[data-uid='1.2.826.0.1.3680043.10.99.7'] .long")
    assert len(long_cell.get_attribute("title")) == 4000
    page.get_by_label("From").fill("2019-03-01")
    page.get_by_label("To").fill("2019-03-31")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("tr.study-row")).to_have_count(5)  # i = 2, 14, 26, 38, 50
    shot(page, "assign-filtered")
