"""Attach, once for the web page and `fiona attach`: who may attach what, and one job's run.

Every rule is here: the actor needs the assign role in the project; the project must take the
participant and event now (`fiona.control.assign`); documents need a study the actor may see;
uploads are bounded by `ATTACH.max_upload_mb`. A job is checked completely (kind, archive
entries, DICOM structure, conversion, the request rules for every study it holds) before its
first object is filed, so bad input stores nothing and sends nothing. Every job is audited
when queued and when it ends.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import audit
from ..access import Actor
from ..actions import Actions, Forbidden, Invalid, NotFound
from ..config import Config, Site
from ..control.base import ControlPlaneError
from ..daemon import notify_forwarder
from ..tree import Tree, ensure_dir, valid_uid
from . import archive, documents, ingest, media, wsi
from .jobs import (
    CONVERTING,
    DONE,
    FAILED,
    OPEN,
    QUEUED,
    STORING,
    UPLOADING,
    Job,
    JobStore,
    safe_filename,
)
from .kinds import IMAGE, MEDIA, PDF, WSI, KindError, detect

log = logging.getLogger("fiona.attach")

MB = 1024 * 1024
#: an upload nobody continued for this long is removed
UPLOAD_DAYS = 7


class AttachError(ValueError):
    """The job failed; the text says why (shown on the page, stored in the job)."""


class TooLarge(Invalid):
    """The upload is above the limit, or would fill the disk past the receiver's watermark."""


def max_bytes(config: Config) -> int:
    return int(config.attach["max_upload_mb"] * MB)


