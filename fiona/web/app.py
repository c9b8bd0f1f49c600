"""The FastAPI application: sessions, login, error pages, and the page and API routers.

`create_app(config, site=None)` builds it (tests use Starlette's TestClient on it); `fiona web`
serves it with uvicorn (`fiona.web.server`). Every page and endpoint needs a login: pages
redirect to /login, /api/, /docs and /openapi.json answer 401.

Sessions live on the server (`sessions.SessionStore`); the `fiona_session` cookie holds only the
session's random id. Before login, the one value a visitor has (the CSRF token of the login
form) travels in the signed `fiona_pre` cookie, so anonymous requests create no server state.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from http import HTTPStatus
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config
from . import csrf
from .context import TEMPLATES, Ctx, client_address, current_user, peer_address, render
from .headers import STATIC_PREFIX, add_security_headers
from .login import DirectoryDown
from .sessions import Session
from .users import User, UserError

SESSION_COOKIE = "fiona_session"
PRE_COOKIE = "fiona_pre"
PRE_MAX_AGE = 12 * 3600
PUBLIC = ("/login",)
MACHINE_PATHS = ("/docs", "/openapi.json")
MAX_NAME = 128
POLL_HEADER = "X-Fiona-Poll"
STATIC = Path(__file__).parent / "static"
#: Swagger UI 5 (OpenAPI 3.1, which FastAPI writes) as shipped by the fastapi-offline package;
#: `swagger-ui-bundle` carries Swagger UI 4, which shows FastAPI's schema as a blank error page
SWAGGER = Path(str(files("fastapi_offline") / "static"))
ERROR_TITLES = {400: "Bad request", 401: "Session ended", 403: "Not allowed", 404: "Not found",
                405: "Not allowed", 422: "Bad request", 429: "Too many attempts",
                500: "Server error"}
log = logging.getLogger("fiona.web")

PLAIN_ERRORS = {404: "There is no such page here.",
                405: "This page cannot be used that way; go back and use its buttons."}


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not the JSON API): errors then come as pages."""
    path = request.url.path
    return "text/html" in request.headers.get("accept", "") and not (
        path.startswith("/api/") or path == "/openapi.json")


