"""The `folder` destination: de-identified files written under a folder (a share, a disk)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...tree import InvalidValue, atomic_write, ensure_dir, fsync_dir, valid_uid
from .base import (
    Destination,
    DestinationError,
    DestinationSettings,
    DestinationUnavailable,
    Progress,
    SendResult,
    register,
    setting,
)

log = logging.getLogger("fiona.send.destinations")


@dataclass
class FolderSettings(DestinationSettings):
    """`path`: an absolute folder, created when missing."""

    kind = "folder"
    path: str = setting("/data/research")

    def problems(self, where: str) -> list[str]:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            return [f"{where}.path must be a folder, e.g. \"/data/research\"; got {self.path!r}"]
        if not Path(self.path).is_absolute():
            return [f"{where}.path must be absolute, e.g. \"/data/research\"; got {self.path!r}"]
        self.path = str(self.path)
        return []


@register
class FolderDestination(Destination):
    """Files under `<path>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`.

    Each file is written to a temporary name in its series folder, fsynced, renamed (mode 0640,
    folders 0750); the folders are fsynced before `send` returns. The three UIDs come from the
    file and pass `tree.valid_uid` before they become a path, so no value in a file can place
    anything outside `path`. An identical file already in place is left alone; a different one
    with the same name is replaced atomically (as a PACS overwriting an instance would).
    """

    kind = "folder"
    settings_class = FolderSettings
    config: FolderSettings

    def __init__(self, name: str, settings: dict[str, Any] | FolderSettings):
        super().__init__(name, settings)
        self.root = Path(self.config.path)

    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        result = SendResult()
        if not files:
            return result
        self._ensure_root()
        touched: set[Path] = set()
        for done, file in enumerate(files, 1):
            file = Path(file)
            ds = None
            try:
                ds = dcmread(file, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                            "SOPInstanceUID"])
                study = valid_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
                series = valid_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
                sop = valid_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            except (InvalidDicomError, InvalidValue, ValueError, EOFError) as exc:
                uid = _uid_of(ds, file)
                result.failed.append((uid, f"{file.name}: {exc}"))
                log.warning("%s: refused %s: %s", self.name, file, exc)
            except FileNotFoundError as exc:
                result.failed.append((str(file), f"file is missing: {exc}"))
            else:
                try:
                    self._store(file, study, series, sop, touched)
                except OSError as exc:
                    raise DestinationUnavailable(
                        f"destination {self.name!r}: cannot write under {self.root}: {exc} "
                        f"({result.sent} of {len(files)} files written)") from exc
                result.sent += 1
            if progress:
                progress(done)
        try:
            for folder in sorted(touched, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: {exc}") from exc
        return result

    def _store(self, file: Path, study: str, series: str, sop: str, touched: set[Path]) -> None:
        data = file.read_bytes()
        study_dir = self.root / study
        series_dir = study_dir / series
        target = series_dir / f"{sop}.dcm"
        # valid_uid admits digits and dots only, with no empty component: belt and braces
        if target.parent.parent.parent != self.root or ".." in target.parts:
            raise InvalidValue(f"{target} is outside {self.root}")
        if not series_dir.is_dir():
            for folder in (study_dir, series_dir):
                if not folder.is_dir():
                    ensure_dir(folder)
                    touched.add(folder.parent)
        try:
            if target.stat().st_size == len(data) and target.read_bytes() == data:
                return  # identical file already delivered
        except FileNotFoundError:
            pass
        atomic_write(target, data)
        touched.add(series_dir)

    def count_instances(self, study_uid: str) -> dict[str, int]:
        study = self.root / valid_uid(study_uid, "StudyInstanceUID")
        counts: dict[str, int] = {}
        try:
            series_dirs = list(study.iterdir())
        except FileNotFoundError:
            return counts
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: {exc}") from exc
        for series in series_dirs:
            if series.name.startswith(".") or not series.is_dir():
                continue
            n = sum(1 for f in series.iterdir()
                    if f.suffix == ".dcm" and not f.name.startswith("."))
            if n:
                counts[series.name] = n
        return counts

    def test_connection(self) -> None:
        self._ensure_root()
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: cannot write in "
                                         f"{self.root}: {exc}") from exc

    def _ensure_root(self) -> None:
        try:
            if not self.root.is_dir():
                ensure_dir(self.root)
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: cannot create "
                                         f"{self.root}: {exc}") from exc
        if not self.root.is_dir():
            raise DestinationError(f"destination {self.name!r}: {self.root} is not a folder")


def _uid_of(ds: Any, file: Path) -> str:
    try:
        uid = str(ds.SOPInstanceUID).strip()
        return uid[:64] if uid else str(file)
    except Exception:  # no data set, or no SOPInstanceUID in it
        return str(file)
