"""Destinations: a folder on disk, and a real Orthanc as the research PACS (Debian package
`orthanc`, see tests/orthanc.py). Files are sent to 127.0.0.1 only."""

from __future__ import annotations

import shutil
import socket
import stat
import threading
import time
import warnings
from collections import defaultdict
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomgen import make_study
from fiona import dicom_client
from fiona.clock import FakeClock
from fiona.config import ConfigError, parse
from fiona.send.destinations import (
    REGISTRY,
    DestinationError,
    DestinationUnavailable,
    DicomDestination,
    FolderDestination,
    open_destination,
)
from fiona.send.destinations import dicom as dest
from orthanc import Orthanc

# pydicom's own test files in compressed and other transfer syntaxes; some share a
# SOPInstanceUID (the same instance in another syntax), as real resends do
TESTDATA = ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEG-lossy.dcm",
            "MR_small_jpeg_ls_lossless.dcm", "CT_small.dcm", "MR_small_implicit.dcm"]


def testdata(tmp_path: Path, names=TESTDATA) -> list[Path]:
    out = tmp_path / "testdata"
    out.mkdir(exist_ok=True)
    files = []
    for name in names:
        src = get_testdata_file(name)
        assert src, f"pydicom test file {name} is missing"
        files.append(Path(shutil.copy(src, out / name)))
    return files


