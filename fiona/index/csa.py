"""Series-JSON fields read from the Siemens CSA headers (SPEC §4).

Siemens keeps the acquisition details that classification rules and downstream pipelines need
(slice count, scanner software baseline, phase-encoding polarity, diffusion weighting) in two
private binary blobs under the private creator "SIEMENS CSA HEADER": the CSA image header
(0029,xx10) and the CSA series header (0029,xx20). The series header carries the
"MrPhoenixProtocol" text, whose ``### ASCCONV BEGIN ###`` section lists the protocol as
``key = value`` lines. nibabel decodes the blobs; this module only picks fields out of them.

The field names, and where they come from, follow the original FIONA indexer
(processSingleFile3.py) so that classify rules and consumers written for it keep working:

- ``siemensUUID``: Phoenix ``sWipMemBlock.tFree`` (the ABCD sequences put a UUID there; other
  sequences put whatever WIP free text they like).
- ``NumSlices``: Phoenix ``sGroupArray.asGroup[0].nSize``. Added here: ``sSliceArray.lSize``
  when that is missing, and the image header's ``NumberOfImagesInMosaic`` when the series
  header is gone (anonymisers often drop it).
- ``MeasID``: Phoenix ``lSequenceID``.
- ``OSLevel``: Phoenix ``sProtConsistencyInfo.tMeasuredBaselineString`` (VD/VE), reduced to the
  release after ``N4_`` ("N4_VE11C_LATEST_20160120" -> "VE11C"). Added here: VB-era
  ``tBaselineString``, which is all VB17 writes.
- ``PhaseEncodingDirectionPositive`` and the diffusion entry (``B_value``,
  ``DiffusionDirectionality``, ``DiffusionGradientDirection``): the CSA image header.

Scanners and anonymisers we do not control write these headers, so nothing here raises: a
header nibabel cannot decode counts as missing (logged at debug level), and the other header
is still used.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import pydicom

with warnings.catch_warnings():
    # Importing nibabel.nicom warns that its DICOM *wrappers* are experimental. The CSA reader
    # used here is not affected, and the warning would otherwise land in every daemon log.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

log = logging.getLogger(__name__)

CsaHeader = dict[str, Any]

#: the series-JSON fields siemens_series_fields can give
SIEMENS_FIELDS = ("siemensUUID", "NumSlices", "MeasID", "OSLevel",
                  "PhaseEncodingDirectionPositive")

_BASELINE_RELEASE = re.compile(r"N4_([^_\"]+)")
_QUOTED = re.compile(r'^"+([^"]*)"+')


def siemens_series_fields(ds: pydicom.Dataset) -> dict:
    """Return the Siemens fields of the series JSON that this image's CSA headers provide.

    Keys are among SIEMENS_FIELDS; a key is left out when its source is missing, so the
    result is {} for non-Siemens images and for images without (readable) CSA headers.
    """
    image = _read_csa(ds, "image")
    phoenix = _phoenix(_read_csa(ds, "series"))
    fields = {
        "siemensUUID": _phoenix_value(phoenix, "sWipMemBlock.tFree"),
        "NumSlices": _num_slices(phoenix, image),
        "MeasID": _phoenix_int(phoenix, "lSequenceID"),
        "OSLevel": _os_level(phoenix),
        "PhaseEncodingDirectionPositive": _first(image, "PhaseEncodingDirectionPositive"),
    }
    return {key: value for key, value in fields.items() if value is not None}


def siemens_diffusion_entry(ds: pydicom.Dataset) -> dict | None:
    """Return this image's entry for the series' siemensDiffusionInformation list, or None.

    Like the original, an image counts as diffusion data when its CSA image header has a
    DiffusionDirectionality. Values the header lacks are None: b=0 images, for one, have no
    gradient direction.
    """
    image = _read_csa(ds, "image")
    directionality = _first(image, "DiffusionDirectionality")
    if not directionality:
        return None
    return {
        "B_value": _first(image, "B_value"),
        "DiffusionDirectionality": directionality,
        "DiffusionGradientDirection": _items(image, "DiffusionGradientDirection") or None,
        "SOPInstanceUID": _dicom_str(ds, "SOPInstanceUID"),
        "InstanceNumber": _dicom_int(ds, "InstanceNumber"),
    }


def _read_csa(ds: pydicom.Dataset, kind: str) -> CsaHeader | None:
    """Decode the CSA 'image' or 'series' header, or None when it is missing or unreadable."""
    try:
        return csareader.get_csa_header(ds, kind)
    except Exception as exc:
        # Bad bytes make nibabel raise many types (CSAReadError, struct.error, AssertionError,
        # ValueError, TypeError ...); none of them may stop indexing.
        log.debug("unreadable CSA %s header in %s: %r", kind, _dicom_str(ds, "SOPInstanceUID"), exc)
        return None


def _items(header: CsaHeader | None, name: str) -> list:
    """The decoded values of one CSA tag as JSON-ready values; [] when absent."""
    if header is None:
        return []
    try:
        items = header["tags"][name]["items"]
    except KeyError:
        return []
    return [_plain(item) for item in items]


def _first(header: CsaHeader | None, name: str) -> Any:
    """The first value of one CSA tag, or None."""
    items = _items(header, name)
    return items[0] if items else None


def _plain(value: Any) -> Any:
    """Make one CSA value JSON-serialisable.

    nibabel already converts numbers to int/float, but hands back raw bytes for a string whose
    NUL terminator is missing.
    """
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _phoenix(series: CsaHeader | None) -> str:
    """The MrPhoenixProtocol text of the series header, or '' when there is none."""
    text = _first(series, "MrPhoenixProtocol")
    return text if isinstance(text, str) else ""


def _phoenix_value(phoenix: str, key: str) -> str | None:
    """The value of the ASCCONV line ``key = value``, without its quotes; None when absent.

    The key must start its line and be matched whole, so neither a longer key ending in the same
    name nor the indented XProtocol part of the text can match. String values are written as
    ""text""; others may carry a trailing # comment.
    """
    match = re.search(rf"^{re.escape(key)}[ \t]*=[ \t]*(.*)$", phoenix, re.MULTILINE)
    if match is None:
        return None
    raw = match.group(1).strip()
    quoted = _QUOTED.match(raw)
    value = quoted.group(1) if quoted else raw.split("#", 1)[0].strip()
    return value or None


def _phoenix_int(phoenix: str, key: str) -> int | None:
    """An integer ASCCONV value, or None when absent or not a decimal integer."""
    value = _phoenix_value(phoenix, key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _num_slices(phoenix: str, image: CsaHeader | None) -> int | None:
    """Slices per volume: the protocol's first slice group, else all slices, else the mosaic."""
    for key in ("sGroupArray.asGroup[0].nSize", "sSliceArray.lSize"):
        count = _phoenix_int(phoenix, key)
        if count:
            return count
    mosaic = _first(image, "NumberOfImagesInMosaic")
    return mosaic if isinstance(mosaic, int) and mosaic > 0 else None


def _os_level(phoenix: str) -> str | None:
    """The scanner software release, e.g. 'VE11C', from the protocol's baseline string."""
    for key in ("sProtConsistencyInfo.tMeasuredBaselineString",
                "sProtConsistencyInfo.tBaselineString"):
        baseline = _phoenix_value(phoenix, key)
        if baseline:
            release = _BASELINE_RELEASE.search(baseline)
            return release.group(1) if release else baseline
    return None


def _dicom_str(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A DICOM attribute as plain str (not pydicom's UID/str subclasses), or None when empty."""
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError):
        return None
    return str(value) if value not in (None, "") else None


def _dicom_int(ds: pydicom.Dataset, keyword: str) -> int | None:
    """A DICOM integer attribute as plain int, or None when empty or malformed."""
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None
