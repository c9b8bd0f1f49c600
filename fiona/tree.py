"""The data tree: the one place that turns DICOM values into paths.

Every path component that comes from a DICOM value or a network peer passes through
`valid_uid` or `safe_name` here first (the system FIONA replaces used UIDs as paths unchecked,
which allowed path traversal). Files are written to a temporary name in the same folder, fsynced
and renamed, so a crash leaves either the old file or the new one, never half of one.
Folders are 0750 and files 0640: the web server reads through its group, never through
world-readable modes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

DIR_MODE = 0o750
#: archive/<ARCHIVE_PREFIX><StudyInstanceUID>: one folder per study, as the original named it
ARCHIVE_PREFIX = "scp_"
FILE_MODE = 0o640
TEMPORARY_PREFIX = ".tmp."
"""Names of files and links still being written: each is renamed into place when done, and a
writer killed first leaves its temporary behind, so no reader may take one for what its folder
holds."""

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


class InvalidValue(ValueError):
    """A DICOM or network value that must not become part of a path; the text says why."""


def valid_uid(value: object, what: str = "UID") -> str:
    """`value` as a UID string, or InvalidValue: digits and dots, at most 64 characters,
    no empty component and no leading zero in a component other than "0" itself."""
    if value is None or value == "":
        raise InvalidValue(f"{what} is missing")
    uid = str(value).rstrip("\x00 ")
    if len(uid) > 64:
        raise InvalidValue(f"{what} is {len(uid)} characters long (at most 64 allowed)")
    if not _UID.fullmatch(uid):
        raise InvalidValue(f"{what} {uid[:80]!r} is not a valid UID (digits and dots, "
                           f"no leading zeros)")
    return uid


def safe_name(value: object, what: str = "value", default: str = "unknown") -> str:
    """A value (AE title, PatientID, Manufacturer) made safe as one path component.

    Slashes, backslashes and control characters become '_', leading dots and surrounding
    spaces are dropped, so '..', '/' or '.hidden' cannot escape or hide; empty becomes `default`.
    """
    text = "" if value is None else str(value)
    text = _UNSAFE.sub("_", text)
    while text != (trimmed := text.strip().lstrip(".")):
        text = trimmed  # until neither spaces nor dots lead: ". .." must not become ".."
    return text[:64].rstrip() or default


@lru_cache(maxsize=256)  # per received object otherwise, and SOP classes repeat
def modality_prefix(sop_class_uid: str) -> str:
    """The MOD part of archive file names, from the SOP class (MR, CT, SC, PS, SR, ...)."""
    from pydicom.uid import UID

    name = UID(sop_class_uid).name if sop_class_uid else ""
    for needle, mod in _MODALITY_WORDS:
        if needle in name:
            return mod
    return "OT"


_MODALITY_WORDS = (
    ("Enhanced MR", "MR"), ("MR Spectroscopy", "MS"), ("MR Image", "MR"),
    ("CT Image", "CT"), ("Positron Emission", "PT"), ("PET", "PT"),
    ("Secondary Capture", "SC"), ("Presentation State", "PS"), ("SR", "SR"),
    ("Ultrasound", "US"), ("Nuclear Medicine", "NM"), ("X-Ray", "XA"), ("Mammography", "MG"),
    ("Computed Radiography", "CR"), ("Digital X-Ray", "DX"), ("RT ", "RT"),
    ("Raw Data", "RAW"), ("Encapsulated PDF", "DOC"), ("Segmentation", "SEG"),
)


def ensure_dir(path: Path) -> Path:
    """Create `path` and missing parents with mode 0750 (umask does not widen it)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass  # made by another thread or process meanwhile
    return path


def atomic_write(path: Path, data: bytes, durable: bool = True, mode: int = FILE_MODE) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename.

    With `durable`, the data is fsynced before the rename and the folder after it, so once this
    returns the file survives a power cut; readers never see a partial file either way.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX)  # created 0600
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(path.parent)


Record = TypeVar("Record")


