"""The soak's load: a seeded plan of studies, written ahead by a helper process, sent by eight
concurrent senders (DCMTK storescu and dcmsend, and pynetdicom), with a ledger of every image
a sender got success for.

A sender that gets a failure status, or loses its association because the receiver was killed
or refuses while the disk is "full", tries the images that were not acknowledged again a few
seconds later, as a modality does. Only acknowledged images are owed by the gateway.
"""

from __future__ import annotations

import heapq
import os
import random
import re
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless

from tests.dicomgen import make_study

STORESCU = "/usr/bin/storescu"  # DCMTK's own, not a same-named Python shim earlier on PATH
DCMSEND = "/usr/bin/dcmsend"
ASSOCIATIONS = 8
RETRY_SECONDS = (2.0, 6.0)
SLOW_SECONDS = 20.0  # a send that takes longer is noted in senders.log
ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK waits ~40 ms per image on delayed ACKs without
#: kinds of study and how they get their transfer request
KINDS = ("coupled", "routed", "autoid", "unassigned")
KIND_WEIGHTS = (70, 12, 12, 6)
PROJECT_OF = {"coupled": "PROJ", "routed": "ROUTED", "autoid": "AUTO"}
BIRTH_DATE = "19800101"  # what tests/dicomgen.py writes into every study


@dataclass
class Spec:
    """One planned study: who it belongs to, its size, how it is encoded and sent."""

    index: int
    kind: str
    n_series: int
    per_series: int
    compressed: bool
    late: bool          # its last series is sent after the study has arrived
    late_coupling: bool  # its coupling row is uploaded after the study was sent
    seed: int

    @property
    def patient_id(self) -> str:
        return f"SUBJ{self.index:05d}" if self.kind == "routed" else f"NID{self.seed:08d}"

    @property
    def patient_name(self) -> str:
        return f"Fam{self.seed:07d}^Giv{self.index:05d}"

    @property
    def accession(self) -> str:
        return f"ACC{self.seed:07d}"

    @property
    def participant(self) -> str:
        return f"P{self.index:04d}"

    @property
    def images(self) -> int:
        return self.n_series * self.per_series

    def identifiers(self) -> list[str]:
        """The source values that must not survive de-identification. A routed study's
        PatientID is its pseudonym by design and becomes the participant ID."""
        family, given = self.patient_name.split("^")
        values = [family, given, self.accession, BIRTH_DATE]
        return values if self.kind == "routed" else values + [self.patient_id]


def plan(rng: random.Random, count: int, max_images: int) -> list[Spec]:
    """`count` studies: mostly small, some up to `max_images` images, 1 to 4 series."""
    specs = []
    for i in range(count):
        roll = rng.random()
        top = (min(20, max_images) if roll < 0.5 else
               min(100, max_images) if roll < 0.85 else max_images)
        total = rng.randint(1, top)
        n_series = rng.randint(1, min(4, total))
        specs.append(Spec(
            index=i + 1, kind=rng.choices(KINDS, KIND_WEIGHTS)[0], n_series=n_series,
            per_series=-(-total // n_series), compressed=rng.random() < 0.3,
            late=n_series > 1 and rng.random() < 0.25, late_coupling=rng.random() < 0.15,
            seed=rng.randrange(10**7)))
    return specs


@dataclass
class Written:
    """A study on disk: files per series (in order) and each file's SOPInstanceUID."""

    study: str
    series: list[str]
    files: list[list[Path]]
    sop: dict[Path, str]


def write_study(spec: Spec, root: Path) -> Written:
    """In a helper process: write the study, RLE-compressed if the spec says so."""
    out = root / f"study{spec.index:05d}"
    made = make_study(out, spec.n_series, spec.per_series, patient_id=spec.patient_id,
                      patient_name=spec.patient_name, accession=spec.accession,
                      seed=spec.seed)
    sop, files = {}, [[] for _ in made["series"]]
    for path in made["files"]:
        ds = pydicom.dcmread(path)
        if spec.compressed:
            ds.compress(RLELossless)
            ds.save_as(path, enforce_file_format=True)
        sop[path] = str(ds.SOPInstanceUID)
        files[int(path.name[1:3]) - 1].append(path)
    return Written(made["study"], made["series"], files, sop)


@dataclass
class Job:
    spec: Spec
    written: Written
    files: list[Path]
    attempt: int = 0
    then: Job | None = None   # sent `then_delay` s after this one (a late series)
    then_delay: float = 0.0


@dataclass
class Ledger:
    """What the senders were told: acknowledged SOPInstanceUIDs per study, and figures."""

    acked: dict[str, tuple[str, str]] = field(default_factory=dict)  # sop -> (study, series)
    studies: dict[str, Spec] = field(default_factory=dict)           # study uid -> spec
    written: dict[str, Written] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    by_sender: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, job: Job, paths: list[Path], sender: str) -> None:
        series_of = {p: job.written.series[i] for i, files in enumerate(job.written.files)
                     for p in files}
        with self.lock:
            for p in paths:
                self.acked[job.written.sop[p]] = (job.written.study, series_of[p])
            self.by_sender[sender] = self.by_sender.get(sender, 0) + len(paths)


