"""CSRF protection: one random token per session, required on every POST as the form field
`csrf_token` or the `X-CSRF-Token` header (JSON)."""

from __future__ import annotations

import hmac
import secrets

from fastapi import HTTPException, Request

FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
KEY = "csrf"


def fresh() -> dict[str, str]:
    """Session values with a new token, for a session just created (login)."""
    return {KEY: secrets.token_urlsafe(32)}


def token(request: Request) -> str:
    tok = request.session.get(KEY)
    if not tok:
        tok = request.session[KEY] = secrets.token_urlsafe(32)
    return tok


async def require_csrf(request: Request) -> None:
    expected = request.session.get(KEY, "")
    given = request.headers.get(HEADER, "")
    if not given and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        given = str(form.get(FIELD, ""))
    if not expected or not given or not hmac.compare_digest(expected, given):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")
