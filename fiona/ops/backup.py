"""`fiona backup DIR` and `fiona restore DIR`: what a gateway needs besides its images.

A backup holds DATADIR/config (config.json, profiles, rules, the `enabled` file, users and the
secrets, which keep mode 0600), the local control plane copied with SQLite's online backup API
(a consistent copy while the daemons write to it), the audit log with its head anchor (copied
under the log's lock, so no entry is half-copied and the anchor matches the log), secret files
that config.json names outside DATADIR/config (REDCap tokens, the LDAP bind password, an SFTP
key), and `manifest.json` with each file's SHA-256, size and mode, written last: a folder
without a manifest is not a backup. Web sessions and caches are left out. The archive (and
what is made from it) is the bulk of the data and is left to the site's usual file backup.

Restore checks every checksum before it writes anything, writes only into an empty data tree
(an existing one is refused: a restore must never mix two installations), and puts external
secrets back where they were unless a different file is there already.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from .. import audit
from ..config import Config, Site, load
from ..tree import DIR_MODE, TEMPORARY_PREFIX, Tree, atomic_write, ensure_dir

FORMAT = "fiona-backup-1"
MANIFEST = "manifest.json"
BACKUP_DIR_MODE = 0o700
#: the local control plane, relative to DATADIR
CONTROL_DB = PurePosixPath("site/fiona.db")
#: config/ files that are copied with the audit log, under its lock
HEAD = PurePosixPath("config") / audit.head_path(Path("")).name
LOG = PurePosixPath("logs") / audit.audit_path(Path("")).name
EXTERNAL = "external"


class BackupError(Exception):
    """A backup or restore cannot go on; the text says why. Nothing was restored."""


@dataclass
class Entry:
    path: str          # relative to the backup folder (POSIX)
    sha256: str
    size: int
    mode: int
    restore_to: str = ""   # external secrets: where the file lived

    def record(self) -> dict:
        out = {"sha256": self.sha256, "size": self.size, "mode": f"{self.mode:04o}"}
        if self.restore_to:
            out["restore_to"] = self.restore_to
        return out


def _digest(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


#: the most a copied file may allow: owner read/write, group read; never anything for others,
#: whatever mode the source (or a manifest) carried
MODE_MASK = 0o640


def _mode(path: Path) -> int:
    """`path`'s permission bits as a backup keeps them (see MODE_MASK)."""
    return os.stat(path).st_mode & MODE_MASK


def _copy(src: Path, dst: Path, mode: int) -> None:
    ensure_dir(dst.parent)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode & MODE_MASK)
        with open(src, "rb") as fh:
            while chunk := fh.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _empty(folder: Path) -> bool:
    """True when `folder` is missing or holds no file (empty folders are fine)."""
    for _root, _dirs, files in os.walk(folder):
        if files:
            return False
    return not folder.is_symlink() and (not folder.exists() or folder.is_dir())


def external_secrets(config: Config, datadir: Path) -> list[Path]:
    """Files config.json names outside DATADIR/config that a restored gateway needs."""
    named = [config.control_plane.get("tokens"), (config.web.get("ldap") or {}).get(
        "bind_password_file"), (config.web.get("ldap") or {}).get("ca_file")]
    named += [d.get("key") for d in config.destinations.values()]
    inside = Tree(datadir).config.resolve()
    out = []
    for name in named:
        if not isinstance(name, str) or not name:
            continue
        path = (config.path.parent / name).resolve()
        if inside not in path.parents and path.is_file() and path not in out:
            out.append(path)
    return out


# --- backup -----------------------------------------------------------------------------------
def backup(config: Config, site: Site, dest: Path, actor: str) -> list[Entry]:
    """Write a backup of `site` into `dest` (missing or empty); return its entries."""
    dest = dest.resolve()
    datadir = site.datadir
    if not _empty(dest):
        raise BackupError(f"{dest} is not empty; back up into a new folder")
    if datadir.resolve() in (dest, *dest.parents):
        raise BackupError(f"{dest} lies inside the data tree {datadir}; choose a folder "
                          f"outside it")
    ensure_dir(dest)
    os.chmod(dest, BACKUP_DIR_MODE)  # it holds the secrets
    audit.append(datadir, actor, "backup", {"into": str(dest), "site": site.name})
    tree = Tree(datadir)
    entries: list[Entry] = []

    def add(rel: PurePosixPath, src: Path, restore_to: str = "") -> None:
        target = dest / rel
        _copy(src, target, _mode(src))
        digest, size = _digest(target)
        entries.append(Entry(str(rel), digest, size, _mode(target), restore_to))

    for root, dirs, files in os.walk(tree.config):
        dirs.sort()
        for name in sorted(files):
            src = Path(root) / name
            rel = PurePosixPath("config") / src.relative_to(tree.config).as_posix()
            if name.startswith(TEMPORARY_PREFIX) or rel == HEAD or src.is_symlink():
                continue
            add(rel, src)
    db = _backup_db(datadir / CONTROL_DB, dest / CONTROL_DB)
    if db is not None:
        entries.append(db)
    entries += _backup_audit(datadir, dest)
    for i, path in enumerate(external_secrets(config, datadir)):
        add(PurePosixPath(EXTERNAL) / f"{i}-{path.name}", path, str(path))
    manifest = {"format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "datadir": str(datadir), "site": site.name,
                "files": {e.path: e.record() for e in entries}}
    atomic_write(dest / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), mode=0o600)
    return entries


