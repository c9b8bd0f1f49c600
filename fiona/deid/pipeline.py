"""De-identification of one study's objects: the single pipeline every caller runs.

The forwarder, `fiona anonymize` and the web preview (and later exports) all go through
`Pipeline.process`, so what a user previews is byte for byte what is sent. For each object:

1. read (`read`: not DICOM, a DICOMDIR or an object without instance/series UIDs is `Unreadable`);
2. drop rules: project feature 0 drops presentation states, feature 2 secondary captures;
3. masking decision (`pixels.needs_masking`, from the series' classification labels, the
   project's "never pixel-mask" feature and its exclusions), then the masking itself; a failed
   masking is `MaskingFailed`, never a silent pass;
4. the engine (profile and project settings, see `settings_for`);
5. the verification gate on the exact bytes that will be written or sent (`GateError`);
6. on a gate failure, `quarantine_gate_failure` hands the case to the quarantine (the forwarder
   does; the offline `fiona anonymize` just stops).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from .. import quarantine
from ..tree import Tree, valid_uid
from .engine import Deidentifier, Settings, profile_names, site_profile, with_profile
from .gate import GateError, check
from .identifiers import Identifiers
from .pixels import PixelMaskingError, mask_burned_in_text, needs_masking

if TYPE_CHECKING:
    from ..control.base import Project

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11."
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
FEATURE_DROP_PR, FEATURE_DROP_SC = 0, 2
#: OCR confidence for masking: low, to err towards masking
MASK_MIN_CONFIDENCE = 10


class Unreadable(ValueError):
    """The file is not an object the pipeline can de-identify; the message says why."""


class MaskingFailed(Exception):
    """A series needs its burned-in text masked and the masking failed: the object must not go
    out unmasked."""


@dataclass(frozen=True)
class ProjectRules:
    """What a project decides about its objects beyond the profile."""

    features: frozenset[int] = frozenset()
    pixel_exclusions: tuple[tuple[str, str], ...] = ()
    #: original SeriesInstanceUID -> classification labels (CHECKBURNEDINFO asks for masking)
    labels: Mapping[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, project: Project, labels: Mapping[str, list[str]] | None = None) -> ProjectRules:
        """The rules of a control-plane `Project` (features, pixel exclusions)."""
        return cls(frozenset(int(f) for f in project.features),
                   tuple((str(t), str(r)) for t, r in project.pixel_exclusions), labels or {})


@dataclass
class Result:
    """One object through the pipeline: dropped (with the reason), or de-identified."""

    dropped: str = ""
    ds: Dataset | None = None
    encoded: bytes = b""
    masked: bool = False

    @property
    def series_uid(self) -> str:
        """The output's SeriesInstanceUID, checked as a UID (callers name folders with it)."""
        return valid_uid(_text(self.ds, 0x0020000E), "SeriesInstanceUID")

    @property
    def sop_uid(self) -> str:
        """The output's SOPInstanceUID, checked as a UID (callers name files with it)."""
        return valid_uid(_text(self.ds, 0x00080018), "SOPInstanceUID")


def settings_for(project: Project, participant: str, event: str, key: bytes,
                 datadir: str | Path) -> Settings:
    """Engine settings for a study of `project` (a control-plane `Project`): its import rule and
    its profile (`Project.deid_profile`: the site's `DATADIR/config/profiles/NAME.json`, else
    the shipped one). The one place that turns a project into a profile: the forwarder, the
    preview and the exports all come here, so what is previewed is what is sent."""
    extra = {}
    if project.import_rule_tag and project.import_rule_regexp:
        extra["import_rule"] = {"tag": project.import_rule_tag,
                                "regexp": project.import_rule_regexp}
    settings = Settings(project=project.name, participant=participant, key=key, event=event,
                        extra=extra)
    return with_profile(settings, check_profile(project.deid_profile, datadir))


