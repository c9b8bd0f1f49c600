"""One image's contribution to its series JSON (SPEC §4), as plain JSON values.

The field names are the original FIONA ones, because classification rules, REDCap and
downstream scripts already use them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import IS, DSfloat, PersonName

from .classify import RuleInputs
from .csa import SIEMENS_FIELDS, siemens_series_fields

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

#: the field naming the sender (AE titles and address of the association)
CONNECTION = "IncomingConnection"

#: series JSON field -> DICOM tag, looked up once (a keyword lookup per access costs more)
_TAGS = {name: Tag(_KEYWORDS.get(name, name)) for name in FIELDS}


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


class ImageRecord(Mapping[str, Any]):
    """The series-JSON fields of one image (no NumFiles/ClassifyType: the series adds those),
    each converted from the header when first read.

    Why lazy: pydicom converts an element's raw bytes on first access, ~10 µs each, so
    converting all of FIELDS cost ~0.35 ms per image, the largest share of the indexer's
    ~1.6 ms (measured on the 1,000-image bench study). After a series' first image the merge
    needs only SliceLocation and the fields the series has not got yet, and the rules read a
    dozen fields, so most conversions were thrown away. The Siemens fields come from decoding
    the CSA headers and are likewise decoded once, when one of them is first read.
    """

    def __init__(self, ds: Dataset, caller: str = "", called: str = "", ip: str = ""):
        self._ds = ds
        self._values: dict[str, Any] = {
            CONNECTION: {"AETitleCaller": caller, "AETitleCalled": called, "CallerIP": ip},
        }
        self._siemens: dict[str, Any] | None = None

    def __getitem__(self, name: str) -> Any:
        try:
            value = self._values[name]
        except KeyError:
            value = self._values[name] = self._convert(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        """The names with a value (converting every field: the merge uses `names`)."""
        return (name for name in self.names() if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @staticmethod
    def names() -> tuple[str, ...]:
        """Every name this record can hold, without converting anything."""
        return (CONNECTION, *FIELDS, *SIEMENS_FIELDS)

    def signature(self, inputs: RuleInputs) -> tuple | None:
        """A key equal to another image's only when the rules read the same from both: the
        raw bytes of every element behind `inputs` (before pydicom converts them, which is
        what makes this cheap), the character set that decodes them, and the record's own
        fields. None when a value has no exact key (a sequence, say): classify that image."""
        ds = self._ds
        parts: list[object] = [_element_key(ds, _CHARACTER_SET)]
        try:
            for name in inputs.keywords:
                if name in _TAGS:
                    parts.append(_element_key(ds, _TAGS[name]))
                elif name == CONNECTION or name in SIEMENS_FIELDS:  # the record's own
                    parts.append(_hashable(self.get(name)))
                else:
                    tag = tag_for_keyword(name)
                    parts.append(None if tag is None else _element_key(ds, Tag(tag)))
            parts.extend(_element_key(ds, tag) for tag in inputs.tags)
            key = tuple(parts)
            hash(key)  # a raw value is bytes; a converted one may hold a list
        except TypeError:
            return None
        return key

    def _convert(self, name: str) -> Any:
        """The JSON value of one field, None when it is missing or empty."""
        if name in SIEMENS_FIELDS:
            if self._siemens is None:
                self._siemens = siemens_series_fields(self._ds)
            return self._siemens.get(name)
        if name not in _TAGS:
            return None
        try:
            value = self._ds.get(_TAGS[name])
        except Exception:  # a malformed value in one element must not lose the image
            return None
        value = None if value is None else value.value
        return None if value is None or value == "" else json_value(value)


_CHARACTER_SET = Tag("SpecificCharacterSet")


def _element_key(ds: Dataset, tag: BaseTag) -> object:
    """An element as a hashable key: its raw bytes with what decodes them when pydicom has not
    converted it yet, else its converted value."""
    element = ds.get_item(tag)
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        return (element.VR, element.value, element.is_little_endian, element.is_implicit_VR)
    return (element.VR, _hashable(element.value))


def _hashable(value: Any) -> object:
    """A converted value as a key that keeps its text ("05" is not "5": a regexp tells them
    apart) and type; TypeError for values without one (sequences)."""
    if isinstance(value, (MultiValue, list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if value is None or isinstance(value, (str, bytes, int, float, PersonName)):
        return (type(value).__name__, str(value))
    raise TypeError(f"no key for {type(value).__name__}")