def load_record(cls: type[Record], path: Path, what: str,
                error: type[Exception] = ValueError) -> Record:
    """A dataclass that was saved as JSON with `atomic_write` (a job file): `error` naming
    `what` when it is missing or unreadable. Keys the class no longer has are ignored, so a
    file written by an older FIONA still loads."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"no {what}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{what} cannot be read: {exc}") from None
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
    return cls(**values)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: file systems whose metadata journal commits in order, so that an fsync of any file also
#: makes every earlier rename or link on that file system durable (ext4 only with its
#: journal: `has_journal`)
ORDERED_METADATA_FS = {"ext4", "xfs"}


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/self/mounts ("" if unknown)."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        return ""
    return fstype


def has_journal(path: Path, sys_root: Path = Path("/sys"),
                proc_root: Path = Path("/proc")) -> bool:
    """Whether the ext4 file system holding `path` keeps a journal. One made or converted
    without (`mkfs.ext4 -O ^has_journal`, common on VM images) syncs a file without the
    directory entries that name it, so a crash can leave an acknowledged object nameless.
    A journal's kernel thread shows in /proc/fs/jbd2 as `<block device>-<inode>`; the device
    is found from the file's st_dev through /sys/dev/block. False when that cannot be told
    (an external journal device, no /sys): the slower path is always safe."""
    dev = os.stat(path).st_dev
    try:
        device = os.path.realpath(sys_root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}")
        journals = os.listdir(proc_root / "fs" / "jbd2")
    except OSError:
        return False
    name = os.path.basename(device)
    return any(entry.startswith(name + "-") for entry in journals)


def metadata_journaled_together(a: Path, b: Path) -> bool:
    """True when an fsync of a file under `b` also makes links made under `a` durable:
    both on one XFS file system, or on one ext4 file system with its journal."""
    try:
        same = os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
    if not same:
        return False
    fstype = filesystem_type(a)
    return fstype in ORDERED_METADATA_FS and (fstype != "ext4" or has_journal(a))


def symlink(target: Path, link: Path) -> None:
    """Point `link` at `target` (relative), making the link's folder if it is missing and
    replacing a stale link atomically. A new link, the common case, costs one system call
    (creating a symbolic link is atomic): the indexer makes one per image."""
    rel = os.path.relpath(target, link.parent)
    for attempt in (1, 2):
        try:
            os.symlink(rel, link)
            return
        except FileNotFoundError:  # the folder is missing
            if attempt == 2:
                raise
            ensure_dir(link.parent)
        except FileExistsError:
            break
    try:
        if os.readlink(link) == rel:
            return
    except OSError:
        pass
    tmp = link.parent / f"{TEMPORARY_PREFIX}{link.name}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def series_links(series_dir: Path) -> list[Path]:
    """A raw/ series folder's instance links, by name. A link the indexer had not yet renamed
    into place when it was killed is left out: taken too, its image would be sent, counted and
    exported twice."""
    return sorted(series_dir / name for name in os.listdir(series_dir)
                  if not name.startswith(TEMPORARY_PREFIX))


def instance_links(study_dir: Path) -> list[Path]:
    """A raw/ study folder's instance links in the order they are de-identified, sent and
    exported: series folders, then links, by name."""
    return [link for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir())
            for link in series_links(series_dir)]


def touch(path: Path, at: float | None = None) -> None:
    """Create `path` empty or set its modification time (the arrival clock) to `at`, else
    now."""
    times = None if at is None else (at, at)
    try:
        os.utime(path, times)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        os.close(fd)
        if times is not None:
            os.utime(path, times)


def arrival_name(caller: str, called: str, ip: str, study: str, series: str = "") -> str:
    """The name of a touch file in `.arrived/`: `<caller> <called> <ip> scp_<Study>` (the
    receiver, per association) or `<caller> <called> <ip> <Study> <Series>` (the indexer, per
    series); the arrival detector reads the study back with `arrival_study`."""
    if series:
        return f"{caller} {called} {ip} {study} {series}"
    return f"{caller} {called} {ip} {ARCHIVE_PREFIX}{study}"


def arrival_study(name: str) -> str:
    """The StudyInstanceUID named by a touch file (`arrival_name`); InvalidValue otherwise."""
    parts = name.split(" ")
    if len(parts) == 4 and parts[3].startswith(ARCHIVE_PREFIX):
        study = parts[3][len(ARCHIVE_PREFIX):]
    elif len(parts) == 5:
        study = parts[3]
    else:
        raise InvalidValue(f"unexpected arrival file name {name!r}")
    return valid_uid(study, "StudyInstanceUID")


@dataclass(frozen=True)
class Tree:
    """Paths of one site's data tree (SPEC §2). Arguments must already be validated values."""

    datadir: Path

    @property
    def config(self) -> Path:
        return self.datadir / "config"

    @property
    def site(self) -> Path:
        return self.datadir / "site"

    @property
    def logs(self) -> Path:
        return self.datadir / "logs"

    @property
    def archive(self) -> Path:
        return self.site / "archive"

    @property
    def receipts(self) -> Path:
        """Received objects whose journal lines may not be synced yet (`fiona.receive.receipts`);
        inside archive/, because a receipt is a hard link to the archived file."""
        return self.archive / ".receipts"

    @property
    def raw(self) -> Path:
        return self.site / "raw"

    @property
    def participants(self) -> Path:
        return self.site / "participants"

    @property
    def srs(self) -> Path:
        return self.site / "srs"

    @property
    def arrived(self) -> Path:
        return self.site / ".arrived"

    @property
    def quarantine(self) -> Path:
        return self.site / "quarantine"

    @property
    def outbox(self) -> Path:
        """Files queued for the SFTP outbox job (`fiona send-files`), each with a .md5sum."""
        return self.site / "outbox"

    @property
    def outbox_done(self) -> Path:
        """Outbox files delivered and verified (with their .md5sum)."""
        return self.outbox / "done"

    @property
    def journal(self) -> Path:
        return self.site / "journal"

    @property
    def mpps(self) -> Path:
        """Modality Performed Procedure Steps, one JSON each (`fiona.scanner.steps`)."""
        return self.site / "mpps"

    @property
    def scans(self) -> Path:
        """Outcomes of scans (finished or failed), one JSON per study (`fiona.scanner.steps`)."""
        return self.site / "scans"

    @property
    def exports(self) -> Path:
        """Finished export zips, each with its .sha256 and .manifest.csv (`fiona.export`)."""
        return self.site / "exports"

    @property
    def export_jobs(self) -> Path:
        """Export jobs, one JSON each (`fiona.export.jobs`)."""
        return self.exports / "jobs"

    @property
    def export_tmp(self) -> Path:
        """Work folders of exports being made, one per job."""
        return self.exports / "tmp"

    @property
    def work(self) -> Path:
        """The forwarder's de-identified files: one folder per request in hand and per study
        prepared ahead of its arrival (`fiona.send.prepare`); emptied when it starts."""
        return self.site / "work"

    @property
    def run(self) -> Path:
        """Named pipes and pid files; inside the tree so no other local user can hijack them."""
        return self.site / "run"

    def study_archive(self, study: str) -> Path:
        return self.archive / f"{ARCHIVE_PREFIX}{study}"

    def archived_studies(self) -> list[str]:
        """The StudyInstanceUIDs with a folder in archive/ (folders whose name is not a valid
        `scp_<UID>` are left out: nothing is ever derived from them)."""
        out = []
        for entry in os.scandir(self.archive):
            name = entry.name
            if entry.is_dir(follow_symlinks=False) and name.startswith(ARCHIVE_PREFIX):
                try:
                    out.append(valid_uid(name[len(ARCHIVE_PREFIX):]))
                except InvalidValue:
                    continue
        return sorted(out)

    def study_raw(self, study: str) -> Path:
        """raw/<Study>: one folder of instance links per series, and the series JSONs."""
        return self.raw / study

    def srs_study(self, manufacturer: str, study: str) -> Path:
        """srs/<Manufacturer>/<Study>: links to a study's structured reports."""
        return self.srs / manufacturer / study

    def archive_file(self, study: str, modality: str, sop: str) -> Path:
        return self.study_archive(study) / f"{modality}.{sop}"

    def series_dir(self, study: str, series: str) -> Path:
        return self.raw / study / series

    def series_json(self, study: str, series: str) -> Path:
        return self.raw / study / f"{series}.json"

    def make(self) -> Tree:
        """Create the fixed folders (idempotent)."""
        for p in (self.config, self.logs, self.archive, self.raw, self.participants, self.srs,
                  self.arrived, self.quarantine, self.outbox, self.journal, self.run):
            ensure_dir(p)
        return self
