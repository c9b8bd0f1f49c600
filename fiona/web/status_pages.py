"""Status: daemons (running, last activity, last error), queues, disk, `enabled` switches.

Daemon log lines and server paths are for admins only: other users see each daemon's state and
when it last logged an error, the queue counts and the disk state, never the text."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse

from .. import status as facts
from ..actions import ActionError
from ..config import ENABLED_PARTS
from . import csrf
from .context import Ctx, ctx, current_user, render
from .outcomes import actions, http_error
from .users import User

router = APIRouter()


def status(c: Ctx, admin: bool, node: str = "") -> dict:
    """This site's facts, gathered by `fiona.status` (the same as `fiona status` prints);
    `node` keeps only that node's line of the region's nodes."""
    out = facts.gather(c.config, c.site, c.control, admin)
    out["node_names"] = [n["node"] for n in out["nodes"]]
    if node:
        out["nodes"] = [n for n in out["nodes"] if n["node"] == node]
    return out


def set_switch(c: Ctx, user: User, part: str, on: bool) -> None:
    try:
        actions(c).set_switch(user, part, on)
    except ActionError as exc:
        raise http_error(user, exc) from None


@router.get("/status", include_in_schema=False)
def status_page(request: Request, done: str = "", node: str = "",
                user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    return render(request, "status.html", s=status(c, user.admin, node), node=node,
                  message="The switch was set." if done == "switch" else "")


@router.get("/status/switch", include_in_schema=False)
def status_switch_confirm(request: Request, part: str = "", value: str = "0",
                          user: User = Depends(current_user)):
    """The confirmation page for browsers without JavaScript (static/fiona.js asks in a
    dialog and posts directly)."""
    if not user.admin:
        raise HTTPException(403, "only admins can change the switches")
    if part not in ENABLED_PARTS:
        raise HTTPException(404, "there is no such switch")
    on = value in ("1", "on", "true")
    return render(request, "confirm_action.html", title=f"Turn {part} {'on' if on else 'off'}",
                  question=f"Turn {part} {'on' if on else 'off'}?", action="/status/switch",
                  fields={"part": part, "value": "1" if on else "0"},
                  label=f"Turn {'on' if on else 'off'}", back="/status")


@router.post("/status/switch", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
def status_switch(part: str = Form(...), value: str = Form(...),
                  user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    set_switch(c, user, part, value in ("1", "on", "true"))
    return RedirectResponse("/status?done=switch", status_code=303)


@router.get("/api/status", tags=["status"])
def api_status(node: str = "", user: User = Depends(current_user),
               c: Ctx = Depends(ctx)) -> dict:
    """Daemons, queue lengths, disk use and switches (log text and paths for admins only), and
    the region's nodes with their queues and split studies (`node`: only that one)."""
    return status(c, user.admin, node)


@router.post("/api/status/switch", tags=["status"], dependencies=[Depends(csrf.require_csrf)])
def api_switch(part: str = Body(...), enabled: bool = Body(...),
               user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Flip an `enabled` switch (admins only)."""
    set_switch(c, user, part, enabled)
    return {"switches": facts.switches(c.datadir)}
