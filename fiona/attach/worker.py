"""The web application's attach worker: one thread that runs queued jobs one at a time (a
conversion of a slide can take minutes and much memory; two at once would only compete).
Jobs are files (`fiona.attach.jobs`), so when the web application starts again the worker
takes up every job that was queued or in progress; filing is idempotent and a conversion is
never repeated once its output is complete."""

from __future__ import annotations

import logging
import queue
import threading

from .jobs import FAILED, OPEN, Job
from .service import Attacher

log = logging.getLogger("fiona.attach")

#: how often the idle worker removes abandoned uploads (`Attacher.expire`)
EXPIRE_SECONDS = 3600.0


class Worker:
    def __init__(self, attacher: Attacher):
        self.attacher = attacher
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="attach-worker", daemon=True)
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._expire()
        for job in self.attacher.resume_open():
            self._queue.put(job.id)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.start()
        self._queue.put(job.id)

    def stop(self) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                job_id = self._queue.get(timeout=EXPIRE_SECONDS)
            except queue.Empty:
                self._expire()
                continue
            if job_id is None:
                return
            try:
                job = self.attacher.store.load(job_id)
                if job.state in OPEN:
                    self.attacher.run(job, self.attacher.store.save)
            except Exception:  # one job's bug must not stop the others
                log.exception("attach job %s: unexpected error", job_id)
                self._fail(job_id)

    def _expire(self) -> None:
        try:
            self.attacher.expire()
        except Exception:  # the next round tries again
            log.exception("attach: removing abandoned uploads failed")

    def _fail(self, job_id: str) -> None:
        try:
            job = self.attacher.store.load(job_id)
            self.attacher.store.finish(job, FAILED, "an internal error stopped the job; an "
                                       "admin finds the details in the web log")
        except Exception:
            log.exception("attach job %s: cannot be marked failed", job_id)
