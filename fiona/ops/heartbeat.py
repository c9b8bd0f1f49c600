"""`fiona heartbeat` (cron, every minute; original heartbeat.sh): is every daemon alive?

- Each receiver gets a C-ECHO, unless its log changed in the last `traffic` seconds (16 s, as
  the original: a receiver that is busy storing has just shown that it works). One that does
  not answer within `echo_timeout` (20 s) while its pid lock is held is hung: it is restarted.
- A daemon whose pid lock is held but whose log has been silent for longer than the limit it
  declares in the suite table (`Daemon.quiet_limit`) is hung as well and restarted.
- A daemon that is not running is not started: stopping one is an admin's decision, and
  `fiona status` reports it (exit 1).

A daemon that runs under systemd (its cgroup names its unit) is restarted with `systemctl
restart`; otherwise it is stopped (SIGTERM and SIGCONT, SIGKILL after `grace`) and started with
`fiona ctl start`. Every check and action is logged to logs/heartbeat<SITE>.log; the last line
of a beat is what `fiona status` shows.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site
from ..ctl import Target, kill
from ..daemon import setup_logging
from ..suite import DAEMONS, RECEIVER, Daemon
from ..tree import Tree

COMMAND = "heartbeat"
LOG_NAME = "heartbeat"
TRAFFIC_SECONDS = 16.0
ECHO_TIMEOUT = 20.0
GRACE_SECONDS = 30.0
#: the words that end every beat's last log line (`last_beat` finds it)
DONE = "heartbeat done:"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")

log = logging.getLogger("fiona.heartbeat")


def add_parser(sub, site_arg) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser(COMMAND, help="C-ECHO the receivers, restart hung daemons (cron)",
                       description="Check every daemon of every site (or --site): C-ECHO each "
                       "receiver that shows no recent traffic, and restart one that does not "
                       "answer, or any daemon silent in its log past its limit, through "
                       "systemd or fiona ctl. Exit 1 when a restart failed.")
    site_arg(p)
    p.add_argument("--echo-timeout", type=float, default=ECHO_TIMEOUT, metavar="S",
                   help=f"seconds a receiver has to answer (default {ECHO_TIMEOUT:g})")
    p.add_argument("--traffic-seconds", type=float, default=TRAFFIC_SECONDS, metavar="S",
                   help="no C-ECHO when the receiver's log changed this recently (default "
                   f"{TRAFFIC_SECONDS:g})")
    p.add_argument("--grace", type=float, default=GRACE_SECONDS, metavar="S",
                   help=f"seconds after SIGTERM before SIGKILL (default {GRACE_SECONDS:g})")


def c_echo(site: Site, timeout: float) -> str:
    """"" when the receiver answered a C-ECHO within `timeout`, else why not."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="FIONA-HEARTBEAT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(site.ip, site.ip)
    assoc = ae.associate(host, site.port, ae_title=site.aetitle)
    if not assoc.is_established:
        return "no association (refused, aborted or timed out)"
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or status.Status != 0:
        return "no C-ECHO answer"
    return ""


def systemd_unit(pid: int) -> str | None:
    """The systemd service the process runs in (from its cgroup), None outside systemd."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith(".service"):
                return part if part.startswith("fiona-") else None
    return None


class Heartbeat:
    """One beat for one site. `clock` decides what "recent" is (tests advance a FakeClock);
    `echo` asks the receiver."""

    def __init__(self, config: Config, site: Site, clock: Clock = SYSTEM_CLOCK,
                 echo: Callable[[Site, float], str] = c_echo, echo_timeout: float = ECHO_TIMEOUT,
                 traffic: float = TRAFFIC_SECONDS, grace: float = GRACE_SECONDS):
        self.config, self.site, self.clock = config, site, clock
        self.echo, self.echo_timeout, self.traffic, self.grace = echo, echo_timeout, traffic, grace

    def _quiet_for(self, daemon: Daemon) -> float:
        """Seconds since the daemon's log last changed."""
        try:
            return self.clock.time() - daemon.log_path(self.site).stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def check(self, daemon: Daemon) -> str:
        """Why the running daemon counts as hung ("" when it does not, or is not running)."""
        target = Target(self.config, daemon, self.site)
        if not target.pid():
            return ""
        quiet = self._quiet_for(daemon)
        if daemon is RECEIVER:
            if quiet < self.traffic:
                log.info("%s: traffic %.0f s ago, no C-ECHO needed", target.name, quiet)
                return ""
            started = time.monotonic()
            problem = self.echo(self.site, self.echo_timeout)
            if not problem:
                log.info("%s: C-ECHO answered in %.2f s", target.name,
                         time.monotonic() - started)
                return ""
            return f"C-ECHO to port {self.site.port} failed within {self.echo_timeout:g} s: " \
                   f"{problem}"
        if daemon.quiet_limit and quiet > daemon.quiet_limit:
            return f"its log has been silent for {quiet:.0f} s (limit {daemon.quiet_limit:g} s)"
        return ""

    def restart(self, daemon: Daemon, why: str) -> bool:
        target = Target(self.config, daemon, self.site)
        pid = target.pid()
        unit = systemd_unit(pid) if pid else None
        if unit:
            log.warning("%s (pid %s) is hung: %s; restarting it through systemd (%s)",
                        target.name, pid, why, unit)
            res = subprocess.run(["systemctl", "--no-ask-password", "restart", unit],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if res.returncode != 0:
                log.error("systemctl restart %s failed (%d): %s", unit, res.returncode,
                          res.stderr.strip())
                return False
            return True
        log.warning("%s (pid %s) is hung: %s; restarting it with fiona ctl", target.name, pid,
                    why)
        kill(target, self.grace)
        res = subprocess.run([sys.executable, "-m", "fiona", "--config", str(self.config.path),
                              "ctl", "start", daemon.command,
                              *(["--site", self.site.name] if self.site.name else [])],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            log.error("%s did not start again: %s", target.name,
                      (res.stderr or res.stdout).strip()[-500:])
            return False
        log.info("%s restarted: %s", target.name, res.stdout.strip())
        return True

    def beat(self) -> bool:
        """Check every daemon of the site; False when a restart failed."""
        restarted: list[str] = []
        failed: list[str] = []
        for daemon in DAEMONS:
            if (not daemon.per_site and self.site.name) or not daemon.wanted(self.config):
                continue
            why = self.check(daemon)
            if why:
                (restarted if self.restart(daemon, why) else failed).append(daemon.command)
        log.info("%s %s", DONE, "all well" if not restarted and not failed else
                 f"restarted {', '.join(restarted) or 'none'}"
                 + (f"; failed to restart {', '.join(failed)}" if failed else ""))
        return not failed


def last_beat(site: Site) -> dict[str, str]:
    """The last beat's time and outcome from the site's heartbeat log ({} when none)."""
    path = Tree(site.datadir).logs / f"{LOG_NAME}{site.suffix}.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64 * 1024))
            lines = fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        stamp = _STAMP.match(line)
        if stamp and DONE in line:
            return {"at": stamp.group(1), "outcome": line.split(DONE, 1)[1].strip()}
    return {}


def run(config: Config, args: argparse.Namespace) -> int:
    sites = [config.site(args.site)] if args.site else config.all_sites()
    ok = True
    for site in sites:
        setup_logging(site, LOG_NAME, args.verbose)
        ok = Heartbeat(config, site, echo_timeout=args.echo_timeout,
                       traffic=args.traffic_seconds, grace=args.grace).beat() and ok
    return 0 if ok else 1
