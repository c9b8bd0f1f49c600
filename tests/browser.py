"""Playwright against Debian's Chromium (package `chromium`, /usr/bin/chromium): no browser
download, never `playwright install`.

pytest only collects fixtures from conftest.py files and test modules, so this override takes
effect where it is imported: `from browser import browser_type_launch_args  # noqa: F401`
in tests/conftest.py (all tests) or in a browser test module.
"""

from __future__ import annotations

import pytest

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run"]}
