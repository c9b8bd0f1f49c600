"""The `fiona` command: one subcommand per daemon and job.

Daemons run in the foreground (systemd and `fiona up` supervise them); jobs run once and exit
with 0 on success, 1 on a failure they explain, 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import ctl
from .attach import cli as attach
from .config import ENABLED_PARTS, ConfigError, config_path, load
from .control import jobs
from .daemon import DaemonError
from .export import cli as export
from .index import reindex
from .notify import job as notify
from .ops import commands as ops
from .ops import heartbeat
from .ops import inventory_cli as inventory
from .scanner import retrieve_cli as retrieve
from .send import outbox

EPILOG = """Configuration: --config PATH, else $FIONA_CONFIG, else /data/config/config.json.
Start here: `fiona init --data ./data` then `fiona up` (or `make run`)."""


def _site_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", metavar="NAME", help="one of SITES in config.json (default: the "
                   "main receiver)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiona", description="FIONA research DICOM gateway: receive, index, assign, "
        "de-identify, forward and export medical images.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH", help="config.json to use")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="write a working config tree under a data folder",
                       description="Create DIR/config (config.json, enabled, secret.key with mode "
                       "0600, classifyRules.json) and the data tree under DIR/site.")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="the data folder")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    p.add_argument("--aetitle", default="FIONA", help="AE title (default FIONA)")
    p.add_argument("--ip", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config.json")

    p = sub.add_parser("config", help="show the effective configuration or its errors")
    p.add_argument("action", choices=["check"], help="check: validate and print")

    p = sub.add_parser("storescp", help="the DICOM receiver daemon (C-STORE, C-ECHO)",
                       description="Receive DICOM on DICOMIP:DICOMPORT for any called AE title; "
                       "file each object durably under site/archive and journal it for the "
                       "indexer. Runs in the foreground until SIGTERM or Ctrl-C.")
    _site_arg(p)

    p = sub.add_parser("process-single-file", help="the indexer daemon (raw/, series JSON)",
                       description="Index received files: raw/, participants/, srs/, the series "
                       "JSON and classification. Replays the receiver's journal from its last "
                       "position on start, so nothing received while it was down is missed.")
    _site_arg(p)
    p.add_argument("--once", action="store_true",
                   help="index what the journal holds now, then exit")

    p = sub.add_parser("mpps", help="the MPPS SCP daemon on MPPSPORT (mppsctl.sh)",
                       description="Receive Modality Performed Procedure Steps (N-CREATE, N-SET) "
                       "on MPPSPORT; each step is kept under site/mpps and makes its study "
                       "active for pull-from-scanner. Refuses associations while the enabled "
                       "file's second character is 0. Runs in the foreground.")
    p = sub.add_parser("pull-from-scanner", help="fetch missing series of active scans from "
                       "the scanner (moveFromScanner.sh)",
                       description="Every 15 s (or once with --once): for each study an MPPS "
                       "step made active, C-FIND its series at SCANNERAETITLE@SCANNERIP:"
                       "SCANNERPORT, C-MOVE those FIONA lacks to DICOMAETITLE, and mark the scan "
                       "finished (all series here, step COMPLETED or DISCONTINUED) or failed "
                       "(not so after --deadline-hours).")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--deadline-hours", type=float, default=24.0, metavar="H",
                   help="a scan not complete H hours after its step began fails (default 24)")

    p = sub.add_parser("classify", help="show how the rules label DICOM files",
                       description="Run classifyRules.json on each FILE and print the labels and "
                       "the clauses that decided them.")
    p.add_argument("--test", nargs="+", required=True, type=Path, metavar="FILE")
    p.add_argument("--rules", type=Path, help="rules file (default: the site's, else shipped)")
    _site_arg(p)

    jobs.add_parsers(sub, _site_arg)
    ops.add_parsers(sub, _site_arg)
    inventory.add_parser(sub, _site_arg)
    retrieve.add_parser(sub, _site_arg)
    reindex.add_parser(sub, _site_arg)
    export.add_parser(sub, _site_arg)
    attach.add_parser(sub, _site_arg)
    outbox.add_parser(sub, _site_arg)
    ctl.add_parser(sub, _site_arg)
    heartbeat.add_parser(sub, _site_arg)
    notify.add_parser(sub, _site_arg)

    p = sub.add_parser("anonymize", help="de-identify a folder of DICOM files into another",
                       description="De-identify every DICOM file under IN_DIR (PS3.15 Annex E "
                       "with the profile's options, keyed UIDs and date shift from "
                       "DATADIR/config/secret.key), check each result with the verification "
                       "gate, and write OUT_DIR/<series UID>/<SOP UID>.dcm.")
    p.add_argument("--project", required=True, help="project name (keys UIDs and dates)")
    p.add_argument("--participant", required=True, metavar="ID",
                   help="pseudonym written to PatientID and PatientName")
    p.add_argument("--event", default="", metavar="E", help="event name (ClinicalTrialTimePoint)")
    p.add_argument("--profile", default="default", metavar="NAME",
                   help="DATADIR/config/profiles/NAME.json, else the shipped profile NAME "
                   "(default: default)")
    p.add_argument("in_dir", type=Path, metavar="IN_DIR")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")

    p = sub.add_parser("web", help="the web application (Assign, Review, Status)",
                       description="Serve the web pages and JSON API on WEB.host:WEB.port. "
                       "On first start, with no users yet, creates `admin` with a one-time "
                       "password and prints it.")
    _site_arg(p)
    p.add_argument("--https", action="store_true",
                   help="mark session cookies Secure (behind an HTTPS reverse proxy)")
    p.add_argument("--port", type=int, help="override WEB.port")

    p = sub.add_parser("user", help="manage web users",
                       description="Add or update a web user in DATADIR/config/users.json. "
                       "The password is asked for, or read from --password-file.")
    p.add_argument("action", choices=["add"])
    p.add_argument("name")
    p.add_argument("--role", action="append", required=True, metavar="ROLE",
                   help="admin or project:P:assign|export|review (repeatable)")
    p.add_argument("--password-file", type=Path, metavar="FILE",
                   help="read the password from the first line of FILE (- for stdin)")
    _site_arg(p)

    p = sub.add_parser("audit", help="check the audit trail",
                       description="Check DATADIR/logs/audit.log: every line's keyed MAC, the "
                       "chain between lines, and that the log ends where its head anchor "
                       "(DATADIR/config/audit.head) says; exit 1 naming the first problem.")
    p.add_argument("action", choices=["verify"])
    _site_arg(p)

    p = sub.add_parser("move", help="admins: move a study's request in a project to another "
                       "participant", description="Give the study's transfer request in PROJECT "
                       "another participant (and event); it is de-identified and sent again, "
                       "replacing the study at the destination. Audited under the OS user.")
    p.add_argument("study", help="StudyInstanceUID")
    p.add_argument("--project", required=True)
    p.add_argument("--participant", required=True, help="the new participant ID")
    p.add_argument("--event", help="the new event (default: keep the request's)")
    _site_arg(p)

    p = sub.add_parser("switch", help="turn a part of the gateway on or off (the enabled file)",
                       description="Set one switch of DATADIR/config/enabled: receive (the "
                       "receiver refuses new associations when off), scanner, reserved. "
                       "Audited under the OS user.")
    p.add_argument("part", choices=sorted(ENABLED_PARTS))
    p.add_argument("state", choices=["on", "off"])
    _site_arg(p)

    p = sub.add_parser("up", help="run every daemon in the foreground",
                       description="Run the gateway's daemons in the foreground. Without a "
                       "config (no --config, no $FIONA_CONFIG, no /data/config/config.json) "
                       "it first runs `fiona init --data ./data`.")
    p.add_argument("--data", type=Path, default=Path("data"),
                   help="data folder for the first-run config (default ./data)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port for a first run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print("fiona: configuration error:", file=sys.stderr)
        if exc.path:
            print(f"  in {exc.path}", file=sys.stderr)
        for err in exc.errors:
            print(f"  - {err}", file=sys.stderr)
        return 2
    except DaemonError as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "init":
        from .bootstrap import init

        path = init(args.data, args.port, args.aetitle, args.ip, args.force)
        print(f"wrote {path}\nstart with: fiona --config {path} up")
        return 0
    if cmd == "up":
        from . import up

        explicit = args.config or os.environ.get("FIONA_CONFIG")
        if not explicit and not config_path(None).exists():
            explicit = str(args.data / "config" / "config.json")
            if not Path(explicit).exists():
                from .bootstrap import init

                init(args.data, args.port)
        return up.run(load(explicit))
    if cmd == ops.RESTORE:
        return ops.restore(args)
    config = load(args.config)
    if cmd == "config":
        print(json.dumps(config.effective(), indent=2))
        print(f"# {config.path}: OK", file=sys.stderr)
        return 0
    if cmd == "storescp":
        from .receive import storescp

        return storescp.run(config, args.site, args.verbose)
    if cmd == "process-single-file":
        from .index import indexer

        if args.once:
            site = config.site(args.site)
            ix = indexer.Indexer(site, indexer.load_rules(site))
            print(f"indexed {ix.drain()} files")
            return 0
        return indexer.run(config, args.site, args.verbose)
    if cmd == "web":
        from .web import server

        return server.run(config, args.site, args.verbose, args.https, args.port)
    if cmd == "user":
        from .web.cli import user_add

        return user_add(config, args)
    if cmd == "audit":
        return _audit_verify(config, args)
    if cmd == "anonymize":
        from .deid.anonymize import cli_anonymize

        return cli_anonymize(config, args)
    if cmd == "classify":
        return _classify(config, args)
    if cmd in ACTIONS:
        return _action(config, args)
    if cmd == "mpps":
        from .scanner import mpps

        return mpps.run(config, args.verbose)
    if cmd == "pull-from-scanner":
        from .scanner import pull

        return pull.run(config, args.verbose, args.once, args.deadline_hours)
    if cmd == "detect-study-arrival":
        from .arrive import detector

        return detector.run(config, args.site, args.verbose)
    if cmd == "anonymize-and-send":
        from .send import forward

        return forward.run(config, args.site, args.verbose)
    if cmd in ops.COMMANDS:
        return ops.run(config, args)
    if cmd == "ctl":
        return ctl.run(config, args)
    if cmd == heartbeat.COMMAND:
        return heartbeat.run(config, args)
    if cmd == inventory.COMMAND:
        return inventory.run(config, args)
    if cmd == retrieve.COMMAND:
        return retrieve.run(config, args)
    if cmd == reindex.COMMAND:
        return reindex.run(config, args)
    if cmd == attach.COMMAND:
        return attach.run(config, args)
    if cmd in export.COMMANDS:
        return export.run(config, args)
    if cmd == outbox.COMMAND:
        return outbox.run(config, args)
    if cmd == notify.COMMAND:
        return notify.run(config, args)
    return jobs.run(config, args)


def _assign(acts, actor, args: argparse.Namespace) -> int:
    result = acts.assign(actor, args.study, args.project, args.participant, args.event)
    print(f"requested {args.project}/{args.participant.strip()}/{args.event}" if result.created
          else "this request exists already")
    return 0


def _coupling(acts, actor, args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"fiona coupling: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    report = acts.upload_coupling(actor, text, args.file.name)
    for line in report.lines:
        print(f"line {line.line}: {line.status}" + (f" ({line.detail})" if line.detail else ""))
    print(f"{report.accepted} row(s) accepted, {len(report.requests)} request(s) made")
    return 0 if all(x.status in ("accepted", "duplicate") for x in report.lines) else 1


def _resend(acts, actor, args: argparse.Namespace) -> int:
    n = acts.resend(actor, args.project, args.study)
    print(f"{n} request(s) of {args.project} will be sent again")
    return 0


def _move(acts, actor, args: argparse.Namespace) -> int:
    req = acts.move(actor, args.study, args.project, args.participant, args.event)
    print(f"study {args.study} in {args.project} now belongs to {req.participant}/{req.event}; "
          f"it will be sent again")
    return 0


def _switch(acts, actor, args: argparse.Namespace) -> int:
    changed = acts.set_switch(actor, args.part, args.state == "on")
    print(f"{args.part} is {args.state}" + ("" if changed else " (it was already)"))
    return 0


#: commands that are actions (`fiona.actions`): the same rules and audit entries as the web
ACTIONS = {"assign": _assign, "coupling": _coupling, "resend": _resend, "move": _move,
           "switch": _switch}


def _action(config, args: argparse.Namespace) -> int:
    """Run an action as the OS user; its audit entry names that user (`os:<login>`)."""
    from .actions import ActionError, Actions, OsActor
    from .control.base import ControlPlaneError

    try:
        acts = Actions.open(config, getattr(args, "site", None))
        return ACTIONS[args.command](acts, OsActor.current(), args)
    except (ActionError, ControlPlaneError) as exc:
        print(f"fiona {args.command}: {exc}", file=sys.stderr)
        return 1


def _audit_verify(config, args: argparse.Namespace) -> int:
    from . import audit

    datadir = config.site(args.site).datadir
    count, problem = audit.verify(datadir)
    path = audit.audit_path(datadir)
    if problem:
        print(f"{path}: {problem}", file=sys.stderr)
        return 1
    print(f"{path}: OK, {count} entries" if path.exists() else f"{path}: no audit log yet")
    return 0


def _classify(config, args: argparse.Namespace) -> int:
    import pydicom

    from .index.classify import RuleSet, format_explanation
    from .index.header import ImageRecord
    from .index.indexer import load_rules

    rules = RuleSet.load(args.rules) if args.rules else load_rules(config.site(args.site))
    status = 0
    for path in args.test:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            print(f"{path}: not readable as DICOM: {exc}", file=sys.stderr)
            status = 1
            continue
        record = ImageRecord(ds)
        print(f"{path}:")
        print(format_explanation(rules.explain(record, ds)))
    return status
