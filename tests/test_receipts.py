"""fiona.receive.receipts: an object and its receipt durable (in one commit where the disk
commits links with a file, else with the receipts folder synced before the status and the
study folder by the flusher), the journal synced behind them, and what a crash leaves
recovered (simulated by writing what a crash leaves)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from fiona.journal import RECEIVED, FileEvent, JournalReader, JournalWriter
from fiona.receive.receipts import Receipt, Receipts
from fiona.tree import Tree
from helpers import in_threads

STUDY = "1.2.3"


def journal_lines(tree: Tree) -> list[str]:
    return [line for line, _pos in JournalReader(tree.journal, RECEIVED, "test").read()]


@pytest.fixture(params=[True, False], ids=["one commit", "folders synced"])
def site(tmp_path, request):
    """Both ways of making an object durable, whichever this machine's disk needs (an ext4
    without a journal takes the second: `fiona.tree.has_journal`)."""
    tree = Tree(tmp_path / "data").make()
    journal = JournalWriter(tree.journal, RECEIVED, durable=False)
    receipts = Receipts(tree, journal)
    receipts.one_commit = request.param
    folder = tree.study_archive(STUDY)
    folder.mkdir()
    yield tree, journal, receipts
    receipts.close()
    journal.close()


def event(tree: Tree, sop: str, caller: str = "SCANNER") -> FileEvent:
    return FileEvent(caller, "FIONA", "127.0.0.1", tree.study_archive(STUDY), f"MR.{sop}")


def stored(receipts: Receipts, study: str, e: FileEvent, content: list[bytes]) -> None:
    """Store and journal, as the receiver does (the journal step after the sender's status)."""
    journal = receipts.store(study, e, content)
    assert journal is not None
    journal()


def test_store_files_journals_and_the_flush_removes_the_receipt(site):
    tree, _journal, receipts = site
    e = event(tree, "1.2.3.4")
    journal = receipts.store(STUDY, e, [b"x" * 100_000])
    archived = tree.study_archive(STUDY) / "MR.1.2.3.4"
    assert archived.read_bytes() == b"x" * 100_000
    assert stat.S_IMODE(archived.stat().st_mode) == 0o640
    [receipt] = os.listdir(tree.receipts)
    assert os.path.samefile(tree.receipts / receipt, archived)
    assert journal_lines(tree) == []          # the sender may have its status already ...
    receipts.flush()
    assert os.listdir(tree.receipts) == [receipt]  # ... the receipt holds it until then
    assert journal is not None
    journal()
    assert journal_lines(tree) == [e.line()]  # at once, for the indexer
    receipts.flush()
    assert os.listdir(tree.receipts) == []
    assert archived.stat().st_nlink == 1


def test_store_never_overwrites_and_leaves_no_receipt(site):
    tree, _journal, receipts = site
    stored(receipts, STUDY, event(tree, "1.5"), [b"original"])
    with pytest.raises(FileExistsError):
        receipts.store(STUDY, event(tree, "1.5"), [b"replacement"])
    assert (tree.study_archive(STUDY) / "MR.1.5").read_bytes() == b"original"
    missing = FileEvent("A", "B", "1.1.1.1", tree.study_archive("9.9"), "MR.1.6")
    with pytest.raises(FileNotFoundError):
        receipts.store("9.9", missing, [b"x"])
    assert len(journal_lines(tree)) == 1
    receipts.flush()
    assert os.listdir(tree.receipts) == []


def test_without_one_commit_the_data_is_synced_before_its_name_and_the_folders_after(
        site, monkeypatch):
    """The order an ext4 without a journal needs: a name on disk never points at data that is
    not; the receipt's name is on disk before the status, and the study folder's before the
    journal line is synced and the receipt removed."""
    tree, _journal, receipts = site
    receipts.one_commit = False
    calls: list[tuple[str, str]] = []
    fsync, fdatasync, link = os.fsync, os.fdatasync, os.link

    def recording(op, call):
        def record(fd, *args, **kwargs):
            target = args[0] if op == "link" else os.readlink(f"/proc/self/fd/{fd}")
            calls.append((op, str(target)))
            return call(fd, *args, **kwargs)
        return record

    monkeypatch.setattr(os, "fsync", recording("fsync", fsync))
    monkeypatch.setattr(os, "fdatasync", recording("fdatasync", fdatasync))
    monkeypatch.setattr(os, "link", recording("link", link))
    stored(receipts, STUDY, event(tree, "1.7"), [b"data"])
    folder = str(tree.study_archive(STUDY))
    archived = folder + "/MR.1.7"
    ops = [(op, target) for op, target in calls if op != "link" or target == archived]
    assert ops[0][0] == "fsync" and ops[0][1].startswith(str(tree.receipts))   # the file
    assert ops[1:] == [("link", archived), ("fsync", str(tree.receipts))]
    calls.clear()
    receipts.flush()
    assert [op for op, _ in calls] == ["fsync", "fsync", "fdatasync"]
    assert [target for _, target in calls[:2]] == [folder, str(tree.archive)]
    assert calls[2][1].startswith(str(tree.journal))
    assert os.listdir(tree.receipts) == []


def test_recover_files_again_an_object_whose_folder_entry_a_crash_lost(site):
    """Without one commit the status follows the receipt's name, not the study folder's
    entry: a power cut can keep the first and lose the second. The receipt is the object."""
    tree, _journal, receipts = site
    archived, e = crash_leftover(tree, "2.9", b"complete object")
    archived.unlink()                                 # the folder's entry never reached the disk
    shutil.rmtree(tree.study_archive(STUDY))          # nor did the folder's own
    receipts.recover()
    assert archived.read_bytes() == b"complete object"
    assert journal_lines(tree) == [e.line()]
    assert os.listdir(tree.receipts) == []


def test_store_without_unnamed_files(site, monkeypatch):
    tree, _journal, receipts = site
    monkeypatch.setattr(receipts._spares, "_make", lambda: None)  # no O_TMPFILE
    while receipts._spares._queue.qsize():
        os.close(receipts._spares.take()[0])
    stored(receipts, STUDY, event(tree, "1.9"), [b"data"])
    with pytest.raises(FileExistsError):
        receipts.store(STUDY, event(tree, "1.9"), [b"other"])
    assert (tree.study_archive(STUDY) / "MR.1.9").read_bytes() == b"data"
    receipts.flush()
    assert os.listdir(tree.receipts) == []


def test_concurrent_stores(site):
    tree, _journal, receipts = site

    def run(t):
        for i in range(25):
            stored(receipts, STUDY, event(tree, f"1.{t}.{i}"), [f"{t}:{i}".encode()])

    assert in_threads(run) == []
    assert len(os.listdir(tree.study_archive(STUDY))) == 200
    assert len(set(journal_lines(tree))) == 200
    receipts.flush()
    assert os.listdir(tree.receipts) == []


def test_a_name_too_long_for_a_receipt_syncs_the_journal_instead(site):
    tree, _journal, receipts = site
    # AE titles of escapes (each byte shown as 4 characters), and long UIDs
    study = "1." * 31 + "1"
    tree.study_archive(study).mkdir()
    e = FileEvent("_x01" * 16, "_x02" * 16, "127.0.0.1", tree.study_archive(study),
                  "MR." + "1." * 31 + "1")
    assert receipts.store(study, e, [b"data"]) is None   # journaled and synced already
    assert os.listdir(tree.receipts) == []
    assert journal_lines(tree) == [e.line()]


# ---------------------------------------------------------------- after a crash

def crash_leftover(tree: Tree, sop: str, content: bytes, size: int | None = None,
                   writer: str = "4242.1") -> tuple[Path, FileEvent]:
    """What a crash leaves: the receipt and the archived file (a link to it), no journal line."""
    e = event(tree, sop)
    name = Receipt(f"{writer}-1", len(content) if size is None else size, STUDY, e.name,
                   (e.caller, e.called, e.ip)).file_name()
    (tree.receipts / name).write_bytes(content)
    os.link(tree.receipts / name, tree.study_archive(STUDY) / e.name)
    return tree.study_archive(STUDY) / e.name, e


def test_recover_journals_what_the_receipts_name(site):
    tree, _journal, receipts = site
    archived, e = crash_leftover(tree, "2.1", b"complete")
    receipts.recover()
    assert journal_lines(tree) == [e.line()]
    assert archived.read_bytes() == b"complete"
    assert os.listdir(tree.receipts) == []


def test_recover_removes_a_torn_copy_and_the_resent_object_is_stored(site, caplog):
    tree, _journal, receipts = site
    archived, e = crash_leftover(tree, "2.2", b"torn", size=1000)
    receipts.recover()
    assert not archived.exists()
    assert journal_lines(tree) == []
    assert "torn copy (4 of 1000 bytes)" in caplog.text
    receipts.store(STUDY, e, [b"x" * 1000])  # the sender was never told "stored": it sends again
    assert archived.read_bytes() == b"x" * 1000


def test_recover_drops_receipts_of_objects_never_linked_or_archived_by_another(site):
    tree, _journal, receipts = site
    e = event(tree, "2.3")
    (tree.receipts / Receipt("4242.1-7", 3, STUDY, e.name, None).file_name()).write_bytes(b"abc")
    other = tree.study_archive(STUDY) / "MR.2.4"
    other.write_bytes(b"first")
    (tree.receipts / Receipt("4242.1-8", 5, STUDY, "MR.2.4",
                             ("A", "B", "1.1.1.1")).file_name()).write_bytes(b"later")
    receipts.recover()
    assert os.listdir(tree.receipts) == []
    assert other.read_bytes() == b"first" and journal_lines(tree) == []


def test_recover_of_one_dead_writer_leaves_the_others(site):
    tree, _journal, receipts = site
    crash_leftover(tree, "2.5", b"a", writer="111.5")
    _, e = crash_leftover(tree, "2.6", b"b", writer="222.5")
    receipts.recover(writer_pid=222)
    assert journal_lines(tree) == [e.line()]
    assert len(os.listdir(tree.receipts)) == 1


def test_a_receipt_with_a_hostile_name_is_left_alone(site, caplog):
    tree, _journal, receipts = site
    (tree.receipts / "1-1,3,..,MR.1").write_bytes(b"abc")
    (tree.receipts / ".tmp.abc").write_bytes(b"a spare never linked")
    receipts.recover()
    assert os.listdir(tree.receipts) == ["1-1,3,..,MR.1"]
    assert "remove it by hand" in caplog.text
