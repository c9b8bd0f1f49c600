"""The soak harness (bench/soak.py) in its short form, and the memory check (bench/memory.py).

The soak's short form runs the whole gateway (fiona up, Orthanc, the REDCap emulator behind a
fault proxy) for 1.5 minutes of small studies from eight concurrent senders, with every fault
injected once from a fixed seed, and must end with every invariant holding. The long form
(5 minutes, studies up to 500 images) is run by hand; its figures are in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from procs import spawn

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, tmp_path: Path, *args: str, timeout: float) -> tuple[int, str]:
    """Run a bench script with its scratch folder under tmp_path; (exit status, output)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("FIONA_CONFIG", None)
    proc = spawn([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.timeout(1500)
def test_soak_short_form_keeps_every_invariant(tmp_path: Path):
    figures_file = tmp_path / "soak.json"
    status, out = run_bench("soak.py", tmp_path, "--minutes", "1.5", "--small", "--seed", "7",
                            "--control", "redcap", "--json", str(figures_file), timeout=1200)
    assert status == 0, out[-6000:]
    figures = json.loads(figures_file.read_text())
    assert figures["failures"] == []
    assert figures["lost"] == 0 and figures["duplicates"] == 0 and figures["stuck"] == 0
    assert figures["identifiers found"] == 0 and figures["tracebacks"] == 0
    assert figures["faults"] == 9  # five kills, SIGSTOP, Orthanc, REDCap, disk watermark
    assert figures["images"] > 0 and set(figures["images by sender"]) == {
        "storescu", "dcmsend", "pynetdicom"}
    assert set(figures["peak RSS MB"]) == {"receiver", "indexer", "arrival", "forwarder", "web"}
    assert out.strip().splitlines()[-1].startswith("soak: studies ")


@pytest.mark.timeout(1200)
def test_receiver_and_indexer_stay_below_200_mb_through_a_large_study(tmp_path: Path):
    # 3,000 images: per-image state that is never released shows well before that; the
    # bench's default 10,000 (README) is run by hand
    status, out = run_bench("memory.py", tmp_path, "--images", "3000", "--limit-mb", "200",
                            timeout=1000)
    assert status == 0, out[-4000:]
    assert "peak RSS receiver" in out and "peak RSS indexer" in out and ": ok" in out
