"""NoAssign: a study waiting in quarantine (received, not assigned to any project) exported for
a project directly, without a transfer request and without the research PACS.

The objects go through the same de-identification pipeline as the forwarder
(`fiona.deid.pipeline`: drop rules, masking decision and masking, engine, verification gate);
a gate failure hands the study to the quarantine as the forwarder does, and nothing is
exported. The de-identified objects then take the same way as any export (profile, layout,
packing); the caller audits the export.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset

from ..control.base import ControlPlane, ControlPlaneError, Project
from ..deid.gate import GateError
from ..deid.pipeline import (
    MaskingFailed,
    Pipeline,
    ProjectRules,
    Unreadable,
    quarantine_gate_failure,
    read,
    settings_for,
)
from ..tree import Tree, instance_links, valid_uid
from .retrieve import ExportError, Selected


def prepare(control: ControlPlane, tree: Tree, key: bytes, project: str, participant: str | None,
            event: str | None, study: str | None) -> tuple[Project, Selected, Pipeline]:
    """Check the request and build the study's pipeline (ExportError saying what is wrong)."""
    if not study or participant is None or event is None:
        raise ExportError("a NoAssign export needs --study, --participant and --event")
    try:
        proj = control.project(project)
        proj.check_participant(participant)
        proj.check_event(event)
        uid = valid_uid(study, "StudyInstanceUID")
    except (ControlPlaneError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    record = control.study(uid)
    if record is None or not tree.study_raw(uid).is_dir():
        raise ExportError(f"study {uid} is not waiting at this FIONA (not received, or gone "
                          f"from disk)")
    labels = {s.uid: s.classify_types for s in record.series}
    try:
        settings = settings_for(proj, participant, event, key, tree.datadir)
    except ValueError as exc:  # the project's profile is gone or broken
        raise ExportError(f"project {project}: {exc}") from None
    pipeline = Pipeline(settings, ProjectRules.of(proj, labels))
    return proj, Selected(uid, pipeline.mapped_uid(uid), participant, event), pipeline


def labels(pipeline: Pipeline) -> dict[str, list[str]]:
    """De-identified SeriesInstanceUID -> the original series' classification labels."""
    return {pipeline.mapped_uid(uid): list(types) for uid, types in pipeline.rules.labels.items()}


def objects(tree: Tree, pipeline: Pipeline, sel: Selected) -> Iterator[Dataset]:
    """The study's objects de-identified and gated; dropped ones left out."""
    for link in instance_links(tree.study_raw(sel.original)):
        try:
            result = pipeline.process(read(link))
        except Unreadable:
            continue
        except MaskingFailed as exc:
            raise ExportError(f"{exc}; nothing is exported") from None
        except GateError as exc:
            quarantine_gate_failure(tree, exc, f"noassign export {sel.original}\n{link}\n",
                                    {"study_uid": sel.original, "stage": "export"})
            raise ExportError(f"verification gate: {exc}; nothing is exported") from None
        if result.ds is not None:
            yield result.ds
