"""A real Orthanc (Debian package `orthanc`, installed by `make test`) as a research PACS.

    pacs = Orthanc(tmp_path).start()      # free ports, storage in tmp_path/orthanc
    pacs.dicom_port, pacs.http            # send DICOM to 127.0.0.1:dicom_port, AE "ORTHANC"
    pacs.studies(), pacs.instances_of(study), pacs.tags(instance_id), pacs.count(),
    pacs.series_counts(study_uid), pacs.get/get_bytes/post/put(REST path)
    pacs.restart()                        # same ports and storage
    pacs.stop()                           # SIGTERM, ~3 s; stop(kill=True) at once

or `with Orthanc(tmp_path, extra={...config keys...}) as pacs:` (killed at the end), or the
`orthanc` fixture (started, killed at the end of the test). Started with procs.spawn, an
instance is stopped at the end of the test even when nothing else stops it. Orthanc ignores
bind-address settings and listens on all interfaces: only ever send to 127.0.0.1. It runs with
TCP_NODELAY=1 in its environment, otherwise every C-STORE waits ~40 ms on a delayed ACK.
C-FIND is allowed from any AE (DicomAlwaysAllowFind), as the sender verifies by C-FIND.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from procs import spawn

ORTHANC = "/usr/sbin/Orthanc"
AET = "ORTHANC"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # Orthanc binds all interfaces, so the port must be free on all
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process with its storage, index and log under `tmp_path/name`."""

    def __init__(self, tmp_path: Path, name: str = "orthanc", extra: dict[str, Any] | None = None):
        if not os.access(ORTHANC, os.X_OK):
            pytest.fail(f"Orthanc is missing at {ORTHANC}: `make test` installs the Debian "
                        f"package orthanc (apt-get install -y orthanc)")
        self.dir = Path(tmp_path) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aet = AET
        self.dicom_port = _free_port()
        self.http_port = _free_port()
        self.extra = dict(extra or {})
        self.log = self.dir / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "FIONA-test-PACS",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomCheckCalledAet": False,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "LuaScripts": [],
            "Plugins": [],
            **self.extra,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        if self.proc is not None and self.proc.poll() is None:
            return self
        path = self.dir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log, "ab") as log:
            self.proc = spawn([ORTHANC, str(path)], stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL, cwd=self.dir,
                              env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n"
                                     f"{self._log_tail()}")
            try:
                self.get("/system", timeout=1)
                if self._dicom_listening():
                    return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"Orthanc did not answer /system within {timeout} s:\n"
                             f"{self._log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """Stop Orthanc: SIGTERM and wait (~3 s: Orthanc lets its HTTP and DICOM servers
        finish), or with `kill` SIGKILL at once (for throw-away instances)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
            proc.wait(10)
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self) -> Orthanc:
        self.stop()
        return self.start()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(kill=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- REST -----------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=timeout) as rsp:
            return json.loads(rsp.read())

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.http + path, timeout=timeout) as rsp:
            return rsp.read()

    def post(self, path: str, body: Any, timeout: float = 30) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.http + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return json.loads(rsp.read())

    def put(self, path: str, body: bytes, timeout: float = 30) -> bytes:
        req = urllib.request.Request(self.http + path, data=body, method="PUT")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.read()

    def studies(self) -> list[dict]:
        """Every study, expanded (MainDicomTags, Series, ID, ...)."""
        return self.get("/studies?expand")

    def instances_of(self, study: str | dict) -> list[dict]:
        """The instances of a study given as Orthanc ID, expanded study dict, or
        StudyInstanceUID."""
        study_id = self._study_id(study)
        return self.get(f"/studies/{study_id}/instances") if study_id else []

    def tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def count(self) -> int:
        """Number of instances stored."""
        return int(self.get("/statistics")["CountInstances"])

    def series_counts(self, study_uid: str) -> dict[str, int]:
        """SeriesInstanceUID -> number of instances, for one StudyInstanceUID."""
        study_id = self._study_id(study_uid)
        if not study_id:
            return {}
        counts: dict[str, int] = {}
        for series in self.get(f"/studies/{study_id}/series"):
            uid = series["MainDicomTags"]["SeriesInstanceUID"]
            counts[uid] = len(series["Instances"])
        return counts

    def _study_id(self, study: str | dict) -> str | None:
        if isinstance(study, dict):
            return study["ID"]
        if "." in study:  # a StudyInstanceUID
            found = self.post("/tools/lookup", study.encode())
            return next((f["ID"] for f in found if f["Type"] == "Study"), None)
        return study

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def orthanc(tmp_path: Path):
    """A started Orthanc (AE "ORTHANC" at 127.0.0.1:`.dicom_port`), stopped after the test."""
    with Orthanc(tmp_path) as pacs:
        yield pacs
