"""Arrival workflows: a site's own programs run when a study has arrived (SPEC §5).

Each is an argv list or a container image, with the placeholders `@StudyInstanceUID@`,
`@SeriesInstanceUID@` and `@PATH@` replaced by validated values; never through a shell, so no
value can become a command. A workflow that names `@SeriesInstanceUID@` runs once per series,
otherwise once per study. Failures are logged with the command and the end of its output,
with the study's identifiers replaced by keyed references (a converter may well print the
patient's name); they do not stop the arrival.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..tree import valid_uid

log = logging.getLogger("fiona.workflows")

PLACEHOLDERS = ("@StudyInstanceUID@", "@SeriesInstanceUID@", "@PATH@")


@dataclass(frozen=True)
class Workflow:
    name: str
    argv: tuple[str, ...]
    timeout: float = 3600.0

    @classmethod
    def from_config(cls, entry: dict) -> Workflow:
        """`{"name", "command": [argv...]}` or `{"name", "image", "runtime"?, "args"?}`; a
        container sees the study folder read-only at /input."""
        if "command" in entry:
            argv = tuple(entry["command"])
        else:
            runtime = entry.get("runtime", "docker")
            argv = (runtime, "run", "--rm", "--network", "none", "-v", "@PATH@:/input:ro",
                    entry["image"], *entry.get("args", []))
        return cls(entry["name"], argv, float(entry.get("timeout", 3600)))

    def commands(self, study: str, series: list[str], path: Path) -> list[list[str]]:
        """The argv lists to run for a study (one per series where the series is named)."""
        study = valid_uid(study, "StudyInstanceUID")
        per_series = any("@SeriesInstanceUID@" in a for a in self.argv)
        targets = [valid_uid(s, "SeriesInstanceUID") for s in series] if per_series else [""]
        return [[a.replace("@StudyInstanceUID@", study).replace("@SeriesInstanceUID@", s)
                 .replace("@PATH@", str(path)) for a in self.argv] for s in targets]

    def run(self, study: str, series: list[str], path: Path,
            redact: Callable[[str], str]) -> bool:
        """Run the commands; `redact` cleans the program's output before it is logged."""
        ok = True
        for argv in self.commands(study, series, path):
            try:
                res = subprocess.run(argv, capture_output=True, text=True,
                                     timeout=self.timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.error("workflow %s for study %s could not run %s: %s", self.name, study,
                          argv[0], redact(str(exc)))
                ok = False
                continue
            if res.returncode != 0:
                log.error("workflow %s for study %s exited %d: %s", self.name, study,
                          res.returncode, redact((res.stderr or res.stdout).strip())[-500:])
                ok = False
            else:
                log.info("workflow %s for study %s done", self.name, study)
        return ok
