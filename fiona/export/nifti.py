"""The `nifti` export type: each series converted by dcm2niix, one folder per participant and
event.

dcm2niix (the `dcm2niix` wheel, which ships the binary) runs once per series, without a shell,
on the series' own folder (the collector writes one per series, named by its checked UID) or
else a folder of symbolic links with neutral names, into a temporary folder inside `out`; only
`.nii.gz`, `.json`, `.bval` and `.bvec` are kept. Names are built from values that passed the
exports' one sanitiser (`names.clean`), and `names.place` refuses any target outside `out`, so
no description or participant ID can reach a path unchecked. A series dcm2niix cannot convert
is reported with its reason and the rest is delivered. Series are converted in parallel,
one dcm2niix per CPU (`convert_all`). The `bids` type reuses `convert_series`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dcm2niix

from .dicom import series_folder
from .names import clean, place
from .types import ExportReport, ExportType, SeriesInput, StudyInput, register

log = logging.getLogger(__name__)

#: what dcm2niix writes that an export keeps (NIfTI first: it is what makes an output an image)
KEPT_EXTENSIONS = (".nii.gz", ".json", ".bval", ".bvec")
#: a hung conversion must not hold an export job forever (a 500-image series takes seconds)
TIMEOUT_SECONDS = 1800
#: dcm2niix's base name for a series' outputs inside its own temporary folder; it appends
#: postfixes (echo `_e2`, phase `_ph`, ...) when a series gives more than one image
_BASE = "series"
#: the lines of dcm2niix's output that explain a failure
_REASON = re.compile(r"(?i)error|no valid|unsupported|unable|not supported")


class ConversionError(Exception):
    """dcm2niix could not convert a series; the text is its reason, for the report."""


@dataclass
class Image:
    """One image dcm2niix made from a series, with its sidecars."""

    postfix: str                                  # dcm2niix's postfix ("" for the first image)
    files: dict[str, Path] = field(default_factory=dict)   # extension -> file

    @property
    def nifti(self) -> Path:
        return self.files[".nii.gz"]

    @property
    def safe_postfix(self) -> str:
        """The postfix fit for a file name: "" or `_` and a sanitised part."""
        return f"_{clean(self.postfix)}" if self.postfix else ""


def convert_series(series: SeriesInput, work: Path) -> list[Image]:
    """Convert `series` with dcm2niix inside `work` (an empty folder the caller removes);
    returns the images it made, or raises ConversionError with dcm2niix's reason."""
    if not series.files:
        raise ConversionError("the series has no files")
    target = work / "nifti"
    target.mkdir()
    source = _own_folder(series.files)
    if source is None:
        source = work / "dicom"
        source.mkdir()
        for i, path in enumerate(series.files):
            # neutral link names: dcm2niix needs one folder per series, no file name reaches
            # argv
            (source / f"{i:06d}.dcm").symlink_to(Path(path).resolve())
    argv = [dcm2niix.bin, "-z", "y", "-b", "y", "-ba", "y", "-f", _BASE, "-o", str(target),
            str(source)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"dcm2niix took longer than {TIMEOUT_SECONDS} s") from exc
    images = _images(target)
    if done.returncode != 0 or not images:
        raise ConversionError(_reason(done).replace(str(source), "the series' files"))
    return images


def _own_folder(files: list[Path]) -> Path | None:
    """The folder that holds these files and nothing else (as the export's collector writes
    a series: a folder named by its checked UID), which dcm2niix can read as it is; None
    when there is no such folder."""
    folders = {Path(f).parent for f in files}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    return folder if sorted(os.listdir(folder)) == sorted(Path(f).name for f in files) \
        else None


