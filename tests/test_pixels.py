"""Masking of burned-in text (SPEC §7 step 5) with the real tesseract (Debian `tesseract-ocr`).

Images are secondary captures with text rendered by Pillow; the OCR used to check the result is
the same function masking uses (`frame_words`). Nothing may be written to disk while masking
(SPEC §11 fault 14). Without tesseract every test fails naming the Debian package (`make test`
installs it).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomgen import roundtrip, secondary_capture, to_bytes
from fiona.deid.pixels import (
    MaskResult,
    PixelMaskingError,
    TesseractNotFound,
    frame_words,
    mask_burned_in_text,
    needs_masking,
)

SIZE = 512
TEXT = ("PATIENT DOE JOHN", "1980-01-01")
FONT = ImageFont.load_default(size=36)


def text_mask(size: int = SIZE, lines=TEXT, origin=(24, 30)) -> np.ndarray:
    """Boolean image: True where the text's pixels are."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    x, y = origin
    for i, line in enumerate(lines):
        draw.text((x, y + 50 * i), line, fill=255, font=FONT)
    return np.asarray(img) > 127


def anatomy(size: int = SIZE) -> np.ndarray:
    """A smooth 'body' in [0, 1] below the text, so masking must not touch it."""
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size * 0.62, xx - size * 0.5) / (size * 0.3)
    return np.clip(1.0 - r, 0, 1)


def mono8() -> Dataset:
    arr = (20 + 100 * anatomy()).astype(np.uint8)
    arr[text_mask()] = 255
    return secondary_capture(arr, "MONOCHROME2", 8)


def mono1_8() -> Dataset:  # MONOCHROME1: low values are white, so the text is stored low
    arr = (235 - 100 * anatomy()).astype(np.uint8)
    arr[text_mask()] = 0
    return secondary_capture(arr, "MONOCHROME1", 8)


def rgb8() -> Dataset:
    a = anatomy()
    arr = np.stack([30 + 150 * a, 20 + 60 * a, 40 + 40 * a], axis=-1).astype(np.uint8)
    arr[text_mask()] = (255, 255, 0)
    return secondary_capture(arr, "RGB", 8)


def mono16() -> Dataset:  # 12 bits stored; the text is far brighter than 8 bits could hold
    arr = (200 + 1500 * anatomy()).astype(np.uint16)
    arr[text_mask()] = 4000
    return secondary_capture(arr, "MONOCHROME2", 12)


def signed16() -> Dataset:  # CT-like: negative background
    arr = (-1000 + 1400 * anatomy()).astype(np.int16)
    arr[text_mask()] = 3000
    return secondary_capture(arr, "MONOCHROME2", 16, signed=True)


def multiframe() -> Dataset:
    frames = np.zeros((3, SIZE, SIZE), np.uint8)
    frames[:] = (20 + 100 * anatomy()).astype(np.uint8)
    frames[0][text_mask()] = 255
    # frame 1: no text at all; frame 2: other text in another place
    frames[2][text_mask(lines=("MRN 12345678",), origin=(60, 420))] = 255
    return secondary_capture(frames, "MONOCHROME2", 8)


IMAGES = {"mono8": mono8, "mono1": mono1_8, "rgb8": rgb8, "mono16": mono16,
          "signed16": signed16, "multiframe": multiframe}


def decoded(ds: Dataset) -> tuple[np.ndarray, str]:
    """Frames as (n, rows, cols[, 3]) and the photometric interpretation after decoding."""
    arr, info = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, as_rgb=True)
    samples = int(info["samples_per_pixel"])
    arr = arr.reshape(-1, ds.Rows, ds.Columns, samples)
    return (arr if samples > 1 else arr[..., 0]), str(info["photometric_interpretation"])


def all_words(ds: Dataset) -> list[list[str]]:
    frames, photometric = decoded(ds)
    return [[w.text for w in frame_words(f, photometric, ds)] for f in frames]


def assert_native(ds: Dataset) -> None:
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not ds["PixelData"].is_undefined_length
    assert "ExtendedOffsetTable" not in ds
    assert ds.BurnedInAnnotation == "NO"
    expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * int(ds.get("NumberOfFrames", 1) or 1) \
        * ds.BitsAllocated // 8
    assert len(ds.PixelData) == expected + expected % 2


