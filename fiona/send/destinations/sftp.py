"""The `sftp` destination: de-identified studies (and outbox files) uploaded to an SFTP server.

The server is authenticated before anything is sent: its key must be in the `known_hosts` file
of the settings (paramiko `load_host_keys` with `RejectPolicy`), never accepted on first sight.
FIONA logs in with the private `key` file, which must be readable by its owner only (0600 or
stricter), checked at config load like every other setting.

Every upload follows one rule (`Sftp.put`): write under a hidden temporary name in the target
folder, rename to the final name when complete, then verify: the remote size, and the checksum,
from the server's `<file>.sha256` or `<file>.md5` sidecar when the site's server writes one (the
original's md5 reconciliation), else by reading the remote file back and hashing it. A file that
fails verification is removed from the final name, so a name on the server always holds a
complete, verified copy. An upload cut off (server or network gone) leaves only the temporary
file; the next attempt resumes it when it is a true prefix of the file (same SHA-256 over its
length: computed by the server where it offers the `check-file` extension, else read back, up
to `RESUME_READBACK_LIMIT` bytes; OpenSSH does not offer it), and otherwise starts it again from
zero. Either way the whole file is verified after the rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ...backoff import Schedule, attempts
from ...clock import SYSTEM_CLOCK, Clock
from ...tree import InvalidValue, valid_uid
from .base import (
    Destination,
    DestinationError,
    DestinationSettings,
    DestinationUnavailable,
    Progress,
    SendResult,
    register,
    setting,
)
from .folder import _uid_of

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("fiona.send.destinations")
T = TypeVar("T")

CHUNK = 256 * 1024
#: a partial upload longer than this is sent again rather than read back to check it: past
#: some size reading it costs about what sending it again does
RESUME_READBACK_LIMIT = 512 << 20
#: sidecar suffixes a server may write beside an uploaded file, by hash name, preferred first
SIDECARS = (("sha256", ".sha256"), ("md5", ".md5"))


@dataclass
class SftpSettings(DestinationSettings):
    """`host`, `port`, `user`, the private `key` file (mode 0600), the `known_hosts` file that
    holds the server's host key, and the `remote_dir` to upload into."""

    kind = "sftp"
    host: str = setting("sftp.example.org")
    user: str = setting("fiona")
    key: str = setting("/data/config/sftp_key")
    known_hosts: str = setting("/data/config/sftp_known_hosts")
    remote_dir: str = setting("/incoming")
    port: int = setting(22, 22)

    def problems(self, where: str) -> list[str]:
        errors = [f"{where}.{key} must be a non-empty text, e.g. \"{example}\"; got {value!r}"
                  for key, example, value in (("host", "sftp.example.org", self.host),
                                              ("user", "fiona", self.user),
                                              ("remote_dir", "/incoming", self.remote_dir))
                  if not isinstance(value, str) or not value.strip() or "\x00" in value]
        for key, example in (("key", "/data/config/sftp_key"),
                             ("known_hosts", "/data/config/sftp_known_hosts")):
            value = getattr(self, key)
            if not isinstance(value, str) or not PurePosixPath(value).is_absolute():
                errors.append(f"{where}.{key} must be the absolute path of a file, e.g. "
                              f"\"{example}\"; got {value!r}")
                continue
            try:
                info = os.stat(value)
            except OSError as exc:
                errors.append(f"{where}.{key}: cannot read {value}: {exc.strerror}")
                continue
            if not stat.S_ISREG(info.st_mode):
                errors.append(f"{where}.{key}: {value} is not a file")
            elif key == "key" and info.st_mode & 0o077:
                errors.append(f"{where}.key: {value} has mode {stat.S_IMODE(info.st_mode):04o}; "
                              f"a private key must be readable by its owner only: "
                              f"chmod 600 {value}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or \
                not 1 <= self.port <= 65535:
            errors.append(f"{where}.port must be a whole number from 1 to 65535, "
                          f"got {self.port!r}")
        return errors


class RemoteDiffers(DestinationError):
    """A file of that name is on the server with other contents; it is left alone."""


class _Lost(Exception):
    """The connection broke: reconnect and do the operation again."""


def file_digests(path: Path) -> dict[str, str]:
    """Hex sha256 and md5 of a local file, by hash name."""
    hashes = {name: hashlib.new(name) for name, _ in SIDECARS}
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


class Sftp:
    """One SFTP session to a destination, with verified uploads. Use as a context manager."""

    def __init__(self, name: str, settings: SftpSettings, timeout: float):
        self.name, self.settings, self.timeout = name, settings, timeout
        self._client: paramiko.SSHClient | None = None
        self.sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> Sftp:
        import paramiko

        s = self.settings
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(s.known_hosts)
        except (OSError, paramiko.SSHException) as exc:
            raise DestinationError(f"destination {self.name!r}: cannot read known_hosts "
                                   f"{s.known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        where = f"{s.user}@{s.host}:{s.port}"
        try:
            client.connect(s.host, s.port, username=s.user, key_filename=s.key,
                           look_for_keys=False, allow_agent=False, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout)
            self.sftp = client.open_sftp()
            self.sftp.get_channel().settimeout(self.timeout)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise DestinationError(
                f"destination {self.name!r}: the host key of {s.host}:{s.port} "
                f"({exc.key.get_name()} {exc.key.fingerprint}) is not the one in "
                f"{s.known_hosts}: refused (another server, or its key was changed; if the "
                f"change is genuine, put the new key in {s.known_hosts})") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise DestinationError(f"destination {self.name!r}: {where} refused the key "
                                   f"{s.key}: {exc}") from None
        except paramiko.SSHException as exc:
            client.close()
            if "known_hosts" in str(exc):  # RejectPolicy: an unknown host
                raise DestinationError(
                    f"destination {self.name!r}: {s.host}:{s.port} is not in {s.known_hosts}; "
                    f"its host key is never accepted unseen: add the server's key line "
                    f"(ssh-keyscan, checked with the server's admin) to that file") from None
            raise DestinationUnavailable(f"destination {self.name!r}: {where}: {exc}") from None
        except (OSError, EOFError) as exc:
            client.close()
            raise DestinationUnavailable(f"destination {self.name!r}: cannot connect to "
                                         f"{where}: {exc}") from None
        self._client = client
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()

    @property
    def client(self) -> paramiko.SFTPClient:
        assert self.sftp is not None, "use Sftp as a context manager"
        return self.sftp

    # --- remote files ------------------------------------------------------------------------
    def makedirs(self, remote: str) -> None:
        """mkdir -p on the server."""
        path = PurePosixPath(remote)
        for folder in reversed([path, *path.parents]):
            try:
                self.client.stat(str(folder))
            except FileNotFoundError:
                self.client.mkdir(str(folder))

    def size(self, remote: str) -> int | None:
        try:
            return self.client.stat(remote).st_size
        except FileNotFoundError:
            return None

    def listdir(self, remote: str) -> list[str]:
        try:
            return self.client.listdir(remote)
        except FileNotFoundError:
            return []

    def remote_digest(self, remote: str) -> tuple[str, str, str]:
        """(hash name, hex digest, how it was found) of a remote file: from the server's
        sidecar when there is one, else by reading the file back."""
        for algo, suffix in SIDECARS:
            try:
                with self.client.open(remote + suffix, "rb") as fh:
                    text = fh.read(4096).decode("ascii", "replace").split()
            except FileNotFoundError:
                continue
            if text:
                return algo, text[0].lower(), f"the server's {suffix} file"
        h = hashlib.sha256()
        with self.client.open(remote, "rb") as fh:
            fh.prefetch()
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return "sha256", h.hexdigest(), "reading it back"

    def check(self, remote: str, size: int, digests: dict[str, str]) -> str | None:
        """None when `remote` holds the file of `size` and `digests`, else what differs."""
        actual = self.size(remote)
        if actual is None:
            return "it is missing"
        if actual != size:
            return f"it has {actual} bytes instead of {size}"
        algo, digest, how = self.remote_digest(remote)
        if digest != digests[algo]:
            return f"its {algo} ({how}) is {digest[:16]}... instead of {digests[algo][:16]}..."
        return None

    def put(self, local: Path, remote: str, replace: bool = True,
            digests: dict[str, str] | None = None) -> bool:
        """Upload `local` as `remote`, verified. False when an identical file was there
        already; RemoteDiffers when a different one is there and not `replace`. `digests`:
        the file's `file_digests`, when the caller has them already."""
        size = local.stat().st_size
        digests = digests or file_digests(local)
        if self.size(remote) is not None:
            difference = self.check(remote, size, digests)
            if difference is None:
                return False
            if not replace:
                raise RemoteDiffers(f"{remote} is already on the server and differs ("
                                    f"{difference}); it was not replaced")
            for _, suffix in SIDECARS:  # they describe the old contents
                if self.size(remote + suffix) is not None:
                    self.client.remove(remote + suffix)
        folder, name = PurePosixPath(remote).parent, PurePosixPath(remote).name
        temp = str(folder / f".{name}.part")
        offset = self.resumable(local, temp, size)
        if offset:
            log.info("%s: resuming the upload of %s at byte %d of %d", self.name, remote,
                     offset, size)
        with open(local, "rb") as src, self.client.open(temp, "r+b" if offset else "wb") as dst:
            src.seek(offset)
            dst.seek(offset)
            dst.set_pipelined(True)
            _copy(src, dst)
        if self.size(temp) != size:
            raise _Lost(f"{temp} is incomplete")
        self.client.posix_rename(temp, remote)
        difference = self.check(remote, size, digests)
        if difference is not None:
            self.client.remove(remote)
            raise DestinationError(f"{remote} failed verification after upload: {difference}; "
                                   f"removed")
        return True


    def resumable(self, local: Path, temp: str, size: int) -> int:
        """How many bytes of `local` (`size` bytes) the temporary file `temp` already holds:
        all of its length when it is a true prefix of `local`, else 0 (start again)."""
        partial = self.size(temp)
        if not partial or partial > size:
            return 0
        with open(local, "rb") as fh:
            mine = _digest(fh, partial)
        with self.client.open(temp, "rb") as fh:
            try:
                theirs = fh.check("sha256", 0, partial).hex()
            except OSError:  # no check-file extension (OpenSSH): read it back
                if partial > RESUME_READBACK_LIMIT:
                    return 0
                fh.prefetch(partial)
                theirs = _digest(fh, partial)
        return partial if theirs == mine else 0


def _digest(fh: Any, length: int) -> str:
    """Hex SHA-256 of the first `length` bytes of an open file (fewer when it is shorter)."""
    h = hashlib.sha256()
    while length > 0 and (chunk := fh.read(min(CHUNK, length))):
        h.update(chunk)
        length -= len(chunk)
    return h.hexdigest()


def _copy(src: IO[bytes], dst: Any) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)


@register
class SftpDestination(Destination):
    """Files under `<remote_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`
    on an SFTP server, each uploaded and verified by `Sftp.put` (a different file of the same
    name is replaced, as a PACS overwriting an instance would; an identical one is left).
    The UIDs come from the file and pass `tree.valid_uid` before they become a path.

    A broken connection is reopened (`connect_attempts`, pauses doubling from
    `backoff_seconds` on `clock`, see `fiona.backoff`) and the file in flight uploaded again;
    a server that stays unreachable raises DestinationUnavailable, so the forwarder retries
    the request later with its own back-off. An unknown or changed host key, a refused login
    or a bad known_hosts file raise DestinationError: no retry cures them.
    """

    kind = "sftp"
    settings_class = SftpSettings
    config: SftpSettings

    clock: Clock = SYSTEM_CLOCK
    connect_attempts = 4
    backoff_seconds = 1.0
    timeout = 30.0

    def __repr__(self) -> str:
        c = self.config
        return f"<SftpDestination {self.name!r} {c.user}@{c.host}:{c.port}{c.remote_dir}>"

    def session(self) -> Sftp:
        return Sftp(self.name, self.config, self.timeout)

    def run(self, work: Callable[[Sftp], T]) -> T:
        """`work(sftp)` in a session; when the connection cannot be made or breaks, again in
        a new session after a pause (`connect_attempts`, doubling from `backoff_seconds`),
        then DestinationUnavailable. `work` must be safe to repeat."""
        schedule = Schedule.doubling(self.backoff_seconds, self.connect_attempts)
        problem = ""
        for _ in attempts(schedule, self.connect_attempts, self.clock):
            try:
                with self.session() as sftp:
                    return work(sftp)
            except DestinationUnavailable as exc:
                problem = str(exc)
            except (_Lost, OSError, EOFError, _ssh_errors()) as exc:
                problem = f"destination {self.name!r}: {type(exc).__name__}: {exc}"
            log.warning("%s; trying again", problem)
        raise DestinationUnavailable(f"{problem} (after {self.connect_attempts} attempts)")

    # --- Destination -------------------------------------------------------------------------
    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        result = SendResult()
        placed: list[tuple[Path, str]] = []
        for done, file in enumerate(files, 1):
            try:
                placed.append((file, self._remote_path(Path(file))))
            except (InvalidValue, ValueError, EOFError, OSError) as exc:
                result.failed.append((_uid_of(None, Path(file)), f"{Path(file).name}: {exc}"))
                log.warning("%s: refused %s: %s", self.name, file, exc)
                if progress:
                    progress(done)
        handled = len(result.failed)

        def upload(sftp: Sftp) -> None:
            nonlocal handled
            while placed:
                file, remote = placed[0]
                sftp.makedirs(str(PurePosixPath(remote).parent))
                sftp.put(file, remote)
                placed.pop(0)
                result.sent += 1
                handled += 1
                if progress:
                    progress(handled)

        if placed:
            self.run(upload)
        return result

    def _remote_path(self, file: Path) -> str:
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        try:
            ds = dcmread(file, stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                        "SOPInstanceUID"])
        except InvalidDicomError as exc:
            raise ValueError(str(exc)) from None
        uids = [valid_uid(ds.get(tag), tag)
                for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        return str(PurePosixPath(self.config.remote_dir, uids[0], uids[1], f"{uids[2]}.dcm"))

    def count_instances(self, study_uid: str) -> dict[str, int]:
        study = PurePosixPath(self.config.remote_dir, valid_uid(study_uid, "StudyInstanceUID"))

        def count(sftp: Sftp) -> dict[str, int]:
            counts = {}
            for series in sftp.listdir(str(study)):
                n = sum(1 for f in sftp.listdir(str(study / series))
                        if f.endswith(".dcm") and not f.startswith("."))
                if n:
                    counts[series] = n
            return counts

        return self.run(count)

    def test_connection(self) -> None:
        def probe(sftp: Sftp) -> None:
            sftp.makedirs(self.config.remote_dir)
            path = str(PurePosixPath(self.config.remote_dir, ".fiona-probe"))
            with sftp.client.open(path, "wb") as fh:
                fh.write(b"probe")
            sftp.client.remove(path)

        self.run(probe)


def _ssh_errors() -> type[Exception]:
    import paramiko

    return paramiko.SSHException
