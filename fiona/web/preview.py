"""A preview of de-identification: one image of a study, header values before and after."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path

import pydicom

from ..control.base import Project
from ..deid.pipeline import Pipeline, ProjectRules, settings_for
from ..tree import Tree, valid_uid

PIXEL_DATA = 0x7FE00010


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
            path: Path, labels: Mapping[str, list[str]] | None = None) -> list[dict]:
    """Rows {tag, name, before, after} for every top-level element but pixel data, "after"
    from the forwarder's own pipeline (`fiona.deid.pipeline`), so it cannot drift from what
    is sent: the same drop rules, masking, engine and gate. `labels` are the study's series
    labels (original series UID -> classification labels), which decide the masking."""
    ds = pydicom.dcmread(path)  # not pipeline.read: an admin sees pydicom's own reason
    before = copy.deepcopy(ds)
    pipeline = Pipeline(settings_for(project, participant, event, key, datadir),
                        ProjectRules.of(project, labels))
    result = pipeline.process(ds)
    if result.dropped:
        raise ValueError(f"this object is not sent: {result.dropped}")
    ds = pydicom.dcmread(BytesIO(result.encoded))  # the bytes that would be sent, as sent
    rows = []
    tags = sorted((set(before.keys()) | set(ds.keys())) - {PIXEL_DATA})
    for tag in tags:
        old, new = before.get(tag), ds.get(tag)
        elem = old if old is not None else new
        rows.append({"tag": f"({tag.group:04X},{tag.element:04X})", "name": elem.name,
                     "before": "(absent)" if old is None else _show(old), "after": _show(new),
                     "changed": _show(old) != _show(new)})
    return rows
