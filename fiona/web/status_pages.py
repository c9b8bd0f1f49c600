"""Status: daemons (running, last activity, last error), queues, disk, `enabled` switches.

Daemon log lines and server paths are for admins only: other users see each daemon's state and
when it last logged an error, the queue counts and the disk state, never the text."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from fastapi import APIRouter, Body, Depends, Form, Request
from fastapi.responses import RedirectResponse

from ..actions import ActionError
from ..config import ENABLED_PARTS
from ..daemon import FILE_NAMES
from ..tree import Tree
from . import csrf
from .context import Ctx, ctx, current_user, render
from .outcomes import actions, http_error
from .users import User

router = APIRouter()
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def _daemon_names() -> list[tuple[str, bool]]:
    from ..up import DAEMONS
    names = list(DAEMONS)
    if not any(n == "web" for n, _ in names):
        names.append(("web", False))
    return names


def _running(pidfile: Path) -> tuple[bool, str]:
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return False, ""
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, pid
        return False, pid
    finally:
        os.close(fd)


def _tail(path: Path, size: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def daemons(c: Ctx, admin: bool) -> list[dict]:
    tree = Tree(c.datadir)
    out = []
    for name, per_site in _daemon_names():
        suffix = c.site.suffix if per_site else ""
        files = FILE_NAMES.get(name, name)
        running, pid = _running(tree.run / f"{files}{suffix}.pid")
        lines = _tail(tree.logs / f"{files}{suffix}.log")
        last = next((m.group(1) for line in reversed(lines) if (m := _STAMP.match(line))), "")
        error = next((line for line in reversed(lines) if " ERROR " in line), "")
        stamp = _STAMP.match(error)
        row = {"name": name, "running": running, "pid": pid if running else "",
               "last_activity": last, "last_error_at": stamp.group(1) if stamp else ""}
        if admin:
            row["last_error"] = error[:500]
        out.append(row)
    return out


def switches(c: Ctx) -> list[dict]:
    try:
        text = (c.datadir / "config" / "enabled").read_text().strip()
    except FileNotFoundError:
        text = ""
    return [{"part": part, "enabled": not (len(text) > i and text[i] == "0")}
            for part, i in sorted(ENABLED_PARTS.items(), key=lambda kv: kv[1])]


def status(c: Ctx, admin: bool) -> dict:
    reqs = c.control.requests()
    requested = {r.study_uid for r in reqs}
    waiting = sum(1 for s in c.control.studies() if s.uid not in requested)
    usage = shutil.disk_usage(c.datadir)
    percent = round(100 * usage.used / usage.total, 1) if usage.total else 0.0
    disk = {"used_percent": percent, "free_gb": round(usage.free / 1e9, 1),
            "cleanup_percent": c.config.cleanup_percent,
            "refuse_store_percent": c.config.refuse_store_percent,
            "state": ("refusing" if percent >= c.config.refuse_store_percent else
                      "cleanup" if percent >= c.config.cleanup_percent else "ok")}
    if admin:
        disk["path"] = str(c.datadir)
    return {"daemons": daemons(c, admin),
            "queues": {"studies_waiting": waiting,
                       "requests_pending": sum(1 for r in reqs if r.pending and not r.error_flags),
                       "requests_failed": sum(1 for r in reqs if r.error_flags)},
            "disk": disk,
            "switches": switches(c)}


def set_switch(c: Ctx, user: User, part: str, on: bool) -> None:
    try:
        actions(c).set_switch(user, part, on)
    except ActionError as exc:
        raise http_error(user, exc) from None


@router.get("/status", include_in_schema=False)
def status_page(request: Request, done: str = "", user: User = Depends(current_user),
                c: Ctx = Depends(ctx)):
    return render(request, "status.html", s=status(c, user.admin),
                  message="The switch was set." if done == "switch" else "")


@router.post("/status/switch", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
def status_switch(part: str = Form(...), value: str = Form(...),
                  user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    set_switch(c, user, part, value in ("1", "on", "true"))
    return RedirectResponse("/status?done=switch", status_code=303)


@router.get("/api/status", tags=["status"])
def api_status(user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Daemons, queue lengths, disk use and switches (log text and paths for admins only)."""
    return status(c, user.admin)


@router.post("/api/status/switch", tags=["status"], dependencies=[Depends(csrf.require_csrf)])
def api_switch(part: str = Body(...), enabled: bool = Body(...),
               user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Flip an `enabled` switch (admins only)."""
    set_switch(c, user, part, enabled)
    return {"switches": switches(c)}
