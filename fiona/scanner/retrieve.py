"""Retrieve studies by accession number (`fiona retrieve`; the coupling report's button).

A research coordinator has a coupling list of older exams; rather than asking the radiographers
to push each one, FIONA asks the clinical PACS (CLINICAL_PACS, else the scanner's
SCANNERAETITLE@SCANNERIP:SCANNERPORT) itself: Study Root C-FIND at STUDY level by
AccessionNumber, then C-MOVE of each study found to FIONA's own AE title (DICOMAETITLE), so the
images arrive through the receiver like any others and are indexed, assigned and forwarded as
usual. The peer must know FIONA's AE title as a move destination.

An accession whose study FIONA has already received (the control plane's incoming studies,
matched by accession number, and by StudyInstanceUID for what the C-FIND found) is not moved
again. Each line gets its own outcome: received already, moved N images, not found, refused
(the PACS said no), failed (no answer, timeout). A PACS that is down fails every line; nothing
here raises for a peer's behaviour.

One association for the run, with TCP_NODELAY and pynetdicom's reactor paused before each
request (`fiona.dicom_client.quiesce`), as `fiona inventory` does. Log lines name
accession numbers only by keyed reference (`Keyed.ref`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from ..config import Config, ConfigError
from ..control.keyed import Keyed
from ..dicom_client import Timeouts, answers, open_session, quiesce
from ..tree import InvalidValue, valid_uid

log = logging.getLogger("fiona.retrieve")

#: an AccessionNumber (SH) that C-FIND matches literally: no wildcards, no delimiter
ACCESSION = re.compile(r"^[^*?\\\x00-\x1f]{1,16}$")
#: final C-MOVE statuses that mean the PACS would not (rather than could not) move
REFUSED = {0xA801: "move destination unknown: declare FIONA's AE title at the PACS",
           0x0122: "SOP class not supported", 0x0124: "not authorized"}

Progress = Callable[[str], None]


class PeerError(Exception):
    """The peer cannot be used for this request; the text says why (no identifiers)."""


@dataclass(frozen=True)
class Peer:
    """The DICOM node that holds the clinical studies."""

    aetitle: str
    host: str
    port: int

    @property
    def label(self) -> str:
        return f"{self.aetitle}@{self.host}:{self.port}"

    @classmethod
    def from_config(cls, config: Config) -> Peer:
        """CLINICAL_PACS if configured, else the scanner; ConfigError if neither is."""
        if config.clinical_pacs:
            p = config.clinical_pacs
            return cls(p["aetitle"], p["host"], p["port"])
        s = config.scanner
        if {"SCANNERAETITLE", "SCANNERIP", "SCANNERPORT"} <= set(s):
            return cls(s["SCANNERAETITLE"], s["SCANNERIP"], s["SCANNERPORT"])
        raise ConfigError(["fiona retrieve needs a peer to ask: CLINICAL_PACS {aetitle, host, "
                           "port}, or SCANNERAETITLE, SCANNERIP and SCANNERPORT"], config.path)


@dataclass
class Line:
    """One accession's outcome."""

    accession: str
    status: str = ""          # received already, moved, not found, refused, failed, invalid
    images: int = 0
    failed_images: int = 0
    studies: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "received already" or (self.status == "moved" and
                                                      not self.failed_images)

    def text(self) -> str:
        what = {"moved": f"moved {self.images} image(s) of {len(self.studies)} study(ies)"}
        out = what.get(self.status, self.status)
        return out + (f" ({self.detail})" if self.detail else "")


