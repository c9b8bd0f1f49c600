"""The control plane: one interface, several backends (SQLite `local`, `redcap`).

It holds what people decide and see: projects, participants, incoming studies, transfer
requests, coupling lists, routing rules and auto-ID mappings. Backends are found by name in a
registry (`fiona.control.open_control_plane`), as mercure finds its target types. Records are
plain dataclasses, as pydicom's data objects are: a backend only stores and fetches them; the
rules for assignment live in `fiona.control.assign`, once for every backend.

Patient identifiers never reach a backend in clear text: incoming studies carry keyed
HMAC-SHA256 values (`fiona.control.keyed`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from datetime import date, datetime

from ..clock import SYSTEM_CLOCK, Clock

APPROVAL_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class ControlPlaneError(Exception):
    """The control plane refused or could not be reached; the text names what and why."""


class Unavailable(ControlPlaneError):
    """The backend cannot be reached now (network, server down); callers retry later."""


@dataclass
class Project:
    """A research project (DataTransferProjects; the local `projects` table)."""

    name: str                                  # acronym: the key everywhere
    naming: str = r"^[A-Za-z0-9_-]+$"          # project_patient_naming: regex for participant IDs
    events: list[str] = field(default_factory=lambda: ["baseline"])
    long_name: str = ""
    contact: str = ""
    contact_email: str = ""
    active: bool = True
    use_autoid: bool = False
    autoid_aetitle: str = ""
    features: set[int] = field(default_factory=set)  # 0 drop PR, 1 never pixel-mask, 2 drop SC
    rec_start: str = ""                        # ethics approval period, YYYY-MM-DD
    rec_end: str = ""
    import_rule_tag: str = ""
    import_rule_regexp: str = ""
    pixel_exclusions: list[tuple[str, str]] = field(default_factory=list)
    #: the de-identification profile its studies go through (`fiona.deid.pipeline.settings_for`:
    #: the site's `DATADIR/config/profiles/NAME.json`, else the shipped one)
    deid_profile: str = "default"

    def check_participant(self, participant: str) -> None:
        """Refuse a participant ID that the project's naming rule does not allow."""
        if not re.fullmatch(self.naming, participant or ""):
            raise ControlPlaneError(f"participant ID {participant!r} does not match project "
                                    f"{self.name}'s naming rule {self.naming}")

    def approval_problem(self, today: date) -> str:
        """Why studies may not go to the project on `today`, or "" if they may: it is
        inactive, or `today` is outside its ethics approval period (both ends inclusive, an
        empty end open). An unreadable date counts as a problem: better late than unapproved."""
        if not self.active:
            return f"project {self.name} is inactive"
        ends = {}
        for which in ("start", "end"):
            text = getattr(self, f"rec_{which}").strip()
            try:
                ends[which] = date.fromisoformat(text) if text else None
                if text and not APPROVAL_DATE.fullmatch(text):
                    raise ValueError(text)
            except ValueError:
                return (f"project {self.name}'s ethics approval {which} date {text!r} is not "
                        f"YYYY-MM-DD; correct the project")
        if ends["start"] and today < ends["start"]:
            return f"project {self.name}'s ethics approval starts on {ends['start']}"
        if ends["end"] and today > ends["end"]:
            return f"project {self.name}'s ethics approval ended on {ends['end']}"
        return ""

    def check_event(self, event: str) -> None:
        if event not in self.events:
            raise ControlPlaneError(f"project {self.name} has no event {event!r}; its events "
                                    f"are: {', '.join(self.events)}")


@dataclass
class Series:
    """One series of an incoming study, as the Assign page lists it."""

    uid: str
    description: str = ""
    date: str = ""
    time: str = ""
    num_files: int = 0
    sequence_name: str = ""
    classify_types: list[str] = field(default_factory=list)
    modality: str = ""


