"""`fiona notify`: the periodic job (cron/fiona, fiona-notify.timer) that turns durable state
into e-mail digests. It never runs inside a pipeline daemon, so a slow or dead mail server
delays notices and nothing else.

One run: (1) gather the events (`fiona.notify.events`), keep those whose keys are new, queue a
notice for every user who subscribed to them and may see their project, and mark them seen, in
one transaction; (2) mail each user with unsent notices one digest of those they may still
see (roles change while notices wait), unless their last digest went less than their interval
ago. A notice leaves the queue only once the mail server has
accepted its digest; a server that is down leaves it for the next run. Duplicates rather than
losses: a run killed after the server accepted a digest but before it was marked sent mails
that digest again on the next run (there is no way to mark and send in one step). The first
run on a site only records what exists (no mail about the past). Runs are serialised by a lock
file.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site
from ..control import open_control_plane
from ..control.base import ControlPlane, ControlPlaneError
from ..daemon import setup_logging
from ..mail import MailError, MailServerDown, deliver, message, site_url
from ..tree import Tree, ensure_dir
from ..web.users import User, UserStore
from . import events as found
from .store import (
    ADMIN_KINDS,
    DIRECT,
    PROJECT_KINDS,
    Event,
    Notice,
    NotifyStore,
    Prefs,
    may_hear,
)

COMMAND = "notify"
LOG_NAME = "notify"
BASELINE = "baseline"
TITLES = {**{k: k for k in PROJECT_KINDS}, **{k: k for k in ADMIN_KINDS}, DIRECT: "application"}

log = logging.getLogger("fiona.notify")


@dataclass
class Report:
    queued: int = 0
    sent: int = 0                      # digests
    failed: list[str] = field(default_factory=list)


def recipients(event: Event, subs: set[tuple[str, str]], user: User) -> bool:
    """Whether this subscriber gets `event`: they chose it (a failed transfer also reaches
    who chose "failing", for the whole site) and `may_hear` it now."""
    chosen = [(event.project, event.kind)] + ([("", "failing")] if event.kind == "failed" else [])
    return any(c in subs and may_hear(user, *c) for c in chosen)


def digest(base_url: str, notices: list[Notice]) -> tuple[str, str]:
    """Subject and body: counts per project and kind, then one line per notice."""
    by_project: dict[str, list[Notice]] = defaultdict(list)
    for n in notices:
        by_project[n.project].append(n)
    lines = [f"{len(notices)} new notice{'s' if len(notices) != 1 else ''} from FIONA:", ""]
    for project in sorted(by_project):
        items = by_project[project]
        counts: dict[str, int] = defaultdict(int)
        for n in items:
            counts[TITLES.get(n.kind, n.kind)] += 1
        summary = ", ".join(f"{c} {k}" for k, c in sorted(counts.items()))
        lines.append(f"Project {project} ({summary})" if project else f"Site ({summary})")
        lines += [f"  - {n.text}" for n in items]
        lines.append("")
    lines += [f"FIONA: {base_url}/", f"Choose what you hear about: {base_url}/notifications"]
    subject = f"FIONA: {len(notices)} notice{'s' if len(notices) != 1 else ''}"
    return subject, "\n".join(lines) + "\n"


class Notifier:
    def __init__(self, config: Config, site: Site, control: ControlPlane,
                 clock: Clock = SYSTEM_CLOCK, usage: Callable[[Path], Any] = shutil.disk_usage):
        self.config, self.site, self.control = config, site, control
        self.store = NotifyStore(site.datadir)
        self.users = UserStore(site.datadir)
        self.clock = clock
        self.usage = usage

    def _now(self) -> datetime:
        return self.clock.now()

    def _user(self, prefs: Prefs) -> User | None:
        """The subscriber's current roles: the local account's, else (a directory user) those
        saved with their subscriptions; None when the local account was removed."""
        local = self.users.get(prefs.user)
        if local is not None:
            return local
        return User(prefs.user, prefs.roles) if prefs.roles is not None else None

    def collect(self) -> int:
        """Queue notices for new events; returns how many were queued."""
        now = self._now()
        events = found.gather(self.config, self.site, self.control, now, self.usage)
        fresh = self.store.unseen(e.key for e in events)
        new = [e for e in events if e.key in fresh]
        stamp = now.isoformat(timespec="seconds")
        if self.store.state(BASELINE) is None:
            self.store.record(new, [], stamp)
            self.store.set_state(BASELINE, stamp)
            log.info("first run: %d existing events recorded, none mailed", len(new))
            return 0
        notices = []
        for prefs, subs in self.store.subscribers():
            user = self._user(prefs)
            if user is None or not prefs.email:
                continue
            notices += [(prefs.user, prefs.email, e) for e in new
                        if recipients(e, subs, user)]
        self.store.record(new, notices, stamp)
        return len(notices)

    def _still_allowed(self, user: str, prefs: Prefs | None, notices: list[Notice],
                       now: datetime) -> list[Notice]:
        """The notices `user` may still read; the others (a role withdrawn, an account
        removed while they waited for a digest) are withheld for good."""
        reader = self._user(prefs) if prefs else None
        allowed = [n for n in notices if n.kind == DIRECT or
                   (reader is not None and may_hear(reader, n.project, n.kind))]
        if len(allowed) < len(notices):
            withheld = [n.id for n in notices if n not in allowed]
            self.store.withhold(withheld, now.isoformat(timespec="seconds"))
            log.info("%d notices for %s withheld: they may no longer see them", len(withheld),
                     user)
        return allowed

    def send(self) -> tuple[int, list[str]]:
        """Mail the digests that are due; (digests sent, failures)."""
        smtp = self.config.smtp
        pending: dict[tuple[str, str], list[Notice]] = defaultdict(list)
        for n in self.store.unsent():
            pending[(n.user, n.email)].append(n)
        if not pending:
            return 0, []
        if not smtp:
            return 0, ["no SMTP key in config.json: notices stay queued"]
        now, base = self._now(), site_url(self.config.exports, self.config.web)
        sent, failed = 0, []
        waiting = sorted(pending.items())
        for i, ((user, email), queued) in enumerate(waiting):
            prefs = self.store.prefs(user)
            notices = self._still_allowed(user, prefs, queued, now)
            if not notices:
                continue
            if prefs and prefs.last_sent and not any(n.kind == DIRECT for n in notices):
                due = datetime.fromisoformat(prefs.last_sent) + \
                    timedelta(minutes=prefs.every_minutes)
                if now < due:
                    continue
            subject, body = digest(base, notices)
            try:
                deliver(smtp, message(smtp, email, subject, body))
            except MailServerDown as exc:  # the others would wait for the same timeout
                failed.append(f"{exc}: this and the {len(waiting) - i - 1} digests after it are "
                              f"kept for the next run")
                break
            except MailError as exc:
                failed.append(f"digest for {user} kept for the next run: {exc}")
                continue
            self.store.mark_sent(user, [n.id for n in notices], now.isoformat(timespec="seconds"))
            sent += 1
        return sent, failed

    def run(self) -> Report:
        report = Report(queued=self.collect())
        report.sent, report.failed = self.send()
        return report


def add_parser(sub, site_arg) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser(COMMAND, help="mail notification digests (cron)",
                       description="Find what happened since the last run (transfers, "
                       "exports, ethics periods, receiver and disk), queue notices for their "
                       "subscribers and mail the digests that are due. Exit 1 when a digest "
                       "could not be sent (it is kept for the next run).")
    site_arg(p)
    p.add_argument("-v", "--verbose", action="store_true")


def _locked(site: Site) -> int | None:
    """The lock file's descriptor when this run may go ahead, None when another runs."""
    path = ensure_dir(Tree(site.datadir).run) / "notify.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def run(config: Config, args: argparse.Namespace) -> int:
    ok = True
    for site in [config.site(args.site)] if args.site else config.all_sites():
        setup_logging(site, LOG_NAME, args.verbose)
        fd = _locked(site)
        if fd is None:
            log.info("another fiona notify is running; this run ends")
            continue
        try:
            report = Notifier(config, site, open_control_plane(config, site)).run()
        except ControlPlaneError as exc:
            log.warning("control plane unreachable, notices wait for the next run: %s", exc)
            ok = False
            continue
        finally:
            os.close(fd)
        for failure in report.failed:
            log.warning("%s", failure)
        log.info("notify done: %d notices queued, %d digests sent, %d kept", report.queued,
                 report.sent, len(report.failed))
        ok = ok and not report.failed
    return 0 if ok else 1
