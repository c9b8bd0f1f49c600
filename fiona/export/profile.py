"""Export profiles as data: what an export changes in the de-identified objects it hands out.

A profile is `NAME.json`, shipped in `fiona/export/profiles/` (read with importlib.resources,
so a plain `pip install .` has them) or a site's own in `DATADIR/config/profiles/export/`,
which wins. Keys:
- `set`: {keyword: value} written into every object;
- `clear`: [keyword] emptied where present;
- `drop`: object kinds left out of the export, by modality code (`SR`, `PR`, ...): an object is
  dropped when its Modality or its SOP class family is one of them;
- `patient`: the patient characteristics the project allows to be written, of `sex`,
  `birth_year` and `age` (age at study). The de-identification removed them; they come from the
  original study (`Characteristics`) and are written as DICOM: PatientSex, PatientBirthDate as
  `YYYY0101` (DICOM has no birth-year attribute) and PatientAge (`045Y`). Characteristics not
  allowed are removed even when present.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

KINDS = ("sex", "birth_year", "age")
#: SOP class families of the object kinds a profile can drop by modality code
FAMILIES = {"SR": "1.2.840.10008.5.1.4.1.1.88.", "PR": "1.2.840.10008.5.1.4.1.1.11.",
            "KO": "1.2.840.10008.5.1.4.1.1.88.59"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEYS = {"description", "set", "clear", "drop", "patient"}


class ProfileError(ValueError):
    """A profile is missing or malformed; the text names the file and the problem."""


@dataclass(frozen=True)
class Characteristics:
    """What is known of the participant from the original study ("" when unknown)."""

    sex: str = ""
    birth_year: str = ""
    age: str = ""

    @classmethod
    def of(cls, ds: Dataset) -> Characteristics:
        """From an original object: PatientSex, the year of PatientBirthDate, PatientAge or
        else the age computed from the birth date and StudyDate."""
        sex = str(ds.get("PatientSex", "") or "").strip().upper()
        birth = str(ds.get("PatientBirthDate", "") or "").strip()
        study = str(ds.get("StudyDate", "") or "").strip()
        age = str(ds.get("PatientAge", "") or "").strip()
        year = birth[:4] if re.fullmatch(r"\d{8}", birth) else ""
        if not re.fullmatch(r"\d{3}[DWMY]", age):
            age = ""
            if year and re.fullmatch(r"\d{8}", study):
                years = int(study[:4]) - int(year) - ((study[4:] < birth[4:]) and 1 or 0)
                age = f"{years:03d}Y" if 0 <= years < 1000 else ""
        return cls(sex if sex in ("M", "F", "O") else "", year, age)


#: an Edit's value that removes the element
REMOVE = object()


@dataclass(frozen=True)
class Edit:
    """One change a profile makes: `value` is the text to write, None to empty the element,
    or REMOVE."""

    keyword: str
    value: str | None | object


@dataclass(frozen=True)
class ExportProfile:
    name: str
    description: str = ""
    set: dict[str, str] = field(default_factory=dict)
    clear: tuple[str, ...] = ()
    drop: frozenset[str] = frozenset()
    patient: frozenset[str] = frozenset()

    def dropped(self, ds: Dataset) -> str:
        """Why the profile leaves `ds` out ("" when it is kept)."""
        modality = str(ds.get("Modality", "") or "").strip().upper()
        sop_class = str(ds.get("SOPClassUID", "") or "")
        for kind in sorted(self.drop):
            family = FAMILIES.get(kind)
            if modality == kind or (family and sop_class.startswith(family)):
                return f"a {kind} object (export profile {self.name} drops them)"
        return ""

    def edits(self, ds: Dataset, person: Characteristics | None = None) -> dict[str, Edit]:
        """What the profile does to `ds`, keyword by keyword (the last rule for a keyword
        wins): set, clear where present, write the allowed patient characteristics and
        remove the others where present. Empty when the profile has nothing to change in
        `ds` (a `set` is always listed). `apply` carries them out on a data set, `patch` on
        the bytes of a file."""
        edits: dict[str, Edit] = {}

        def present(keyword: str) -> bool:
            edit = edits.get(keyword)
            return edit.value is not REMOVE if edit else keyword in ds

        for keyword, value in self.set.items():
            edits[keyword] = Edit(keyword, value)
        for keyword in self.clear:
            if present(keyword):
                edits[keyword] = Edit(keyword, None)
        person = person or Characteristics()
        values = {"PatientSex": ("sex", person.sex),
                  "PatientBirthDate": ("birth_year",
                                       f"{person.birth_year}0101" if person.birth_year else ""),
                  "PatientAge": ("age", person.age)}
        for keyword, (kind, value) in values.items():
            if kind in self.patient and value:
                edits[keyword] = Edit(keyword, value)
            elif kind not in self.patient and present(keyword):
                edits[keyword] = Edit(keyword, REMOVE)
        return edits

    def apply(self, ds: Dataset, person: Characteristics | None = None) -> None:
        """Carry out `edits` on `ds`, in place."""
        for edit in self.edits(ds, person).values():
            if edit.value is REMOVE:
                del ds[edit.keyword]
            else:  # None writes the element empty
                setattr(ds, edit.keyword, edit.value)


def shipped() -> Path:
    return Path(str(files("fiona.export") / "profiles"))


def site_folder(datadir: Path) -> Path:
    return Path(datadir) / "config" / "profiles" / "export"


def names(datadir: Path) -> list[str]:
    """Every profile a site can use (shipped and its own)."""
    found = {p.stem for p in shipped().glob("*.json")}
    folder = site_folder(datadir)
    if folder.is_dir():
        found |= {p.stem for p in folder.glob("*.json") if _NAME.match(p.stem)}
    return sorted(found)


def load(name: str, datadir: Path) -> ExportProfile:
    """Profile NAME: the site's own if it has one, else the shipped one; ProfileError naming
    the profiles that exist when there is none."""
    if not _NAME.match(name or ""):
        raise ProfileError(f"export profile name {name!r} must be 1-64 letters, digits, "
                           f"'_', '.', '-'")
    own = site_folder(datadir) / f"{name}.json"
    path = own if own.is_file() else shipped() / f"{name}.json"
    if not path.is_file():
        raise ProfileError(f"no export profile {name!r}; known: {', '.join(names(datadir))}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{path}: not readable JSON ({exc})") from None
    return parse(name, data, str(path))


def parse(name: str, data: object, where: str) -> ExportProfile:
    """A profile from its JSON, or ProfileError naming every problem."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: must be a JSON object")
    errors = [f"unknown key {k!r} (known: {', '.join(sorted(_KEYS))})"
              for k in data if k not in _KEYS]
    sets, clear = data.get("set", {}), data.get("clear", [])
    drop, patient = data.get("drop", []), data.get("patient", [])
    if not isinstance(sets, dict) or not all(isinstance(v, str) for v in sets.values()):
        errors.append("'set' must map DICOM keywords to text values")
        sets = {}
    for key, what in ((clear, "clear"), (drop, "drop"), (patient, "patient")):
        if not isinstance(key, list) or not all(isinstance(v, str) for v in key):
            errors.append(f"{what!r} must be a list of strings")
    if not errors:
        errors += [f"unknown DICOM keyword {k!r}" for k in [*sets, *clear]
                   if tag_for_keyword(k) is None]
        errors += [f"'patient' may list {', '.join(KINDS)}, not {p!r}" for p in patient
                   if p not in KINDS]
    if errors:
        raise ProfileError(f"{where}: " + "; ".join(errors))
    return ExportProfile(name, str(data.get("description", "")), dict(sets), tuple(clear),
                         frozenset(d.upper() for d in drop), frozenset(patient))
