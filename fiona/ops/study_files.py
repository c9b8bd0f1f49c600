"""Everything the data tree holds for one study, found through `fiona.tree`'s names.

A study is its archive folder plus what the indexer and the receiver made from it: raw/<Study>
(instance links and series JSONs), the participants/ link to raw/<Study>, srs/<Maker>/<Study>
and its `.arrived/` touch files. Removal goes from the derived parts to the archive, so an
interrupted removal leaves the archive folder, and the next run finds the study and finishes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..arrive.detector import TouchFile
from ..tree import ARCHIVE_PREFIX, InvalidValue, Tree


def points_to(link: Path, target: Path) -> bool:
    """True when the symlink `link` names `target` (relative or absolute), without following
    further links."""
    try:
        dest = os.readlink(link)
    except OSError:
        return False
    return os.path.normpath(os.path.join(link.parent, dest)) == os.path.normpath(target)


def arrival_files(tree: Tree, study: str) -> list[Path]:
    """The study's touch files in `.arrived/` (names that do not parse are not the study's)."""
    out = []
    try:
        entries = list(os.scandir(tree.arrived))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            if TouchFile.parse(Path(entry.path)).study == study:
                out.append(Path(entry.path))
        except (InvalidValue, FileNotFoundError):
            continue
    return out


def unindexed_studies(tree: Tree) -> set[str]:
    """Studies named by received files that the indexer has not taken in yet (journal lines
    after its committed position): they are still arriving, whatever their requests say."""
    from ..index.indexer import journal_reader
    from ..journal import FileEvent

    out = set()
    for line, _pos in journal_reader(tree).read(limit=1 << 40):
        try:
            folder = FileEvent.parse(line).study_dir.name
        except InvalidValue:
            continue
        if folder.startswith(ARCHIVE_PREFIX):
            out.add(folder[len(ARCHIVE_PREFIX):])
    return out


@dataclass
class StudyFiles:
    """The paths of one study, gathered before anything is removed."""

    study: str
    archive: Path
    raw: Path
    participant_links: list[Path] = field(default_factory=list)
    srs_dirs: list[Path] = field(default_factory=list)
    arrivals: list[Path] = field(default_factory=list)

    @classmethod
    def find(cls, tree: Tree, study: str) -> StudyFiles:
        raw = tree.study_raw(study)
        links = [Path(e.path) for d in _subdirs(tree.participants)
                 for e in os.scandir(d.path) if e.is_symlink() and points_to(Path(e.path), raw)]
        srs = [tree.srs_study(maker.name, study) for maker in _subdirs(tree.srs)
               if tree.srs_study(maker.name, study).is_dir()]
        return cls(study, tree.study_archive(study), raw, links, srs, arrival_files(tree, study))

    def size(self) -> int:
        """Bytes of the archived files (what removal frees; links are next to nothing)."""
        total = 0
        for root, _dirs, files in os.walk(self.archive):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    def remove(self) -> None:
        """Links first, the archive last (see the module's docstring)."""
        for link in self.participant_links:
            _unlink(link)
            _rmdir_if_empty(link.parent)
        for folder in self.srs_dirs:
            shutil.rmtree(folder, ignore_errors=True)
            _rmdir_if_empty(folder.parent)
        shutil.rmtree(self.raw, ignore_errors=True)
        for touch in self.arrivals:
            _unlink(touch)
        shutil.rmtree(self.archive)


def _subdirs(folder: Path) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or gone): keep it
