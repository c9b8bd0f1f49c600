"""`fiona inventory` (the original's getAllPatients, parseAllPatients, whatIsInIDS7 and
whatIsNotInIDS7): what the research PACS holds, one entry per study, in the control plane.

It asks the PACS of a `dicom` destination (its query AE title and port) by Study Root C-FIND:
STUDY level for the studies of one project (the de-identification writes the project into
InstitutionName, `fiona.review.pacs.PROJECT_ATTRIBUTE`, the participant into PatientID and the
event into ClinicalTrialTimePointID) or of every project, then SERIES level per study for the
series and instance counts and the modalities. The result replaces the stored inventory of
that scope (`ControlPlane.replace_inventory`), so a study the PACS lost leaves it; a study's
`first_seen` is kept from the stored entry. Nothing is replaced unless every query was
answered completely: a PACS that is down, refuses or fails a query leaves the stored
inventory as it was and the job exits 1 with the reason.

Result limits. A PACS may cut an answer off: Orthanc with `LimitFindResults: N` returns up
to N pending results and the final status 0xFE00 (cancel); others answer 0xA700 (out of
resources), or stop at a number they do not announce (`--limit N`: an answer with N or more
results counts as cut off). Orthanc may even return fewer than N results with 0xFE00 (it
limits its candidates before matching case-sensitively), so only the status, never the number
of results, tells. A cut-off query is split by PatientID wildcard, last character first:
`*0`...`*9`, `*A`...`*Z`, `*a`...`*z` and the other printable ASCII characters, plus any other
character seen at that position in an answer, but never `*`, `?` or `\\` (C-FIND cannot match
them literally) nor `%` or `_` (Orthanc takes them for wildcards when it selects candidates,
so their parts would be cut off as often as their parent). A part that is cut off again is
split on the character before (`*00`...), and the PatientID that equals the suffix is asked
for exactly. Every PatientID whose characters at the positions the splitting reaches are
among those ends in exactly one part, so the parts cover what the cut-off query covered;
studies found twice (a PACS that matches case-insensitively) count once, and every study any
answer listed is kept.

What this cannot reach, written down rather than guessed: a study without PatientID (C-FIND
cannot ask for an empty value; the job warns), and one whose PatientID has, at a position the
splitting reaches, a character it cannot ask for that no answer showed (such a study is
missed). When a cut-off answer does show one there (`_` in `SITE_01`, say), and when one
PatientID has more studies than the PACS answers at once, the job stops: better the stored
inventory than an incomplete one; raise the PACS's result limit. FIONA's pseudonyms follow
each project's naming rule; the splitting reaches only as far as needed to bring each part
under the limit, usually a few digits.

One association for the whole run, with TCP_NODELAY (each C-FIND otherwise waits ~40 ms for
a delayed ACK) and pynetdicom's reactor paused safely before each request
(`fiona.dicom_client.quiesce`: without it the first pending answer can be lost, and a
study would silently leave the inventory). Progress goes to a terminal; the log gets one line
per run with counts, never a PatientID.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from ..clock import SYSTEM_CLOCK, Clock
from ..config import ConfigError
from ..control.base import ControlPlane, InventoryEntry, now_iso
from ..dicom_client import Timeouts, answers, open_session, quiesce
from ..review.pacs import PROJECT_ATTRIBUTE, matchable
from ..send.destinations import CALLING_AE, DestinationError, DicomDestination
from ..tree import InvalidValue, valid_uid

log = logging.getLogger("fiona.inventory")

#: where the de-identification writes the event (`fiona.deid.engine`, project values)
EVENT_ATTRIBUTE = "ClinicalTrialTimePointID"
#: final C-FIND statuses that mean "there is more than I answered"
CUT_OFF = {0xFE00: "cancel (result limit)", 0xA700: "out of resources"}
#: characters never put into a matching value: C-FIND's wildcards, the value delimiter, and
#: `%` and `_`, which Orthanc treats as wildcards when it selects candidates, so that a part
#: with them is cut off as often as its parent and never gets smaller
UNMATCHABLE = "*?\\%_"
#: characters a split tries at each position: printable ASCII but those
ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in UNMATCHABLE)
MAX_PATIENT_ID = 64  # LO

Progress = Callable[[str], None]


class InventoryError(Exception):
    """The inventory could not be completed; the text says why (no identifiers in it)."""


@dataclass(frozen=True)
class Pattern:
    """A PatientID constraint: IDs ending in `suffix` (`*suffix`), or exactly `suffix`."""

    suffix: str = ""
    exact: bool = False

    @property
    def value(self) -> str:
        """The C-FIND matching value; "" (universal matching) for the unsplit query."""
        if self.exact or not self.suffix:
            return self.suffix
        return "*" + self.suffix

    def split(self, seen: set[str]) -> list[Pattern]:
        """The parts that together match what this pattern matches (see the module doc)."""
        if self.exact:
            raise InventoryError("one PatientID has more studies than the research PACS "
                                 "answers at once; raise its result limit")
        if len(self.suffix) >= MAX_PATIENT_ID:
            raise InventoryError(f"the research PACS cuts answers off even for PatientIDs "
                                 f"split {MAX_PATIENT_ID} characters deep")
        blocked = "".join(sorted(seen & set(UNMATCHABLE)))
        if blocked:
            raise InventoryError(f"the research PACS cut off an answer that lists PatientIDs "
                                 f"with {blocked!r} where the split would have to ask for that "
                                 f"character, which C-FIND (or Orthanc) cannot match exactly; "
                                 f"raise the PACS's result limit")
        chars = ALPHABET + (" " if self.suffix else "")  # trailing spaces are padding
        chars += "".join(sorted(seen - set(chars)))
        parts = [Pattern(c + self.suffix) for c in chars]
        return parts + ([Pattern(self.suffix, exact=True)] if self.suffix else [])

    def next_char(self, patient_id: str) -> str | None:
        """The character of `patient_id` this pattern's split would try, if it matches."""
        if len(patient_id) > len(self.suffix) and patient_id.endswith(self.suffix):
            return patient_id[-len(self.suffix) - 1]
        return None


