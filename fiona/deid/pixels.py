"""Burned-in text: find words in the pixel data with OCR (tesseract) and overwrite them.

SPEC §7 step 5. Series labelled ``CHECKBURNEDINFO`` go through :func:`mask_burned_in_text`
unless the project opts out (feature 1, "never pixel-mask") or an exclusion regex matches
(:func:`needs_masking`).

No unredacted image ever leaves memory (SPEC §11 fault 14: the old system's masking wrote a copy
of each image to ``/tmp``). pytesseract is *not* used for OCR because it writes every image to a
temporary PNG file; instead each frame is encoded as PNG in memory and piped to the ``tesseract``
binary (``tesseract stdin stdout ... tsv``, no shell), whose TSV output is parsed here.

The dataset is changed only after every frame has been decoded, OCR'd and masked, so an error
leaves it exactly as it was.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import VR

CHECK_LABEL = "CHECKBURNEDINFO"
FEATURE_NEVER_MASK = 1
TESSERACT_PACKAGE = "tesseract-ocr"
MARGIN = 2
DEFAULT_PSM = 11  # "sparse text": find as much text as possible, in no particular order
_LANG = re.compile(r"^[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*$")
_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
# Elements that describe an encapsulated (compressed) Pixel Data and are wrong once it is native.
_ENCAPSULATION_ELEMENTS = (0x7FE00001, 0x7FE00002)  # Extended Offset Table (+ Lengths)


class PixelMaskingError(RuntimeError):
    """The pixel data cannot be OCR'd or masked; the dataset is left unchanged."""


class TesseractNotFound(PixelMaskingError):
    """The tesseract binary (Debian package ``tesseract-ocr``) is not installed."""


@dataclass
class Word:
    """One word found by tesseract, in the coordinates of the OCR'd image."""

    text: str
    conf: float
    left: int
    top: int
    width: int
    height: int


@dataclass
class MaskResult:
    """``words``: words overwritten (all frames); ``boxes``: the filled rectangles as
    ``(x0, y0, x1, y1)`` pixel bounds, end-exclusive, margin included, clipped to the image, in
    frame order; ``frames``: frames OCR'd (= all frames of the image)."""

    words: int
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    frames: int = 0


# --------------------------------------------------------------------------------------------
# Which series need masking
# --------------------------------------------------------------------------------------------

def needs_masking(series_labels: list[str], project_features: set[int],
                  exclusions: list[tuple[str, str]], ds: Dataset) -> bool:
    """True when the series is labelled ``CHECKBURNEDINFO`` and neither the project opts out
    (feature 1, "never pixel-mask") nor an exclusion matches the dataset.

    An exclusion is ``(tag, regex)``: ``tag`` is a keyword (``"SeriesDescription"``) or
    ``"gggg,eeee"`` (also ``"(gggg,eeee)"``, ``"ggggeeee"``); it matches when the element is
    present and ``re.search(regex, value)`` finds the regex in its value (multiple values joined
    by backslash, as DICOM encodes them). An unknown keyword or invalid regex raises ValueError:
    a misconfigured exclusion must not silently decide what is masked.
    """
    if CHECK_LABEL not in {str(label).strip().upper() for label in series_labels}:
        return False
    if FEATURE_NEVER_MASK in {int(f) for f in project_features}:
        return False
    for tag_text, regex in exclusions:
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise ValueError(f"invalid exclusion regex {regex!r} for {tag_text}: {exc}") from None
        value = _element_text(ds, _parse_tag(tag_text))
        if value is not None and pattern.search(value):
            return False
    return True


def _parse_tag(text: str) -> int:
    text = str(text).strip()
    m = _TAG.match(text)
    if m:
        return int(Tag(int(m.group(1), 16), int(m.group(2), 16)))
    tag = tag_for_keyword(text)
    if tag is None:
        raise ValueError(f"exclusion names an unknown tag {text!r} (use a DICOM keyword or "
                         f"'gggg,eeee')")
    return int(tag)


def _element_text(ds: Dataset, tag: int) -> str | None:
    if tag not in ds:
        return None
    value = ds[tag].value
    if value is None or isinstance(value, Sequence):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------
# OCR, in memory
# --------------------------------------------------------------------------------------------

