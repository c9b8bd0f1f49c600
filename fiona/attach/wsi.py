"""Whole-slide images to DICOM VL Whole Slide Microscopy with wsidicomizer.

The label image and the overview (macro) image are never converted unless the project allows
the overview: both are photographs of the slide and carry names and barcodes. The thumbnail
is left out as well (it is made from the image and adds nothing). The pathology metadata of
the form (specimen, block, slide number, stain, biopsy id) becomes the slide's specimen
description; the participant ID is the patient, the only identity the objects carry.

The stain is written as codes wherever the form's text names stains of DICOM CID 8112 ("H&E"
is hematoxylin stain and water soluble eosin stain), because coded content is what the
de-identification keeps (`fiona.deid.specimen`); a part it cannot name stays text, which the
de-identification drops. The biopsy id is the identifier of the specimen the block was cut
from (dissection of a tissue specimen, then block sectioning into the slide), so it is in the
DICOM as the pathology department wrote it, and de-identification replaces it with a keyed
value.

The conversion runs in a child process of its own (spawned, not forked): importing wsidicomizer
switches pydicom, process-wide, to its future behaviour (`config.future_behavior()`: invalid
values raise, deprecated methods are gone), which would break every other reader and writer of
the process it runs in (the web server's preview, a hostile UID that must be quarantined, not
raised). A crash in the native slide readers then ends the child, not the web server.
"""

from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
        if not isinstance(data, dict):  # a client's JSON may hold anything
            raise ValueError("the pathology must be an object of named fields")
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


#: usual short names of stains (lower case) -> CID 8112 meanings
_STAIN_NAMES = {"h&e": ("hematoxylin stain", "water soluble eosin stain"),
                "he": ("hematoxylin stain", "water soluble eosin stain"),
                "hematoxylin": ("hematoxylin stain",), "haematoxylin": ("hematoxylin stain",),
                "eosin": ("water soluble eosin stain",), "pas": ("periodic acid Schiff stain",)}
_STAIN_SPLIT = re.compile(r"\s*(?:,|;|\+|/|\band\b)\s*", re.IGNORECASE)


def stain_substances(text: str) -> list:
    """The form's stain as CID 8112 codes (`SpecimenStainsCode`), each part that names none
    kept as its text: "H&E", "hematoxylin and eosin", "hematoxylin stain, PAS"."""
    from wsidicom.conceptcode import SpecimenStainsCode

    meanings = {m.lower(): m for m in SpecimenStainsCode.list()}
    whole = _STAIN_NAMES.get(text.strip().lower())
    parts = [text.strip()] if whole else [p for p in _STAIN_SPLIT.split(text) if p.strip()]
    out: list = []
    for part in parts:
        key = part.strip().lower()
        names = _STAIN_NAMES.get(key) or ((meanings[key],) if key in meanings else ()) or \
            ((meanings[key + " stain"],) if key + " stain" in meanings else ())
        out += [SpecimenStainsCode(n) for n in names] if names else [part.strip()]
    return out


def _metadata(participant: str, info: Pathology):
    from wsidicom.conceptcode import (
        AnatomicPathologySpecimenTypesCode,
        SpecimenSamplingProcedureCode,
    )
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
    from wsidicom.metadata.sample import Sample, SlideSample, Specimen, Staining

    samples = []
    if info.block or info.biopsy or info.specimen:
        sampling = None
        tissue = AnatomicPathologySpecimenTypesCode("tissue specimen")
        if info.biopsy:
            sampling = Specimen(identifier=info.biopsy, type=tissue).sample(
                method=SpecimenSamplingProcedureCode("Dissection"))
            if info.block:
                sampling = Sample(identifier=info.block, type=tissue, sampled_from=[sampling]
                                  ).sample(method=SpecimenSamplingProcedureCode("Block sectioning"))
        parent = info.block or info.biopsy or "sample"
        samples.append(SlideSample(identifier=f"{parent}-{info.slide}" if info.slide else parent,
                                   sampled_from=sampling,
                                   short_description=info.specimen or None))
    stainings = [Staining(substances=stain_substances(info.stain))] if info.stain else None
    slide = Slide(identifier=info.slide or None, stainings=stainings,
                  samples=samples or None)
    return WsiMetadata(study=Study(), series=Series(),
                       patient=Patient(name=participant, identifier=participant),
                       equipment=Equipment(), slide=slide,
                       pyramid=Pyramid(image=Image(), optical_paths=[]), label=Label())


def convert(source: Path, out: Path, participant: str, info: Pathology,
            with_overview: bool = False) -> list[Path]:
    """Convert `source` into DICOM files under `out` (an empty folder) in a child process;
    ConversionError with wsidicomizer's reason when it cannot."""
    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as child:
        try:
            return child.submit(_convert, source, out, participant, info,
                                with_overview).result()
        except BrokenProcessPool:
            raise ConversionError(f"wsidicomizer cannot convert {source.name}: the converter "
                                  "crashed (a damaged or unsupported file)") from None


def _convert(source: Path, out: Path, participant: str, info: Pathology,
             with_overview: bool) -> list[Path]:
    """The conversion itself, in the child process."""
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
