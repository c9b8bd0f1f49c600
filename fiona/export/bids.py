"""The `bids` export type: a BIDS dataset (`dataset_description.json`, `participants.tsv`,
`sub-<participant>/ses-<event>/<datatype>/sub-…_ses-…[_task-…][_acq-…][_run-…]_<suffix>.nii.gz`
with JSON sidecars, and `.bval`/`.bvec` for dwi).

Which BIDS name a series gets is data, not code: `bids.json` (shipped with the package, a site
may override it with DATADIR/config/bids.json) maps the classification labels of the original
series (de-identification removes the descriptions they were found from) to a datatype and a
suffix. A series no rule names is listed in the report, never guessed: a wrong suffix in a BIDS
dataset silently feeds the wrong images into a pipeline. Participant and event become BIDS
labels (letters and digits only); two that collide after cleaning are reported, never merged.
Two series that get the same name are numbered as runs, in series-number order.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .. import __version__
from ..tree import Tree
from .dicom import series_folder
from .names import place
from .nifti import ConversionError, Image, convert_series
from .types import ExportReport, ExportType, SeriesInput, StudyInput, register

log = logging.getLogger(__name__)

SHIPPED_RULES = resources.files("fiona.export") / "bids.json"
SITE_RULES = "bids.json"                 # under DATADIR/config
BIDS_VERSION = "1.9.0"
DATATYPES = ("anat", "dwi", "func", "fmap", "perf")
DEFAULT_TASK = "rest"
_RULE_KEYS = {"labels", "datatype", "suffix", "task", "acq"}
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


class BidsRuleError(ValueError):
    """bids.json is malformed; the text names the file and the rule."""


def bids_label(value: object) -> str:
    """`value` as a BIDS label: ASCII letters and digits only ("" when nothing is left)."""
    return _NOT_ALNUM.sub("", "" if value is None else str(value))


@dataclass(frozen=True)
class Rule:
    """Series whose labels include all of `labels` become `<datatype>/…_<suffix>`."""

    labels: frozenset[str]
    datatype: str
    suffix: str
    task: str = ""                       # func only
    acq: str = ""


@dataclass(frozen=True)
class BidsRules:
    """The ordered rules of a bids.json and the labels that exclude a series."""

    rules: tuple[Rule, ...]
    exclude: frozenset[str]

    @classmethod
    def load(cls, path: Path | Traversable) -> BidsRules:
        """Read and check a bids.json; BidsRuleError names what is wrong."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BidsRuleError(f"{path}: cannot read BIDS rules: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list):
            raise BidsRuleError(f"{path}: expected an object with a 'rules' list")
        exclude = raw.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
            raise BidsRuleError(f"{path}: 'exclude' must be a list of labels")
        rules = tuple(_rule(r, f"{path}: rule {i + 1}") for i, r in enumerate(raw["rules"]))
        return cls(rules, frozenset(exclude))

    @classmethod
    def for_site(cls, datadir: Path | None) -> BidsRules:
        """DATADIR/config/bids.json when the site has one, else the shipped rules."""
        if datadir is not None and (site := Tree(datadir).config / SITE_RULES).exists():
            return cls.load(site)
        return cls.load(SHIPPED_RULES)

    def match(self, labels: Iterable[str]) -> Rule | str:
        """The first rule for a series with these labels, or why there is none."""
        have = set(labels)
        if excluded := sorted(have & self.exclude):
            return f"excluded by its label {', '.join(excluded)}"
        for rule in self.rules:
            if rule.labels <= have:
                return rule
        return f"no BIDS rule for its labels ({', '.join(sorted(have)) or 'none'})"


def _rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise BidsRuleError(f"{where}: expected an object")
    if unknown := set(raw) - _RULE_KEYS:
        raise BidsRuleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    labels = raw.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise BidsRuleError(f"{where}: 'labels' must be a non-empty list of labels")
    if raw.get("datatype") not in DATATYPES:
        raise BidsRuleError(f"{where}: 'datatype' must be one of {', '.join(DATATYPES)}")
    task = raw.get("task", DEFAULT_TASK if raw["datatype"] == "func" else "")
    if task and raw["datatype"] != "func":
        raise BidsRuleError(f"{where}: 'task' is for datatype func only")
    for key, value in (("suffix", raw.get("suffix")), ("task", task), ("acq", raw.get("acq"))):
        if (key == "suffix" or value is not None) and (
                not isinstance(value, str) or (value and bids_label(value) != value)
                or (key == "suffix" and not value)):
            raise BidsRuleError(f"{where}: '{key}' must be letters and digits only")
    return Rule(frozenset(labels), raw["datatype"], raw["suffix"], task, raw.get("acq") or "")


@dataclass
class _Converted:
    """A series converted in the staging folder, waiting for its run number."""

    sub: str
    ses: str
    rule: Rule
    image: Image
    order: tuple[int, int]               # study, series number: the run order


