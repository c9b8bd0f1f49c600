"""Shared fixtures: a real FIONA data tree with its daemons as processes, and DCMTK clients.

Everything here talks to real peers: the daemons run as `python -m fiona ...` processes exactly
as systemd starts them, and DICOM is sent with DCMTK's storescu/echoscu (Debian package
`dcmtk`, installed by `make test`).

Every process a test starts is stopped at the end of the test, children included (procs.py);
a run that leaves one behind fails. Tests that start daemons, Orthanc, DCMTK or Chromium are
marked `e2e`, so `pytest -m "not e2e"` is the quick loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from browser import browser_type_launch_args, playwright  # noqa: F401 - /usr/bin/chromium, one driver
from helpers import Gateway, free_port
from orthanc import orthanc  # noqa: F401 - a real Orthanc as the research PACS
from procs import (  # noqa: F401 - autouse fixtures and hooks: stop what the tests started
    _stop_module_processes,
    _stop_test_processes,
    pytest_configure,
    pytest_sessionfinish,
)
from slapd import slapd  # noqa: F401 - a real OpenLDAP slapd for LDAP logins

#: fixtures that start processes: a test that uses one is end-to-end
E2E_FIXTURES = frozenset({"gateway", "make_gateway", "orthanc", "page", "browser", "slapd"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `e2e` the tests that use a process-starting fixture (modules that start processes
    themselves say `pytestmark = pytest.mark.e2e`)."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def gateway(tmp_path: Path):
    gw = Gateway(tmp_path / "data", free_port())
    yield gw
    gw.stop_all()


@pytest.fixture
def make_gateway(tmp_path: Path):
    """A factory for gateways with extra config keys (e.g. DISK)."""
    made: list[Gateway] = []

    def factory(name: str = "data", **extra) -> Gateway:
        gw = Gateway(tmp_path / name, free_port(), extra)
        made.append(gw)
        return gw
    yield factory
    for gw in made:
        gw.stop_all()
