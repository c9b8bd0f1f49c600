"""Two forwarders sharing one SQL index (SQLite here, on a fake clock): a request claimed in
a batch whose lease ran out while the batch was being sent, and that another forwarder took
and sent meanwhile, is not sent a second time by the first."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from dicomgen import make_study
from fiona.bootstrap import init
from fiona.clock import FakeClock
from fiona.config import load
from fiona.control.base import Project, TransferRequest, now_iso
from fiona.control.local import LocalControlPlane
from fiona.control.sql import CLAIM_SECONDS
from fiona.send.forward import Forwarder


def test_a_claim_lost_during_a_slow_batch_is_not_sent_twice(tmp_path: Path):
    research = tmp_path / "research"
    config = load(str(init(tmp_path / "data", port=11112, ip="127.0.0.1", extra={
        "DESTINATIONS": {"research": {"type": "folder", "path": str(research)}}})))
    site = config.site(None)
    clock = FakeClock(start=datetime(2026, 3, 2, 9, 30, 0))
    db = site.datadir / "site" / "fiona.db"
    first, second = (Forwarder(config, site, LocalControlPlane(db, clock, holder), clock,
                               workers=1) for holder in ("gw1/n/main", "gw2/n/main"))
    first.control.save_project(Project("PROJ", naming="^P[0-9]{4}$", events=["baseline"]))
    made = make_study(tmp_path / "src", n_series=1, images_per_series=1, seed=5)
    series_dir = first.tree.raw / made["study"] / made["series"][0]
    series_dir.mkdir(parents=True)
    for f in made["files"]:
        shutil.copy(f, series_dir / f.name)
    first.control.add_request(TransferRequest(made["study"], "PROJ", "P0001", "baseline",
                                              requested=now_iso(clock)))

    [batch] = first.due()                      # claimed by the first forwarder
    clock.advance(CLAIM_SECONDS + 1)           # ... whose earlier sends outlast the lease
    [taken] = second.due()
    second.process_claimed(taken)
    assert len(list(research.rglob("*.dcm"))) == 1
    shutil.rmtree(research)                    # so a second send would show
    first.process_claimed(batch)               # the first comes to it at last: not again
    assert list(research.rglob("*.dcm")) == []
    [stored] = first.control.requests()
    assert stored.complete and not stored.pending
