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

from .. import audit
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, read_secret
from ..control import open_control_plane
from ..control.keyed import Keyed
from . import csrf
from .login import Login
from .proxies import TrustedProxies
from .sessions import SessionStore, sessions_path
from .throttle import LoginThrottle
from .users import User, UserStore

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class Ctx:
    """What routes share: config, site, control plane, users, keys, sessions, throttling."""

    def __init__(self, config: Config, site_name: str | None, auth: str,
                 clock: Clock = SYSTEM_CLOCK):
        self.config = config
        self.site = config.site(site_name)
        self.datadir = self.site.datadir
        self.control = open_control_plane(config, self.site)
        self.users = UserStore(self.datadir)
        self.login = Login(self.users, {**config.web, "auth": auth})
        self.key = read_secret(self.datadir / "config" / "secret.key")
        self.keyed = Keyed.from_datadir(self.datadir)
        self.auth = auth
        self.proxies = TrustedProxies(config.web.get("trusted_proxies", []))
        self.sessions = SessionStore(
            sessions_path(self.datadir), clock,
            idle=60 * float(config.web.get("session_idle_minutes", 30)),
            lifetime=3600 * float(config.web.get("session_hours", 12)))
        self.throttle = LoginThrottle(clock)

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


def peer_address(request: Request) -> str:
    return request.client.host if request.client else ""


def client_address(request: Request) -> str:
    """The client's address for audit entries and throttling (see `proxies.TrustedProxies`)."""
    return ctx(request).proxies.client_address(peer_address(request),
                                               request.headers.get("x-forwarded-for", ""))
