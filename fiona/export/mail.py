"""The "export ready" mail to the requester (optional: the `SMTP` config key).

It says what is ready, where to download it and until when; never the password (the requester
chose it) and no identifier (project, type and participant pseudonyms only). A mail server
that cannot be reached never fails the job: the caller logs the reason and moves on.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

from ..mail import MailError, deliver, message, site_url
from .jobs import Job

__all__ = ["MailError", "link", "ready_message", "send_ready"]


def link(job: Job, exports: dict[str, Any], web: dict[str, Any]) -> str:
    """Where the requester finds the export: EXPORTS.url, else the web server's address."""
    return f"{site_url(exports, web)}/exports/{job.id}"


def ready_message(job: Job, sender: str, url: str) -> EmailMessage:
    lines = [f"Your {job.type} export of project {job.project} (job {job.id}) is ready:",
             "", url, ""]
    if job.expires:
        lines.append(f"It will be removed after {job.expires}.")
    if job.problems:
        lines += ["", "Not included:", *(f"- {p}" for p in job.problems)]
    lines += ["", "If you set a password for it, open the zip with that password; it is not "
              "sent by mail."]
    return message({"from": sender}, job.email or "",
                   f"FIONA: your {job.type} export of project {job.project} is ready",
                   "\n".join(lines) + "\n")


def send_ready(job: Job, smtp: dict[str, Any], url: str) -> None:
    """Mail the requester of `job` that it is ready; MailError when the server fails."""
    if not job.email:
        raise MailError(f"export job {job.id} has no e-mail address")
    deliver(smtp, ready_message(job, smtp["from"], url))
