"""systemd/ and cron/fiona against the suite table (fiona/suite.py) and the CLI: a unit per
daemon (and an @SITE instance per per-site daemon) running its subcommand, a oneshot service and
a timer per periodic job, the same jobs as the live lines of cron/fiona, and every unit clean
under `systemd-analyze verify` (which exits 0 on unknown keys, so its output must be empty).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fiona.cli import build_parser
from fiona.suite import DAEMONS

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
CRON = REPO / "cron" / "fiona"
FIONA = "/opt/fiona/venv/bin/fiona"


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


def subcommands() -> set[str]:
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]  # noqa: SLF001
    return set(sub.choices)


def daemon_units() -> dict[str, tuple[str, bool]]:
    """unit file name -> (subcommand, instance?) for every daemon of the table."""
    out = {}
    for d in DAEMONS:
        out[f"{d.unit}.service"] = (d.command, False)
        if d.per_site:
            out[f"{d.unit}@.service"] = (d.command, True)
    return out


def timers() -> dict[str, Path]:
    return {p.name.removesuffix(".timer").removeprefix("fiona-"): p
            for p in SYSTEMD.glob("*.timer")}


def test_every_unit_file_is_a_daemon_of_the_table_or_a_job():
    expected = set(daemon_units()) | {"fiona.target"}
    expected |= {f"fiona-{job}.{kind}" for job in timers() for kind in ("service", "timer")}
    assert {p.name for p in SYSTEMD.iterdir()} == expected


@pytest.mark.parametrize("name", sorted(daemon_units()))
def test_daemon_unit(name: str):
    command, instance = daemon_units()[name]
    unit = parse_unit(SYSTEMD / name)
    svc = unit["Service"]
    (exec_start,) = svc["ExecStart"]
    assert shlex.split(exec_start) == [FIONA, command, *(["--site", "%i"] if instance else [])]
    assert svc["User"] == ["processing"] and svc["Group"] == ["processing"]
    assert "FIONA_CONFIG=/data/config/config.json" in svc["Environment"]
    assert "TCP_NODELAY=1" in svc["Environment"]
    for key, value in {"Restart": "on-failure", "RestartSec": "5", "KillSignal": "SIGTERM",
                       "TimeoutStopSec": "60", "UMask": "0027", "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ReadWritePaths": "/data",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert svc.get(key) == [value], f"{name}: {key}={svc.get(key)}"
    assert unit["Install"]["WantedBy"] == ["fiona.target"]
    assert unit["Unit"]["PartOf"] == ["fiona.target"]


def test_target_wants_every_daemon_of_the_main_site():
    unit = parse_unit(SYSTEMD / "fiona.target")
    wants = " ".join(unit["Unit"]["Wants"]).split()
    assert wants == [f"{d.unit}.service" for d in DAEMONS]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("job", sorted(timers()))
def test_job_service_and_timer(job: str):
    svc = parse_unit(SYSTEMD / f"fiona-{job}.service")["Service"]
    assert svc["Type"] == ["oneshot"] and svc["User"] == ["processing"]
    (exec_start,) = svc["ExecStart"]
    argv = shlex.split(exec_start)
    if argv[0] == "/bin/sh":  # backup: a dated folder
        argv = shlex.split(argv[2].removeprefix("exec "))
    assert argv[0] == FIONA and argv[1] == job and job in subcommands()
    timer = parse_unit(SYSTEMD / f"fiona-{job}.timer")
    assert len(timer["Timer"]["OnCalendar"]) == 1
    assert timer["Install"]["WantedBy"] == ["timers.target"]


CRON_TIME = r"(\S+\s+){5}"


def cron_jobs() -> dict[str, str]:
    """subcommand -> schedule of every live line of cron/fiona (each checked on the way)."""
    text = CRON.read_text()
    assert text.endswith("\n")
    jobs = {}
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if re.fullmatch(r"[A-Z_]+=\S*", stripped):
            continue  # SHELL=, PATH=, FIONA_CONFIG=, MAILTO=
        m = re.match(CRON_TIME + r"(\S+)\s+(.*)$", stripped)
        assert m, f"cron/fiona:{n}: not a crontab line: {line!r}"
        assert m.group(2) == "processing", f"cron/fiona:{n}: jobs run as processing"
        argv = shlex.split(m.group(3))
        assert argv[0] == "fiona", line
        assert argv[1] in subcommands(), f"cron job calls `fiona {argv[1]}`, which does not exist"
        jobs[argv[1]] = " ".join(stripped.split()[:5])
    return jobs


def test_cron_and_timers_run_the_same_jobs():
    jobs = cron_jobs()
    assert set(jobs) == set(timers())
    assert jobs["heartbeat"] == "* * * * *"


def test_systemd_analyze_verify(tmp_path: Path):
    """Every unit as systemd reads it. `verify` also wants ExecStart's program to exist: the
    copies name this environment's `fiona` instead of the service venv's."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install the Debian package systemd (make deps)"
    fiona = Path(sys.executable).parent / "fiona"
    assert fiona.exists(), fiona
    for path in SYSTEMD.iterdir():
        (tmp_path / path.name).write_text(path.read_text().replace(FIONA, str(fiona)))
    units = sorted(str(p) for p in tmp_path.iterdir())
    res = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), (
        f"exit {res.returncode}\n{res.stdout}{res.stderr}")
