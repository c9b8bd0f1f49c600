"""The on-disk cache of sampled PACS headers, so Review does not fetch them on every view.

One JSON file per series, `DATADIR/site/cache/review/<project>/<study>/<series>.json` (folders
0750, files 0640, like the rest of the data tree), holding the series' tag summary, how many
headers it is based on and how many instances the PACS held when it was read. An entry counts
only while the PACS still reports that instance count and it is younger than `max_age`
seconds: a series that grew or shrank, or an old entry, is read again. The project name is
made safe by `tree.safe_name` and written into each entry, so two names that map to the same
folder never read each other's entries; UIDs pass `tree.valid_uid` before they become paths.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from ..tree import Tree, atomic_write, ensure_dir, safe_name, valid_uid
from .tags import TagSummary

log = logging.getLogger(__name__)

FORMAT = 1  # raise when the summary's rules change, so older entries are read again


@dataclass
class Entry:
    """A series' figures: `read` headers summarized, of `instances` at the PACS."""

    instances: int
    read: int
    summary: TagSummary


class ReviewCache:
    def __init__(self, root: Path, max_age: float, clock: Clock = SYSTEM_CLOCK):
        self.root = root
        self.max_age = max_age
        self.clock = clock

    @classmethod
    def for_datadir(cls, datadir: Path, max_age: float, clock: Clock = SYSTEM_CLOCK
                    ) -> ReviewCache:
        return cls(Tree(datadir).site / "cache" / "review", max_age, clock)

    def project_dir(self, project: str) -> Path:
        return self.root / safe_name(project, "project")

    def _path(self, project: str, study: str, series: str) -> Path:
        return (self.project_dir(project) / valid_uid(study, "StudyInstanceUID")
                / f"{valid_uid(series, 'SeriesInstanceUID')}.json")

    def get(self, project: str, study: str, series: str, instances: int) -> Entry | None:
        """The series' entry if it is fresh for `instances` at the PACS, else None."""
        path = self._path(project, study, series)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("project") != project:
                return None
            age = self.clock.time() - float(data["time"])
            if data["instances"] != instances or not 0 <= age <= self.max_age:
                return None
            return Entry(int(data["instances"]), int(data["read"]),
                         TagSummary.from_json(data["tags"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("review cache entry %s unreadable, reading the series again: %s",
                        path, exc)
            return None

    def put(self, project: str, study: str, series: str, entry: Entry) -> None:
        path = self._path(project, study, series)
        ensure_dir(path.parent)
        data = {"format": FORMAT, "project": project, "time": self.clock.time(),
                "instances": entry.instances, "read": entry.read,
                "tags": entry.summary.to_json()}
        atomic_write(path, json.dumps(data).encode(), durable=False)

    def prune(self, project: str, held: dict[str, set[str]]) -> None:
        """Drop the entries of studies and series the PACS no longer holds for the project
        (`held`: study -> its series)."""
        folder = self.project_dir(project)
        try:
            study_dirs = [p for p in folder.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return
        for study_dir in study_dirs:
            if study_dir.name not in held:
                shutil.rmtree(study_dir, ignore_errors=True)
                continue
            for entry in study_dir.glob("*.json"):
                if entry.stem not in held[study_dir.name]:
                    entry.unlink(missing_ok=True)