class Association:
    """One association to the peer for Study Root C-FIND and C-MOVE."""

    connection_timeout = 10.0
    acse_timeout = 30.0
    dimse_timeout = 300.0     # between C-MOVE responses: a big series may take a while
    network_timeout = 600.0

    def __init__(self, peer: Peer, own_aetitle: str):
        self.peer = peer
        self.own = own_aetitle
        self._assoc: Any = None

    @contextmanager
    def open(self) -> Iterator[Association]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        timeouts = Timeouts(self.connection_timeout, self.acse_timeout, self.dimse_timeout,
                            self.network_timeout)
        with open_session(self.own, self.peer.host, self.peer.port, self.peer.aetitle,
                          [FIND, MOVE], "Study Root C-FIND and C-MOVE", timeouts,
                          self._failed) as assoc:
            self._assoc = assoc
            try:
                yield self
            finally:
                self._assoc = None

    def _ready(self) -> None:
        if self._assoc is None or not quiesce(self._assoc):
            raise PeerError(f"{self.peer.label} closed the association")

    def find_studies(self, accession: str) -> list[str]:
        """The StudyInstanceUIDs the peer lists for one accession number."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.AccessionNumber = accession
        query.StudyInstanceUID = ""
        self._ready()
        found, code, status = answers(self._assoc.send_c_find(query, FIND), "C-FIND",
                                      self._failed)
        if code != 0x0000:
            raise _refusal(status, code, self.peer, "C-FIND")
        try:
            uids = [valid_uid(ident.get("StudyInstanceUID"), "StudyInstanceUID")
                    for ident in found]
        except InvalidValue as exc:
            raise PeerError(f"{self.peer.label} answered with {exc}") from None
        return list(dict.fromkeys(uids))

    def move_study(self, study_uid: str) -> tuple[int, int]:
        """C-MOVE one study to FIONA; (images moved, images failed)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        self._ready()
        _found, code, status = answers(
            self._assoc.send_c_move(query, self.own, MOVE), "C-MOVE",
            lambda why: self._failed(f"{why}; a PACS that does not know FIONA's AE title may "
                                     f"abort a C-MOVE"))
        if code not in (0x0000, 0xB000):
            raise _refusal(status, code, self.peer, "C-MOVE")
        return (int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                int(status.get("NumberOfFailedSuboperations", 0) or 0))

    def _failed(self, why: str) -> PeerError:
        return PeerError(f"{self.peer.label} {why}")


class Refused(PeerError):
    """The peer answered a request with a failure status."""


def _refusal(status: Dataset, code: int, peer: Peer, what: str) -> Refused:
    comment = str(status.get("ErrorComment", "") or "")
    reason = REFUSED.get(code, comment or "failure")
    return Refused(f"{peer.label} refused a {what}: status 0x{code:04X}, {reason}")


def retrieve(peer: Peer, own_aetitle: str, accessions: Iterable[str],
             have_accessions: set[str], have_studies: set[str], keyed: Keyed,
             progress: Progress | None = None) -> list[Line]:
    """Ask `peer` for each accession FIONA lacks and move its studies to `own_aetitle`.
    `have_accessions`/`have_studies` are what FIONA has received (not moved again)."""
    progress = progress or (lambda _text: None)
    lines = [Line(a.strip()) for a in accessions]
    todo = []
    for line in lines:
        if not ACCESSION.match(line.accession):
            line.status, line.detail = "invalid", "an accession number has 1 to 16 characters " \
                                                  "and no * ? or backslash"
        elif line.accession in have_accessions:
            line.status = "received already"
        else:
            todo.append(line)
    if not todo:
        return lines
    try:
        with Association(peer, own_aetitle).open() as assoc:
            for n, line in enumerate(todo, 1):
                progress(f"{n}/{len(todo)}: asking {peer.label}")
                _one(assoc, line, have_studies)
                log.info("retrieve %s from %s: %s, %d image(s) moved, %d failed",
                         keyed.ref(line.accession), peer.label, line.status, line.images,
                         line.failed_images)
    except PeerError as exc:
        for line in todo:
            if not line.status:
                line.status, line.detail = "failed", str(exc)
        log.error("retrieve from %s: %s", peer.label, exc)
    return lines


def _one(assoc: Association, line: Line, have_studies: set[str]) -> None:
    """Fill one line's outcome; a refusal stays on its line, a lost association propagates."""
    try:
        studies = assoc.find_studies(line.accession)
        if not studies:
            line.status = "not found"
            return
        new = [s for s in studies if s not in have_studies]
        if not new:
            line.status, line.studies = "received already", studies
            return
        for uid in new:
            done, failed = assoc.move_study(uid)
            line.images += done
            line.failed_images += failed
            line.studies.append(uid)
        line.status = "moved"
        if line.failed_images:
            line.detail = f"{line.failed_images} image(s) failed to move"
    except Refused as exc:
        line.status, line.detail = "refused", str(exc)
