"""A FIONA site run inside the test process, on a FakeClock.

The receiver's own store handler files objects, the indexer and the arrival detector are the
daemons' classes, the control plane is the local SQLite one: only the processes and the
network are left out, so rules that depend on time (the quiet period, retries, eviction,
ethics approval dates) are tested by advancing the clock instead of sleeping. The daemons
themselves are tested end to end in test_arrival.py and test_receive.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom

from fiona.arrive.detector import ArrivalDetector
from fiona.bootstrap import init
from fiona.clock import FakeClock
from fiona.config import Config, Site, load
from fiona.control.assign import Assigner
from fiona.control.keyed import Keyed
from fiona.control.local import LocalControlPlane
from fiona.index.indexer import Indexer, load_rules
from fiona.receive.store import StoreHandler, dataset_part
from fiona.receive.ul import Association, StoreRequest
from fiona.suite import INDEXER
from fiona.tree import Tree

SUCCESS = 0x0000


@dataclass
class LocalSite:
    """One site's data tree, control plane and clock, with the daemons' classes."""

    config: Config
    site: Site
    tree: Tree
    control: LocalControlPlane
    keyed: Keyed
    clock: FakeClock
    store: StoreHandler
    indexer: Indexer

    @classmethod
    def create(cls, root: Path, start: datetime | None = None, **extra) -> LocalSite:
        """A new site under `root`; its clock starts at `start` (default: now)."""
        path = init(root / "data", port=11112, ip="127.0.0.1", extra=extra)
        config = load(str(path))
        site = config.site(None)
        tree = Tree(site.datadir)
        clock = FakeClock(start=start or datetime.now())
        return cls(config, site, tree, LocalControlPlane(tree.site / "fiona.db"),
                   Keyed.from_datadir(site.datadir), clock,
                   StoreHandler(tree, 100.0, INDEXER.pipe_path(site)),
                   Indexer(site, load_rules(site), clock))

    def close(self) -> None:
        self.store.close()

    def assigner(self) -> Assigner:
        return Assigner(self.control, self.keyed, self.clock)

    def detector(self) -> ArrivalDetector:
        return ArrivalDetector(self.config, self.site, self.control, self.keyed, self.clock)

    def receive(self, files: Iterable[Path], calling: str = "STORESCU",
                called: str = "FIONA") -> None:
        """C-STOREs as the receiver's handler gets them from an association."""
        assoc = Association(calling, called, "127.0.0.1", 40000)
        with self._on_the_clock():
            for i, path in enumerate(files, start=1):
                header = pydicom.dcmread(path, stop_before_pixels=True)
                syntax, data = dataset_part(path)
                status = self.store.on_store(StoreRequest(
                    assoc, i, str(header.SOPClassUID), str(header.SOPInstanceUID), syntax, data))
                assert status == SUCCESS, f"{path.name}: status {status:#06x}"

    def index(self) -> int:
        """What the indexer daemon does when woken: everything in the journal, then flush."""
        with self._on_the_clock():
            return self.indexer.drain()

    def arrive(self, files: Iterable[Path], calling: str = "STORESCU",
               called: str = "FIONA") -> None:
        self.receive(files, calling, called)
        self.index()

    @contextmanager
    def _on_the_clock(self) -> Iterator[None]:
        """Arrival files touched inside get the fake clock's time: the detector compares
        their modification times with its clock, and the file system stamps real time."""
        before = {e.path: e.stat().st_mtime_ns for e in os.scandir(self.tree.arrived)}
        yield
        now = self.clock.time()
        for entry in os.scandir(self.tree.arrived):
            if before.get(entry.path) != entry.stat().st_mtime_ns:
                os.utime(entry.path, (now, now))
