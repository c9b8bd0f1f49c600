"""The receiver with several processes (RECEIVER_PROCESSES): parallel associations are filed
and journaled exactly once, a SIGKILL loses nothing that was acknowledged, and the workers
live and die with the daemon."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona import journal
from fiona.journal import RECEIVED, JournalReader, JournalWriter
from fiona.receive.receipts import Receipt
from fiona.receive.store import dataset_part
from helpers import Gateway, dcmtk, listening, wait_for
from procs import alive, children, spawn

PROCESSES = 3
SENDERS = 8


def _send_parallel(gateway: Gateway, files: list[Path]) -> list[subprocess.Popen]:
    """SENDERS storescu associations at once, each with its share of `files`, verbose (each
    acknowledged file shows as its "Sending file" line followed by a success response)."""
    size = -(-len(files) // SENDERS)
    return [spawn([dcmtk("storescu"), "-v", "-aec", "FIONA", "127.0.0.1", str(gateway.port),
                   *map(str, files[i:i + size])], env={**os.environ, "TCP_NODELAY": "1"},
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(0, len(files), size)]


def _acknowledged(output: str) -> list[Path]:
    """The files that storescu's verbose output shows as stored with success."""
    done, current = [], None
    for line in output.splitlines():
        if m := re.match(r"I: Sending file: (.+)$", line):
            current = Path(m[1])
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def _journal_lines(gateway: Gateway) -> list[str]:
    reader = JournalReader(gateway.tree.journal, RECEIVED, "test")
    return [line for line, _pos in reader.read(limit=10**6)]


def _name(source: Path) -> str:
    """The archive file name of `source`."""
    return f"MR.{pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID}"


@pytest.mark.e2e
def test_parallel_associations_over_worker_processes_each_object_once(make_gateway):
    gateway = make_gateway(RECEIVER_PROCESSES=PROCESSES)
    study = make_study(gateway.datadir.parent / "s", n_series=2, images_per_series=40)
    receiver = gateway.start("storescp")
    gateway.start("process-single-file")
    wait_for(lambda: len(children(receiver.pid)) == PROCESSES - 1, 60, "the workers")
    senders = _send_parallel(gateway, study["files"])
    for sender in senders:
        out, _ = sender.communicate(timeout=600)
        assert sender.returncode == 0, out
    names = [line.rsplit(",", 1)[1] for line in _journal_lines(gateway)]
    assert sorted(names) == sorted(map(_name, study["files"]))  # each object once
    assert len(gateway.archive_files()) == 80
    for series in study["series"]:
        assert gateway.wait_indexed(study["study"], series, 40)["NumFiles"] == 40
    reader = JournalReader(gateway.tree.journal, RECEIVED, "indexer")
    wait_for(reader.caught_up, 60, "the indexer to read the whole journal")
    assert gateway.quarantined() == []


@pytest.mark.e2e
def test_sigkill_of_the_receiver_loses_nothing_acknowledged_by_any_worker(make_gateway):
    gateway = make_gateway(RECEIVER_PROCESSES=PROCESSES)
    study = make_study(gateway.datadir.parent / "s", n_series=1, images_per_series=240)
    receiver = gateway.start("storescp")
    wait_for(lambda: len(children(receiver.pid)) == PROCESSES - 1, 60, "the workers")
    workers = children(receiver.pid)
    senders = _send_parallel(gateway, study["files"])
    wait_for(lambda: len(gateway.archive_files()) >= 60, 120, "the transfer to be under way")
    receiver.send_signal(signal.SIGKILL)
    receiver.wait()
    gateway.procs.pop("storescp")
    acknowledged = []
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        acknowledged += _acknowledged(out)
    assert any(sender.returncode != 0 for sender in senders)  # cut off
    wait_for(lambda: not any(alive(pid) for pid in workers), 30, "the workers to die with it")
    assert acknowledged
    for source in acknowledged:  # durable and whole
        target = gateway.tree.study_archive(study["study"]) / _name(source)
        assert dataset_part(target) == dataset_part(source)
    # restarted, before anything is sent again: every acknowledged object is in the journal
    # (an object's line follows its status; until then its receipt holds it)
    gateway.start("storescp")
    journaled = set(_journal_lines(gateway))
    for source in acknowledged:
        assert any(line.endswith(f",{_name(source)}") for line in journaled)
    # the senders try again: everything arrives, identical re-sent copies are no conflicts
    gateway.start("process-single-file")
    res = gateway.storescu(gateway.datadir.parent / "s")
    assert res.returncode == 0, res.stderr
    gateway.wait_indexed(study["study"], study["series"][0], 240)
    assert gateway.quarantined() == []


@pytest.mark.e2e
def test_a_dead_worker_is_replaced_and_the_workers_stop_with_the_daemon(make_gateway):
    gateway = make_gateway(RECEIVER_PROCESSES=2)
    receiver = gateway.start("storescp")
    wait_for(lambda: len(children(receiver.pid)) == 1, 60, "the worker")
    [worker] = children(receiver.pid)
    # a receipt the worker had not flushed yet (written by hand): the daemon journals it
    gateway.tree.study_archive("1.2").mkdir()
    receipt = gateway.tree.receipts / Receipt(f"{worker}.1-1", 1, "1.2", "MR.1.2.3",
                                              ("SCANNER", "FIONA", "127.0.0.1")).file_name()
    receipt.write_bytes(b"x")
    os.link(receipt, gateway.tree.study_archive("1.2") / "MR.1.2.3")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: [p for p in children(receiver.pid) if p != worker], 60,
             "a new worker")
    [replacement] = children(receiver.pid)
    log = (gateway.tree.logs / "storescpd.log").read_text()
    assert "exited with status -9; starting it again" in log
    assert f"receipts left by receiver process {worker}: 1 objects journaled again" in log
    assert any(line.endswith(",MR.1.2.3") for line in _journal_lines(gateway))
    assert not receipt.exists()
    gateway.stop("storescp")
    assert not alive(replacement)
    assert not listening(gateway.port)


def _append_lines(folder: Path, k: int, count: int) -> None:
    """A writer process of the journal test (starts after the first writer: joins)."""
    writer = JournalWriter(folder, RECEIVED, durable=False, join=True)
    for i in range(count):
        writer.append(f"w{k}-{i}")
    writer.close()


def test_writers_in_several_processes_share_the_journal_and_every_line_is_read_once(
        tmp_path: Path, monkeypatch):
    """Writer processes append to tiny segments (rotating all the time) while a reader
    consumes them and deletes what it has read: no line lost, none read twice."""
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 200)  # inherited by the forked writers
    first = JournalWriter(tmp_path, RECEIVED, durable=False, shared=True)
    reader = JournalReader(tmp_path, RECEIVED, "indexer")
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_append_lines, args=(tmp_path, k, 300)) for k in range(3)]
    for w in writers:
        w.start()
    got: list[str] = []
    while True:
        finished = not any(w.is_alive() for w in writers)  # then read once more
        batch = list(reader.read())
        got += [line for line, _ in batch]
        if batch:
            reader.commit(batch[-1][1])
        if finished:
            break
    first.close()
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert sorted(got) == sorted(f"w{k}-{i}" for k in range(3) for i in range(300))
    assert len(list(tmp_path.glob(f"{RECEIVED}.*.log"))) <= 2  # consumed segments deleted
