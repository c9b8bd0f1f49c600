"""The `fiona` subcommands of operations: clear-old-files, clear-stale-links, status, backup,
restore. Each prints what it did for a person (or `--json` for a program) and returns the exit
code: 0 done (status: all well), 1 stopped with a reason (status: something needs attention),
2 a configuration error (raised to `fiona.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import Config

COMMANDS = ("clear-old-files", "clear-stale-links", "status", "backup")
#: runs without a configuration: it may be the one that brings it back
RESTORE = "restore"


def add_parsers(sub: argparse._SubParsersAction, site_arg) -> None:
    """Register the subcommands on the `fiona` parser."""
    p = sub.add_parser("clear-old-files", help="above DISK.cleanup_percent, remove the oldest "
                       "delivered studies (clearOldFiles)",
                       description="While the disk is above DISK.cleanup_percent, remove the "
                       "oldest studies whose every transfer request is complete and verified: "
                       "archive, raw/, participants/ and srs/ links, arrival files. A study with "
                       "a pending, held or failed request is never removed. Unassigned studies "
                       "go only with --include-unassigned (or DISK.cleanup_unassigned) and "
                       "after RETENTION_DAYS_UNASSIGNED days. Each removal is logged (study UID) "
                       "and audited. Also removes the records of scans (MPPS steps, scan "
                       "outcomes) concluded more than DISK.scan_retention_days ago, never one "
                       "of a study still active. Exit 1 when the control plane cannot be "
                       "reached: then nothing is removed.")
    p.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    p.add_argument("--include-unassigned", action="store_true",
                   help="also remove unassigned studies older than RETENTION_DAYS_UNASSIGNED")
    site_arg(p)

    p = sub.add_parser("clear-stale-links", help="remove links that point at nothing "
                       "(clearStaleLinks)",
                       description="Remove dangling links in raw/, participants/ and srs/ (and "
                       "temporaries a killed indexer left), "
                       "series JSONs without instances and the empty folders left; the archive "
                       "is never touched. Studies still arriving and anything changed within "
                       "the last hour are left alone.")
    p.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    site_arg(p)

    p = sub.add_parser("status", help="daemons, queues, disk, quarantine; exit 1 if something "
                       "needs attention",
                       description="The facts of the web's Status page on the terminal. Exit "
                       "0 when all is well, 1 when something needs attention (a daemon not "
                       "running, the disk at the refuse watermark, failed transfer requests, "
                       "the control plane unreachable), so monitoring can call it.")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    site_arg(p)

    p = sub.add_parser("backup", help="back up config, secrets, control plane and audit log",
                       description="Write a consistent snapshot into DIR (missing or empty) "
                       "while the gateway runs: DATADIR/config with the secrets (kept 0600) and "
                       "users, the local control plane (SQLite online backup), the audit log "
                       "with its anchor, secret files config.json names elsewhere, and "
                       "manifest.json with SHA-256 checksums. Web sessions are left out. The "
                       "archive is for the site's usual file backup.")
    p.add_argument("dir", type=Path, metavar="DIR")
    site_arg(p)

    p = sub.add_parser(RESTORE, help="restore a backup into an empty data tree",
                       description="Verify DIR's manifest, then put the backup into an empty "
                       "data tree (default: the DATADIR it was taken from; --data for another, "
                       "whose path is then written into config.json). A tree that is not "
                       "empty is refused. Restore the archive from the site's file backup "
                       "afterwards.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--data", type=Path, metavar="DATADIR", help="the empty data tree to fill")


def _actor() -> str:
    from ..actions import OsActor

    return OsActor.current().name


def restore(args: argparse.Namespace) -> int:
    from .backup import BackupError
    from .backup import restore as do_restore

    try:
        datadir, manifest = do_restore(args.dir, args.data, _actor())
    except BackupError as exc:
        print(f"fiona restore: {exc}", file=sys.stderr)
        return 1
    print(f"restored the backup of {manifest['created']} into {datadir}; now restore "
          f"{datadir}/site/archive from the site's file backup, then start the gateway")
    return 0


def run(config: Config, args: argparse.Namespace) -> int:
    site = config.site(getattr(args, "site", None))
    if args.command == "status":
        return _status(config, site, args)
    if args.command == "backup":
        return _backup(config, site, args)
    from ..daemon import setup_logging

    setup_logging(site, "clearOldFiles" if args.command == "clear-old-files"
                  else "clearStaleLinks", args.verbose)
    if args.command == "clear-old-files":
        return _clear_old_files(config, site, args)
    return _clear_stale_links(site, args)


def _clear_old_files(config: Config, site, args: argparse.Namespace) -> int:
    from ..control import open_control_plane
    from .cleanup import Cleanup, CleanupError

    cleanup = Cleanup(config, site, open_control_plane(config, site), _actor(),
                      include_unassigned=args.include_unassigned)
    try:
        report = cleanup.run(dry_run=args.dry_run)
    except CleanupError as exc:
        print(f"fiona clear-old-files: {exc}", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for c in report.removed:
        print(f"{verb} study {c.study} ({c.why}, arrived {c.arrival or '?'}, {c.size} bytes)")
    kept = ", ".join(f"{n} {why}" for why, n in sorted(report.kept.items())) or "none"
    print(f"disk {report.percent_before:.1f}% used, watermark {report.watermark:g}%: {verb} "
          f"{len(report.removed)} study(ies), now {report.percent_after:.1f}%"
          f"{' (estimated)' if args.dry_run else ''}; kept: {kept}")
    if report.scans.steps or report.scans.scans:
        print(f"{verb} the records of {len(report.scans.scans)} concluded scan(s) and "
              f"{len(report.scans.steps)} MPPS step(s) older than "
              f"{config.scan_retention_days:g} days")
    return 0


def _clear_stale_links(site, args: argparse.Namespace) -> int:
    from ..tree import Tree
    from .links import StaleLinks

    report = StaleLinks(Tree(site.datadir)).run(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for kind, paths in (("link", report.links), ("series JSON", report.jsons),
                        ("folder", report.folders)):
        for path in paths:
            print(f"{verb} {kind} {path}")
    print(f"{verb} {len(report.links)} dangling link(s) or temporaries, "
          f"{len(report.jsons)} series JSON(s) without files, {len(report.folders)} empty "
          f"folder(s)")
    return 0


def _status(config: Config, site, args: argparse.Namespace) -> int:
    from .. import status
    from ..control import open_control_plane

    facts = status.gather(config, site, open_control_plane(config, site), admin=True,
                          strict=False)
    problems = status.attention(facts)
    facts["attention"] = problems
    if args.json:
        print(json.dumps(facts, indent=1))
    else:
        print(format_status(facts))
    return 1 if problems else 0


def format_status(facts: dict) -> str:
    lines = ["daemons:"]
    for d in facts["daemons"]:
        state = f"running (pid {d['pid']})" if d["running"] else "NOT RUNNING"
        lines.append(f"  {d['name']:<22} {state:<22} last activity {d['last_activity'] or '-'}"
                     + (f"\n    last error: {d['last_error']}" if d.get("last_error") else ""))
    q = facts["queues"]
    lines.append("queues: " + (q["error"] if "error" in q else
                               ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in q.items())))
    d = facts["disk"]
    lines.append(f"disk: {d['used_percent']}% used ({d['free_gb']} GB free) on {d['path']}; "
                 f"cleanup at {d['cleanup_percent']:g}%, refused at "
                 f"{d['refuse_store_percent']:g}%: {d['state']}")
    held = facts["quarantine"]
    lines.append("quarantine: " + (", ".join(f"{k} {v}" for k, v in held.items()) or "empty"))
    lines.append("switches: " + ", ".join(f"{w['part']} {'on' if w['enabled'] else 'off'}"
                                          for w in facts["switches"]))
    lines.append("scans: " + ", ".join(f"{k} {v}" for k, v in facts["scans"].items()))
    beat = facts["heartbeat"]
    lines.append("last heartbeat: " + (f"{beat['at']}, {beat['outcome']}" if beat else "none yet"))
    lines.append("attention: " + ("; ".join(facts["attention"]) or "none, all is well"))
    return "\n".join(lines)


def _backup(config: Config, site, args: argparse.Namespace) -> int:
    from .backup import BackupError, backup

    try:
        entries = backup(config, site, args.dir, _actor())
    except BackupError as exc:
        print(f"fiona backup: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {len(entries)} file(s) of {site.datadir} into {args.dir.resolve()} "
          f"(manifest.json has their SHA-256); the archive is for the site's file backup")
    return 0
