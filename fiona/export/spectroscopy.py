"""The `spectroscopy` export type: only Siemens spectroscopy objects (SOP class
1.3.12.2.1107.5.9.1), in the PURE layout."""

from __future__ import annotations

from .pure import PureExport
from .types import SeriesInput, register

SIEMENS_SPECTROSCOPY = "1.3.12.2.1107.5.9.1"


@register
class SpectroscopyExport(PureExport):
    name = "spectroscopy"
    description = "Siemens spectroscopy objects only, in the PURE layout"

    def wanted(self, series: SeriesInput) -> bool:
        return SIEMENS_SPECTROSCOPY in series.sop_classes