class Attacher:
    """Attach jobs of one site, for actors with the assign role."""

    def __init__(self, config: Config, site: Site | None = None, actions: Actions | None = None):
        self.config = config
        self.site = site or config.site()
        self.actions = actions or Actions.open(config, self.site.name or None)
        self.store = JobStore(self.site.datadir)

    def _audit(self, actor: Actor | str, action: str, **details: Any) -> None:
        name = actor if isinstance(actor, str) else actor.name
        audit.append(self.site.datadir, name, action, details)

    # --- checks ------------------------------------------------------------------------------
    def check(self, actor: Actor, project: str, participant: str, event: str,
              study: str = "") -> None:
        """Forbidden, NotFound, Invalid or ControlPlaneError unless `actor` may attach to
        (project, participant, event), and, for documents, to `study`."""
        if project not in {p.name for p in self.actions.control.projects()}:
            raise NotFound(f"no project {project!r}")
        if not actor.can(project, "assign"):
            self._audit(actor, "attach refused", project=project)
            raise Forbidden(f"you have no assign role in project {project}")
        if study:
            valid_uid(study, "StudyInstanceUID")
            self.actions.study(actor, study)
        ingest.check_request(self.actions.control, self.actions.keyed,
                             [study] if study else [], project, participant, event)

    def check_size(self, size: int) -> None:
        """Refuse an empty file, one above ATTACH.max_upload_mb, and one that (twice: the
        upload and what it becomes) would take the disk past DISK.refuse_store_percent, where
        the receiver would refuse its objects half-way."""
        limit = max_bytes(self.config)
        if size <= 0:
            raise Invalid("the file is empty")
        if size > limit:
            raise TooLarge(f"the file has {size / MB:.1f} MB, above the upload limit of "
                           f"{limit / MB:.0f} MB (ATTACH.max_upload_mb)")
        usage = shutil.disk_usage(Tree(self.site.datadir).site)
        if 100.0 * (usage.used + 2 * size) / usage.total >= self.config.refuse_store_percent:
            raise TooLarge(f"the file ({size / MB:.1f} MB) does not fit on the disk below "
                           f"DISK.refuse_store_percent; ask an admin to free space")

    # --- jobs --------------------------------------------------------------------------------
    def create(self, actor: Actor, project: str, participant: str, event: str, name: str,
               size: int, study: str = "", pathology: dict | None = None,
               source: Path | None = None) -> Job:
        """A new job: an upload waiting for its bytes, or (`source`) a local file or folder,
        queued at once."""
        participant = participant.strip()
        self.check(actor, project, participant, event, study)
        self.check_size(size)
        job = self.store.new(user=actor.name, project=project, participant=participant,
                             event=event, name=safe_filename(name), size=size, study=study,
                             pathology=wsi.Pathology.from_dict(pathology or {}).__dict__,
                             source=str(source or ""))
        if source is not None:
            self.queue(job)
        return job

    def queue(self, job: Job) -> None:
        """The upload is complete: the job waits for the worker."""
        job.state = QUEUED
        self.store.save(job)
        self._audit(job.user, "attach queued", job=job.id, project=job.project,
                    participant=job.participant, event=job.event, bytes=job.size,
                    study_uid=job.study)

    @staticmethod
    def mine(actor: Actor, job: Job) -> bool:
        """Whether `actor` may see and continue `job`: its owner while they still have the
        assign role in its project (a role taken away mid-upload closes the job), or an admin."""
        return actor.admin or (job.user == actor.name and actor.can(job.project, "assign"))

    def own(self, actor: Actor, job_id: str) -> Job:
        """The job, if `actor` may see it (`mine`); else NotFound."""
        job = self.store.load(job_id)
        if not self.mine(actor, job):
            raise NotFound(f"no attach job {job_id}")
        return job

    # --- one run -----------------------------------------------------------------------------
    def run(self, job: Job, progress: Callable[[Job], None] | None = None) -> Job:
        """Convert, check and file the job's objects, then couple its studies; the job ends
        DONE or FAILED (with the reason), and the upload and work files are removed."""
        def tick(done: int) -> None:
            job.done = done
            if progress:
                progress(job)
        try:
            job.state = CONVERTING
            self.store.save(job)
            found = self._objects(job)
            job.studies, job.not_dicom = found.studies, found.not_dicom
            job.total = len(found.objects)
            ingest.check_request(self.actions.control, self.actions.keyed, job.studies,
                                 job.project, job.participant, job.event)
            job.state = STORING
            self.store.save(job)
            ingest.file_objects(self.config, self.site, found.objects, tick)
            made = ingest.couple(self.actions.control, self.actions.keyed, job.studies,
                                 job.project, job.participant, job.event)
            job.requests = len(made)
            if made:
                notify_forwarder(self.site)
        except (AttachError, KindError, archive.ArchiveError, media.MediaError,
                wsi.ConversionError, documents.DocumentError, ingest.IngestError,
                ControlPlaneError) as exc:
            # the reason may quote a file name, which can carry a patient's name: it goes to
            # the job file (its owner's page) only; the log and the audit trail name its kind
            log.error("attach job %s of project %s failed (%s); the reason is in its job file",
                      job.id, job.project, type(exc).__name__)
            self.store.finish(job, FAILED, str(exc))
            self._audit(job.user, "attach failed", job=job.id, project=job.project,
                        reason=type(exc).__name__)
            return job
        self.store.finish(job, DONE)
        log.info("attach job %s: %d object(s) of %d study(ies) filed for %s (%s)", job.id,
                 job.done, len(job.studies), job.project, job.kind)
        self._audit(job.user, "attach", job=job.id, kind=job.kind, project=job.project,
                    participant=job.participant, event=job.event, studies=job.studies,
                    objects=job.done, not_dicom=len(job.not_dicom), requests=job.requests)
        return job

    def _objects(self, job: Job) -> media.Found:
        """The job's Part-10 objects, made once: a restarted job reuses `work/dicom`, so a
        conversion is never done twice (it would make new UIDs, hence a second study)."""
        source = self.store.upload_path(job)
        work = self.store.work(job)
        done = work / "dicom"
        if source.is_dir():
            job.kind = MEDIA
            return self._media(media.files_under(source), source)
        job.kind = detect(source, job.name)
        if job.kind == MEDIA and job.name.lower().endswith(".zip"):
            unpacked = work / "unpacked"
            shutil.rmtree(unpacked, ignore_errors=True)
            files = archive.extract(source, ensure_dir(unpacked), max_bytes(self.config))
            if any(p.suffix.lower() == ".mrxs" for p in files):
                job.kind = WSI
                return self._convert(job, wsi.slide_file(files), done)
            return self._media(files, unpacked)
        if job.kind == MEDIA:
            return self._media([source], source.parent)
        return self._convert(job, source, done)

    def _media(self, files: list[Path], root: Path) -> media.Found:
        found = media.find(files, root)
        if not found.objects:
            raise AttachError("no DICOM object found" + (
                f" ({len(found.not_dicom)} file(s) that are not DICOM)" if found.not_dicom
                else ""))
        return found

    def _convert(self, job: Job, source: Path, done: Path) -> media.Found:
        if not done.is_dir():
            partial = ensure_dir(self.store.work(job)) / "dicom.partial"
            shutil.rmtree(partial, ignore_errors=True)
            ensure_dir(partial)
            if job.kind == WSI:
                overview = job.project in self.config.attach["overview_projects"]
                wsi.convert(source, partial, job.participant,
                            wsi.Pathology.from_dict(job.pathology), overview)
            elif job.kind in (PDF, IMAGE):
                if not job.study:
                    raise AttachError(f"a {job.kind} is added to an existing study: choose it")
                documents.make(Tree(self.site.datadir), job.study, source, job.kind, partial)
            partial.rename(done)
        return media.find(media.files_under(done), done)

    def expire(self, now: float | None = None) -> list[Job]:
        """Uploads nobody continued for UPLOAD_DAYS: removed (they may be GB of identified
        data), the job failed with the reason. Returns them."""
        now = time.time() if now is None else now
        gone = []
        for job in self.store.all():
            if job.state != UPLOADING:
                continue
            try:
                idle = now - self.store.upload_path(job).stat().st_mtime
            except FileNotFoundError:
                idle = float("inf")
            if idle > UPLOAD_DAYS * 86400:
                self.store.finish(job, FAILED, f"the upload was not completed within "
                                  f"{UPLOAD_DAYS} days; what had arrived was removed")
                self._audit(job.user, "attach failed", job=job.id, project=job.project,
                            reason="upload abandoned")
                gone.append(job)
        return gone

    def resume_open(self) -> list[Job]:
        """Jobs a dead worker left queued or in progress, oldest first."""
        return [j for j in self.store.all() if j.state in OPEN]
