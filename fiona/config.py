"""config.json, the `enabled` switch file and secret files.

Admins edit `config.json` by hand, so every mistake must come back as a message that names the
key and shows an example value; a typo in a key name is an error rather than a silently ignored
setting. Secrets never live in config.json: they are separate files that must be mode 0600.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .send import destinations as destination_kinds
from .tree import atomic_write

DEFAULT_CONFIG_PATH = "/data/config/config.json"

#: key -> (example value shown in errors, default value or REQUIRED)
REQUIRED = object()

TOP_LEVEL: dict[str, tuple[Any, Any]] = {
    "DATADIR": ("/data", "/data"),
    "DICOMIP": ("0.0.0.0", "0.0.0.0"),
    "DICOMPORT": (11112, 11112),
    "DICOMAETITLE": ("FIONA", "FIONA"),
    "PROCESSING_USER": ("processing", "processing"),
    "LOCALTIMEZONE": ("Europe/Oslo", None),
    "SITES": ({"CT": {"DATADIR": "/data/ct", "DICOMPORT": 11113, "DICOMAETITLE": "FIONACT"}}, {}),
    "SCANNERIP": ("10.0.0.5", None),
    "SCANNERPORT": (104, None),
    "SCANNERAETITLE": ("SCANNER", None),
    "MPPSPORT": (11114, None),
    "CLINICAL_PACS": ({"aetitle": "PACS", "host": "10.0.0.6", "port": 104}, None),
    "CONTROL_PLANE": ({"type": "local"}, {"type": "local"}),
    "NODE": ("hospital-a", None),
    "DESTINATIONS": ({"research": {"type": "folder", "path": "/data/research"}}, None),
    "STUDY_QUIET_SECONDS": (16, 16),
    "RECEIVER_PROCESSES": (2, 1),
    "ARRIVAL_WORKFLOWS": ([{"name": "nifti", "command": ["/usr/local/bin/convert-study",
                                                         "@PATH@"]}], []),
    "DISK": ({"refuse_store_percent": 95, "cleanup_percent": 80},
             {"refuse_store_percent": 95, "cleanup_percent": 80}),
    "WEB": ({"host": "127.0.0.1", "port": 8080, "auth": "local"},
            {"host": "127.0.0.1", "port": 8080, "auth": "local"}),
    "RETENTION_DAYS_UNASSIGNED": (30, 30),
    "SMTP": ({"host": "smtp.example.org", "port": 587, "starttls": True, "user": "fiona",
              "password_file": "/data/config/smtp.password", "from": "fiona@example.org"}, None),
    "EXPORTS": ({"retention_days": 7, "cleanup_percent": 80, "refuse_percent": 95,
                 "url": "https://fiona.example.org"}, {}),
    "ATTACH": ({"max_upload_mb": 20480, "overview_projects": ["PATHO"]}, {}),
}

SITE_KEYS: dict[str, tuple[Any, Any]] = {
    "DATADIR": ("/data/ct", REQUIRED),
    "DICOMPORT": (11113, REQUIRED),
    "DICOMAETITLE": ("FIONACT", None),
    "DICOMIP": ("0.0.0.0", None),
}

#: kind -> key -> (example, default or dataclasses.MISSING): each destination kind's settings
#: class (fiona.send.destinations) is the one definition; this view is for readers of defaults
DESTINATION_KEYS: dict[str, dict[str, tuple[Any, Any]]] = {
    kind: cls.spec() for kind, cls in destination_kinds.SETTINGS.items()}

#: the peer `fiona retrieve` asks for studies by accession number, when it is not the scanner
CLINICAL_PACS_KEYS = {"aetitle": ("PACS", REQUIRED), "host": ("10.0.0.6", REQUIRED),
                      "port": (104, REQUIRED)}

CONTROL_PLANE_KEYS: dict[str, dict[str, tuple[Any, Any]]] = {
    "local": {},
    "redcap": {"url": ("https://redcap.example.org/api/", REQUIRED),
               "tokens": ("/data/config/tokens.json", REQUIRED), "verify_tls": (True, True)},
    "postgres": {"dsn": ("host=db.example.org dbname=fiona user=fiona sslmode=verify-full",
                         REQUIRED),
                 "password_file": ("/data/config/postgres.password", None)},
}

DISK_KEYS = {"refuse_store_percent": (95, 95), "cleanup_percent": (80, 80),
             "cleanup_unassigned": (True, False), "scan_retention_days": (30, 30)}
WEB_KEYS = {"host": ("127.0.0.1", "127.0.0.1"), "port": (8080, 8080), "auth": ("local", "local"),
            "trusted_proxies": (["127.0.0.1"], []), "secure_cookies": (True, False),
            "session_idle_minutes": (30, 30), "session_hours": (12, 12),
            "ldap": ({"url": "ldaps://ldap.example.org", "user_dn": "uid={user},ou=people,"
                      "dc=example,dc=org"}, None)}

#: the mail server for "export ready" mails (optional; no SMTP key: no mail)
SMTP_KEYS = {"host": ("smtp.example.org", REQUIRED), "port": (587, 587),
             "starttls": (True, True), "user": ("fiona", None),
             "password_file": ("/data/config/smtp.password", None),
             "from": ("fiona@example.org", REQUIRED)}
#: exports: how long a finished zip is kept, the disk watermarks (percent of the exports file
#: system) above which `fiona clear-exports` removes the oldest and the worker refuses new
#: ones, and the web address the "export ready" mail links to
EXPORTS_KEYS = {"retention_days": (7, 7), "cleanup_percent": (80, 80),
                "refuse_percent": (95, 95), "url": ("https://fiona.example.org", None)}

#: Attach: the largest upload (also the most an archive may unpack to), and the projects whose
#: whole-slide images keep their overview (macro) image
ATTACH_KEYS = {"max_upload_mb": (20480, 20480), "overview_projects": (["PATHO"], [])}

_AE_BAD = re.compile(r"[\\\x00-\x1f\x7f]")
_SITE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class ConfigError(Exception):
    """config.json (or a file it points to) is wrong; `errors` holds one message per fault."""

    def __init__(self, errors: list[str], path: str | Path | None = None):
        self.errors = errors
        self.path = str(path) if path else None
        where = f"{self.path}: " if self.path else ""
        super().__init__(where + "; ".join(errors))


@dataclass(frozen=True)
class Site:
    """One receiver instance with its own data tree: the main one (name "") or one of SITES.

    Daemons are started per site; every name a site owns (pipe, pid file, log) carries `suffix`.
    """

    name: str
    datadir: Path
    ip: str
    port: int
    aetitle: str

    @property
    def suffix(self) -> str:
        return self.name


@dataclass
class Config:
    """The validated configuration. `raw` keeps the file's values for `fiona config check`."""

    path: Path
    raw: dict[str, Any]
    datadir: Path
    dicom_ip: str
    dicom_port: int
    dicom_aetitle: str
    processing_user: str
    timezone: str | None
    sites: dict[str, Site]
    control_plane: dict[str, Any]
    destinations: dict[str, dict[str, Any]]
    study_quiet_seconds: float
    refuse_store_percent: float
    cleanup_percent: float
    web: dict[str, Any]
    scanner: dict[str, Any] = field(default_factory=dict)
    mpps_port: int | None = None
    clinical_pacs: dict[str, Any] | None = None  # {aetitle, host, port}; None: the scanner
    workflows: list[dict[str, Any]] = field(default_factory=list)
    retention_days_unassigned: float = 30.0   # clear-old-files: unassigned studies kept this long
    cleanup_unassigned: bool = False          # clear-old-files may remove unassigned studies
    scan_retention_days: float = 30.0         # clear-old-files: concluded MPPS steps and scans
    receiver_processes: int = 1               # processes accepting on the receiver's port
    smtp: dict[str, Any] | None = None        # SMTP_KEYS, checked; None: no mail
    exports: dict[str, Any] = field(default_factory=lambda: {
        k: default for k, (_example, default) in EXPORTS_KEYS.items()})
    attach: dict[str, Any] = field(default_factory=lambda: {
        k: default for k, (_example, default) in ATTACH_KEYS.items()})
    node: str = ""                            # NODE: this FIONA's name in a region

    def site(self, name: str | None = None) -> Site:
        """The site called `name` (None or "" is the main receiver)."""
        if not name:
            return Site("", self.datadir, self.dicom_ip, self.dicom_port, self.dicom_aetitle)
        try:
            return self.sites[name]
        except KeyError:
            known = ", ".join(sorted(self.sites)) or "none"
            raise ConfigError([f"unknown site {name!r}; SITES in {self.path} has: "
                               f"{known}"]) from None

    def all_sites(self) -> list[Site]:
        return [self.site(None), *self.sites.values()]

    def effective(self) -> dict[str, Any]:
        """Every key with the value in force (file value or default), for display."""
        out = {}
        for key, (_example, default) in TOP_LEVEL.items():
            out[key] = self.raw.get(key, default)
        out["DATADIR"] = str(self.datadir)
        out["NODE"] = self.node
        out["SITES"] = {s.name: {"DATADIR": str(s.datadir), "DICOMIP": s.ip, "DICOMPORT": s.port,
                                 "DICOMAETITLE": s.aetitle} for s in self.sites.values()}
        out["DESTINATIONS"] = self.destinations
        return out


