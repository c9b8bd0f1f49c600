"""The one sanitiser for every file or folder name an export makes from a DICOM value
(participant, event, series description, dates, UIDs).

A name keeps letters A-Z/a-z, digits, `_` and æøåÆØÅ; every other character (`/`, `\\`, `.`,
NUL, spaces, `-`, other scripts) becomes `_`, runs of `_` collapse and the name is cut to
MAX_LEN characters. With no dot and no separator left, a name can never be `..`, absolute or
hidden, so nothing built from it leaves the export folder. Empty becomes "unknown".
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..tree import valid_uid

MAX_LEN = 64
UNKNOWN = "unknown"
_OTHER = re.compile(r"[^A-Za-z0-9_æøåÆØÅ]+")


def clean(value: object, default: str = UNKNOWN, max_len: int = MAX_LEN) -> str:
    """`value` as one safe path component (see the module doc)."""
    text = "" if value is None else str(value)
    text = _OTHER.sub("_", text.strip("\x00 ")).strip("_")[:max_len].strip("_")
    return text or default


def place(src: Path, out: Path, *parts: str) -> Path:
    """Copy `src` to `out/<parts...>` (each part already `clean`ed or a checked UID file
    name), hard-linking where the file system allows; refuses any target outside `out`."""
    target = out.joinpath(*parts)
    if not target.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"export name {'/'.join(parts)!r} would leave the export folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, target)
    except OSError:
        shutil.copyfile(src, target)
    return target


def sop_file(path: Path) -> str:
    """`<SOPInstanceUID>.dcm` for a retrieved instance (named by its checked UID)."""
    return f"{valid_uid(path.stem, 'SOPInstanceUID')}.dcm"