def expected_counts(files: list[Path]) -> dict[str, dict[str, int]]:
    """study -> series -> number of distinct SOP instances in `files`."""
    seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        seen[ds.StudyInstanceUID][ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
    return {st: {se: len(s) for se, s in series.items()} for st, series in seen.items()}


def pacs_destination(pacs: Orthanc, **settings) -> DicomDestination:
    d = DicomDestination("research", {"aetitle": pacs.aet, "host": "127.0.0.1",
                                      "port": pacs.dicom_port, **settings})
    d.backoff_seconds = 0.05
    return d


# --- folder ---------------------------------------------------------------------------------

def test_folder_send_count_and_idempotent_resend(tmp_path):
    study = make_study(tmp_path / "in", n_series=3, images_per_series=5, rows=16, cols=16)
    root = tmp_path / "research"
    d = FolderDestination("research", {"path": str(root)})
    d.test_connection()
    seen = []
    result = d.send(study["files"], progress=seen.append)
    assert result.sent == 15 and result.failed == [] and result.complete
    assert seen == list(range(1, 16))

    for f in study["files"]:
        ds = dcmread(f, stop_before_pixels=True)
        target = root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == f.read_bytes()
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750
        assert stat.S_IMODE(target.parent.parent.stat().st_mode) == 0o750
    assert d.count_instances(study["study"]) == {s: 5 for s in study["series"]}
    assert d.count_instances("1.2.3.4") == {}

    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.dcm")}
    again = d.send(study["files"])
    assert again.sent == 15 and again.failed == []
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.dcm")}
    assert after == before  # identical files are left alone
    assert not [p for p in root.rglob(".*")]  # no temporary files left behind

    # a changed file with the same UIDs replaces the old one atomically
    changed = dcmread(study["files"][0])
    changed.SeriesDescription = "changed"
    changed.save_as(study["files"][0])
    assert d.send(study["files"][:1]).sent == 1
    target = root / changed.StudyInstanceUID / changed.SeriesInstanceUID / \
        f"{changed.SOPInstanceUID}.dcm"
    assert dcmread(target).SeriesDescription == "changed"
    assert d.count_instances(study["study"]) == {s: 5 for s in study["series"]}


def test_folder_refuses_invalid_uids(tmp_path):
    study = make_study(tmp_path / "in", n_series=1, images_per_series=2, rows=16, cols=16)
    bad = []
    for i, (field, value) in enumerate([("SOPInstanceUID", "../../../escaped"),
                                        ("StudyInstanceUID", "1.2/../../../escaped"),
                                        ("SeriesInstanceUID", "/tmp/escaped"),
                                        ("SOPInstanceUID", "1.02.3")]):
        ds = dcmread(study["files"][0])
        setattr(ds, field, value)
        path = tmp_path / "in" / f"bad{i}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path)
        bad.append(path)
    not_dicom = tmp_path / "in" / "notes.txt"
    not_dicom.write_text("not DICOM")

    root = tmp_path / "out" / "research"
    d = FolderDestination("research", {"path": str(root)})
    result = d.send([*bad, not_dicom, study["files"][1]])
    assert result.sent == 1
    assert len(result.failed) == 5
    reasons = " | ".join(r for _, r in result.failed)
    assert "not a valid UID" in reasons and "SOPInstanceUID" in reasons
    assert "StudyInstanceUID" in reasons and "SeriesInstanceUID" in reasons
    assert ("../../../escaped", result.failed[0][1]) == result.failed[0]
    # nothing anywhere but the one good file inside the folder
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 1 and written[0].is_relative_to(root)
    assert not list(tmp_path.rglob("escaped*"))
    with pytest.raises(ValueError):
        d.count_instances("../..")


def test_registry_and_open_destination(tmp_path):
    assert set(REGISTRY) == {"folder", "dicom", "sftp"}  # sftp: tests/test_sftp.py
    config = parse({"DATADIR": str(tmp_path / "data"), "DESTINATIONS": {
        "research": {"type": "folder", "path": str(tmp_path / "research")},
        "pacs": {"type": "dicom", "aetitle": "PACS", "host": "127.0.0.1", "port": 4242},
    }}, tmp_path / "config.json")
    folder = open_destination("research", config)
    assert isinstance(folder, FolderDestination) and folder.root == tmp_path / "research"
    pacs = open_destination("pacs", config)
    assert isinstance(pacs, DicomDestination)
    assert (pacs.query_aetitle, pacs.query_port, pacs.associations) == ("PACS", 4242, 4)
    with pytest.raises(DestinationError, match="unknown destination 'nope'.*pacs, research"):
        open_destination("nope", config)
    for bad in ({"aetitle": "", "host": "h", "port": 1}, {"aetitle": "A", "host": "h"},
                {"aetitle": "A", "host": "h", "port": 70000},
                {"aetitle": "A", "host": "h", "port": 1, "associations": 5},
                {"aetitle": "A" * 17, "host": "h", "port": 1}):
        with pytest.raises(DestinationError):
            DicomDestination("x", bad)
    with pytest.raises(DestinationError):
        FolderDestination("x", {"path": "relative/path"})


def test_presentation_contexts_stay_within_128():
    kinds = [dest._Item(Path(f"{i}.dcm"), f"1.2.3.{i // 2}", f"1.2.3.4.{i}", ts)
             for i in range(400)
             for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90")]
    keys = {k for item in kinds for k in dest._context_keys(item)}
    assert len(keys) > dest.MAX_CONTEXTS  # more than one association can offer
    few = {k for item in kinds[:40] for k in dest._context_keys(item)}
    assert len(dest._contexts(few)) == len(few) <= dest.MAX_CONTEXTS


# --- DICOM (Orthanc) --------------------------------------------------------------------------

def test_dicom_send_count_and_echo(orthanc, tmp_path):
    study = make_study(tmp_path / "in", n_series=3, images_per_series=10, rows=32, cols=32)
    extra = testdata(tmp_path)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 10)
    files = [*study["files"], *extra]
    d = pacs_destination(orthanc)
    d.test_connection()

    seen = []
    result = d.send([*files, junk], progress=seen.append)
    assert result.sent == len(files), result.failed
    assert [uid for uid, _ in result.failed] == [str(junk)]
    assert "not a DICOM Part-10 file" in result.failed[0][1]
    assert sorted(seen) == list(range(1, len(files) + 2))

    expected = expected_counts(files)
    assert expected[study["study"]] == {s: 10 for s in study["series"]}
    for study_uid, series in expected.items():
        assert d.count_instances(study_uid) == series
        assert orthanc.series_counts(study_uid) == series
    assert orthanc.count() == sum(sum(s.values()) for s in expected.values())
    assert d.count_instances("1.2.3.4.5") == {}

    # compressed files arrive in their own transfer syntax, unchanged (only instances sent
    # once: of several files sharing a SOPInstanceUID, whichever arrived last stays)
    headers = [dcmread(f, stop_before_pixels=True) for f in extra]
    uids = [ds.SOPInstanceUID for ds in headers]
    compressed = [ds for ds in headers if uids.count(ds.SOPInstanceUID) == 1
                  and ds.file_meta.TransferSyntaxUID.is_compressed]
    assert len(compressed) >= 3
    for ds in compressed:
        found = orthanc.post("/tools/lookup", str(ds.SOPInstanceUID).encode())
        meta = orthanc.get(f"/instances/{found[0]['ID']}/metadata?expand")
        assert meta["TransferSyntax"] == ds.file_meta.TransferSyntaxUID
    inst = next(i for i in orthanc.instances_of(study["study"]))
    assert orthanc.tags(inst["ID"])["PatientID"] == "PAT0001"
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.studies()].count(
        study["study"]) == 1


def test_dicom_one_and_two_associations_same_result(orthanc, tmp_path):
    for n in (1, 2):
        study = make_study(tmp_path / f"in{n}", n_series=2, images_per_series=15, rows=16,
                           cols=16, seed=n)
        d = pacs_destination(orthanc, associations=n)
        result = d.send(study["files"])
        assert (result.sent, result.failed) == (30, [])
        assert d.count_instances(study["study"]) == {s: 15 for s in study["series"]}


