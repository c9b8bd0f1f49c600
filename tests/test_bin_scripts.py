"""The legacy scripts in bin/ (SPEC §3, §4, §10): shims over `fiona ctl` that keep the original
names, arguments and LSB exit codes (systemd/ and cron/fiona: tests/test_systemd.py).

The scripts run as an admin runs them: as programs, with the configuration in $FIONA_CONFIG,
against a real data tree; the daemons they start are real processes, checked through the pid files
the daemons write and through DCMTK's echoscu/storescu. What a test leaves running, even after a
failure, is stopped by conftest's autouse fixture (procs.py: the daemons inherit the test's mark).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from fiona.config import Site, load
from fiona.suite import INDEXER, RECEIVER, daemon
from helpers import Gateway, dcmtk, free_port, wait_for
from procs import alive

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
STORECTL = REPO / "bin" / "storectl.sh"
PSF = REPO / "bin" / "processSingleFile3.py"
ARRIVAL = REPO / "bin" / "detectStudyArrival.sh"
FORWARD = REPO / "bin" / "anonymizeAndSend.py"
CT_SMALL = get_testdata_file("CT_small.dcm")


# --- helpers ------------------------------------------------------------------------------------
def script(gw: Gateway, tool: Path, *args: str, timeout: float = 120,
           config: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FIONA_CONFIG": config or str(gw.config),
           # the interpreter that runs these tests has fiona's dependencies
           "FIONA_PYTHON": sys.executable}
    argv = [sys.executable, str(tool), *args] if tool.suffix == ".py" else [str(tool), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=gw.datadir.parent)


def ok(res: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert res.returncode == code, (f"exit {res.returncode}, expected {code}\n"
                                    f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def pid_in(path: Path) -> int:
    return int(path.read_text().strip())


def site_of(gw: Gateway, site: str | None = None) -> Site:
    return load(str(gw.config)).site(site)


def pid_file(gw: Gateway, command: str, site: str | None = None) -> Path:
    return daemon(command).pid_path(site_of(gw, site))


def echo(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aec", "FIONA", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


# --- storectl.sh --------------------------------------------------------------------------------
def test_storectl_start_echo_status_stop(gateway: Gateway):
    pidf = pid_file(gateway, "storescp")
    ok(script(gateway, STORECTL, "status"), 3)
    try:
        res = ok(script(gateway, STORECTL, "start"))
        assert "started" in res.stdout
        pid = pid_in(pidf)
        assert alive(pid)

        assert echo(gateway.port).returncode == 0, "C-ECHO to the started receiver failed"

        res = ok(script(gateway, STORECTL, "status"))
        assert "running" in res.stdout and str(pid) in res.stdout

        # a second start leaves the running receiver alone
        res = ok(script(gateway, STORECTL, "start"))
        assert "already running" in res.stdout
        assert pid_in(pidf) == pid

        res = ok(script(gateway, STORECTL, "stop"))
        assert "stopped" in res.stdout
        assert not alive(pid)
        assert not pidf.exists()
        res = ok(script(gateway, STORECTL, "status"), 3)
        assert "stopped" in res.stdout
        assert echo(gateway.port).returncode != 0
        ok(script(gateway, STORECTL, "stop"))  # stopping a stopped receiver is fine
    finally:
        script(gateway, STORECTL, "stop")
    assert RECEIVER.log_path(site_of(gateway)).exists()


def test_storectl_restart(gateway: Gateway):
    pidf = pid_file(gateway, "storescp")
    try:
        ok(script(gateway, STORECTL, "start"))
        first = pid_in(pidf)
        ok(script(gateway, STORECTL, "restart"))
        second = pid_in(pidf)
        assert second != first and alive(second) and not alive(first)
        assert echo(gateway.port).returncode == 0
    finally:
        script(gateway, STORECTL, "stop")


def test_storectl_site(make_gateway):
    site_port = free_port()
    # a relative SITES DATADIR is relative to the folder holding config.json
    gw = make_gateway(SITES={"CT": {"DATADIR": "../ct", "DICOMPORT": site_port}})
    pidf = pid_file(gw, "storescp", "CT")
    assert pidf.is_relative_to(gw.datadir / "ct")
    try:
        res = ok(script(gw, STORECTL, "start", "CT"))
        assert "storescpdCT" in res.stdout
        assert alive(pid_in(pidf))
        assert echo(site_port).returncode == 0
        assert echo(gw.port).returncode != 0, "only the site's receiver was started"
        ok(script(gw, STORECTL, "status", "CT"))
        ok(script(gw, STORECTL, "status"), 3)
        assert RECEIVER.log_path(site_of(gw, "CT")).exists()
        ok(script(gw, STORECTL, "stop", "CT"))
        ok(script(gw, STORECTL, "status", "CT"), 3)
    finally:
        script(gw, STORECTL, "stop", "CT")


def test_storectl_refuses_bad_site_and_config(gateway: Gateway):
    res = ok(script(gateway, STORECTL, "start", "../x"), 2)
    assert "invalid SITE" in res.stderr
    res = ok(script(gateway, STORECTL, "start", "NOPE"), 6)
    assert "unknown site 'NOPE'" in res.stderr
    ok(script(gateway, STORECTL, "bogus"), 2)
    ok(script(gateway, STORECTL), 2)
    res = ok(script(gateway, STORECTL, "status", config=str(gateway.datadir / "missing.json")), 4)
    assert "missing.json" in res.stderr


def test_storectl_ignores_stale_or_foreign_pid_file(gateway: Gateway):
    """A pid file naming a dead process, or a live process that is not the receiver (pid
    reuse), does not count as running and does not block a start."""
    pidf = pid_file(gateway, "storescp")
    pidf.parent.mkdir(parents=True, exist_ok=True)
    pidf.write_text(f"{os.getpid()}\n")  # alive, but pytest, not storescp
    res = ok(script(gateway, STORECTL, "status"), 3)
    assert "stale" in res.stdout
    try:
        ok(script(gateway, STORECTL, "start"))
        assert pid_in(pidf) != os.getpid()
        assert echo(gateway.port).returncode == 0
    finally:
        script(gateway, STORECTL, "stop")


def test_storectl_reports_a_receiver_that_cannot_start(gateway: Gateway):
    """The port is taken: start says so, shows the error and leaves no pid file behind."""
    import socket

    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", gateway.port))
        blocker.listen()
        pidf = pid_file(gateway, "storescp")
        res = ok(script(gateway, STORECTL, "start"), 1)
    assert "exited during start-up" in res.stderr
    assert "Address already in use" in res.stderr
    assert not pidf.exists()
    ok(script(gateway, STORECTL, "status"), 3)


# --- processSingleFile3.py ----------------------------------------------------------------------
def test_psf_is_an_executable_python_script():
    assert os.access(PSF, os.X_OK) and os.access(STORECTL, os.X_OK)
    assert PSF.read_text().startswith("#!/usr/bin/env python3\n")
    text = PSF.read_text()
    assert "shell=True" not in text and "os.system" not in text
    assert not re.search(r"^\s*(from|import)\s+fiona", text, re.M)


def test_psf_start_status_send_stop(gateway: Gateway):
    pidf = pid_file(gateway, "process-single-file")
    ok(script(gateway, PSF, "status"), 3)
    try:
        res = ok(script(gateway, PSF, "start"))
        assert "started" in res.stdout
        pid = pid_in(pidf)
        assert alive(pid)
        res = ok(script(gateway, PSF, "status"))
        assert "running" in res.stdout and str(pid) in res.stdout
        ok(script(gateway, PSF, "start"))
        assert pid_in(pidf) == pid

        pipe = INDEXER.pipe_path(site_of(gateway))
        wait_for(pipe.exists, 30, "the indexer's wake-up pipe")
        res = ok(script(gateway, PSF, "send"))
        assert "woke" in res.stdout

        res = ok(script(gateway, PSF, "stop"))
        assert "stopped" in res.stdout
        assert not alive(pid)
        ok(script(gateway, PSF, "status"), 3)
    finally:
        script(gateway, PSF, "stop")


def test_psf_send_without_indexer(gateway: Gateway):
    # no pipe at all yet
    res = ok(script(gateway, PSF, "send"))
    assert "not running" in res.stdout and "journal" in res.stdout
    # a pipe left behind by an indexer that has stopped: no reader, still no blocking
    pipe = INDEXER.pipe_path(site_of(gateway))
    pipe.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(pipe, 0o620)
    start = time.monotonic()
    res = ok(script(gateway, PSF, "send", "hello"))
    assert "not running" in res.stdout and "journal" in res.stdout
    assert time.monotonic() - start < 30


def test_psf_send_refuses_a_non_pipe(gateway: Gateway):
    pipe = INDEXER.pipe_path(site_of(gateway))
    pipe.parent.mkdir(parents=True, exist_ok=True)
    pipe.write_text("")
    res = ok(script(gateway, PSF, "send"), 1)
    assert "not a named pipe" in res.stderr
    assert pipe.read_text() == ""


def test_psf_test_prints_labels(gateway: Gateway):
    res = ok(script(gateway, PSF, "test", CT_SMALL))
    lines = res.stdout.splitlines()
    assert lines[0].startswith(CT_SMALL)
    assert lines[1].startswith("labels:") and "GE" in lines[1]
    res = script(gateway, PSF, "test", str(gateway.datadir / "nothing.dcm"))
    assert res.returncode != 0


def test_psf_options_and_errors(gateway: Gateway):
    ok(script(gateway, PSF, "--site", "a/b", "status"), 2)
    res = ok(script(gateway, PSF, "status", "--site", "NOPE"), 4)
    assert "unknown site 'NOPE'" in res.stderr
    ok(script(gateway, PSF, "start", "--site", "NOPE"), 6)
    # --config overrides $FIONA_CONFIG
    ok(script(gateway, PSF, "status", "--config", str(gateway.config),
              config=str(gateway.datadir / "missing.json")), 3)
    ok(script(gateway, PSF, "status", config=str(gateway.datadir / "missing.json")), 4)
    ok(script(gateway, PSF), 2)


def test_scripts_receive_and_index_together(gateway: Gateway):
    """The receiver and the indexer started by the scripts file and index a real C-STORE."""
    ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    try:
        ok(script(gateway, STORECTL, "start"))
        ok(script(gateway, PSF, "start"))
        res = gateway.storescu(CT_SMALL)
        assert res.returncode == 0, res.stdout + res.stderr
        data = gateway.wait_indexed(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1)
        assert "GE" in data["ClassifyType"]
    finally:
        script(gateway, PSF, "stop")
        script(gateway, STORECTL, "stop")


# --- detectStudyArrival.sh, anonymizeAndSend.py ------------------------------------------------
@pytest.mark.parametrize("tool, pidname", [(ARRIVAL, "detect-study-arrival"),
                                           (FORWARD, "anonymize-and-send")],
                         ids=["arrival", "forward"])
def test_daemon_shims_start_status_stop(gateway: Gateway, tool: Path, pidname: str):
    ok(script(gateway, tool, "status"), 3)
    try:
        assert "started" in ok(script(gateway, tool, "start")).stdout
        pid = pid_in(pid_file(gateway, pidname))
        assert str(pid) in ok(script(gateway, tool, "status")).stdout
        ok(script(gateway, tool, "stop"))
        assert not alive(pid)
        ok(script(gateway, tool, "status"), 3)
    finally:
        script(gateway, tool, "stop")


def test_daemon_shims_errors(gateway: Gateway):
    ok(script(gateway, ARRIVAL, "status", "a/b"), 2)
    ok(script(gateway, ARRIVAL, "status", "NOPE"), 4)
    ok(script(gateway, ARRIVAL, "start", "x", "y"), 2)
    ok(script(gateway, FORWARD, "status", "--site", "NOPE"), 4)
    ok(script(gateway, FORWARD, "start", "--site", "NOPE"), 6)
    ok(script(gateway, FORWARD, "bogus"), 2)


def test_shims_are_shims():
    """A few lines over `fiona ctl` each, none of them a re-implementation of process control."""
    for tool in (STORECTL, PSF, ARRIVAL, FORWARD):
        assert os.access(tool, os.X_OK)
        code = [line for line in tool.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        assert len(code) <= 12, f"{tool.name}: {len(code)} lines"
        assert "kill" not in tool.read_text()
