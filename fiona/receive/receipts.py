"""Receipts: each received object made durable, together with its journal record, in one commit.

A success status may be sent only once the object and the record that tells the indexer about
it are both on disk. Writing and fsyncing the file, then appending the journal line and
fdatasyncing the journal, costs two commits of the file system's journal per object: on the
test machine's disk ~0.25 ms of the receiver's ~1.6 ms per image (bench/ingest.py).

Here the object is written once, into `archive/.receipts/` under a name that carries its
journal line and its size, hard-linked into its study folder, and fsynced. On XFS and on ext4
with its journal the fsync of a file commits every link to it, so the archived file and its
receipt become durable in the one commit (an ext4 made without a journal syncs the file alone:
`fiona.tree.has_journal`). The journal line is appended after that without a sync (by the
step `store` returns, which the receiver runs once the sender has its status; the indexer
reads the line from the page cache at once); a flusher fdatasyncs the journal about once a
second and then removes the receipts whose lines that sync covers. After a crash `recover`
appends the lines of the receipts left over (the indexer is idempotent, so a line it already
has costs only time) and removes archived files shorter than their receipt says: torn copies
of objects whose fsync never returned, so their sender was never told "stored" and sends them
again. (On these file systems a file's on-disk size grows only once its data is written, so a
short file is a torn one.)

On other file systems (an ext4 made without a journal syncs a file and not the names that point
at it: `fiona.tree.has_journal`) the data is fsynced first, then linked into the study folder,
and the receipts folder is synced before the status: the receipt is the record that survives.
The study folders are synced by the flusher, before the journal and before it removes a
receipt, once per folder and flush rather than once per object (one flush of the disk's cache
per object less: `store` took 0.63-0.67 ms here instead of 0.84-0.90). A study folder's new
name lost in a crash is made again by `recover` from the receipt, which is the same inode with
the whole object.

A receipt name is `<writer>-<n>,<size>,<Study>,<MOD>.<SOP>,<caller>,<called>,<ip>` (the fields
of the journal line are comma-free). Where AE titles full of escapes would make it longer than
a file name may be, the last three fields are left out and that object's journal line is
synced before its status instead (on the other file systems, after its study folder).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..journal import FileEvent, JournalWriter
from ..tree import (
    FILE_MODE,
    TEMPORARY_PREFIX,
    InvalidValue,
    Tree,
    ensure_dir,
    fsync_dir,
    metadata_journaled_together,
    write_all,
)

log = logging.getLogger(__name__)

#: how often the journal is synced and the receipts it covers removed
FLUSH_SECONDS = 1.0
#: the longest file name ext4 and XFS take, in bytes
MAX_NAME = 255


@dataclass(frozen=True)
class Receipt:
    """What a receipt's name says: which writer made it, the size of the object, where it is
    archived and (unless left out for length) who sent it."""

    writer: str
    size: int
    study: str
    name: str
    sender: tuple[str, str, str] | None  #: (caller, called, ip) of the journal line

    def file_name(self) -> str:
        head = f"{self.writer},{self.size},{self.study},{self.name}"
        return head + ("," + ",".join(self.sender) if self.sender else "")

    @classmethod
    def parse(cls, file_name: str) -> Receipt:
        parts = file_name.split(",")
        if len(parts) not in (4, 7) or not parts[1].isdigit():
            raise InvalidValue(f"not a receipt name: {file_name[:200]!r}")
        sender = (parts[4], parts[5], parts[6]) if len(parts) == 7 else None
        return cls(parts[0], int(parts[1]), parts[2], parts[3], sender)

    def path(self, tree: Tree) -> Path:
        """The archived file, checked like a journal line's (InvalidValue otherwise)."""
        return FileEvent("", "", "", tree.study_archive(self.study), self.name).path(tree)

    def event(self, tree: Tree) -> FileEvent | None:
        """The journal line's fields (None when the name leaves the sender out)."""
        if self.sender is None:
            return None
        return FileEvent(*self.sender, tree.study_archive(self.study), self.name)


