"""Zip archives from media, extracted only after every entry was checked: an entry whose path
is absolute, climbs out with `..`, is a link or a device, or an archive that unpacks to more
than the upload limit, refuses the whole archive before one byte is written ("zip slip")."""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from ..tree import ensure_dir

CHUNK = 1 << 20


class ArchiveError(ValueError):
    """The archive is refused; the text names the entry and why."""


def _checked_name(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"the archive entry {info.filename!r} has an absolute path; "
                           f"nothing was stored")
    if ".." in path.parts:
        raise ArchiveError(f"the archive entry {info.filename!r} leaves the upload folder "
                           f"(..); nothing was stored")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(f"the archive entry {info.filename!r} is a link or special file; "
                           f"nothing was stored")
    return path


def extract(zip_path: Path, dest: Path, max_bytes: int) -> list[Path]:
    """Check every entry, then extract the files under `dest` (streamed, never whole in
    memory); returns them. ArchiveError when the archive is refused or unreadable."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            entries = [(info, _checked_name(info)) for info in zf.infolist()]
            total = sum(info.file_size for info, _ in entries)
            if total > max_bytes:
                raise ArchiveError(f"the archive unpacks to {total} bytes, above the upload "
                                   f"limit of {max_bytes}; nothing was stored")
            out = []
            for info, rel in entries:
                if info.is_dir() or not rel.parts:
                    continue
                target = dest.joinpath(*rel.parts)
                ensure_dir(target.parent)
                with zf.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                out.append(target)
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise ArchiveError(f"the zip archive cannot be read ({exc}); nothing was stored") \
            from None
    except FileExistsError as exc:
        raise ArchiveError(f"the archive holds {Path(exc.filename or '').name!r} twice; "
                           f"nothing was stored") from None
    except OSError as exc:  # a name the file system refuses (too long ...), a full disk
        raise ArchiveError(f"the archive cannot be unpacked at "
                           f"{Path(exc.filename or '').name!r} ({exc.strerror}); nothing was "
                           f"stored") from None
