"""The receiver and the indexer together, driven by DCMTK's storescu/echoscu as real clients."""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomgen import make_study
from helpers import Gateway, dcmtk, raw_c_store, wait_for

# pydicom's compressed samples: JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE, deflated,
# big endian
COMPRESSED = ["SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_gdcm.dcm",
              "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "examples_jpeg2k.dcm",
              "SC_rgb_rle_16bit.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm"]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path, f"pydicom test file {name} is missing"
    return Path(path)


def test_echo(gateway: Gateway):
    gateway.start("storescp")
    res = subprocess.run([dcmtk("echoscu"), "-aec", "ANYTHING", "127.0.0.1", str(gateway.port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_multiseries_study_and_compressed_files(gateway: Gateway, tmp_path: Path):
    study = make_study(tmp_path / "study", n_series=3, images_per_series=70)
    extra = tmp_path / "compressed"
    extra.mkdir()
    for name in COMPRESSED:
        # several pydicom samples share one SOPInstanceUID (a UID conflict, tested below);
        # give each its own, leaving the encoded pixel data as it is
        ds = pydicom.dcmread(_testdata(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(extra / name)
    gateway.start("storescp")
    gateway.start("process-single-file")
    res = gateway.storescu(tmp_path / "study")
    assert res.returncode == 0, res.stderr
    # DCMTK's dcmsend proposes each file's own transfer syntax, as a modality sending
    # compressed data does (storescu would decompress or fail)
    res = subprocess.run([dcmtk("dcmsend"), "+sd", "-aec", "FIONA", "127.0.0.1",
                          str(gateway.port), str(extra)], capture_output=True, text=True,
                         env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr

    # every instance durably in archive/ under its study, as MOD.SOPInstanceUID
    for path in study["files"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = gateway.tree.archive / f"scp_{study['study']}" / f"MR.{ds.SOPInstanceUID}"
        assert stored.exists(), stored
    for series in study["series"]:
        data = gateway.wait_indexed(study["study"], series, 70)
        assert len(list(gateway.tree.series_dir(study["study"], series).iterdir())) == 70
        assert data["IncomingConnection"] == {"AETitleCaller": "STORESCU",
                                              "AETitleCalled": "FIONA", "CallerIP": "127.0.0.1"}
        assert data["PatientID"] == "PAT0001" and data["AccessionNumber"] == "ACC0001"
        assert data["Manufacturer"] == "SIEMENS" and data["Modality"] == "MR"
        assert data["SliceLocation"] == -9.0  # the minimum over the series
        assert "SIEMENS" in data["ClassifyType"] and "original" in data["ClassifyType"]
    first = gateway.series_json(study["study"], study["series"][0])
    assert "sagittal" in first["ClassifyType"] and "T1" in first["ClassifyType"]

    # compressed objects are stored byte for byte as received (no decoding, same syntax)
    for name in COMPRESSED:
        src = pydicom.dcmread(extra / name)
        stored = [p for p in gateway.archive_files() if p.name.endswith("." + src.SOPInstanceUID)]
        assert stored, f"{name} not stored"
        got = pydicom.dcmread(stored[0])
        if src.file_meta.TransferSyntaxUID.is_encapsulated:
            assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID, name
        assert got.PixelData == src.PixelData, name
        wait_for(lambda ds=src: gateway.series_json(ds.StudyInstanceUID, ds.SeriesInstanceUID),
                 60, f"series JSON of {name}")

    # participants/ and the arrival touch files
    link = gateway.tree.participants / "PAT0001" / "20260314_101500"
    assert link.resolve() == (gateway.tree.raw / study["study"]).resolve()
    arrived = sorted(p.name for p in gateway.tree.arrived.iterdir())
    assert f"STORESCU FIONA 127.0.0.1 scp_{study['study']}" in arrived
    assert f"STORESCU FIONA 127.0.0.1 {study['study']} {study['series'][1]}" in arrived

    # one log line per association with peer, AE titles, counts and bytes
    log = (gateway.tree.logs / "storescpd.log").read_text()
    line = next(ln for ln in log.splitlines() if "association STORESCU -> FIONA" in ln)
    assert "210 stored, 0 failed" in line and "127.0.0.1" in line
    assert f"DCMSEND -> FIONA from 127.0.0.1: {len(COMPRESSED)} stored" in log


def test_modes_of_files_and_folders(gateway: Gateway, tmp_path: Path):
    make_study(tmp_path / "s", n_series=1, images_per_series=3)
    gateway.start("storescp")
    gateway.start("process-single-file")
    assert gateway.storescu(tmp_path / "s").returncode == 0
    wait_for(lambda: list(gateway.tree.raw.glob("*/*.json")), 60, "series JSON")
    for root, dirs, files in os.walk(gateway.datadir / "site"):
        for d in dirs:
            mode = os.stat(os.path.join(root, d)).st_mode & 0o777
            assert mode & 0o007 == 0, f"{d} is accessible to others ({mode:o})"
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode & 0o777
            assert mode & 0o007 == 0, f"{p} is readable by others ({mode:o})"


def test_siemens_csa_fields_reach_the_series_json(gateway: Gateway, tmp_path: Path):
    import nibabel

    src = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "siemens_dwi_1000.dcm.gz"
    dwi = tmp_path / "dwi.dcm"
    dwi.write_bytes(gzip.decompress(src.read_bytes()))
    ds = pydicom.dcmread(dwi, stop_before_pixels=True)
    gateway.start("storescp")
    gateway.start("process-single-file")
    assert gateway.storescu(dwi).returncode == 0
    data = gateway.wait_indexed(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1)
    assert data["NumSlices"] == 48 and data["OSLevel"] == "VB17A"
    assert data["PhaseEncodingDirectionPositive"] == 1
    [entry] = data["siemensDiffusionInformation"]
    assert entry["B_value"] == 1000 and entry["SOPInstanceUID"] == ds.SOPInstanceUID
    assert "SIEMENS" in data["ClassifyType"]


def test_duplicates_identical_and_conflicting(gateway: Gateway, tmp_path: Path):
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2)
    gateway.start("storescp")
    assert gateway.storescu(tmp_path / "s").returncode == 0
    before = {p: p.read_bytes() for p in gateway.archive_files()}
    # the same bytes again: a no-op
    assert gateway.storescu(tmp_path / "s").returncode == 0
    assert {p: p.read_bytes() for p in gateway.archive_files()} == before
    assert gateway.quarantined() == []
    # same SOPInstanceUID, other content: kept beside, never over the first
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(study["files"][0])
    ds.SeriesDescription = "changed on the scanner"
    ds.save_as(changed)
    assert gateway.storescu(changed).returncode == 0
    assert {p: p.read_bytes() for p in gateway.archive_files()} == before
    [held] = gateway.quarantined()
    assert held["reason"].startswith("UID conflict")
    folder = next((gateway.tree.quarantine / "receive").iterdir())
    kept = pydicom.dcmread(folder / f"MR.{ds.SOPInstanceUID}")
    assert kept.SeriesDescription == "changed on the scanner"


def _hostile(tmp_path: Path) -> dict[str, Path]:
    src = pydicom.dcmread(_testdata("MR_small.dcm"))
    tmp_path.mkdir()
    out = {}
    for name, keyword, value in [
        ("study_traversal", "StudyInstanceUID", "../../etc"),
        ("study_letters", "StudyInstanceUID", "1.2.abc"),
        ("study_65_chars", "StudyInstanceUID", "1." + "2" * 63),
        ("study_empty", "StudyInstanceUID", ""),
        ("series_traversal", "SeriesInstanceUID", "1.2/../../x"),
        ("sop_slash", "SOPInstanceUID", "1.2/3"),
    ]:
        ds = copy.deepcopy(src)
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        out[name] = tmp_path / f"{name}.dcm"
        ds.save_as(out[name])
    ds = copy.deepcopy(src)
    del ds.StudyInstanceUID
    out["no_study"] = tmp_path / "no_study.dcm"
    ds.save_as(out["no_study"])
    return out


def test_hostile_input_is_refused_and_quarantined(gateway: Gateway, tmp_path: Path):
    files = _hostile(tmp_path / "bad")
    gateway.start("storescp")
    gateway.start("process-single-file")
    for name, path in files.items():
        res = gateway.storescu(path)
        assert "Received Store Response (Error" in res.stderr + res.stdout, name
    # a payload cut off in the middle of its pixel data, and bytes that are not DICOM at all
    raw = _testdata("MR_small.dcm").read_bytes()
    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    dataset = raw[meta_end:]
    truncated = raw_c_store(gateway.port, dataset[:len(dataset) // 2], ds.SOPClassUID,
                            ds.SOPInstanceUID)
    garbage = raw_c_store(gateway.port, b"this is not DICOM, only text " * 40, ds.SOPClassUID,
                          "1.2.3.4.5")
    assert truncated >= 0xA000 and garbage >= 0xA000, (hex(truncated), hex(garbage))

    # the receiver keeps serving
    assert gateway.storescu(_testdata("CT_small.dcm")).returncode == 0
    held = gateway.quarantined()
    assert len(held) == len(files) + 2
    reasons = " | ".join(h["reason"] for h in held)
    for fragment in ("'../../etc' is not a valid UID", "'1.2.abc' is not a valid UID",
                     "65 characters long", "StudyInstanceUID is missing", "'1.2/3'",
                     "SeriesInstanceUID '1.2/../../x'", "truncated"):
        assert fragment in reasons, fragment
    assert all(h["calling_ae"] and h["advice"] for h in held)
    # nothing of these reached archive/ or raw/, and nothing left the data folder
    assert [p.name for p in gateway.archive_files()] == [
        f"CT.{pydicom.dcmread(_testdata('CT_small.dcm')).SOPInstanceUID}"]
    assert not (tmp_path / "etc").exists() and not Path(gateway.datadir.parent, "x").exists()


def test_disk_above_watermark_answers_out_of_resources(make_gateway, tmp_path: Path):
    gw = make_gateway(DISK={"refuse_store_percent": 1, "cleanup_percent": 0.5})
    gw.start("storescp")
    res = gw.storescu(_testdata("CT_small.dcm"))
    out = res.stderr + res.stdout
    assert "OutOfResources" in out or "a700" in out.lower()
    assert gw.archive_files() == []
    assert "DISK.refuse_store_percent" in (gw.tree.logs / "storescpd.log").read_text()
    # and it keeps running: an echo still works
    echo = subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(gw.port)], capture_output=True)
    assert echo.returncode == 0


def test_disabled_receiver_refuses_associations(gateway: Gateway):
    gateway.start("storescp")
    (gateway.tree.config / "enabled").write_text("011\n")
    def refused():
        r = subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(gateway.port)],
                           capture_output=True, text=True)
        return r.returncode != 0
    wait_for(refused, 10, "the receiver to refuse associations")
    (gateway.tree.config / "enabled").write_text("111\n")
    wait_for(lambda: not refused(), 10, "the receiver to accept again")


def test_concurrent_associations(gateway: Gateway, tmp_path: Path):
    studies = [make_study(tmp_path / f"s{i}", n_series=1, images_per_series=100,
                          patient_id=f"P{i}", seed=i) for i in range(8)]
    gateway.start("storescp")
    gateway.start("process-single-file")
    procs = [subprocess.Popen([dcmtk("storescu"), "+sd", "-aec", "FIONA", "127.0.0.1",
                               str(gateway.port), str(tmp_path / f"s{i}")],
                              env={**os.environ, "TCP_NODELAY": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(8)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert len(gateway.archive_files()) == 800
    for s in studies:
        gateway.wait_indexed(s["study"], s["series"][0], 100)


def test_classify_test_command_explains_labels(gateway: Gateway):
    res = gateway.run("classify", "--test", str(_testdata("CT_small.dcm")))
    assert "GE" in res.stdout.splitlines()[1]
    assert "Manufacturer" in res.stdout  # the clause that decided it


def test_journal_lines_name_the_archived_files(gateway: Gateway, tmp_path: Path):
    make_study(tmp_path / "s", n_series=1, images_per_series=3)
    gateway.start("storescp")
    assert gateway.storescu(tmp_path / "s").returncode == 0
    lines = "".join(p.read_text() for p in gateway.tree.journal.glob("received.*.log"))
    entries = [ln.split(",") for ln in lines.splitlines()]
    assert len(entries) == 3
    for caller, called, ip, folder, name in entries:
        assert (caller, called, ip) == ("STORESCU", "FIONA", "127.0.0.1")
        assert (Path(folder) / name).is_file()
    config = json.loads((gateway.tree.config / "config.json").read_text())
    assert config["DICOMPORT"] == gateway.port
