"""MPPS steps and scan outcomes, kept durably in the data tree: the one place that reads and
writes them (the MPPS SCP, the pull job and `fiona status` all go through here).

  site/mpps/<SOP Instance UID>.json   one Modality Performed Procedure Step: its status, the
                                      studies it names, when it was created, its attributes
  site/scans/<StudyInstanceUID>.json  the outcome of a scan: finished or failed, and the steps
                                      it concluded

A study is *active* while one of its steps is not concluded by its scan outcome: an N-CREATE is
one atomic file, so a crash never leaves a study half marked, and a new step for a study that
finished before (a rescan) makes it active again.

Old records go with `fiona clear-old-files` (`prunable`, `prune`): steps carry patient names
and IDs and nothing else removes them. A step goes once every study it names has an outcome
that concluded it, all of them older than the cutoff (a step naming no study: once COMPLETED or
DISCONTINUED and older); an outcome goes once it is older and no remaining step names its
study. Steps go before outcomes, so a crash in between leaves at most an outcome nobody needs;
a study never turns active (or stops being active) by pruning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tree import InvalidValue, Tree, atomic_write, ensure_dir, fsync_dir, valid_uid

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
#: a step in one of these states takes no more N-SET
FINAL = frozenset({COMPLETED, DISCONTINUED})
ACTIVE, FINISHED, FAILED = "active", "finished", "failed"


@dataclass
class Step:
    """One MPPS instance."""

    sop: str
    status: str
    studies: list[str]
    created: float
    attributes: dict[str, Any] = field(default_factory=dict)  #: the DICOM JSON model

    def to_json(self) -> bytes:
        return json.dumps({"sop": self.sop, "status": self.status, "studies": self.studies,
                           "created": self.created, "attributes": self.attributes}).encode()


@dataclass
class Pruning:
    """What `Steps.prunable` found: SOP Instance UIDs of steps, StudyInstanceUIDs of outcomes."""

    steps: list[str] = field(default_factory=list)
    scans: list[str] = field(default_factory=list)


class Steps:
    """The steps and scan outcomes of one data tree."""

    def __init__(self, datadir: Path):
        self.tree = Tree(datadir)

    def _step_path(self, sop: str) -> Path:
        return self.tree.mpps / f"{valid_uid(sop, 'SOPInstanceUID')}.json"

    def _scan_path(self, study: str) -> Path:
        return self.tree.scans / f"{valid_uid(study, 'StudyInstanceUID')}.json"

    def get(self, sop: str) -> Step | None:
        try:
            data = json.loads(self._step_path(sop).read_text())
        except FileNotFoundError:
            return None
        return Step(data["sop"], data["status"], data["studies"], data["created"],
                    data["attributes"])

    def put(self, step: Step) -> None:
        """Write `step` atomically and durably (all of it or nothing)."""
        atomic_write(ensure_dir(self.tree.mpps) / f"{valid_uid(step.sop)}.json", step.to_json())

    def all(self) -> list[Step]:
        try:
            names = sorted(e.name for e in os.scandir(self.tree.mpps) if e.name.endswith(".json"))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                step = self.get(name.removesuffix(".json"))
            except (InvalidValue, ValueError, KeyError, OSError):
                continue  # not a step this module wrote: never derive anything from it
            if step is not None:
                out.append(step)
        return out

    def outcome(self, study: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._scan_path(study).read_text())
        except FileNotFoundError:
            return None

    def conclude(self, study: str, state: str, steps: list[str], at: float) -> None:
        """Record the scan of `study` as FINISHED or FAILED, concluding `steps`."""
        data = {"study": study, "state": state, "steps": sorted(steps), "at": at}
        atomic_write(ensure_dir(self.tree.scans) / f"{valid_uid(study)}.json",
                     json.dumps(data).encode())

    def active(self) -> dict[str, list[Step]]:
        """StudyInstanceUID -> its steps, for every study with a step not yet concluded."""
        by_study: dict[str, list[Step]] = {}
        for step in self.all():
            for study in step.studies:
                by_study.setdefault(study, []).append(step)
        out = {}
        for study, steps in by_study.items():
            done = set((self.outcome(study) or {}).get("steps", ()))
            if any(s.sop not in done for s in steps):
                out[study] = steps
        return out

    def counts(self) -> dict[str, int]:
        """Scans by state, for `fiona status`."""
        active = self.active()
        counts = {ACTIVE: len(active), FINISHED: 0, FAILED: 0}
        try:
            names = [e.name for e in os.scandir(self.tree.scans) if e.name.endswith(".json")]
        except FileNotFoundError:
            names = []
        for name in names:
            study = name.removesuffix(".json")
            if study in active:
                continue
            try:
                state = (self.outcome(study) or {}).get("state")
            except (InvalidValue, ValueError, OSError):
                continue
            if state in counts:
                counts[state] += 1
        return counts

    def _outcomes(self) -> dict[str, dict[str, Any]]:
        """Every readable scan outcome, by study."""
        try:
            names = [e.name for e in os.scandir(self.tree.scans) if e.name.endswith(".json")]
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            study = name.removesuffix(".json")
            try:
                data = self.outcome(study)
            except (InvalidValue, ValueError, OSError):
                continue  # not an outcome this module wrote: never derive anything from it
            if isinstance(data, dict) and isinstance(data.get("at"), (int, float)):
                out[study] = data
        return out

    def prunable(self, before: float) -> Pruning:
        """The steps and outcomes that may go: concluded, and older than `before` (epoch
        seconds); never a record of an active study (see the module's docstring)."""
        outcomes = {study: data for study, data in self._outcomes().items()
                    if data["at"] < before}
        pruning, kept = Pruning(), set()
        for step in self.all():
            if step.studies:
                done = all(step.sop in outcomes.get(study, {}).get("steps", ())
                           for study in step.studies)
            else:
                done = step.status in FINAL
            if done and step.created < before:
                pruning.steps.append(step.sop)
            else:
                kept.update(step.studies)
        pruning.scans = sorted(study for study in outcomes if study not in kept)
        return pruning

    def prune(self, pruning: Pruning, before: float) -> None:
        """Remove what `prunable(before)` found, steps first; an outcome written again since
        (a rescan concluded meanwhile) stays."""
        for sop in pruning.steps:
            self._step_path(sop).unlink(missing_ok=True)
        if pruning.steps:
            fsync_dir(self.tree.mpps)
        for study in pruning.scans:
            try:
                outcome = self.outcome(study)
            except (ValueError, OSError):
                continue
            if outcome and outcome.get("at", before) < before:
                self._scan_path(study).unlink()
        if pruning.scans:
            fsync_dir(self.tree.scans)