class Receipts:
    """Files objects into the archive with their receipts; syncs the journal in the background.

    One instance per receiver process; `store` is thread-safe."""

    def __init__(self, tree: Tree, journal: JournalWriter):
        self.tree = tree
        self.journal = journal
        self.folder = ensure_dir(tree.receipts)
        self._dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        #: on XFS and journaled ext4 one fsync of the file commits its data and both links
        self.one_commit = metadata_journaled_together(tree.archive, self.folder)
        if not self.one_commit:
            log.info("the archive's file system does not commit new names with a file (not "
                     "XFS, or an ext4 without a journal), so each object's folders are synced "
                     "too; a data disk with XFS or a journaled ext4 takes objects faster")
        # pid and start time: unique even if a later process gets this pid again
        self.writer = f"{os.getpid()}.{time.time_ns() // 1000}"
        self._count = 0
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._unsynced: set[Path] = set()  # study folders with names not synced yet
        self._closed = threading.Event()
        self._spares = _Spares(self.folder, self._closed)
        self._flusher = threading.Thread(target=self._flush_loop, name="receipts-flush",
                                         daemon=True)
        self._flusher.start()

    def store(self, study: str, event: FileEvent, content: list[bytes | bytearray]
              ) -> Callable[[], None] | None:
        """Write the archived file `event` names and its receipt durably. Returns the step
        left, journaling the event, for the caller to run, also after it has told the sender
        "stored" (until then the receipt keeps the object recoverable: `recover`); None when
        the event is journaled already (a name too long for a receipt). Raises
        FileExistsError if the file exists (nothing written), FileNotFoundError if its folder
        does not, OSError (ENOSPC, ...) from writing; the receipt is gone then."""
        with self._lock:
            self._count += 1
            n = self._count
        folder = event.study_dir
        receipt = Receipt(f"{self.writer}-{n}", sum(map(len, content)), study, event.name,
                          (event.caller, event.called, event.ip))
        name = receipt.file_name()
        if len(name.encode()) > MAX_NAME:
            receipt = Receipt(receipt.writer, receipt.size, receipt.study, receipt.name, None)
            name = receipt.file_name()
        fd, temporary = self._spares.take()
        try:
            _write_parts(fd, content, receipt.size)
            if temporary is None:
                # linkat(..., AT_SYMLINK_FOLLOW): CPython uses it only when a dir fd is given
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self._dir_fd,
                        follow_symlinks=True)
            else:
                os.rename(temporary, name, dst_dir_fd=self._dir_fd)
        except BaseException:
            os.close(fd)
            if temporary is not None:
                os.unlink(temporary)
            raise
        try:
            if self.one_commit:
                os.link(name, f"{folder}/{event.name}", src_dir_fd=self._dir_fd)
                os.fsync(fd)
            else:
                os.fsync(fd)
                os.link(name, f"{folder}/{event.name}", src_dir_fd=self._dir_fd)
                os.fsync(self._dir_fd)
                with self._lock:
                    self._unsynced.add(folder)
        except BaseException:
            os.unlink(name, dir_fd=self._dir_fd)
            raise
        finally:
            os.close(fd)
        if receipt.sender is None:
            if not self.one_commit:
                fsync_dir(folder)  # the journal line must not name a file that a crash loses
            self.journal.append(event.line())
            self.journal.sync()
            os.unlink(name, dir_fd=self._dir_fd)
            return None
        return partial(self._journal, name, event.line())

    def _journal(self, receipt: str, line: str) -> None:
        """Journal a stored object; its receipt goes once the flusher has synced the line."""
        self.journal.append(line)
        with self._lock:
            self._pending.append(receipt)

    # --- the flusher ---------------------------------------------------------------------------
    def _flush_loop(self) -> None:
        while not self._closed.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except OSError as exc:  # the receipts stay, and are tried again
                log.error("cannot sync the receiver's journal (%s); the receipts under %s "
                          "keep what it holds until it can", exc, self.folder)

    def flush(self) -> None:
        """Sync the study folders filed into and the journal, then remove the receipts whose
        lines it held. (A receipt is pending only after its object was filed, so its folder
        is among those synced here or in an earlier flush.)"""
        with self._lock:
            done, self._pending = self._pending, []
            folders, self._unsynced = self._unsynced, set()
        if not done and not folders:
            return
        try:
            _sync_folders(folders, self.tree.archive)
            if done:
                self.journal.sync()
        except OSError:
            with self._lock:
                self._pending[:0] = done
                self._unsynced |= folders
            raise
        for name in done:
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._closed.set()
        self._flusher.join()  # it may be in a sync: the descriptors must outlive it
        self.flush()
        self._spares.close()
        os.close(self._dir_fd)

    # --- after a crash -------------------------------------------------------------------------
    def recover(self, writer_pid: int | None = None) -> None:
        """Journal again what the receipts left by a crash name, and remove torn copies.

        `writer_pid`: only that (dead) process's receipts; None: all (at start, before any
        receiver process files anything)."""
        journaled, torn, relinked, stale = 0, 0, 0, []
        folders: set[Path] = set()
        for entry in os.scandir(self.folder):
            if entry.name.startswith(TEMPORARY_PREFIX) and writer_pid is None:
                os.unlink(entry.path)  # a spare never linked (file systems without O_TMPFILE)
                continue
            try:
                receipt = Receipt.parse(entry.name)
                if writer_pid is not None and receipt.writer.split(".")[0] != str(writer_pid):
                    continue
                archived = receipt.path(self.tree)
            except InvalidValue as exc:
                log.error("%s: %s; not a receipt of this receiver: remove it by hand",
                          entry.path, exc)
                continue
            stale.append(entry.name)
            mine = entry.stat(follow_symlinks=False)
            try:
                st = os.stat(archived)
            except FileNotFoundError:
                # never linked, or its name was lost with its folder's unsynced entries: the
                # receipt holds the whole object, so it is filed again (an object never
                # acknowledged costs only the time; its sender sends it again)
                if receipt.sender is None or mine.st_size != receipt.size:
                    continue  # never acknowledged
                try:
                    os.link(entry.path, ensure_dir(archived.parent) / archived.name)
                except FileExistsError:  # a live worker filed the object meanwhile
                    continue
                folders.add(archived.parent)
                relinked += 1
                st = mine
            if not os.path.samestat(st, mine):
                continue  # another object was archived under that name first
            if st.st_size != receipt.size:
                log.warning("removed %s: a torn copy (%d of %d bytes) left by a crash before "
                            "its sender was told it was stored; the sender sends it again",
                            archived, st.st_size, receipt.size)
                os.unlink(archived)
                torn += 1
                continue
            event = receipt.event(self.tree)
            if event is not None:
                self.journal.append(event.line())
                journaled += 1
        if stale:
            _sync_folders(folders, self.tree.archive)
            self.journal.sync()
            for name in stale:
                os.unlink(name, dir_fd=self._dir_fd)
            log.info("receipts left by %s: %d objects journaled again (%d of them filed "
                     "again), %d torn copies removed",
                     f"receiver process {writer_pid}" if writer_pid else "a crash", journaled,
                     relinked, torn)


