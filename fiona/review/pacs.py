"""The research PACS as Review reads it: which studies it holds for a project (C-FIND), how
many instances each series has, and the headers of chosen instances (C-GET).

A de-identified study carries its project in InstitutionName: the engine writes
InstitutionName := project (SPEC §7 step 2, `fiona.deid.engine`), so a STUDY-level C-FIND on
it lists what the PACS holds for the project. C-FIND has no escape for its wildcards, so a
project name with `*`, `?` or `\\` cannot be matched exactly and is refused; answers are also
compared with the name exactly, as a PACS may match case-insensitively.

Everything is bounded for a web page: one connection attempt and short DIMSE timeouts (a PACS
that is down fails in seconds), and only the instances asked for are retrieved. C-GET proposes
the storage contexts of the instances' SOP classes (every transfer syntax pynetdicom knows, as
only the header is read) with SCP role selection, without which the PACS refuses the
sub-operations (0xA702). TCP_NODELAY is set on every association (`DicomDestination`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

from ..dicom_client import quiesce, release, status_text
from ..send.destinations import DestinationError, DestinationUnavailable, DicomDestination
from ..tree import InvalidValue, valid_uid

log = logging.getLogger(__name__)

PROJECT_ATTRIBUTE = "InstitutionName"
MAX_STORAGE_CONTEXTS = 127  # plus the C-GET context: 128 per association
_NOT_MATCHABLE = re.compile(r"[*?\\\x00-\x1f\x7f]")


class ReviewError(DestinationError):
    """Review cannot ask the PACS about this project; the text says why."""


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str
    sop_class: str
    number: int | None = None


def matchable(project: str) -> str:
    """`project` as a C-FIND matching value for InstitutionName (LO), or ReviewError."""
    if (not project or project != project.strip() or len(project) > 64
            or _NOT_MATCHABLE.search(project)):
        raise ReviewError(f"project name {project!r} cannot be looked up at the research PACS: "
                          f"it must be 1 to 64 characters without *, ?, backslash, control "
                          f"characters or surrounding spaces (C-FIND would read them as "
                          f"wildcards or cut them off)")
    return project


class ReviewPacs(DicomDestination):
    """A `dicom` destination's query side (query_aetitle, query_port), for Review."""

    connect_attempts = 1
    connection_timeout = 5.0
    acse_timeout = 10.0
    dimse_timeout = 30.0
    network_timeout = 30.0

    @property
    def label(self) -> str:
        return f"{self.query_aetitle}@{self.host}:{self.query_port}"

    @contextmanager
    def finding(self) -> Iterator:
        """An association for Study Root C-FIND, released at the end."""
        assoc = self._associate(self.query_aetitle, self.query_port, [build_context(FIND)])
        if assoc is None:
            raise DestinationError(f"the research PACS {self.label} does not accept Study Root "
                                   f"C-FIND")
        try:
            yield assoc
        finally:
            release(assoc)

    def studies(self, assoc, project: str) -> list[str]:
        """StudyInstanceUIDs of the studies the PACS holds for `project`."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        setattr(query, PROJECT_ATTRIBUTE, matchable(project))
        query.StudyInstanceUID = ""
        found: set[str] = set()
        for ident in self._find(assoc, query, FIND):
            if str(ident.get(PROJECT_ATTRIBUTE, "") or "").strip() != project:
                continue
            uid = _uid(ident.get("StudyInstanceUID"), "StudyInstanceUID")
            if uid:
                found.add(uid)
        return sorted(found)

    def series_counts(self, assoc, study: str) -> dict[str, int]:
        """SeriesInstanceUID -> number of instances, for one study (invalid UIDs left out)."""
        counts = self._series_counts(assoc, valid_uid(study, "StudyInstanceUID"))
        return {s: n for s, n in counts.items() if _uid(s, "SeriesInstanceUID")}

    def instances(self, assoc, study: str, series: str) -> list[Instance]:
        """The series' instances in InstanceNumber order (then SOPInstanceUID); instances
        without a valid SOP Instance or Class UID in the answer are left out."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = valid_uid(study, "StudyInstanceUID")
        query.SeriesInstanceUID = valid_uid(series, "SeriesInstanceUID")
        query.SOPInstanceUID = ""
        query.SOPClassUID = ""
        query.InstanceNumber = ""
        found: dict[str, Instance] = {}
        for ident in self._find(assoc, query, FIND):
            sop = _uid(ident.get("SOPInstanceUID"), "SOPInstanceUID")
            sop_class = _uid(ident.get("SOPClassUID"), "SOPClassUID")
            if sop and sop_class:
                found[sop] = Instance(study, series, sop, sop_class, _number(ident))
        return sorted(found.values(), key=lambda i: (i.number is None, i.number or 0, i.sop))

    def retrieve(self, wanted: list[Instance]) -> Iterator[tuple[Instance, Dataset]]:
        """C-GET each instance (IMAGE level) and yield it with its data set; an instance the
        PACS does not deliver is logged and skipped. Raises DestinationUnavailable when the
        association breaks."""
        classes = sorted({i.sop_class for i in wanted})
        for start in range(0, len(classes), MAX_STORAGE_CONTEXTS):
            chunk = set(classes[start:start + MAX_STORAGE_CONTEXTS])
            yield from self._retrieve([i for i in wanted if i.sop_class in chunk], chunk)

    def _retrieve(self, wanted: list[Instance], classes: set[str]
                  ) -> Iterator[tuple[Instance, Dataset]]:
        received: list[Dataset] = []

        def on_store(event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta  # the transfer syntax, for callers that save it
            received.append(ds)
            return 0x0000

        contexts = [build_context(GET)] + [build_context(c, ALL_TRANSFER_SYNTAXES)
                                             for c in sorted(classes)]
        roles = [build_role(c, scp_role=True) for c in sorted(classes)]
        assoc = self._associate(self.query_aetitle, self.query_port, contexts, roles,
                                [(evt.EVT_C_STORE, on_store)])
        if assoc is None:
            raise DestinationError(f"the research PACS {self.label} does not accept Study Root "
                                   f"C-GET")
        try:
            for inst in wanted:
                received.clear()
                self._get(assoc, inst)
                ds = next((d for d in received
                           if str(d.get("SOPInstanceUID", "")).strip() == inst.sop), None)
                if ds is None:
                    log.warning("review: %s did not deliver instance %s", self.label, inst.sop)
                    continue
                yield inst, ds
        finally:
            received.clear()
            release(assoc)

    def _get(self, assoc, inst: Instance) -> None:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = inst.study
        query.SeriesInstanceUID = inst.series
        query.SOPInstanceUID = inst.sop
        if not quiesce(assoc):
            raise DestinationUnavailable(f"the research PACS {self.label}: association lost")
        for status, _ident in assoc.send_c_get(query, GET):
            if "Status" not in status:
                raise DestinationUnavailable(f"the research PACS {self.label}: no C-GET "
                                             f"response (peer aborted or timed out)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                continue
            if code not in (0x0000, 0xB000):
                log.warning("review: C-GET of instance %s from %s failed with %s", inst.sop,
                            self.label, status_text(code, status))
            return


def _uid(value, what: str) -> str:
    """A UID from a PACS answer, or "" (logged) when it is not one: it may become a path."""
    try:
        return valid_uid(value, what)
    except InvalidValue as exc:
        log.warning("review: ignoring an answer from the research PACS: %s", exc)
        return ""


def _number(ident: Dataset) -> int | None:
    try:
        return int(ident.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None
