"""Tests for fiona.index.csa against real Siemens files and damaged copies of them.

pydicom's bundled test files carry no Siemens CSA header, so the Siemens data are nibabel's own
test DICOMs (installed with nibabel in nibabel/nicom/tests/data): two VB17 diffusion mosaics
(b=0 and b=1000) and a VB17 fMRI mosaic whose CSA series header was removed by anonymisation.
VB17 protocols have neither lSequenceID nor sWipMemBlock.tFree, so MeasID and siemensUUID are
checked on a VE11-style protocol written into a copy of the b=1000 file.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import nibabel.nicom
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fiona.index.csa import siemens_diffusion_entry, siemens_series_fields

NIBABEL_DATA = Path(nibabel.nicom.__file__).parent / "tests" / "data"

B1000_SOP = "1.3.12.2.1107.5.2.32.35119.2010011420300822323499745"
B0_SOP = "1.3.12.2.1107.5.2.32.35119.2010011420300180088599504"


def _read(path: str | Path) -> pydicom.Dataset:
    """Read a (possibly gzipped) DICOM file the way the indexer reads files."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    return pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)


def _nibabel_dicom(name: str) -> pydicom.Dataset:
    """Read one of nibabel's test DICOMs."""
    return _read(NIBABEL_DATA / name)


def _csa_element(ds: pydicom.Dataset, kind: str) -> pydicom.DataElement:
    """The private element holding the CSA 'image' (xx10) or 'series' (xx20) header."""
    offset = {"image": 0x10, "series": 0x20}[kind]
    return ds.private_block(0x0029, "SIEMENS CSA HEADER")[offset]


def _csa2(tags: dict[str, tuple[str, list[str]]], terminate: bool = True) -> bytes:
    """Encode a CSA2 ("SV10") header from {name: (vr, [values])}, the layout scanners write.

    terminate=False leaves out the NUL after each string, which some writers do.
    """
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77)
        for value in values:
            data = value.encode("latin-1") + (b"\x00" if terminate else b"")
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data + b"\x00" * (-len(data) % 4)
    return out


VE11_PHOENIX = "\n".join(
    [
        "### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData version=51130001 ###",
        "ulVersion\t = \t51130001",
        'tSequenceFileName\t = \t""%SiemensSeq%\\ep2d_diff""',
        'sProtConsistencyInfo.tBaselineString\t = \t""N4_VE11A_LATEST_20140101""',
        'sProtConsistencyInfo.tMeasuredBaselineString\t = \t""N4_VE11C_LATEST_20160120""',
        "sGroupArray.asGroup[0].nSize\t = \t60",
        "sSliceArray.lSize\t = \t120",
        'sWipMemBlock.tFree\t = \t""8a1f6c2e-4b7d-4e0f-9c3a-2d5e6f708192""',
        "lProtID\t = \t-434",
        "lSequenceID\t = \t7",
        "### ASCCONV END ###",
    ]
)


def test_dwi_b1000_series_fields() -> None:
    fields = siemens_series_fields(_nibabel_dicom("siemens_dwi_1000.dcm.gz"))

    # VB17: only tBaselineString ("N4_VB17A_LATEST_20090307"); no lSequenceID, no tFree.
    assert fields == {"NumSlices": 48, "OSLevel": "VB17A", "PhaseEncodingDirectionPositive": 1}


def test_dwi_b1000_diffusion_entry() -> None:
    entry = siemens_diffusion_entry(_nibabel_dicom("siemens_dwi_1000.dcm.gz"))

    assert entry is not None
    assert entry["B_value"] == 1000
    assert entry["DiffusionDirectionality"] == "DIRECTIONAL"
    assert entry["DiffusionGradientDirection"] == \
        pytest.approx([0.99997449, 0.00505012, -0.00505012])
    assert entry["SOPInstanceUID"] == B1000_SOP
    assert entry["InstanceNumber"] == 2


def test_dwi_b0_has_no_gradient_direction() -> None:
    entry = siemens_diffusion_entry(_nibabel_dicom("siemens_dwi_0.dcm.gz"))

    assert entry == {
        "B_value": 0,
        "DiffusionDirectionality": "DIRECTIONAL",
        "DiffusionGradientDirection": None,
        "SOPInstanceUID": B0_SOP,
        "InstanceNumber": 1,
    }


