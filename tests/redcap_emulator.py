"""A REDCap API server for tests: the real HTTP protocol, an in-memory store.

FIONA's `redcap` control-plane backend talks to REDCap over its HTTP API. Tests need a peer
that answers the way REDCap does (flat rows, repeat instances, `field___code` checkboxes,
`{"error": ...}` with HTTP 400/403, connection refused when the server is down), without a
PHP/MySQL installation. This module is that peer: a stdlib `ThreadingHTTPServer` on
127.0.0.1 implementing the API methods FIONA uses, following the REDCap API documentation
(Export/Import/Delete Records, Export Metadata, Export/Import Events, Export Instrument-Event
Mappings, Export Project Info, Generate Next Record Name, Export Repeating Instruments and
Events, Export REDCap Version).

Projects are built from the data dictionaries in `config/redcap/` (the files an administrator
uploads), so the tests exercise the schema that is deployed.

Simplifications (REDCap behaviour the emulator does not reproduce):
- JSON only (`format=json`); `type=flat` only; `rawOrLabel=raw` only. Survey, DAG and
  checkbox-label export options are ignored.
- Arms exist only as the `arm_num` of events (no arm names), and every instrument is
  designated for every event (Export Instrument-Event Mappings lists every pair).
- A base row (no repeat instrument) exists for every record-event that was ever imported, so
  it is exported even when all its fields are blank. Repeat-instance rows are exported only
  when the selected fields include a field of their instrument.
- filterLogic: comparisons `[field] op value` with op `= <> != > < >= <=`, checkbox
  `[field(code)]`, `and`/`or` (case-insensitive, `and` binds tighter) and parentheses; no
  functions, arithmetic or `[event][field]` prefixes (these give HTTP 400). It is evaluated
  per record (per record-event in longitudinal projects), and matching record-events are
  exported whole. A field on a repeating instrument matches if any of its instances (in that
  event) matches, each comparison on its own: `[a] = '1' and [b] = '2'` with `a`, `b` on one
  repeating instrument can be satisfied by two different instances. Numeric comparison when
  both sides are numbers, else string comparison; `<`, `>`, `<=`, `>=` with a blank side are
  false.
- dateRangeBegin/dateRangeEnd compare with each record's last modification time at one-second
  resolution, strictly ("after"/"before", as the REDCap documentation words it). An import
  that changes no stored value does not touch the modification time (REDCap logs no change).
- Import validates record id, event, repeat instrument/instance, field names, choice codes and
  the validation types integer, number, date_ymd, datetime_ymd, datetime_seconds_ymd, time and
  email; min/max are not checked (REDCap only warns). `forceAutoNumber` works whether or not
  the project has auto-numbering enabled. `dateFormat` is always YMD.
- Delete Records deletes whole records (`arm`, `instrument`, `event`, `repeat_instance` give
  HTTP 400) and answers the number of deleted records as a bare JSON number, as REDCap does.
- Event import adds events only (`override=1` gives HTTP 400) and computes `unique_event_name`
  as `<lowercased name, non-alphanumerics as _>_arm_<n>`, without REDCap's truncation of long
  names.
- Every request is answered under one lock, one at a time.
"""

from __future__ import annotations

import csv
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl

DICTIONARIES_DIR = Path(__file__).resolve().parent.parent / "config" / "redcap"
VERSION = "13.1.0"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# The data dictionary CSV header, as REDCap's "Download the current Data Dictionary" writes it.
DICTIONARY_HEADER = [
    "Variable / Field Name", "Form Name", "Section Header", "Field Type", "Field Label",
    "Choices, Calculations, OR Slider Labels", "Field Note",
    "Text Validation Type OR Show Slider Number", "Text Validation Min", "Text Validation Max",
    "Identifier?", "Branching Logic (Show field only if...)", "Required Field?",
    "Custom Alignment", "Question Number (surveys only)", "Matrix Group Name", "Matrix Ranking?",
    "Field Annotation",
]
# The same columns under the names Export Metadata uses.
METADATA_KEYS = [
    "field_name", "form_name", "section_header", "field_type", "field_label",
    "select_choices_or_calculations", "field_note", "text_validation_type_or_show_slider_number",
    "text_validation_min", "text_validation_max", "identifier", "branching_logic",
    "required_field", "custom_alignment", "question_number", "matrix_group_name",
    "matrix_ranking", "field_annotation",
]
# Parameters REDCap takes as arrays: `records[0]=a&records[1]=b`, `records[]=a`, or `records=a,b`.
ARRAY_PARAMS = ("records", "fields", "forms", "events", "arms")

EVENT_COLUMN = "redcap_event_name"
INSTRUMENT_COLUMN = "redcap_repeat_instrument"
INSTANCE_COLUMN = "redcap_repeat_instance"

