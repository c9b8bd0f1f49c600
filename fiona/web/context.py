"""What every page module shares: the request context (`Ctx`), the logged-in user and template
rendering.

Kept apart from `app.py` so the page routers import this module and `app.py` imports the
routers, without an import cycle between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from ..config import Config, read_secret
from ..control import open_control_plane
from ..control.keyed import Keyed
from .. import audit
from . import csrf
from .users import User, UserStore

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class Ctx:
    """What routes share: config, site, control plane, users, keys."""

    def __init__(self, config: Config, site_name: str | None, auth: str):
        self.config = config
        self.site = config.site(site_name)
        self.datadir = self.site.datadir
        self.control = open_control_plane(config, self.site)
        self.users = UserStore(self.datadir)
        self.key = read_secret(self.datadir / "config" / "secret.key")
        self.keyed = Keyed.from_datadir(self.datadir)
        self.auth = auth

    def audit(self, user: str, action: str, **details: Any) -> None:
        audit.append(self.datadir, user, action, details)


def ctx(request: Request) -> Ctx:
    return request.app.state.ctx


def current_user(request: Request) -> User:
    user = request.state.user
    if user is None:
        raise HTTPException(401, "login required")
    return user


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    values.update(request=request, user=getattr(request.state, "user", None),
                  csrf_token=csrf.token(request))
    return TEMPLATES.TemplateResponse(request, template, values, status_code=status_code)
