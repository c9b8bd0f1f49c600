"""Shared fixtures: a real FIONA data tree with its daemons as processes, and DCMTK clients.

Everything here talks to real peers: the daemons run as `python -m fiona ...` processes exactly
as systemd starts them, and DICOM is sent with DCMTK's storescu/echoscu (Debian package
`dcmtk`, installed by `make test`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from browser import browser_type_launch_args  # noqa: F401 - Playwright uses /usr/bin/chromium
from helpers import Gateway, free_port
from orthanc import orthanc  # noqa: F401 - a real Orthanc as the research PACS


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
