"""What de-identification keeps of a slide's specimen description (PS3.3 C.7.6.22, TID 8001).

Table E.1-1 names the specimen attributes one by one: SpecimenIdentifier and
ContainerIdentifier are D, SpecimenUID is U, the descriptions are X (C under Clean
Descriptors), and SpecimenPreparationSequence is Z, or C under the Clean Structured Content
Option. This module says what D and C mean for them, so that the non-identifying pathology
(stain, fixative, embedding medium, specimen type, sampling method: all coded) reaches research
and nothing identifying does:

- D on an identifier attribute (`IDENTIFIER_KEYWORDS`) writes a keyed replacement
  (`keyed_identifier`: HMAC-SHA256 with the site's key, the project mixed in), not a constant
  dummy: the slide's levels and the parent and child specimens of one case keep pointing at
  each other, and the source identifier cannot be read back without the key.
- C on SpecimenPreparationSequence (and the specimen's localization content items, which the
  table does not list but are the same kind of content) keeps each content item by its value
  type (`item_action`): coded (CODE), numeric (NUM), date and time items are kept (dates
  shifted like every date); a TEXT item whose concept is a specimen or container identifier
  (`IDENTIFIER_CONCEPTS`) gets the keyed replacement of its value; any other TEXT item is free
  text and is dropped, unless the profile keeps TextValue. The codes' meanings are cleaned like
  other text in a cleaned sequence.
"""

from __future__ import annotations

from enum import Enum

from pydicom.dataset import Dataset

from ..control.keyed import Keyed

#: identifier attributes whose D (dummy) becomes a keyed replacement
IDENTIFIER_KEYWORDS = frozenset({"SpecimenIdentifier", "ContainerIdentifier"})

#: content-item sequences of the specimen module, filtered item by item (`item_action`)
CONTENT_ITEM_SEQUENCES = frozenset({"SpecimenPreparationStepContentItemSequence",
                                    "SpecimenLocalizationContentItemSequence"})

#: TID 8001/8002 concepts (scheme, code value) whose TEXT value is an identifier
IDENTIFIER_CONCEPTS = frozenset({
    ("DCM", "121041"),   # Specimen Identifier
    ("DCM", "111705"),   # Parent Specimen Identifier
    ("DCM", "111700"),   # Specimen Container Identifier
})

_KEPT_TYPES = frozenset({"CODE", "NUM", "DATE", "TIME", "DATETIME", "UIDREF", "SCOORD",
                         "SCOORD3D"})


class ItemAction(Enum):
    KEEP = "keep"           # de-identified like any item (codes kept, dates shifted)
    KEY = "key"             # TextValue replaced by its keyed value
    DROP = "drop"           # free text: the item goes


def keyed_identifier(key: bytes, project: str, value: str) -> str:
    """The replacement of a specimen or container identifier: "SPC" and 16 digits of the
    site's keyed hash (`Keyed.hash`, purpose "Specimen:" + project); the same value gives the
    same replacement in every process of the project, another project another one. Digits
    only, so no part of it can continue (and so reveal) a short source identifier."""
    n = int(Keyed(key).hash(value, f"Specimen:{project}")[:16], 16)
    return f"SPC{n % 10 ** 16:016d}"


_VALUE_TYPE, _CONCEPT_NAME, _TEXT_VALUE = 0x0040A040, 0x0040A043, 0x0040A160


def _is_identifier(item: Dataset) -> bool:
    names = item.get(_CONCEPT_NAME)
    names = names.value if names is not None else None
    if not names:
        return False
    return (str(names[0].get("CodingSchemeDesignator", "")).strip(),
            str(names[0].get("CodeValue", "")).strip()) in IDENTIFIER_CONCEPTS


def identifier_text(item: Dataset) -> str:
    """The identifier an identifier content item holds; "" for any other dataset (for the
    source's identifiers that the verification gate looks for)."""
    if _TEXT_VALUE not in item._dict or _CONCEPT_NAME not in item._dict or \
            not _is_identifier(item):
        return ""
    return str(item[_TEXT_VALUE].value or "").strip()


def item_action(item: Dataset, keep_text: bool) -> ItemAction:
    """What happens to one content item (see the module doc); `keep_text`: the profile
    keeps TextValue."""
    elem = item.get(_VALUE_TYPE)
    vtype = str(elem.value or "").strip().upper() if elem is not None else ""
    if vtype in _KEPT_TYPES:
        return ItemAction.KEEP
    if vtype == "TEXT":
        if _is_identifier(item):
            return ItemAction.KEY
        return ItemAction.KEEP if keep_text else ItemAction.DROP
    return ItemAction.DROP           # no or an unknown value type: nothing to vouch for
