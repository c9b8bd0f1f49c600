"""How pages reach the actions (`fiona.actions`) and answer when one was not taken."""

from __future__ import annotations

from fastapi import HTTPException

from ..actions import Actions, Forbidden, Invalid, NotFound
from ..control.base import ControlPlaneError, Unavailable
from .context import Ctx
from .users import User


def actions(c: Ctx) -> Actions:
    return Actions(c.site, c.control, c.keyed)


def http_error(user: User, exc: Exception) -> HTTPException:
    """The HTTP answer for an action that was not taken. Refusals of the rules are written for
    people and shown as they are; an unreachable control plane's technical detail (addresses,
    exception text) only to admins. Anything else is a bug and raised again."""
    if isinstance(exc, Forbidden):
        return HTTPException(403, str(exc))
    if isinstance(exc, NotFound):
        return HTTPException(404, str(exc))
    if isinstance(exc, Unavailable):
        return HTTPException(503, str(exc) if user.admin else
                             "the control plane cannot be reached now; try again later")
    if isinstance(exc, (Invalid, ControlPlaneError)):
        return HTTPException(400, str(exc))
    raise exc
