"""Durable export jobs: one JSON file per job under `DATADIR/site/exports/jobs/<id>.json`,
written atomically, so a job outlives the worker (a kill -9 loses nothing: the worker picks up
queued jobs and those it was working on when it starts).

A job's password (for an AES zip) is never stored in clear: it is sealed with AES-256-GCM under
a key derived from the site's `secret.key` (HMAC-SHA256 of a fixed label), bound to the job id,
and erased from the job file as soon as the zip exists.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..clock import SYSTEM_CLOCK, Clock
from ..mail import valid_address
from ..tree import Tree, atomic_write, ensure_dir, load_record

QUEUED, RETRIEVING, CONVERTING, PACKING, READY, FAILED, EXPIRED = (
    "queued", "retrieving", "converting", "packing", "ready", "failed", "expired")
#: states the worker resumes on start (it died while in one of them)
IN_PROGRESS = (RETRIEVING, CONVERTING, PACKING)
OPEN = (QUEUED, *IN_PROGRESS)
FINISHED = (READY, FAILED, EXPIRED)

_ID = re.compile(r"^[0-9a-f]{12}$")
_SEAL_LABEL = b"fiona-export-password-v1"


class JobError(ValueError):
    """A job id or job file that is not valid; the text says which."""


@dataclass
class Job:
    """One export job as the page and the worker see it. Times are ISO 8601 UTC strings."""

    id: str
    project: str
    type: str
    requester: str
    created: str
    participant: str | None = None
    event: str | None = None
    study: str | None = None
    profile: str = "default"
    noassign: bool = False
    email: str | None = None          #: where "export ready" goes (optional)
    state: str = QUEUED
    reason: str = ""                  #: why it failed
    waiting: str = ""                 #: why a queued job waits (research PACS down), and until when
    done: int = 0                     #: images (or files) done of `total` in the current phase
    total: int = 0
    started: str | None = None
    finished: str | None = None
    expires: str | None = None        #: when `fiona clear-exports` removes the zip
    zip: str | None = None            #: file name of the zip under the exports folder
    problems: list[str] = field(default_factory=list)
    sealed_password: str | None = field(default=None, repr=False)
    mailed: bool = False

    def filter(self) -> dict[str, str | None]:
        return {"participant": self.participant, "event": self.event, "study": self.study}


def job_path(tree: Tree, job_id: str) -> Path:
    if not _ID.fullmatch(job_id or ""):
        raise JobError(f"not an export job id: {job_id!r}")
    return tree.export_jobs / f"{job_id}.json"


class JobStore:
    """The job files of one site."""

    def __init__(self, datadir: Path, clock: Clock = SYSTEM_CLOCK):
        self.tree = Tree(Path(datadir))
        self.clock = clock

    def now(self) -> datetime:
        return self.clock.now()

    def stamp(self, delta: timedelta = timedelta()) -> str:
        return (self.now() + delta).isoformat(timespec="seconds")

    def new(self, password: bytes | None = None, secret: bytes = b"", **details) -> Job:
        """A queued job with a fresh id, saved; JobError for an e-mail address that is not one
        (it becomes a mail header). A `password` is sealed with `secret` before the first
        write: the worker polls the folder, and must never find the job without it."""
        email = details.get("email")
        if email is not None and not valid_address(email):
            raise JobError(f"not an e-mail address: {email!r}")
        job = Job(id=uuid.uuid4().hex[:12], created=self.stamp(), **details)
        if password:
            job.sealed_password = seal(secret, job.id, password)
        self.save(job)
        return job

    def save(self, job: Job) -> None:
        ensure_dir(self.tree.export_jobs)
        atomic_write(job_path(self.tree, job.id), json.dumps(asdict(job), indent=1).encode())

    def load(self, job_id: str) -> Job:
        return load_record(Job, job_path(self.tree, job_id), f"export job {job_id}", JobError)

    def remove(self, job: Job) -> None:
        job_path(self.tree, job.id).unlink(missing_ok=True)

    def all(self) -> list[Job]:
        """Every readable job, oldest first (an unreadable file is skipped, not fatal)."""
        out: list[Job] = []
        folder = self.tree.export_jobs
        if not folder.is_dir():
            return out
        for path in folder.glob("*.json"):
            try:
                out.append(self.load(path.stem))
            except JobError:
                continue
        return sorted(out, key=lambda j: (j.created, j.id))


def _seal_key(secret: bytes) -> bytes:
    return hmac.new(secret, _SEAL_LABEL, hashlib.sha256).digest()


def seal(secret: bytes, job_id: str, password: bytes) -> str:
    """`password` encrypted for job `job_id` (AES-256-GCM, the id as associated data)."""
    nonce = os.urandom(12)
    sealed = AESGCM(_seal_key(secret)).encrypt(nonce, password, job_id.encode())
    return base64.b64encode(nonce + sealed).decode()


def unseal(secret: bytes, job_id: str, sealed: str) -> bytes:
    """The password `seal` sealed; JobError when the secret or the job does not match."""
    from cryptography.exceptions import InvalidTag

    raw = base64.b64decode(sealed)
    try:
        return AESGCM(_seal_key(secret)).decrypt(raw[:12], raw[12:], job_id.encode())
    except InvalidTag:
        raise JobError(f"the password of export job {job_id} cannot be unsealed (was "
                       f"secret.key replaced?)") from None