def config_path(explicit: str | None) -> Path:
    """--config, else $FIONA_CONFIG, else /data/config/config.json."""
    return Path(explicit or os.environ.get("FIONA_CONFIG") or DEFAULT_CONFIG_PATH)


def _check_keys(obj: Any, spec: dict[str, tuple[Any, Any]], where: str, errors: list[str]) -> dict:
    """Unknown keys and missing required keys, each named with an example value."""
    if not isinstance(obj, dict):
        example = json.dumps({k: v[0] for k, v in spec.items()})
        errors.append(f"{where} must be an object, e.g. {example}")
        return {}
    for key in obj:
        if key not in spec:
            known = ", ".join(spec) or "(none)"
            errors.append(f"unknown key {where}.{key}" if where else f"unknown key {key}")
            errors[-1] += f" (known keys: {known})"
    out = {}
    for key, (example, default) in spec.items():
        if key in obj:
            out[key] = obj[key]
        elif default is REQUIRED:
            name = f"{where}.{key}" if where else key
            errors.append(f"missing required key {name}, e.g. \"{key}\": {json.dumps(example)}")
        else:
            out[key] = default
    return out


def _web_security(web: dict, errors: list[str]) -> None:
    """WEB's proxy, cookie and session keys (see README, "The web application behind HTTPS")."""
    from .web.proxies import parse_networks

    proxies = web.get("trusted_proxies")
    if not isinstance(proxies, list):
        errors.append(f"WEB.trusted_proxies must be a list of addresses or networks, e.g. "
                      f"[\"127.0.0.1\"]; got {proxies!r}")
    else:
        try:
            parse_networks(proxies)
        except ValueError as exc:
            errors.append(f"WEB.trusted_proxies: {exc}")
        if web.get("auth") == "remote-user" and not proxies:
            errors.append("WEB.auth \"remote-user\" needs WEB.trusted_proxies: the addresses of "
                          "the reverse proxy that sets REMOTE_USER, e.g. [\"127.0.0.1\"]")
    if not isinstance(web.get("secure_cookies"), bool):
        errors.append("WEB.secure_cookies must be true or false; "
                      f"got {web.get('secure_cookies')!r}")
    _int(web.get("session_idle_minutes"), "WEB.session_idle_minutes", 1, 24 * 60, errors)
    _int(web.get("session_hours"), "WEB.session_hours", 1, 24 * 7, errors)
    _web_ldap(web, errors)


