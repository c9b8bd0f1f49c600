"""The `nifti` and `bids` export types, through the real dcm2niix and the official BIDS
validator (bids-validator-deno), on synthetic MR series labelled by the shipped classify rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomgen import make_study
from fiona.export.bids import BidsExport, BidsRuleError, BidsRules
from fiona.export.nifti import NiftiExport
from fiona.export.types import REGISTRY, ExportReport, SeriesInput, StudyInput
from fiona.index.classify import RuleSet

IMAGES = 12
CLASSIFY = RuleSet.shipped()
VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"


def _series(files: list[Path], description: str | None = None) -> SeriesInput:
    """A SeriesInput for files of one series, labelled as the indexer labels the original."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesInput(uid=ds.SeriesInstanceUID, number=int(ds.SeriesNumber),
                       description=ds.SeriesDescription if description is None else description,
                       files=files, labels=CLASSIFY.classify({}, ds),
                       sop_classes={ds.SOPClassUID})


def _study(folder: Path, n_series: int = 4, seed: int = 0) -> list[SeriesInput]:
    """make_study's series (T1, T2, fMRI without time points, FLAIR), one SeriesInput each."""
    made = make_study(folder, n_series=n_series, images_per_series=IMAGES, seed=seed)
    return [_series(made["files"][i * IMAGES:(i + 1) * IMAGES]) for i in range(n_series)]


def _bold_4d(folder: Path, volumes: int = 3) -> SeriesInput:
    """A resting-state BOLD run: the fMRI series rewritten as `volumes` time points of
    IMAGES/volumes slices (NumberOfTemporalPositions, as a scanner writes it)."""
    made = make_study(folder, n_series=3, images_per_series=IMAGES, seed=7)
    files = made["files"][2 * IMAGES:3 * IMAGES]
    slices = IMAGES // volumes
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        volume, z = divmod(i, slices)
        ds.ImagePositionPatient = [0, 0, float(z)]
        ds.SliceLocation = str(float(z))
        ds.NumberOfTemporalPositions = volumes
        ds.TemporalPositionIdentifier = volume + 1
        ds.AcquisitionNumber = volume + 1
        ds.AcquisitionTime = f"1016{volume * 2:02d}.000000"
        ds.save_as(path)
    return _series(files)


def _dwi(folder: Path) -> SeriesInput:
    """A diffusion series: one b=0 and three b=1000 volumes of three slices each, with the
    standard diffusion attributes dcm2niix turns into .bval/.bvec."""
    made = make_study(folder, n_series=1, images_per_series=12, seed=11)
    directions = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    for i, path in enumerate(made["files"]):
        ds = pydicom.dcmread(path)
        volume, z = divmod(i, 3)
        ds.SeriesDescription, ds.SeriesNumber = "ep2d_diff_3dir", 8
        ds.SequenceName = "ep_b1000#1" if volume else "ep_b0"
        ds.RepetitionTime, ds.EchoTime, ds.PatientPosition = "5000", "80", "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(z)]
        ds.AcquisitionNumber = volume + 1
        ds.DiffusionBValue = 1000.0 if volume else 0.0
        ds.DiffusionGradientOrientation = list(directions[volume])
        ds.DiffusionDirectionality = "DIRECTIONAL" if volume else "NONE"
        ds.save_as(path)
    return _series(made["files"])


