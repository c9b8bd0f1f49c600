"""Nothing is lost when a daemon is down, killed with SIGKILL, or restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona.receive.receipts import Receipt
from helpers import Gateway, dcmtk, wait_for
from procs import spawn

pytestmark = pytest.mark.e2e


def _send_in_background(gateway: Gateway, folder: Path) -> subprocess.Popen:
    return spawn([dcmtk("storescu"), "+sd", "-aec", "FIONA", "127.0.0.1", str(gateway.port),
                  str(folder)], env={**os.environ, "TCP_NODELAY": "1"},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _links(gateway: Gateway, study: dict) -> int:
    folder = gateway.tree.series_dir(study["study"], study["series"][0])
    return len(os.listdir(folder)) if folder.exists() else 0


def _journal_consumed(gateway: Gateway) -> bool:
    """The indexer's committed position is at the end of the newest journal segment."""
    pos = (gateway.tree.journal / "received.indexer.pos").read_text().split()
    segments = sorted(gateway.tree.journal.glob("received.*.log"))
    newest = segments[-1]
    return int(pos[0]) == int(newest.name.split(".")[1]) and int(pos[1]) == newest.stat().st_size


def test_indexer_killed_mid_transfer_indexes_every_image_once(gateway: Gateway, tmp_path: Path):
    study = make_study(tmp_path / "s", n_series=1, images_per_series=500)
    gateway.start("storescp")
    indexer = gateway.start("process-single-file")
    sender = _send_in_background(gateway, tmp_path / "s")
    wait_for(lambda: _links(gateway, study) >= 100, 120, "the indexer to be under way")
    indexer.send_signal(signal.SIGKILL)
    indexer.wait()
    gateway.procs.pop("process-single-file")
    _, err = sender.communicate(timeout=600)
    assert sender.returncode == 0, err  # the receiver never depended on the indexer
    assert len(gateway.archive_files()) == 500

    gateway.start("process-single-file")
    data = gateway.wait_indexed(study["study"], study["series"][0], 500)
    assert _links(gateway, study) == 500
    wait_for(lambda: _journal_consumed(gateway), 30, "the journal to be consumed")
    assert data["PatientID"] == "PAT0001"
    assert not (gateway.tree.quarantine / "index").exists()


def test_study_arriving_while_the_indexer_is_down(gateway: Gateway, tmp_path: Path):
    study = make_study(tmp_path / "s", n_series=2, images_per_series=20)
    gateway.start("storescp")
    res = gateway.storescu(tmp_path / "s")
    assert res.returncode == 0, res.stderr  # no hang, no error without a reader on the pipe
    assert len(gateway.archive_files()) == 40
    assert not any(gateway.tree.raw.iterdir())
    gateway.start("process-single-file")
    for series in study["series"]:
        gateway.wait_indexed(study["study"], series, 20)


def test_receiver_killed_mid_transfer_loses_nothing_acknowledged(gateway: Gateway,
                                                                 tmp_path: Path):
    study = make_study(tmp_path / "s", n_series=1, images_per_series=300)
    receiver = gateway.start("storescp")
    gateway.start("process-single-file")
    sender = _send_in_background(gateway, tmp_path / "s")
    wait_for(lambda: len(gateway.archive_files()) >= 50, 120, "the transfer to be under way")
    receiver.send_signal(signal.SIGKILL)
    receiver.wait()
    gateway.procs.pop("storescp")
    sender.communicate(timeout=120)
    assert sender.returncode != 0  # the sender knows the transfer broke off
    # the sender sends the study again, as a modality or PACS retries
    gateway.start("storescp")
    res = gateway.storescu(tmp_path / "s")
    assert res.returncode == 0, res.stderr
    gateway.wait_indexed(study["study"], study["series"][0], 300)
    assert len(gateway.archive_files()) == 300
    assert gateway.quarantined() == []  # re-sent copies were identical: no conflicts


def test_background_daemons_leave_the_cpu_to_the_receiver(gateway: Gateway):
    """A sender waits for every status; indexing and forwarding can wait a moment."""
    receiver = gateway.start("storescp")
    indexer = gateway.start("process-single-file")
    forwarder = gateway.start("anonymize-and-send")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    wait_for(lambda: all(os.getpriority(os.PRIO_PROCESS, p.pid) == base + 10
                         for p in (indexer, forwarder)), 30, "them to lower their priority")
    assert os.getpriority(os.PRIO_PROCESS, receiver.pid) == base  # listening: started


def test_a_power_cut_between_receipt_and_journal_sync_loses_nothing(gateway: Gateway,
                                                                    tmp_path: Path):
    """What a power cut leaves (written here by hand): objects acknowledged with their
    receipts whose journal lines were not yet synced (one of them also without its study
    folder's entry, which a disk without a journal syncs after the status), and the torn copy
    of one whose fsync never returned. The receiver files and journals the first on start and
    removes the second."""
    study = make_study(tmp_path / "s", n_series=1, images_per_series=5)
    gateway.tree.make()
    folder = gateway.tree.study_archive(study["study"])
    folder.mkdir()
    receipts = gateway.tree.receipts
    receipts.mkdir(exist_ok=True)
    names = []
    for i, source in enumerate(sorted(study["files"])):
        content = source.read_bytes()
        name = f"MR.{pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID}"
        torn = i == 4
        receipt = receipts / Receipt(f"999.1-{i}", len(content), study["study"], name,
                                     ("SCANNER", "FIONA", "127.0.0.1")).file_name()
        receipt.write_bytes(content[:4096] if torn else content)
        if i != 3:
            os.link(receipt, folder / name)
        names.append(name)
    gateway.start("storescp")
    gateway.start("process-single-file")
    gateway.wait_indexed(study["study"], study["series"][0], 4)
    assert sorted(os.listdir(folder)) == sorted(names[:4])
    assert os.listdir(receipts) == []
    # the torn one was never acknowledged: its sender sends the study again
    res = gateway.storescu(tmp_path / "s")
    assert res.returncode == 0, res.stderr
    gateway.wait_indexed(study["study"], study["series"][0], 5)
    assert gateway.quarantined() == []


def test_a_second_receiver_for_the_same_site_refuses_to_start(gateway: Gateway):
    gateway.start("storescp")
    res = gateway.run("storescp", check=False)
    assert res.returncode == 1
    assert "already running" in res.stderr
    # the first one still serves
    assert subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(gateway.port)]).returncode == 0


def test_port_in_use_is_a_clear_error(gateway: Gateway):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", gateway.port))
        blocker.listen(1)
        res = gateway.run("storescp", check=False)
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{gateway.port}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (gateway.tree.run / "storescpd.pid").exists()
