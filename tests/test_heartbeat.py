"""`fiona heartbeat` (fiona/ops/heartbeat.py): a hung receiver (SIGSTOP: it accepts TCP in the
kernel but never answers) is restarted through `fiona ctl`; a receiver with recent traffic is
not asked; an indexer silent past its declared limit is restarted; `fiona status` shows the last
beat. Real daemons started by `fiona ctl`, a real C-ECHO; "recent" is decided on a FakeClock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime

import pytest

from fiona.clock import FakeClock
from fiona.config import load
from fiona.ctl import Target, kill
from fiona.ops.heartbeat import Heartbeat
from fiona.suite import INDEXER, RECEIVER
from helpers import Gateway, dcmtk, wait_for
from procs import alive, spawn

pytestmark = pytest.mark.e2e


def ctl(gw: Gateway, *args: str) -> None:
    res = gw.run("ctl", *args, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def pid(gw: Gateway, daemon) -> int:
    return int(daemon.pid_path(load(str(gw.config)).site(None)).read_text())


def test_heartbeat_restarts_a_stopped_receiver_and_status_shows_it(gateway: Gateway):
    try:
        ctl(gateway, "start", "storescp")
        hung = pid(gateway, RECEIVER)
        os.kill(hung, signal.SIGSTOP)
        # its worker processes refuse new associations once they miss the stopped daemon
        wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-to", "2", "127.0.0.1",
                                         str(gateway.port)]).returncode != 0, 60,
                 "the receiver to stop answering")
        res = gateway.run("heartbeat", "--echo-timeout", "2", "--traffic-seconds", "0",
                          "--grace", "10", check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        fresh = pid(gateway, RECEIVER)
        assert fresh != hung and alive(fresh)
        wait_for(lambda: not alive(hung), 30, "the hung receiver to go")
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "FIONA", "127.0.0.1",
                               str(gateway.port)], capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr
        log = (gateway.datadir / "logs" / "heartbeat.log").read_text()
        assert "storescpd" in log and "is hung: C-ECHO" in log and "fiona ctl" in log
        assert "heartbeat done: restarted storescp" in log

        status = json.loads(gateway.run("status", "--json", check=False).stdout)
        assert status["heartbeat"]["outcome"] == "restarted storescp"
        text = gateway.run("status", check=False).stdout
        assert "last heartbeat: " in text and "restarted storescp" in text
    finally:
        ctl(gateway, "stop", "storescp")


def test_a_receiver_with_recent_traffic_is_not_asked(gateway: Gateway, caplog):
    config = load(str(gateway.config))
    site = config.site(None)
    try:
        ctl(gateway, "start", "storescp")
        written = RECEIVER.log_path(site).stat().st_mtime
        clock = FakeClock(start=datetime.fromtimestamp(written + 5))
        beat = Heartbeat(config, site, clock=clock, echo_timeout=10)
        with caplog.at_level(logging.INFO, logger="fiona.heartbeat"):
            assert beat.check(RECEIVER) == ""
            assert "no C-ECHO needed" in caplog.text and "answered" not in caplog.text
            clock.advance(20)
            assert beat.check(RECEIVER) == ""
            assert "C-ECHO answered" in caplog.text
    finally:
        ctl(gateway, "stop", "storescp")


def test_an_indexer_silent_past_its_limit_is_restarted(gateway: Gateway):
    config = load(str(gateway.config))
    site = config.site(None)
    try:
        ctl(gateway, "start", "process-single-file")
        first = pid(gateway, INDEXER)
        now = datetime.now()
        beat = Heartbeat(config, site, clock=FakeClock(start=now), grace=10)
        assert beat.check(INDEXER) == ""
        late = Heartbeat(config, site, clock=FakeClock(
            start=datetime.fromtimestamp(now.timestamp() + INDEXER.quiet_limit + 60)), grace=10)
        assert "silent" in late.check(INDEXER)
        assert late.beat()
        second = pid(gateway, INDEXER)
        assert second != first and alive(second)
    finally:
        ctl(gateway, "stop", "process-single-file")


HOLDS_THE_LOCK_AND_IGNORES_SIGTERM = """
import signal, sys, time
from fiona.config import load
from fiona.daemon import PidFile
from fiona.suite import INDEXER
signal.signal(signal.SIGTERM, signal.SIG_IGN)
PidFile(load(sys.argv[1]).site(None), INDEXER).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_daemon_that_ignores_sigterm_is_killed_after_the_grace(gateway: Gateway):
    """The heartbeat's stop of a hung daemon: SIGTERM, then SIGKILL to the lock holder."""
    proc = spawn([sys.executable, "-c", HOLDS_THE_LOCK_AND_IGNORES_SIGTERM, str(gateway.config)],
                 stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    target = Target(load(str(gateway.config)), INDEXER, load(str(gateway.config)).site(None))
    assert target.pid() == proc.pid
    assert kill(target, grace=2) == proc.pid
    assert proc.wait(30) == -signal.SIGKILL
    assert target.pid() is None