@register
class BidsExport(ExportType):
    name = "bids"
    description = ("BIDS dataset (NIfTI by dcm2niix, JSON sidecars) with series named by the "
                   "site's BIDS rules from their classification")

    def __init__(self, datadir: Path | None = None, rules: BidsRules | None = None) -> None:
        """`rules`, else the site's bids.json under `datadir`, else the shipped rules (read
        now, so a broken site file fails the job before anything is retrieved)."""
        super().__init__(datadir)
        self.rules = rules or BidsRules.for_site(datadir)

    def build(self, studies: list[StudyInput], out: Path, report: ExportReport) -> None:
        converted: list[_Converted] = []
        with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
            for index, (study, sub, ses) in enumerate(_labelled(studies, report)):
                for series in study.series:
                    where = f"sub-{sub}/ses-{ses} series {series_folder(series, 4)} ({series.uid})"
                    found = self._convert(series, Path(staging), where, report)
                    if found is not None:
                        rule, image = found
                        order = (index, series.number if series.number is not None else -1)
                        converted.append(_Converted(sub, ses, rule, image, order))
                    report.done += len(series.files)
            self._place(converted, out, report)
        if subjects := sorted({c.sub for c in converted}):
            self._describe(studies, subjects, out, report)
        else:   # no dataset at all: the job then fails with these problems, offers no empty zip
            report.problems.append("no series could be named in BIDS: no dataset written")

    def _convert(self, series: SeriesInput, staging: Path, where: str,
                 report: ExportReport) -> tuple[Rule, Image] | None:
        """The rule and the one image of a series, or None with the reason in the report."""
        rule = self.rules.match(series.labels)
        if isinstance(rule, str):
            report.problems.append(f"{where}: not exported, {rule}")
            return None
        work = Path(tempfile.mkdtemp(dir=staging))
        try:
            images = convert_series(series, work)
        except ConversionError as exc:
            report.problems.append(f"{where}: {exc}")
            log.warning("series %s not converted: %s", series.uid, exc)
            return None
        if len(images) != 1:
            report.problems.append(f"{where}: not exported, dcm2niix made {len(images)} images "
                                   f"(echoes, phase...), which BIDS rule {rule.suffix} does not "
                                   f"tell apart")
            return None
        if rule.datatype == "dwi" and not {".bval", ".bvec"} <= set(images[0].files):
            report.problems.append(f"{where}: not exported, dcm2niix found no diffusion "
                                   f"gradients for this dwi series")
            return None
        return rule, images[0]

    def _place(self, converted: list[_Converted], out: Path, report: ExportReport) -> None:
        """Name each converted series, with run numbers where names repeat, and move it."""
        groups: dict[tuple[str, ...], list[_Converted]] = defaultdict(list)
        for c in converted:
            groups[(c.sub, c.ses, c.rule.datatype, c.rule.task, c.rule.acq,
                    c.rule.suffix)].append(c)
        for group in groups.values():
            group.sort(key=lambda c: c.order)
            for run, c in enumerate(group, start=1):
                entities = [f"sub-{c.sub}", f"ses-{c.ses}"]
                entities += [f"task-{c.rule.task}"] if c.rule.task else []
                entities += [f"acq-{c.rule.acq}"] if c.rule.acq else []
                entities += [f"run-{run}"] if len(group) > 1 else []
                stem = "_".join([*entities, c.rule.suffix])
                if c.rule.task:
                    _add_task_name(c.image, c.rule.task)
                for ext, path in c.image.files.items():
                    report.files.append(place(path, out, f"sub-{c.sub}", f"ses-{c.ses}",
                                              c.rule.datatype, stem + ext))

    def _describe(self, studies: list[StudyInput], subjects: list[str], out: Path,
                  report: ExportReport) -> None:
        """dataset_description.json and participants.tsv."""
        projects = sorted({s.project for s in studies})
        description = {
            "Name": f"FIONA export of {', '.join(projects) or 'no project'}",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": "FIONA", "Version": __version__,
                             "Description": "de-identified DICOM converted by dcm2niix"}],
        }
        path = out / "dataset_description.json"
        path.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        report.files.append(path)
        path = out / "participants.tsv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["participant_id"])
            writer.writerows([f"sub-{sub}"] for sub in subjects)
        report.files.append(path)


def _labelled(studies: list[StudyInput],
              report: ExportReport) -> list[tuple[StudyInput, str, str]]:
    """Studies with their BIDS participant and session labels. A study whose participant or
    event has no letter or digit, or whose label another participant (or, for one participant,
    another event) also gets after cleaning, is reported and left out, never merged."""
    subs: dict[str, set[str]] = defaultdict(set)
    sessions: dict[tuple[str, str], set[str]] = defaultdict(set)
    for study in studies:
        sub, ses = bids_label(study.participant), bids_label(study.event)
        subs[sub].add(study.participant)
        sessions[(sub, ses)].add(study.event)
    kept = []
    for study in studies:
        sub, ses = bids_label(study.participant), bids_label(study.event)
        if not sub:
            reason = f"participant {study.participant[:40]!r} has no letter or digit"
        elif len(subs[sub]) > 1:
            reason = f"participants {_shown(subs[sub])} would all be sub-{sub}"
        elif not ses:
            reason = f"event {study.event[:40]!r} has no letter or digit"
        elif len(sessions[(sub, ses)]) > 1:
            reason = f"events {_shown(sessions[(sub, ses)])} of sub-{sub} would all be ses-{ses}"
        else:
            kept.append((study, sub, ses))
            continue
        report.problems.append(f"study {study.uid}: not exported, {reason} (not merged)")
        report.done += sum(len(s.files) for s in study.series)
    return kept


def _shown(values: set[str]) -> str:
    return ", ".join(repr(v[:40]) for v in sorted(values))


def _add_task_name(image: Image, task: str) -> None:
    """BIDS requires TaskName in a func sidecar; dcm2niix cannot know it."""
    stem = image.nifti.name[:-len(".nii.gz")]
    sidecar = image.files.setdefault(".json", image.nifti.with_name(stem + ".json"))
    meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {}
    meta["TaskName"] = task
    sidecar.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
