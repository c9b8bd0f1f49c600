"""Attach: the page and the JSON endpoints of resumable uploads (`fiona.attach`).

An upload is a job created with the file's name and size (`POST /api/attach/uploads`), then
its bytes in chunks (`PUT /api/attach/uploads/{id}?offset=N`, the raw bytes as the body,
streamed to disk, never held whole in memory). A chunk must start where the upload stands;
otherwise the answer is 409 with the offset, from which the page resumes after a dropped
connection. The last chunk queues the job for the worker thread; the page polls
`GET /api/attach/uploads/{id}` for its progress. The rules are `fiona.attach.service`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..actions import ActionError
from ..attach.jobs import UPLOADING, Job, JobError, JobStore, UploadError
from ..attach.service import MB, Attacher, TooLarge, max_bytes
from ..attach.worker import Worker
from ..control.base import ControlPlaneError
from ..tree import InvalidValue
from . import csrf
from .context import Ctx, ctx, current_user, render
from .outcomes import actions, http_error
from .users import User

router = APIRouter()

PATHOLOGY = ("specimen", "block", "slide", "stain", "biopsy")


def _worker(app: FastAPI) -> Worker:
    """The application's attach worker, started (taking up open jobs) on first use."""
    state = app.state
    if getattr(state, "attach_worker", None) is None:
        c: Ctx = state.ctx
        state.attach_worker = Worker(Attacher(c.config, c.site, actions(c)))
        state.attach_worker.start()
    return state.attach_worker


def worker(request: Request) -> Worker:
    return _worker(request.app)


def install(app: FastAPI) -> None:
    """Add the pages, and start the worker when the server starts, so that jobs a stopped
    server left open go on without waiting for someone to open the page. (Stopping leaves the
    job in hand: its state file says where it stood, and the next start takes it up.)"""
    app.include_router(router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        _worker(app)
        async with inner(a) as value:
            yield value
    app.router.lifespan_context = lifespan


def _error(user: User, exc: Exception) -> HTTPException:
    if isinstance(exc, (JobError, InvalidValue)):
        return HTTPException(404 if isinstance(exc, JobError) else 400, str(exc))
    return http_error(user, exc)


@router.get("/attach", include_in_schema=False)
def attach_page(request: Request, user: User = Depends(current_user), c: Ctx = Depends(ctx),
                w: Worker = Depends(worker)):
    projects = [{"name": p.name, "events": p.events} for p in c.control.projects()
                if user.can(p.name, "assign")]
    jobs = [j for j in w.attacher.store.all() if w.attacher.mine(user, j)]
    return render(request, "attach.html", projects=projects, pathology=PATHOLOGY,
                  limit_mb=int(max_bytes(c.config) / MB),
                  jobs=[j.public(w.attacher.store.received(j)) | {"created": j.created,
                                                                  "project": j.project}
                        for j in reversed(jobs)])


@router.post("/api/attach/uploads", tags=["attach"], status_code=201,
             dependencies=[Depends(csrf.require_csrf)])
def create_upload(body: dict = Body(...), user: User = Depends(current_user),
                  w: Worker = Depends(worker)) -> dict:
    """Start an upload: `{project, participant, event, name, size, study?, pathology?}`. 403
    without the assign role in the project, 413 above ATTACH.max_upload_mb."""
    try:
        size = int(body.get("size", 0))
        job = w.attacher.create(
            user, str(body.get("project", "")), str(body.get("participant", "")),
            str(body.get("event", "")), str(body.get("name", "")), size,
            str(body.get("study", "") or "").strip(), body.get("pathology") or {})
    except TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except (ActionError, ControlPlaneError, InvalidValue) as exc:
        raise _error(user, exc) from None
    except (TypeError, ValueError) as exc:
        raise HTTPException(400, f"bad upload request: {exc}") from None
    return job.public(0)


@router.get("/api/attach/uploads/{job_id}", tags=["attach"])
def upload_state(job_id: str, user: User = Depends(current_user),
                 w: Worker = Depends(worker)) -> dict:
    """The job: bytes received (the offset to resume from), state, progress, reason."""
    try:
        job = w.attacher.own(user, job_id)
    except (JobError, ActionError) as exc:
        raise _error(user, exc) from None
    return job.public(w.attacher.store.received(job))


@router.put("/api/attach/uploads/{job_id}", tags=["attach"],
            dependencies=[Depends(csrf.require_csrf)])
async def upload_chunk(request: Request, job_id: str, offset: int,
                       user: User = Depends(current_user), w: Worker = Depends(worker)):
    """Append the body at `offset`; 409 `{offset}` when the upload stands elsewhere."""
    try:
        job = w.attacher.own(user, job_id)
    except (JobError, ActionError) as exc:
        raise _error(user, exc) from None
    store = w.attacher.store
    try:
        # chunks come from the socket as they arrive; the store writes each at once
        received = await _append(store, job, offset, request)
    except UploadError as exc:
        return JSONResponse({"detail": str(exc), "offset": exc.offset}, exc.status)
    except ClientDisconnect:
        return JSONResponse({"detail": "connection lost", "offset": store.received(job)}, 400)
    if received == job.size and job.state == UPLOADING:
        w.attacher.queue(job)
        w.submit(job)
    return job.public(received)


async def _append(store: JobStore, job: Job, offset: int, request: Request) -> int:
    """Stream the request body into the job's upload, each received piece written at once."""
    writer = store.appender(job, offset)
    try:
        async for piece in request.stream():
            if piece:
                writer.write(piece)
    finally:
        await run_in_threadpool(writer.close)
    return writer.pos
