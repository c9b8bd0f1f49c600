"""Durable journals between daemons, and named-pipe wake-ups.

The system FIONA replaces used a named pipe as its only queue: a dead reader made the receiver
hang or drop notices, and dropped files were never indexed. Here the journal is the queue: the
producer appends a line and makes it durable before it reports success (the receiver through
its receipts, `fiona.receive.receipts`, and syncs the journal later); the consumer keeps a durable
read position and replays everything after it when it starts. The pipe only says "look now" and
may lose messages freely.

A journal is a folder of numbered segment files `<name>.<seq>.log`. A writer always starts a new
segment, so a line torn by a crash can only be the last one of an older segment, where the reader
recognises and skips it (the sender was never told "stored", so it sends again). Lines a crash
took from the end of an older segment before they were synced are written again into the new
one from the receipts; a reader whose position lies beyond the shortened end moves on to it.

Several processes may append to one journal (the receiver's worker processes): the first writer
starts the new segment, the others join it (`join=True`), and all of them append and rotate under
one lock file (`<name>.lock`, flock). A segment is left only once it is full, by whichever writer
finds it full first, and no writer appends to a full segment: so once the reader sees a later
segment, no line can still arrive in an earlier one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .tree import ARCHIVE_PREFIX, FILE_MODE, InvalidValue, Tree, atomic_write, ensure_dir, valid_uid

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 * 1024 * 1024
#: the receiver's journal of filed objects, which the indexer follows
RECEIVED = "received"


@dataclass(frozen=True)
class FileEvent:
    """One line of the receiver's journal (RECEIVED): who sent which archived file, as
    `caller,called,ip,<archive>/scp_<Study>,<MOD>.<SOPInstanceUID>`."""

    caller: str
    called: str
    ip: str
    study_dir: Path
    name: str

    @classmethod
    def parse(cls, line: str) -> FileEvent:
        parts = line.split(",")
        if len(parts) != 5:
            raise InvalidValue(f"journal line has {len(parts)} fields, expected 5: {line[:200]!r}")
        caller, called, ip, study_dir, name = parts
        return cls(caller, called, ip, Path(study_dir), name)

    def line(self) -> str:
        """The journal line (the receiver makes AE titles comma-free first)."""
        return f"{self.caller},{self.called},{self.ip},{self.study_dir},{self.name}"

    def path(self, tree: Tree) -> Path:
        """The archived file, checked to lie inside this site's archive."""
        if (not self.study_dir.name.startswith(ARCHIVE_PREFIX)
                or self.study_dir.parent != tree.archive):
            raise InvalidValue(f"journal names a folder outside {tree.archive}: {self.study_dir}")
        valid_uid(self.study_dir.name[len(ARCHIVE_PREFIX):], "StudyInstanceUID (journal)")
        mod, _, sop = self.name.partition(".")
        valid_uid(sop, "SOPInstanceUID (journal)")
        if not mod.isalnum():
            raise InvalidValue(f"journal names an invalid file {self.name!r}")
        return self.study_dir / self.name


def _segments(folder: Path, name: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(name)}\.(\d{{10}})\.log$")
    found = []
    for entry in os.listdir(folder):
        m = pattern.match(entry)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def _segment_path(folder: Path, name: str, seq: int) -> Path:
    return folder / f"{name}.{seq:010d}.log"


