"""`fiona reindex`: rebuilding raw/, participants/ and the series JSONs from the archive, on a
site run in the test process (tests/inprocess.py), and once through the command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomgen import make_study
from fiona.clock import FakeClock
from fiona.index.reindex import reindex, select_studies
from inprocess import LocalSite


@pytest.fixture
def site(tmp_path: Path):
    s = LocalSite.create(tmp_path)
    yield s
    s.close()


def snapshot(root: Path) -> dict[str, object]:
    """Every file's JSON content and every link's target under raw/ and participants/."""
    out: dict[str, object] = {}
    for base in ("raw", "participants"):
        for dirpath, dirnames, filenames in os.walk(root / base):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                rel = str(path.relative_to(root))
                if path.is_symlink():
                    out[rel] = os.readlink(path)
                elif path.is_file():
                    out[rel] = json.loads(path.read_text())
    return out


def test_reindex_after_deleting_raw_rebuilds_the_same_tree(site, tmp_path):
    a = make_study(tmp_path / "a", n_series=2, images_per_series=4, patient_id="PA",
                   accession="A1")
    b = make_study(tmp_path / "b", n_series=1, images_per_series=3, patient_id="PB",
                   accession="B1", seed=1)
    site.arrive(a["files"] + b["files"])
    before = snapshot(site.tree.site)
    assert any(k.endswith(".json") for k in before)
    shutil.rmtree(site.tree.raw)
    shutil.rmtree(site.tree.participants)
    site.tree.raw.mkdir()
    site.tree.participants.mkdir()
    arrived = sorted(os.listdir(site.tree.arrived))
    # the kernel stamps files with a clock tick, so a fast sender's files share one mtime:
    # the journal's order, not the names, must decide which image built the series JSON
    for study in (a["study"], b["study"]):
        for f in site.tree.study_archive(study).iterdir():
            os.utime(f, ns=(10**18, 10**18))

    result = reindex(site.site, site.tree.archived_studies())
    assert (result.studies, result.files, result.failed) == (2, 11, 0)
    assert snapshot(site.tree.site) == before
    assert sorted(os.listdir(site.tree.arrived)) == arrived  # nothing "arrives" again
    reindex(site.site, [a["study"]])  # idempotent, and other studies untouched
    assert snapshot(site.tree.site) == before


def test_selectors(site, tmp_path):
    a = make_study(tmp_path / "a", n_series=1, images_per_series=2, patient_id="PA")
    b = make_study(tmp_path / "b", n_series=1, images_per_series=2, patient_id="PB", seed=1)
    c = make_study(tmp_path / "c", n_series=1, images_per_series=2, patient_id="PA", seed=2)
    site.arrive(a["files"] + b["files"] + c["files"])
    tree = site.tree
    assert select_studies(tree, study=b["study"]) == [b["study"]]
    assert select_studies(tree, study="1.2.3") == []
    assert select_studies(tree, patient="PA") == sorted([a["study"], c["study"]])
    assert select_studies(tree, patient="NOBODY") == []
    # --last-days by the archive's modification times: a is 10 days old, b 2, c just now
    now = time.time()
    for study, age in ((a["study"], 10), (b["study"], 2)):
        for f in tree.study_archive(study).iterdir():
            os.utime(f, (now - age * 86400, now - age * 86400))
    clock = FakeClock()
    clock.time = lambda: now  # the file system's clock is the real one
    assert select_studies(tree, last_days=1, clock=clock) == [c["study"]]
    assert select_studies(tree, last_days=3, clock=clock) == sorted([b["study"], c["study"]])


def test_command(site, tmp_path):
    a = make_study(tmp_path / "a", n_series=1, images_per_series=2, patient_id="SECRET42")
    site.arrive(a["files"])
    before = snapshot(site.tree.site)
    shutil.rmtree(site.tree.raw)

    def fiona(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fiona", "--config",
                               str(site.config.path), "reindex", *args],
                              capture_output=True, text=True, timeout=300)

    res = fiona("--patient", "SECRET42")
    assert res.returncode == 0, res.stderr
    assert "reindexed 1 study(ies), 2 file(s)" in res.stdout
    assert snapshot(site.tree.site) == before
    logs = "".join(p.read_text(errors="replace") for p in site.tree.logs.rglob("*.log"))
    assert "SECRET42" not in logs + res.stderr
    res = fiona("--study", "not/a uid")
    assert res.returncode == 2
    res = fiona("--last-days", "0.0000001")
    assert res.returncode == 1 and "no archived study" in res.stderr
