"""The Part-10 objects among a set of files (a folder or an unpacked zip from media): each
one read as far as filing needs (file meta, then the data set's UIDs through the receiver's own
`read_header`, which also proves the data set complete). DICOMDIR files are skipped (their
records only point at the images, which are filed themselves); anything else that is not
DICOM is reported by name."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_preamble

from ..deid.pipeline import DICOMDIR_CLASS
from ..receive.store import read_header
from ..tree import InvalidValue, valid_uid


@dataclass(frozen=True)
class Part10:
    """One DICOM object on disk, with what filing it needs."""

    path: Path
    sop_class: str
    sop_instance: str
    study: str
    transfer_syntax: str
    offset: int          #: where the data set starts (after the file meta group)

    def dataset(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read()


@dataclass
class Found:
    objects: list[Part10] = field(default_factory=list)
    not_dicom: list[str] = field(default_factory=list)   #: relative names, for the report
    directories: int = 0                                  #: DICOMDIR files skipped

    @property
    def studies(self) -> list[str]:
        return sorted({o.study for o in self.objects})


class MediaError(ValueError):
    """A DICOM file that cannot be filed (unreadable, invalid UIDs); the text says which."""


def files_under(folder: Path) -> list[Path]:
    """Every regular file under `folder`, links not followed (a link could point anywhere)."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            if path.is_file() and not path.is_symlink():
                out.append(path)
    return out


def read_part10(path: Path) -> Part10 | None:
    """The object at `path`, None when the file is not Part-10 DICOM; MediaError when it is
    DICOM that cannot be filed."""
    with open(path, "rb") as fh:
        try:
            read_preamble(fh, False)
        except Exception:  # pydicom: "not a DICOM file" and short reads
            return None
        try:
            meta = _read_file_meta_info(fh)
            offset = fh.tell()
            sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
            ts = str(meta.get("TransferSyntaxUID", ""))
        except Exception as exc:
            raise MediaError(f"{path.name}: the file meta group cannot be read "
                             f"({type(exc).__name__})") from None
        if sop_class == DICOMDIR_CLASS:
            return Part10(path, sop_class, "", "", ts, offset)
        try:
            header = read_header(fh.read(), ts)
            return Part10(path, valid_uid(sop_class, "MediaStorageSOPClassUID"),
                          valid_uid(header.get("SOPInstanceUID"), "SOPInstanceUID"),
                          valid_uid(header.get("StudyInstanceUID"), "StudyInstanceUID"), ts,
                          offset)
        except InvalidValue as exc:
            raise MediaError(f"{path.name}: {exc}") from None
        except Exception as exc:  # truncated or malformed data sets, as the receiver refuses
            raise MediaError(f"{path.name}: not a complete DICOM data set "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None


def find(paths: Iterable[Path], root: Path) -> Found:
    """The objects among `paths` (names reported relative to `root`)."""
    found = Found()
    for path in paths:
        obj = read_part10(path)
        if obj is None:
            found.not_dicom.append(str(path.relative_to(root)))
        elif obj.sop_class == DICOMDIR_CLASS:
            found.directories += 1
        else:
            found.objects.append(obj)
    return found