def test_dicom_unavailable_then_restart_without_duplicates(orthanc, tmp_path):
    study = make_study(tmp_path / "in", n_series=3, images_per_series=8, rows=16, cols=16)
    files = [*study["files"], *testdata(tmp_path, ["CT_small.dcm", "JPEG2000.dcm"])]
    d = pacs_destination(orthanc)
    assert d.send(files).sent == len(files)
    count, counts = orthanc.count(), d.count_instances(study["study"])

    orthanc.stop()
    started = time.monotonic()
    with pytest.raises(DestinationUnavailable, match="unreachable"):
        d.send(files)
    with pytest.raises(DestinationUnavailable):
        d.test_connection()
    with pytest.raises(DestinationUnavailable):
        d.count_instances(study["study"])
    assert time.monotonic() - started < 30

    orthanc.restart()
    result = d.send(files)
    assert (result.sent, result.failed) == (len(files), [])
    assert orthanc.count() == count  # OverwriteInstances: no duplicates
    assert d.count_instances(study["study"]) == counts == {s: 8 for s in study["series"]}


def test_dicom_peer_dies_mid_send_then_resend_completes(orthanc, tmp_path):
    study = make_study(tmp_path / "in", n_series=3, images_per_series=40, rows=64, cols=64)
    d = pacs_destination(orthanc)

    def crash(done: int) -> None:
        if done == 25 and orthanc.running:
            orthanc.proc.kill()  # a PACS crash in the middle of the study
    started = time.monotonic()
    with pytest.raises(DestinationUnavailable):
        d.send(study["files"], progress=crash)
    assert time.monotonic() - started < 30  # no waiting for the DIMSE timeout

    orthanc.start()  # same ports and storage
    result = d.send(study["files"])
    assert (result.sent, result.failed) == (120, [])
    assert d.count_instances(study["study"]) == {s: 40 for s in study["series"]}
    assert orthanc.count() == 120


def test_dicom_failure_status_is_reported_per_file(tmp_path):
    # Orthanc refuses a second patient with 0xA700 when the first one is protected
    with Orthanc(tmp_path, extra={"MaximumPatientCount": 1}) as pacs:
        first = make_study(tmp_path / "a", n_series=1, images_per_series=3, rows=16, cols=16)
        other = make_study(tmp_path / "b", n_series=1, images_per_series=2, rows=16, cols=16,
                           patient_id="PAT0002")
        d = pacs_destination(pacs, associations=1)
        assert d.send(first["files"]).sent == 3
        patient = pacs.get("/patients")[0]
        pacs.put(f"/patients/{patient}/protected", b"1")

        result = d.send([*other["files"], *first["files"]])
        assert result.sent == 3
        refused = {dcmread(f).SOPInstanceUID for f in other["files"]}
        assert {uid for uid, _ in result.failed} == refused
        assert all("status 0xA700" in reason and "Out of Resources" in reason
                   for _, reason in result.failed)
        assert pacs.count() == 3


@pytest.mark.parametrize("configured, limit", [(2, 1), (4, 2)])
def test_dicom_peer_taking_fewer_associations_gets_every_file_over_those(
        tmp_path, configured, limit):
    """A PACS that takes at most `limit` associations from FIONA rejects the others
    (transient, "local limit exceeded"): the send goes on over the ones it took, every file
    once, instead of failing as unreachable. pynetdicom is the peer; its first C-STORE waits
    until it has rejected an association, so the rejection happens mid-send."""
    rejected, stored = threading.Event(), []

    def on_store(event):
        if not stored:
            rejected.wait(30)
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE("PACS")
    ae.maximum_associations = limit
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_REJECTED, lambda event: rejected.set())])
    try:
        study = make_study(tmp_path / "in", n_series=2, images_per_series=15, rows=8, cols=8)
        d = DicomDestination("research", {"aetitle": "PACS", "host": "127.0.0.1",
                                          "port": server.socket.getsockname()[1],
                                          "associations": configured})
        # pynetdicom counts the association threads still alive, so two arriving together can
        # both be rejected, and a rejected one counts until its thread ends: the last worker
        # then retries with real (short) pauses, as it would with a real PACS.
        d.backoff_seconds, d.connect_attempts = 0.05, 8
        result = d.send(study["files"])
    finally:
        server.shutdown()
    assert rejected.is_set()
    assert (result.sent, result.failed) == (30, [])
    assert sorted(stored) == sorted(dcmread(f).SOPInstanceUID for f in study["files"])


