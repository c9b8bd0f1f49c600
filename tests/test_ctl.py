"""`fiona ctl` (fiona/ctl.py) over the suite table (fiona/suite.py): every daemon is started
detached, queried, killed with -9 and found stopped, started again and stopped, as an admin runs
it; bad names get the list of valid ones; a pid file naming a live unrelated process is never
taken for the daemon. Daemons are real processes; what a test leaves running is stopped by
conftest's autouse fixture (procs.py: the daemons inherit the test's mark).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from fiona.config import load
from fiona.suite import DAEMONS, RECEIVER, daemon
from helpers import Gateway, dcmtk, free_port, wait_for
from procs import alive

pytestmark = pytest.mark.e2e


def ctl(gw: Gateway, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(gw.command("ctl", *args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(res: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert res.returncode == code, (f"exit {res.returncode}, expected {code}\n"
                                    f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def pid_of(gw: Gateway, name: str, site: str | None = None) -> int:
    config = load(str(gw.config))
    return int(daemon(name).pid_path(config.site(site)).read_text())


@pytest.fixture
def gw(make_gateway) -> Gateway:
    # MPPSPORT and a scanner (no one listens there): the MPPS SCP and the pull run only with them
    return make_gateway(WEB={"host": "127.0.0.1", "port": free_port()}, MPPSPORT=free_port(),
                        SCANNERIP="127.0.0.1", SCANNERPORT=free_port(), SCANNERAETITLE="SCANNER")


@pytest.mark.parametrize("name", [d.command for d in DAEMONS])
def test_start_status_kill9_start_stop(gw: Gateway, name: str):
    ok(ctl(gw, "status", name), 3)
    try:
        res = ok(ctl(gw, "start", name))
        assert "started" in res.stdout
        first = pid_of(gw, name)
        assert alive(first)
        res = ok(ctl(gw, "status", name))
        assert "running" in res.stdout and str(first) in res.stdout
        assert "already running" in ok(ctl(gw, "start", name)).stdout

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not alive(first), 30, "the killed daemon to go")
        res = ok(ctl(gw, "status", name), 3)
        assert "stale pid file" in res.stdout

        ok(ctl(gw, "start", name))
        second = pid_of(gw, name)
        assert second != first and alive(second)
        res = ok(ctl(gw, "stop", name))
        assert "stopped" in res.stdout
        assert not alive(second)
        ok(ctl(gw, "status", name), 3)
        ok(ctl(gw, "stop", name))  # stopping a stopped daemon is fine
    finally:
        ctl(gw, "stop", name)


def test_receiver_is_ready_when_start_returns_and_legacy_name(gw: Gateway):
    try:
        ok(ctl(gw, "start", "storectl.sh"))  # the legacy name works too
        res = subprocess.run([dcmtk("echoscu"), "-aec", "FIONA", "127.0.0.1", str(gw.port)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        ok(ctl(gw, "restart", "storescp"))
        assert alive(pid_of(gw, "storescp"))
    finally:
        ctl(gw, "stop", "storescp")


def test_unknown_daemon_or_site_lists_the_valid_names(make_gateway):
    gw = make_gateway(SITES={"CT": {"DATADIR": "../ct", "DICOMPORT": free_port()}})
    res = ok(ctl(gw, "status", "nope"), 2)
    for d in DAEMONS:
        assert d.command in res.stderr and d.legacy in res.stderr
    ok(ctl(gw, "status", ""), 2)
    res = ok(ctl(gw, "start", "storescp", "--site", "NOPE"), 2)
    assert "unknown site 'NOPE'" in res.stderr and "CT" in res.stderr
    res = ok(ctl(gw, "wake", "storescp"), 2)
    assert "process-single-file" in res.stderr


def test_site_daemon(make_gateway):
    port = free_port()
    gw = make_gateway(SITES={"CT": {"DATADIR": "../ct", "DICOMPORT": port}})
    try:
        res = ok(ctl(gw, "start", "storescp", "--site", "CT"))
        assert "storescpdCT" in res.stdout
        assert (gw.datadir / "ct" / "site" / "run" / "storescpdCT.pid").exists()
        ok(ctl(gw, "status", "storescp", "--site", "CT"))
        ok(ctl(gw, "status", "storescp"), 3)
    finally:
        ctl(gw, "stop", "storescp", "--site", "CT")


def test_a_pid_file_naming_an_unrelated_live_process(gw: Gateway):
    """The file is not locked: stopped; stop signals nobody, start starts the daemon."""
    pidf = RECEIVER.pid_path(load(str(gw.config)).site(None))
    pidf.parent.mkdir(parents=True, exist_ok=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pidf.write_text(f"{bystander.pid}\n")
        assert "stale" in ok(ctl(gw, "status", "storescp"), 3).stdout
        assert "not running" in ok(ctl(gw, "stop", "storescp")).stdout
        assert bystander.poll() is None and not pidf.exists()
        pidf.write_text(f"{bystander.pid}\n")
        ok(ctl(gw, "start", "storescp"))
        assert pid_of(gw, "storescp") != bystander.pid
        ok(ctl(gw, "stop", "storescp"))
        assert bystander.poll() is None
    finally:
        ctl(gw, "stop", "storescp")
        bystander.kill()
        bystander.wait()


def test_start_reports_a_daemon_that_dies_starting(gw: Gateway):
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", gw.port))
        blocker.listen()
        res = ok(ctl(gw, "start", "storescp"), 1)
    assert "exited during start-up" in res.stderr and "Address already in use" in res.stderr
    assert not RECEIVER.pid_path(load(str(gw.config)).site(None)).exists()
    ok(ctl(gw, "status", "storescp"), 3)


def test_a_second_instance_names_its_own_stop_command(gw: Gateway):
    try:
        ok(ctl(gw, "start", "process-single-file"))
        res = gw.run("process-single-file", check=False)
        assert res.returncode == 1
        assert "already running" in res.stderr
        assert "fiona ctl stop process-single-file" in res.stderr
        assert "processSingleFile3.py" in res.stderr
        assert "fiona-process-single-file.service" in res.stderr
        assert "storectl" not in res.stderr
    finally:
        ctl(gw, "stop", "process-single-file")


def test_wake(gw: Gateway):
    res = ok(ctl(gw, "wake", "process-single-file"))
    assert "not running" in res.stdout and "journal" in res.stdout
    try:
        ok(ctl(gw, "start", "process-single-file"))
        assert "woke" in ok(ctl(gw, "wake", "processSingleFile3.py")).stdout
    finally:
        ctl(gw, "stop", "process-single-file")