@dataclass
class Report:
    """What a run found and changed, for the terminal and the log line."""

    scope: str
    pacs: str
    studies: int = 0
    new: int = 0
    gone: int = 0
    queries: int = 0
    splits: int = 0
    without_patient_id: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"inventory of {self.scope} at {self.pacs}: {self.studies} studies "
                f"({self.new} new, {self.gone} gone), {self.queries} C-FIND queries "
                f"({self.splits} split), {self.seconds:.1f} s")


class ResearchPacs:
    """The query side of a `dicom` destination: C-FIND over one association."""

    connection_timeout = 10.0
    acse_timeout = 30.0
    dimse_timeout = 60.0
    network_timeout = 120.0

    def __init__(self, name: str, settings: dict[str, Any], limit: int | None = None):
        try:  # the destination's own validation of its settings (one rule)
            dest = DicomDestination(name, {k: v for k, v in settings.items() if k != "type"})
        except DestinationError as exc:
            raise ConfigError([str(exc)]) from None
        self.name = name
        self.host, self.port, self.aetitle = dest.host, dest.query_port, dest.query_aetitle
        self.limit = limit
        self.queries = 0
        self._assoc: Any = None

    @property
    def label(self) -> str:
        return f"{self.aetitle}@{self.host}:{self.port}"

    @contextmanager
    def session(self) -> Iterator[ResearchPacs]:
        """One association for Study Root C-FIND, released (or aborted) at the end."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        timeouts = Timeouts(self.connection_timeout, self.acse_timeout, self.dimse_timeout,
                            self.network_timeout)
        with open_session(CALLING_AE, self.host, self.port, self.aetitle, [FIND],
                          "Study Root C-FIND", timeouts, self._failed) as assoc:
            self._assoc = assoc
            try:
                yield self
            finally:
                self._assoc = None

    def _failed(self, why: str) -> InventoryError:
        return InventoryError(f"the research PACS {self.label} {why}")

    def find(self, query: Dataset) -> tuple[list[Dataset], bool]:
        """The answers to one C-FIND and whether they are complete."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        self.queries += 1
        if not quiesce(self._assoc):
            raise InventoryError(f"the research PACS {self.label} closed the association")
        found, code, status = answers(self._assoc.send_c_find(query, FIND), "C-FIND",
                                      self._failed)
        if code == 0x0000:
            return found, self.limit is None or len(found) < self.limit
        if code in CUT_OFF:
            return found, False
        raise InventoryError(f"the research PACS {self.label} failed a C-FIND with status "
                             f"0x{code:04X} ({str(status.get('ErrorComment', '') or '')})")


