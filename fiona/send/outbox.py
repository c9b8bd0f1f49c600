"""The outbox job (`fiona send-files`; original `sendFiles.sh`): deliver what waits in
`site/outbox/` to an `sftp` destination.

A file is queued by writing it and then its `<file>.md5sum` (the md5 in hex, first on the
line) into the outbox; a file without one is still being written and waits. Each queued file
goes to `<remote_dir>/<file>` through the destination's verified upload (temporary name,
rename, size and checksum check), and only a verified file moves, with its .md5sum, to
`outbox/done/`. A file whose name is already on the server with other contents is never
replaced: it is reported and stays queued until someone decides. A file that does not match
its own .md5sum is reported and stays.

Delivered files are checked again at later runs, for `recheck_days` after delivery (the
original's md5 reconciliation: the server's `.md5`/`.sha256` sidecar, when its side writes
one, else the remote file read back): one that disappeared from the server is uploaded again,
one that differs is reported, not replaced. One run at a time (a lock in the outbox); a
server that cannot be reached ends the run, and the next run (cron) tries again.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, ConfigError
from ..tree import Tree, ensure_dir, fsync_dir, safe_name

if TYPE_CHECKING:
    from .destinations.sftp import Sftp, SftpDestination

COMMAND = "send-files"
SIDECAR = ".md5sum"
RECHECK_DAYS = 7
LOCK = ".send-files.lock"
_MD5 = re.compile(r"^[0-9a-f]{32}$")

log = logging.getLogger("fiona.sendFiles")


def add_parser(sub: argparse._SubParsersAction, site_arg: Callable) -> None:
    """Register `fiona send-files` on the `fiona` parser."""
    p = sub.add_parser(COMMAND, help="deliver the outbox to an SFTP server (sendFiles)",
                       description="Upload every file of site/outbox/ that has its .md5sum to "
                       "an sftp destination (temporary name, rename, verified by size and "
                       "checksum) and move verified ones to site/outbox/done/; check files "
                       "delivered in the last --recheck-days again (a file gone from the "
                       "server is sent again). A file that is on the server with other "
                       "contents is reported and never replaced. Exit 1 when anything is "
                       "left undelivered or differs.")
    p.add_argument("--destination", metavar="NAME", help="the sftp destination (default: the "
                   "only one in DESTINATIONS)")
    p.add_argument("--recheck-days", type=float, default=RECHECK_DAYS, metavar="N",
                   help=f"check delivered files again for N days (default {RECHECK_DAYS}; "
                   f"0: never)")
    site_arg(p)


def destination(config: Config, name: str | None) -> tuple[str, dict[str, Any]]:
    """The sftp destination named `name`, else the only one; ConfigError otherwise."""
    sftp = {n: s for n, s in config.destinations.items() if s.get("type") == "sftp"}
    if name is None and len(sftp) == 1:
        name = next(iter(sftp))
    if name is None or name not in sftp:
        which = f"no sftp destination {name!r}" if name else (
            "several sftp destinations: name one with --destination" if sftp else
            "no sftp destination")
        raise ConfigError([f"DESTINATIONS has {which} (sftp ones: {', '.join(sftp) or 'none'}); "
                           f"the outbox is sent by SFTP"], config.path)
    return name, sftp[name]


@dataclass
class Report:
    delivered: list[str] = field(default_factory=list)
    rechecked: int = 0
    waiting: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return (f"{len(self.delivered)} delivered, {self.rechecked} checked again, "
                f"{len(self.waiting)} waiting for their .md5sum, {len(self.problems)} problem(s)")


class Outbox:
    """One outbox (`tree.outbox`) and the destination it is delivered to."""

    def __init__(self, tree: Tree, dest: SftpDestination, clock: Clock = SYSTEM_CLOCK):
        self.tree, self.dest, self.clock = tree, dest, clock
        self.report = Report()

    def remote(self, name: str) -> str:
        return str(PurePosixPath(self.dest.config.remote_dir, name))

    def queued(self) -> list[Path]:
        """Files ready to go (with their .md5sum), oldest first; notes those still waiting."""
        ready = []
        for entry in sorted(self.tree.outbox.iterdir(), key=lambda p: p.stat().st_mtime):
            name = entry.name
            if name.startswith(".") or name.endswith(SIDECAR) or not entry.is_file():
                continue
            if safe_name(name, default="") != name:
                self._problem(name, "the name cannot be used on the server (control "
                                    "characters, backslashes or blanks at its ends): rename it")
            elif (entry.parent / (name + SIDECAR)).is_file():
                ready.append(entry)
            else:
                self.report.waiting.append(name)
        return ready

    def delivered(self, recheck_days: float) -> list[Path]:
        """Files in done/ delivered less than `recheck_days` ago (by their .md5sum's time)."""
        done = self.tree.outbox_done
        if recheck_days <= 0 or not done.is_dir():
            return []
        since = self.clock.time() - recheck_days * 86400
        return sorted(p for p in done.iterdir()
                      if not p.name.endswith(SIDECAR) and p.is_file()
                      and (s := p.parent / (p.name + SIDECAR)).is_file()
                      and s.stat().st_mtime >= since)

    def run(self, recheck_days: float = RECHECK_DAYS) -> Report:
        from .destinations import DestinationUnavailable
        from .destinations.sftp import RemoteDiffers

        todo = [(p, False) for p in self.queued()] + \
            [(p, True) for p in self.delivered(recheck_days)]

        def work(sftp: Sftp) -> None:
            while todo:
                path, again = todo[0]
                try:
                    self._one(sftp, path, again)
                except RemoteDiffers as exc:
                    self._problem(path.name, str(exc))
                todo.pop(0)

        if todo:
            try:
                self.dest.run(work)
            except DestinationUnavailable as exc:
                self._problem("", f"{exc}; {len(todo)} file(s) wait for the next run")
        return self.report

    def _one(self, sftp: Sftp, path: Path, again: bool) -> None:
        """Deliver (or, `again`, check) one file."""
        expected = _read_md5(path.parent / (path.name + SIDECAR))
        if expected is None:
            self._problem(path.name, f"{path.name}{SIDECAR} holds no md5 (32 hex digits)")
            return
        from .destinations.sftp import RemoteDiffers, file_digests

        digests = file_digests(path)
        if digests["md5"] != expected:
            self._problem(path.name, f"the file does not match its {SIDECAR}: left in place")
            return
        remote = self.remote(path.name)
        if again:
            self.report.rechecked += 1
            if sftp.size(remote) is not None:
                difference = sftp.check(remote, path.stat().st_size, digests)
                if difference:
                    raise RemoteDiffers(f"{remote} on the server differs from the delivered "
                                        f"file ({difference}); it was not replaced")
                return
            log.warning("%s is gone from the server: sending it again", path.name)
        sftp.makedirs(self.dest.config.remote_dir)
        sftp.put(path, remote, replace=False, digests=digests)
        if not again:
            self._move_to_done(path)
        self.report.delivered.append(path.name)
        log.info("%s delivered to %s and verified", path.name, self.dest.name)

    def _move_to_done(self, path: Path) -> None:
        done = self.tree.outbox_done
        if not done.is_dir():
            ensure_dir(done)
        sidecar = path.parent / (path.name + SIDECAR)
        os.replace(path, done / path.name)
        os.replace(sidecar, done / sidecar.name)
        now = self.clock.time()
        os.utime(done / sidecar.name, (now, now))  # the delivery time, for the recheck window
        fsync_dir(done)
        fsync_dir(path.parent)

    def _problem(self, name: str, text: str) -> None:
        self.report.problems.append(f"{name}: {text}" if name else text)
        log.error("%s", self.report.problems[-1])


def _read_md5(sidecar: Path) -> str | None:
    try:
        words = sidecar.read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return None
    return words[0].lower() if words and _MD5.match(words[0].lower()) else None


def run(config: Config, args: argparse.Namespace) -> int:
    """`fiona send-files`: 0 all delivered (or nothing to do), 1 something is left or
    differs (each said on stderr and in logs/sendFiles.log), 2 (ConfigError) files are queued
    but there is no sftp destination to send them to."""
    from ..daemon import setup_logging
    from .destinations.sftp import SftpDestination

    site = config.site(args.site)
    tree = Tree(site.datadir).make()
    if args.destination is None and not any(
            s.get("type") == "sftp" for s in config.destinations.values()) and not any(
            not p.name.startswith(".") and p.is_file() for p in tree.outbox.iterdir()):
        return 0  # a site without SFTP and nothing queued (the cron line runs everywhere)
    name, settings = destination(config, args.destination)
    dest = SftpDestination(name, settings)
    setup_logging(site, "sendFiles", args.verbose)
    with open(tree.outbox / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("fiona send-files: another run is delivering the outbox", file=sys.stderr)
            return 0
        report = Outbox(tree, dest).run(args.recheck_days)
    for problem in report.problems:
        print(f"fiona send-files: {problem}", file=sys.stderr)
    log.info("%s", report.line())
    print(report.line())
    return 0 if report.ok else 1
