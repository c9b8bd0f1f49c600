"""The daemon suite, named once: every other place (`fiona up`, `fiona ctl`, `fiona status`,
`fiona heartbeat`, the bin/ shims, the systemd units' test) reads this table.

Each daemon has the subcommand that runs it, the name the original installation used for it
(admins know `storectl.sh`), the base name of its pid, log and console files (the original
names), its wake-up pipe, its logger, its systemd unit, how `fiona ctl start` knows it is ready,
and how long it may stay silent in its log before the heartbeat takes it for hung.

The per-daemon files in the data tree are defined here too (one codec each):
  run/<files><SITE>.pid     locked while the daemon lives (`fiona.daemon.PidFile`)
  run/.<pipe><SITE>         its wake-up pipe (`fiona.journal.WakeupListener`)
  logs/<files><SITE>.log    its log; logs/<files><SITE>.out its console under `fiona ctl`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config, Site
from .tree import Tree

#: readiness rules: the daemon is ready once its pid file is locked and logging is set up
#: (STARTED), or once it has bound its listening port (LISTENING; it says so itself)
STARTED, LISTENING = "started", "listening"


@dataclass(frozen=True)
class Daemon:
    """One daemon of the suite."""

    command: str            #: `fiona <command>`
    legacy: str             #: the original script, accepted by `fiona ctl` and kept in bin/
    #: ("" when the original had none)
    files: str              #: base name of its pid, log and console files
    per_site: bool          #: one instance per site of SITES (else one for the host)
    logger: str             #: the logger its own lines use
    unit: str               #: systemd unit, without `@SITE` and `.service`
    ready: str = STARTED    #: when `fiona ctl start` returns (STARTED or LISTENING)
    pipe: str = ""          #: base name of its wake-up pipe ("" when it has none)
    quiet_limit: float = 0.0  #: seconds it may log nothing before the heartbeat restarts it
    #: (0: no limit; such a daemon logs only when it has work)
    requires: tuple[str, ...] = ()  #: the Config attributes that must be set for it to run
    #: (MPPS: "mpps_port"); `fiona up` and the heartbeat leave it alone otherwise
    nice: int = 0  #: added to its nice value at start (BACKGROUND for work nobody waits on)

    def wanted(self, config: Config) -> bool:
        """Whether this installation runs it (every `requires` setting is set)."""
        return all(getattr(config, name) for name in self.requires)

    def suffix(self, site: Site) -> str:
        return site.suffix if self.per_site else ""

    def pid_path(self, site: Site) -> Path:
        return Tree(site.datadir).run / f"{self.files}{self.suffix(site)}.pid"

    def log_path(self, site: Site) -> Path:
        return Tree(site.datadir).logs / f"{self.files}{self.suffix(site)}.log"

    def console_path(self, site: Site) -> Path:
        """stdout and stderr of a daemon started by `fiona ctl` (start-up errors, tracebacks)."""
        return Tree(site.datadir).logs / f"{self.files}{self.suffix(site)}.out"

    def pipe_path(self, site: Site) -> Path:
        """Its wake-up pipe, in the site's `run/` folder (mode 0750) rather than in /tmp, where
        any local user could create it first and read or block the messages."""
        if not self.pipe:
            raise ValueError(f"{self.command} has no wake-up pipe")
        return Tree(site.datadir).run / f".{self.pipe}{self.suffix(site)}"

    def unit_name(self, site_name: str | None) -> str:
        """The systemd unit that runs it for `site_name` (None: the main site)."""
        instance = f"@{site_name}" if site_name and self.per_site else ""
        return f"{self.unit}{instance}.service"

    def stop_hint(self, site_name: str | None) -> str:
        """How an admin stops it, for "already running" messages."""
        site = f" --site {site_name}" if site_name and self.per_site else ""
        legacy = f" (or bin/{self.legacy})" if self.legacy else ""
        return (f"fiona ctl stop {self.command}{site}{legacy}, or systemctl "
                f"stop {self.unit_name(site_name)}")


#: the nice value of the daemons whose work nobody waits on: on a busy machine the receiver
#: (a sender waits for every status), the MPPS listener and the web pages get the CPU first
BACKGROUND = 10

#: in data-flow order
DAEMONS: tuple[Daemon, ...] = (
    Daemon("storescp", "storectl.sh", "storescpd", True, "fiona.storescp", "fiona-storescp",
           ready=LISTENING),
    Daemon("process-single-file", "processSingleFile3.py", "processSingleFile", True,
           "fiona.indexer", "fiona-process-single-file", pipe="processSingleFilePipe",
           quiet_limit=3600.0, nice=BACKGROUND),
    Daemon("detect-study-arrival", "detectStudyArrival.sh", "detectStudyArrival", True,
           "fiona.arrival", "fiona-detect-study-arrival", nice=BACKGROUND),
    Daemon("anonymize-and-send", "anonymizeAndSend.py", "anonymizeAndSend", True,
           "fiona.forward", "fiona-anonymize-and-send", pipe="anonymizeAndSendPipe",
           nice=BACKGROUND),
    Daemon("web", "", "web", False, "fiona.web", "fiona-web"),
    Daemon("mpps", "mppsctl.sh", "mpps", False, "fiona.mpps", "fiona-mpps", ready=LISTENING,
           requires=("mpps_port",)),
    Daemon("pull-from-scanner", "moveFromScanner.sh", "moveFromScanner", False, "fiona.pull",
           "fiona-pull-from-scanner", requires=("mpps_port", "scanner"), nice=BACKGROUND),
    Daemon("export-worker", "", "exportWorker", True, "fiona.exportworker",
           "fiona-export-worker", pipe="exportWorkerPipe", nice=BACKGROUND),
)

RECEIVER, INDEXER, ARRIVAL, FORWARDER, WEB, MPPS, PULL, EXPORTER = DAEMONS


class UnknownDaemon(KeyError):
    """A name that is neither a daemon's subcommand nor its legacy name."""

    def __str__(self) -> str:
        return (f"unknown daemon {self.args[0]!r}; the daemons are: "
                + ", ".join(f"{d.command} ({d.legacy})" if d.legacy else d.command
                            for d in DAEMONS))


def daemon(name: str) -> Daemon:
    """The daemon called `name`: its subcommand or its legacy name."""
    for d in DAEMONS:
        if name == d.command or (d.legacy and name == d.legacy):
            return d
    raise UnknownDaemon(name)
