"""No process outlives the test that started it, with its children, also when the test fails.

Three layers, from fine to coarse:

- `spawn` starts a process in a session (process group) of its own and registers it; the
  autouse fixtures stop the groups that a test, or a module's fixtures, started: SIGTERM, and
  SIGKILL after a grace period.
- Every process started during a test inherits FIONA_TEST_ID=<the test's id> from os.environ
  (and FIONA_TEST_MODULE, FIONA_TEST_SESSION), so processes not started by `spawn` (the daemons
  bin/storectl.sh detaches, a bare `subprocess.Popen` in a test, the daemons of `fiona up`) are
  found in /proc by that mark and stopped as well.
- At the end of the session, a process that still carries the session's mark, or names the
  session's basetemp on its command line, fails the run (and is killed).

A session-scoped fixture that starts a process starts it inside `session_wide()`.

conftest.py imports the fixtures and hooks by name, which is how pytest finds them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SESSION_VAR = "FIONA_TEST_SESSION"
MODULE_VAR = "FIONA_TEST_MODULE"
TEST_VAR = "FIONA_TEST_ID"
#: how long processes get to finish after SIGTERM before SIGKILL (daemons finish work in hand)
GRACE = 15.0

_started: list[subprocess.Popen] = []


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` in a new session, registered so that the group is stopped at the end
    of the test (or of the module, for a module-scoped fixture)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _started.append(proc)
    return proc


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _ancestors() -> set[int]:
    """This process and its ancestors (the shell that ran pytest names basetemp too)."""
    found, pid = set(), os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        stat = _stat(pid)
        pid = stat[1] if stat else 0
    return found


def children(parent: int) -> list[int]:
    """The live child processes of `parent`."""
    return [pid for pid in _pids()
            if (stat := _stat(pid)) and stat[1] == parent and stat[0] not in ("Z", "X")]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def marked(var: str, value: str, basetemp: str | None = None) -> list[int]:
    """Live processes (not this one nor its ancestors) whose environment holds var=value, or,
    with `basetemp`, whose command line names it or a path under it."""
    needle = f"{var}={value}".encode()
    base = basetemp.rstrip("/") if basetemp else None
    mine = _ancestors()
    found = []
    for pid in _pids():
        if pid in mine:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (needle in env or (base and any(arg == base or base + "/" in arg
                                           for arg in cmdline(pid)))) and alive(pid):
            found.append(pid)
    return found


def _members(groups: set[int]) -> list[int]:
    """Live processes in the process groups `groups`."""
    if not groups:
        return []
    out = []
    for pid in _pids():
        stat = _stat(pid)
        if stat and stat[2] in groups and stat[0] not in ("Z", "X"):
            out.append(pid)
    return out


def stop(procs: Iterable[subprocess.Popen], find: Callable[[], Iterable[int]] = tuple,
         grace: float = GRACE) -> list[int]:
    """Stop the process groups led by `procs` and the processes `find()` returns (asked again
    and again, as a dying process may just have started another): SIGTERM, wait up to `grace`,
    then SIGKILL. Returns the pids that needed SIGKILL."""
    procs = list(procs)
    groups = {p.pid for p in procs}

    def targets() -> set[int]:
        for p in procs:
            p.poll()  # reap what has exited, so it does not linger as a zombie
        return {pid for pid in (*_members(groups), *find()) if alive(pid)}

    killed: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signalled: set[int] = set()
        deadline = time.monotonic() + grace
        while (left := targets()) and time.monotonic() < deadline:
            for pid in left - signalled:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            signalled |= left
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            killed = signalled
        elif not left:
            break
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    return sorted(killed)


@contextmanager
def session_wide() -> Iterator[None]:
    """For session-scoped fixtures: what starts inside carries the session's mark only, so the
    test or module that happened to need it first does not stop it at its end."""
    marks = {var: os.environ.pop(var) for var in (TEST_VAR, MODULE_VAR) if var in os.environ}
    try:
        yield
    finally:
        os.environ.update(marks)


def _stop_since(mark: int, var: str, value: str) -> None:
    """Stop what was spawned after position `mark` of the registry, or carries var=value."""
    procs = _started[mark:]
    del _started[mark:]
    stop(procs, lambda: marked(var, value))


@pytest.fixture(autouse=True, scope="module")
def _stop_module_processes() -> Iterator[None]:
    """Processes that module-scoped fixtures started end with the module."""
    mark, value = len(_started), uuid.uuid4().hex
    os.environ[MODULE_VAR] = value
    try:
        yield
    finally:
        os.environ.pop(MODULE_VAR, None)
        _stop_since(mark, MODULE_VAR, value)


@pytest.fixture(autouse=True)
def _stop_test_processes() -> Iterator[None]:
    """Processes that a test (or its function-scoped fixtures) started end with the test;
    being autouse, this is set up first and torn down last, after the fixtures' own stops."""
    mark, value = len(_started), uuid.uuid4().hex
    os.environ[TEST_VAR] = value
    try:
        yield
    finally:
        os.environ.pop(TEST_VAR, None)
        _stop_since(mark, TEST_VAR, value)


def pytest_configure(config: pytest.Config) -> None:
    """A mark of its own for this session (a pytest run inside a test gets its own too)."""
    os.environ[SESSION_VAR] = uuid.uuid4().hex


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if anything the tests started is still alive; kill it."""
    basetemp = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    session_id = os.environ[SESSION_VAR]
    deadline = time.monotonic() + GRACE  # session fixtures' processes may still be exiting
    while (leaks := marked(SESSION_VAR, session_id, basetemp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not leaks:
        return
    lines = [f"pid {pid}: {' '.join(cmdline(pid))[:200]}" for pid in leaks]
    stop([], lambda: marked(SESSION_VAR, session_id, basetemp))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.section("processes left running by the tests (now killed)", sep="=", red=True)
        for line in lines:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