@pytest.mark.parametrize("kind", list(IMAGES))
def test_text_is_found_then_masked(kind):
    ds = IMAGES[kind]()
    uid = ds.SOPInstanceUID
    before_arr = ds.pixel_array.copy()
    before = " ".join(" ".join(f) for f in all_words(ds))
    assert "PATIENT" in before and "DOE" in before and "1980-01-01" in before, before

    result = mask_burned_in_text(ds)

    assert isinstance(result, MaskResult)
    assert result.frames == (3 if kind == "multiframe" else 1)
    assert result.words >= 4 and len(result.boxes) == result.words
    assert_native(ds)
    assert ds.SOPInstanceUID == uid
    after_ds = roundtrip(ds)
    assert [w for f in all_words(after_ds) for w in f] == []
    after_arr = after_ds.pixel_array
    assert after_arr.dtype == before_arr.dtype and after_arr.shape == before_arr.shape

    # every text pixel is covered by a box; everything outside the boxes is untouched
    covered = np.zeros(before_arr.shape[-2:] if kind != "rgb8" else before_arr.shape[:2], bool)
    for x0, y0, x1, y1 in result.boxes:
        covered[y0:y1, x0:x1] = True
    assert covered[text_mask()].all()
    first = after_arr[0] if kind == "multiframe" else after_arr
    orig = before_arr[0] if kind == "multiframe" else before_arr
    assert np.array_equal(first[~covered], orig[~covered])
    # the text became the image's black, in the original value range
    black = {"mono1": orig.max(), "rgb8": None}.get(kind, orig.min())
    if kind == "rgb8":
        assert (first[text_mask()] == orig.reshape(-1, 3).min(axis=0)).all()
    else:
        assert (first[text_mask()] == black).all()
    if kind == "multiframe":
        assert np.array_equal(after_arr[1], before_arr[1])  # the frame without text
        assert "MRN" in " ".join(all_words(IMAGES[kind]())[2])


def test_rle_compressed_input_is_decoded_and_masked():
    ds = mono16()
    ds.compress(RLELossless, generate_instance_uid=False)
    assert ds.file_meta.TransferSyntaxUID == RLELossless and ds["PixelData"].is_undefined_length
    assert "DOE" in all_words(ds)[0]

    result = mask_burned_in_text(ds)

    assert result.words >= 4
    assert_native(ds)
    assert all_words(roundtrip(ds)) == [[]]


