"""Unit tests for fiona.journal: durable segment journals and non-blocking pipe wake-ups."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from fiona import journal
from fiona.journal import (
    JournalReader,
    JournalWriter,
    Position,
    WakeupListener,
    WakeupSender,
    _segments,
)
from helpers import in_threads

NAME = "events"


def lines_of(reader: JournalReader, **kw) -> list[str]:
    return [line for line, _pos in reader.read(**kw)]


def drain(reader: JournalReader) -> list[str]:
    """Read everything and commit after it."""
    out, last = [], None
    for line, pos in reader.read():
        out.append(line)
        last = pos
    if last is not None:
        reader.commit(last)
    return out


def segment_files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".log"))


# ---------------------------------------------------------------- round trip and positions

def test_round_trip(tmp_path):
    w = JournalWriter(tmp_path, NAME)
    for i in range(5):
        w.append(f"line {i}")
    w.append("with\nnewline")  # a newline inside an entry must not split it
    r = JournalReader(tmp_path, NAME, "indexer")
    got = list(r.read())
    assert [line for line, _ in got] == [f"line {i}" for i in range(5)] + ["with newline"]
    # each position is just after its line
    offsets = [p.offset for _, p in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    seg = tmp_path / f"{NAME}.0000000001.log"
    assert got[-1][1] == Position(1, seg.stat().st_size)
    assert stat.S_IMODE(seg.stat().st_mode) == 0o640
    w.close()


def test_read_limit_and_start(tmp_path):
    w = JournalWriter(tmp_path, NAME)
    for i in range(10):
        w.append(str(i))
    r = JournalReader(tmp_path, NAME, "c")
    first = list(r.read(limit=3))
    assert [line for line, _ in first] == ["0", "1", "2"]
    rest = [line for line, _ in r.read(start=first[-1][1])]
    assert rest == [str(i) for i in range(3, 10)]
    assert lines_of(r) == [str(i) for i in range(10)]  # nothing committed yet
    w.close()


def test_position_survives_a_new_reader(tmp_path):
    w = JournalWriter(tmp_path, NAME)
    for i in range(3):
        w.append(f"a{i}")
    r = JournalReader(tmp_path, NAME, "indexer")
    assert drain(r) == ["a0", "a1", "a2"]
    w.append("b0")
    r2 = JournalReader(tmp_path, NAME, "indexer")
    assert r2.position == r.position
    assert lines_of(r2) == ["b0"]
    # another consumer has its own position
    assert lines_of(JournalReader(tmp_path, NAME, "other")) == ["a0", "a1", "a2", "b0"]
    w.close()


def test_uncommitted_lines_are_replayed(tmp_path):
    w = JournalWriter(tmp_path, NAME)
    for i in range(4):
        w.append(str(i))
    r = JournalReader(tmp_path, NAME, "c")
    got = list(r.read())
    r.commit(got[1][1])  # consumed 0 and 1; 2 and 3 were read but not committed ("crash")
    r2 = JournalReader(tmp_path, NAME, "c")
    assert lines_of(r2) == ["2", "3"]
    w.close()


def test_writer_always_starts_a_new_segment(tmp_path):
    w1 = JournalWriter(tmp_path, NAME)
    w1.append("one")
    w1.close()
    w2 = JournalWriter(tmp_path, NAME)
    w2.append("two")
    w2.close()
    assert _segments(tmp_path, NAME) == [1, 2]
    assert lines_of(JournalReader(tmp_path, NAME, "c")) == ["one", "two"]


def test_empty_segment_from_idle_writer_is_passed(tmp_path):
    JournalWriter(tmp_path, NAME).close()  # a writer that appended nothing
    w = JournalWriter(tmp_path, NAME)
    w.append("x")
    assert lines_of(JournalReader(tmp_path, NAME, "c")) == ["x"]
    w.close()


def test_torn_line_in_old_segment_is_skipped(tmp_path):
    w1 = JournalWriter(tmp_path, NAME)
    w1.append("good 1")
    w1.close()
    seg1 = tmp_path / f"{NAME}.0000000001.log"
    with open(seg1, "ab") as fh:
        fh.write(b"torn by a cra")  # no trailing newline: a crash during append
    w2 = JournalWriter(tmp_path, NAME)
    w2.append("good 2")
    w2.close()
    r = JournalReader(tmp_path, NAME, "c")
    got = list(r.read())
    assert [line for line, _ in got] == ["good 1", "good 2"]
    assert got[-1][1].seq == 2
    r.commit(got[-1][1])
    assert lines_of(JournalReader(tmp_path, NAME, "c")) == []


def test_partial_line_in_newest_segment_is_waited_for(tmp_path):
    w = JournalWriter(tmp_path, NAME)
    w.append("complete")
    seg = tmp_path / f"{NAME}.0000000001.log"
    with open(seg, "ab") as fh:
        fh.write(b"being writ")  # a line still being written by the live writer
    r = JournalReader(tmp_path, NAME, "c")
    got = list(r.read())
    assert [line for line, _ in got] == ["complete"]
    r.commit(got[-1][1])
    with open(seg, "ab") as fh:
        fh.write(b"ten\n")
    assert lines_of(r) == ["being written"]
    w.close()


def test_commit_deletes_segments_wholly_before_the_position(tmp_path):
    for i in range(3):
        w = JournalWriter(tmp_path, NAME)
        w.append(f"seg{i + 1}")
        w.close()
    assert _segments(tmp_path, NAME) == [1, 2, 3]
    r = JournalReader(tmp_path, NAME, "c")
    got = list(r.read())
    r.commit(got[1][1])  # after the line of segment 2
    assert _segments(tmp_path, NAME) == [2, 3]
    r.commit(got[2][1])
    assert _segments(tmp_path, NAME) == [3]
    assert lines_of(JournalReader(tmp_path, NAME, "c")) == []
    # a new reader after the deletion still starts from the committed position
    w = JournalWriter(tmp_path, NAME)
    w.append("seg4")
    w.close()
    assert lines_of(JournalReader(tmp_path, NAME, "c")) == ["seg4"]


def test_new_reader_without_position_starts_at_oldest_segment(tmp_path):
    for i in range(3):
        w = JournalWriter(tmp_path, NAME)
        w.append(str(i))
        w.close()
    os.unlink(tmp_path / f"{NAME}.0000000001.log")
    r = JournalReader(tmp_path, NAME, "fresh")
    assert r.position == Position(2, 0)
    assert lines_of(r) == ["1", "2"]


def test_segment_rotation(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 100)
    w = JournalWriter(tmp_path, NAME, durable=False)
    expected = [f"entry number {i:04d}" for i in range(50)]  # 18 bytes a line
    for line in expected:
        w.append(line)
    w.close()
    segs = _segments(tmp_path, NAME)
    assert len(segs) >= 8 and segs == list(range(1, len(segs) + 1))
    for s in segs[:-1]:
        size = (tmp_path / f"{NAME}.{s:010d}.log").stat().st_size
        assert 100 <= size < 100 + 19
    r = JournalReader(tmp_path, NAME, "c")
    assert lines_of(r) == expected
    assert drain(r) == expected
    assert _segments(tmp_path, NAME) == segs[-1:]


@pytest.mark.parametrize("segment_bytes", [journal.SEGMENT_BYTES, 200])
def test_concurrent_appends_arrive_exactly_once(tmp_path, monkeypatch, segment_bytes):
    # with tiny segments, rotations happen while other threads are syncing their lines
    monkeypatch.setattr(journal, "SEGMENT_BYTES", segment_bytes)
    w = JournalWriter(tmp_path, NAME)

    def run(t):
        for i in range(200):
            w.append(f"{t}:{i}")

    errors = in_threads(run)
    w.close()
    assert errors == []
    got = lines_of(JournalReader(tmp_path, NAME, "c"), limit=10**6)
    assert len(got) == 1600
    assert sorted(got) == sorted(f"{t}:{i}" for t in range(8) for i in range(200))
    for t in range(8):  # each thread's lines stay in its order
        mine = [g for g in got if g.startswith(f"{t}:")]
        assert mine == [f"{t}:{i}" for i in range(200)]


# ---------------------------------------------------------------- wake-up pipe

def test_notify_without_reader_returns_and_creates_nothing(tmp_path):
    pipe = tmp_path / "run" / ".processSingleFilePipe"
    s = WakeupSender(pipe)
    s.notify("a,b,c,d,e")
    s.notify("again")
    assert not pipe.exists() and not pipe.parent.exists()
    s.close()


def test_notify_with_fifo_but_no_reader_does_not_block(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    s = WakeupSender(pipe)
    s.notify("nobody listens")  # ENXIO: would block forever without O_NONBLOCK
    s.close()


def test_notify_reaches_listener(tmp_path):
    pipe = tmp_path / "run" / "pipe"
    listener = WakeupListener(pipe)
    try:
        assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
        assert listener.wait(0.01) == []
        s = WakeupSender(pipe)
        s.notify("CALLER,FIONA,127.0.0.1,/data/site/archive/scp_1.2,MR.1.2.3")
        assert listener.wait(1.0) == ["CALLER,FIONA,127.0.0.1,/data/site/archive/scp_1.2,MR.1.2.3"]
        s.notify("x")
        s.notify("y")
        assert listener.wait(1.0) == ["x", "y"]
        s.close()
    finally:
        listener.close()


def test_listener_replaces_a_non_fifo(tmp_path):
    pipe = tmp_path / "pipe"
    pipe.write_text("not a pipe")
    listener = WakeupListener(pipe)
    try:
        assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    finally:
        listener.close()


def test_notify_never_blocks_on_a_full_pipe(tmp_path):
    pipe = tmp_path / "pipe"
    listener = WakeupListener(pipe)  # open, but never reads
    s = WakeupSender(pipe)
    errors = []

    def flood():
        try:
            for i in range(100_000):
                s.notify(f"line {i:06d} " + "x" * 40)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(timeout=30)
    try:
        assert not t.is_alive(), "notify blocked on a full pipe"
        assert not errors
        got = listener.wait(1.0)
        assert got and got[0].startswith("line 000000 ")  # the first lines got through
    finally:
        s.close()
        listener.close()
