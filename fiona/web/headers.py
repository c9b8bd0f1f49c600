"""Security headers on every response.

The Content-Security-Policy allows scripts and styles only from this server's own files (no
inline script, so an injected `<script>` does not run; no CDN), no framing (clickjacking), and
forms posting only here. Pages and API answers carry identified data, so none of them may be
kept by a browser or proxy cache (`no-store`); the package's static files may.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATIC_PREFIX = "/static/"


def add_security_headers(headers: MutableHeaders, path: str) -> None:
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    if not path.startswith(STATIC_PREFIX):
        headers["Cache-Control"] = "no-store"
