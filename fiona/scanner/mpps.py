"""`fiona mpps` (originally mppsctl.sh): the Modality Performed Procedure Step SCP on MPPSPORT.

The scanner announces each scan with an N-CREATE (IN PROGRESS) and ends it with an N-SET
(COMPLETED or DISCONTINUED). Each step is kept under site/mpps/ (`fiona.scanner.steps`); its
studies are then active, and `fiona pull-from-scanner` fetches what the scanner holds and FIONA
lacks. A request FIONA cannot take whole is answered with its DIMSE failure status and nothing is
stored. When the `enabled` file's second character is 0 associations are refused (A-ASSOCIATE-RJ,
transient) until it is 1 again; the daemon keeps running. Steps carry patient names and IDs:
the log names SOP Instance and Study UIDs only.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import replace
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Config, Site, enabled_path, is_enabled
from ..daemon import DaemonError, ready, running
from ..suite import MPPS
from ..tree import InvalidValue, valid_uid
from .steps import FINAL, IN_PROGRESS, Step, Steps

log = logging.getLogger("fiona.mpps")

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
STATES = frozenset({IN_PROGRESS, *FINAL})


class Refused(Exception):
    """A request answered with a DIMSE failure status; the text says why (UIDs only)."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


def _known_attributes(ds: Dataset) -> None:
    """Refuse a public attribute this dictionary does not know (private ones are kept)."""
    for elem in ds:
        if not elem.tag.is_private and not keyword_for_tag(elem.tag):
            raise Refused(NO_SUCH_ATTRIBUTE, f"unknown attribute {elem.tag}")


def _status(ds: Dataset, allowed: frozenset[str]) -> str:
    if "PerformedProcedureStepStatus" not in ds:
        raise Refused(MISSING_ATTRIBUTE, "no PerformedProcedureStepStatus")
    value = str(ds.PerformedProcedureStepStatus or "").strip()
    if value not in allowed:
        raise Refused(INVALID_ATTRIBUTE_VALUE,
                      f"PerformedProcedureStepStatus must be one of {sorted(allowed)}")
    return value


def _studies(ds: Dataset) -> list[str]:
    """The StudyInstanceUIDs of the ScheduledStepAttributesSequence, validated."""
    items = ds.get("ScheduledStepAttributesSequence")
    if not items:
        raise Refused(MISSING_ATTRIBUTE, "no ScheduledStepAttributesSequence")
    studies = []
    for item in items:
        if not item.get("StudyInstanceUID"):
            raise Refused(MISSING_ATTRIBUTE, "a scheduled step without StudyInstanceUID")
        try:
            studies.append(valid_uid(str(item.StudyInstanceUID), "StudyInstanceUID"))
        except InvalidValue as exc:
            raise Refused(INVALID_ATTRIBUTE_VALUE, str(exc)) from None
    return sorted(set(studies))


def _json(ds: Dataset) -> dict:
    try:
        return ds.to_json_dict()
    except Exception as exc:  # noqa: BLE001 - any value pydicom cannot encode is invalid
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"an attribute cannot be encoded: "
                      f"{type(exc).__name__}") from None


class MppsStore:
    """Applies N-CREATE and N-SET to the steps of one data tree, all or nothing."""

    def __init__(self, steps: Steps, clock: Clock = SYSTEM_CLOCK):
        self.steps = steps
        self.clock = clock
        self._lock = threading.Lock()

    def create(self, sop: str | None, ds: Dataset) -> Step:
        _known_attributes(ds)
        status = _status(ds, frozenset({IN_PROGRESS}))
        studies = _studies(ds)
        try:
            sop = valid_uid(str(sop), "SOPInstanceUID") if sop else generate_uid()
        except InvalidValue as exc:
            raise Refused(INVALID_ATTRIBUTE_VALUE, str(exc)) from None
        step = Step(sop, status, studies, self.clock.time(), _json(ds))
        with self._lock:
            if self.steps.get(sop) is not None:
                raise Refused(DUPLICATE_INSTANCE, f"step {sop} exists already")
            self.steps.put(step)
        return step

    def set(self, sop: str | None, mods: Dataset) -> Step:
        try:
            sop = valid_uid(str(sop or ""), "SOPInstanceUID")
        except InvalidValue:
            raise Refused(NO_SUCH_INSTANCE, "no valid Requested SOP Instance UID") from None
        _known_attributes(mods)
        with self._lock:
            step = self.steps.get(sop)
            if step is None:
                raise Refused(NO_SUCH_INSTANCE, f"no step {sop}")
            if step.status in FINAL:
                raise Refused(PROCESSING_FAILURE, f"step {sop} is {step.status} already")
            status = _status(mods, STATES) if "PerformedProcedureStepStatus" in mods else \
                step.status
            merged = Dataset.from_json(step.attributes)
            for elem in mods:
                merged[elem.tag] = elem
            step = replace(step, status=status, attributes=_json(merged))
            self.steps.put(step)
        return step