def test_dicom_rejected_association_is_permanent(tmp_path):
    with Orthanc(tmp_path, extra={"DicomCheckCalledAet": True}) as pacs:
        d = DicomDestination("research", {"aetitle": "NOTORTHANC", "host": "127.0.0.1",
                                          "port": pacs.dicom_port})
        study = make_study(tmp_path / "in", n_series=1, images_per_series=1, rows=8, cols=8)
        for call in (d.test_connection, lambda: d.send(study["files"]),
                     lambda: d.count_instances(study["study"])):
            with pytest.raises(DestinationError, match="rejected the association") as err:
                call()
            assert not isinstance(err.value, DestinationUnavailable)


def test_dicom_decompresses_when_peer_refuses_the_syntax(tmp_path):
    with Orthanc(tmp_path, extra={"RleTransferSyntaxAccepted": False,
                                  "Jpeg2000TransferSyntaxAccepted": False}) as pacs:
        files = testdata(tmp_path, ["MR_small_RLE.dcm", "JPEG2000.dcm", "CT_small.dcm"])
        d = pacs_destination(pacs)
        result = d.send(files)
        assert (result.sent, result.failed) == (3, [])
        for f in files:
            ds = dcmread(f)
            found = pacs.post("/tools/lookup", str(ds.SOPInstanceUID).encode())
            meta = pacs.get(f"/instances/{found[0]['ID']}/metadata?expand")
            assert meta["TransferSyntax"] in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
            assert pacs.tags(found[0]["ID"])["SOPInstanceUID"] == ds.SOPInstanceUID
            stored = dcmread(BytesIO(pacs.get_bytes(f"/instances/{found[0]['ID']}/file")))
            assert (stored.pixel_array == ds.pixel_array).all()


def test_dicom_count_falls_back_to_image_level(orthanc, tmp_path, monkeypatch):
    study = make_study(tmp_path / "in", n_series=2, images_per_series=4, rows=8, cols=8)
    d = pacs_destination(orthanc)
    assert d.send(study["files"]).sent == 8
    real_find = DicomDestination._find

    def without_counts(self, assoc, query, model):
        found = real_find(self, assoc, query, model)
        for ident in found:
            if "NumberOfSeriesRelatedInstances" in ident:
                del ident.NumberOfSeriesRelatedInstances
        return found
    monkeypatch.setattr(DicomDestination, "_find", without_counts)
    assert d.count_instances(study["study"]) == {s: 4 for s in study["series"]}


def test_dicom_sets_tcp_nodelay(orthanc, monkeypatch):
    flags = []
    real = dicom_client.nodelay

    def spy(event):
        real(event)
        sock = event.assoc.dul.socket.socket
        flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    monkeypatch.setattr(dicom_client, "nodelay", spy)
    pacs_destination(orthanc).test_connection()
    assert flags and all(flags)


# --- settings checked once, back-off on the clock -----------------------------------------

def test_config_and_handler_check_settings_by_the_same_rules(tmp_path):
    """A bad value is caught when config.json is loaded, in the handler's own words: there is
    one rule per setting (the kind's settings class), not one in config.py and one here."""
    bad = {"type": "dicom", "aetitle": "PACS", "host": "127.0.0.1", "port": 4242,
           "associations": 5}
    with pytest.raises(ConfigError) as err:
        parse({"DATADIR": str(tmp_path / "data"), "DESTINATIONS": {"pacs": bad}},
              tmp_path / "config.json")
    with pytest.raises(DestinationError) as direct:
        DicomDestination("pacs", {k: v for k, v in bad.items() if k != "type"})
    assert "DESTINATIONS.pacs.associations must be a whole number from 1 to 4" in str(err.value)
    assert "DESTINATIONS.pacs.associations must be a whole number from 1 to 4" in \
        str(direct.value)
    with pytest.raises(ConfigError, match="DESTINATIONS.research.path must be absolute"):
        parse({"DATADIR": str(tmp_path / "data"), "DESTINATIONS": {
            "research": {"type": "folder", "path": "relative"}}}, tmp_path / "config.json")


def test_dicom_connection_back_off_runs_on_the_clock():
    """Three attempts at a port nobody listens on, 0.5 s then 1 s apart: on a FakeClock the
    pauses pass as time, nobody sleeps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                       # bound, not listening: refused
        d = DicomDestination("research", {"aetitle": "PACS", "host": "127.0.0.1", "port": port})
        d.clock = FakeClock()
        start = d.clock.monotonic()
        with pytest.raises(DestinationUnavailable, match="3 attempts"):
            d.test_connection()
    assert d.clock.monotonic() - start == 0.5 + 1.0
