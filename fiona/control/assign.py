"""How studies get transfer requests (SPEC §6), once for every control-plane backend.

Four ways: a person (`assign`), a coupling-list row, a routing rule, auto-ID; and an
amendment (a series arriving after its study was requested) asks for the request again, so
the late series joins the same de-identified study. The same (study, project, participant,
event) never makes two requests. Clear patient identifiers are used here, in memory, for
matching only; what is stored is keyed.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field

import rstr

from .base import (ControlPlane, ControlPlaneError, CouplingRow, Project, Study,
                   TransferRequest, now_iso)
from .keyed import Keyed

log = logging.getLogger("fiona.assign")


@dataclass
class Arrival:
    """An arrived study with the clear identifiers that matching needs (never stored)."""

    study: Study
    patient_id: str = ""
    patient_name: str = ""


@dataclass
class LineReport:
    line: int
    status: str          # accepted, conflict, bad participant ID, unknown project, ...
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
    """Applies assignment rules on a control plane."""

    def __init__(self, control: ControlPlane, keyed: Keyed):
        self.control = control
        self.keyed = keyed

    # --- requests ---------------------------------------------------------------------------
    def request(self, study_uid: str, project: str, participant: str, event: str,
                source: str) -> TransferRequest | None:
        """Make a request unless the same one exists; checks participant and event.

        Returns the new request, or None when it existed already."""
        proj = self.control.project(project)
        proj.check_participant(participant)
        proj.check_event(event)
        for existing in self.control.requests(study_uid):
            if existing.key() == (study_uid, project, participant, event):
                return None
        self.control.add_participant(project, participant)
        req = self.control.add_request(TransferRequest(study_uid, project, participant, event,
                                                       requested=now_iso(), source=source))
        log.info("study %s: request %s/%s/%s (%s)", study_uid, project, participant, event,
                 source)
        return req

    def resend(self, project: str, study_uid: str | None = None) -> int:
        """Ask again for every transferred request of a project (or one study)."""
        count = 0
        for req in self.control.requests(study_uid):
            if req.project == project and req.transferred and not req.pending:
                req.requested = now_iso()
                req.complete = False
                self.control.update_request(req)
                count += 1
        return count

    # --- arrival ------------------------------------------------------------------------------
    def on_arrival(self, arrival: Arrival, amendment: bool) -> list[TransferRequest]:
        """Every automatic rule for a study that has (again) arrived."""
        made: list[TransferRequest] = []
        if amendment:
            made += self._follow_up(arrival.study.uid)
        made += self._coupling_for(arrival.study, self.control.coupling_rows())
        made += self._routing(arrival)
        made += self._autoid(arrival)
        return made

    def _follow_up(self, study_uid: str) -> list[TransferRequest]:
        """A late series: requests already sent are asked for again (same project,
        participant and event, hence the same de-identified study)."""
        bumped = []
        for req in self.control.requests(study_uid):
            if req.transferred and not req.pending:
                req.requested = now_iso()
                req.complete = False
                req.source = "amendment"
                self.control.update_request(req)
                bumped.append(req)
        return bumped

    def _try(self, study: Study, project: str, participant: str, event: str,
             source: str) -> list[TransferRequest]:
        try:
            req = self.request(study.uid, project, participant, event, source)
        except ControlPlaneError as exc:
            log.error("study %s: %s rule not applied: %s", study.uid, source, exc)
            return []
        return [req] if req else []

    # --- coupling lists -------------------------------------------------------------------------
    @staticmethod
    def _matches(row: CouplingRow, study: Study) -> bool:
        return bool((row.accession and row.accession == study.accession) or
                    (row.study_uid and row.study_uid == study.uid))

    def _coupling_for(self, study: Study, rows: list[CouplingRow]) -> list[TransferRequest]:
        made = []
        for row in rows:
            if self._matches(row, study):
                made += self._try(study, row.project, row.participant, row.event, "coupling")
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
        within the file or against stored rows) are all refused, naming their lines."""
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
                else:
                    accepted.append(row)
                    report.lines.append(LineReport(number, "accepted"))
        report.lines.sort(key=lambda x: x.line)
        stamp = now_iso()
        for row in accepted:
            row.added = stamp
        if accepted:
            self.control.add_coupling_rows(accepted)
            report.requests = self.apply_coupling(accepted)
        return report

    @staticmethod
    def _coupling_row(number: int, fields: list[str], known: dict[str, Project],
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
        study = arrival.study
        made = []
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
            if not (by_id or by_name):
                continue
            pseudonym = arrival.patient_id if by_id else arrival.patient_name
            made += self._try(study, rule.project, pseudonym, rule.event, "routing")
        return made

    # --- auto-ID --------------------------------------------------------------------------------
    def _autoid(self, arrival: Arrival) -> list[TransferRequest]:
        study = arrival.study
        made = []
        for proj in self.control.projects():
            if not (proj.use_autoid and proj.active and proj.autoid_aetitle and
                    proj.autoid_aetitle == study.called_ae):
                continue
            if not arrival.patient_id:
                log.error("study %s: auto-ID for %s needs a PatientID, the study has none",
                          study.uid, proj.name)
                continue
            patient = self.keyed.autoid(proj.name, arrival.patient_id)
            participant = self.control.autoid(proj.name, patient)
            if participant is None:
                participant = self._new_id(proj)
                self.control.save_autoid(proj.name, patient, participant, "random")
            made += self._try(study, proj.name, participant, proj.events[0], "autoid")
        return made

    def _new_id(self, proj: Project, attempts: int = 1000) -> str:
        """A random participant ID that matches the project's naming rule and is unused."""
        used = self.control.autoid_values(proj.name) | set(self.control.participants(proj.name))
        for _ in range(attempts):
            candidate = rstr.xeger(proj.naming)
            if re.fullmatch(proj.naming, candidate) and candidate not in used:
                return candidate
        raise ControlPlaneError(f"cannot make an unused participant ID for {proj.name} from "
                                f"its naming rule {proj.naming}; widen the rule")