def convert_all(series: list[SeriesInput], staging: Path
                ) -> Iterator[list[Image] | ConversionError]:
    """`convert_series` of every series, one dcm2niix per CPU at a time (a conversion is
    single-threaded; the series are independent), each in its own folder under `staging`
    (which the caller removes); the results in the order of `series`, as they are ready."""
    def convert(one: SeriesInput) -> list[Image] | ConversionError:
        try:
            return convert_series(one, Path(tempfile.mkdtemp(dir=staging)))
        except ConversionError as exc:
            return exc

    if not series:
        return
    pool = ThreadPoolExecutor(min(len(series), len(os.sched_getaffinity(0))),
                              thread_name_prefix="dcm2niix")
    try:
        yield from pool.map(convert, series)
    finally:  # the caller failed or stopped early: start no further conversion
        pool.shutdown(wait=True, cancel_futures=True)


def _images(folder: Path) -> list[Image]:
    """The kept outputs in `folder`, grouped by base name; groups without a NIfTI dropped."""
    groups: dict[str, Image] = {}
    for path in sorted(folder.iterdir()):
        ext = next((e for e in KEPT_EXTENSIONS if path.name.endswith(e)), None)
        if ext is None or not path.name.startswith(_BASE):
            continue
        postfix = path.name[len(_BASE):-len(ext)]
        groups.setdefault(postfix, Image(postfix)).files[ext] = path
    return [image for image in groups.values() if ".nii.gz" in image.files]


def _reason(done: subprocess.CompletedProcess[str]) -> str:
    """dcm2niix's own explanation of a failure, in one line."""
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines()
             if line.strip()]
    explained = [line for line in lines if _REASON.search(line)]
    detail = "; ".join(explained[-3:] or lines[-1:]) or "no output"
    if done.returncode == 0:
        return f"dcm2niix wrote no NIfTI image ({detail})"
    if done.returncode == 2:
        return f"dcm2niix found no DICOM image it can convert ({detail})"
    return f"dcm2niix failed with exit code {done.returncode} ({detail})"


def place_image(image: Image, out: Path, folder: tuple[str, ...], stem: str,
                report: ExportReport) -> None:
    """Put `image`'s files at `out/<folder...>/<stem><ext>` (every part already `clean`ed),
    adding `-2`, `-3`... to the stem when that name is taken (two studies of one event can
    repeat a series number)."""
    unique, n = stem, 1
    while any(out.joinpath(*folder, unique + ext).exists() for ext in KEPT_EXTENSIONS):
        n += 1
        unique = f"{stem}-{n}"
    for ext, path in image.files.items():
        report.files.append(place(path, out, *folder, unique + ext))


@register
class NiftiExport(ExportType):
    """`<participant>/<event>/<participant>_<event>_<series number>_<description>[_postfix]`
    with `.nii.gz`, `.json`, `.bval`, `.bvec`, all parts sanitised (the postfix is dcm2niix's,
    for series that give several images: echoes, phase...). The series are converted in
parallel and placed in their order, so the names do not depend on which finished first."""

    name = "nifti"
    description = ("NIfTI (dcm2niix) with JSON sidecars, bval/bvec for diffusion; one folder "
                   "per participant and event")

    def build(self, studies: list[StudyInput], out: Path, report: ExportReport) -> None:
        with tempfile.TemporaryDirectory(dir=out, prefix=".dcm2niix-") as staging:
            jobs = [(study, series) for study in studies for series in study.series]
            converted = convert_all([series for _study, series in jobs], Path(staging))
            for (study, series), images in zip(jobs, converted, strict=True):
                participant, event = clean(study.participant), clean(study.event)
                if isinstance(images, ConversionError):
                    report.problems.append(
                        f"{participant}/{event} series {series_folder(series, 4)} "
                        f"({series.uid}): {images}")
                    log.warning("series %s not converted: %s", series.uid, images)
                else:
                    stem = f"{participant}_{event}_{series_folder(series, 4)}"
                    for image in images:
                        place_image(image, out, (participant, event),
                                    stem + image.safe_postfix, report)
                report.done += len(series.files)
