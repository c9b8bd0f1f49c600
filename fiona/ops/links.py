"""`fiona clear-stale-links` (original clearStaleLinks): what points at nothing.

raw/, participants/ and srs/ hold only links and series JSONs made from the archive; after a
study is removed, or files are deleted by hand, some point at nothing. This job removes links
whose target is gone, links and files an indexer killed mid-way left under their temporary
names, series JSONs whose series folder has no instance left, and the folders that are then
empty. The archive is never touched. Folders, JSONs and temporaries changed within the grace
period are left alone, because the indexer makes a series folder a moment before its first
link and writes the JSON after its links; a study that is still arriving (touch files in
`.arrived/`) is skipped the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..arrive.detector import TouchFile
from ..clock import SYSTEM_CLOCK, Clock
from ..tree import TEMPORARY_PREFIX, InvalidValue, Tree, series_links

log = logging.getLogger("fiona.links")

GRACE_SECONDS = 3600


@dataclass
class Report:
    links: list[Path] = field(default_factory=list)
    jsons: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)


class StaleLinks:
    """One pass over raw/, participants/ and srs/ of a data tree."""

    def __init__(self, tree: Tree, clock: Clock = SYSTEM_CLOCK, grace: float = GRACE_SECONDS):
        self.tree = tree
        self.clock = clock
        self.grace = grace
        self.gone: set[Path] = set()   # removed, or (dry run) would be

    def _arriving(self) -> set[str]:
        studies: set[str] = set()
        try:
            entries = list(os.scandir(self.tree.arrived))
        except FileNotFoundError:
            return studies
        for entry in entries:
            try:
                studies.add(TouchFile.parse(Path(entry.path)).study)
            except (InvalidValue, FileNotFoundError):
                continue
        return studies

    def _old(self, path: Path) -> bool:
        try:
            return self.clock.time() - os.lstat(path).st_mtime >= self.grace
        except FileNotFoundError:
            return False

    def _exists(self, path: Path) -> bool:
        return path not in self.gone and os.path.exists(path)

    def _dangling(self, link: Path) -> bool:
        """A link whose target is gone (or, in a dry run, would be)."""
        target = Path(os.path.normpath(os.path.join(link.parent, os.readlink(link))))
        return not self._exists(target)

    def _drop(self, path: Path, dry_run: bool, into: list[Path]) -> None:
        into.append(path)
        self.gone.add(path)
        if not dry_run:
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            log.info("removed %s", path.relative_to(self.tree.site))

    def run(self, dry_run: bool = False) -> Report:
        report = Report()
        arriving = self._arriving()
        # raw/ first: participants/ links point at raw/<Study> folders removed here
        for root in (self.tree.raw, self.tree.srs, self.tree.participants):
            self._clear(root, arriving, dry_run, report)
        return report

    def _clear(self, root: Path, arriving: set[str], dry_run: bool, report: Report) -> None:
        # mtimes before anything is removed: removing an entry changes its folder's mtime
        old = {Path(d): self._old(Path(d)) for d, _subdirs, _files in os.walk(root)}
        for folder, subdirs, files in os.walk(root, topdown=False):
            here = Path(folder)
            if here != root and self._study_of(root, here) in arriving:
                continue
            for name in files + subdirs:
                path = here / name
                if (name.startswith(TEMPORARY_PREFIX) and self._old(path)) or (
                        path.is_symlink() and self._dangling(path)):
                    self._drop(path, dry_run, report.links)
            for name in files:
                path = here / name
                if name.endswith(".json") and root == self.tree.raw and \
                        not self._has_instances(here / name[:-5]) and self._old(path):
                    self._drop(path, dry_run, report.jsons)
            if here != root and old.get(here) and not any(
                    (here / n) not in self.gone for n in os.listdir(here)):
                self._drop(here, dry_run, report.folders)

    def _study_of(self, root: Path, folder: Path) -> str:
        """The study a folder belongs to: raw/<Study>/..., srs/<Maker>/<Study>/..."""
        parts = folder.relative_to(root).parts
        if root == self.tree.raw:
            return parts[0]
        if root == self.tree.srs and len(parts) > 1:
            return parts[1]
        return ""

    def _has_instances(self, series_dir: Path) -> bool:
        try:
            return any(link not in self.gone for link in series_links(series_dir))
        except (FileNotFoundError, NotADirectoryError):
            return False
