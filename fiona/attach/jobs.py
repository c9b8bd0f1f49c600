"""Durable attach jobs: one folder per job under `DATADIR/site/attach/<id>/`, inside the data
tree (never /tmp: an upload may be identified data of several GB):

    job.json    the state, written atomically (the page and the CLI read it)
    upload      the uploaded bytes, appended chunk by chunk (its size is the resume offset)
    work/       unpacked or converted files; `work/dicom` appears (renamed) only when complete

An upload is resumable: each chunk names the offset it starts at, which must be the size of
`upload` on disk, so a client that lost its connection asks for the offset and sends the rest.
Chunks are streamed to disk and fsynced before they are acknowledged; a chunk that would pass
the declared size is cut back, so the file never holds more than what was announced.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..tree import Tree, atomic_write, ensure_dir, load_record

UPLOADING, QUEUED, CONVERTING, STORING, DONE, FAILED = (
    "uploading", "queued", "converting", "storing", "done", "failed")
#: states a restarted worker takes up again (it died while in one of them)
OPEN = (QUEUED, CONVERTING, STORING)
_ID = re.compile(r"^[0-9a-f]{16}$")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._ -]")


class JobError(ValueError):
    """No such job, or a job file that cannot be read."""


class UploadError(ValueError):
    """A chunk is refused; `offset` is where the upload stands, `status` the HTTP status."""

    def __init__(self, message: str, offset: int, status: int = 409):
        super().__init__(message)
        self.offset = offset
        self.status = status


@dataclass
class Job:
    id: str
    user: str
    project: str
    participant: str
    event: str
    name: str                       #: the file's name, made safe (its extension matters)
    size: int                       #: bytes announced (uploads) or found (local files)
    created: str
    study: str = ""                 #: documents: the existing study the series joins
    pathology: dict[str, str] = field(default_factory=dict)
    source: str = ""                #: the CLI's local file or folder ("" for an upload)
    kind: str = ""
    state: str = UPLOADING
    reason: str = ""
    done: int = 0                   #: objects filed of `total`
    total: int = 0
    studies: list[str] = field(default_factory=list)
    not_dicom: list[str] = field(default_factory=list)
    requests: int = 0
    finished: str = ""

    def public(self, received: int) -> dict:
        """What the page shows (the owner's own job)."""
        return {"id": self.id, "name": self.name, "size": self.size, "received": received,
                "state": self.state, "reason": self.reason, "kind": self.kind,
                "done": self.done, "total": self.total, "studies": len(self.studies),
                "not_dicom": self.not_dicom[:20], "requests": self.requests}


def safe_filename(name: str) -> str:
    """The last part of a client's file name, without characters that mean anything to a
    file system or a header (its extension is kept: it says what the file should be)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return (_NAME_BAD.sub("_", base).strip(" .") or "upload")[-120:]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobStore:
    """The attach jobs of one site."""

    def __init__(self, datadir: Path):
        self.root = Tree(Path(datadir)).site / "attach"

    def folder(self, job_id: str) -> Path:
        if not _ID.fullmatch(job_id or ""):
            raise JobError(f"not an attach job id: {job_id!r}")
        return self.root / job_id

    def upload_path(self, job: Job) -> Path:
        return Path(job.source) if job.source else self.folder(job.id) / "upload"

    def work(self, job: Job) -> Path:
        return self.folder(job.id) / "work"

    def new(self, **details) -> Job:
        job = Job(id=uuid.uuid4().hex[:16], created=_now(), **details)
        ensure_dir(self.folder(job.id))
        if not job.source:
            fd = os.open(self.upload_path(job), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.close(fd)
        self.save(job)
        return job

    def save(self, job: Job) -> None:
        atomic_write(self.folder(job.id) / "job.json", json.dumps(asdict(job)).encode())

    def load(self, job_id: str) -> Job:
        return load_record(Job, self.folder(job_id) / "job.json", f"attach job {job_id}",
                           JobError)

    def all(self) -> list[Job]:
        out = []
        if self.root.is_dir():
            for entry in sorted(self.root.iterdir()):
                try:
                    out.append(self.load(entry.name))
                except JobError:
                    continue
        return sorted(out, key=lambda j: (j.created, j.id))

    def received(self, job: Job) -> int:
        """Bytes of the upload on disk: the offset the next chunk must start at."""
        if job.source:
            return job.size
        try:
            return self.upload_path(job).stat().st_size
        except FileNotFoundError:
            return 0

    def appender(self, job: Job, offset: int) -> Appender:
        """A writer for a chunk that starts at `offset`. UploadError when the offset is not
        where the upload stands (the client resumes from `.offset`)."""
        if job.state != UPLOADING:
            raise UploadError(f"the upload of {job.name} is {job.state}", self.received(job))
        have = self.received(job)
        if offset != have:
            raise UploadError(f"the upload stands at byte {have}, not {offset}; resume there",
                              have)
        return Appender(self.upload_path(job), offset, job.size, job.name)

    def append(self, job: Job, offset: int, chunks: Iterable[bytes]) -> int:
        """Write a whole chunk (as `appender`); returns the new offset."""
        writer = self.appender(job, offset)
        try:
            for chunk in chunks:
                writer.write(chunk)
        finally:
            writer.close()
        return writer.pos

    def clean(self, job: Job) -> None:
        """Remove the upload and the work folder (the archive holds what was filed)."""
        shutil.rmtree(self.work(job), ignore_errors=True)
        if not job.source:
            self.upload_path(job).unlink(missing_ok=True)

    def finish(self, job: Job, state: str, reason: str = "") -> None:
        job.state, job.reason, job.finished = state, reason, _now()
        self.clean(job)
        self.save(job)


class Appender:
    """Writes one chunk's pieces as they arrive; `close` makes them durable. A piece that
    would pass the announced size cuts the upload back to where the chunk began (UploadError
    413), so nothing beyond what was announced is ever kept."""

    def __init__(self, path: Path, offset: int, size: int, name: str):
        self.start = self.pos = offset
        self.size = size
        self.name = name
        self.fd = os.open(path, os.O_WRONLY)
        try:  # one writer at a time: a retry may arrive while the dropped request still ends
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            have = os.fstat(self.fd).st_size
            os.close(self.fd)
            raise UploadError(f"another chunk of {name} is being written; ask for the offset "
                              f"again", have) from None
        if os.fstat(self.fd).st_size != offset:
            have = os.fstat(self.fd).st_size
            os.close(self.fd)
            raise UploadError(f"the upload stands at byte {have}, not {offset}; resume there",
                              have)
        os.lseek(self.fd, offset, os.SEEK_SET)

    def write(self, piece: bytes) -> None:
        if self.pos + len(piece) > self.size:
            os.ftruncate(self.fd, self.start)
            raise UploadError(f"{self.name} is larger than the {self.size} bytes announced; "
                              f"the chunk was refused", self.start, 413)
        view = memoryview(piece)
        while view:
            view = view[os.write(self.fd, view):]
        self.pos += len(piece)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
