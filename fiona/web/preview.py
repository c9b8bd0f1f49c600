"""A preview of de-identification: one image of a study, header values before and after."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom

from ..control.base import Project
from ..deid.engine import Deidentifier, Settings, load_profile, with_profile
from ..deid.identifiers import Identifiers
from ..tree import Tree, valid_uid


def first_image(datadir: Path, study_uid: str, series_uids: list[str]) -> Path | None:
    tree = Tree(datadir)
    for series in series_uids:
        folder = tree.series_dir(valid_uid(study_uid), valid_uid(series))
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    return f
    return None


def _show(elem) -> str:
    if elem is None:
        return "(removed)"
    if elem.VR == "SQ":
        return f"(sequence, {len(elem.value)} items)"
    if elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN"):
        return f"({elem.VR}, {len(elem.value or b'')} bytes)"
    text = str(elem.value)
    return text if len(text) <= 120 else text[:117] + "..."


def preview(datadir: Path, key: bytes, project: Project, participant: str, event: str,
            path: Path) -> list[dict]:
    """Rows {tag, name, before, after} for every top-level element but pixel data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    before = copy.deepcopy(ds)
    extra = {}
    if project.import_rule_tag and project.import_rule_regexp:
        extra["import_rule"] = {"tag": project.import_rule_tag,
                                "regexp": project.import_rule_regexp}
    site_profiles = Tree(datadir).config / "profiles"
    settings = Settings(project=project.name, participant=participant, key=key, event=event,
                        extra=extra)
    settings = with_profile(settings, load_profile(
        "default", site_profiles if (site_profiles / "default.json").exists() else None))
    Deidentifier(settings).apply(ds, Identifiers.from_dataset(before))
    rows = []
    tags = sorted(set(before.keys()) | set(ds.keys()))
    for tag in tags:
        old, new = before.get(tag), ds.get(tag)
        elem = old if old is not None else new
        rows.append({"tag": f"({tag.group:04X},{tag.element:04X})", "name": elem.name,
                     "before": "(absent)" if old is None else _show(old), "after": _show(new),
                     "changed": _show(old) != _show(new)})
    return rows
