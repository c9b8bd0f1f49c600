"""The FastAPI application: sessions, login, and the page and API routers.

`create_app(config, site=None)` builds it (tests use Starlette's TestClient on it); `fiona web`
serves it with uvicorn (`fiona.web.server`). Every page and endpoint needs a login: pages
redirect to /login, /api/ and /docs answer 401.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.middleware.sessions import SessionMiddleware

from ..config import Config
from . import csrf
from .context import Ctx, current_user, render
from .users import User, UserError

PUBLIC = ("/login",)


def _resolve_user(request: Request, c: Ctx) -> User | None:
    if c.auth == "remote-user":
        name = request.headers.get("REMOTE_USER", "")
        return c.users.get(name) if name else None
    name = request.session.get("user")
    return c.users.get(name) if name else None


def create_app(config: Config, site: str | None = None, secure_cookies: bool = False) -> FastAPI:
    auth = config.web.get("auth", "local")
    app = FastAPI(title="FIONA", description="FIONA research DICOM gateway: Assign, Review, "
                  "Status. Every endpoint needs a login; POSTs need the X-CSRF-Token header "
                  "(GET /api/session returns it).")
    c = Ctx(config, site, auth)
    app.state.ctx = c

    @app.middleware("http")
    async def require_login(request: Request, call_next):
        request.state.user = _resolve_user(request, c)
        path = request.url.path
        if request.state.user is None and path not in PUBLIC:
            if path.startswith("/api/") or path in ("/docs", "/openapi.json", "/redoc") or \
                    request.method != "GET":
                return JSONResponse({"detail": "login required"}, status_code=401)
            return RedirectResponse("/login", status_code=303)
        user = request.state.user
        if user is not None and user.one_time and path not in ("/password", "/logout",
                                                               "/login") and c.auth == "local":
            if path.startswith("/api/"):
                return JSONResponse({"detail": "change the one-time password first"}, 403)
            return RedirectResponse("/password", status_code=303)
        return await call_next(request)

    secret = hmac.new(c.key, b"fiona-web-session-cookie", hashlib.sha256).hexdigest()
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="fiona_session",
                       same_site="strict", https_only=secure_cookies, max_age=12 * 3600)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request):
        if c.auth == "remote-user":
            return render(request, "message.html", 403, title="Login",
                          message="This server trusts the REMOTE_USER header of its proxy; "
                          "your user name is not in users.json.")
        return render(request, "login.html")

    @app.post("/login", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
    def login(request: Request, username: str = Form(""), password: str = Form("")):
        user = c.users.check(username, password) if c.auth == "local" else None
        if user is None:
            c.audit(username, "login failed", address=request.client.host if request.client
                    else "")
            return render(request, "login.html", 401, error="Wrong user name or password.",
                          username=username)
        request.session.clear()
        request.session["user"] = user.name
        csrf.token(request)
        c.audit(user.name, "login", address=request.client.host if request.client else "")
        return RedirectResponse("/password" if user.one_time else "/", status_code=303)

    @app.post("/logout", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
    def logout(request: Request):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/password", response_class=HTMLResponse, include_in_schema=False)
    def password_page(request: Request, user: User = Depends(current_user)):
        return render(request, "password.html")

    @app.post("/password", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
    def password_change(request: Request, password: str = Form(""), password2: str = Form(""),
                        user: User = Depends(current_user)):
        if password != password2:
            return render(request, "password.html", 400, error="The passwords differ.")
        try:
            c.users.set_password(user.name, password)
        except UserError as exc:
            return render(request, "password.html", 400, error=str(exc))
        c.audit(user.name, "password changed")
        return RedirectResponse("/", status_code=303)

    @app.get("/", include_in_schema=False)
    def home(request: Request, user: User = Depends(current_user)):
        if user.has_right("assign"):
            return RedirectResponse("/assign", status_code=303)
        return RedirectResponse("/status", status_code=303)

    @app.get("/api/session", tags=["session"])
    def api_session(request: Request, user: User = Depends(current_user)) -> dict:
        """The logged-in user, roles and the CSRF token for JSON POSTs."""
        return {"user": user.name, "roles": user.roles, "csrf_token": csrf.token(request)}

    from . import assign_pages, review_pages, status_pages
    app.include_router(assign_pages.router)
    app.include_router(review_pages.router)
    app.include_router(status_pages.router)
    return app

