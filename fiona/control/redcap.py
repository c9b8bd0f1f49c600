"""The `redcap` control plane: the REDCap API, one token per REDCap project.

The control projects (`Incoming`, `Routing`, `CouplingList`, `AutoID`, `DataTransferProjects`)
and one REDCap per research project (token named by the project's acronym) are described in
`config/redcap/` (data dictionaries and `projects.json`) and SPEC §6.

What this backend does differently from the system FIONA replaces:
- It never exports a whole project every minute: each method exports only the records, forms
  and fields it needs (`records[]`, `forms[]`, `fields[]`, `filterLogic` where no repeating
  instrument is involved), and `coupling_rows_since`, `requests_since` and `studies_since` use
  `dateRangeBegin` so a daemon can poll for changes.
- Writes are batched: a study and all its series are one import.
- Transfer requests are created idempotently per (study, project) without transactions
  (`add_request`: the repeat instance is a hash of the two), and whether one is pending is
  decided by revision counters (`transfer_revision`, `transfer_done_revision`), not by
  comparing timestamps; an Incoming project without those fields is refused by name.
- Tokens live in `tokens.json` (mode 0600), TLS is always verified, and every error names the
  REDCap project and URL it concerns.

Every REDCap value is a string: the mapping functions below turn rows into the dataclasses of
`fiona.control.base` and back, so a value written comes back equal.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from ..config import ConfigError, read_secret
from .base import (
    ControlPlane,
    ControlPlaneError,
    CouplingRow,
    InventoryEntry,
    Project,
    RoutingRule,
    Series,
    Study,
    TransferRequest,
    Unavailable,
    check_inventory_scope,
    now_iso,
    registration,
    takes,
)

# REDCap project names (keys in tokens.json) of the control projects.
INCOMING = "Incoming"
ROUTING = "Routing"
COUPLING = "CouplingList"
AUTOID = "AutoID"
PROJECTS = "DataTransferProjects"
CONTROL_PROJECTS = (INCOMING, ROUTING, COUPLING, AUTOID, PROJECTS)
#: the research PACS's inventory (`fiona inventory`, the original's whatIsInIDS7), one record
#: per study; optional: only the inventory and its readers need its token
INVENTORY = "WhatIsInIDS7"

STUDY_ID = "study_instance_uid"      # record id of Incoming
RECORD_ID = "record_id"              # record id of every other project
REPEAT_FORM = "redcap_repeat_instrument"
REPEAT_INSTANCE = "redcap_repeat_instance"
EVENT = "redcap_event_name"

TRANSFER_FLAGS = (1, 2, 3)            # transfer_error checkbox codes
PROJECT_FEATURES = (0, 1, 2)          # project_features checkbox codes
COMPLETE = "2"                        # REDCap form status "Complete"

STUDY_FIELDS = {  # Study attribute -> Incoming base field
    "institution": "study_institution_name",
    "calling_ae": "study_aetitle_sender",
    "called_ae": "study_aetitle_addressed",
    "patient_name_hash": "study_patient_name",
    "patient_id_hash": "study_patient_id",
    "description": "study_description",
    "date": "study_date",
    "time": "study_time",
    "accession": "study_accession_number",
    "arrival": "study_arrival_date",
    "node": "study_node",
}
#: Study.split_nodes (comma-separated): the other nodes that received series of the study
SPLIT_FIELD = "study_split_nodes"
SERIES_FIELDS = {  # Series attribute -> series field (num_files, classify_types converted)
    "uid": "series_instance_uid",
    "description": "series_description",
    "date": "series_date",
    "time": "series_time",
    "num_files": "series_num_files",
    "sequence_name": "series_sequence_name",
    "classify_types": "series_classify_types",
    "modality": "series_modality",
}
ROUTING_FIELDS = {  # RoutingRule attribute -> Routing field (name is the record id)
    "project": "routing_dest_project",
    "event": "routing_event_name",
    "called_ae": "routing_incoming_aetitle",
    "calling_ae": "routing_sending_aetitle",
    "patient_id_regex": "routing_allowed_patientid",
    "patient_name_regex": "routing_allowed_patientname",
}
COUPLING_FIELDS = {
    "accession": "cl_accessionnumber",
    "study_uid": "cl_studyinstanceuid",
    "project": "cl_projectname",
    "participant": "cl_subjectid",
    "event": "cl_eventname",
    "added": "cl_date",
}
#: the project's de-identification profile (added after the first FIONA: see `save_project`)
PROFILE_FIELD = "project_deid_profile"
PROJECT_TEXT_FIELDS = {
    "long_name": "project_name",
    "contact": "project_contact",
    "contact_email": "project_contact_email",
    "naming": "project_patient_naming",
    "rec_start": "project_rec_start_date",
    "rec_end": "project_rec_end_date",
    "autoid_aetitle": "project_autoid_aetitle",
    "import_rule_tag": "project_import_rule_1_tag",
    "import_rule_regexp": "project_import_rule_1_regexp",
    "deid_profile": PROFILE_FIELD,
}

INVENTORY_FIELDS = {  # InventoryEntry attribute -> WhatIsInIDS7 field (study_uid: record id)
    "project": "inv_project",
    "participant": "inv_participant",
    "event": "inv_event",
    "study_date": "inv_study_date",
    "series": "inv_series",
    "instances": "inv_instances",
    "modalities": "inv_modalities",
    "first_seen": "inv_first_seen",
    "last_seen": "inv_last_seen",
    "node": "inv_node",
}
#: the AutoID record that holds the region's key fingerprint (`claim_key_fingerprint`)
KEY_RECORD = "key-fingerprint"
#: records per import or delete call, so a PACS of many studies is not one huge request
INVENTORY_BATCH = 500


def redcap_event(event: str) -> str:
    """FIONA's event name -> the REDCap unique event name in arm 1 (`baseline_arm_1`)."""
    return f"{event}_arm_1"


