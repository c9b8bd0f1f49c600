"""Whole-slide images to DICOM VL Whole Slide Microscopy with wsidicomizer.

The label image and the overview (macro) image are never converted unless the project allows
the overview: both are photographs of the slide and carry names and barcodes. The thumbnail
is left out as well (it is made from the image and adds nothing). The pathology metadata of
the form (specimen, block, slide number, stain, biopsy id) becomes the slide's specimen
description; the participant ID is the patient, the only identity the objects carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .kinds import WSI_EXTENSIONS


class ConversionError(RuntimeError):
    """wsidicomizer could not convert the file; the text is its reason."""


@dataclass(frozen=True)
class Pathology:
    """The form's pathology metadata (all optional, free text)."""

    specimen: str = ""       #: what the specimen is, e.g. "colon biopsy"
    block: str = ""
    slide: str = ""          #: slide number
    stain: str = ""          #: e.g. "hematoxylin and eosin"
    biopsy: str = ""         #: the biopsy (specimen) identifier

    @classmethod
    def from_dict(cls, data: dict) -> Pathology:
        return cls(**{k: str(data.get(k, "") or "").strip()[:64] for k in
                      ("specimen", "block", "slide", "stain", "biopsy")})


def slide_file(paths: list[Path]) -> Path:
    """The file wsidicomizer opens among an upload's files: the slide itself, or a MIRAX
    slide's .mrxs beside its data folder."""
    slides = [p for p in paths if p.suffix.lower() == ".mrxs"] or \
        [p for p in paths if p.suffix.lower() in WSI_EXTENSIONS]
    if len(slides) != 1:
        raise ConversionError(f"expected one slide file in the upload, found {len(slides)}")
    return slides[0]


def _metadata(participant: str, info: Pathology):
    from wsidicom.metadata import (
        Equipment,
        Image,
        Label,
        Patient,
        Pyramid,
        Series,
        Slide,
        Study,
        WsiMetadata,
    )
    from wsidicom.metadata.sample import SlideSample, Specimen, Staining

    samples = []
    if info.block or info.biopsy or info.specimen:
        parent = Specimen(identifier=info.biopsy or "specimen").sample() \
            if info.biopsy else None
        samples.append(SlideSample(identifier=info.block or info.biopsy or "sample",
                                   sampled_from=parent,
                                   short_description=info.specimen or None))
    slide = Slide(identifier=info.slide or None,
                  stainings=[Staining(substances=info.stain)] if info.stain else None,
                  samples=samples or None)
    return WsiMetadata(study=Study(), series=Series(),
                       patient=Patient(name=participant, identifier=participant),
                       equipment=Equipment(), slide=slide,
                       pyramid=Pyramid(image=Image(), optical_paths=[]), label=Label())


def convert(source: Path, out: Path, participant: str, info: Pathology,
            with_overview: bool = False) -> list[Path]:
    """Convert `source` into DICOM files under `out` (an empty folder); ConversionError with
    wsidicomizer's reason when it cannot."""
    from wsidicomizer import WsiDicomizer

    try:
        made = WsiDicomizer.convert(source, out, metadata=_metadata(participant, info),
                                    include_label=False, include_overview=with_overview,
                                    include_thumbnail=False, workers=1)
    except Exception as exc:  # the converter and its openers raise every kind
        raise ConversionError(f"wsidicomizer cannot convert {source.name}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None
    if not made:
        raise ConversionError(f"wsidicomizer made no image of {source.name}")
    return [Path(p) for p in made]