def safe_next(value: str) -> str:
    """`value` when it is a path on this server to return to after login, else "/"; never
    another origin (`//host`, `https://host`, `/\\host`)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or \
            any(ord(ch) < 0x20 or ord(ch) == 0x7f for ch in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.path in ("/login", "/logout"):
        return "/"
    return value


def _resolve_user(request: Request, c: Ctx, session: Session | None) -> User | None:
    if c.auth == "remote-user":
        if not c.proxies.trusted(peer_address(request)):
            return None
        name = request.headers.get("REMOTE_USER", "")
        return c.users.get(name) if name else None
    return c.login.session_user(session.user, session.values) if session else None


def create_app(config: Config, site: str | None = None, secure_cookies: bool = False,
               clock: Clock = SYSTEM_CLOCK) -> FastAPI:
    auth = config.web.get("auth", "local")
    secure = secure_cookies or bool(config.web.get("secure_cookies", False))
    app = FastAPI(title="FIONA", description="FIONA research DICOM gateway: Assign, Review, "
                  "Status. Every endpoint needs a login; POSTs need the X-CSRF-Token header "
                  "(GET /api/session returns it).", docs_url=None, redoc_url=None)
    c = Ctx(config, site, auth, clock)
    app.state.ctx = c
    pre_signer = URLSafeTimedSerializer(
        hmac.new(c.key, b"fiona-web-pre-login-cookie", hashlib.sha256).hexdigest(),
        salt="fiona-pre")

    def read_pre(request: Request) -> dict:
        try:
            values = pre_signer.loads(request.cookies.get(PRE_COOKIE, ""), max_age=PRE_MAX_AGE)
        except BadSignature:
            return {}
        return values if isinstance(values, dict) else {}

    def guard(request: Request, expired: bool) -> Response | None:
        """The answer for a request that may not go on (no login, one-time password)."""
        path = request.url.path
        user = request.state.user
        if user is None and path not in PUBLIC and not path.startswith(STATIC_PREFIX):
            if path.startswith("/api/") or path in MACHINE_PATHS:
                return JSONResponse({"detail": "login required"}, status_code=401)
            if request.method != "GET":
                if wants_html(request):
                    return render(request, "error.html", 401, title=ERROR_TITLES[401],
                                  detail="Your session has ended. Log in again.")
                return JSONResponse({"detail": "login required"}, status_code=401)
            if expired:
                here = path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?expired=1&next={quote(safe_next(here))}", 303)
            return RedirectResponse("/login", status_code=303)
        if user is not None and user.one_time and c.login.password_form and \
                path not in ("/password", "/logout", "/login") and \
                not path.startswith(STATIC_PREFIX):
            if path.startswith("/api/"):
                return JSONResponse({"detail": "change the one-time password first"}, 403)
            return RedirectResponse("/password", status_code=303)
        return None

    def write_cookies(request: Request, response: Response, old: Session | None, expired: bool,
                      values: dict, before: dict) -> None:
        new: Session | None = request.state.session
        if new is not old:  # logged in, out, or password changed
            if new is not None:
                response.set_cookie(SESSION_COOKIE, new.id, httponly=True, samesite="strict",
                                    secure=secure, path="/")
                response.delete_cookie(PRE_COOKIE, path="/")
            else:
                response.delete_cookie(SESSION_COOKIE, path="/")
        elif old is not None:
            if values != before:
                c.sessions.save(old)
        else:
            if expired:
                response.delete_cookie(SESSION_COOKIE, path="/")
            if values != before:
                response.set_cookie(PRE_COOKIE, pre_signer.dumps(values), max_age=PRE_MAX_AGE,
                                    httponly=True, samesite="strict", secure=secure, path="/")

    @app.middleware("http")
    async def sessions_login_headers(request: Request, call_next):
        sid = request.cookies.get(SESSION_COOKIE, "")
        poll = request.headers.get(POLL_HEADER) == "1"  # static/fiona.js refreshing a status
        session = c.sessions.get(sid, touch=not poll) if sid else None
        expired = bool(sid) and session is None
        values = session.values if session else read_pre(request)
        before = dict(values)
        request.scope["session"] = values
        request.state.session = session
        request.state.user = _resolve_user(request, c, session)
        response = guard(request, expired) or await call_next(request)
        write_cookies(request, response, session, expired, values, before)
        add_security_headers(response.headers, request.url.path)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if wants_html(request):
            detail = str(exc.detail)
            if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's own, e.g. "Not Found"
                detail = PLAIN_ERRORS.get(exc.status_code, detail)
            return render(request, "error.html", exc.status_code,
                          title=ERROR_TITLES.get(exc.status_code, "Error"), detail=detail)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        """A page asked with fields missing or of the wrong kind (an edited link, an old
        form): a page that names the fields, never the values typed (they may identify)."""
        if not wants_html(request):
            return await request_validation_exception_handler(request, exc)
        names = sorted({str(e["loc"][-1]) for e in exc.errors() if e.get("loc")})
        return render(request, "error.html", 422, title=ERROR_TITLES[422],
                      detail="These fields are missing or not valid: " + ", ".join(names)
                      + ". Go back, check them and try again.")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        """A bug: the user gets a page (or JSON) with a reference to quote, the log gets the
        reference and the error's kind; no stack trace and no message text, which may carry
        values from the request."""
        ref = secrets.token_hex(4)
        log.error("unhandled %s in %s %s (reference %s): report it with this line",
                  type(exc).__name__, request.method, request.url.path, ref)
        detail = f"Something went wrong on the server (reference {ref}); nothing was changed " \
                 "by this page if it stopped here. Tell your FIONA admin the reference."
        response: Response
        if wants_html(request):
            response = render(request, "error.html", 500, title=ERROR_TITLES[500],
                              detail=detail)
        else:
            response = JSONResponse({"detail": detail}, status_code=500)
        add_security_headers(response.headers, request.url.path)
        return response

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/", expired: str = ""):
        if c.auth == "remote-user":
            return render(request, "message.html", 403, title="Login",
                          message="This server trusts the REMOTE_USER header of its proxy; "
                          "your user name is not in users.json.")
        return render(request, "login.html", next=safe_next(next), expired=bool(expired))

    @app.post("/login", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
    def login(request: Request, username: str = Form(""), password: str = Form(""),
              next: str = Form("/")):
        name, address, back = username[:MAX_NAME], client_address(request), safe_next(next)
        if not c.login.password_form:
            return render(request, "message.html", 403, title="Login",
                          message="Log in through the hospital's login page.")
        wait = c.throttle.wait(name, address)
        if wait > 0:
            seconds = math.ceil(wait)
            c.audit(name, "login refused", address=address, reason="too many failed logins",
                    retry_after=seconds)
            response = render(request, "login.html", 429, username=name, next=back,
                              error=f"Too many failed logins; try again in {seconds} seconds.")
            response.headers["Retry-After"] = str(seconds)
            return response
        try:
            user, values = c.login.check(name, password)
        except DirectoryDown:
            c.audit(name, "login failed", address=address, reason="directory unreachable")
            return render(request, "login.html", 503, username=name, next=back,
                          error="The hospital directory cannot be reached. Try again later; "
                          "if it persists, tell the FIONA admin.")
        if user is None:
            locked = c.throttle.failed(name, address)
            c.audit(name, "login failed", address=address,
                    **({"locked_seconds": math.ceil(locked)} if locked else {}))
            return render(request, "login.html", 401, error="Wrong user name or password.",
                          username=name, next=back)
        c.throttle.succeeded(name)
        request.state.session = c.sessions.create(user.name, {**csrf.fresh(), **values})
        c.audit(user.name, "login", address=address,
                **({"source": "ldap", "roles": user.roles} if values else {}))
        return RedirectResponse("/password" if user.one_time else back, status_code=303)

    @app.post("/logout", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
    def logout(request: Request, user: User = Depends(current_user)):
        if request.state.session is not None:
            c.sessions.end(request.state.session.id)
            request.state.session = None
        c.audit(user.name, "logout", address=client_address(request))
        return RedirectResponse("/login", status_code=303)

    @app.get("/password", response_class=HTMLResponse, include_in_schema=False)
    def password_page(request: Request, user: User = Depends(current_user)):
        return render(request, "password.html")

    @app.post("/password", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
    def password_change(request: Request, current: str = Form(""), password: str = Form(""),
                        password2: str = Form(""), user: User = Depends(current_user)):
        if not c.login.is_local(user.name):
            return render(request, "password.html", 403,
                          error="Passwords are managed by the hospital's login, not here.")
        address = client_address(request)
        wait = c.throttle.wait(user.name, address)
        if wait > 0:
            return render(request, "password.html", 429, error="Too many wrong passwords; try "
                          f"again in {math.ceil(wait)} seconds.")
        if c.users.check(user.name, current) is None:
            c.throttle.failed(user.name, address)
            c.audit(user.name, "password change refused", address=address,
                    reason="wrong current password")
            return render(request, "password.html", 400, error="The current password is wrong.")
        if password != password2:
            return render(request, "password.html", 400, error="The new passwords differ.")
        try:
            c.users.set_password(user.name, password)
        except UserError as exc:
            return render(request, "password.html", 400, error=str(exc))
        ended = c.sessions.end_user(user.name)
        request.state.session = c.sessions.create(user.name, csrf.fresh())
        c.audit(user.name, "password changed", address=address, sessions_ended=ended)
        return RedirectResponse("/", status_code=303)

    @app.get("/", include_in_schema=False)
    def home(request: Request, user: User = Depends(current_user)):
        if user.has_right("assign"):
            return RedirectResponse("/assign", status_code=303)
        if not user.roles:  # e.g. a directory user before any role: apply for one
            return RedirectResponse("/apply", status_code=303)
        return RedirectResponse("/status", status_code=303)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(request: Request, user: User = Depends(current_user)):
        """Swagger UI from the fastapi-offline package: no CDN, no inline script."""
        return TEMPLATES.TemplateResponse(request, "docs.html", {"request": request})

    @app.get("/api/session", tags=["session"])
    def api_session(request: Request, user: User = Depends(current_user)) -> dict:
        """The logged-in user, roles and the CSRF token for JSON POSTs."""
        return {"user": user.name, "roles": user.roles, "csrf_token": csrf.token(request)}

    from . import admin_pages, assign_pages, export_pages, review_pages, status_pages
    app.include_router(admin_pages.router)
    app.include_router(assign_pages.router)
    app.include_router(export_pages.router)
    app.include_router(review_pages.router)
    app.include_router(status_pages.router)
    from . import attach_pages
    attach_pages.install(app)
    from . import apply_pages
    app.include_router(apply_pages.router)
    app.mount("/static/swagger", StaticFiles(directory=SWAGGER), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
