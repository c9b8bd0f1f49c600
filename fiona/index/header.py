"""One image's contribution to its series JSON (SPEC §4), as plain JSON values.

The field names are the original FIONA ones, because classification rules, REDCap and
downstream scripts already use them.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import IS, DSfloat, PersonName

from .csa import siemens_series_fields

#: series JSON field -> DICOM keyword, where they differ
_KEYWORDS = {
    "SoftwareVersion": "SoftwareVersions",
    "SliceSpacing": "SpacingBetweenSlices",
}

FIELDS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "SoftwareVersion", "AcquisitionMatrix",
    "StudyInstanceUID", "SeriesInstanceUID", "SeriesTime", "PatientID", "PatientName",
    "PatientSex", "InstitutionName", "OperatorsName", "SOPClassUID", "StudyDate", "StudyTime",
    "StudyDescription", "StudyID", "StationName", "SeriesDescription", "SequenceName",
    "EchoTime", "RepetitionTime", "SeriesNumber", "InstanceNumber", "SliceThickness",
    "ImageType", "SliceSpacing", "ScanningSequence", "SequenceVariant", "SliceLocation",
    "ImagesInAcquisition", "AccessionNumber", "NumberOfTemporalPositions",
)


def json_value(value: Any) -> Any:
    """A DICOM value as JSON: numbers stay numbers, names and UIDs become strings,
    multi-values become lists."""
    if isinstance(value, (MultiValue, list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat):
        return float(value)
    if isinstance(value, (int, float)) or value is None:
        return value
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace")
    return str(value)


def image_record(ds: Dataset, caller: str = "", called: str = "", ip: str = "") -> dict:
    """The series-JSON fields of one image (no NumFiles/ClassifyType: the series adds those)."""
    record: dict[str, Any] = {
        "IncomingConnection": {"AETitleCaller": caller, "AETitleCalled": called, "CallerIP": ip},
    }
    for name in FIELDS:
        keyword = _KEYWORDS.get(name, name)
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed value in one element must not lose the image
            value = None
        if value is not None and value != "":
            record[name] = json_value(value)
    record.update(siemens_series_fields(ds))
    return record
