"""Two forwarders on one PostgreSQL index (two machines of one site on shared storage): real
`Forwarder`s, 200 requests, a folder destination. Each request is claimed by one of them
(`FOR UPDATE SKIP LOCKED` and a lease) and so sent exactly once."""

from __future__ import annotations

import logging
import threading
from collections import Counter

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomgen import make_study
from fiona.bootstrap import init
from fiona.config import load
from fiona.control.base import Project, TransferRequest
from fiona.control.postgres import PostgresControlPlane
from fiona.send.forward import Forwarder
from fiona.suite import FORWARDER
from postgres import postgres_server

REQUESTS = 200

pg_server = pytest.fixture(scope="session")(postgres_server)


class Sends(logging.Handler):
    """Counts the forwarder's "sent and verified" lines per study (thread-safe: logging
    serializes `emit`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()
        self.by: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if "sent and verified" in record.msg:
            self.count[str(record.args[0])] += 1
            self.by[record.threadName or ""] += 1


def test_two_forwarders_on_one_postgres_index_send_each_request_once(pg_server, tmp_path):
    dsn = pg_server.database()
    config = load(str(init(tmp_path / "data", port=11112, ip="127.0.0.1", extra={
        "NODE": "north", "CONTROL_PLANE": {"type": "postgres", "dsn": dsn},
        "DESTINATIONS": {"research": {"type": "folder", "path": str(tmp_path / "research")}}})))
    site = config.site(None)
    machines = [PostgresControlPlane(dsn, holder=f"gw{n}/north/main") for n in (1, 2)]
    control = machines[0]
    control.save_project(Project("PROJ", naming="^P[0-9]{4}$", events=["baseline"]))
    forwarders = [Forwarder(config, site, cp, workers=1) for cp in machines]
    template = make_study(tmp_path / "src", n_series=1, images_per_series=1, seed=5)["files"][0]
    for n in range(REQUESTS):
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        folder = forwarders[0].tree.raw / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        ds.save_as(folder / "1.dcm", enforce_file_format=True)
        control.add_request(TransferRequest(ds.StudyInstanceUID, "PROJ", f"P{n:04d}", "baseline",
                                            f"2026-03-02 0{n // 60}:{n % 60:02d}:00"))
    sends = Sends()
    logger = logging.getLogger(FORWARDER.logger)
    logger.addHandler(sends)
    level = logger.level
    logger.setLevel(logging.INFO)
    errors: list[BaseException] = []
    idle = threading.Event()

    def run(forwarder: Forwarder) -> None:
        try:
            while control.pending_requests():
                work = forwarder.due()
                for req in work:
                    forwarder.process(req)
                if not work:
                    idle.wait(0.05)  # the other one holds what is left
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in forwarders]
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
    assert not errors, errors
    stored = control.requests()
    assert all(r.complete and not r.pending for r in stored), \
        [r.error_message for r in stored if not r.complete][:3]
    assert len(sends.count) == REQUESTS and set(sends.count.values()) == {1}
    assert sum(1 for _ in (tmp_path / "research").rglob("*.dcm")) == REQUESTS
    assert len(sends.by) == 2, sends.by          # both worked, side by side
