"""fiona.send.storescu, the forwarder's lean C-STORE requestor, against pynetdicom as the peer:
what it sends arrives byte for byte in the peer's maximum PDU, failure statuses come back
with the peer's comment, an abort or a rejection is told apart."""

from __future__ import annotations

import socket
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import MRImageStorage

from dicomgen import make_study
from fiona.dicom_client import Timeouts
from fiona.send.destinations.dicom import DicomDestination, _dataset_bytes
from fiona.send.storescu import Lost, Rejected, StoreAssociation
from helpers import free_port

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
TIMEOUTS = Timeouts(5, 5, 5, 5)


def make_peer(port: int, syntax: str, received: list, answer=None, **settings) -> object:
    """A pynetdicom storage SCP taking MR in `syntax` only; what it stores goes to
    `received`, `answer(event)` (default: success) decides the status, `settings` are AE
    attributes."""
    def on_store(event):
        received.append((event.request.AffectedSOPInstanceUID, event.request.DataSet.getvalue()))
        return answer(event) if answer else 0x0000

    ae = AE("PEER")
    for name, value in settings.items():
        setattr(ae, name, value)
    ae.add_supported_context(MRImageStorage, syntax)
    return ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])


@pytest.fixture
def peer():
    """An explicit-VR peer with a small maximum PDU that knows FIONA; `peer.answer` decides."""

    class Peer:
        port = free_port()
        received: list = []
        answer = None

    # the data set must be split into many PDUs
    server = make_peer(Peer.port, EXPLICIT, Peer.received, lambda e: (
        Peer.answer(e) if Peer.answer else 0x0000), maximum_pdu_size=16384,
        require_calling_aet=["FIONA"])
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


def test_a_peer_taking_only_implicit_vr_gets_the_file_re_encoded(tmp_path):
    port, received = free_port(), []
    server = make_peer(port, IMPLICIT, received)
    try:
        files = study_files(tmp_path, 2)  # Explicit VR Little Endian on disk
        d = DicomDestination("research", {"aetitle": "PEER", "host": "127.0.0.1", "port": port})
        result = d.send(files)
        assert (result.sent, result.failed) == (2, [])
    finally:
        server.shutdown()
    by_uid = dict(received)  # two associations: in either order
    assert len(by_uid) == len(files)
    for f in files:
        original = dcmread(f)
        got = read_dataset(BytesIO(by_uid[original.SOPInstanceUID]), is_implicit_VR=True,
                           is_little_endian=True)
        assert got.SOPInstanceUID == original.SOPInstanceUID
        assert got.PatientID == original.PatientID and got.PixelData == original.PixelData