class JournalWriter:
    """Appends lines durably; thread-safe. `append` returns once the line is on disk.

    `shared`: other processes append too (see the module docstring); `join`: append to the
    newest segment instead of starting one (a writer that starts after the first)."""

    def __init__(self, folder: Path, name: str, durable: bool = True, shared: bool = False,
                 join: bool = False):
        self.folder = ensure_dir(folder)
        self.name = name
        self.durable = durable
        self._lock = threading.Lock()
        self._shared = -1
        if shared or join:
            self._shared = os.open(self.folder / f"{name}.lock", os.O_RDWR | os.O_CREAT,
                                   FILE_MODE)
        with self._across_processes():
            existing = _segments(self.folder, name)
            self._seq = (existing[-1] + (0 if join else 1)) if existing else 1
            self._open()

    def _across_processes(self) -> _FileLock:
        return _FileLock(self._shared)

    def _open(self) -> None:
        path = _segment_path(self.folder, self.name, self._seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        """Move to the next segment: the newest one, if another writer made it already."""
        if not self.durable:  # what `sync` has not covered yet must not be left behind
            os.fdatasync(self._fd)
        os.close(self._fd)
        self._seq = max([self._seq + 1, *_segments(self.folder, self.name)])
        self._open()

    def append(self, line: str) -> None:
        data = (line.replace("\n", " ") + "\n").encode()
        with self._lock, self._across_processes():
            if self._shared >= 0:  # others append to the same segment
                self._size = os.fstat(self._fd).st_size
            while self._size >= SEGMENT_BYTES:
                self._rotate()
            os.write(self._fd, data)
            self._size += len(data)
            # sync outside the lock so that concurrent appends share the commit; a private
            # descriptor, because a rotation may close the shared one meanwhile
            fd = os.dup(self._fd) if self.durable else -1
        if fd >= 0:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def sync(self) -> None:
        """Make every line appended so far durable (for a writer that is not `durable`)."""
        with self._lock:
            fd = os.dup(self._fd)  # a rotation may close the shared one meanwhile
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if not self.durable:
                os.fdatasync(self._fd)
            os.close(self._fd)
            if self._shared >= 0:
                os.close(self._shared)


class _FileLock:
    """flock on `fd` for a `with` block; nothing when fd is -1 (a writer of its own)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Position:
    """Where a reader stands: segment number and byte offset in it."""

    seq: int
    offset: int


class JournalReader:
    """Reads lines after its durable position; `commit` moves the position.

    Entries between the last commit and a crash are read again after a restart, so the
    consumer must be idempotent; in exchange nothing is ever skipped.
    """

    def __init__(self, folder: Path, name: str, consumer: str):
        self.folder = ensure_dir(folder)
        self.name = name
        self._pos_file = folder / f"{name}.{consumer}.pos"
        self.position = self._load()

    def _load(self) -> Position:
        try:
            seq, offset = self._pos_file.read_text().split()
            return Position(int(seq), int(offset))
        except FileNotFoundError:
            segs = _segments(self.folder, self.name)
            return Position(segs[0] if segs else 1, 0)

    def read(self, limit: int = 10000, start: Position | None = None
             ) -> Iterator[tuple[str, Position]]:
        """Complete lines after `start` (default: the committed position), each with the
        position just after it."""
        pos = start or self.position
        count = 0
        while True:
            segs = _segments(self.folder, self.name)
            path = _segment_path(self.folder, self.name, pos.seq)
            try:
                with open(path, "rb") as fh:
                    fh.seek(pos.offset)
                    data = fh.read()
            except FileNotFoundError:
                data = b""
            end = data.rfind(b"\n") + 1
            offset = pos.offset
            for raw in data[:end].splitlines(keepends=True):
                offset += len(raw)
                count += 1
                yield raw.decode(errors="replace").rstrip("\n"), Position(pos.seq, offset)
                if count >= limit:
                    return
            later = [s for s in segs if s > pos.seq]
            if not later:
                return
            if end < len(data):
                log.warning("journal %s: skipped a torn last line in segment %d (%d bytes); "
                            "the sender was not acknowledged for it", self.name, pos.seq,
                            len(data) - end)
            pos = Position(later[0], 0)

    def caught_up(self) -> bool:
        """True when the consumer (in any process) has committed every complete line."""
        self.position = self._load()
        return next(iter(self.read(1)), None) is None

    def commit(self, pos: Position) -> None:
        """Store `pos` durably and delete segments that lie wholly before it."""
        atomic_write(self._pos_file, f"{pos.seq} {pos.offset}\n".encode())
        self.position = pos
        for seq in _segments(self.folder, self.name):
            if seq < pos.seq:
                try:
                    os.unlink(_segment_path(self.folder, self.name, seq))
                except FileNotFoundError:
                    pass


class WakeupSender:
    """Writes one line to a named pipe without ever blocking; a missing reader is fine."""

    RETRY_SECONDS = 1.0

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def notify(self, line: str) -> None:
        with self._lock:
            if self._fd is None:
                now = time.monotonic()
                if now < self._next_try:
                    return
                self._next_try = now + self.RETRY_SECONDS
                try:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    return  # no reader (ENXIO) or no pipe yet: the journal carries the event
            data = (line + "\n").encode()
            if len(data) > select.PIPE_BUF:
                return  # not atomic in a pipe; the journal carries the event anyway
            try:
                os.write(self._fd, data)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # EAGAIN: the reader is busy and will catch up
                    os.close(self._fd)
                    self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class WakeupListener:
    """The reading end of a wake-up pipe; `wait` returns when poked or after a timeout."""

    def __init__(self, path: Path):
        self.path = path
        ensure_dir(path.parent)
        try:
            st = os.lstat(path)
            if not stat.S_ISFIFO(st.st_mode):
                os.unlink(path)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkfifo(path, 0o620)
        # O_RDWR keeps one writer open ourselves, so the pipe never reports end-of-file
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def wait(self, timeout: float) -> list[str]:
        """The lines that arrived (maybe none) within `timeout` seconds."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        chunks = []
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").splitlines()

    def poked(self) -> bool:
        """True when a wake-up is waiting (it stays there for `wait`)."""
        return bool(select.select([self._fd], [], [], 0)[0])

    def close(self) -> None:
        os.close(self._fd)
