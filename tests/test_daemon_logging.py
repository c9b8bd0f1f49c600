"""Daemon logs (fiona/daemon.py setup_logging): third-party loggers speak at WARNING and up
only, unless -v. pynetdicom at INFO logs every association step and every C-FIND response data
set, identifiers included, into the daemons' logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Gateway

#: a pynetdicom client run in a process set up as a daemon is (-v or not), against the receiver
CLIENT = """
import sys
from pathlib import Path
from pynetdicom import AE
from fiona.config import load
from fiona.daemon import setup_logging

site = load(sys.argv[1]).site(None)
print(setup_logging(site, "logtest", verbose=sys.argv[3] == "-v"))
ae = AE("LOGTEST")
ae.add_requested_context("1.2.840.10008.1.1")
assoc = ae.associate("127.0.0.1", int(sys.argv[2]), ae_title="FIONA")
assert assoc.is_established
assert assoc.send_c_echo().Status == 0
assoc.release()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_loggers_quiet_unless_verbose(gateway: Gateway, verbose: bool):
    gateway.start("storescp")
    res = subprocess.run([sys.executable, "-c", CLIENT, str(gateway.config), str(gateway.port),
                          "-v" if verbose else "-"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    log = Path(res.stdout.strip()).read_text()
    pynetdicom_lines = [line for line in log.splitlines() if "[pynetdicom" in line]
    if verbose:
        assert any(" INFO " in line for line in pynetdicom_lines), log
    else:
        assert pynetdicom_lines == [], log


def test_third_party_errors_are_logged_without_a_traceback(gateway: Gateway):
    """pynetdicom logs a dropped connection with its stack (the soak found them in the
    forwarder's log when Orthanc stopped mid-send); the daemons keep the line, not the stack."""
    import logging

    from fiona.config import load
    from fiona.daemon import setup_logging

    path = setup_logging(load(str(gateway.config)).site(None), "tbtest")
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        logging.getLogger("pynetdicom.transport").exception("Connection lost to %s", "PACS")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    assert "Connection lost to PACS (ConnectionResetError)" in text
    assert "Traceback" not in text