class MppsServer:
    """The pynetdicom SCP: its handlers turn `MppsStore` outcomes into DIMSE statuses."""

    def __init__(self, site: Site, port: int, clock: Clock = SYSTEM_CLOCK):
        self.site = site
        self.port = port
        self.store = MppsStore(Steps(site.datadir), clock)
        self._enabled: bool | None = None
        self.server: Any = None  # pynetdicom's ThreadedAssociationServer once started

    def accepting(self) -> bool:
        """The `enabled` file's scanner switch; a change is logged once."""
        enabled = is_enabled(self.site.datadir, "scanner")
        if enabled != self._enabled:
            self._enabled = enabled
            log.warning("MPPS %s by %s", "enabled" if enabled else "disabled (refusing "
                        "associations until its second character is 1)",
                        enabled_path(self.site.datadir))
        return enabled

    def _requested(self, event) -> None:
        if not self.accepting():
            log.info("refused an association from %s: the scanner side is switched off",
                     event.assoc.requestor.address)
            event.assoc.acse.send_reject(0x02, 0x01, 0x01)

    def _answer(self, what: str, sop, apply) -> tuple[int, Dataset | None]:
        try:
            step = apply()
        except Refused as exc:
            log.warning("%s %s refused with 0x%04X: %s", what, sop or "-", exc.status, exc)
            return exc.status, None
        except Exception:  # a bug or a full disk costs this request, never the daemon
            log.exception("%s %s failed", what, sop or "-")
            return PROCESSING_FAILURE, None
        log.info("%s step %s: %s, study %s", what, step.sop, step.status,
                 ", ".join(step.studies))
        return SUCCESS, Dataset.from_json(step.attributes)

    def _n_create(self, event) -> tuple[int, Dataset | None]:
        sop = event.request.AffectedSOPInstanceUID
        try:
            ds = event.attribute_list
        except Exception:  # noqa: BLE001 - an undecodable data set
            log.warning("N-CREATE %s refused: its data set cannot be decoded", sop or "-")
            return PROCESSING_FAILURE, None
        return self._answer("N-CREATE", sop, lambda: self.store.create(sop, ds))

    def _n_set(self, event) -> tuple[int, Dataset | None]:
        sop = event.request.RequestedSOPInstanceUID
        try:
            mods = event.modification_list
        except Exception:  # noqa: BLE001
            log.warning("N-SET %s refused: its data set cannot be decoded", sop or "-")
            return PROCESSING_FAILURE, None
        return self._answer("N-SET", sop, lambda: self.store.set(sop, mods))

    def start(self, host: str):
        """Listen on (host, port) in the background; returns the server."""
        from pynetdicom import AE, _config, evt
        from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

        from ..dicom_client import nodelay

        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(self.site.aetitle)
        ae.add_supported_context(ModalityPerformedProcedureStep)
        ae.add_supported_context(Verification)
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_CONN_OPEN, nodelay),
                    (evt.EVT_N_CREATE, self._n_create), (evt.EVT_N_SET, self._n_set)]
        self.accepting()
        self.server = ae.start_server((host, self.port), block=False, evt_handlers=handlers)
        return self.server


def run(config: Config, verbose: bool = False) -> int:
    """Serve MPPS on MPPSPORT until SIGTERM/SIGINT."""
    if not MPPS.wanted(config):
        print("fiona mpps: MPPSPORT is not set in config.json, so there is no MPPS SCP to run "
              "(set it to the port the scanner sends MPPS to)", file=sys.stderr)
        return 0
    site = config.site(None)
    with running(site, MPPS.command, verbose) as stop:
        assert config.mpps_port is not None  # MPPS.wanted(config) checked it
        mpps = MppsServer(site, config.mpps_port)
        try:
            server = mpps.start(site.ip)
        except OSError as exc:
            raise DaemonError(f"cannot listen on {site.ip}:{config.mpps_port} "
                              f"(MPPSPORT): {exc.strerror}") from None
        log.info("MPPS SCP listening on %s:%s as %s", site.ip, config.mpps_port, site.aetitle)
        ready()
        stop.wait()
        server.shutdown()
        log.info("MPPS SCP stopped")
    return 0