class Inventory:
    """One inventory run: ask the PACS, then replace the stored inventory of the scope."""

    def __init__(self, pacs: ResearchPacs, control: ControlPlane, clock: Clock = SYSTEM_CLOCK,
                 progress: Progress | None = None):
        self.pacs = pacs
        self.control = control
        self.clock = clock
        self.progress = progress or (lambda _text: None)

    def run(self, project: str | None = None) -> Report:
        """Raises InventoryError or ControlPlaneError with the stored inventory unchanged."""
        started = time.monotonic()
        if project is not None:
            try:
                matchable(project)  # no wildcard in the name
            except DestinationError as exc:
                raise InventoryError(str(exc)) from None
        report = Report(scope=f"project {project}" if project else "every project",
                        pacs=self.pacs.label)
        old = {e.study_uid: e for e in self.control.inventory(project)}
        with self.pacs.session():
            studies = self._studies(project, report)
            entries = []
            for n, (uid, ident) in enumerate(sorted(studies.items()), 1):
                self.progress(f"{len(studies)} studies found; series of {n}/{len(studies)}")
                entries.append(self._entry(uid, ident))
        seen = now_iso(self.clock)
        delivered_by = {r.mapped_uid: r.node for r in self.control.requests() if r.mapped_uid}
        for e in entries:
            e.first_seen = old[e.study_uid].first_seen if e.study_uid in old else seen
            e.last_seen = seen
            e.node = delivered_by.get(e.study_uid, "")  # "": delivered otherwise
        self.control.replace_inventory(project, entries)
        report.studies = len(entries)
        report.new = len({e.study_uid for e in entries} - set(old))
        report.gone = len(set(old) - {e.study_uid for e in entries})
        report.queries = self.pacs.queries
        report.seconds = time.monotonic() - started
        return report

    def _studies(self, project: str | None, report: Report) -> dict[str, Dataset]:
        """StudyInstanceUID -> the STUDY-level answer, every study of the scope once."""
        found: dict[str, Dataset] = {}
        no_patient_id: set[str] = set()
        todo = [Pattern()]
        while todo:
            pattern = todo.pop()
            answers, complete = self.pacs.find(_study_query(project, pattern))
            seen: set[str] = set()
            for ident in answers:
                uid = _uid(ident.get("StudyInstanceUID"), "StudyInstanceUID")
                if not uid or (project is not None and _text(ident, PROJECT_ATTRIBUTE) != project):
                    continue
                patient_id = _text(ident, "PatientID")
                if not patient_id:
                    no_patient_id.add(uid)
                char = pattern.next_char(patient_id)
                if char:
                    seen.add(char)
                found[uid] = ident
            if not complete:
                report.splits += 1
                todo.extend(reversed(pattern.split(seen)))
            self.progress(f"{self.pacs.queries} queries, {len(found)} studies found")
        if no_patient_id and report.splits:
            report.without_patient_id = len(no_patient_id)
            log.warning("inventory: the research PACS holds studies without PatientID and cut "
                        "its answer off: such studies are found only as far as its first "
                        "answer lists them (%d)", len(no_patient_id))
        return found

    def _entry(self, uid: str, study: Dataset) -> InventoryEntry:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""
        answers, complete = self.pacs.find(query)
        counts: dict[str, int] = {}
        modalities: set[str] = set()
        for ident in answers:
            series = _uid(ident.get("SeriesInstanceUID"), "SeriesInstanceUID")
            number = _count(ident.get("NumberOfSeriesRelatedInstances"))
            if not series or number is None:  # the study-level figures then
                complete = False
                continue
            counts[series] = number
            modalities.update(_values(ident, "Modality"))
        if complete:
            figures = (len(counts), sum(counts.values()), sorted(modalities))
        else:
            figures = self._study_figures(uid, study)
        return InventoryEntry(
            study_uid=uid, project=_text(study, PROJECT_ATTRIBUTE),
            participant=_text(study, "PatientID"), event=_text(study, EVENT_ATTRIBUTE),
            study_date=_date(_text(study, "StudyDate")), series=figures[0],
            instances=figures[1], modalities=figures[2])

    def _study_figures(self, uid: str, study: Dataset) -> tuple[int, int, list[str]]:
        """Series, instances and modalities from the STUDY-level answer, for a study whose
        series list the PACS cut off or gave without instance counts."""
        n_series = _count(study.get("NumberOfStudyRelatedSeries"))
        n_instances = _count(study.get("NumberOfStudyRelatedInstances"))
        if n_series is None or n_instances is None:
            raise InventoryError(f"the research PACS {self.pacs.label} gives neither a complete "
                                 f"series list nor study-level counts for study {uid}")
        return n_series, n_instances, sorted(set(_values(study, "ModalitiesInStudy")))


def _study_query(project: str | None, pattern: Pattern) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    setattr(query, PROJECT_ATTRIBUTE, project or "")
    query.PatientID = pattern.value
    if not (pattern.value + (project or "")).isascii():
        query.SpecificCharacterSet = "ISO_IR 192"
    query.StudyInstanceUID = ""
    query.StudyDate = ""
    setattr(query, EVENT_ATTRIBUTE, "")
    query.ModalitiesInStudy = ""
    query.NumberOfStudyRelatedSeries = ""
    query.NumberOfStudyRelatedInstances = ""
    return query


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _count(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _date(value: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD, or "" when it is not a date."""
    try:
        return datetime.strptime(value, "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def _uid(value: Any, what: str) -> str:
    """A UID from the PACS's answer, or "" (logged, without the value, which may be anything)
    when it is not one."""
    try:
        return valid_uid(value, what)
    except InvalidValue:
        log.warning("inventory: ignoring an answer from the research PACS with an invalid %s",
                    what)
        return ""
