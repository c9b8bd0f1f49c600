"""`fiona pull-from-scanner` (originally moveFromScanner.sh): fetch what the scanner has and FIONA
lacks, for every study an MPPS step made active.

A daemon that makes one pass every 15 seconds (the original's cron-driven loop; cron cannot run
more often than once a minute, a daemon also keeps its back-off between passes), or one pass with
`--once`. Per active study: C-FIND at SERIES level to SCANNERAETITLE@SCANNERIP:SCANNERPORT for
each series' NumberOfSeriesRelatedInstances (or ImagesInAcquisition), compared with the series
JSON's NumFiles in raw/; a series with fewer files here is C-MOVEd to FIONA's own AE title
(DICOMAETITLE), and arrives through the receiver like any other. The scan is *finished* when the
scanner lists at least one series, every series is complete here and every MPPS step of the study
is COMPLETED or DISCONTINUED; it has *failed* when that is not so `deadline` (24 h unless
--deadline-hours) after its first step began. A scanner that refuses, errs or times out is
logged and tried again later (`fiona.backoff`); the pass goes on with the next study. The
`enabled` file's second character 0 stops the pulling (reception goes on).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ..backoff import Backoff, Schedule
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, ConfigError, Site, enabled_path, is_enabled
from ..daemon import running, setup_logging
from ..dicom_client import Timeouts, answers, open_session, quiesce
from ..suite import PULL
from ..tree import InvalidValue, Tree, valid_uid
from .steps import FAILED, FINAL, FINISHED, Step, Steps

log = logging.getLogger("fiona.pull")

COMMAND = PULL.command
INTERVAL = 15.0
DEADLINE_HOURS = 24.0
#: after a scanner failure a study waits 15 s, 30 s, 1 min, ... up to 16 min
RETRY = Schedule.doubling(INTERVAL, 7)


class ScannerError(Exception):
    """The scanner could not be reached or failed a request; the text says how (UIDs only)."""


class Scanner:
    """SCANNERAETITLE@SCANNERIP:SCANNERPORT as a Study Root Query/Retrieve SCP."""

    def __init__(self, host: str, port: int, aetitle: str, calling: str, timeout: float = 30.0):
        self.host, self.port, self.aetitle, self.calling = host, port, aetitle, calling
        self.timeout = timeout
        self._assoc: Any = None

    @classmethod
    def from_config(cls, config: Config, site: Site) -> Scanner:
        scanner = config.scanner
        missing = [k for k in ("SCANNERIP", "SCANNERPORT", "SCANNERAETITLE") if k not in scanner]
        if missing:
            raise ConfigError([f"{', '.join(missing)} not set: `fiona {COMMAND}` asks the "
                               f"scanner for the series of active studies"], config.path)
        return cls(str(scanner["SCANNERIP"]), int(scanner["SCANNERPORT"]),
                   str(scanner["SCANNERAETITLE"]), site.aetitle)

    @property
    def label(self) -> str:
        return f"{self.aetitle}@{self.host}:{self.port}"

    @contextmanager
    def session(self) -> Iterator[Scanner]:
        """One association with C-FIND and C-MOVE, released (or aborted) at the end."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        timeouts = Timeouts(self.timeout, self.timeout, 4 * self.timeout, 4 * self.timeout)
        with open_session(self.calling, self.host, self.port, self.aetitle, [FIND, MOVE],
                          "Study Root C-FIND and C-MOVE", timeouts, self._failed) as assoc:
            self._assoc = assoc
            try:
                yield self
            finally:
                self._assoc = None

    def _request(self) -> None:
        """Pause the reactor for the next request (as `fiona inventory` does)."""
        if not quiesce(self._assoc):
            raise ScannerError(f"the scanner {self.label} closed the association")

    def _responses(self, what: str, responses) -> list[Dataset]:
        found, code, _status = answers(responses, what, self._failed)
        if code != 0x0000:
            raise ScannerError(f"the scanner {self.label} failed a {what} with status "
                               f"0x{code:04X}")
        return found

    def _failed(self, why: str) -> ScannerError:
        return ScannerError(f"the scanner {self.label} {why}")

    def series(self, study: str) -> dict[str, int | None]:
        """SeriesInstanceUID -> its number of images at the scanner (None: not said)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = ""
        query.NumberOfSeriesRelatedInstances = ""
        query.ImagesInAcquisition = ""
        out: dict[str, int | None] = {}
        self._request()
        for ident in self._responses("C-FIND", self._assoc.send_c_find(query, FIND)):
            try:
                series = valid_uid(str(ident.get("SeriesInstanceUID", "")), "SeriesInstanceUID")
            except InvalidValue as exc:
                log.warning("study %s: the scanner named a series FIONA ignores: %s", study, exc)
                continue
            out[series] = _count(ident)
        return out

    def move(self, study: str, series: str, destination: str) -> None:
        """C-MOVE one series to `destination` (FIONA's own AE title)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        self._request()
        self._responses("C-MOVE", self._assoc.send_c_move(query, destination, MOVE))


def _count(ident: Dataset) -> int | None:
    for keyword in ("NumberOfSeriesRelatedInstances", "ImagesInAcquisition"):
        value = ident.get(keyword)
        try:
            if value not in (None, ""):
                return int(value)
        except (TypeError, ValueError):
            continue
    return None


def local_files(tree: Tree, study: str, series: str) -> int:
    """The files of a series in raw/ (its series JSON's NumFiles; 0 before the indexer saw it)."""
    try:
        return int(json.loads(tree.series_json(study, series).read_text()).get("NumFiles", 0))
    except (FileNotFoundError, ValueError, TypeError):
        return 0


class Puller:
    """One pass over the active studies of a data tree."""

    def __init__(self, datadir: Path, scanner: Scanner, own_aet: str,
                 deadline: float = DEADLINE_HOURS * 3600, clock: Clock = SYSTEM_CLOCK):
        self.datadir = datadir
        self.tree = Tree(datadir)
        self.steps = Steps(datadir)
        self.scanner = scanner
        self.own_aet = own_aet
        self.deadline = deadline
        self.clock = clock
        self.backoff = Backoff(RETRY, clock)
        self._enabled: bool | None = None

    def enabled(self) -> bool:
        enabled = is_enabled(self.datadir, "scanner")
        if enabled != self._enabled:
            self._enabled = enabled
            log.warning("pulling from the scanner %s by %s", "enabled" if enabled else
                        "disabled (until its second character is 1)", enabled_path(self.datadir))
        return enabled

    def run_once(self) -> None:
        if not self.enabled():
            return
        for study, steps in self.steps.active().items():
            if not self.backoff.due(study):
                continue
            try:
                complete = self._pull(study)
            except ScannerError as exc:
                delay = self.backoff.failed(study)
                log.warning("study %s: %s; trying again in %.0f s", study, exc, delay)
                complete = False
            else:
                self.backoff.succeeded(study)
            self._judge(study, steps, complete)

    def _pull(self, study: str) -> bool:
        """Move what is missing; True when the scanner lists series and FIONA has them all."""
        with self.scanner.session() as scanner:
            expected = scanner.series(study)
            missing = [s for s, n in expected.items()
                       if local_files(self.tree, study, s) < (1 if n is None else n)]
            for series in missing:
                log.info("study %s: moving series %s from the scanner to %s", study, series,
                         self.own_aet)
                scanner.move(study, series, self.own_aet)
        return bool(expected) and not missing

    def _judge(self, study: str, steps: list[Step], complete: bool) -> None:
        sops = [s.sop for s in steps]
        if complete and all(s.status in FINAL for s in steps):
            self.steps.conclude(study, FINISHED, sops, self.clock.time())
            log.info("study %s: scan finished, every series received", study)
            return
        began = min(s.created for s in steps)
        if self.clock.time() - began >= self.deadline:
            self.steps.conclude(study, FAILED, sops, self.clock.time())
            log.warning("study %s: scan failed, not complete %.1f h after its MPPS step began",
                        study, self.deadline / 3600)


def run(config: Config, verbose: bool = False, once: bool = False,
        deadline_hours: float = DEADLINE_HOURS) -> int:
    if deadline_hours <= 0:
        raise ConfigError(["--deadline-hours must be above 0"])
    if not PULL.wanted(config):
        print(f"fiona {COMMAND}: MPPSPORT and SCANNERIP, SCANNERPORT, SCANNERAETITLE must be "
              f"set in config.json: without MPPS no scan is active, without the scanner nothing "
              f"can be pulled", file=sys.stderr)
        return 0
    site = config.site(None)
    puller = Puller(site.datadir, Scanner.from_config(config, site), site.aetitle,
                    deadline_hours * 3600)
    if once:
        setup_logging(site, "moveFromScanner", verbose)
        puller.run_once()
        return 0
    with running(site, COMMAND, verbose) as stop:
        log.info("pulling from the scanner %s every %.0f s", puller.scanner.label, INTERVAL)
        while True:
            try:
                puller.run_once()
            except Exception:  # a bug costs one pass, never the daemon
                log.exception("a pass over the active studies failed")
            if stop.wait(INTERVAL):
                break
    return 0
