"""The `pure` export type (the original's PURE layout): `<project>/<participant>/
<StudyDate>_<StudyTime>[_<event>]/<SeriesNumber, 4 digits>_<SeriesDescription>/<file>.dcm`,
"unknown" for missing parts, every part through the one sanitiser (`names.clean`)."""

from __future__ import annotations

from pathlib import Path

from .dicom import series_folder
from .names import clean, place, sop_file
from .types import ExportReport, ExportType, SeriesInput, StudyInput, register


@register
class PureExport(ExportType):
    name = "pure"
    description = "DICOM files in the PURE layout (project, participant, study date and time)"

    def wanted(self, series: SeriesInput) -> bool:
        """Which series go into the export (all of them here)."""
        return True

    def build(self, studies: list[StudyInput], out: Path, report: ExportReport) -> None:
        for study in studies:
            visit = f"{clean(study.date)}_{clean(study.time.split('.')[0])}"
            if study.event:
                visit += f"_{clean(study.event)}"
            base = [clean(study.project), clean(study.participant), visit]
            for series in study.series:
                if not self.wanted(series):
                    continue
                for f in series.files:
                    report.files.append(place(f, out, *base, series_folder(series, 4),
                                              sop_file(f)))
                    report.done += 1