@dataclass
class Study:
    """An incoming study (the Incoming project's record), identifiers keyed."""

    uid: str
    patient_name_hash: str = ""
    patient_id_hash: str = ""
    institution: str = ""
    calling_ae: str = ""       # study_aetitle_sender
    called_ae: str = ""        # study_aetitle_addressed
    description: str = ""
    date: str = ""
    time: str = ""
    accession: str = ""
    arrival: str = ""          # ISO timestamp of arrival
    series: list[Series] = field(default_factory=list)
    hidden: bool = False       # removed from the Assign list by remove-old-entries
    node: str = ""             # the FIONA node that holds it (NODE); "" before nodes existed
    #: other nodes that received series of it too (a split study; `registration` keeps them
    #: apart: the study stays the first node's, its series are not merged)
    split_nodes: list[str] = field(default_factory=list)

    @property
    def split(self) -> bool:
        return bool(self.split_nodes)


#: how a held request's message starts (the forwarder writes it, status and cleanup read it)
HELD_PREFIX = "held:"


def held_message(reason: str) -> str:
    """The message of a request the forwarder holds back while its project is closed."""
    return f"{HELD_PREFIX} {reason}; it is sent when the project is open again"


@dataclass
class TransferRequest:
    """A request to de-identify and forward one study for (project, participant, event).

    Whether it is pending is decided by revision numbers, not clocks: creating it is revision
    1, every resend or amendment raises `revision` (`ControlPlane.request_again`), and the
    forwarder records the revision it completed or failed as `done_revision`. Comparing
    second-resolution timestamps lost a resend made in the same second as a completion, and
    the forwarder finishing an older revision while a resend raised it leaves the request
    pending, as it should. `transferred` and `requested` are for people to read."""

    study_uid: str
    project: str
    participant: str
    event: str
    requested: str             # ISO timestamp of the last ask
    instance: int = 0          # backend's id (REDCap repeat instance, SQLite row id)
    transferred: str = ""      # ISO timestamp of the last completed or failed transfer
    mapped_uid: str = ""
    error_flags: set[int] = field(default_factory=set)  # 1 de-identification, 2 send, 3 masking
    error_message: str = ""    # also why a pending request is held
    active_proc_time: float = 0.0
    complete: bool = False
    source: str = ""           # how it came: assign, coupling, routing, autoid, amendment
    revision: int = 1          # raised by every resend or amendment
    done_revision: int = 0     # the revision the forwarder completed or failed
    node: str = ""             # read only: the node of its study (`Study.node`), never stored

    @property
    def pending(self) -> bool:
        return self.revision > self.done_revision

    @property
    def held(self) -> bool:
        """Pending, and held back by the forwarder (its project closed): see `held_message`."""
        return self.pending and self.error_message.startswith(HELD_PREFIX)

    def key(self) -> tuple[str, str, str, str]:
        return (self.study_uid, self.project, self.participant, self.event)


@dataclass
class CouplingRow:
    """One row of a coupling list: a study (by accession number or UID) for a participant."""

    accession: str
    project: str
    participant: str
    event: str
    study_uid: str = ""
    added: str = ""
    id: int = 0


@dataclass
class RoutingRule:
    """Assign already-pseudonymized data by AE titles and an anchored PatientID/Name regex."""

    name: str
    project: str
    event: str
    active: bool = True
    called_ae: str = ""        # routing_incoming_aetitle (empty: any)
    calling_ae: str = ""       # routing_sending_aetitle (empty: any)
    patient_id_regex: str = ""
    patient_name_regex: str = ""


@dataclass
class InventoryEntry:
    """One study the research PACS holds, as `fiona inventory` (the original's whatIsInIDS7)
    found it by C-FIND. Values are the de-identified study's: `project` from InstitutionName,
    `participant` its PatientID, `event` its ClinicalTrialTimePointID (what the
    de-identification writes there), `study_date` its (shifted) StudyDate as YYYY-MM-DD.
    `first_seen`/`last_seen` are when an inventory first and last found it."""

    study_uid: str
    project: str
    participant: str = ""
    event: str = ""
    study_date: str = ""
    series: int = 0
    instances: int = 0
    modalities: list[str] = field(default_factory=list)
    first_seen: str = ""
    last_seen: str = ""
    node: str = ""             # the node that delivered it ("" unknown: delivered otherwise)


