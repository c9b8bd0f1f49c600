"""How studies get transfer requests (SPEC §6), once for every control-plane backend.

Four ways: a person (`assign`), a coupling-list row, a routing rule, auto-ID; and an
amendment (a series arriving after its study was requested) asks for the request again, so
the late series joins the same de-identified study. The same (study, project, participant,
event) never makes two requests, and a study has at most one request per project: the
de-identified study's UIDs depend on the project only, so a second participant would get the
same mapped study and overwrite the first at the destination. Moving a study to another
participant is an explicit administrator's operation (`reassign`). Projects that are inactive
or outside their ethics approval period take no new requests.

Clear patient identifiers are used here, in memory, for matching only; what is stored is
keyed, and log lines name participants and identifiers only by keyed reference.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field

import rstr

from ..clock import SYSTEM_CLOCK, Clock
from .base import (
    ControlPlane,
    ControlPlaneError,
    CouplingRow,
    Project,
    RoutingRule,
    Study,
    TransferRequest,
    Unavailable,
    now_iso,
)
from .keyed import Keyed

log = logging.getLogger("fiona.assign")

class Refused(ControlPlaneError):
    """A rule refused a request. The text is for the person who asked and may name their own
    input (a participant ID, the participant who has the study); `identifiers` lists those
    values, so that a log line can replace them with keyed references."""

    def __init__(self, message: str, *identifiers: str):
        super().__init__(message)
        self.identifiers = identifiers


@dataclass
class Arrival:
    """An arrived study with the clear identifiers that matching needs (never stored)."""

    study: Study
    patient_id: str = ""
    patient_name: str = ""

    @property
    def identifiers(self) -> tuple[str, str, str]:
        """What a log line about this study must not show."""
        return (self.patient_id, self.patient_name, self.study.accession)


@dataclass
class LineReport:
    line: int
    status: str          # accepted, conflict, refused, bad participant ID, unknown project, ...
    detail: str = ""


@dataclass
class CouplingReport:
    lines: list[LineReport] = field(default_factory=list)
    requests: list[TransferRequest] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(1 for x in self.lines if x.status == "accepted")


COUPLING_HEADER = ["AccessionNumber", "ProjectName", "subjectid", "eventname"]


class Assigner:
    """Applies assignment rules on a control plane; `clock` says what "now" and "today" are."""

    def __init__(self, control: ControlPlane, keyed: Keyed, clock: Clock = SYSTEM_CLOCK):
        self.control = control
        self.keyed = keyed
        self.clock = clock

    # --- the rules every request obeys ---------------------------------------------------------
    def check_open(self, project: Project) -> None:
        """Refuse a project that is inactive or outside its ethics approval period on the
        clock's today (the rule is `Project.approval_problem`)."""
        problem = project.approval_problem(self.clock.now().date())
        if problem:
            raise Refused(f"{problem}; it takes no new studies")

    def existing(self, study_uid: str, project: str, participant: str,
                 event: str) -> TransferRequest | None:
        """The same request if it exists; Refused if the study is requested in the project
        for another participant or event (its de-identified copy would be overwritten)."""
        for req in self.control.requests(study_uid):
            if req.project == project:
                self._check_same(req, participant, event)
                return req
        return None

    @staticmethod
    def _check_same(req: TransferRequest, participant: str, event: str) -> None:
        if (req.participant, req.event) != (participant, event):
            raise Refused(
                f"study {req.study_uid} is already assigned in project {req.project} to "
                f"participant {req.participant} (event {req.event}); a second assignment would "
                f"get the same de-identified study and overwrite it at the destination. An "
                f"administrator can move the study to another participant (reassign).",
                req.participant)

    def checked(self, project: str, participant: str, event: str) -> Project:
        """The project, when (participant, event) may be assigned to it now: open, naming rule,
        known event; else Refused/ControlPlaneError saying why (the confirm page asks first)."""
        proj = self.control.project(project)
        self.check_open(proj)
        try:
            proj.check_participant(participant)
        except ControlPlaneError as exc:
            raise Refused(str(exc), participant) from None
        proj.check_event(event)
        return proj

    # --- requests ---------------------------------------------------------------------------
    def request(self, study_uid: str, project: str, participant: str, event: str,
                source: str) -> TransferRequest | None:
        """Make a request unless the same one exists; Refused (a ControlPlaneError) when a
        rule forbids it. Returns the new request, or None when it existed already."""
        self.checked(project, participant, event)
        if self.existing(study_uid, project, participant, event):
            return None
        self.control.add_participant(project, participant)
        req = self.control.add_request(TransferRequest(
            study_uid, project, participant, event, requested=now_iso(self.clock),
            source=source))
        self._check_same(req, participant, event)  # another process may have been first
        log.info("study %s: request #%d for %s, event %s (%s)", study_uid, req.instance, project,
                 event, source)
        return req

    def reassign(self, study_uid: str, project: str, participant: str,
                 event: str | None = None) -> TransferRequest:
        """An administrator's move: the study's request in `project` gets another participant
        (and event, if given) and is raised to be sent again, so the de-identified study is
        replaced at the destination under the new participant."""
        mine = [r for r in self.control.requests(study_uid) if r.project == project]
        if not mine:
            raise ControlPlaneError(f"study {study_uid} has no request in project {project}; "
                                    f"assign it instead")
        if len(mine) > 1:
            raise ControlPlaneError(f"study {study_uid} has {len(mine)} requests in project "
                                    f"{project}; resolve them in the control plane first")
        [req] = mine
        event = event or req.event
        self.checked(project, participant, event)
        if (req.participant, req.event) == (participant, event):
            return req
        self.control.add_participant(project, participant)
        req = self.control.reassign_request(req, participant, event, now_iso(self.clock))
        log.info("study %s: request #%d of %s moved to another participant (event %s); it "
                 "will be sent again", study_uid, req.instance, project, event)
        return req

    def resend(self, project: str, study_uid: str | None = None) -> int:
        """Ask again for every transferred request of a project (or one study)."""
        count = 0
        for req in self.control.requests(study_uid):
            if req.project == project and req.transferred and not req.pending:
                self._raise(req)
                count += 1
        return count

    def _raise(self, req: TransferRequest, source: str | None = None) -> TransferRequest:
        """Ask for a request again (it is pending until the forwarder completes it)."""
        return self.control.request_again(req, source, now_iso(self.clock))

    # --- arrival ------------------------------------------------------------------------------
    def on_arrival(self, arrival: Arrival, amendment: bool) -> list[TransferRequest]:
        """Every automatic rule for a study that has (again) arrived."""
        made: list[TransferRequest] = []
        if amendment:
            made += self._follow_up(arrival.study.uid)
        made += self._coupling_for(arrival.study, self.control.coupling_rows(), arrival)
        made += self._routing(arrival)
        made += self._autoid(arrival)
        return made

    def expected(self, arrival: Arrival) -> list[tuple[str, str, str]]:
        """The (project, participant, event) of each request `on_arrival` would make or ask
        for again now, by the same rules, writing nothing: an earlier request (a late
        series), a coupling-list row, a routing rule. Auto-ID is left out: it may have to
        create a participant ID. The forwarder de-identifies these ahead of the arrival."""
        study = arrival.study
        wanted = [(r.project, r.participant, r.event) for r in self.control.requests(study.uid)]
        wanted += [(row.project, row.participant, row.event)
                   for row in self.control.coupling_rows() if self._matches(row, study)]
        wanted += [(rule.project, pseudonym, rule.event)
                   for rule, pseudonym in self._routes(arrival)]
        expected = []
        for project, participant, event in dict.fromkeys(wanted):
            try:
                self.checked(project, participant, event)
            except ControlPlaneError:
                continue
            expected.append((project, participant, event))
        return expected

    def _follow_up(self, study_uid: str) -> list[TransferRequest]:
        """A late series: requests already sent are asked for again (same project,
        participant and event, hence the same de-identified study), unless the project has
        closed since."""
        bumped = []
        for req in self.control.requests(study_uid):
            if req.transferred and not req.pending:
                try:
                    self.check_open(self.control.project(req.project))
                except ControlPlaneError as exc:
                    log.error("study %s: late series not sent to project %s: %s", study_uid,
                              req.project, exc)
                    continue
                bumped.append(self._raise(req, "amendment"))
        return bumped

    def _try(self, study: Study, project: str, participant: str, event: str, source: str,
             identifiers: tuple[str, ...] = ()) -> list[TransferRequest]:
        """An automatic rule's request; a refusal is logged, never raised. An unreachable
        control plane is raised: the caller tries the study's rules again later (swallowed,
        the study would be done with and never get its request)."""
        try:
            req = self.request(study.uid, project, participant, event, source)
        except Unavailable:
            raise
        except ControlPlaneError as exc:
            self._log_refusal(study, source, project, exc, (participant, *identifiers))
            return []
        return [req] if req else []

    def _log_refusal(self, study: Study, source: str, project: str, exc: ControlPlaneError,
                     identifiers: tuple[str, ...]) -> None:
        """Log why a rule made no request, every identifier replaced by its keyed reference."""
        hidden = (*identifiers, study.accession, *getattr(exc, "identifiers", ()))
        log.error("study %s: %s rule for project %s not applied: %s", study.uid, source,
                  project, self.keyed.redact(str(exc), *hidden))

    # --- coupling lists -------------------------------------------------------------------------
    @staticmethod
    def _matches(row: CouplingRow, study: Study) -> bool:
        return bool((row.accession and row.accession == study.accession) or
                    (row.study_uid and row.study_uid == study.uid))

    def _coupling_for(self, study: Study, rows: list[CouplingRow],
                      arrival: Arrival | None = None) -> list[TransferRequest]:
        made = []
        identifiers = arrival.identifiers if arrival else ()
        for row in rows:
            if self._matches(row, study):
                made += self._try(study, row.project, row.participant, row.event, "coupling",
                                  identifiers)
        return made

    def apply_coupling(self, rows: list[CouplingRow]) -> list[TransferRequest]:
        """Rows that arrive after their study: match them against the known studies."""
        made = []
        for study in self.control.studies(include_hidden=True):
            made += self._coupling_for(study, rows)
        return made

    def upload_coupling(self, text: str) -> CouplingReport:
        """A coupling-list CSV (`AccessionNumber,ProjectName,subjectid,eventname`): each line
        checked and reported; rows that disagree about an accession number (two participants,
        within the file or against stored rows) are all refused, naming their lines, and so is
        a row whose study is already assigned in the project to another participant."""
        report = CouplingReport()
        known = {p.name: p for p in self.control.projects()}
        stored = {r.accession: r for r in self.control.coupling_rows() if r.accession}
        parsed: list[tuple[int, CouplingRow]] = []
        for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not any(f.strip() for f in fields):
                continue
            if number == 1 and [f.strip() for f in fields[:4]] == COUPLING_HEADER:
                continue
            row = self._coupling_row(number, fields, known, report)
            if row is not None:
                parsed.append((number, row))
        by_accession: dict[str, list[tuple[int, CouplingRow]]] = {}
        for number, row in parsed:
            by_accession.setdefault(row.accession, []).append((number, row))
        studies = self.control.studies(include_hidden=True)
        accepted: list[CouplingRow] = []
        for accession, lines in by_accession.items():
            owners = {(r.project, r.participant) for _, r in lines}
            if accession in stored:
                owners.add((stored[accession].project, stored[accession].participant))
            if len(owners) > 1:
                numbers = ", ".join(str(n) for n, _ in lines)
                detail = (f"accession {accession} names {len(owners)} participants "
                          f"(lines {numbers}" + (", and an earlier upload)" if accession in stored
                                                 else ")"))
                report.lines += [LineReport(n, "conflict", detail) for n, _ in lines]
                continue
            for i, (number, row) in enumerate(lines):
                if i or accession in stored:
                    report.lines.append(LineReport(number, "duplicate", "already listed"))
                    continue
                try:
                    for study in studies:
                        if self._matches(row, study):
                            self.existing(study.uid, row.project, row.participant, row.event)
                except Unavailable:
                    raise
                except ControlPlaneError as exc:
                    report.lines.append(LineReport(number, "refused", str(exc)))
                    continue
                accepted.append(row)
                report.lines.append(LineReport(number, "accepted"))
        report.lines.sort(key=lambda x: x.line)
        stamp = now_iso(self.clock)
        for row in accepted:
            row.added = stamp
        if accepted:
            self.control.add_coupling_rows(accepted)
            report.requests = self.apply_coupling(accepted)
        return report

    def _coupling_row(self, number: int, fields: list[str], known: dict[str, Project],
                      report: CouplingReport) -> CouplingRow | None:
        if len(fields) < 4:
            report.lines.append(LineReport(number, "malformed", (
                f"expected {','.join(COUPLING_HEADER)}, got {len(fields)} fields")))
            return None
        accession, project, participant, event = (f.strip() for f in fields[:4])
        if not accession:
            report.lines.append(LineReport(number, "malformed", "no accession number"))
            return None
        proj = known.get(project)
        if proj is None:
            report.lines.append(LineReport(number, "unknown project", project))
            return None
        try:
            self.check_open(proj)
        except ControlPlaneError as exc:
            report.lines.append(LineReport(number, "refused", str(exc)))
            return None
        try:
            proj.check_participant(participant)
            proj.check_event(event)
        except ControlPlaneError as exc:
            status = "bad participant ID" if "participant" in str(exc) else "bad event"
            report.lines.append(LineReport(number, status, str(exc)))
            return None
        return CouplingRow(accession=accession, project=project, participant=participant,
                           event=event)

    # --- routing rules --------------------------------------------------------------------------
    def _routing(self, arrival: Arrival) -> list[TransferRequest]:
        made = []
        for rule, pseudonym in self._routes(arrival):
            made += self._try(arrival.study, rule.project, pseudonym, rule.event, "routing",
                              arrival.identifiers)
        return made

    def _routes(self, arrival: Arrival) -> list[tuple[RoutingRule, str]]:
        """The active routing rules that match the study, each with the participant ID it
        takes from the study (its PatientID, else its PatientName)."""
        study = arrival.study
        routes = []
        for rule in self.control.routing_rules():
            if not rule.active:
                continue
            if rule.called_ae and rule.called_ae != study.called_ae:
                continue
            if rule.calling_ae and rule.calling_ae != study.calling_ae:
                continue
            by_id = bool(rule.patient_id_regex and
                         re.fullmatch(rule.patient_id_regex, arrival.patient_id))
            by_name = bool(rule.patient_name_regex and
                           re.fullmatch(rule.patient_name_regex, arrival.patient_name))
            if by_id or by_name:
                routes.append((rule, arrival.patient_id if by_id else arrival.patient_name))
        return routes

    # --- auto-ID --------------------------------------------------------------------------------
    def _autoid(self, arrival: Arrival) -> list[TransferRequest]:
        study = arrival.study
        made = []
        for proj in self.control.projects():
            if not (proj.use_autoid and proj.autoid_aetitle and
                    proj.autoid_aetitle == study.called_ae):
                continue
            try:
                self.check_open(proj)
                participant = self._autoid_participant(proj, arrival.patient_id)
            except Unavailable:
                raise
            except ControlPlaneError as exc:
                self._log_refusal(study, "autoid", proj.name, exc, arrival.identifiers)
                continue
            made += self._try(study, proj.name, participant, proj.events[0], "autoid",
                              arrival.identifiers)
        return made

    def _autoid_participant(self, proj: Project, patient_id: str) -> str:
        """The participant ID already given to this patient in the project, else a new one."""
        if not patient_id:
            raise ControlPlaneError("auto-ID needs a PatientID, the study has none")
        patient = self.keyed.autoid(proj.name, patient_id)
        participant = self.control.autoid(proj.name, patient)
        if participant is None:
            participant = self._new_id(proj)
            self.control.save_autoid(proj.name, patient, participant, "random")
        return participant

    def _new_id(self, proj: Project, attempts: int = 1000) -> str:
        """A random participant ID that matches the project's naming rule and is unused."""
        used = self.control.autoid_values(proj.name) | set(self.control.participants(proj.name))
        for _ in range(attempts):
            candidate = rstr.xeger(proj.naming)
            if re.fullmatch(proj.naming, candidate) and candidate not in used:
                return candidate
        raise ControlPlaneError(f"cannot make an unused participant ID for {proj.name} from "
                                f"its naming rule {proj.naming}; widen the rule")