def test_values_are_plain_json_types() -> None:
    ds = _nibabel_dicom("siemens_dwi_1000.dcm.gz")
    record = {**siemens_series_fields(ds),
              "siemensDiffusionInformation": [siemens_diffusion_entry(ds)]}

    assert json.loads(json.dumps(record)) == record
    entry = record["siemensDiffusionInformation"][0]
    assert type(entry["InstanceNumber"]) is int  # not pydicom's IS
    assert type(entry["SOPInstanceUID"]) is str  # not pydicom's UID


def test_unterminated_csa_strings_come_back_as_str() -> None:
    ds = _nibabel_dicom("siemens_dwi_1000.dcm.gz")
    image = {"B_value": ("IS", ["700"]), "DiffusionDirectionality": ("CS", ["DIRECTIONAL"])}
    _csa_element(ds, "image").value = _csa2(image, terminate=False)

    entry = siemens_diffusion_entry(ds)

    assert entry is not None
    assert entry["DiffusionDirectionality"] == "DIRECTIONAL"
    assert entry["B_value"] == 700
    assert entry["DiffusionGradientDirection"] is None


def test_mosaic_without_series_header_counts_slices_from_image_header() -> None:
    ds = _nibabel_dicom("csa_slice_norm.dcm")  # fMRI mosaic, CSA series header removed

    assert siemens_series_fields(ds) == {"NumSlices": 32, "PhaseEncodingDirectionPositive": 1}
    assert siemens_diffusion_entry(ds) is None


def test_ve11_protocol_gives_uuid_measid_and_measured_baseline() -> None:
    ds = _nibabel_dicom("siemens_dwi_1000.dcm.gz")
    _csa_element(ds, "series").value = _csa2({"MrPhoenixProtocol": ("UN", [VE11_PHOENIX])})

    assert siemens_series_fields(ds) == {
        "siemensUUID": "8a1f6c2e-4b7d-4e0f-9c3a-2d5e6f708192",
        "NumSlices": 60,
        "MeasID": 7,
        "OSLevel": "VE11C",
        "PhaseEncodingDirectionPositive": 1,
    }


@pytest.mark.parametrize(
    "path",
    [
        get_testdata_file("MR_small.dcm"),  # Toshiba MR
        get_testdata_file("CT_small.dcm"),  # GE CT
        NIBABEL_DATA / "philips_mprage.dcm.gz",
    ],
    ids=["toshiba-mr", "ge-ct", "philips-mr"],
)
def test_non_siemens_gives_nothing(path: str | Path) -> None:
    ds = _read(path)

    assert siemens_series_fields(ds) == {}
    assert siemens_diffusion_entry(ds) is None


def test_truncated_image_header_keeps_series_header_fields() -> None:
    ds = _nibabel_dicom("siemens_dwi_1000.dcm.gz")
    image = _csa_element(ds, "image")
    image.value = image.value[: len(image.value) // 2]

    assert siemens_series_fields(ds) == {"NumSlices": 48, "OSLevel": "VB17A"}
    assert siemens_diffusion_entry(ds) is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"garbage!",
        b"SV10\x04\x03\x02\x01" + struct.pack("<2I", 5000, 77),  # absurd tag count
        _csa2({"B_value": ("IS", ["1000"])})[:-7],  # item runs past the end
        _csa2({"B_value": ("IS", ["not a number"])}),
        bytes(range(256)) * 4,
    ],
    ids=["empty", "text", "tag-count", "cut-item", "bad-int", "noise"],
)
def test_garbage_csa_headers_do_not_raise(garbage: bytes) -> None:
    ds = _nibabel_dicom("siemens_dwi_1000.dcm.gz")
    _csa_element(ds, "image").value = garbage
    _csa_element(ds, "series").value = garbage

    assert siemens_series_fields(ds) == {}
    assert siemens_diffusion_entry(ds) is None


def test_missing_csa_value_does_not_raise() -> None:
    ds = _nibabel_dicom("siemens_dwi_1000.dcm.gz")
    _csa_element(ds, "image").value = None
    del ds[_csa_element(ds, "series").tag]

    assert siemens_series_fields(ds) == {}
    assert siemens_diffusion_entry(ds) is None