def tesseract_path() -> str:
    """The tesseract binary: ``$FIONA_TESSERACT`` or ``tesseract`` on PATH."""
    configured = os.environ.get("FIONA_TESSERACT")
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise TesseractNotFound(f"FIONA_TESSERACT={configured!r} is not an executable file; "
                                f"install the Debian package {TESSERACT_PACKAGE} "
                                f"(apt-get install {TESSERACT_PACKAGE})")
    found = shutil.which("tesseract")
    if not found:
        raise TesseractNotFound(f"the tesseract OCR binary is not installed (needed for masking "
                                f"burned-in text): install the Debian package "
                                f"{TESSERACT_PACKAGE} (apt-get install {TESSERACT_PACKAGE})")
    return found


def ocr_words(image: np.ndarray, lang: str = "eng", min_confidence: float = 30, *,
              psm: int = DEFAULT_PSM, timeout: float = 300) -> list[Word]:
    """Words tesseract finds in ``image`` (uint8, ``(rows, cols)`` gray or ``(rows, cols, 3)``
    RGB), with confidence >= ``min_confidence`` and non-blank text.

    The image goes to tesseract's stdin as an in-memory PNG; nothing is written to disk.
    """
    if not _LANG.match(lang):
        raise ValueError(f"invalid tesseract language {lang!r} (e.g. 'eng' or 'eng+deu')")
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                          and image.shape[2] == 3)):
        raise ValueError(f"OCR needs a uint8 gray or RGB image, not {image.dtype} "
                         f"{image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(buf, "PNG", compress_level=1)
    env = dict(os.environ)
    # tesseract's OpenMP threads make one small image ~2.5x slower, not faster
    env.setdefault("OMP_THREAD_LIMIT", "1")
    try:
        res = subprocess.run(
            [tesseract_path(), "stdin", "stdout", "-l", lang, "--psm", str(int(psm)), "tsv"],
            input=buf.getvalue(), capture_output=True, timeout=timeout, env=env, check=False)
    except FileNotFoundError:
        raise TesseractNotFound(f"the tesseract OCR binary could not be started: install the "
                                f"Debian package {TESSERACT_PACKAGE}") from None
    except subprocess.TimeoutExpired:
        raise PixelMaskingError(f"tesseract took longer than {timeout} s on a "
                                f"{image.shape[1]}x{image.shape[0]} image") from None
    stderr = res.stderr.decode("utf-8", "replace").strip()
    if res.returncode != 0:
        if "Failed loading language" in stderr or "Could not initialize tesseract" in stderr:
            packages = " ".join(f"{TESSERACT_PACKAGE}-{part.lower()}"
                                for part in lang.split("+"))
            raise PixelMaskingError(f"tesseract has no language data for {lang!r}: install the "
                                    f"Debian package(s) {packages}")
        raise PixelMaskingError(f"tesseract failed ({res.returncode}): {stderr[-500:]}")
    return _parse_tsv(res.stdout.decode("utf-8", "replace"), min_confidence)


def _parse_tsv(tsv: str, min_confidence: float) -> list[Word]:
    lines = tsv.splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    try:
        col = {name: header.index(name) for name in
               ("level", "left", "top", "width", "height", "conf", "text")}
    except ValueError:
        raise PixelMaskingError(f"unexpected tesseract TSV header: {lines[0]!r}") from None
    words = []
    for line in lines[1:]:
        cells = line.split("\t")
        if len(cells) < len(header) - 1 or cells[col["level"]] != "5":
            continue
        text = cells[col["text"]].strip() if col["text"] < len(cells) else ""
        conf = float(cells[col["conf"]])
        if not text or conf < min_confidence:
            continue
        words.append(Word(text, conf, int(cells[col["left"]]), int(cells[col["top"]]),
                          int(cells[col["width"]]), int(cells[col["height"]])))
    return words


def ocr_image(frame: np.ndarray, photometric: str,
              ds: Dataset | None = None) -> np.ndarray | None:
    """The 8-bit image tesseract sees for one decoded frame (``(rows, cols)`` or
    ``(rows, cols, samples)``): windowed by its min/max, MONOCHROME1 inverted, palette applied.
    ``None`` when the frame is uniform (it cannot hold text)."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    if photometric == "PALETTE COLOR":
        if ds is None:
            raise PixelMaskingError("a PALETTE COLOR image needs its dataset for the palette")
        from pydicom.pixels import apply_color_lut
        frame = apply_color_lut(frame, ds)
    lo, hi = frame.min(), frame.max()
    if lo == hi:
        return None
    if frame.dtype == np.uint8 and lo == 0 and hi == 255:
        out = frame
    else:
        f = (frame.astype(np.float32) - float(lo)) * (255.0 / (float(hi) - float(lo)))
        out = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)


def frame_words(frame: np.ndarray, photometric: str, ds: Dataset | None = None,
                lang: str = "eng", min_confidence: float = 30, *, psm: int = DEFAULT_PSM,
                scale: int | None = None) -> list[Word]:
    """Words in one decoded frame, with boxes in the frame's own pixel coordinates.

    The frame is windowed to 8 bits (:func:`ocr_image`) and, for small images, enlarged
    ``scale`` times (default: 2 when the longest side is <= 1024 pixels, else 1) because
    tesseract misses text only a few pixels high. A colour frame is read a second time as its
    "colour distance from the background" (:func:`chroma_image`): tesseract sees colours as grey,
    and e.g. green text on a mid-grey background has almost the background's brightness.
    This is the OCR that masking uses.
    """
    image = ocr_image(frame, photometric, ds)
    if image is None:
        return []
    rows, cols = image.shape[:2]
    if scale is None:
        scale = 2 if max(rows, cols) <= 1024 else 1
    scale = max(1, int(scale))
    images = [image]
    chroma = chroma_image(image) if image.ndim == 3 else None
    if chroma is not None:
        images.append(chroma)
    words: list[Word] = []
    for img in images:
        if scale > 1:
            img = np.asarray(Image.fromarray(img).resize((cols * scale, rows * scale),
                                                         Image.Resampling.LANCZOS))
        for w in ocr_words(img, lang, min_confidence, psm=psm):
            if scale > 1:
                x1 = -(-(w.left + w.width) // scale)
                y1 = -(-(w.top + w.height) // scale)
                w.left, w.top = w.left // scale, w.top // scale
                w.width, w.height = x1 - w.left, y1 - w.top
            words.append(w)  # both readings' boxes are masked, even where they overlap
    return words


def chroma_image(rgb: np.ndarray, min_chroma: int = 48) -> np.ndarray | None:
    """8-bit image of each pixel's largest per-channel distance from the frame's median colour
    (the background), or ``None`` when the frame has (almost) no colour."""
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    if int(spread.max()) < min_chroma:
        return None
    median = np.median(rgb.reshape(-1, 3), axis=0)
    dist = np.abs(rgb.astype(np.float32) - median.astype(np.float32)).max(axis=2)
    lo, hi = float(dist.min()), float(dist.max())
    if hi <= lo:
        return None
    return np.rint((dist - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _fill_value(frame: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray | int:
    """What "black" is in this frame's own stored values."""
    if frame.ndim == 3:  # colour: the darkest value of each sample
        return frame.reshape(-1, frame.shape[2]).min(axis=0)
    if photometric == "MONOCHROME1":  # low values are white
        return frame.max()
    if photometric == "PALETTE COLOR":  # the stored index whose colour is darkest
        from pydicom.pixels import apply_color_lut
        rgb = apply_color_lut(frame, ds).astype(np.float64)
        luminance = rgb @ np.array([0.299, 0.587, 0.114])
        return frame.flat[int(np.argmin(luminance))]
    return frame.min()


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------

def mask_burned_in_text(ds: Dataset, lang: str = "eng", min_confidence: float = 30, *,
                        psm: int = DEFAULT_PSM, margin: int = MARGIN,
                        scale: int | None = None) -> MaskResult:
    """OCR every frame of ``ds`` and overwrite each word found (plus ``margin`` pixels) with the
    frame's black; in place.

    Compressed pixel data is decoded (pydicom + pylibjpeg plugins); the result is always written
    uncompressed, Explicit VR Little Endian, interleaved (PlanarConfiguration 0), YBR decoded to
    RGB. BurnedInAnnotation becomes "NO" (every frame was OCR'd and every word found masked);
    the Icon Image Sequence (a thumbnail that would still show the text) is removed. UIDs are
    kept. On any error the dataset is left unchanged.
    """
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise PixelMaskingError("no integer Pixel Data to mask"
                                + (f" (float pixel data, {kinds[0]}, is not supported)"
                                   if kinds else ""))
    tesseract_path()  # fail early, with the package name, before any work
    if not _LANG.match(lang):
        raise ValueError(f"invalid tesseract language {lang!r} (e.g. 'eng' or 'eng+deu')")

    meta = getattr(ds, "file_meta", None)
    tsyntax = UID(meta.get("TransferSyntaxUID", "")) if meta is not None else UID("")
    if not tsyntax:
        raise PixelMaskingError("no (0002,0010) Transfer Syntax UID in the file meta: cannot "
                                "tell how the pixel data is encoded")
    if not tsyntax.is_little_endian:
        # pydicom cannot re-encode a big-endian dataset as little endian (binary values such as
        # OW would need swapping); the retired syntax is refused rather than half-converted
        raise PixelMaskingError(f"{tsyntax.name} (retired) is not supported for pixel masking")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise PixelMaskingError(f"no pixel data decoder for {tsyntax.name}: {exc}") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise PixelMaskingError(f"cannot decode {tsyntax.name} pixel data (install the "
                                f"pylibjpeg plugins): {missing}")
    try:
        # pydicom types **kwargs as DecodeOptions where it means Unpack[DecodeOptions]
        arr, image_pixel = decoder.as_array(ds, as_rgb=True)  # type: ignore[arg-type]
    except Exception as exc:  # the decoders raise many kinds
        raise PixelMaskingError(f"cannot decode {tsyntax.name} pixel data: {exc}") from exc

    photometric = str(image_pixel.get("photometric_interpretation",
                                      ds.get("PhotometricInterpretation", "MONOCHROME2")))
    samples = int(image_pixel.get("samples_per_pixel", ds.get("SamplesPerPixel", 1)))
    rows, cols = int(ds.Rows), int(ds.Columns)
    shape = arr.shape
    frames_arr = np.array(arr, copy=True).reshape(-1, rows, cols, samples)
    n_frames = frames_arr.shape[0]

    boxes: list[tuple[int, int, int, int]] = []
    n_words = 0
    for i in range(n_frames):
        frame = frames_arr[i] if samples > 1 else frames_arr[i, ..., 0]
        words = frame_words(frame, photometric, ds, lang, min_confidence, psm=psm, scale=scale)
        if not words:
            continue
        black = _fill_value(frame, photometric, ds)
        for w in words:
            x0, y0 = max(0, w.left - margin), max(0, w.top - margin)
            x1 = min(cols, w.left + w.width + margin)
            y1 = min(rows, w.top + w.height + margin)
            if x1 <= x0 or y1 <= y0:
                continue
            frame[y0:y1, x0:x1] = black  # a view into frames_arr
            boxes.append((x0, y0, x1, y1))
            n_words += 1

    _write_native(ds, frames_arr.reshape(shape), photometric, samples)
    ds.BurnedInAnnotation = "NO"
    if "IconImageSequence" in ds:
        del ds.IconImageSequence
    return MaskResult(words=n_words, boxes=boxes, frames=n_frames)


def _write_native(ds: Dataset, arr: np.ndarray, photometric: str, samples: int) -> None:
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated == 1:
        data = pack_bits(arr)
    elif bits_allocated in (8, 16, 32, 64) and arr.dtype.kind in "ui":
        # little-endian, with the item size Bits Allocated says (a decoder may hand back
        # another width, e.g. 8-bit JPEG samples in a 16-bit allocation)
        target = np.dtype(f"<{arr.dtype.kind}{bits_allocated // 8}")
        if target != arr.dtype and not np.can_cast(arr.dtype, target, "safe"):
            info = np.iinfo(target)
            if arr.min() < info.min or arr.max() > info.max:
                raise PixelMaskingError(f"decoded {arr.dtype} pixels do not fit BitsAllocated "
                                        f"{bits_allocated}")
        data = arr.astype(target, copy=False).tobytes()
    else:
        raise PixelMaskingError(f"cannot write {arr.dtype} pixels with BitsAllocated "
                                f"{bits_allocated}")
    if len(data) % 2:
        data += b"\x00"

    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = VR.OB if bits_allocated <= 8 else VR.OW
    elem.is_undefined_length = False
    for tag in _ENCAPSULATION_ELEMENTS:
        if tag in ds:
            del ds[tag]
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0  # decoded arrays are (.., rows, cols, samples): interleaved
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # pydicom caches the decoded array by element identity; make it decode the new bytes
    ds._pixel_array = None
    ds._pixel_id = {}