# Field types that hold no data, as in REDCap (they are in the metadata, not in records).
NO_DATA_TYPES = {"descriptive"}
CHOICE_TYPES = {"radio", "dropdown", "checkbox"}
VALIDATION_PATTERNS = {
    "integer": re.compile(r"[-+]?\d+"),
    "number": re.compile(r"[-+]?\d*\.?\d+([eE][-+]?\d+)?"),
    "time": re.compile(r"([01]\d|2[0-3]):[0-5]\d"),
    "email": re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+"),
}
VALIDATION_DATE_FORMATS = {
    "date_ymd": "%Y-%m-%d",
    "datetime_ymd": "%Y-%m-%d %H:%M",
    "datetime_seconds_ymd": "%Y-%m-%d %H:%M:%S",
}
NOT_VALIDATED = ("The value you provided could not be validated because it does not follow the "
                 "expected format. Please try again.")

Params = dict[str, str | list[str]]
RowKey = tuple[str, str, int]  # (unique event name or "", repeat instrument or "", instance or 0)


class ApiError(Exception):
    """An API error answer: REDCap sends `{"error": message}` with HTTP 400 (403 for auth)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def _error_line(record: str, column: str, value: str, message: str) -> str:
    """One line of an import error, in the quoted CSV form REDCap reports per data point."""
    return f'"{record}","{column}","{value}","{message}"'


def _natural_key(name: str) -> tuple[int, int, str]:
    """Order record names as REDCap lists them: numbers numerically, before other names."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[-+]?\d*\.?\d+", text) is not None


# --- data dictionaries --------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One field of a data dictionary, with what import validation and export need."""

    name: str
    form: str
    type: str
    validation: str
    codes: tuple[str, ...]
    metadata: dict[str, str]

    def columns(self) -> list[str]:
        """The flat-format columns of the field: one per choice for a checkbox."""
        if self.type == "checkbox":
            return [f"{self.name}___{code}" for code in self.codes]
        return [self.name]


def _choice_codes(field_type: str, choices: str) -> tuple[str, ...]:
    """Raw codes of a multiple-choice field ("1, label | 2, label" -> ("1", "2"))."""
    if field_type in ("yesno", "truefalse"):
        return ("0", "1")
    if field_type not in CHOICE_TYPES:
        return ()
    return tuple(part.split(",", 1)[0].strip().lower() for part in choices.split("|")
                 if part.strip())


