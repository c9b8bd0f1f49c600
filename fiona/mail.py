"""Sending one e-mail through the `SMTP` config key: the one place that talks to the mail
server, for the "export ready" mail (`fiona.export.mail`) and the notification digests
(`fiona.notify`).

TLS is verified (STARTTLS with the system's CA store; no login without it), the password
comes from a 0600 file (`SMTP.password_file`, read per message so a changed password needs no
restart), and every failure is a `MailError` whose text names the server and never a secret.
Callers decide what a failure means: the export worker logs it, `fiona notify` keeps the
digest for its next run.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from email.message import EmailMessage
from typing import Any

from .config import ConfigError, read_secret

TIMEOUT = 30.0
#: an address a mail may go to (it becomes a header: no spaces, commas or angle brackets)
ADDRESS = re.compile(r"^[^@\s<>,;\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")


def valid_address(text: str | None) -> bool:
    return bool(text) and ADDRESS.fullmatch(text or "") is not None


class MailError(Exception):
    """The mail could not be sent; the text says why (no secret in it)."""


class MailServerDown(MailError):
    """The mail server could not be reached or timed out (rather than refusing this message):
    other messages would fail the same way now."""


def site_url(exports: dict[str, Any], web: dict[str, Any]) -> str:
    """The web application's address for links in mails: EXPORTS.url, else WEB's host:port."""
    return exports.get("url") or \
        f"http://{web.get('host', '127.0.0.1')}:{web.get('port', 8080)}"


def message(smtp: dict[str, Any], to: str, subject: str, body: str) -> EmailMessage:
    """A plain-text message from `SMTP.from` to `to`."""
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = smtp["from"]
    msg["To"] = to
    msg.set_content(body)
    return msg


def deliver(smtp: dict[str, Any], msg: EmailMessage, timeout: float = TIMEOUT) -> None:
    """Hand `msg` to the mail server of `smtp` (the checked `SMTP` config); MailError when it
    cannot be reached or refuses. A login without STARTTLS is refused before connecting:
    smtplib would send the password in clear to any server that offers AUTH."""
    if smtp.get("user") and not smtp["starttls"]:
        raise MailError("SMTP.user is set but SMTP.starttls is false: the password would "
                        "cross the network in clear; turn starttls on")
    try:
        with smtplib.SMTP(smtp["host"], smtp["port"], timeout=timeout) as server:
            if smtp["starttls"]:
                server.starttls(context=ssl.create_default_context())
            if smtp.get("user"):
                password = read_secret(smtp["password_file"]).decode()
                server.login(smtp["user"], password)
            server.send_message(msg)
    except ConfigError as exc:
        raise MailError(f"SMTP.password_file: {'; '.join(exc.errors)}") from None
    except OSError as exc:
        raise MailServerDown(f"mail server {smtp['host']}:{smtp['port']}: "
                             f"{type(exc).__name__}: {exc}") from None
    except smtplib.SMTPException as exc:
        raise MailError(f"mail server {smtp['host']}:{smtp['port']}: "
                        f"{type(exc).__name__}: {exc}") from None