def _web_ldap(web: dict, errors: list[str]) -> None:
    """WEB.ldap, required with `WEB.auth = "ldap"` (checked by `fiona.web.ldap_auth`, imported
    only then, so daemons without LDAP never load ldap3)."""
    if web.get("ldap") is None:
        if web.get("auth") == "ldap":
            errors.append('WEB.auth "ldap" needs WEB.ldap, e.g. {"url": "ldaps://ldap.example.org",'
                          ' "user_dn": "uid={user},ou=people,dc=example,dc=org"}')
        return
    from .web.ldap_auth import LdapConfigError, LdapSettings

    try:
        LdapSettings.from_config(web["ldap"])
    except LdapConfigError as exc:
        errors.append(str(exc))


def default_node() -> str:
    """NODE when config.json has none: the host name's first label."""
    return socket.gethostname().split(".")[0]


def _node(value: Any, errors: list[str]) -> str:
    """NODE names this FIONA among the nodes that share a control plane; it is stored with
    every study, so it follows the rule of a site name."""
    explicit = value is not None
    node = value if explicit else default_node()
    if not isinstance(node, str) or not _SITE_NAME.match(node):
        where = "" if explicit else f" (the default, from the host name {socket.gethostname()!r})"
        errors.append(f"NODE {node!r}{where} must be 1-32 letters, digits, '_' or '-', "
                      f"e.g. \"hospital-a\"; set NODE in config.json")
        return ""
    return node


