"""The "export ready" mail to the requester (optional: the `SMTP` config key).

It says what is ready, where to download it and until when; never the password (the requester
chose it) and no identifier (project, type and participant pseudonyms only). A mail server
that cannot be reached never fails the job: the caller logs the reason and moves on.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Any

from ..config import read_secret
from .jobs import Job

TIMEOUT = 30.0


class MailError(Exception):
    """The mail could not be sent; the text says why (no secret in it)."""


def link(job: Job, exports: dict[str, Any], web: dict[str, Any]) -> str:
    """Where the requester finds the export: EXPORTS.url, else the web server's address."""
    base = exports.get("url") or f"http://{web.get('host', '127.0.0.1')}:{web.get('port', 8080)}"
    return f"{base}/exports/{job.id}"


def ready_message(job: Job, sender: str, url: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = f"FIONA: your {job.type} export of project {job.project} is ready"
    msg["From"] = sender
    msg["To"] = job.email or ""
    lines = [f"Your {job.type} export of project {job.project} (job {job.id}) is ready:",
             "", url, ""]
    if job.expires:
        lines.append(f"It will be removed after {job.expires}.")
    if job.problems:
        lines += ["", "Not included:", *(f"- {p}" for p in job.problems)]
    lines += ["", "If you set a password for it, open the zip with that password; it is not "
              "sent by mail."]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def send_ready(job: Job, smtp: dict[str, Any], url: str) -> None:
    """Mail the requester of `job` that it is ready; MailError when the server fails."""
    if not job.email:
        raise MailError(f"export job {job.id} has no e-mail address")
    msg = ready_message(job, smtp["from"], url)
    try:
        with smtplib.SMTP(smtp["host"], smtp["port"], timeout=TIMEOUT) as server:
            if smtp["starttls"]:
                server.starttls(context=ssl.create_default_context())
            if smtp.get("user"):
                password = read_secret(smtp["password_file"]).decode()
                server.login(smtp["user"], password)
            server.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(f"mail server {smtp['host']}:{smtp['port']}: "
                        f"{type(exc).__name__}: {exc}") from None
