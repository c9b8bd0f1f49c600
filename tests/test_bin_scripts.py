"""bin/storectl.sh, bin/processSingleFile3.py, systemd/ units and cron/fiona (SPEC §3, §4, §10).

The scripts run as an admin runs them: as programs, with the configuration in $FIONA_CONFIG,
against a real data tree; the daemons they start are real processes, checked through the pid files
the daemons write and through DCMTK's echoscu/storescu. What a test leaves running, even after a
failure, is stopped by conftest's autouse fixture (procs.py: the daemons inherit the test's mark).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from helpers import Gateway, dcmtk, free_port, wait_for
from procs import alive

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
STORECTL = REPO / "bin" / "storectl.sh"
PSF = REPO / "bin" / "processSingleFile3.py"
SYSTEMD = REPO / "systemd"
CRON = REPO / "cron" / "fiona"
CT_SMALL = get_testdata_file("CT_small.dcm")


# --- helpers ------------------------------------------------------------------------------------
def script(gw: Gateway, tool: Path, *args: str, timeout: float = 120,
           config: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FIONA_CONFIG": config or str(gw.config),
           # the interpreter that runs these tests has fiona's dependencies
           "FIONA_PYTHON": sys.executable}
    argv = [str(tool), *args] if tool != PSF else [sys.executable, str(tool), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=gw.datadir.parent)


def ok(res: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert res.returncode == code, (f"exit {res.returncode}, expected {code}\n"
                                    f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def pid_in(path: Path) -> int:
    return int(path.read_text().strip())


def pid_file(datadir: Path, daemon: str, site: str = "") -> Path:
    return datadir / "site" / "run" / f"{daemon}{site}.pid"


def echo(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aec", "FIONA", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


# --- storectl.sh --------------------------------------------------------------------------------
def test_storectl_start_echo_status_stop(gateway: Gateway):
    pidf = pid_file(gateway.datadir, "storescpd")
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
    assert (gateway.datadir / "logs" / "storescpd.log").exists()


def test_storectl_restart(gateway: Gateway):
    pidf = pid_file(gateway.datadir, "storescpd")
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
    site_dir = gw.datadir / "ct"
    pidf = pid_file(site_dir, "storescpd", "CT")
    try:
        res = ok(script(gw, STORECTL, "start", "CT"))
        assert "storescpdCT" in res.stdout
        assert alive(pid_in(pidf))
        assert echo(site_port).returncode == 0
        assert echo(gw.port).returncode != 0, "only the site's receiver was started"
        ok(script(gw, STORECTL, "status", "CT"))
        ok(script(gw, STORECTL, "status"), 3)
        assert (site_dir / "logs" / "storescpdCT.log").exists()
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
    pidf = pid_file(gateway.datadir, "storescpd")
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
        pidf = pid_file(gateway.datadir, "storescpd")
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
    pidf = pid_file(gateway.datadir, "processSingleFile")
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

        pipe = gateway.datadir / "site" / "run" / ".processSingleFilePipe"
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
    pipe = gateway.datadir / "site" / "run" / ".processSingleFilePipe"
    pipe.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(pipe, 0o620)
    start = time.monotonic()
    res = ok(script(gateway, PSF, "send", "hello"))
    assert "not running" in res.stdout and "journal" in res.stdout
    assert time.monotonic() - start < 30


def test_psf_send_refuses_a_non_pipe(gateway: Gateway):
    pipe = gateway.datadir / "site" / "run" / ".processSingleFilePipe"
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


# --- systemd units ------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: [Section], Key=Value (repeatable), # or ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not raw.endswith("\\"), f"{path.name}:{n}: no line continuations please"
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            assert m.group(1) not in sections, f"{path.name}:{n}: section [{m.group(1)}] twice"
            current = sections[m.group(1)] = {}
            continue
        assert current is not None, f"{path.name}:{n}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"{path.name}:{n}: {raw!r}"
        current.setdefault(key, []).append(value)
    return sections


UNITS = sorted(SYSTEMD.glob("*.service"))


def test_unit_files_exist():
    names = {p.name for p in SYSTEMD.iterdir()}
    assert {"fiona-storescp.service", "fiona-storescp@.service",
            "fiona-process-single-file.service", "fiona-process-single-file@.service",
            "fiona.target"} <= names


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_service_unit(path: Path):
    unit = parse_unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit)
    svc = unit["Service"]
    (exec_start,) = svc["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "fiona" and argv[0].startswith("/")
    subcommand = path.name.removeprefix("fiona-").split("@")[0].removesuffix(".service")
    assert argv[1] == subcommand
    if "@" in path.name:
        assert argv[2:] == ["--site", "%i"]
    else:
        assert argv[2:] == []
    assert svc["User"] == ["processing"] and svc["Group"] == ["processing"]
    assert "FIONA_CONFIG=/data/config/config.json" in svc["Environment"]
    assert "TCP_NODELAY=1" in svc["Environment"]
    for key, value in {"Restart": "on-failure", "RestartSec": "5", "KillSignal": "SIGTERM",
                       "TimeoutStopSec": "60", "UMask": "0027", "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ReadWritePaths": "/data",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert svc.get(key) == [value], f"{path.name}: {key}={svc.get(key)}"
    assert unit["Install"]["WantedBy"] == ["fiona.target"]
    assert unit["Unit"]["PartOf"] == ["fiona.target"]


def test_target_groups_the_daemons():
    unit = parse_unit(SYSTEMD / "fiona.target")
    wants = " ".join(unit["Unit"]["Wants"]).split()
    assert set(wants) == {"fiona-storescp.service", "fiona-process-single-file.service",
                          "fiona-detect-study-arrival.service",
                          "fiona-anonymize-and-send.service"}
    for name in wants:
        assert (SYSTEMD / name).exists()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- cron ---------------------------------------------------------------------------------------
def fiona_subcommands() -> set[str]:
    from fiona.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]  # noqa: SLF001
    return set(sub.choices)


CRON_TIME = r"(\S+\s+){5}"


def test_cron_file():
    text = CRON.read_text()
    assert text.endswith("\n")
    existing = fiona_subcommands()
    active, planned = [], []
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            # a commented-out job line: valid as soon as the '#' goes
            if re.match(CRON_TIME + r"processing\s+fiona\s", body):
                planned.append(body)
            continue
        if re.fullmatch(r"[A-Z_]+=\S*", stripped):
            continue  # SHELL=, PATH=, FIONA_CONFIG=, MAILTO=
        m = re.match(CRON_TIME + r"(\S+)\s+(.*)$", stripped)
        assert m, f"cron/fiona:{n}: not a crontab line: {line!r}"
        assert m.group(2) == "processing", f"cron/fiona:{n}: jobs run as processing"
        active.append(m.group(3))
    for command in active:
        argv = shlex.split(command)
        assert argv[0] == "fiona", command
        assert argv[1] in existing, f"cron job calls `fiona {argv[1]}`, which does not exist"
    jobs = {shlex.split(p)[7] for p in planned}
    assert {"heartbeat", "clear-old-files", "clear-stale-links", "clear-exports",
            "remove-old-entries", "resend", "populate-projects",
            "inventory"} <= jobs | {shlex.split(c)[1] for c in active}
    assert "enabled when the subcommand ships (see README)" in text
    heartbeat = [p for p in planned if " heartbeat" in p]
    assert heartbeat and heartbeat[0].split()[0] == "*/5"
