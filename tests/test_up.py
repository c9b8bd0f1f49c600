"""`fiona up` (what `make run` starts): first-run setup, the whole ingest chain, clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona.suite import DAEMONS
from helpers import dcmtk, free_port, wait_for
from procs import alive, children, spawn

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FIONA_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _up(tmp_path: Path, port: int) -> subprocess.Popen:
    """`fiona up` on a new data tree, listening on `port`."""
    proc = spawn([sys.executable, "-m", "fiona", "up", "--data", str(tmp_path / "data"),
                  "--port", str(port)], cwd=tmp_path, env=_env(),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def echo_ok():
        return subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(port)],
                              capture_output=True).returncode == 0
    wait_for(echo_ok, 30, "fiona up to listen")
    return proc


def test_up_sets_up_runs_and_stops_cleanly(tmp_path: Path):
    port = free_port()
    env = _env()
    proc = _up(tmp_path, port)
    try:
        config = json.loads((tmp_path / "data" / "config" / "config.json").read_text())
        assert config["DICOMPORT"] == port
        assert oct((tmp_path / "data" / "config" / "secret.key").stat().st_mode & 0o777) == "0o600"
        cfg = str(tmp_path / "data" / "config" / "config.json")
        fiona = [sys.executable, "-m", "fiona", "--config", cfg]
        subprocess.run(fiona + ["project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events",
                                "baseline"], check=True, env=env, capture_output=True)
        (tmp_path / "cl.csv").write_text("UP1,PROJ,P0001,baseline\n")
        subprocess.run(fiona + ["coupling", "upload", str(tmp_path / "cl.csv")], check=True,
                       env=env, capture_output=True)
        study = make_study(tmp_path / "s", n_series=1, images_per_series=5, accession="UP1",
                           patient_name="Berg^Ola")
        res = subprocess.run([dcmtk("storescu"), "+sd", "-aec", "FIONA", "127.0.0.1", str(port),
                              str(tmp_path / "s")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        series_json = (tmp_path / "data" / "site" / "raw" / study["study"] /
                       f"{study['series'][0]}.json")
        wait_for(lambda: series_json.exists() and
                 json.loads(series_json.read_text())["NumFiles"] == 5, 60, "indexing")
        # no manual step: arrival, the coupling row, de-identification, the research folder
        research = tmp_path / "data" / "research"
        sent = wait_for(lambda: list(research.glob("*/*/*.dcm")) if len(
            list(research.glob("*/*/*.dcm"))) == 5 else None, 120, "the de-identified copy")
        copy = pydicom.dcmread(sent[0])
        assert copy.PatientID == "P0001" and copy.InstitutionName == "PROJ"
        assert copy.StudyInstanceUID != study["study"] and "Berg" not in str(copy)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"send DICOM to AE FIONA at 0.0.0.0:{port}" in out
    assert "FIONA stopped." in out
    run = tmp_path / "data" / "site" / "run"
    assert not list(run.glob("*.pid")), "daemons left pid files behind"


def test_daemons_exit_when_up_is_killed(tmp_path: Path):
    """SIGKILL gives `fiona up` no chance to stop its daemons: they notice on their own
    (PR_SET_PDEATHSIG), finish cleanly (pid files removed) and free the port."""
    port = free_port()
    proc = _up(tmp_path, port)
    run = tmp_path / "data" / "site" / "run"

    started = [d for d in DAEMONS if not d.requires]  # MPPS and the pull need MPPSPORT

    def all_daemons():
        kids = children(proc.pid)
        return kids if len(kids) == len(started) else None
    daemons = wait_for(all_daemons, 30, "every daemon of fiona up")
    wait_for(lambda: len(list(run.glob("*.pid"))) == len(started), 30, "every daemon's pid file")
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in daemons), 60, "the orphaned daemons to exit")
    assert not list(run.glob("*.pid")), "daemons did not stop cleanly"
    with socket.socket() as s:  # a new `fiona up` can listen again (as it does, REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
