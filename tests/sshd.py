"""A real OpenSSH server on loopback for the SFTP tests: a non-system sshd on a free port with its
own host key, the client key FIONA logs in with, and a known_hosts file naming the host key.

`Sshd.stop()` kills the listener and every session process it forked (each session calls
setsid, so it is not in the listener's process group): an abrupt server loss, mid-upload if
an upload is running. `start()` brings it back on the same port with the same keys.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import free_port, wait_for
from procs import _pids, _stat, alive, spawn, stop

SSHD = "/usr/sbin/sshd"  # sshd refuses to run unless started by its absolute path


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def descendants(root: int) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        kids = {pid for pid in _pids() if (s := _stat(pid)) and s[1] in frontier}
        frontier = kids - found
        found |= kids
    return found


class Sshd:
    def __init__(self, base: Path):
        if not os.access(SSHD, os.X_OK):
            pytest.fail(f"{SSHD} is missing: `make test` installs the Debian package "
                        f"openssh-server")
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = keygen(base / "host_key")
        self.client_key = keygen(base / "client_key")
        os.chmod(self.client_key, 0o600)
        (base / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.known_hosts = base / "known_hosts"
        pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.remote = base / "remote"
        self.remote.mkdir()
        self.config = base / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {base / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "StrictModes no", "UsePAM no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp",
            f"PidFile {base / 'sshd.pid'}", "LogLevel ERROR", ""]))
        self.log = base / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def settings(self, **override) -> dict:
        """An `sftp` DESTINATIONS entry for this server, uploading into `self.remote`."""
        import getpass

        return {"type": "sftp", "host": "127.0.0.1", "port": self.port,
                "user": getpass.getuser(), "key": str(self.client_key),
                "known_hosts": str(self.known_hosts), "remote_dir": str(self.remote),
                **override}

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = spawn([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log,
                              stderr=subprocess.STDOUT)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"sshd exited: {self.log.read_text()[-2000:]}")
            import socket

            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 30, "sshd to listen")

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None:
            return
        sessions = descendants(self.proc.pid)
        stop([self.proc], find=lambda: [p for p in sessions if alive(p)], grace=grace)
        self.proc = None


@pytest.fixture(name="sshd")
def sshd_fixture(tmp_path: Path):
    """A started `Sshd`, stopped (with its sessions) at the end of the test."""
    server = Sshd(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