def _int(value: Any, name: str, lo: int, hi: int, errors: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errors.append(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
        return lo
    return value


def _number(value: Any, name: str, lo: float, hi: float, errors: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        errors.append(f"{name} must be a number from {lo} to {hi}, got {value!r}")
        return lo
    return float(value)


def _aetitle(value: Any, name: str, errors: list[str]) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or _AE_BAD.search(value):
        errors.append(f"{name} must be an AE title of 1 to 16 characters without backslash or "
                      f"control characters, e.g. \"FIONA\"; got {value!r}")
        return "FIONA"
    return value.strip()


def _dir(value: Any, name: str, base: Path, errors: list[str]) -> Path:
    if not isinstance(value, str) or not value:
        errors.append(f"{name} must be a directory path, e.g. \"/data\"; got {value!r}")
        return base
    return (base / value).resolve() if not os.path.isabs(value) else Path(value)


WORKFLOW_KEYS = {"name", "command", "image", "runtime", "args", "timeout"}


def _workflows(value: Any, errors: list[str]) -> list[dict[str, Any]]:
    """ARRIVAL_WORKFLOWS: argv lists or container images, never shell command strings."""
    example = '{"name": "nifti", "command": ["/usr/local/bin/convert", "@PATH@"]}'
    if not isinstance(value, list):
        errors.append(f"ARRIVAL_WORKFLOWS must be a list, e.g. [{example}]")
        return []
    out = []
    for i, entry in enumerate(value):
        where = f"ARRIVAL_WORKFLOWS[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f"{where} must be an object with a name, e.g. {example}")
            continue
        unknown = set(entry) - WORKFLOW_KEYS
        if unknown:
            errors.append(f"unknown key {where}.{sorted(unknown)[0]} (known keys: "
                          f"{', '.join(sorted(WORKFLOW_KEYS))})")
        command, image = entry.get("command"), entry.get("image")
        if command is not None:
            if not (isinstance(command, list) and command and
                    all(isinstance(a, str) for a in command)):
                errors.append(f"{where}.command must be an argv list of strings (no shell), "
                              f"e.g. {example}")
                continue
        elif not isinstance(image, str) or not image:
            errors.append(f"{where} needs \"command\" (an argv list) or \"image\" "
                          f"(a container image), e.g. {example}")
            continue
        if entry.get("runtime", "docker") not in ("docker", "podman"):
            errors.append(f"{where}.runtime must be \"docker\" or \"podman\"")
            continue
        out.append(entry)
    return out


def _clinical_pacs(value: Any, errors: list[str]) -> dict[str, Any] | None:
    """CLINICAL_PACS, checked once: an AE title, a host name or address, a port."""
    if value is None:
        return None
    pacs = _check_keys(value, CLINICAL_PACS_KEYS, "CLINICAL_PACS", errors)
    if set(pacs) != set(CLINICAL_PACS_KEYS):  # not an object, or a key missing (reported)
        return None
    host = pacs["host"]
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host.strip()):
        errors.append(f"CLINICAL_PACS.host must be a host name or address; got {host!r}")
    return {"aetitle": _aetitle(pacs["aetitle"], "CLINICAL_PACS.aetitle", errors),
            "host": str(host).strip(),
            "port": _int(pacs["port"], "CLINICAL_PACS.port", 1, 65535, errors)}


def _smtp(value: Any, base: Path, errors: list[str]) -> dict[str, Any] | None:
    """SMTP, checked once: host, port, starttls, optional user with a 0600 password file,
    from address."""
    if value is None:
        return None
    smtp = _check_keys(value, SMTP_KEYS, "SMTP", errors)
    if "host" not in smtp or "from" not in smtp:
        return None  # not an object, or a key missing (reported)
    out = {k: smtp.get(k, default) for k, (_example, default) in SMTP_KEYS.items()}
    host = out["host"]
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host.strip()):
        errors.append(f"SMTP.host must be a host name or address; got {host!r}")
    out["port"] = _int(out["port"], "SMTP.port", 1, 65535, errors)
    if not isinstance(out["starttls"], bool):
        errors.append(f"SMTP.starttls must be true or false; got {out['starttls']!r}")
    sender = out["from"]
    if not isinstance(sender, str) or "@" not in sender or any(c.isspace() for c in sender):
        errors.append(f"SMTP.from must be an e-mail address; got {sender!r}")
    if (out["user"] is None) != (out["password_file"] is None):
        errors.append("SMTP.user and SMTP.password_file go together (both or neither)")
    elif out["password_file"] is not None:
        pw = Path(str(out["password_file"]))
        out["password_file"] = pw if pw.is_absolute() else base / pw
        try:
            read_secret(out["password_file"])
        except ConfigError as exc:
            errors.append(f"SMTP.password_file: {'; '.join(exc.errors)}")
    return out


def _attach(value: Any, errors: list[str]) -> dict[str, Any]:
    """ATTACH, checked once: the upload limit in MB and a list of project names."""
    given = _check_keys(value, ATTACH_KEYS, "ATTACH", errors)
    out: dict[str, Any] = {k: given.get(k, default)
                           for k, (_example, default) in ATTACH_KEYS.items()}
    out["max_upload_mb"] = _number(out["max_upload_mb"], "ATTACH.max_upload_mb", 0.001,
                                   10_000_000, errors)
    names = out["overview_projects"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        errors.append(f"ATTACH.overview_projects must be a list of project names; got {names!r}")
        out["overview_projects"] = []
    return out


def _exports(value: Any, errors: list[str]) -> dict[str, Any]:
    """EXPORTS, checked once: retention in days and the disk watermarks in percent."""
    given = _check_keys(value, EXPORTS_KEYS, "EXPORTS", errors)
    out: dict[str, Any] = {k: given.get(k, default)
                           for k, (_example, default) in EXPORTS_KEYS.items()}
    out["retention_days"] = _number(out["retention_days"], "EXPORTS.retention_days", 0.01,
                                    36500, errors)
    out["cleanup_percent"] = _number(out["cleanup_percent"], "EXPORTS.cleanup_percent", 1, 100,
                                     errors)
    out["refuse_percent"] = _number(out["refuse_percent"], "EXPORTS.refuse_percent", 1, 100,
                                    errors)
    if out["cleanup_percent"] >= out["refuse_percent"]:
        errors.append(f"EXPORTS.cleanup_percent ({out['cleanup_percent']:g}) must be below "
                      f"EXPORTS.refuse_percent ({out['refuse_percent']:g})")
    url = out["url"]
    if url is not None and (not isinstance(url, str)
                            or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url)):
        errors.append(f"EXPORTS.url must be an http(s) address; got {url!r}")
    elif url:
        out["url"] = url.rstrip("/")
    return out


def parse(raw: Any, path: Path) -> Config:
    """Validate a loaded config.json object. Relative paths are relative to the file's folder."""
    errors: list[str] = []
    base = path.parent
    top = _check_keys(raw, TOP_LEVEL, "", errors)
    if not top:
        raise ConfigError(errors, path)
    datadir = _dir(top["DATADIR"], "DATADIR", base, errors)
    ip = top["DICOMIP"]
    if not isinstance(ip, str):
        errors.append(f"DICOMIP must be an address string, e.g. \"0.0.0.0\"; got {ip!r}")
        ip = "0.0.0.0"
    port = _int(top["DICOMPORT"], "DICOMPORT", 1, 65535, errors)
    aet = _aetitle(top["DICOMAETITLE"], "DICOMAETITLE", errors)

    sites: dict[str, Site] = {}
    if not isinstance(top["SITES"], dict):
        errors.append("SITES must be an object of NAME: {DATADIR, DICOMPORT, DICOMAETITLE}")
    else:
        for name, entry in top["SITES"].items():
            if not _SITE_NAME.match(name):
                errors.append(f"SITES name {name!r} must be 1-32 letters, digits, '_' or '-'")
                continue
            s = _check_keys(entry, SITE_KEYS, f"SITES.{name}", errors)
            if not s or "DATADIR" not in s or "DICOMPORT" not in s:
                continue  # the missing key is already reported
            sites[name] = Site(
                name=name,
                datadir=_dir(s["DATADIR"], f"SITES.{name}.DATADIR", base, errors),
                ip=s["DICOMIP"] or ip,
                port=_int(s["DICOMPORT"], f"SITES.{name}.DICOMPORT", 1, 65535, errors),
                aetitle=_aetitle(s["DICOMAETITLE"] or aet, f"SITES.{name}.DICOMAETITLE", errors),
            )
    ports = [port] + [s.port for s in sites.values()]
    if len(set(ports)) != len(ports):
        errors.append(f"DICOMPORT values must differ between the main receiver and SITES: {ports}")

    cp = top["CONTROL_PLANE"]
    cp_type = cp.get("type") if isinstance(cp, dict) else None
    if not isinstance(cp_type, str) or cp_type not in CONTROL_PLANE_KEYS:
        errors.append(f"CONTROL_PLANE.type must be one of {sorted(CONTROL_PLANE_KEYS)}, "
                      f"e.g. {{\"type\": \"local\"}}; got {cp_type!r}")
        control_plane = {"type": "local"}
    else:
        rest = {k: v for k, v in cp.items() if k != "type"}
        control_plane = {"type": cp_type,
                         **_check_keys(rest, CONTROL_PLANE_KEYS[cp_type], "CONTROL_PLANE", errors)}
        if control_plane.get("verify_tls") is False:
            errors.append("CONTROL_PLANE.verify_tls must stay true: patient data never travels "
                          "over unverified TLS; install the hospital CA instead")
        if cp_type == "postgres" and "dsn" in control_plane:
            from .control.postgres import checked_conninfo
            try:
                checked_conninfo(control_plane["dsn"])
            except ConfigError as exc:
                errors.extend(exc.errors)

    destinations: dict[str, dict[str, Any]] = {}
    dests = top["DESTINATIONS"]
    if dests is None:
        dests = {"research": {"type": "folder", "path": str(datadir / "research")}}
    if not isinstance(dests, dict) or not dests:
        errors.append("DESTINATIONS must be an object of NAME: {type, ...}, "
                      "e.g. {\"research\": {\"type\": \"folder\", \"path\": \"/data/research\"}}")
    else:
        for name, d in dests.items():
            entry, problems = destination_kinds.validate(name, d)
            errors.extend(problems)
            if entry is not None:
                destinations[name] = entry

    quiet = _number(top["STUDY_QUIET_SECONDS"], "STUDY_QUIET_SECONDS", 0.5, 86400, errors)
    # default 1: on 2 cores shared with senders more processes measured no faster
    receivers = _int(top["RECEIVER_PROCESSES"], "RECEIVER_PROCESSES", 1, 64, errors)
    workflows = _workflows(top["ARRIVAL_WORKFLOWS"], errors)
    disk = _check_keys(top["DISK"], DISK_KEYS, "DISK", errors)
    refuse = _number(disk.get("refuse_store_percent", 95), "DISK.refuse_store_percent", 1, 100,
                     errors)
    cleanup = _number(disk.get("cleanup_percent", 80), "DISK.cleanup_percent", 0, 100, errors)
    cleanup_unassigned = disk.get("cleanup_unassigned", False)
    if not isinstance(cleanup_unassigned, bool):
        errors.append(f"DISK.cleanup_unassigned must be true or false; got {cleanup_unassigned!r}")
    retention = _number(top["RETENTION_DAYS_UNASSIGNED"], "RETENTION_DAYS_UNASSIGNED", 1,
                        36500, errors)
    scan_retention = _number(disk.get("scan_retention_days", 30), "DISK.scan_retention_days",
                             1, 36500, errors)
    web = _check_keys(top["WEB"], WEB_KEYS, "WEB", errors)
    if web and web.get("auth") not in ("local", "remote-user", "ldap"):
        errors.append(f"WEB.auth must be \"local\", \"remote-user\" or \"ldap\"; "
                      f"got {web.get('auth')!r}")
    if web:
        _int(web.get("port"), "WEB.port", 1, 65535, errors)
        _web_security(web, errors)
    if top["SCANNERPORT"] is not None:
        _int(top["SCANNERPORT"], "SCANNERPORT", 1, 65535, errors)
    if top["SCANNERAETITLE"] is not None:
        _aetitle(top["SCANNERAETITLE"], "SCANNERAETITLE", errors)
    mpps = top["MPPSPORT"]
    if mpps is not None:
        mpps = _int(mpps, "MPPSPORT", 1, 65535, errors)
        if mpps in ports:
            errors.append(f"MPPSPORT {mpps} is already a DICOMPORT; choose another port")
    if cleanup >= refuse:
        errors.append(f"DISK.cleanup_percent ({cleanup:g}) must be below "
                      f"DISK.refuse_store_percent ({refuse:g}), so cleanup starts before "
                      f"the receiver refuses studies")
    scanner = {k: top[k] for k in ("SCANNERIP", "SCANNERPORT", "SCANNERAETITLE")
               if top[k] is not None}
    clinical = _clinical_pacs(top["CLINICAL_PACS"], errors)
    smtp = _smtp(top["SMTP"], base, errors)
    exports = _exports(top["EXPORTS"], errors)
    attach = _attach(top["ATTACH"], errors)
    node = _node(top["NODE"], errors)
    if errors:
        raise ConfigError(errors, path)
    return Config(
        path=path, raw=raw, datadir=datadir, dicom_ip=ip, dicom_port=port, dicom_aetitle=aet,
        processing_user=str(top["PROCESSING_USER"]), timezone=top["LOCALTIMEZONE"], sites=sites,
        control_plane=control_plane, destinations=destinations, study_quiet_seconds=quiet,
        refuse_store_percent=refuse, cleanup_percent=cleanup, web=web, scanner=scanner,
        mpps_port=mpps, clinical_pacs=clinical, workflows=workflows,
        retention_days_unassigned=retention, cleanup_unassigned=cleanup_unassigned is True,
        scan_retention_days=scan_retention,
        receiver_processes=receivers,
        smtp=smtp, exports=exports, attach=attach, node=node,
    )


def load(explicit: str | None = None) -> Config:
    """Read and validate the config file named by --config, $FIONA_CONFIG or the default."""
    path = config_path(explicit)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(["no config file here; create one with "
                           "`fiona init --data DIR` or pass --config PATH"], path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], path) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"],
                          path) from None
    return parse(raw, path.resolve())