def test_jpeg_ybr_full_422_is_decoded_to_rgb_and_masked():
    """Lossy JPEG baseline, YCbCr 4:2:2, as a modality's screen capture would come."""
    rgb = rgb8().pixel_array
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling="4:2:2")
    ds = secondary_capture(rgb, "YBR_FULL_422", 8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    assert "DOE" in all_words(ds)[0]

    result = mask_burned_in_text(ds)

    assert result.words >= 4
    assert_native(ds)
    assert ds.PhotometricInterpretation == "RGB" and ds.PlanarConfiguration == 0
    assert all_words(roundtrip(ds)) == [[]]


def test_pydicom_jpeg2000_text_image_is_masked():
    """pydicom's own J2K file with the words red, green, blue (YBR_RCT)."""
    ds = pydicom.dcmread(get_testdata_file("GDCMJ2K_TextGBR.dcm"))
    assert {"red", "green", "blue"} <= set(all_words(ds)[0])

    result = mask_burned_in_text(ds)

    assert result.words >= 3
    assert_native(ds)
    assert ds.PhotometricInterpretation == "RGB"
    assert all_words(roundtrip(ds)) == [[]]


def test_pydicom_multiframe_jpeg_ultrasound_is_decoded_and_written_native():
    """30 frames of YBR_FULL_422 JPEG (an echo with small burned-in text)."""
    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    uid = ds.SOPInstanceUID

    result = mask_burned_in_text(ds)

    assert result.frames == 30
    assert_native(ds)
    assert ds.PhotometricInterpretation == "RGB" and ds.NumberOfFrames == 30
    assert ds.SOPInstanceUID == uid
    assert roundtrip(ds).pixel_array.shape == (30, 240, 320, 3)


@pytest.mark.parametrize("name", [
    "examples_palette.dcm",            # PALETTE COLOR
    "liver_1frame.dcm",                # 1-bit
    "MR_small_implicit.dcm",           # Implicit VR Little Endian, signed 16-bit
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "J2K_pixelrep_mismatch.dcm",       # 13 bits stored, signed
    "SC_rgb_rle_2frame.dcm",           # colour, 2 frames, RLE
    "SC_ybr_full_422_uncompressed.dcm",
])
def test_pydicom_files_keep_every_pixel_outside_the_boxes(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    before, photometric = decoded(ds)

    result = mask_burned_in_text(ds)

    assert_native(ds)
    after_ds = roundtrip(ds)
    after, after_photometric = decoded(after_ds)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert after_photometric == photometric
    keep = np.ones(after.shape[1:3], bool)
    for x0, y0, x1, y1 in result.boxes:  # boxes of all frames, so this is conservative
        keep[y0:y1, x0:x1] = False
    assert np.array_equal(after[:, keep], before[:, keep])
    assert result.frames == before.shape[0]


def test_big_endian_is_refused_and_left_unchanged():
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    before = ds.PixelData
    with pytest.raises(PixelMaskingError, match="Big Endian"):
        mask_burned_in_text(ds)
    assert ds.PixelData == before and "BurnedInAnnotation" not in ds


def test_no_file_is_written_while_masking(tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches its directory
    assert tempfile.gettempdir() == str(tmpdir)
    ds = rgb8()
    result = mask_burned_in_text(ds)
    assert result.words >= 4
    assert list(tmpdir.iterdir()) == []


def test_no_file_is_opened_for_writing_anywhere(tmp_path):
    """Stronger than TMPDIR: trace every open of the masking process and of tesseract (which
    could write to a fixed /tmp)."""
    script = textwrap.dedent("""
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        from test_pixels import mono8
        from fiona.deid.pixels import mask_burned_in_text
        ds = mono8()
        print(mask_burned_in_text(ds).words)
    """)
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: `make test` installs the Debian package strace")
    log = tmp_path / "trace.log"
    tests_dir = os.path.dirname(__file__)
    root = os.path.dirname(tests_dir)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=open,openat,creat",
                          sys.executable, "-c", script, tests_dir, root],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) >= 4
    writes = [line for line in log.read_text().splitlines()
              if ("O_WRONLY" in line or "O_RDWR" in line or "creat(" in line)
              and "= -1" not in line and "/dev/" not in line]
    assert writes == []


def test_missing_tesseract_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("FIONA_TESSERACT", raising=False)
    ds = mono8()
    before = ds.PixelData
    with pytest.raises(TesseractNotFound, match="tesseract-ocr"):
        mask_burned_in_text(ds)
    assert ds.PixelData == before and ds.BurnedInAnnotation == "YES"


def test_missing_language_names_its_package_and_leaves_the_dataset():
    ds = rgb8()
    ds.compress(RLELossless, generate_instance_uid=False)
    before = ds.PixelData
    with pytest.raises(PixelMaskingError, match="tesseract-ocr-xyz"):
        mask_burned_in_text(ds, lang="xyz")
    assert ds.PixelData == before and ds.file_meta.TransferSyntaxUID == RLELossless
    with pytest.raises(ValueError):
        mask_burned_in_text(ds, lang="-l eng")


def test_implicit_vr_input_is_written_explicit():
    ds = mono8()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    mask_burned_in_text(ds)
    assert_native(ds)
    assert all_words(roundtrip(ds)) == [[]]


# --------------------------------------------------------------------------------------------
# Which series are masked
# --------------------------------------------------------------------------------------------

def _header() -> Dataset:
    ds = Dataset()
    ds.SeriesDescription = "Dose Report"
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    return ds


@pytest.mark.parametrize("labels, features, exclusions, expected", [
    (["CHECKBURNEDINFO"], set(), [], True),
    (["T1", "CHECKBURNEDINFO"], {0, 2}, [], True),
    (["checkburnedinfo"], set(), [], True),
    ([], set(), [], False),
    (["T1"], set(), [], False),
    (["CHECKBURNEDINFO"], {1}, [], False),                                  # project opts out
    (["CHECKBURNEDINFO"], {0, 1, 2}, [], False),
    (["CHECKBURNEDINFO"], set(), [("SeriesDescription", "^Dose")], False),  # keyword
    (["CHECKBURNEDINFO"], set(), [("0008,103E", "Report$")], False),        # gggg,eeee
    (["CHECKBURNEDINFO"], set(), [("(0008,0008)", r"SCREEN SAVE")], False),  # multi-valued
    (["CHECKBURNEDINFO"], set(), [("00080070", "(?i)ge medical")], False),
    (["CHECKBURNEDINFO"], set(), [("SeriesDescription", "^dose")], True),    # case matters
    (["CHECKBURNEDINFO"], set(), [("ProtocolName", ".*")], True),            # absent tag
    (["CHECKBURNEDINFO"], set(), [("Manufacturer", "SIEMENS"),
                                  ("SeriesDescription", "Dose")], False),   # any one matches
    (["T1"], set(), [("SeriesDescription", "Dose")], False),
])
def test_needs_masking(labels, features, exclusions, expected):
    assert needs_masking(labels, features, exclusions, _header()) is expected


def test_needs_masking_rejects_bad_exclusions():
    with pytest.raises(ValueError, match="unknown tag"):
        needs_masking(["CHECKBURNEDINFO"], set(), [("NoSuchKeyword", "x")], _header())
    with pytest.raises(ValueError, match="invalid exclusion regex"):
        needs_masking(["CHECKBURNEDINFO"], set(), [("SeriesDescription", "(")], _header())
