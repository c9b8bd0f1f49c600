"""procs.py: what a test starts ends with it, children included, also when the test fails;
what escapes fails the run. Checked on inner pytest runs that use the same fixtures and hooks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from procs import alive, cmdline, marked

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from procs import (  # noqa: F401
    _stop_module_processes, _stop_test_processes, pytest_configure, pytest_sessionfinish)
"""

#: a process that would run for ten minutes, named by the inner test folder (its argument)
HEADER = """
import os, subprocess, sys
from pathlib import Path
import pytest
from helpers import Gateway, free_port
from procs import spawn

HERE = Path(__file__).parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)", str(HERE)]

def record(*pids):
    with open(HERE / "pids", "a") as f:
        f.write("".join(f"{pid}\\n" for pid in pids))
"""

LEFT_BEHIND = HEADER + """
@pytest.fixture(scope="module")
def shared():
    yield spawn(SLEEPER)  # never stopped by the fixture itself

def test_module_process_lives_on(shared):
    assert shared.poll() is None

def test_module_process_still_lives(shared):
    assert shared.poll() is None
    record(shared.pid)

def test_fails_with_a_daemon_and_strays_running(tmp_path):
    gw = Gateway(tmp_path / "data", free_port())
    daemon = gw.start("storescp")
    # a child with a child of its own, and one in a session of its own; neither registered
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen(sys.argv[1:]); time.sleep(600)", *SLEEPER])
    stray = subprocess.Popen(SLEEPER, start_new_session=True)
    record(daemon.pid, parent.pid, stray.pid)
    assert False, "fails on purpose"

def test_next_test_finds_none_of_them(shared):
    from procs import alive, marked
    shared_pid, *pids = map(int, (HERE / "pids").read_text().split())
    assert alive(shared_pid)
    assert not [pid for pid in pids if alive(pid)]
    assert marked("-", "-", str(HERE)) == [shared_pid]  # the child's own child is gone too
"""

ESCAPES = HEADER + """
def test_leaves_a_process_without_the_marks(tmp_path):
    # a clean environment (no FIONA_TEST_* marks), a path under basetemp in its arguments,
    # and not registered
    p = subprocess.Popen(SLEEPER + [str(tmp_path)], env={"PATH": os.environ["PATH"]},
                         start_new_session=True)
    record(p.pid)
"""


def inner_run(tmp_path: Path, test_source: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(CONFTEST)
    (inner / "test_inner.py").write_text(test_source)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"--basetemp={tmp_path / 'basetemp'}", str(inner)], cwd=inner,
                         capture_output=True, text=True, timeout=300)
    pids = [int(line) for line in (inner / "pids").read_text().split()]
    return res, pids


def running_under(folder: Path) -> list[int]:
    """Live processes that name `folder` on their command line (all the inner tests' do)."""
    return marked("-", "-", str(folder))


def test_processes_end_with_their_test_even_when_it_fails(tmp_path: Path):
    res, pids = inner_run(tmp_path, LEFT_BEHIND)
    assert "1 failed, 3 passed" in res.stdout, res.stdout + res.stderr
    assert "processes left running" not in res.stdout
    assert len(pids) == 4
    assert not [pid for pid in pids if alive(pid)]
    assert not running_under(tmp_path), [cmdline(pid) for pid in running_under(tmp_path)]


def test_a_process_that_escapes_fails_the_run_and_is_killed(tmp_path: Path):
    res, [pid] = inner_run(tmp_path, ESCAPES)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    assert "processes left running by the tests (now killed)" in res.stdout
    assert f"pid {pid}:" in res.stdout
    assert not alive(pid)
