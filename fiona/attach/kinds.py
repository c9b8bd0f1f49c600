"""What an attached file is: decided by its content, checked against its name, so that a file
whose extension lies is refused with a clear message before anything is stored."""

from __future__ import annotations

from pathlib import Path

MEDIA, WSI, PDF, IMAGE = "dicom", "wsi", "pdf", "image"
KIND_NAMES = {MEDIA: "DICOM (media)", WSI: "whole-slide image", PDF: "PDF document",
              IMAGE: "image"}

#: extension -> (kind, content signature name)
_EXTENSIONS = {
    ".zip": (None, "zip"), ".dcm": (MEDIA, "dicom"), ".dicom": (MEDIA, "dicom"),
    ".svs": (WSI, "tiff"), ".ndpi": (WSI, "tiff"), ".tif": (WSI, "tiff"), ".tiff": (WSI, "tiff"),
    ".scn": (WSI, "tiff"), ".bif": (WSI, "tiff"), ".czi": (WSI, "czi"),
    ".pdf": (PDF, "pdf"), ".png": (IMAGE, "png"), ".jpg": (IMAGE, "jpeg"),
    ".jpeg": (IMAGE, "jpeg"),
}
WSI_EXTENSIONS = frozenset(e for e, (k, _s) in _EXTENSIONS.items() if k == WSI) | {".mrxs"}


class KindError(ValueError):
    """The file is not what its name says, or of no kind Attach takes; the text says which."""


def _signature(head: bytes) -> str:
    """The content's type from its first bytes ("" when unknown)."""
    if head[128:132] == b"DICM":
        return "dicom"
    for magic, name in ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"%PDF-", "pdf"),
                        (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"),
                        (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"II+\x00", "tiff"),
                        (b"MM\x00+", "tiff"), (b"ZISRAWFILE", "czi")):
        if head.startswith(magic):
            return name
    return ""


def read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(132)


def detect(path: Path, name: str) -> str:
    """The kind of the file at `path` uploaded as `name` (MEDIA for a zip: `archive` decides
    between media and a zipped MIRAX slide). A DICOM file may have no extension (media often
    name them IM0001); every other kind needs its extension and the matching content."""
    found = _signature(read_head(path))
    suffix = Path(name).suffix.lower()
    if suffix in _EXTENSIONS:
        kind, expected = _EXTENSIONS[suffix]
        if found != expected:
            raise KindError(f"{name} is not a {expected.upper()} file, although its name ends "
                            f"in {suffix}" + (f" (its content is {found.upper()})" if found
                                              else " (its content is of no known kind)"))
        return kind or MEDIA
    if found == "dicom":
        return MEDIA
    if suffix == ".mrxs":
        raise KindError(f"{name}: a MIRAX slide is read with its data folder; upload both "
                        f"in one zip archive")
    raise KindError(f"{name}: Attach takes DICOM files, zip archives, whole-slide images "
                    f"({', '.join(sorted(WSI_EXTENSIONS))}), PDF, PNG and JPEG; "
                    f"this file is none of them")
