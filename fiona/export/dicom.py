"""The `dicom` export type: `<participant>/<event>/<series number>_<series description>/
<SOP UID>.dcm`."""

from __future__ import annotations

from pathlib import Path

from .names import clean, place, sop_file
from .types import ExportReport, ExportType, SeriesInput, StudyInput, register


def series_folder(series: SeriesInput, digits: int = 0) -> str:
    """`<number>_<description>`, "unknown" for a missing part; `digits` pads the number."""
    number = "unknown" if series.number is None else f"{series.number:0{digits}d}"
    return f"{number}_{clean(series.description)}"


@register
class DicomExport(ExportType):
    name = "dicom"
    description = "DICOM files by participant, event and series"

    def build(self, studies: list[StudyInput], out: Path, report: ExportReport) -> None:
        for study in studies:
            for series in study.series:
                folder = [clean(study.participant), clean(study.event), series_folder(series)]
                for f in series.files:
                    report.files.append(place(f, out, *folder, sop_file(f)))
                    report.done += 1
