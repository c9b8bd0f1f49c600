"""De-identification of a study's files in a pool of processes, in order, as a stream.

The forwarder de-identifies while it sends: `DeidPool.outputs` yields each file's outcome in
the order of the input while the pool's workers are already on the next files, so the sender
(parallel associations) takes de-identified files as soon as they exist and the cores run the
engine and the network at once. Every worker runs the one pipeline (`fiona.deid.pipeline`:
drop rules, masking, engine, the verification gate on the exact bytes) through `deidentify`,
which is also what the single-process path (`workers=1`, no pool) runs, so both write the same
bytes.

A file the gate or the masking stops ends the stream there: `outputs` yields a `Stopped` for
it and nothing after it, and the files that workers finished ahead of it are never yielded (the
sender never sees them). A worker that dies breaks the pool; it is started afresh for the next
request.

Workers are started by a fork server (a clean process that imported this module once, so no
lock held by one of the daemon's threads is inherited and a worker starts in milliseconds).
Each worker exits within WATCH_SECONDS once the process that started the pool is gone, also
after a SIGKILL (the fork server would not notice: every worker holds its "parent alive" pipe),
so no worker outlives the forwarder.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from ..deid.engine import Settings
from ..deid.gate import GateError
from ..deid.pipeline import MaskingFailed, Pipeline, ProjectRules, read
from ..tree import atomic_write

#: files per task: large enough that sending a task costs little next to de-identifying it,
#: small enough that the first file leaves early and the workers finish together
CHUNK = 8
#: tasks in flight per worker: keeps every worker busy while bounding what is held in memory
AHEAD = 3
#: how often a worker looks whether the process that started the pool is still there
WATCH_SECONDS = 0.5


@dataclass(frozen=True)
class Job:
    """One request's de-identification: its settings and rules, and the folder outputs go to.
    `token` names it, so a worker builds the request's `Pipeline` once, not once per file."""

    settings: Settings
    rules: ProjectRules
    work: Path
    token: str = ""

    @classmethod
    def of(cls, settings: Settings, rules: ProjectRules, work: Path) -> Job:
        return cls(settings, rules, work, uuid.uuid4().hex)


@dataclass(frozen=True)
class Done:
    """One file through the pipeline: written to `path` (with its output series), or dropped."""

    source: Path
    path: Path | None = None
    series_uid: str = ""
    masked: bool = False
    dropped: str = ""


@dataclass(frozen=True)
class Stopped:
    """The gate (`gate`: the element and the kind of identifier, never the value) or the
    masking (`masking`: why it failed) stopped the request at `source`."""

    source: Path
    gate: tuple[str, str] | None = None
    masking: str = ""

    def error(self) -> GateError | MaskingFailed:
        """The exception the single-process pipeline raised for this file."""
        return GateError(*self.gate) if self.gate else MaskingFailed(self.masking)


Outcome = Done | Stopped


def deidentify(pipeline: Pipeline, source: Path, work: Path) -> Outcome:
    """One file through `pipeline`, its output written to `work/<SOPInstanceUID>.dcm`."""
    try:
        result = pipeline.process(read(source))
    except GateError as exc:  # its own arguments, so it crosses the process boundary
        return Stopped(source, gate=(exc.path, exc.value))
    except MaskingFailed as exc:
        return Stopped(source, masking=str(exc))
    if result.dropped:
        return Done(source, dropped=result.dropped)
    path = work / f"{result.sop_uid}.dcm"
    atomic_write(path, result.encoded, durable=False)
    return Done(source, path, result.series_uid, result.masked)


_pipeline: tuple[str, Pipeline] | None = None


def _chunk(job: Job, sources: list[Path]) -> list[Outcome]:
    """In a worker: de-identify `sources` in order, up to the first that is stopped."""
    global _pipeline
    if _pipeline is None or not job.token or _pipeline[0] != job.token:
        _pipeline = (job.token, Pipeline(job.settings, job.rules))
    done: list[Outcome] = []
    for source in sources:
        done.append(deidentify(_pipeline[1], source, job.work))
        if isinstance(done[-1], Stopped):
            break
    return done


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot), None if it is gone or a zombie:
    with the pid, it names the process, even if the pid is used again."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _watch(parent: int) -> None:
    """Worker initializer: exit once `parent` (the forwarder) is gone."""
    born = _started(parent)

    def watch() -> None:
        while born is not None and _started(parent) == born:
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _ready() -> int:
    return os.getpid()


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class DeidPool:
    """De-identifies with `workers` processes (default: one per core); `workers=1` runs in this
    process, without a pool."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or cores())
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> DeidPool:
        """Start the workers now (they import the engine once), not at the first request."""
        if self.workers > 1 and self._executor is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context,
                                                 initializer=_watch, initargs=(os.getpid(),))
            for future in [self._executor.submit(_ready) for _ in range(self.workers)]:
                future.result()
        return self

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> DeidPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def outputs(self, job: Job, sources: list[Path]) -> Generator[Outcome, None, None]:
        """Each of `sources` de-identified, in order, up to and including the first that is
        stopped. Closing the iterator early cancels what is queued and waits for what is
        running, so nothing is written into `job.work` after it returns. A study of one
        chunk or less is done in this process (there is nothing to share out), and so is
        everything with `workers=1`, one file at a time (the sender takes each as it is done,
        and a caller that stops early waits for one file at the most)."""
        if self.workers == 1 or len(sources) <= CHUNK:
            for source in sources:
                [outcome] = _chunk(job, [source])
                yield outcome
                if isinstance(outcome, Stopped):
                    return
            return
        executor = self.start()._executor
        assert executor is not None
        chunks = iter([sources[i:i + CHUNK] for i in range(0, len(sources), CHUNK)])
        queued: deque[Future] = deque()
        try:
            while True:
                while len(queued) < AHEAD * self.workers:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    queued.append(executor.submit(_chunk, job, chunk))
                if not queued:
                    return
                for outcome in queued.popleft().result():
                    yield outcome
                    if isinstance(outcome, Stopped):
                        return
        except BrokenProcessPool:
            self.close()  # a worker died: the pool is started afresh for the next request
            raise
        finally:
            for future in queued:
                future.cancel()
            wait(queued)