def plain_event(unique_event: str) -> str:
    return unique_event[:-len("_arm_1")] if unique_event.endswith("_arm_1") else unique_event


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(str(value).strip() or default)
    except ValueError:
        try:
            return int(float(value))
        except ValueError:
            return default


def _float(value: Any) -> float:
    try:
        return float(str(value).strip() or 0)
    except ValueError:
        return 0.0


def _number(value: float) -> str:
    """A float as REDCap's `number` validation takes it (no exponent), exactly if possible."""
    text = repr(float(value or 0.0))
    return text if "e" not in text and "n" not in text else f"{float(value):.9f}"


def _timestamp(since: str | datetime) -> str:
    """dateRangeBegin's format, YYYY-MM-DD HH:MM:SS (REDCap server time)."""
    if isinstance(since, datetime):
        return since.replace(microsecond=0, tzinfo=None).isoformat(sep=" ")
    return str(since).replace("T", " ")[:19]


def _instance(row: dict) -> int:
    return _int(row.get(REPEAT_INSTANCE, ""), 0)


def _logic_str(value: str) -> str:
    """A string literal for REDCap logic (filterLogic); values with both quotes are refused."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ControlPlaneError(f"cannot search REDCap for a value with both quote marks: {value!r}")


# --- rows <-> dataclasses ---------------------------------------------------------------------
def study_row(study: Study, removed: str = "") -> dict[str, str]:
    row = {STUDY_ID: study.uid, REPEAT_FORM: "", REPEAT_INSTANCE: ""}
    for attr, name in STUDY_FIELDS.items():
        row[name] = str(getattr(study, attr) or "")
    row["study_removed_date"] = removed
    row[SPLIT_FIELD] = ",".join(study.split_nodes)
    return row


def series_row(study_uid: str, series: Series, instance: int) -> dict[str, str]:
    row = {STUDY_ID: study_uid, REPEAT_FORM: "series", REPEAT_INSTANCE: str(instance)}
    for attr, name in SERIES_FIELDS.items():
        value = getattr(series, attr)
        if attr == "classify_types":
            value = ",".join(value)
        row[name] = str(value if value is not None else "")
    return row


def row_series(row: dict) -> Series:
    return Series(
        uid=row.get("series_instance_uid", ""),
        description=row.get("series_description", ""),
        date=row.get("series_date", ""),
        time=row.get("series_time", ""),
        num_files=_int(row.get("series_num_files", "")),
        sequence_name=row.get("series_sequence_name", ""),
        classify_types=[t for t in row.get("series_classify_types", "").split(",") if t],
        modality=row.get("series_modality", ""),
    )


def rows_studies(rows: list[dict]) -> list[Study]:
    """Incoming rows (base and `series` rows, any order) -> studies with their series."""
    studies: dict[str, Study] = {}
    series: dict[str, dict[str, Series]] = {}
    for row in rows:
        uid = row.get(STUDY_ID, "")
        if not uid:
            continue
        form = row.get(REPEAT_FORM, "")
        if form == "series":
            s = row_series(row)
            if s.uid:
                series.setdefault(uid, {})[s.uid] = s
        elif not form:
            values = {attr: row.get(name, "") for attr, name in STUDY_FIELDS.items()}
            studies[uid] = Study(uid=uid, hidden=bool(row.get("study_removed_date", "")),
                                 split_nodes=[n for n in row.get(SPLIT_FIELD, "").split(",")
                                              if n], **values)
    for uid, study in studies.items():
        study.series = [series[uid][k] for k in sorted(series.get(uid, {}))]
    return sorted(studies.values(), key=lambda s: s.arrival, reverse=True)


TRANSFER_KEY_FIELDS = ("transfer_project_name", "transfer_name", "transfer_event_name")
#: what creating, resending or reassigning a request writes
TRANSFER_ASK_FIELDS = ("transfer_requested_date", "transfer_source", "transfer_revision",
                       "transfers_complete")
#: what the forwarder writes (`update_request`)
TRANSFER_OUTCOME_FIELDS = ("transfer_date", "transfer_mapped_uid", "transfer_error_message",
                           "transfer_active_proc_time", "transfers_complete",
                           "transfer_done_revision",
                           *(f"transfer_error___{f}" for f in TRANSFER_FLAGS))
#: fields a REDCap project made for an older FIONA lacks (see config/redcap/README.md)
REVISION_FIELDS = ("transfer_revision", "transfer_done_revision")
NODE_FIELDS = ("study_node", SPLIT_FIELD)
#: instrument of Incoming -> the fields this FIONA needs there that older ones did not
UPGRADE_FIELDS = {"transfers": REVISION_FIELDS, "incoming_studies": NODE_FIELDS}
#: request instances are numbered by a hash of (study, project), within what REDCap stores
REQUEST_SLOTS = 32767
REQUEST_PROBES = 32


def request_row(r: TransferRequest, fields: Iterable[str]) -> dict[str, str]:
    """The `transfers` instance of a request with only `fields` (and the row's keys)."""
    every = {"transfer_project_name": r.project, "transfer_name": r.participant,
             "transfer_event_name": r.event,
             "transfer_requested_date": r.requested,
             "transfer_source": r.source,
             "transfer_revision": str(r.revision),
             "transfer_done_revision": str(r.done_revision),
             "transfer_date": r.transferred,
             "transfer_mapped_uid": r.mapped_uid,
             "transfer_error_message": r.error_message,
             "transfer_active_proc_time": _number(r.active_proc_time),
             "transfers_complete": COMPLETE if r.complete else "0"}
    unknown = set(r.error_flags) - set(TRANSFER_FLAGS)
    if unknown:
        raise ControlPlaneError(f"transfer error flags {sorted(unknown)} are not in REDCap's "
                                f"transfer_error choices {list(TRANSFER_FLAGS)}")
    for f in TRANSFER_FLAGS:
        every[f"transfer_error___{f}"] = _flag(f in r.error_flags)
    row = {STUDY_ID: r.study_uid, REPEAT_FORM: "transfers", REPEAT_INSTANCE: str(r.instance)}
    row.update((name, every[name]) for name in fields)
    return row


def row_request(row: dict) -> TransferRequest:
    """A `transfers` instance as a request. A blank revision is 1 (a request made by hand or
    before revisions); a blank done revision is 1 if the request was transferred at or after
    it was requested (the rule before revisions, for instances made then), else 0."""
    requested, transferred = row.get("transfer_requested_date", ""), row.get("transfer_date", "")
    legacy_done = 1 if transferred and requested <= transferred else 0
    return TransferRequest(
        study_uid=row.get(STUDY_ID, ""),
        project=row.get("transfer_project_name", ""),
        participant=row.get("transfer_name", ""),
        event=row.get("transfer_event_name", ""),
        requested=requested,
        instance=_instance(row),
        transferred=transferred,
        mapped_uid=row.get("transfer_mapped_uid", ""),
        error_flags={f for f in TRANSFER_FLAGS if row.get(f"transfer_error___{f}") == "1"},
        error_message=row.get("transfer_error_message", ""),
        active_proc_time=_float(row.get("transfer_active_proc_time", "")),
        complete=row.get("transfers_complete", "") == COMPLETE,
        source=row.get("transfer_source", ""),
        revision=_int(row.get("transfer_revision", ""), 1),
        done_revision=_int(row.get("transfer_done_revision", ""), legacy_done),
        node=row.get("study_node", ""),
    )


def transfer_rows(rows: Iterable[dict]) -> list[dict]:
    """The `transfers` instances among exported rows, refusing a project without the revision
    fields (an Incoming project made for an older FIONA)."""
    out = [r for r in rows if r.get(REPEAT_FORM) == "transfers" and _instance(r) > 0]
    if out and any(f not in out[0] for f in REVISION_FIELDS):
        raise ControlPlaneError(missing_fields_message())
    return out


def missing_fields_message(url: str = "", missing: Iterable[str] = REVISION_FIELDS) -> str:
    where = f" at {url}" if url else ""
    return (f"REDCap project {INCOMING}{where} lacks the fields {', '.join(missing)} (FIONA "
            f"counts resends and names the node of each study with them): add them by "
            f"uploading config/redcap/Incoming.csv as its data dictionary (see "
            f"config/redcap/README.md, 'Upgrading')")


def is_request(r: TransferRequest) -> bool:
    """A transfers row without a project (an instance blanked by hand) is no request."""
    return bool(r.project or r.participant or r.requested)


def with_nodes(rows: Iterable[dict]) -> list[dict]:
    """The `transfers` instances among exported rows, each given its study's node (the
    `study_node` of its record's base row, when that was exported)."""
    rows = list(rows)
    nodes = {r.get(STUDY_ID, ""): r.get("study_node", "") for r in rows if not r.get(REPEAT_FORM)}
    return [{**t, "study_node": nodes.get(t.get(STUDY_ID, ""), "")} for t in transfer_rows(rows)]


def rows_requests(rows: Iterable[dict]) -> list[TransferRequest]:
    return [r for r in map(row_request, with_nodes(rows)) if is_request(r)]


def request_slots(study_uid: str, project: str) -> Iterator[int]:
    """The repeat instances a request of (study, project) may take, in order: a hash of the
    two, then further hashes for the rare study whose projects collide."""
    for attempt in range(REQUEST_PROBES):
        digest = hashlib.sha256(json.dumps([study_uid, project, attempt]).encode()).digest()
        yield int.from_bytes(digest[:8], "big") % REQUEST_SLOTS + 1


def project_row(p: Project) -> dict[str, str]:
    row = {RECORD_ID: p.name, REPEAT_FORM: "", REPEAT_INSTANCE: "",
           "project_events": ",".join(p.events),
           "project_active": _flag(p.active),
           "project_use_autoid": _flag(p.use_autoid)}
    for attr, name in PROJECT_TEXT_FIELDS.items():
        row[name] = str(getattr(p, attr) or "")
    unknown = set(p.features) - set(PROJECT_FEATURES)
    if unknown:
        raise ControlPlaneError(f"project features {sorted(unknown)} are not in REDCap's "
                                f"project_features choices {list(PROJECT_FEATURES)}")
    for f in PROJECT_FEATURES:
        row[f"project_features___{f}"] = _flag(f in p.features)
    return row


def rows_projects(rows: list[dict]) -> list[Project]:
    base: dict[str, dict] = {}
    exclusions: dict[str, list[tuple[int, tuple[str, str]]]] = {}
    for row in rows:
        name = row.get(RECORD_ID, "")
        form = row.get(REPEAT_FORM, "")
        if form == "rewritepixelexclusions":
            tag, reg = row.get("rewrite_ex_tag", ""), row.get("rewrite_ex_reg", "")
            if tag or reg:  # blanked instances are deleted ones (see save_project)
                exclusions.setdefault(name, []).append((_instance(row), (tag, reg)))
        elif not form and name:
            base[name] = row
    out = []
    for name in sorted(base):
        row = base[name]
        values = {attr: row.get(field, "") for attr, field in PROJECT_TEXT_FIELDS.items()}
        if not values["naming"]:
            values["naming"] = Project.__dataclass_fields__["naming"].default
        values["deid_profile"] = values["deid_profile"] or "default"  # an older FIONA's row
        out.append(Project(
            name=name,
            events=[e.strip() for e in row.get("project_events", "").split(",") if e.strip()],
            active=row.get("project_active", "1") != "0",
            use_autoid=row.get("project_use_autoid", "") == "1",
            features={f for f in PROJECT_FEATURES if row.get(f"project_features___{f}") == "1"},
            pixel_exclusions=[x for _i, x in sorted(exclusions.get(name, []))],
            **values))
    return out


def routing_row(rule: RoutingRule) -> dict[str, str]:
    row = {RECORD_ID: rule.name, "routing_active": _flag(rule.active)}
    for attr, name in ROUTING_FIELDS.items():
        row[name] = str(getattr(rule, attr) or "")
    return row


def row_routing(row: dict) -> RoutingRule:
    return RoutingRule(name=row.get(RECORD_ID, ""), active=row.get("routing_active", "") == "1",
                       **{attr: row.get(name, "") for attr, name in ROUTING_FIELDS.items()})


def coupling_row(r: CouplingRow, record_id: str) -> dict[str, str]:
    row = {RECORD_ID: record_id}
    for attr, name in COUPLING_FIELDS.items():
        row[name] = str(getattr(r, attr) or "")
    return row


def row_coupling(row: dict) -> CouplingRow:
    return CouplingRow(id=_int(row.get(RECORD_ID, "")),
                       **{attr: row.get(name, "") for attr, name in COUPLING_FIELDS.items()})


def inventory_row(e: InventoryEntry) -> dict[str, str]:
    row = {RECORD_ID: e.study_uid}
    for attr, name in INVENTORY_FIELDS.items():
        value = getattr(e, attr)
        row[name] = ",".join(value) if attr == "modalities" else str(value)
    return row


def row_inventory(row: dict) -> InventoryEntry:
    values = {attr: row.get(name, "") for attr, name in INVENTORY_FIELDS.items()}
    values["series"] = _int(values["series"])
    values["instances"] = _int(values["instances"])
    values["modalities"] = [m for m in values["modalities"].split(",") if m]
    return InventoryEntry(study_uid=row.get(RECORD_ID, ""), **values)


# --- the backend ------------------------------------------------------------------------------
class RedcapControlPlane(ControlPlane):
    """The control plane in REDCap. `tokens` maps REDCap project names to API tokens."""

    kind = "redcap"

    def __init__(self, url: str, tokens: dict[str, str], verify_tls: bool = True,
                 timeout: float = 30, tokens_file: str | Path | None = None):
        if verify_tls is not True:
            raise ControlPlaneError("REDCap TLS verification cannot be turned off: patient data "
                                    "never travels over unverified TLS; install the hospital CA")
        self.url = url
        self.tokens = dict(tokens)
        self.verify_tls = True
        self.timeout = timeout
        self.tokens_file = str(tokens_file) if tokens_file else "tokens.json"
        self._local = threading.local()
        self._write_lock = threading.Lock()  # save_autoid/mirror_forwarded read-then-write
        self._fields_checked = False
        self._profile_field_checked = False

    @classmethod
    def from_config(cls, cp: dict) -> RedcapControlPlane:
        """From config.json's CONTROL_PLANE: reads the tokens file (must be mode 0600)."""
        path = Path(cp["tokens"])
        raw = read_secret(path)
        try:
            tokens = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = (f" at line {exc.lineno} column {exc.colno}: {exc.msg}"
                     if isinstance(exc, json.JSONDecodeError) else "")
            raise ConfigError([f"REDCap tokens file {path} is not valid JSON{where}; it must be "
                               f"an object {{\"<REDCap project>\": \"<API token>\"}}"]) from None
        if not isinstance(tokens, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()):
            raise ConfigError([f"REDCap tokens file {path} must be an object of project name to "
                               f"token strings, e.g. {{\"Incoming\": \"0123...\"}}"])
        return cls(cp["url"], tokens, verify_tls=cp.get("verify_tls", True),
                   timeout=float(cp.get("timeout", 30)), tokens_file=path)

    # --- the API ----------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.verify = True
            self._local.session = s
        return s

    def has_token(self, project: str) -> bool:
        return bool(self.tokens.get(project))

    def _token(self, project: str) -> str:
        token = self.tokens.get(project)
        if not token:
            raise ControlPlaneError(f"no API token for REDCap project {project!r} in "
                                    f"{self.tokens_file}; add \"{project}\": \"<token>\" there")
        return token

    def _post(self, project: str, data: dict[str, Any]) -> Any:
        """One API call for a REDCap project; returns the decoded JSON (or text)."""
        payload = {"token": self._token(project), "format": "json", "returnFormat": "json",
                   **data}
        what = f"REDCap project {project} at {self.url}"
        try:
            resp = self._session().post(self.url, data=payload, timeout=self.timeout,
                                        verify=True)
        except requests.exceptions.SSLError as exc:
            raise ControlPlaneError(f"TLS verification failed for {what}: {exc}; install the "
                                    f"server's CA certificate") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise Unavailable(f"cannot reach {what}: {type(exc).__name__}: {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise Unavailable(f"request to {what} failed: {exc}") from None
        if resp.status_code >= 500:
            raise Unavailable(f"{what} answered HTTP {resp.status_code}: {_error_text(resp)}")
        if resp.status_code in (401, 403):
            raise ControlPlaneError(f"REDCap refused the API token for project {project} at "
                                    f"{self.url} (HTTP {resp.status_code}: {_error_text(resp)}): "
                                    f"check tokens.json ({self.tokens_file})")
        if resp.status_code >= 400:
            raise ControlPlaneError(f"{what} refused the request (HTTP {resp.status_code}): "
                                    f"{_error_text(resp)}")
        text = resp.text
        try:
            value = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return text.strip()
        if isinstance(value, dict) and "error" in value and len(value) == 1:
            raise ControlPlaneError(f"{what} refused the request: {value['error']}")
        return value

    def export(self, project: str, records: Iterable[str] = (), fields: Iterable[str] = (),
               forms: Iterable[str] = (), events: Iterable[str] = (), filter_logic: str = "",
               since: str | datetime = "") -> list[dict]:
        """content=record export (flat, raw values) of only what is asked for."""
        data: dict[str, Any] = {"content": "record", "action": "export", "type": "flat",
                                "rawOrLabel": "raw", "rawOrLabelHeaders": "raw",
                                "exportCheckboxLabel": "false", "exportSurveyFields": "false",
                                "exportDataAccessGroups": "false"}
        for key, values in (("records", records), ("fields", fields), ("forms", forms),
                            ("events", events)):
            for i, value in enumerate(values):
                data[f"{key}[{i}]"] = value
        if filter_logic:
            data["filterLogic"] = filter_logic
        if since:
            data["dateRangeBegin"] = _timestamp(since)
        rows = self._post(project, data)
        if rows is None:
            return []
        if not isinstance(rows, list):
            raise ControlPlaneError(f"REDCap project {project} at {self.url} returned "
                                    f"{str(rows)[:200]!r} where a list of records was expected")
        return rows

    def import_rows(self, project: str, rows: list[dict], overwrite: bool = False,
                    auto_number: bool = False) -> Any:
        """content=record import of many rows in one call. `overwrite` lets blank values clear
        fields; `auto_number` lets REDCap number the records (returns `new,old` pairs)."""
        if not rows:
            return None
        data = {"content": "record", "action": "import", "type": "flat",
                "overwriteBehavior": "overwrite" if overwrite else "normal",
                "forceAutoNumber": "true" if auto_number else "false",
                "returnContent": "auto_ids" if auto_number else "count",
                "dateFormat": "YMD", "data": json.dumps(rows)}
        return self._post(project, data)

    # --- connection -------------------------------------------------------------------------
    def test_connection(self) -> None:
        missing = [p for p in CONTROL_PROJECTS if not self.has_token(p)]
        if missing:
            raise ControlPlaneError(f"{self.tokens_file} has no API token for the REDCap "
                                    f"project(s) {', '.join(missing)}")
        for project in self.tokens:
            info = self._post(project, {"content": "project"})
            if not isinstance(info, dict):
                raise ControlPlaneError(f"REDCap project {project} at {self.url} returned "
                                        f"{str(info)[:200]!r} for its project information")
        self._check_fields()

    def _check_fields(self) -> None:
        """Refuse, naming the fields to add, an Incoming project made for an older FIONA
        (UPGRADE_FIELDS), before a study or request is written there or requests are read
        (asked once per process)."""
        if self._fields_checked:
            return
        metadata = self._post(INCOMING, {"content": "metadata", **{
            f"forms[{i}]": form for i, form in enumerate(UPGRADE_FIELDS)}})
        names = {m.get("field_name") for m in metadata or [] if isinstance(m, dict)}
        missing = [f for fields in UPGRADE_FIELDS.values() for f in fields if f not in names]
        if missing:
            raise ControlPlaneError(missing_fields_message(self.url, missing))
        self._fields_checked = True

    # --- projects and participants ----------------------------------------------------------
    def projects(self) -> list[Project]:
        return rows_projects(self.export(PROJECTS))

    def project(self, name: str) -> Project:
        found = rows_projects(self.export(PROJECTS, records=[name]))
        for p in found:
            if p.name == name:
                return p
        return super().project(name)  # the error message lists the known projects

    def save_project(self, project: Project) -> None:
        self._check_profile_field()
        old = self.export(PROJECTS, records=[project.name], fields=[RECORD_ID],
                          forms=["rewritepixelexclusions"])
        old_instances = {_instance(r) for r in old
                         if r.get(REPEAT_FORM) == "rewritepixelexclusions"}
        rows = [project_row(project)]
        for i, (tag, reg) in enumerate(project.pixel_exclusions, start=1):
            rows.append({RECORD_ID: project.name, REPEAT_FORM: "rewritepixelexclusions",
                         REPEAT_INSTANCE: str(i), "rewrite_ex_tag": tag, "rewrite_ex_reg": reg})
        for i in sorted(old_instances - set(range(1, len(project.pixel_exclusions) + 1))):
            rows.append({RECORD_ID: project.name, REPEAT_FORM: "rewritepixelexclusions",
                         REPEAT_INSTANCE: str(i), "rewrite_ex_tag": "", "rewrite_ex_reg": ""})
        self.import_rows(PROJECTS, rows, overwrite=True)

    def _check_profile_field(self) -> None:
        """Refuse, naming the field to add, to save a project in a DataTransferProjects made
        for an older FIONA (its projects read as profile "default"; asked once per process)."""
        if self._profile_field_checked:
            return
        metadata = self._post(PROJECTS, {"content": "metadata", "forms[0]": "project"})
        if PROFILE_FIELD not in {m.get("field_name") for m in metadata or []
                                 if isinstance(m, dict)}:
            raise ControlPlaneError(
                f"REDCap project {PROJECTS} at {self.url} lacks the field {PROFILE_FIELD} "
                f"(each project's de-identification profile): add it by uploading "
                f"config/redcap/{PROJECTS}.csv as its data dictionary (see "
                f"config/redcap/README.md, 'Upgrading')")
        self._profile_field_checked = True

    def participants(self, project: str) -> list[str]:
        if self.has_token(project):
            rows = self.export(project, fields=[RECORD_ID])
            return sorted({r[RECORD_ID] for r in rows if r.get(RECORD_ID)})
        rows = self.export(INCOMING, fields=[STUDY_ID, "transfer_project_name", "transfer_name"],
                           filter_logic=f"[transfer_project_name] = {_logic_str(project)}")
        return sorted({r.get("transfer_name", "") for r in rows
                       if r.get(REPEAT_FORM) == "transfers"
                       and r.get("transfer_project_name") == project and r.get("transfer_name")})

    def add_participant(self, project: str, participant: str) -> None:
        if not self.has_token(project):
            return
        row = {RECORD_ID: participant}
        event = self.first_event(project)
        if event:
            row[EVENT] = event
        self.import_rows(project, [row])

    def first_event(self, project: str) -> str:
        """The unique name of the first event of a research project's REDCap (arm 1 first),
        or "" for a classic (not longitudinal) project. Asked of that REDCap itself, so a
        participant is created even if its events differ from `project_events`."""
        try:
            events = self._post(project, {"content": "event"})
        except Unavailable:
            raise
        except ControlPlaneError as exc:
            if "classic" in str(exc).lower():
                return ""
            raise
        if not isinstance(events, list) or not events:
            return ""
        first = min(events, key=lambda e: _int(e.get("arm_num", 1), 1))
        arm = first.get("arm_num", 1)
        for e in events:  # REDCap lists events in order within each arm
            if str(e.get("arm_num", 1)) == str(arm):
                return str(e.get("unique_event_name", ""))
        return ""

    # --- incoming studies -------------------------------------------------------------------
    def _study_rows(self, uid: str) -> list[dict]:
        return self.export(INCOMING, records=[uid], forms=["incoming_studies", "series"])

    def register_study(self, study: Study) -> Study:
        self._check_fields()
        old = self._study_rows(study.uid)
        known = next((s for s in rows_studies(old) if s.uid == study.uid), None)
        stored = registration(known, study)
        if known is not None and stored.node != study.node and study.node:
            # another node's study: only its list of split nodes changes
            self.import_rows(INCOMING, [{STUDY_ID: study.uid,
                                         SPLIT_FIELD: ",".join(stored.split_nodes)}])
            return stored
        study = stored
        base = [r for r in old if not r.get(REPEAT_FORM)]
        removed = base[0].get("study_removed_date", "") if base else ""
        if not base and study.hidden:
            removed = now_iso()
        instances = {r.get("series_instance_uid", ""): _instance(r) for r in old
                     if r.get(REPEAT_FORM) == "series"}
        next_instance = max(instances.values(), default=0) + 1
        rows = [study_row(study, removed)]
        for s in study.series:
            instance = instances.get(s.uid)
            if not instance:
                instance = instances[s.uid] = next_instance
                next_instance += 1
            rows.append(series_row(study.uid, s, instance))
        self.import_rows(INCOMING, rows, overwrite=True)
        return study

    def studies(self, include_hidden: bool = False) -> list[Study]:
        found = rows_studies(self.export(INCOMING, forms=["incoming_studies", "series"]))
        return found if include_hidden else [s for s in found if not s.hidden]

    def study(self, uid: str) -> Study | None:
        found = [s for s in rows_studies(self._study_rows(uid)) if s.uid == uid]
        return found[0] if found else None

    def studies_since(self, since: str | datetime) -> list[Study]:
        """Studies (with series) created or changed in REDCap since `since` (REDCap server
        time, "YYYY-MM-DD HH:MM:SS"), by `dateRangeBegin`."""
        return rows_studies(self.export(INCOMING, forms=["incoming_studies", "series"],
                                        since=since))

    def hide_studies_before(self, arrival_before: datetime) -> int:
        cutoff = arrival_before.replace(microsecond=0).isoformat(sep=" ")
        rows = self.export(INCOMING, fields=[STUDY_ID, "study_arrival_date",
                                             "study_removed_date", "transfer_project_name"])
        assigned = {r[STUDY_ID] for r in rows if r.get(REPEAT_FORM) == "transfers"}
        stamp = now_iso()
        hide = [{STUDY_ID: r[STUDY_ID], "study_removed_date": stamp} for r in rows
                if not r.get(REPEAT_FORM) and r.get(STUDY_ID)
                and not r.get("study_removed_date")
                and r.get("study_arrival_date", "") < cutoff
                and r[STUDY_ID] not in assigned]
        self.import_rows(INCOMING, hide)
        return len(hide)

    # --- transfer requests ------------------------------------------------------------------
    def _requests(self, records: Iterable[str] = (), since: str | datetime = ""
                  ) -> list[TransferRequest]:
        """Requests with their study's node: the `transfers` instances and the base rows'
        `study_node`, in one export."""
        self._check_fields()
        return rows_requests(self.export(INCOMING, records=records, fields=["study_node"],
                                         forms=["transfers"], since=since))

    def requests(self, study_uid: str | None = None) -> list[TransferRequest]:
        if study_uid is None:
            return self._requests()
        return [r for r in self._requests(records=[study_uid]) if r.study_uid == study_uid]

    def requests_since(self, since: str | datetime, node: str | None = None
                       ) -> list[TransferRequest]:
        """Every request of the studies created or changed since `since` (REDCap server time,
        "YYYY-MM-DD HH:MM:SS"): for a daemon that polls for new requests and resends; with
        `node`, only those that node does (`takes`), as `pending_requests`."""
        return [r for r in self._requests(since=since) if takes(node, r.node)]

    def _transfers(self, study_uid: str) -> dict[int, dict]:
        """Every `transfers` instance of a study, blanked ones too, by instance number."""
        self._check_fields()
        rows = self.export(INCOMING, records=[study_uid], fields=["study_node"],
                           forms=["transfers"])
        return {_instance(r): r for r in with_nodes(rows) if r.get(STUDY_ID) == study_uid}

    def _request_at(self, study_uid: str, instance: int) -> TransferRequest:
        row = self._transfers(study_uid).get(instance)
        if row is None or not is_request(row_request(row)):
            raise ControlPlaneError(f"study {study_uid} has no transfer request #{instance} in "
                                    f"REDCap project {INCOMING} at {self.url}")
        return row_request(row)

    def add_request(self, request: TransferRequest) -> TransferRequest:
        """Idempotent per (study, project) without transactions, which the REDCap API lacks.

        Numbering instances max+1 let two processes adding a request to one study at once
        take the same instance: the second import overwrote the first (a request lost), or
        both added the same request (doubled). Here a request's instance is a hash of (study,
        project) (`request_slots`), so writers of the same request write the same instance
        and cannot double it, and writers of two projects' requests write different ones and
        cannot overwrite each other. The creating import writes only non-blank values
        (`overwriteBehavior=normal`) and neither revision field, so repeating it never undoes
        a resend or the forwarder's outcome. An instance that holds anything, including a
        request made by hand or a blanked one, is skipped for the next hash; after writing,
        the instance is read back, and if another project's request took it meanwhile
        (their hashes collided, ~1 in 32767 per pair of projects, and they were written in
        the same instant) this one moves on to its next hash. Left: of two processes adding
        *different participants* for one (study, project) at the same instant, the later
        import wins; there is still exactly one request, and `Assigner` refuses the other
        rule's participant on its next look."""
        for slot in request_slots(request.study_uid, request.project):
            taken = self._transfers(request.study_uid)
            mine = [row_request(r) for r in taken.values()
                    if r.get("transfer_project_name") == request.project]
            if mine:
                return min(mine, key=lambda r: r.instance)
            if slot in taken:
                continue
            self.import_rows(INCOMING, [request_row(replace(request, instance=slot),
                                                    (*TRANSFER_KEY_FIELDS,
                                                     "transfer_requested_date",
                                                     "transfer_source"))])
            stored = self._transfers(request.study_uid).get(slot)
            if stored and stored.get("transfer_project_name") == request.project:
                return row_request(stored)
        raise ControlPlaneError(f"study {request.study_uid} has no free transfers instance for "
                                f"project {request.project} in REDCap project {INCOMING}")

    def request_again(self, request: TransferRequest, source: str | None = None,
                      requested: str | None = None) -> TransferRequest:
        """Raise the stored revision by one. Two processes asking again at once may both
        write the same raised number; either way the request is pending, which is all a
        resend needs. The forwarder never writes `transfer_revision`."""
        stored = self._request_at(request.study_uid, request.instance)
        stored.revision += 1
        stored.requested = requested or now_iso()
        stored.complete = False
        if source is not None:
            stored.source = source
        self.import_rows(INCOMING, [request_row(stored, TRANSFER_ASK_FIELDS)], overwrite=True)
        return stored

    def reassign_request(self, request: TransferRequest, participant: str, event: str,
                         requested: str | None = None) -> TransferRequest:
        stored = self._request_at(request.study_uid, request.instance)
        stored.participant, stored.event = participant, event
        stored.revision += 1
        stored.requested = requested or now_iso()
        stored.complete = False
        stored.source = "reassign"
        self.import_rows(INCOMING, [request_row(stored, (*TRANSFER_KEY_FIELDS,
                                                         *TRANSFER_ASK_FIELDS))], overwrite=True)
        return stored

    def update_request(self, request: TransferRequest) -> None:
        if request.instance < 1:
            raise ControlPlaneError(f"request {request.key()} has no REDCap repeat instance; "
                                    f"it was not stored with add_request")
        self._check_fields()
        self.import_rows(INCOMING, [request_row(request, TRANSFER_OUTCOME_FIELDS)],
                         overwrite=True)

    # --- the region's shared key ----------------------------------------------------------------
    def claim_key_fingerprint(self, fingerprint: str) -> str:
        """Kept in the AutoID project (whose values depend on the key) as the record
        KEY_RECORD, which no auto-ID lookup matches (it has no project). The first node
        writes it; REDCap has no transactions, so two nodes starting at the same instant
        with different keys both read back the later one and the other is refused."""
        with self._write_lock:
            if not self._key_fingerprint():
                self.import_rows(AUTOID, [{RECORD_ID: KEY_RECORD, "autoid_project_name": "",
                                           "autoid_hash": fingerprint, "autoid_value": "",
                                           "autoid_method": KEY_RECORD}])
            return self._key_fingerprint()

    def _key_fingerprint(self) -> str:
        rows = self.export(AUTOID, records=[KEY_RECORD])
        return next((r.get("autoid_hash", "") for r in rows
                     if r.get(RECORD_ID) == KEY_RECORD), "")

    # --- coupling lists, routing rules, auto-ID ------------------------------------------------
    def coupling_rows(self) -> list[CouplingRow]:
        return sorted((row_coupling(r) for r in self.export(COUPLING)), key=lambda r: r.id)

    def coupling_rows_since(self, since: str | datetime) -> list[CouplingRow]:
        """Coupling rows created or changed since `since` (REDCap server time,
        "YYYY-MM-DD HH:MM:SS"), by `dateRangeBegin`: rows that arrive after their study."""
        return sorted((row_coupling(r) for r in self.export(COUPLING, since=since)),
                      key=lambda r: r.id)

    def add_coupling_rows(self, rows: list[CouplingRow]) -> None:
        if not rows:
            return
        data = [coupling_row(r, str(i)) for i, r in enumerate(rows, start=1)]
        answer = self.import_rows(COUPLING, data, auto_number=True)
        ids = _auto_ids(answer)
        if len(ids) != len(rows):
            raise ControlPlaneError(f"REDCap project {COUPLING} at {self.url} stored "
                                    f"{len(ids)} of {len(rows)} coupling rows ({answer!r})")
        for r, i in zip(rows, [str(i) for i in range(1, len(rows) + 1)], strict=True):
            r.id = _int(ids.get(i, 0))

    def routing_rules(self) -> list[RoutingRule]:
        return sorted((row_routing(r) for r in self.export(ROUTING) if r.get(RECORD_ID)),
                      key=lambda r: r.name)

    def save_routing_rule(self, rule: RoutingRule) -> None:
        self.import_rows(ROUTING, [routing_row(rule)], overwrite=True)

    def _autoid_rows(self, project: str, logic: str) -> list[dict]:
        rows = self.export(AUTOID, filter_logic=f"[autoid_project_name] = {_logic_str(project)}"
                                                f"{' and (' + logic + ')' if logic else ''}")
        return [r for r in rows if r.get("autoid_project_name") == project]

    def autoid(self, project: str, patient_hash: str) -> str | None:
        rows = self._autoid_rows(project, f"[autoid_hash] = {_logic_str(patient_hash)}")
        values = [r.get("autoid_value", "") for r in rows
                  if r.get("autoid_hash") == patient_hash and r.get("autoid_value")]
        return values[0] if values else None

    def autoid_values(self, project: str) -> set[str]:
        return {r["autoid_value"] for r in self._autoid_rows(project, "") if r.get("autoid_value")}

    def save_autoid(self, project: str, patient_hash: str, value: str, method: str) -> None:
        with self._write_lock:
            taken = [r for r in self._autoid_rows(
                        project, f"[autoid_hash] = {_logic_str(patient_hash)} or "
                                 f"[autoid_value] = {_logic_str(value)}")
                     if r.get("autoid_hash") == patient_hash or r.get("autoid_value") == value]
            if taken:
                raise ControlPlaneError(f"auto-ID {value!r} or this patient is taken in "
                                        f"{project} already")
            self.import_rows(AUTOID, [{RECORD_ID: "1", "autoid_project_name": project,
                                       "autoid_hash": patient_hash, "autoid_value": value,
                                       "autoid_method": method}], auto_number=True)

    # --- mirror into the research project ----------------------------------------------------
    def mirror_forwarded(self, request: TransferRequest, description: str) -> None:
        project = request.project
        if not self.has_token(project):
            raise ControlPlaneError(f"cannot record the forwarded study in project {project}'s "
                                    f"REDCap: no API token for {project!r} in "
                                    f"{self.tokens_file}")
        event = redcap_event(request.event)
        with self._write_lock:
            rows = [r for r in self.export(project, records=[request.participant],
                                           fields=[RECORD_ID], forms=["imaging"],
                                           events=[event])
                    if r.get(REPEAT_FORM) == "imaging" and r.get(EVENT, event) == event]
            if any(r.get("img_study_instance_uid") == request.mapped_uid for r in rows):
                return
            instance = max((_instance(r) for r in rows), default=0) + 1
            self.import_rows(project, [{
                RECORD_ID: request.participant, EVENT: event, REPEAT_FORM: "imaging",
                REPEAT_INSTANCE: str(instance), "img_study_instance_uid": request.mapped_uid,
                "img_event_name": request.event, "img_study_description": description}])

    def imaging(self, project: str) -> list[dict]:
        if not self.has_token(project):
            return []
        rows = self.export(project, fields=[RECORD_ID], forms=["imaging"])
        return [{"participant": r.get(RECORD_ID, ""),
                 "event": r.get("img_event_name") or plain_event(r.get(EVENT, "")),
                 "study_uid": r.get("img_study_instance_uid", ""),
                 "description": r.get("img_study_description", "")}
                for r in rows if r.get(REPEAT_FORM) == "imaging"
                and r.get("img_study_instance_uid")]


    # --- inventory of the research PACS ------------------------------------------------------
    def _inventory_rows(self, project: str | None, fields: Iterable[str] = ()) -> list[dict]:
        logic = f"[inv_project] = {_logic_str(project)}" if project is not None else ""
        rows = self.export(INVENTORY, fields=fields, filter_logic=logic)
        return [r for r in rows if r.get(RECORD_ID)
                and (project is None or r.get("inv_project") == project)]

    def inventory(self, project: str | None = None) -> list[InventoryEntry]:
        return sorted(map(row_inventory, self._inventory_rows(project)),
                      key=lambda e: e.study_uid)

    def replace_inventory(self, project: str | None, entries: list[InventoryEntry]) -> None:
        """Import the entries, then delete the scope's records that are not among them.
        REDCap has no transactions: a run cut off in between leaves studies the PACS lost
        listed until the next run, but never drops one it holds."""
        check_inventory_scope(project, entries)
        stored = {r[RECORD_ID] for r in self._inventory_rows(project, [RECORD_ID, "inv_project"])}
        rows = [inventory_row(e) for e in entries]
        for start in range(0, len(rows), INVENTORY_BATCH):
            self.import_rows(INVENTORY, rows[start:start + INVENTORY_BATCH], overwrite=True)
        gone = sorted(stored - {e.study_uid for e in entries})
        for start in range(0, len(gone), INVENTORY_BATCH):
            data = {"content": "record", "action": "delete"}
            data.update((f"records[{i}]", uid)
                        for i, uid in enumerate(gone[start:start + INVENTORY_BATCH]))
            self._post(INVENTORY, data)


def _error_text(resp: requests.Response) -> str:
    try:
        value = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason or ""
    if isinstance(value, dict) and "error" in value:
        return str(value["error"])
    return str(value)[:300]


def _auto_ids(answer: Any) -> dict[str, str]:
    """returnContent=auto_ids answers ["new,old", ...]: old (our placeholder) -> new id."""
    out = {}
    if isinstance(answer, list):
        for item in answer:
            new, _, old = str(item).partition(",")
            out[old.strip()] = new.strip()
    return out