def _backup_db(src: Path, dst: Path) -> Entry | None:
    """The control plane through SQLite's online backup API: one consistent state."""
    if not src.exists():
        return None
    ensure_dir(dst.parent)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    source = sqlite3.connect(src, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    mode = _mode(src)
    os.chmod(dst, mode)
    digest, size = _digest(dst)
    return Entry(str(CONTROL_DB), digest, size, mode)


def _backup_audit(datadir: Path, dest: Path) -> list[Entry]:
    """The audit log and its head anchor, copied together under the log's lock."""
    log, head = audit.audit_path(datadir), audit.head_path(datadir)
    if not log.exists():
        return []
    out = []
    fd = os.open(log, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # writers (audit.append) hold LOCK_EX
        for rel, src in ((LOG, log), (HEAD, head)):
            if src.exists():
                _copy(src, dest / rel, _mode(src))
                digest, size = _digest(dest / rel)
                out.append(Entry(str(rel), digest, size, _mode(src)))
    finally:
        os.close(fd)
    return out


# --- restore ----------------------------------------------------------------------------------
def read_manifest(source: Path) -> dict:
    """The manifest, after checking every file it lists (and that it lists every file)."""
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{source} has no {MANIFEST}: not a (complete) FIONA backup") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{source / MANIFEST} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{source / MANIFEST} is not a {FORMAT} manifest")
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(r, dict) and re.fullmatch(r"0[0-7]{3}", str(r.get("mode")))
            for r in files.values()):
        raise BackupError(f"{source / MANIFEST}: \"files\" must map each path to its sha256, "
                          f"size and mode (e.g. \"0600\")")
    for rel, rec in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
            problems.append(f"{rel}: not a path inside the backup")
            continue
        try:
            digest, size = _digest(source / rel)
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if digest != rec.get("sha256") or size != rec.get("size"):
            problems.append(f"{rel}: checksum does not match the manifest")
    listed = set(files) | {MANIFEST}
    for root, _dirs, names in os.walk(source):
        for name in names:
            rel = (Path(root) / name).relative_to(source).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: not in the manifest")
    if problems:
        raise BackupError(f"the backup in {source} does not verify: " + "; ".join(problems))
    return manifest


def restore(source: Path, target: Path | None, actor: str) -> tuple[Path, dict]:
    """Put the backup in `source` into the empty data tree `target` (default: the tree it was
    taken from). Returns the data tree and the manifest."""
    source = source.resolve()
    manifest = read_manifest(source)
    datadir = (target or Path(manifest["datadir"])).resolve()
    if not _empty(datadir):
        raise BackupError(f"{datadir} is not an empty data tree; restore only into an empty "
                          f"one (move the old tree aside first)")
    files = manifest["files"]
    external = {rel: rec for rel, rec in files.items() if rec.get("restore_to")}
    for rec in external.values():
        dest = Path(rec["restore_to"])
        if dest.exists() and _digest(dest)[0] != rec["sha256"]:
            raise BackupError(f"{dest} exists with other content than the backup's copy; "
                              f"move it aside or restore it by hand")
    ensure_dir(datadir)
    os.chmod(datadir, DIR_MODE)
    for rel, rec in files.items():
        mode = int(rec["mode"], 8)
        if rel in external:
            dest = Path(rec["restore_to"])
            if not dest.exists():
                _copy(source / rel, dest, mode)
            continue
        _copy(source / rel, datadir / rel, mode)
    Tree(datadir).make()
    config_file = datadir / "config" / "config.json"
    if manifest.get("site") == "" and datadir != Path(manifest["datadir"]) and \
            config_file.exists():
        raw = json.loads(config_file.read_text())
        raw["DATADIR"] = str(datadir)
        atomic_write(config_file, (json.dumps(raw, indent=2) + "\n").encode(),
                     mode=int(files["config/config.json"]["mode"], 8) & MODE_MASK)
    if config_file.exists():
        load(str(config_file))  # what was restored must still be a valid configuration
    audit.append(datadir, actor, "restore", {"from": str(source),
                                             "taken": manifest.get("created", "")})
    return datadir, manifest
