"""Unit tests for fiona.tree: UID and name validation (SPEC §2), durable file creation, modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fiona.tree import (
    DIR_MODE,
    FILE_MODE,
    InvalidValue,
    Tree,
    atomic_write,
    ensure_dir,
    filesystem_type,
    has_journal,
    modality_prefix,
    safe_name,
    symlink,
    touch,
    valid_uid,
)
from helpers import in_threads


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def leftovers(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".tmp")]


# ---------------------------------------------------------------- valid_uid

@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.4", "0", "2.25.123", "1.0.2",
                                 "1." + "2" * 62])
def test_valid_uid_accepts(uid):
    assert len(uid) <= 64
    assert valid_uid(uid) == uid


@pytest.mark.parametrize("uid", ["", None, "../../etc", "1.2.abc", "1..2", "1.2.", ".1",
                                 "1.02", "01.2", "1." + "2" * 63, "1.2/3", "1.2\\3", " 1.2",
                                 "1.2\x003", "1.-2", "+1.2", "1.2e3", "１.２"])
def test_valid_uid_rejects(uid):
    with pytest.raises(InvalidValue):
        valid_uid(uid)


def test_valid_uid_rejects_65_characters():
    uid = "1." + "2" * 63
    assert len(uid) == 65
    with pytest.raises(InvalidValue, match="64"):
        valid_uid(uid)


@pytest.mark.parametrize("padded", ["1.2.3\x00", "1.2.3 ", "1.2.3\x00\x00"])
def test_valid_uid_strips_dicom_padding(padded):
    assert valid_uid(padded) == "1.2.3"


def test_valid_uid_message_names_what():
    with pytest.raises(InvalidValue, match="StudyInstanceUID"):
        valid_uid("1..2", "StudyInstanceUID")
    with pytest.raises(InvalidValue, match="SOPInstanceUID is missing"):
        valid_uid(None, "SOPInstanceUID")


def test_invalid_value_is_a_value_error():
    assert issubclass(InvalidValue, ValueError)


def test_uid_with_a_trailing_newline_is_refused():
    with pytest.raises(InvalidValue):
        valid_uid("1.2.3\n")


# ---------------------------------------------------------------- safe_name

UNSAFE = [". ..", ". .x", ". .", "../x", "a/b", ".hidden", "\x00ab", "", None, "..", "...", "/",
          "/etc/passwd",
          "a\\b", "x\ny", " .x", "\x7f", "." * 70, "A" * 200, " " * 80 + "B" * 80,
          "ab/" * 40, 12345]


@pytest.mark.parametrize("value", UNSAFE)
def test_safe_name_is_one_safe_component(value):
    name = safe_name(value)
    assert name
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".")
    assert name not in (".", "..")
    assert len(name) <= 64
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in name)


@pytest.mark.parametrize("value, expected", [
    ("../x", "_x"), ("a/b", "a_b"), (".hidden", "hidden"), ("\x00ab", "_ab"), ("", "unknown"),
    (None, "unknown"), ("..", "unknown"), ("  PAT 01  ", "PAT 01"), ("Doe^Jane", "Doe^Jane"),
    ("SIEMENS", "SIEMENS"),
])
def test_safe_name_values(value, expected):
    assert safe_name(value) == expected


def test_safe_name_default_and_length():
    assert safe_name("", default="_") == "_"
    assert safe_name("x" * 100) == "x" * 64


# ---------------------------------------------------------------- atomic_write

def test_atomic_write_creates_0640_and_replaces(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    assert mode(path) == FILE_MODE == 0o640
    ino = path.stat().st_ino
    atomic_write(path, b"two" * 1000)
    assert path.read_bytes() == b"two" * 1000
    assert path.stat().st_ino != ino  # a new file renamed over the old one
    assert mode(path) == 0o640
    atomic_write(path, b"three", durable=False)
    assert path.read_bytes() == b"three"
    assert leftovers(tmp_path) == []


def test_atomic_write_mode_under_umask_0(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "f") == 0o640


def test_atomic_write_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- ensure_dir

def test_ensure_dir_creates_every_level_0750_under_umask_0(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    old = os.umask(0)
    try:
        assert ensure_dir(target) == target
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert p.is_dir()
        assert mode(p) == DIR_MODE == 0o750


def test_ensure_dir_existing_is_untouched(tmp_path):
    os.chmod(tmp_path, 0o700)
    ensure_dir(tmp_path)
    assert mode(tmp_path) == 0o700


def test_ensure_dir_concurrent(tmp_path):
    target = tmp_path / "x" / "y" / "z"
    assert in_threads(lambda _t: ensure_dir(target)) == []
    assert target.is_dir()


def test_tree_make(tmp_path):
    tree = Tree(tmp_path / "data").make()
    for p in (tree.config, tree.logs, tree.archive, tree.raw, tree.participants, tree.srs,
              tree.arrived, tree.quarantine, tree.outbox, tree.journal, tree.run):
        assert p.is_dir() and mode(p) == 0o750
    assert tree.archive_file("1.2", "MR", "1.2.3") == tree.archive / "scp_1.2" / "MR.1.2.3"
    assert tree.series_json("1.2", "1.3") == tree.raw / "1.2" / "1.3.json"
    Tree(tmp_path / "data").make()  # idempotent


# ---------------------------------------------------------------- symlink, touch

def test_symlink_relative_replaces_stale_and_is_idempotent(tmp_path):
    a = tmp_path / "archive" / "f1"
    b = tmp_path / "archive" / "f2"
    a.parent.mkdir()
    a.write_text("1")
    b.write_text("2")
    link = tmp_path / "raw" / "s" / "sop"
    symlink(a, link)  # the missing folders are made, private
    assert os.readlink(link) == "../../archive/f1"
    assert stat.S_IMODE(link.parent.stat().st_mode) == 0o750
    assert link.read_text() == "1"
    st = os.lstat(link)
    symlink(a, link)  # idempotent: the link is not even replaced
    assert os.lstat(link).st_ino == st.st_ino
    symlink(b, link)  # stale link replaced
    assert link.read_text() == "2"
    os.unlink(b)
    symlink(a, link)  # dangling link replaced too
    assert link.read_text() == "1"
    assert leftovers(link.parent) == []


def test_touch_creates_and_bumps(tmp_path):
    p = tmp_path / "t"
    touch(p)
    assert p.exists() and p.stat().st_size == 0
    os.utime(p, (1000, 1000))
    touch(p)
    assert p.stat().st_mtime > 1000


# ---------------------------------------------------------------- modality_prefix, fs type

@pytest.mark.parametrize("sop, mod", [
    ("1.2.840.10008.5.1.4.1.1.4", "MR"),        # MR Image Storage
    ("1.2.840.10008.5.1.4.1.1.4.1", "MR"),      # Enhanced MR Image Storage
    ("1.2.840.10008.5.1.4.1.1.2", "CT"),        # CT Image Storage
    ("1.2.840.10008.5.1.4.1.1.7", "SC"),        # Secondary Capture
    ("1.2.840.10008.5.1.4.1.1.88.22", "SR"),    # Enhanced SR
    ("1.2.840.10008.5.1.4.1.1.88.11", "SR"),    # Basic Text SR
    ("1.2.840.10008.5.1.4.1.1.11.1", "PS"),     # Grayscale Softcopy Presentation State
    ("1.2.840.10008.5.1.4.1.1.128", "PT"),      # PET Image Storage
    ("1.2.840.10008.5.1.4.1.1.6.1", "US"),      # Ultrasound Image Storage
    ("1.3.12.2.1107.5.9.1", "OT"),              # Siemens CSA non-image (private)
    ("1.2.3.4", "OT"),
    ("", "OT"),
])
def test_modality_prefix(sop, mod):
    assert modality_prefix(sop) == mod


def test_filesystem_type_of_repo():
    fstype = filesystem_type(Path(__file__).resolve().parent)
    assert isinstance(fstype, str) and fstype


def _block_devices(tmp_path: Path, journals: list[str]) -> tuple[Path, Path]:
    """A /sys and a /proc in which the device holding tmp_path is `vdb1`, and /proc/fs/jbd2
    lists `journals`."""
    dev = os.stat(tmp_path).st_dev
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    (sys_root / "devices" / "vdb" / "vdb1").mkdir(parents=True)
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(
        sys_root / "devices" / "vdb" / "vdb1")
    (proc_root / "fs" / "jbd2").mkdir(parents=True)
    for name in journals:
        (proc_root / "fs" / "jbd2" / name).mkdir()
    return sys_root, proc_root


@pytest.mark.parametrize("journals, journaled", [
    (["vdb1-8"], True),
    (["vda-8", "vdb10-8"], False),   # other devices' journals only
    ([], False),                     # made without a journal (mkfs.ext4 -O ^has_journal)
])
def test_has_journal_finds_the_journal_of_the_device_holding_the_path(
        tmp_path, journals, journaled):
    """An ext4 without a journal syncs a file but not the directory entries that name it; the
    receipts then sync the folders too (test_receipts covers that order)."""
    sys_root, proc_root = _block_devices(tmp_path, journals)
    assert has_journal(tmp_path, sys_root, proc_root) is journaled


def test_has_journal_is_false_when_it_cannot_tell(tmp_path):
    assert not has_journal(tmp_path, tmp_path / "no-sys", tmp_path / "no-proc")