class Dictionary:
    """A REDCap data dictionary (the CSV an administrator uploads), parsed and checked.

    Raises ValueError for a file REDCap would refuse: wrong header, no fields, a repeated
    field name.
    """

    def __init__(self, path: Path):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != DICTIONARY_HEADER:
                raise ValueError(f"{path}: header is not REDCap's data dictionary header: "
                                 f"{header}")
            rows = [row for row in reader if any(cell.strip() for cell in row)]
        if not rows:
            raise ValueError(f"{path}: no fields")
        self.fields: list[Field] = []
        for row in rows:
            if len(row) != len(DICTIONARY_HEADER):
                raise ValueError(f"{path}: {len(row)} columns in row {row}")
            meta = dict(zip(METADATA_KEYS, row, strict=True))
            self.fields.append(Field(
                name=meta["field_name"], form=meta["form_name"], type=meta["field_type"],
                validation=meta["text_validation_type_or_show_slider_number"],
                codes=_choice_codes(meta["field_type"], meta["select_choices_or_calculations"]),
                metadata=meta))
        names = [f.name for f in self.fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{path}: repeated field names {duplicates}")
        self.record_id = self.fields[0].name
        self.forms: list[str] = list(dict.fromkeys(f.form for f in self.fields))
        self.by_name = {f.name: f for f in self.fields}
        # Every data column in export order, mapped to its form and field (None: `_complete`).
        self.columns: dict[str, tuple[str, Field | None]] = {}
        for form in self.forms:
            for f in self.fields:
                if f.form == form and f.type not in NO_DATA_TYPES:
                    for column in f.columns():
                        self.columns[column] = (form, f)
            self.columns[f"{form}_complete"] = (form, None)

    def data_columns(self) -> list[str]:
        """Every data column but the record id, which REDCap puts first on each row."""
        return [c for c in self.columns if c != self.record_id]

    def form_columns(self, form: str) -> list[str]:
        return [c for c, (f, _) in self.columns.items() if f == form]


# --- filterLogic ---------------------------------------------------------------------------

_LOGIC_TOKEN = re.compile(r"""\s*(?:
    (?P<ref>\[[^\]]*\])
  | (?P<str>'[^']*'|"[^"]*")
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<op><>|!=|>=|<=|=|<|>)
  | (?P<paren>[()])
  | (?P<word>[A-Za-z_]+)
)""", re.VERBOSE)


class FilterLogic:
    """A parsed filterLogic expression (the subset listed in the module docstring).

    Unsupported syntax raises ApiError rather than matching everything, so a query FIONA
    builds that real REDCap might read differently fails loudly in tests.
    """

    def __init__(self, text: str, dictionary: Dictionary):
        self._dictionary = dictionary
        self._tokens = self._tokenize(text)
        self._pos = 0
        self._tree = self._parse_or()
        if self._pos != len(self._tokens):
            raise self._invalid(f"unexpected {self._tokens[self._pos][1]!r}")

    @staticmethod
    def _invalid(why: str) -> ApiError:
        return ApiError(f"The filterLogic parameter is not valid: {why}")

    def _tokenize(self, text: str) -> list[tuple[str, str]]:
        tokens, pos = [], 0
        while pos < len(text.rstrip()):
            m = _LOGIC_TOKEN.match(text, pos)
            if not m:
                raise self._invalid(f"cannot read {text[pos:].strip()!r}")
            kind = m.lastgroup
            tokens.append((kind, m.group(kind)))
            pos = m.end()
        return tokens

    def _peek(self) -> tuple[str, str] | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _take(self, kind: str) -> str:
        token = self._peek()
        if token is None or token[0] != kind:
            raise self._invalid(f"expected {kind}, found {token[1] if token else 'end'!r}")
        self._pos += 1
        return token[1]

    def _at_word(self, word: str) -> bool:
        token = self._peek()
        return token is not None and token[0] == "word" and token[1].lower() == word

    def _parse_or(self) -> tuple:
        terms = [self._parse_and()]
        while self._at_word("or"):
            self._pos += 1
            terms.append(self._parse_and())
        return ("or", terms)

    def _parse_and(self) -> tuple:
        terms = [self._parse_atom()]
        while self._at_word("and"):
            self._pos += 1
            terms.append(self._parse_atom())
        return ("and", terms)

    def _parse_atom(self) -> tuple:
        token = self._peek()
        if token == ("paren", "("):
            self._pos += 1
            node = self._parse_or()
            self._take("paren")
            return node
        left = self._operand()
        op = self._take("op")
        right = self._operand()
        return ("cmp", left, op, right)

    def _operand(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise self._invalid("unexpected end")
        kind, text = token
        self._pos += 1
        if kind == "str":
            return ("lit", text[1:-1])
        if kind == "num":
            return ("lit", text)
        if kind == "ref":
            if self._peek() is not None and self._peek()[0] == "ref":
                raise self._invalid("[event][field] references are not supported by the emulator")
            return ("ref", self._column(text[1:-1].strip()))
        raise self._invalid(f"unexpected {text!r}")

    def _column(self, ref: str) -> str:
        """The data column a `[field]` or `[field(code)]` reference reads."""
        m = re.fullmatch(r"(\w+)(?:\((\w+)\))?", ref)
        if not m:
            raise self._invalid(f"[{ref}] is not a field reference")
        name, code = m.group(1), m.group(2)
        f = self._dictionary.by_name.get(name)
        if f is None:
            if code is None and name in self._dictionary.columns:  # a `<form>_complete` field
                return name
            raise self._invalid(f"[{ref}]: no such field")
        if f.type == "checkbox":
            if code is None or code.lower() not in f.codes:
                raise self._invalid(f"[{ref}]: a checkbox needs [{name}(code)] with a valid code")
            return f"{name}___{code.lower()}"
        if code is not None:
            raise self._invalid(f"[{ref}]: only checkboxes take a (code)")
        return name

    def matches(self, values_of: Callable[[str], list[str]]) -> bool:
        """Evaluate for one record(-event); `values_of(column)` gives the candidate values."""
        return self._eval(self._tree, values_of)

    def _eval(self, node: tuple, values_of: Callable[[str], list[str]]) -> bool:
        if node[0] == "or":
            return any(self._eval(n, values_of) for n in node[1])
        if node[0] == "and":
            return all(self._eval(n, values_of) for n in node[1])
        _, left, op, right = node
        lefts = values_of(left[1]) if left[0] == "ref" else [left[1]]
        rights = values_of(right[1]) if right[0] == "ref" else [right[1]]
        return any(_compare(a, op, b) for a in lefts for b in rights)


def _compare(a: str, op: str, b: str) -> bool:
    numeric = _is_number(a) and _is_number(b)
    if op in ("=", "<>", "!="):
        equal = float(a) == float(b) if numeric else a == b
        return equal if op == "=" else not equal
    if a == "" or b == "":
        return False
    x, y = (float(a), float(b)) if numeric else (a, b)
    return {"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]


# --- projects ------------------------------------------------------------------------------

@dataclass
class Event:
    name: str
    arm: int
    unique_name: str
    event_id: int


def _unique_event_name(name: str, arm: int) -> str:
    return f"{re.sub(r'[^a-z0-9]', '_', name.lower())}_arm_{arm}"


@dataclass
class Project:
    """One REDCap project: its settings and its records as flat rows."""

    project_id: int
    title: str
    dictionary: Dictionary
    repeating: list[str]
    longitudinal: bool
    events: list[Event]
    creation_time: str
    # record name -> row key -> stored values by data column (only values ever written)
    records: dict[str, dict[RowKey, dict[str, str]]] = field(default_factory=dict)
    modified: dict[str, datetime] = field(default_factory=dict)

    def event_names(self) -> list[str]:
        return [e.unique_name for e in self.events] if self.longitudinal else [""]

    def key_columns(self) -> list[str]:
        """The columns REDCap puts before the fields: record id, event, repeat columns."""
        columns = [self.dictionary.record_id]
        if self.longitudinal:
            columns.append(EVENT_COLUMN)
        if self.repeating:
            columns += [INSTRUMENT_COLUMN, INSTANCE_COLUMN]
        return columns

    def flat_row(self, record: str, key: RowKey, values: dict[str, str],
                 columns: list[str]) -> dict[str, object]:
        """One exported row: fields of other instruments blank, unset checkboxes "0"."""
        event, instrument, instance = key
        row: dict[str, object] = {self.dictionary.record_id: record}
        if self.longitudinal:
            row[EVENT_COLUMN] = event
        if self.repeating:
            row[INSTRUMENT_COLUMN] = instrument
            # REDCap's JSON gives the instance as a number on repeat rows, "" on base rows.
            row[INSTANCE_COLUMN] = instance if instrument else ""
        for column in columns:
            form, f = self.dictionary.columns[column]
            on_this_row = form == instrument if instrument else form not in self.repeating
            if not on_this_row:
                row[column] = ""
            elif f is None or f.type == "checkbox":
                row[column] = values.get(column) or "0"
            else:
                row[column] = values.get(column, "")
        return row

    def sorted_rows(self, record: str) -> list[tuple[RowKey, dict[str, str]]]:
        """A record's rows in REDCap's export order: event, base row, instrument, instance."""
        events = self.event_names()
        forms = self.dictionary.forms
        return sorted(self.records[record].items(),
                      key=lambda kv: (events.index(kv[0][0]),
                                      forms.index(kv[0][1]) + 1 if kv[0][1] else 0, kv[0][2]))

    def next_record_name(self) -> str:
        numbers = [int(r) for r in self.records if r.isdigit()]
        return str(max(numbers, default=0) + 1)


# --- the server ----------------------------------------------------------------------------

def _parse_params(body: str) -> Params:
    """Decode a form body, gathering REDCap's array parameters into lists."""
    params: Params = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        m = re.fullmatch(r"(\w+)\[\d*\]", key)
        if m:
            existing = params.setdefault(m.group(1), [])
            if isinstance(existing, list):
                existing.append(value)
        else:
            params[key] = value
    for name in ARRAY_PARAMS:
        value = params.get(name)
        if isinstance(value, str):
            params[name] = [part.strip() for part in value.split(",") if part.strip()]
    return params


def _scalar(params: Params, name: str, default: str = "") -> str:
    value = params.get(name, default)
    if isinstance(value, list):
        raise ApiError(f"The parameter '{name}' must be a single value")
    return value


def _array(params: Params, name: str) -> list[str]:
    value = params.get(name, [])
    return value if isinstance(value, list) else [value]


def _flag(params: Params, name: str) -> bool:
    return _scalar(params, name, "false").lower() in ("true", "1")


def _json(value: object) -> tuple[int, str, str]:
    return 200, "application/json; charset=utf-8", json.dumps(value)


def _text(value: str) -> tuple[int, str, str]:
    return 200, "text/plain; charset=utf-8", value


class _Handler(BaseHTTPRequestHandler):
    """Hands each POST to the emulator; HTTP/1.0, so every request closes its connection
    and a stopped emulator refuses the next one."""

    server: _Server

    def do_POST(self) -> None:
        if self.path.split("?")[0].rstrip("/") != "/api":
            self._send(404, "application/json", json.dumps({"error": "Not found"}))
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8")
        self._send(*self.server.emulator.handle(_parse_params(body)))

    def do_GET(self) -> None:
        self._send(400, "application/json", json.dumps({"error": "The REDCap API takes POST"}))

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: test output should show the test's own failures, not an access log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: the standard library's 5 overflows when many clients connect at once (the kernel then
    #: resets some); a REDCap behind Apache or nginx queues hundreds
    request_queue_size = 128
    emulator: RedcapEmulator


class RedcapEmulator:
    """REDCap's API on 127.0.0.1 for tests; see the module docstring for what it covers.

    Typical use::

        emu = RedcapEmulator()
        emu.add_from_manifest({"Incoming": "TOKEN1", "Routing": "TOKEN2", "ABCD": "TOKEN3"})
        url = emu.start()           # "http://127.0.0.1:PORT/api/"
        ...
        emu.stop()                  # REDCap down: connection refused
        emu.restart()               # up again on the same port, data kept
    """

    def __init__(self, dictionaries_dir: Path = DICTIONARIES_DIR,
                 clock: Callable[[], datetime] = datetime.now):
        """`clock` gives the server time for modification times and creation_time; tests
        of dateRangeBegin pass a controllable one instead of sleeping."""
        self.dictionaries_dir = Path(dictionaries_dir)
        self.requests: list[dict] = []
        self._clock = clock
        self._projects: dict[str, Project] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- set-up -------------------------------------------------------------------------

    def add_project(self, token: str, title: str, dictionary: str, *,
                    repeating: Iterable[str] = (), longitudinal: bool = False,
                    events: Iterable[str] = ()) -> None:
        """Create a project as an administrator would: upload `dictionary` (a CSV file name
        in dictionaries_dir), make `repeating` instruments repeating and, if longitudinal,
        define `events` (plain names) in arm 1 as `<name>_arm_1`."""
        parsed = Dictionary(self.dictionaries_dir / dictionary)
        repeating = list(repeating)
        unknown = [form for form in repeating if form not in parsed.forms]
        if unknown:
            raise ValueError(f"{title}: repeating instruments {unknown} are not in {dictionary}")
        if parsed.fields[0].form in repeating:
            raise ValueError(f"{title}: the record id's instrument cannot be repeating")
        with self._lock:
            if token in self._projects:
                raise ValueError(f"token for {title} already in use")
            project_id = len(self._projects) + 1
            self._projects[token] = Project(
                project_id=project_id, title=title, dictionary=parsed, repeating=repeating,
                longitudinal=longitudinal,
                events=[Event(name, 1, _unique_event_name(name, 1), project_id * 1000 + i)
                        for i, name in enumerate(events)] if longitudinal else [],
                creation_time=self._clock().strftime(TIME_FORMAT))

    def add_from_manifest(self, tokens: dict[str, str],
                          research_events: Iterable[str] | None = None) -> None:
        """Create every project named in `tokens` (name -> token, the shape of tokens.json)
        with the settings of config/redcap/projects.json; names not in the manifest are
        research projects and get the ResearchProjectTemplate settings, with
        `research_events` instead of the template's events if given."""
        manifest = json.loads((self.dictionaries_dir / "projects.json").read_text())
        for name, token in tokens.items():
            research = name not in manifest
            settings = manifest.get(name, manifest["ResearchProjectTemplate"])
            events = settings.get("events", ())
            if research and research_events is not None:
                events = tuple(research_events)
            self.add_project(token, name, settings["dictionary"],
                             repeating=settings.get("repeating", ()),
                             longitudinal=settings.get("longitudinal", False),
                             events=events)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        """Listen on a free port; returns the API URL."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._listen(0)
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    def stop(self) -> None:
        """Close the listening socket: clients get connection refused, as when REDCap is down."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def restart(self) -> None:
        """Listen again on the same port (the URL clients hold stays valid); data is kept."""
        if not self._port:
            raise RuntimeError("restart() before start()")
        self.stop()
        self._listen(self._port)

    def _listen(self, port: int) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.emulator = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="redcap-emulator", daemon=True)
        self._thread.start()

    # -- inspection -----------------------------------------------------------------------

    def stored(self, token: str) -> list[dict]:
        """Every stored row of the project, as an unfiltered flat raw export would give it."""
        with self._lock:
            project = self._projects[token]
            columns = project.dictionary.data_columns()
            return [project.flat_row(record, key, values, columns)
                    for record in sorted(project.records, key=_natural_key)
                    for key, values in project.sorted_rows(record)]

    # -- dispatch -------------------------------------------------------------------------

    def handle(self, params: Params) -> tuple[int, str, str]:
        """Answer one API request: (HTTP status, content type, body)."""
        with self._lock:
            token = params.get("token")
            project = self._projects.get(token) if isinstance(token, str) else None
            content = params.get("content")
            # REDCap treats a request with `data` and no `action` as an import (PyCap's
            # import_records sends no action).
            action = params.get("action") or ("import" if "data" in params else "export")
            self.requests.append({
                "project": project.title if project else None,
                "content": content, "action": action,
                "params": {k: v for k, v in params.items() if k != "token"},
            })
            try:
                if project is None:
                    raise ApiError("You do not have permissions to use the API", 403)
                if not content:
                    raise ApiError("The parameter 'content' is missing")
                return self._dispatch(project, params, str(content), str(action))
            except ApiError as e:
                return e.status, "application/json; charset=utf-8", json.dumps({"error": e.message})

    def _dispatch(self, project: Project, params: Params, content: str,
                  action: str) -> tuple[int, str, str]:
        if content == "version":
            return _text(VERSION)
        if content == "generateNextRecordName":
            return _text(project.next_record_name())
        if (content, action) == ("record", "delete"):  # REDCap answers a bare count, no format
            return self._delete_records(project, params)
        if _scalar(params, "format", "xml") != "json":
            raise ApiError("The emulator answers format=json only")
        methods: dict[tuple[str, str], Callable[[Project, Params], tuple[int, str, str]]] = {
            ("record", "export"): self._export_records,
            ("record", "import"): self._import_records,
            ("metadata", "export"): self._export_metadata,
            ("event", "export"): self._export_events,
            ("event", "import"): self._import_events,
            ("formEventMapping", "export"): self._export_form_events,
            ("project", "export"): self._export_project,
            ("repeatingFormsEvents", "export"): self._export_repeating,
        }
        method = methods.get((content, action))
        if method is None:
            raise ApiError(f"The value of the parameter 'content' ({content}) with action "
                           f"'{action}' is not valid")
        return method(project, params)

    # -- records --------------------------------------------------------------------------

    def _selected_columns(self, project: Project, params: Params) -> list[str]:
        """Data columns of an export: all, or those of `fields` and `forms` plus the record id,
        always in dictionary order as REDCap gives them."""
        dictionary = project.dictionary
        fields, forms = _array(params, "fields"), _array(params, "forms")
        bad_fields = [f for f in fields
                      if f not in dictionary.by_name and f not in dictionary.columns]
        if bad_fields:
            raise ApiError(f"The following values in the parameter \"fields\" are not valid: "
                           f"{', '.join(bad_fields)}")
        bad_forms = [f for f in forms if f not in dictionary.forms]
        if bad_forms:
            raise ApiError(f"The following values in the parameter \"forms\" are not valid: "
                           f"{', '.join(bad_forms)}")
        others = dictionary.data_columns()
        if not fields and not forms:
            return others
        wanted = set()
        for name in fields:
            f = dictionary.by_name.get(name)
            wanted.update(f.columns() if f else [name])
        for form in forms:
            wanted.update(dictionary.form_columns(form))
        return [c for c in others if c in wanted]

    def _export_records(self, project: Project, params: Params) -> tuple[int, str, str]:
        if _scalar(params, "type", "flat") != "flat":
            raise ApiError("The emulator exports type=flat only")
        if _scalar(params, "rawOrLabel", "raw") != "raw":
            raise ApiError("The emulator exports rawOrLabel=raw only")
        columns = self._selected_columns(project, params)
        records = set(_array(params, "records"))
        events = _array(params, "events")
        if project.longitudinal:
            bad = [e for e in events if e not in project.event_names()]
            if bad:
                raise ApiError(f"The following values in the parameter \"events\" are not "
                               f"valid: {', '.join(bad)}")
        logic_text = _scalar(params, "filterLogic").strip()
        logic = FilterLogic(logic_text, project.dictionary) if logic_text else None
        begin = self._parse_time(params, "dateRangeBegin")
        end = self._parse_time(params, "dateRangeEnd")
        out = []
        for record in sorted(project.records, key=_natural_key):
            if records and record not in records:
                continue
            modified = project.modified[record]
            if (begin and not modified > begin) or (end and not modified < end):
                continue
            rows = project.sorted_rows(record)
            for event in project.event_names():
                if events and project.longitudinal and event not in events:
                    continue
                group = [(key, values) for key, values in rows if key[0] == event]
                if not group:
                    continue
                if logic and not logic.matches(self._values_of(project, record, group)):
                    continue
                for key, values in group:
                    instrument = key[1]
                    if instrument and not any(project.dictionary.columns[c][0] == instrument
                                              for c in columns):
                        continue
                    out.append(project.flat_row(record, key, values, columns))
        return _json(out)

    @staticmethod
    def _values_of(project: Project, record: str,
                   group: list[tuple[RowKey, dict[str, str]]]) -> Callable[[str], list[str]]:
        """For filterLogic: a column's value on the base row, or its values on every
        instance of its repeating instrument (blank/"0" if there is none)."""
        def values_of(column: str) -> list[str]:
            if column == project.dictionary.record_id:
                return [record]
            form, f = project.dictionary.columns[column]
            default = "0" if f is None or f.type == "checkbox" else ""
            if form in project.repeating:
                rows = [values for (_, instrument, _), values in group if instrument == form]
            else:
                rows = [values for (_, instrument, _), values in group if not instrument]
            return [values.get(column) or default for values in rows] or [default]
        return values_of

    @staticmethod
    def _parse_time(params: Params, name: str) -> datetime | None:
        text = _scalar(params, name).strip()
        if not text:
            return None
        try:
            return datetime.strptime(text, TIME_FORMAT)
        except ValueError:
            raise ApiError(f"The parameter '{name}' must be a date/time in the format "
                           f"YYYY-MM-DD HH:MM:SS") from None

    def _import_records(self, project: Project, params: Params) -> tuple[int, str, str]:
        """Validate every row first, then write all of them: REDCap imports all or nothing."""
        if _scalar(params, "type", "flat") != "flat":
            raise ApiError("The emulator imports type=flat only")
        overwrite_behavior = _scalar(params, "overwriteBehavior", "normal")
        if overwrite_behavior not in ("normal", "overwrite"):
            raise ApiError("The parameter 'overwriteBehavior' must be 'normal' or 'overwrite'")
        overwrite = overwrite_behavior == "overwrite"
        return_content = _scalar(params, "returnContent", "count")
        force_auto_number = _flag(params, "forceAutoNumber")
        if return_content not in ("count", "ids", "auto_ids") or (
                return_content == "auto_ids" and not force_auto_number):
            raise ApiError("The parameter 'returnContent' must be 'count' or 'ids' "
                           "('auto_ids' only with forceAutoNumber=true)")
        try:
            rows = json.loads(_scalar(params, "data"))
        except json.JSONDecodeError:
            rows = None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ApiError("The data being imported is not formatted correctly: expected a "
                           "JSON list of flat records")
        dictionary = project.dictionary
        allowed = set(project.key_columns()) | set(dictionary.columns)
        unknown = list(dict.fromkeys(k for row in rows for k in row if k not in allowed))
        if unknown:
            raise ApiError("The following fields were not found in the project as real data "
                           f"fields: {', '.join(unknown)}")

        errors: list[str] = []
        planned: list[tuple[str, RowKey, dict[str, str]]] = []
        auto_names: dict[str, str] = {}
        next_auto = int(project.next_record_name())
        last_instance: dict[tuple[str, str, str], int] = {}
        for row in rows:
            given = str(row.get(dictionary.record_id) or "").strip()
            if not given:
                errors.append(_error_line("", dictionary.record_id, "",
                                          "The record ID field cannot be blank"))
                continue
            record = given
            if force_auto_number:
                if given not in auto_names:
                    auto_names[given] = str(next_auto)
                    next_auto += 1
                record = auto_names[given]
            try:
                key = self._row_key(project, row, given, record, last_instance)
            except ApiError as e:
                errors.append(e.message)
                continue
            values, problems = self._row_values(project, row, given, key[1], overwrite)
            errors += problems
            planned.append((record, key, values))
        if errors:
            raise ApiError("\n".join(errors))

        self._store(project, planned)
        imported = list(dict.fromkeys(record for record, _, _ in planned))
        if return_content == "count":
            return _json({"count": len(imported)})
        if return_content == "ids":
            return _json(imported)
        return _json([f"{new},{old}" for old, new in auto_names.items()])

    @staticmethod
    def _row_key(project: Project, row: dict, given: str, record: str,
                 last_instance: dict[tuple[str, str, str], int]) -> RowKey:
        """Where an imported row goes: its event, repeat instrument and instance ("new" is the
        next free instance; `last_instance` carries them across the rows of one request)."""
        event = ""
        if project.longitudinal:
            event = str(row.get(EVENT_COLUMN) or "")
            if event not in project.event_names():
                raise ApiError(_error_line(given, EVENT_COLUMN, event,
                                           "The event name is not a valid unique event name of "
                                           "this project"))
        instrument = str(row.get(INSTRUMENT_COLUMN) or "")
        raw = row.get(INSTANCE_COLUMN)
        raw_instance = "" if raw is None else str(raw).strip()
        if not instrument:
            if raw_instance:
                raise ApiError(_error_line(
                    given, INSTANCE_COLUMN, raw_instance,
                    "redcap_repeat_instance cannot have a value since this instrument or event is "
                    "not a repeating instrument or repeating event, respectively. The "
                    "redcap_repeat_instance field must be left blank for this row of data."))
            return (event, "", 0)
        if instrument not in project.repeating:
            raise ApiError(_error_line(
                given, INSTRUMENT_COLUMN, instrument,
                "redcap_repeat_instrument must be the unique form name of a Repeating "
                "Instrument. It currently does not match the unique form name of any "
                "Repeating Instruments."))
        slot = (record, event, instrument)
        if slot not in last_instance:
            last_instance[slot] = max((k[2] for k in project.records.get(record, {})
                                       if k[0] == event and k[1] == instrument), default=0)
        if raw_instance == "new":
            last_instance[slot] += 1
            return (event, instrument, last_instance[slot])
        if raw_instance.isdigit() and int(raw_instance) >= 1:
            last_instance[slot] = max(last_instance[slot], int(raw_instance))
            return (event, instrument, int(raw_instance))
        raise ApiError(_error_line(given, INSTANCE_COLUMN, raw_instance,
                                   "redcap_repeat_instance must be an integer of 1 or more, "
                                   "or 'new'"))

    def _row_values(self, project: Project, row: dict, given: str, instrument: str,
                    overwrite: bool) -> tuple[dict[str, str], list[str]]:
        """The values an imported row writes, and the error lines of those REDCap refuses.
        Blanks are dropped unless overwriteBehavior=overwrite."""
        values: dict[str, str] = {}
        problems: list[str] = []
        for column, raw in row.items():
            if column in (project.dictionary.record_id, EVENT_COLUMN, INSTRUMENT_COLUMN,
                          INSTANCE_COLUMN):
                continue
            value = "" if raw is None else str(raw)
            if value == "" and not overwrite:
                continue
            form, f = project.dictionary.columns[column]
            on_this_row = form == instrument if instrument else form not in project.repeating
            if not on_this_row:
                if value:  # a blank for another instrument's field is harmless
                    problems.append(_error_line(given, column, value,
                                                self._wrong_row(project, form, instrument)))
                continue
            problem = self._invalid_value(f, value) if value else None
            if problem:
                problems.append(_error_line(given, column, value, problem))
            else:
                values[column] = value
        return values, problems

    def _store(self, project: Project,
               planned: list[tuple[str, RowKey, dict[str, str]]]) -> None:
        """Write validated rows; a record's modification time moves only if a value changed
        (or a row appeared), as REDCap logs only changes."""
        now = self._clock().replace(microsecond=0)
        for record, key, values in planned:
            stored = project.records.setdefault(record, {})
            changed = False
            for row_key in ((key[0], "", 0), key):
                if row_key not in stored:
                    stored[row_key] = {}
                    changed = True
            target = stored[key]
            for column, value in values.items():
                if target.get(column, "") != value:
                    target[column] = value
                    changed = True
            if changed:
                project.modified[record] = now

    @staticmethod
    def _wrong_row(project: Project, form: str, instrument: str) -> str:
        """Why a value cannot go on a row: its field belongs to another instrument's rows."""
        if instrument:
            return (f"The field is on the instrument '{form}', not on this row's repeating "
                    f"instrument '{instrument}'")
        return (f"The field is on the repeating instrument '{form}': give "
                f"{INSTRUMENT_COLUMN} and {INSTANCE_COLUMN}")

    @staticmethod
    def _invalid_value(f: Field | None, value: str) -> str | None:
        """Why REDCap would refuse `value` for a field (None: `<form>_complete`), or None."""
        if f is None:
            return None if value in ("0", "1", "2") else \
                "The value is not a valid form status (0, 1 or 2)"
        if f.type == "checkbox":
            return None if value in ("0", "1") else "A checkbox value must be 0 or 1"
        if f.codes:
            return None if value in f.codes else \
                f"The value is not a valid category for {f.name}"
        pattern = VALIDATION_PATTERNS.get(f.validation)
        if pattern is not None and not pattern.fullmatch(value):
            return NOT_VALIDATED
        date_format = VALIDATION_DATE_FORMATS.get(f.validation)
        if date_format is not None:
            try:
                datetime.strptime(value, date_format)
            except ValueError:
                return NOT_VALIDATED
        return None

    def _delete_records(self, project: Project, params: Params) -> tuple[int, str, str]:
        partial = [p for p in ("arm", "instrument", "event", "repeat_instance") if params.get(p)]
        if partial:
            raise ApiError(f"The emulator deletes whole records only (got {', '.join(partial)})")
        records = _array(params, "records")
        if not records:
            raise ApiError("The parameter 'records' is missing")
        missing = [r for r in records if r not in project.records]
        if missing:
            raise ApiError("One or more of the records provided cannot be deleted because they "
                           f"do not exist in the project. The following records do not exist: "
                           f"{', '.join(missing)}")
        for record in dict.fromkeys(records):
            del project.records[record]
            del project.modified[record]
        return _json(len(set(records)))

    # -- project structure ----------------------------------------------------------------

    def _export_metadata(self, project: Project, params: Params) -> tuple[int, str, str]:
        fields, forms = set(_array(params, "fields")), set(_array(params, "forms"))
        return _json([dict(f.metadata) for f in project.dictionary.fields
                      if (not fields and not forms) or f.name in fields or f.form in forms])

    def _export_events(self, project: Project, params: Params) -> tuple[int, str, str]:
        if not project.longitudinal:
            raise ApiError("You cannot export events for classic projects")
        arms = {int(a) for a in _array(params, "arms") if a.isdigit()}
        return _json([{
            "event_name": e.name, "arm_num": e.arm, "unique_event_name": e.unique_name,
            "custom_event_label": "", "event_id": e.event_id,
            "days_offset": 0, "offset_min": 0, "offset_max": 0,
        } for e in project.events if not arms or e.arm in arms])

    def _export_form_events(self, project: Project, params: Params) -> tuple[int, str, str]:
        """Every instrument in every event (the emulator has no form-event designations).
        PyCap calls this to learn whether a project is longitudinal."""
        if not project.longitudinal:
            raise ApiError("You cannot export form/event mappings for classic projects")
        arms = {int(a) for a in _array(params, "arms") if a.isdigit()}
        return _json([{"arm_num": e.arm, "unique_event_name": e.unique_name, "form": form}
                      for e in project.events if not arms or e.arm in arms
                      for form in project.dictionary.forms])

    def _import_events(self, project: Project, params: Params) -> tuple[int, str, str]:
        """Add events; answers the count as REDCap does."""
        if not project.longitudinal:
            raise ApiError("You cannot import events for classic projects")
        if _flag(params, "override"):
            raise ApiError("The emulator does not replace events (override=1)")
        try:
            rows = json.loads(_scalar(params, "data"))
            new = [(str(r["event_name"]), int(r["arm_num"])) for r in rows]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ApiError("The data being imported is not formatted correctly: expected a "
                           "JSON list of {\"event_name\", \"arm_num\"}") from None
        known = {e.unique_name for e in project.events}
        for name, arm in new:
            unique = _unique_event_name(name, arm)
            if unique not in known:
                known.add(unique)
                project.events.append(Event(name, arm, unique, project.project_id * 1000
                                            + len(project.events)))
        return _json(len(new))

    def _export_project(self, project: Project, params: Params) -> tuple[int, str, str]:
        return _json({
            "project_id": project.project_id, "project_title": project.title,
            "creation_time": project.creation_time, "production_time": "",
            "in_production": 0, "project_language": "English", "purpose": 0,
            "purpose_other": "", "project_notes": "", "custom_record_label": "",
            "secondary_unique_field": "",
            "is_longitudinal": int(project.longitudinal),
            "has_repeating_instruments_or_events": int(bool(project.repeating)),
            "surveys_enabled": 0, "scheduling_enabled": 0, "record_autonumbering_enabled": 0,
            "randomization_enabled": 0, "ddp_enabled": 0, "project_irb_number": "",
            "project_grant_number": "", "project_pi_firstname": "", "project_pi_lastname": "",
            "display_today_now_button": 1, "missing_data_codes": "", "external_modules": "",
            "bypass_branching_erase_field_prompt": 0,
        })

    def _export_repeating(self, project: Project, params: Params) -> tuple[int, str, str]:
        if project.longitudinal:
            return _json([{"event_name": event, "form_name": form, "custom_form_label": ""}
                          for event in project.event_names() for form in project.repeating])
        return _json([{"form_name": form, "custom_form_label": ""} for form in project.repeating])