def available_profiles(datadir: str | Path) -> list[str]:
    """The profile names a project may choose: the shipped ones and the site's own."""
    site = Path(datadir) / "config" / "profiles"
    return sorted(set(profile_names()) | set(profile_names(site)))


def check_profile(name: str, datadir: str | Path) -> dict:
    """Profile `name` as the site has it, or ValueError naming the available ones (unknown, or a
    site file that does not load). Checked when a project is saved, and again when its studies
    are de-identified (a site file may have gone since, or REDCap been edited by hand)."""
    known = available_profiles(datadir)
    if name not in known:
        raise ValueError(f"no de-identification profile {name!r}; available: "
                         f"{', '.join(known)}")
    return site_profile(name, datadir)


def read(path: Path) -> Dataset:
    """The object at `path`, or Unreadable with a reason that quotes no value."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
            AttributeError, NotImplementedError) as exc:
        raise Unreadable(f"not readable as DICOM ({type(exc).__name__})") from None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
        raise Unreadable("a DICOMDIR (directory records are not copied)")
    if not _text(ds, 0x00080018) or not _text(ds, 0x0020000E):
        raise Unreadable("no SOPInstanceUID or SeriesInstanceUID")
    return ds


class Pipeline:
    """De-identifies the objects of one study for one (project, participant, event)."""

    def __init__(self, settings: Settings, rules: ProjectRules | None = None):
        self.settings = settings
        self.rules = rules or ProjectRules()
        self.engine = Deidentifier(settings)
        self.allowed = self.engine.authored_values()
        self._uids = "rtnUIDsOpt" not in settings.options

    def drop_reason(self, ds: Dataset) -> str:
        """Why the project's options drop this object ("" when it is kept)."""
        sop_class = str(ds.get("SOPClassUID", ""))
        features = self.rules.features
        if FEATURE_DROP_PR in features and (sop_class.startswith(PRESENTATION_STATE)
                                            or ds.get("Modality") == "PR"):
            return "a presentation state (the project drops them)"
        if FEATURE_DROP_SC in features and sop_class.startswith(SECONDARY_CAPTURE):
            return "a secondary capture (the project drops them)"
        return ""

    def process(self, ds: Dataset) -> Result:
        """Drop, mask, de-identify and gate `ds` (changed in place). Raises MaskingFailed,
        GateError, or the engine's error for an object it cannot handle."""
        why = self.drop_reason(ds)
        if why:
            return Result(dropped=why)
        ids = Identifiers.from_dataset(ds, uids=self._uids)
        masked = False
        series = _text(ds, 0x0020000E)
        if needs_masking(self.rules.labels.get(series, []), set(self.rules.features),
                         list(self.rules.pixel_exclusions), ds):
            try:
                mask_burned_in_text(ds, min_confidence=MASK_MIN_CONFIDENCE)
            except PixelMaskingError as exc:
                raise MaskingFailed(f"series {series} needs its burned-in text masked, which "
                                    f"failed ({exc})") from None
            masked = True
        self.engine.apply(ds, ids)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded = buffer.getvalue()
        check(ds, encoded, ids, self.allowed)
        return Result(ds=ds, encoded=encoded, masked=masked)

    def mapped_uid(self, uid: str) -> str:
        """The de-identified UID for `uid` (keyed, deterministic)."""
        return self.engine.uid(uid)


def quarantine_gate_failure(tree: Tree, exc: GateError, note: str, context: dict) -> Path:
    """Hand a study the gate stopped to the quarantine: nothing of it is sent from that file
    on, and an admin sees why (the element and the kind of identifier, never its text)."""
    return quarantine.hold(tree, "deidentify", f"verification gate: {exc}",
                           {"request.txt": note.encode()}, context,
                           "nothing from this file on was sent (files before it passed the gate "
                           "and may have been); fix the project's profile or options, then "
                           "resend")


def _text(ds: Dataset | None, tag: int) -> str:
    """A top-level text value without decoding the rest of the dataset."""
    elem = None if ds is None else ds._dict.get(BaseTag(tag))
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip("\x00 ")