def _sync_folders(folders: set[Path], archive: Path) -> None:
    """Make the new names in study folders durable, and the folders' own names in the
    archive (a folder removed meanwhile, by cleanup, needs nothing)."""
    for folder in folders:
        try:
            fsync_dir(folder)
        except FileNotFoundError:
            pass
    if folders:
        fsync_dir(archive)


def _write_parts(fd: int, parts: list[bytes | bytearray], size: int) -> None:
    """Write the parts one after the other, in one system call unless it writes less."""
    done = os.writev(fd, parts)
    if done < size:  # a signal or a full disk in between: the rest piece by piece
        write_all(fd, b"".join(parts)[done:])


class _Spares:
    """Unnamed files (O_TMPFILE) made ahead by a helper thread.

    Making an inode waits for the file system's journal commit of the previous object: 0.22 ms
    of the receiver's ~1.6 ms per image when done in line (measured with bench/ingest.py's
    corpus), which this helper moves off the path between the data and the status. Where
    O_TMPFILE is unsupported, a named file is made in line instead and linked like the others."""

    def __init__(self, folder: Path, closed: threading.Event, count: int = 4):
        self.folder = folder
        self._closed = closed
        self._queue: queue.Queue[int] = queue.Queue(count)
        self._helper: threading.Thread | None = None
        probe = self._make()
        if probe is not None:
            self._queue.put(probe)
            self._helper = threading.Thread(target=self._prepare, name="spare-files",
                                            daemon=True)
            self._helper.start()

    def _make(self) -> int | None:
        try:
            return os.open(self.folder, os.O_TMPFILE | os.O_WRONLY, FILE_MODE)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR):
                return None
            raise

    def _prepare(self) -> None:
        while not self._closed.is_set():
            try:
                fd = self._make()
            except OSError as exc:  # `take` makes them in line, and reports what fails
                log.warning("cannot prepare files under %s ahead (%s); making each when "
                            "it is needed", self.folder, exc)
                return
            if fd is None:  # the file system stopped offering O_TMPFILE
                return
            while True:
                try:
                    self._queue.put(fd, timeout=0.5)
                    break
                except queue.Full:
                    if self._closed.is_set():
                        os.close(fd)
                        return

    def take(self) -> tuple[int, str | None]:
        """A file open for writing (the caller closes it): unnamed, or else named with the
        returned temporary path (the caller renames or removes it)."""
        try:
            return self._queue.get_nowait(), None
        except queue.Empty:
            pass
        fd = self._make()
        if fd is not None:
            return fd, None
        fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=TEMPORARY_PREFIX)
        os.fchmod(fd, FILE_MODE)
        return fd, temporary

    def close(self) -> None:
        if self._helper is not None:
            self._helper.join(2)
        while True:
            try:
                os.close(self._queue.get_nowait())
            except queue.Empty:
                break
