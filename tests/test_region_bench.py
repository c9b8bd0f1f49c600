"""The short form of bench/region.py: three `fiona up` nodes on loopback sharing one REDCap
emulator and one Orthanc, one coupled study per node and wave, auto-ID of one patient at two
nodes, one node killed and restarted (its PostgreSQL phase runs on its own in
test_region_forwarders.py). The bench checks and reports; this test holds it to
its promise: exit 0 and a last line with nothing lost, doubled or failed by a foreign node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_a_region_of_three_nodes_delivers_everything_once(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "bench" / "region.py"), "--per-node", "1",
                          "--requests", "0", "--json", str(tmp_path / "region.json")],
                         capture_output=True,
                         text=True, timeout=900, cwd=tmp_path,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert last == "region: nodes 3, studies 8, lost 0, duplicates 0, foreign failures 0"
    assert "got the same participant ID" in res.stdout
