"""What every page module shares: the request context (`Ctx`), the logged-in user and template
rendering.

Kept apart from `app.py` so the page routers import this module and `app.py` imports the
routers, without an import cycle between them.
"""

from __future__ import annotations

import re
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
_ISO = re.compile(r"^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d)")
_DICOM_DATE = re.compile(r"^(\d{4})(\d\d)(\d\d)$")
_DICOM_TIME = re.compile(r"^(\d\d)(\d\d)")


def when(value: Any, time: Any = "") -> str:
    """One way to show a moment on every page: `2025-06-14 05:30`. Takes the control plane's
    ISO timestamps (`2025-06-14 05:30:12`, `...T05:30:12+02:00`) and DICOM dates and times
    (`20250614`, `053012.5`); anything else is shown as it is."""
    text = str(value or "").strip()
    if m := _ISO.match(text):
        return f"{m.group(1)} {m.group(2)}"
    if m := _DICOM_DATE.match(text):
        text = f"{m.group(1)}-{m.group(2)}-{m.group(3)}"
        if t := _DICOM_TIME.match(str(time or "").strip()):
            text += f" {t.group(1)}:{t.group(2)}"
    return text


TEMPLATES.env.filters["when"] = when


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
        self.throttle = LoginThrottle(sessions_path(self.datadir), self.keyed, clock)

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
