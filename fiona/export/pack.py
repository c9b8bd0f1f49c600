"""One zip per export: the layout, a README.txt and a manifest inside, `<zip>.sha256` and the
manifest beside it.

The zip is written under a temporary name in the export's work folder (inside the data tree)
and renamed to its final name as the last step, after its `.sha256` and manifest are in
place: a zip under its final name is always complete. With a password the zip is AES-256
encrypted (WinZip AE-2 through pyzipper), which 7-Zip and current unzip tools read; the
password is only passed through, never kept or logged.

The manifest (`MANIFEST.csv`, one `name,sha256` line per file in the zip but itself) lets a
download client check every file; `<zip>.sha256` is in `sha256sum` format. Files that are
compressed already (`.nii.gz`) are stored as they are, the others deflated at level 1 (fast);
the checksums are computed on a helper thread while the zip is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyzipper

from ..tree import FILE_MODE, fsync_dir

README = "README.txt"
MANIFEST = "MANIFEST.csv"
CHUNK = 1 << 20
#: name endings of files stored as they are (their data is compressed already)
COMPRESSED = (".gz",)
#: deflate level of the rest: on an MR-like phantom (smooth anatomy, noise, dark background)
#: level 1 made the data 7 % larger than level 6 (zip's default) in a fifth of the CPU time,
#: on noise-like pixels within 1 % (README, Benchmarks); an export is waited for
LEVEL = 1

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class About:
    """What the README says."""

    what: str
    requester: str
    when: str
    type: str
    profile: str
    project: str
    participants: tuple[str, ...]
    events: tuple[str, ...]
    problems: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [f"FIONA export: {self.what}",
                 f"For: {self.requester}", f"Made: {self.when}",
                 f"Project: {self.project}", f"Type: {self.type}", f"Profile: {self.profile}",
                 f"Participants: {', '.join(self.participants) or 'none'}",
                 f"Events: {', '.join(self.events) or 'none'}", "",
                 f"{MANIFEST} lists every file with its SHA-256.",
                 "Before you use these data, check the project's Review page: it shows which "
                 "DICOM tags the de-identified data keep.", ""]
        if self.problems:
            lines += ["Not included:", *(f"- {p}" for p in self.problems), ""]
        return "\n".join(lines)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pack(layout: Path, about: About, work: Path, target: Path, password: bytes | None = None,
         progress: Progress | None = None) -> Path:
    """Zip the folder `layout` (with README and manifest) into `target` (`<name>.zip`) through
    a temporary file in `work`; returns `target`. `progress(done, total)` counts files."""
    names = sorted(p for p in layout.rglob("*") if p.is_file())
    total = len(names)
    rows = []
    partial = work / f".{target.name}.part"
    with _open_zip(partial, password) as zf:
        readme = about.text().encode()
        zf.writestr(README, readme)
        rows.append(f"{README},{hashlib.sha256(readme).hexdigest()}")
        # the checksums on a helper thread, ahead of the compression (both release the GIL)
        with ThreadPoolExecutor(1, thread_name_prefix="export-sha256") as hasher:
            for done, (path, digest) in enumerate(zip(names, hasher.map(sha256_of, names),
                                                      strict=True), 1):
                name = path.relative_to(layout).as_posix()
                rows.append(f"{name},{digest}")
                zf.write(path, name, compress_type=_compression(name))
                if progress:
                    progress(done, total)
        manifest = ("\n".join(rows) + "\n").encode()
        zf.writestr(MANIFEST, manifest)
    with open(partial, "rb+") as fh:
        os.fchmod(fh.fileno(), FILE_MODE)  # images of people: not for every local user
        os.fsync(fh.fileno())
    target.parent.mkdir(parents=True, exist_ok=True)
    _write(target.with_name(target.name + ".manifest.csv"), manifest)
    _write(target.with_name(target.name + ".sha256"),
           f"{sha256_of(partial)}  {target.name}\n".encode())
    staged = target.with_name(f".{target.name}.part")
    if staged != partial:
        shutil.move(partial, staged)  # another file system: copy there, then rename
    os.replace(staged, target)
    fsync_dir(target.parent)
    return target


def _compression(name: str) -> int:
    """Deflate, except for files that are compressed already (NIfTI `.nii.gz`): deflating
    them again costs as much time as the rest of the export and saves nothing."""
    return zipfile.ZIP_STORED if name.endswith(COMPRESSED) else zipfile.ZIP_DEFLATED


def _open_zip(path: Path, password: bytes | None) -> zipfile.ZipFile:
    """A zip to write: AES-256 (WinZip AE-2) with a password, plain otherwise."""
    if not password:
        return zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=LEVEL)
    zf = pyzipper.AESZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=LEVEL,
                             encryption=pyzipper.WZ_AES)
    zf.setpassword(password)
    zf.setencryption(pyzipper.WZ_AES, nbits=256)
    return zf


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(FILE_MODE)
    os.replace(tmp, path)
