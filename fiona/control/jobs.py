"""The control-plane subcommands of `fiona`: projects, coupling lists, assignment, requests,
and the periodic jobs removeOldEntries, resendProject and populateProjects.

Each takes the parsed arguments, prints what it did for a person to read, and returns the
exit code (0 done, 1 refused with a reason). The parsers of `assign`, `coupling upload` and
`resend` are here too; they run in `fiona.cli` through `fiona.actions`, as the web pages do."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta
from pathlib import Path

from ..config import Config
from . import open_control_plane
from .assign import Assigner
from .base import ControlPlane, ControlPlaneError, RoutingRule
from .keyed import Keyed


def add_parsers(sub: argparse._SubParsersAction, site_arg) -> None:
    """Register the subcommands on the `fiona` parser."""
    p = sub.add_parser("project", help="add, list or show research projects")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = psub.add_parser("add", help="add or update a project")
    a.add_argument("name", help="project acronym (the key in coupling lists and REDCap)")
    a.add_argument("--naming", required=True, metavar="REGEX",
                   help="regular expression every participant ID must match, e.g. '^P[0-9]{4}$'")
    a.add_argument("--events", required=True, metavar="E1,E2",
                   help="comma-separated event names, e.g. baseline,followup")
    a.add_argument("--autoid-aetitle", metavar="AE",
                   help="studies sent to this AE title get participant IDs automatically")
    a.add_argument("--features", default="", metavar="0,2",
                   help="0 drop PR objects, 1 never pixel-mask, 2 drop secondary captures")
    a.add_argument("--rek-start", default="", metavar="YYYY-MM-DD", help="ethics approval from")
    a.add_argument("--rek-end", default="", metavar="YYYY-MM-DD", help="ethics approval until")
    a.add_argument("--long-name", default="", help="the project's full name")
    a.add_argument("--deid-profile", metavar="NAME",
                   help="de-identification profile of its studies (shipped or the site's "
                   "config/profiles/NAME.json; default: kept, 'default' for a new project)")
    psub.add_parser("list", help="list the projects")
    s = psub.add_parser("show", help="one project with its participants and requests")
    s.add_argument("name")

    p = sub.add_parser("routing", help="add or list routing rules (pseudonymized data)")
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = rsub.add_parser("add", help="add or update a routing rule")
    a.add_argument("name")
    a.add_argument("--project", required=True)
    a.add_argument("--event", required=True)
    a.add_argument("--called-ae", default="", help="only studies sent to this AE title")
    a.add_argument("--calling-ae", default="", help="only studies sent from this AE title")
    a.add_argument("--patient-id-regex", default="", help="anchored; the PatientID becomes "
                   "the participant ID")
    a.add_argument("--patient-name-regex", default="", help="anchored; used when the "
                   "PatientID rule does not match")
    rsub.add_parser("list", help="list routing rules")

    p = sub.add_parser("coupling", help="upload a coupling list (CSV)")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = csub.add_parser("upload", help="AccessionNumber,ProjectName,subjectid,eventname rows")
    u.add_argument("file", type=Path)

    p = sub.add_parser("incoming", help="studies waiting for assignment")
    isub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = isub.add_parser("list", help="list incoming studies, newest first")
    i.add_argument("--all", action="store_true", help="include studies removed from the list")

    p = sub.add_parser("assign", help="assign a study to a project, participant and event")
    p.add_argument("study", help="StudyInstanceUID")
    p.add_argument("--project", required=True)
    p.add_argument("--participant", required=True)
    p.add_argument("--event", required=True)

    p = sub.add_parser("requests", help="transfer requests")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    qsub.add_parser("list", help="list transfer requests with their status")

    p = sub.add_parser("resend", help="send a project's transferred studies again "
                       "(resendProject)")
    p.add_argument("--project", required=True)
    p.add_argument("--study", help="only this StudyInstanceUID")

    p = sub.add_parser("remove-old-entries", help="take unassigned studies older than N days "
                       "off the Assign list (they stay on disk)")
    p.add_argument("--days", type=float, default=7.0)

    sub.add_parser("populate-projects", help="record forwarded studies in each project's "
                   "participant tables (populateProjects)")

    p = sub.add_parser("anonymize-and-send", help="the de-identify-and-forward daemon",
                       description="Take pending transfer requests oldest first; de-identify "
                       "each study (PS3.15 Annex E), check it with the verification gate, "
                       "mask burned-in text, send it to the destination, verify arrival and "
                       "write the outcome back to the control plane.")
    site_arg(p)

    p = sub.add_parser("detect-study-arrival", help="the arrival daemon",
                       description="Watch .arrived/; register quiet studies in the control "
                       "plane, apply coupling lists, routing rules and auto-ID, run the "
                       "arrival workflows. Picks up on start whatever arrived while it was "
                       "down.")
    site_arg(p)


def run(config: Config, args: argparse.Namespace) -> int:
    """Dispatch one control-plane subcommand."""
    site = config.site(getattr(args, "site", None))
    control = open_control_plane(config, site)
    assigner = Assigner(control, Keyed.from_datadir(site.datadir))
    from ..actions import ActionError, Actions

    key = (args.command, getattr(args, "action", None))
    try:
        if key == ("project", "add"):
            return _project_add(Actions(site, control, assigner.keyed), args)
        status = HANDLERS[key](control, assigner, args)
    except (ActionError, ControlPlaneError) as exc:
        print(f"fiona {args.command}: {exc}", file=sys.stderr)
        return 1
    return status


def _project_add(acts, args) -> int:
    """Through `fiona.actions` as the OS user, like the admin page (same rules and audit)."""
    from ..actions import OsActor

    events = [e.strip() for e in args.events.split(",") if e.strip()]
    try:
        features = {int(f) for f in args.features.split(",") if f.strip()}
    except ValueError:
        raise ControlPlaneError("--features takes 0 (drop PR), 1 (never pixel-mask), "
                                "2 (drop secondary captures)") from None
    profile = {"deid_profile": args.deid_profile} if args.deid_profile else {}
    project = acts.edited_project(
        args.name, naming=args.naming, events=events, long_name=args.long_name,
        use_autoid=bool(args.autoid_aetitle), autoid_aetitle=args.autoid_aetitle or "",
        features=features, rec_start=args.rek_start, rec_end=args.rek_end, **profile)
    acts.save_project(OsActor.current(), project)
    autoid = f", auto-ID for AE {project.autoid_aetitle}" if project.use_autoid else ""
    print(f"project {project.name}: participants {project.naming}, events "
          f"{', '.join(events)}, de-identification profile {project.deid_profile}{autoid}")
    return 0


def _check_regex(pattern: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ControlPlaneError(f"--naming {pattern!r} is not a valid regular expression: "
                                f"{exc}") from None


def _project_list(control: ControlPlane, assigner: Assigner, args) -> int:
    for p in control.projects():
        print(f"{p.name}\t{p.naming}\t{','.join(p.events)}\t"
              f"{'auto-ID ' + p.autoid_aetitle if p.use_autoid else ''}")
    return 0


def _project_show(control: ControlPlane, assigner: Assigner, args) -> int:
    p = control.project(args.name)
    print(f"project {p.name} {p.long_name}\n  naming {p.naming}\n  events {', '.join(p.events)}"
          f"\n  features {sorted(p.features)}\n  auto-ID {p.autoid_aetitle or '-'}"
          f"\n  de-identification profile {p.deid_profile}")
    print(f"  participants: {', '.join(control.participants(p.name)) or '-'}")
    for r in control.requests():
        if r.project == p.name:
            print(f"  request {r.study_uid} {r.participant}/{r.event} "
                  f"{'pending' if r.pending else 'sent ' + r.transferred}")
    return 0


def _routing_add(control: ControlPlane, assigner: Assigner, args) -> int:
    control.project(args.project).check_event(args.event)
    for regex in (args.patient_id_regex, args.patient_name_regex):
        if regex:
            _check_regex(regex)
    control.save_routing_rule(RoutingRule(
        name=args.name, project=args.project, event=args.event, called_ae=args.called_ae,
        calling_ae=args.calling_ae, patient_id_regex=args.patient_id_regex,
        patient_name_regex=args.patient_name_regex))
    print(f"routing rule {args.name} -> {args.project}/{args.event}")
    return 0


def _routing_list(control: ControlPlane, assigner: Assigner, args) -> int:
    for r in control.routing_rules():
        print(f"{r.name}\t{'active' if r.active else 'off'}\t{r.project}/{r.event}\t"
              f"called={r.called_ae or '*'} calling={r.calling_ae or '*'} "
              f"id={r.patient_id_regex or '-'} name={r.patient_name_regex or '-'}")
    return 0


def _incoming_list(control: ControlPlane, assigner: Assigner, args) -> int:
    for s in control.studies(include_hidden=args.all):
        files = sum(x.num_files for x in s.series)
        modalities = ",".join(sorted({x.modality for x in s.series if x.modality}))
        print(f"{s.arrival}\t{s.uid}\t{s.date} {s.time}\t{s.description}\t{s.accession}\t"
              f"{modalities}\t{len(s.series)} series/{files} images\t{s.calling_ae}->"
              f"{s.called_ae}")
    return 0


def _requests_list(control: ControlPlane, assigner: Assigner, args) -> int:
    for r in control.requests():
        state = "pending" if r.pending else f"sent {r.transferred}"
        errors = f" ERROR {sorted(r.error_flags)}: {r.error_message}" if r.error_message else ""
        print(f"{r.requested}\t{r.study_uid}\t{r.project}/{r.participant}/{r.event}\t{state}\t"
              f"{r.mapped_uid or '-'}\t{r.source}{errors}")
    return 0


def _remove_old_entries(control: ControlPlane, assigner: Assigner, args) -> int:
    n = control.hide_studies_before(datetime.now() - timedelta(days=args.days))
    print(f"{n} unassigned study(ies) older than {args.days:g} days removed from the list "
          f"(their files stay until cleanup allows deletion)")
    return 0


def _populate_projects(control: ControlPlane, assigner: Assigner, args) -> int:
    done = 0
    for project in control.projects():
        mirrored = {m["study_uid"] for m in control.imaging(project.name)}
        for r in control.requests():
            if r.project == project.name and r.mapped_uid and r.transferred and \
                    r.mapped_uid not in mirrored:
                study = control.study(r.study_uid)
                control.mirror_forwarded(r, study.description if study else "")
                done += 1
    print(f"{done} forwarded study(ies) recorded in their projects")
    return 0


HANDLERS = {
    ("project", "list"): _project_list,
    ("project", "show"): _project_show, ("routing", "add"): _routing_add,
    ("routing", "list"): _routing_list, ("incoming", "list"): _incoming_list,
    ("requests", "list"): _requests_list,
    ("remove-old-entries", None): _remove_old_entries,
    ("populate-projects", None): _populate_projects,
}
