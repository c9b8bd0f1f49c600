"""Two forwarders on one PostgreSQL index, as two machines of one site on shared storage:
real `Forwarder`s (one thread each, their own control-plane connection and claim holder), a
folder destination and `requests` one-file studies. Used by bench/region.py (its last phase)
and tests/test_region_forwarders.py: each request must be sent exactly once."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from fiona.bootstrap import init
from fiona.config import load
from fiona.control.base import Project, TransferRequest
from fiona.control.postgres import PostgresControlPlane
from fiona.send.forward import Forwarder
from fiona.suite import FORWARDER
from tests.dicomgen import make_study


@dataclass
class Outcome:
    requests: int
    sends: Counter[str] = field(default_factory=Counter)   # study UID -> "sent and verified"
    by: Counter[str] = field(default_factory=Counter)      # forwarder -> requests it sent
    incomplete: list[str] = field(default_factory=list)    # error messages of the others
    delivered: int = 0                                     # files at the destination

    @property
    def sent_twice(self) -> int:
        return sum(n - 1 for n in self.sends.values() if n > 1)

    @property
    def ok(self) -> bool:
        return (not self.incomplete and self.sent_twice == 0 and len(self.sends) == self.requests
                and self.delivered == self.requests)


class _Sends(logging.Handler):
    """Counts the forwarder's "sent and verified" lines (logging serializes `emit`)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__()
        self.outcome = outcome

    def emit(self, record: logging.LogRecord) -> None:
        if "sent and verified" in str(record.msg) and record.args:
            self.outcome.sends[str(record.args[0])] += 1  # type: ignore[index]
            self.outcome.by[record.threadName or ""] += 1


def two_forwarders(root: Path, dsn: str, requests: int = 200) -> Outcome:
    """Make `requests` studies and requests, run two forwarders until none is pending."""
    research = root / "research"
    config = load(str(init(root / "data", port=11112, ip="127.0.0.1", extra={
        "NODE": "north", "CONTROL_PLANE": {"type": "postgres", "dsn": dsn},
        "DESTINATIONS": {"research": {"type": "folder", "path": str(research)}}})))
    site = config.site(None)
    machines = [PostgresControlPlane(dsn, holder=f"gw{n}/north/main") for n in (1, 2)]
    control = machines[0]
    control.save_project(Project("PROJ", naming="^P[0-9]{4}$", events=["baseline"]))
    forwarders = [Forwarder(config, site, cp, workers=1) for cp in machines]
    template = make_study(root / "src", n_series=1, images_per_series=1, seed=5)["files"][0]
    for n in range(requests):
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        folder = forwarders[0].tree.raw / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        ds.save_as(folder / "1.dcm", enforce_file_format=True)
        control.add_request(TransferRequest(ds.StudyInstanceUID, "PROJ", f"P{n:04d}", "baseline",
                                            f"2026-03-02 {n // 60:02d}:{n % 60:02d}:00"))
    outcome = Outcome(requests)
    sends = _Sends(outcome)
    logger = logging.getLogger(FORWARDER.logger)
    level = logger.level
    logger.addHandler(sends)
    logger.setLevel(logging.INFO)
    errors: list[BaseException] = []
    idle = threading.Event()

    def run(forwarder: Forwarder) -> None:
        try:
            while control.pending_requests():
                work = forwarder.due()
                for req in work:
                    forwarder.process_claimed(req)
                if not work:
                    idle.wait(0.05)  # the other one holds what is left
        except BaseException as exc:  # raised by the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,), name=f"forwarder-{n}")
               for n, f in enumerate(forwarders, start=1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        logger.removeHandler(sends)
        logger.setLevel(level)
        for f in forwarders:
            f.pool.close()
    if errors:
        raise errors[0]
    outcome.incomplete = [r.error_message for r in control.requests()
                          if not r.complete or r.pending]
    outcome.delivered = sum(1 for _ in research.rglob("*.dcm"))
    return outcome