def _two_echoes(folder: Path) -> SeriesInput:
    """The T2 series acquired with two echoes: dcm2niix makes one image per echo."""
    made = make_study(folder, n_series=2, images_per_series=IMAGES, seed=13)
    files = made["files"][IMAGES:]
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        echo, z = divmod(i, IMAGES // 2)
        ds.EchoNumbers, ds.EchoTime = echo + 1, str(40.0 + 60 * echo)
        ds.ImagePositionPatient = [0, 0, float(z)]
        ds.save_as(path)
    return _series(files)


def _broken(folder: Path, labels: list[str], number: int = 9) -> SeriesInput:
    """A series dcm2niix cannot convert: its files are not DICOM."""
    folder.mkdir(parents=True)
    files = []
    for i in range(3):
        path = folder / f"{i}.dcm"
        path.write_bytes(b"not a DICOM file " * 20)
        files.append(path)
    return SeriesInput(uid=generate_uid(), number=number, description="broken", files=files,
                       labels=labels)


def _report(studies: list[StudyInput]) -> ExportReport:
    """An empty report with the total the export job sets: every file of every series."""
    return ExportReport(total=sum(len(s.files) for study in studies for s in study.series))


def _inside(root: Path, files: list[Path]) -> None:
    for f in files:
        assert f.resolve().is_relative_to(root.resolve()), f
        assert f.is_file(), f


def _validate(dataset: Path) -> None:
    """The official validator (installed beside this Python by the test extra) accepts it."""
    done = subprocess.run([str(VALIDATOR), str(dataset)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_both_types_are_registered() -> None:
    assert REGISTRY["nifti"] is NiftiExport
    assert REGISTRY["bids"] is BidsExport


def test_nifti_names_series_and_reports_a_failed_one(tmp_path: Path) -> None:
    series = _study(tmp_path / "dicom", n_series=2)
    series += [_broken(tmp_path / "broken", ["T1"]), _dwi(tmp_path / "dwi")]
    out = tmp_path / "out"
    out.mkdir()
    studies = [StudyInput("P1", "P001", "baseline", generate_uid(), series=series)]
    report = _report(studies)
    NiftiExport().build(studies, out, report)

    folder = out / "P001" / "baseline"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["P001_baseline_0001_t1_mprage_sag.json",
                     "P001_baseline_0001_t1_mprage_sag.nii.gz",
                     "P001_baseline_0002_t2_tse_tra.json",
                     "P001_baseline_0002_t2_tse_tra.nii.gz",
                     "P001_baseline_0008_ep2d_diff_3dir.bval",
                     "P001_baseline_0008_ep2d_diff_3dir.bvec",
                     "P001_baseline_0008_ep2d_diff_3dir.json",
                     "P001_baseline_0008_ep2d_diff_3dir.nii.gz"]
    assert sorted(report.files) == sorted(folder / n for n in names)
    assert len(report.problems) == 1
    assert "0009_broken" in report.problems[0] and "dcm2niix" in report.problems[0]
    assert "no DICOM" in report.problems[0] and str(out) not in report.problems[0]
    assert report.done == report.total == 3 * IMAGES + 3
    bvals = (folder / "P001_baseline_0008_ep2d_diff_3dir.bval").read_text().split()
    assert [float(b) for b in bvals] == [0, 1000, 1000, 1000]
    assert sorted(p.name for p in out.iterdir()) == ["P001"]   # no temporary folder left
    sidecar = json.loads((folder / "P001_baseline_0001_t1_mprage_sag.json").read_text())
    assert sidecar["SeriesNumber"] == 1


def test_hostile_names_cannot_leave_the_export(tmp_path: Path) -> None:
    series = _study(tmp_path / "dicom", n_series=2)
    series[0].description = "../../../../escaped"
    series[1].description = "/etc/passwd\\..\x00"
    study = StudyInput("P1", "../../../escaped", "/tmp/../..", generate_uid(), series=series)
    for kind in (NiftiExport(), BidsExport()):
        out = tmp_path / kind.name
        out.mkdir()
        report = _report([study])
        kind.build([study], out, report)
        assert len([f for f in report.files if f.name.endswith(".nii.gz")]) == 2, report.problems
        _inside(out, report.files)
        written = [p for p in out.rglob("*") if p.is_file()]
        assert sorted(written) == sorted(report.files)
        assert not any(part.startswith(".") for p in written for part in p.relative_to(out).parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bids", "dicom", "nifti"]
    assert (tmp_path / "bids" / "sub-escaped" / "ses-tmp" / "anat"
            / "sub-escaped_ses-tmp_T1w.nii.gz").is_file()


def test_bids_dataset_is_valid(tmp_path: Path) -> None:
    t1, t2, bold_3d, flair = _study(tmp_path / "a")
    t1_again = _study(tmp_path / "b", n_series=1, seed=1)[0]
    t1_again.number = 5
    bold = _bold_4d(tmp_path / "c")
    bold.number = 6
    broken = _broken(tmp_path / "broken", ["T1"], number=7)
    dwi = _dwi(tmp_path / "e")
    assert "fMRI" in bold.labels and "fMRI" not in bold_3d.labels
    assert {"FLAIR", "T2"} <= set(flair.labels)
    other = _study(tmp_path / "d", n_series=1, seed=2)
    studies = [StudyInput("P1", "P-001", "baseline", generate_uid(),
                          series=[t1, t2, bold_3d, flair, t1_again, bold, broken, dwi]),
               StudyInput("P1", "P-002", "follow_up 1", generate_uid(), series=other)]
    out = tmp_path / "out"
    out.mkdir()
    report = _report(studies)
    BidsExport().build(studies, out, report)

    _validate(out)
    anat = out / "sub-P001" / "ses-baseline" / "anat"
    func = out / "sub-P001" / "ses-baseline" / "func"
    assert sorted(p.name for p in anat.iterdir()) == sorted(
        f"sub-P001_ses-baseline_{name}{ext}" for ext in (".json", ".nii.gz")
        for name in ("run-1_T1w", "run-2_T1w", "T2w", "FLAIR"))   # FLAIR is not a second T2w
    assert sorted(p.name for p in func.iterdir()) == [
        "sub-P001_ses-baseline_task-rest_bold.json", "sub-P001_ses-baseline_task-rest_bold.nii.gz"]
    assert sorted(p.name for p in (anat.parent / "dwi").iterdir()) == [
        f"sub-P001_ses-baseline_dwi{ext}" for ext in (".bval", ".bvec", ".json", ".nii.gz")]
    assert json.loads((func / "sub-P001_ses-baseline_task-rest_bold.json").read_text())[
        "TaskName"] == "rest"
    assert (out / "sub-P002" / "ses-followup1" / "anat" / "sub-P002_ses-followup1_T1w.nii.gz"
            ).is_file()
    assert (out / "participants.tsv").read_text() == "participant_id\nsub-P001\nsub-P002\n"
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "raw"

    problems = "\n".join(report.problems)
    assert len(report.problems) == 2, problems
    assert f"0003_ep2d_bold_rest ({bold_3d.uid}): not exported, no BIDS rule" in problems
    assert "0007_broken" in problems and "dcm2niix" in problems
    assert report.done == report.total == sum(len(s.files) for st in studies for s in st.series)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_description.json", "participants.tsv", "sub-P001", "sub-P002"]


def test_bids_labels_that_collide_after_cleaning_are_reported_not_merged(tmp_path: Path) -> None:
    studies = [StudyInput("P1", pid, event, generate_uid(),
                          series=_study(tmp_path / f"s{i}", n_series=1, seed=i))
               for i, (pid, event) in enumerate([("P-01", "base"), ("P01", "base"),
                                                 ("P02", "visit-1"), ("P02", "visit1"),
                                                 ("P02", "visit2"), ("---", "base")])]
    out = tmp_path / "out"
    out.mkdir()
    report = _report(studies)
    BidsExport().build(studies, out, report)

    _validate(out)
    assert [p.name for p in out.glob("sub-*/ses-*")] == ["ses-visit2"]
    problems = "\n".join(report.problems)
    assert len(report.problems) == 5, problems
    assert problems.count("would all be sub-P01") == 2
    assert problems.count("would all be ses-visit1") == 2
    assert "'---' has no letter or digit" in problems
    assert report.done == report.total == 6 * IMAGES


def test_bids_rules_come_from_the_site_override(tmp_path: Path) -> None:
    (tmp_path / "site" / "config").mkdir(parents=True)
    (tmp_path / "site" / "config" / "bids.json").write_text(json.dumps({"rules": [
        {"labels": ["T2", "axial"], "datatype": "anat", "suffix": "T2w", "acq": "tra"}]}))
    series = _study(tmp_path / "dicom", n_series=2)
    out = tmp_path / "out"
    out.mkdir()
    studies = [StudyInput("P1", "P1", "E1", generate_uid(), series=series)]
    report = _report(studies)
    REGISTRY["bids"](tmp_path / "site").build(studies, out, report)   # as the export job does

    _validate(out)
    assert (out / "sub-P1" / "ses-E1" / "anat" / "sub-P1_ses-E1_acq-tra_T2w.nii.gz").is_file()
    assert len(report.problems) == 1 and "t1_mprage_sag" in report.problems[0]


@pytest.mark.parametrize(("rules", "message"), [
    ({"rules": [{"labels": ["T1"], "datatype": "anatomy", "suffix": "T1w"}]}, "'datatype'"),
    ({"rules": [{"labels": ["T1"], "datatype": "anat", "suffix": "T1w/../x"}]}, "'suffix'"),
    ({"rules": [{"labels": ["T1"], "datatype": "anat", "suffix": "T1w", "task": "x"}]},
     "func only"),
    ({"rules": [{"labels": [], "datatype": "anat", "suffix": "T1w"}]}, "'labels'"),
    ({"rules": [{"labels": ["T1"], "datatype": "anat", "suffix": "T1w", "sufix": "x"}]},
     "unknown key"),
    ({"rule": []}, "'rules' list"),
])
def test_a_bad_bids_rule_file_is_refused_with_its_reason(tmp_path: Path, rules: dict,
                                                         message: str) -> None:
    path = tmp_path / "bids.json"
    path.write_text(json.dumps(rules))
    with pytest.raises(BidsRuleError, match=message) as caught:
        BidsRules.load(path)
    assert str(path) in str(caught.value)


def test_the_shipped_rules_load_and_name_the_default_labels() -> None:
    rules = BidsRules.for_site(None)
    suffixes = {label: rules.match([label]) for label in ("T1", "T2", "FLAIR", "DWI", "fMRI")}
    assert {k: getattr(v, "suffix", v) for k, v in suffixes.items()} == {
        "T1": "T1w", "T2": "T2w", "FLAIR": "FLAIR", "DWI": "dwi", "fMRI": "bold"}
    assert isinstance(rules.match(["T1", "localizer"]), str)


def test_a_series_with_several_images(tmp_path: Path) -> None:
    """nifti keeps each echo under dcm2niix's postfix; bids reports the series, since its rule
    names one image."""
    series = _two_echoes(tmp_path / "dicom")
    assert "T2" in series.labels
    studies = [StudyInput("P1", "P1", "E1", generate_uid(), series=[series])]
    out = tmp_path / "nifti"
    out.mkdir()
    report = _report(studies)
    NiftiExport().build(studies, out, report)
    assert sorted(p.name for p in report.files) == sorted(
        f"P1_E1_0002_t2_tse_tra_e{echo}{ext}" for echo in (1, 2) for ext in (".json", ".nii.gz"))
    assert not report.problems

    out = tmp_path / "bids"
    out.mkdir()
    report = _report(studies)
    BidsExport().build(studies, out, report)
    assert not list(out.iterdir()) and not report.files
    assert len(report.problems) == 2, report.problems
    assert "dcm2niix made 2 images" in report.problems[0]
    assert "no dataset written" in report.problems[1]