class Senders:
    """Eight sender threads and a clock of jobs due later (late series, retries)."""

    def __init__(self, port: int, rng: random.Random, ledger: Ledger, retry_until: float,
                 on_failure_log: Path):
        self.port = port
        self.rng = rng
        self.ledger = ledger
        self.retry_until = retry_until
        self.log = on_failure_log
        self._due: list[tuple[float, int, Job]] = []
        self._ready: list[Job] = []
        self._cv = threading.Condition()
        self._busy = 0
        self._seq = 0
        self._stop = False
        self._threads = [threading.Thread(target=self._work, name=f"sender-{i}", daemon=True)
                         for i in range(ASSOCIATIONS)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, job: Job, delay: float = 0.0) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._due, (time.monotonic() + delay, self._seq, job))
            self._cv.notify_all()

    def backlog(self) -> int:
        """Jobs in hand: being sent, waiting for a free sender, or retries waiting for their
        time (late series waiting for theirs do not count: they come on their own)."""
        with self._cv:
            now = time.monotonic()
            return self._busy + sum(1 for due, _, job in self._due
                                    if due <= now or job.attempt > 0)

    def idle(self) -> bool:
        with self._cv:
            return not self._due and self._busy == 0

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=120)

    def note(self, text: str) -> None:
        with self._cv, open(self.log, "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def _next(self) -> Job | None:
        with self._cv:
            while not self._stop:
                now = time.monotonic()
                if self._due and self._due[0][0] <= now:
                    self._busy += 1
                    return heapq.heappop(self._due)[2]
                wait = self._due[0][0] - now if self._due else 0.5
                self._cv.wait(min(wait, 0.5))
            return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._send(job)
            finally:
                with self._cv:
                    self._busy -= 1

    def _send(self, job: Job) -> None:
        with self._cv:
            choices = ["dcmsend", "pynetdicom"] if job.spec.compressed else \
                ["storescu", "dcmsend", "pynetdicom"]
            sender = self.rng.choice(choices)
            retry_delay = self.rng.uniform(*RETRY_SECONDS)
        calling = "TRIALSCU" if job.spec.kind == "routed" else f"SOAK{sender[:4].upper()}"
        called = "FIONAAUTO" if job.spec.kind == "autoid" else "FIONA"
        started = time.monotonic()
        try:
            acked = SEND[sender](self.port, calling, called, job.files)
        except Exception as exc:  # noqa: BLE001 - a sender's crash is a failed attempt
            self.note(f"{sender} attempt for study {job.spec.index} failed: {exc!r}")
            acked = []
        took = time.monotonic() - started
        if took > SLOW_SECONDS:
            self.note(f"{sender} took {took:.0f} s for {len(job.files)} images of study "
                      f"{job.spec.index} ({len(acked)} acknowledged)")
        self.ledger.ack(job, acked, sender)
        rest = [p for p in job.files if p not in set(acked)]
        with self.ledger.lock:
            self.ledger.sent_at[job.written.study] = time.monotonic()
        if job.then is not None:
            self.submit(job.then, job.then_delay)
        if rest:
            with self.ledger.lock:
                self.ledger.failures += 1
            if time.monotonic() + retry_delay < self.retry_until:
                self.submit(Job(job.spec, job.written, rest, job.attempt + 1), retry_delay)


def _run_dcmtk(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900,
                          check=False)


def send_storescu(port: int, calling: str, called: str, files: list[Path]) -> list[Path]:
    """storescu -v names each file, then its response: the acknowledged ones are those."""
    res = _run_dcmtk([STORESCU, "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                      *map(str, files)])
    acked, current = [], None
    for line in res.stdout.splitlines() + res.stderr.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line[len("I: Sending file: "):])
        elif line.startswith("I: Received Store Response (Success)") and current:
            acked.append(current)
            current = None
    return acked


REPORT_ENTRY = re.compile(r"^Filename\s+: (.+?)$.*?^DIMSE Status\s+: 0x(\w+)", re.M | re.S)


def send_dcmsend(port: int, calling: str, called: str, files: list[Path]) -> list[Path]:
    """dcmsend's report file lists each file with its DIMSE status (0x0000 is success)."""
    fd, report = tempfile.mkstemp(prefix="dcmsend-", suffix=".txt")
    os.close(fd)
    try:
        _run_dcmtk([DCMSEND, "-nh", "-dn", "+crf", report, "-aet", calling, "-aec", called,
                    "127.0.0.1", str(port), *map(str, files)])
        text = Path(report).read_text(errors="replace")
    finally:
        os.unlink(report)
    return [Path(name) for name, status in REPORT_ENTRY.findall(text) if int(status, 16) == 0]


def send_pynetdicom(port: int, calling: str, called: str, files: list[Path]) -> list[Path]:
    """pynetdicom as a third, independent sender, with TCP_NODELAY set on its socket."""
    from pynetdicom import AE

    ae = AE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for syntax in (ExplicitVRLittleEndian, RLELossless):
        ae.add_requested_context(MRImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return []
    acked = []
    try:
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for path in files:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(pydicom.dcmread(path))
            if status and int(getattr(status, "Status", -1)) == 0:
                acked.append(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return acked


SEND = {"storescu": send_storescu, "dcmsend": send_dcmsend, "pynetdicom": send_pynetdicom}


class Writer:
    """Writes planned studies ahead in one helper process, in plan order."""

    def __init__(self, specs: list[Spec], root: Path, ahead: int = 3):
        self._specs = iter(specs)
        self._root = root
        self._pool = ProcessPoolExecutor(max_workers=1)
        self._queue: list[tuple[Spec, Future]] = []
        for _ in range(ahead):
            self._submit()

    def _submit(self) -> None:
        spec = next(self._specs, None)
        if spec is not None:
            self._queue.append((spec, self._pool.submit(write_study, spec, self._root)))

    def next(self) -> tuple[Spec, Written] | None:
        if not self._queue:
            return None
        spec, future = self._queue.pop(0)
        self._submit()
        return spec, future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
