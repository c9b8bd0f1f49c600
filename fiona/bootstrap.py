"""`fiona init`: a working configuration tree for a new installation or a test."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from .config import ENABLED_PARTS, ConfigError, enabled_path, load, write_switches
from .index.classify import SHIPPED_RULES
from .tree import FILE_MODE, Tree, atomic_write


def init(datadir: Path, port: int = 11112, aetitle: str = "FIONA", ip: str = "0.0.0.0",
         force: bool = False, extra: dict | None = None) -> Path:
    """Write config.json, enabled, secret.key (0600) and classifyRules.json under
    `datadir/config`, and create the data tree. Existing files are kept unless `force`."""
    datadir = datadir.resolve()
    tree = Tree(datadir).make()
    cfg_path = tree.config / "config.json"
    if cfg_path.exists() and not force:
        raise ConfigError([f"{cfg_path} exists already; use --force to overwrite it"])
    config = {"DATADIR": str(datadir), "DICOMIP": ip, "DICOMPORT": port, "DICOMAETITLE": aetitle,
              "CONTROL_PLANE": {"type": "local"},
              "DESTINATIONS": {"research": {"type": "folder", "path": str(datadir / "research")}},
              **(extra or {})}
    atomic_write(cfg_path, (json.dumps(config, indent=2) + "\n").encode())
    if not enabled_path(datadir).exists():
        write_switches(datadir, dict.fromkeys(ENABLED_PARTS, True))
    key = tree.config / "secret.key"
    if not key.exists():
        atomic_write(key, secrets.token_hex(32).encode() + b"\n", mode=0o600)
    rules = tree.config / "classifyRules.json"
    if not rules.exists() or force:
        atomic_write(rules, SHIPPED_RULES.read_bytes(), mode=FILE_MODE)
    load(str(cfg_path))  # what we wrote must pass our own validation
    return cfg_path