def takes(node: str | None, holder: str) -> bool:
    """Whether the node `node` does the work of a study held by `holder`: every node when
    `node` is None (no filter), and a study of no node (registered before nodes existed) is
    everybody's, as it was then. The one rule for every backend and caller."""
    return node is None or not holder or holder == node


def registration(stored: Study | None, new: Study) -> Study:
    """What `register_study` stores when `new` arrives and `stored` is there: `new` (series
    merged by UID, arrival and hidden kept) when it is the same node's study or a new one;
    when another node holds the study already (its series went to two hospitals), the stored
    study unchanged but for `new.node` added to its `split_nodes`, so it is neither merged
    nor doubled, and reported. The one rule for every backend."""
    if stored is None:
        return new
    if takes(new.node or None, stored.node):
        series = {s.uid: s for s in stored.series}
        series.update((s.uid, s) for s in new.series)
        return replace(new, series=[series[k] for k in sorted(series)], hidden=stored.hidden,
                       node=stored.node or new.node, split_nodes=list(stored.split_nodes))
    if new.node not in stored.split_nodes:
        return replace(stored, split_nodes=sorted({*stored.split_nodes, new.node}))
    return stored


class ControlPlane(ABC):
    """What every backend provides. Methods raise Unavailable when the backend cannot be
    reached (callers keep the work and retry) and ControlPlaneError when it refuses."""

    kind: str = ""

    @abstractmethod
    def test_connection(self) -> None:
        """Raise ControlPlaneError with a clear reason unless the backend is usable."""

    # --- projects and participants ------------------------------------------------------------
    @abstractmethod
    def projects(self) -> list[Project]: ...

    def project(self, name: str) -> Project:
        for p in self.projects():
            if p.name == name:
                return p
        raise ControlPlaneError(f"no project {name!r}; known: "
                                f"{', '.join(p.name for p in self.projects()) or 'none'}")

    @abstractmethod
    def save_project(self, project: Project) -> None: ...

    @abstractmethod
    def participants(self, project: str) -> list[str]: ...

    @abstractmethod
    def add_participant(self, project: str, participant: str) -> None:
        """Create the participant (idempotent); the caller has checked the naming rule."""

    # --- incoming studies -----------------------------------------------------------------------
    @abstractmethod
    def register_study(self, study: Study) -> Study:
        """Insert or update a study and its series as `registration` says (series merged by
        UID; another node's study is marked split, not merged) and return what is stored."""

    @abstractmethod
    def studies(self, include_hidden: bool = False) -> list[Study]: ...

    def study(self, uid: str) -> Study | None:
        for s in self.studies(include_hidden=True):
            if s.uid == uid:
                return s
        return None

    @abstractmethod
    def hide_studies_before(self, arrival_before: datetime) -> int:
        """Take unassigned studies that arrived before the time off the Assign list."""

    # --- transfer requests ------------------------------------------------------------------------
    @abstractmethod
    def requests(self, study_uid: str | None = None) -> list[TransferRequest]: ...

    @abstractmethod
    def add_request(self, request: TransferRequest) -> TransferRequest:
        """Store a request unless the study has one in the project already, and return the
        stored one either way: the caller compares its participant and event with what it
        asked for. Idempotent per (study, project), also when two processes add at once:
        never two requests for one (study, project), and never one lost."""

    @abstractmethod
    def request_again(self, request: TransferRequest, source: str | None = None,
                      requested: str | None = None) -> TransferRequest:
        """Ask for a stored request again (resend, amendment): raise its revision, set
        `requested` (now by default), clear `complete` and, if given, set `source`. Returns
        the stored request; it is pending until the forwarder completes the new revision."""

    @abstractmethod
    def reassign_request(self, request: TransferRequest, participant: str, event: str,
                         requested: str | None = None) -> TransferRequest:
        """Move a stored request to another participant and event and ask for it again as
        `request_again` does, with source "reassign". Returns the stored request."""

    @abstractmethod
    def update_request(self, request: TransferRequest) -> None:
        """Write back the forwarder's outcome: transferred, mapped UID, error flags and
        message, processing time, complete and done_revision. Never the key, `revision`,
        `requested` or `source`, which only `add_request` and `request_again` write, so an
        outcome based on an older read cannot undo a resend made meanwhile."""

    def pending_requests(self, node: str | None = None,
                         claim: bool = False) -> list[TransferRequest]:
        """Requests waiting to be sent, oldest first; with `node`, only those that node
        does (`takes`): a node never sees, so never fails, another node's request. With
        `claim`, a backend that several forwarders may share (SQL) returns only requests no
        other client holds and holds them for this one (`fiona.control.sql`); elsewhere
        (REDCap: one forwarder per node) every pending request."""
        return sorted((r for r in self.requests() if r.pending and takes(node, r.node)),
                      key=lambda r: r.requested)

    def renew_claim(self, request: TransferRequest) -> bool:
        """Whether this client still holds its claim on `request` (read with `claim=True`),
        renewing it if so: a forwarder asks before it sends each request of its batch, so a
        lease that ran out meanwhile (another forwarder took the request) is never sent
        twice. Backends without claims (one forwarder per node) hold everything."""
        return True

    # --- the region's shared key ----------------------------------------------------------------
    @abstractmethod
    def claim_key_fingerprint(self, fingerprint: str) -> str:
        """Record `fingerprint` (`Keyed.fingerprint`) unless one is recorded already, and
        return the recorded one: nodes that share a control plane must share the key."""

    # --- coupling lists, routing rules, auto-ID ------------------------------------------------
    @abstractmethod
    def coupling_rows(self) -> list[CouplingRow]: ...

    @abstractmethod
    def add_coupling_rows(self, rows: list[CouplingRow]) -> None: ...

    @abstractmethod
    def routing_rules(self) -> list[RoutingRule]: ...

    @abstractmethod
    def save_routing_rule(self, rule: RoutingRule) -> None: ...

    @abstractmethod
    def autoid(self, project: str, patient_hash: str) -> str | None:
        """The participant ID already given to this (keyed) patient in the project."""

    @abstractmethod
    def autoid_values(self, project: str) -> set[str]: ...

    @abstractmethod
    def save_autoid(self, project: str, patient_hash: str, value: str, method: str) -> None: ...

    # --- mirror into the research project ----------------------------------------------------
    @abstractmethod
    def mirror_forwarded(self, request: TransferRequest, description: str) -> None:
        """Record a forwarded study with the participant in the project's own tables
        (REDCap: the participant record in the event, an `imaging` instance)."""

    @abstractmethod
    def imaging(self, project: str) -> list[dict]:
        """What `mirror_forwarded` recorded for a project: dicts with participant, event,
        study_uid (the mapped, de-identified one) and description."""

    # --- inventory of the research PACS ------------------------------------------------------
    @abstractmethod
    def inventory(self, project: str | None = None) -> list[InventoryEntry]:
        """The stored inventory of `project` (None: of every project), by study UID."""

    @abstractmethod
    def replace_inventory(self, project: str | None, entries: list[InventoryEntry]) -> None:
        """Make the stored inventory of `project` (None: of the whole PACS) exactly `entries`:
        entries are stored as given (an existing study UID is overwritten) and stored entries
        of that scope that are not among them are removed, as the PACS no longer holds them.
        An entry of another project than `project` is refused."""


def check_inventory_scope(project: str | None, entries: list[InventoryEntry]) -> None:
    """`replace_inventory`'s rule, for every backend: a project's inventory holds only that
    project's studies, and a study UID at most once."""
    if project is not None:
        stray = sorted({e.project for e in entries if e.project != project})
        if stray:
            raise ControlPlaneError(f"the inventory of project {project} cannot hold studies "
                                    f"of {', '.join(map(repr, stray))}")
    uids = [e.study_uid for e in entries]
    if len(uids) != len(set(uids)):
        raise ControlPlaneError("an inventory lists each study once; a study UID repeats")


def now_iso(clock: Clock = SYSTEM_CLOCK) -> str:
    """Timestamps are ISO strings to the second in local time, as REDCap shows them."""
    return clock.now().replace(microsecond=0).isoformat(sep=" ")


def today() -> str:
    return date.today().isoformat()
