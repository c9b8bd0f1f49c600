"""Playwright against Debian's Chromium (package `chromium`, /usr/bin/chromium): no browser
download, never `playwright install`.

pytest only collects fixtures from conftest.py files and test modules, so this override takes
effect where it is imported: `from browser import browser_type_launch_args  # noqa: F401`
in tests/conftest.py (all tests) or in a browser test module.

The Playwright driver (and the Chromium it launches) serves every browser test of the session,
so it is started without the test's and module's process marks (tests/procs.py): otherwise the
test or module that happened to start it would stop it at its end, and every later browser
test would fail with "Playwright connection closed". It keeps the session mark, so if it were
left running the session would still report it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from helpers import Gateway, listening, wait_for
from procs import session_wide

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run"]}


@pytest.fixture(scope="session")
def playwright(_pw_api_request_contexts):
    """pytest-playwright's fixture, with the driver started outside any test's or module's
    process mark."""
    with session_wide():
        pw = sync_playwright().start()
    if _pw_api_request_contexts:
        _pw_api_request_contexts.instrument(pw)
    yield pw
    pw.stop()


def start_web_and_log_in(page: Page, gw: Gateway, port: int, user: str, password: str,
                         role: str, folder: Path) -> str:
    """Add `user` with `role` (password from a file, as an admin would), start `fiona web` on
    `port`, log in on the page; the site's URL."""
    secret = folder / "password"
    secret.write_text(password + "\n")
    gw.run("user", "add", user, "--role", role, "--password-file", str(secret))
    gw.start("web")
    wait_for(lambda: listening(port), 30, "fiona web to listen")
    url = f"http://127.0.0.1:{port}"
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    return url