def read_secret(path: Path) -> bytes:
    """A secret file's bytes; refused unless it is private to its owner (mode 0600 or stricter)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError([f"secret file {path} is missing; `fiona init` creates one"]) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError([f"secret file {path} is not a regular file"])
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError([f"secret file {path} is readable by group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"])
    data = path.read_bytes().strip()
    if not data:
        raise ConfigError([f"secret file {path} is empty"])
    return data


ENABLED_PARTS = {"receive": 0, "scanner": 1, "reserved": 2}


def enabled_path(datadir: Path) -> Path:
    return datadir / "config" / "enabled"


def read_switches(datadir: Path) -> dict[str, bool]:
    """Every part's switch in the `enabled` file, one character each in ENABLED_PARTS order;
    a missing file or character means on."""
    try:
        text = enabled_path(datadir).read_text().strip()
    except FileNotFoundError:
        text = ""
    return {part: not (len(text) > i and text[i] == "0") for part, i in ENABLED_PARTS.items()}


def write_switches(datadir: Path, state: dict[str, bool]) -> None:
    """Write the `enabled` file: `1` (on) or `0` (off) per part, in ENABLED_PARTS order."""
    text = "".join("1" if state[part] else "0"
                   for part, _ in sorted(ENABLED_PARTS.items(), key=lambda kv: kv[1]))
    atomic_write(enabled_path(datadir), f"{text}\n".encode())


def is_enabled(datadir: Path, part: str) -> bool:
    """The `enabled` switch for one part (receive, scanner)."""
    return read_switches(datadir)[part]
