"""`fiona up` (what `make run` starts): first-run setup, the whole ingest chain, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom

from helpers import dcmtk, free_port, wait_for
from dicomgen import make_study

REPO = Path(__file__).resolve().parents[1]


def test_up_sets_up_runs_and_stops_cleanly(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FIONA_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "fiona", "up", "--data", str(tmp_path / "data"),
                             "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def echo_ok():
            return subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(port)],
                                  capture_output=True).returncode == 0
        wait_for(echo_ok, 30, "fiona up to listen")
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
