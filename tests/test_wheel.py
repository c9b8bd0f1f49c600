"""A plain, non-editable install works (issue 14): the wheel carries the profiles and the
default classification rules as package data. The built wheel goes into a fresh venv that
cannot see the source tree (run from a temporary folder; the dependencies come from the test
venv's site-packages through a path file, which processes none of that folder's own path files,
so the editable install of the source tree stays invisible), then `fiona init` and
`fiona anonymize` run from there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
#: not part of what a wheel is built from
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "data",
                              "test-artifacts", ".*_cache")


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`args` in `cwd`, without a PYTHONPATH that could point back at the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the built wheel of FIONA; returns its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    # a copy, so no build/ cache of the work tree can leak stale files into the wheel
    shutil.copytree(REPO, source, ignore=SKIP, symlinks=True)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", root / "dist", ".",
        cwd=source)
    (wheel,) = (root / "dist").glob("fiona-*.whl")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "-q", wheel, cwd=root)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=root).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.rmtree(source)
    return venv / "bin"


def test_init_anonymize_check_and_a_daemon_pass_from_the_wheel(installed: Path, tmp_path: Path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run(installed / "python", "-c", "import fiona; print(fiona.__file__)", cwd=cwd)
    assert str(installed.parent) in where.stdout and str(REPO) not in where.stdout
    run(installed / "fiona", "init", "--data", tmp_path / "data", "--port", "11112", cwd=cwd)
    rules = tmp_path / "data" / "config" / "classifyRules.json"
    assert rules.read_bytes() == (REPO / "fiona" / "index" / "classifyRules.json").read_bytes()
    made = make_study(tmp_path / "in", n_series=1, images_per_series=2, seed=9)
    config = tmp_path / "data" / "config" / "config.json"
    for profile in ("default", "compat42"):
        out = tmp_path / f"out-{profile}"
        done = run(installed / "fiona", "--config", config, "anonymize", "--project", "PROJ",
                   "--participant", "P0001", "--profile", profile, tmp_path / "in", out, cwd=cwd)
        assert "2 files in 1 series written" in done.stdout
        for f in out.rglob("*.dcm"):
            ds = pydicom.dcmread(f)
            assert ds.PatientID == "P0001" and ds.StudyInstanceUID != made["study"]
            assert f"FIONA profile {profile}" in str(ds.DeidentificationMethod)
    # what the systemd units run: the configuration check and a daemon's single pass
    checked = run(installed / "fiona", "--config", config, "config", "check", cwd=cwd)
    assert "DATADIR" in checked.stdout
    run(installed / "fiona", "--config", config, "process-single-file", "--once", cwd=cwd)
