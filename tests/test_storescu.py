"""fiona.send.storescu, the forwarder's lean C-STORE requestor, against pynetdicom as the peer:
what it sends arrives byte for byte in the peer's maximum PDU, failure statuses come back
with the peer's comment, an abort or a rejection is told apart."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import MRImageStorage

from dicomgen import make_study
from fiona.dicom_client import Timeouts
from fiona.send.destinations.dicom import _dataset_bytes
from fiona.send.storescu import Lost, Rejected, StoreAssociation
from helpers import free_port

EXPLICIT = "1.2.840.10008.1.2.1"
TIMEOUTS = Timeouts(5, 5, 5, 5)


@pytest.fixture
def peer():
    """A pynetdicom storage SCP with a small maximum PDU; `peer.answer(event)` decides."""
    received: list[tuple[str, bytes]] = []

    class Peer:
        port = free_port()
        answer = None

    def on_store(event):
        received.append((event.request.AffectedSOPInstanceUID, event.request.DataSet.getvalue()))
        return Peer.answer(event) if Peer.answer else 0x0000

    ae = AE("PEER")
    ae.maximum_pdu_size = 16384  # the data set must be split into many PDUs
    ae.require_calling_aet = ["FIONA"]
    ae.add_supported_context(MRImageStorage, EXPLICIT)
    server = ae.start_server(("127.0.0.1", Peer.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    Peer.received = received
    yield Peer
    server.shutdown()


def associate(port: int, calling: str = "FIONA", syntax: str = EXPLICIT):
    return StoreAssociation.request(calling, "127.0.0.1", port, "PEER",
                                    [build_context(MRImageStorage, [syntax])], TIMEOUTS)


def study_files(tmp_path: Path, n: int) -> list[Path]:
    return make_study(tmp_path / "s", n_series=1, images_per_series=n)["files"]


def test_store_arrives_byte_for_byte_in_small_pdus(peer, tmp_path):
    files = study_files(tmp_path, 3)
    assoc = associate(peer.port)
    assert assoc is not None
    assert assoc.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        status = assoc.send_c_store(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT,
                                    _dataset_bytes(f))
        assert status == (0x0000, "")
    assoc.release()
    assert [uid for uid, _ in peer.received] == [
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    for (_, data), f in zip(peer.received, files, strict=True):
        assert data == bytes(_dataset_bytes(f))


def test_a_failure_status_comes_back_with_the_comment(peer, tmp_path):
    def refuse(event):
        status = Dataset()
        status.Status = 0xA700
        status.ErrorComment = "no room"
        return status

    peer.answer = refuse
    [f] = study_files(tmp_path, 1)
    ds = dcmread(f, stop_before_pixels=True)
    assoc = associate(peer.port)
    assert assoc.send_c_store(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT,
                              _dataset_bytes(f)) == (0xA700, "no room")
    assoc.release()


def test_an_abort_during_a_store_is_lost(peer, tmp_path):
    def abort(event):
        event.assoc.abort()
        return 0x0000

    peer.answer = abort
    [f] = study_files(tmp_path, 1)
    ds = dcmread(f, stop_before_pixels=True)
    assoc = associate(peer.port)
    with pytest.raises(Lost):
        assoc.send_c_store(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT,
                           _dataset_bytes(f))
    assert not assoc.is_established
    assoc.release()  # nothing left to release: no error


def test_rejection_no_context_and_no_peer(peer):
    with pytest.raises(Rejected) as rejected:
        associate(peer.port, calling="STRANGER")
    assert rejected.value.result == 1 and "Calling AE title not recognised" in str(rejected.value)
    assert associate(peer.port, syntax="1.2.840.10008.1.2.4.50") is None  # JPEG: not taken
    with pytest.raises(OSError):
        associate(free_port())
