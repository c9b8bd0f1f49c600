"""Holding objects that a stage refused, each with a reason a person can act on.

Every stage (receive, index, de-identify, send) keeps what it cannot process here instead of
dropping it, as CTP's pipeline stages do: `quarantine/<stage>/<time>-<id>/` holds the object as
it came and `reason.json` says what was wrong and what to do about it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path

from .tree import Tree, atomic_write, ensure_dir

log = logging.getLogger(__name__)

#: a quoted value inside a reason: it came from the object (a hostile UID can carry a name or an
#: ID), so it stays in reason.json and the log line shows only that there was one
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def loggable(reason: str) -> str:
    """`reason` with every quoted value replaced by '…', for log lines."""
    masked = _QUOTED.sub("'…'", reason)
    return masked if masked == reason else masked + " (the values are in its reason.json)"


def hold(tree: Tree, stage: str, reason: str, files: dict[str, bytes], context: dict,
         advice: str) -> Path:
    """Store `files` under a new quarantine folder for `stage` with the reason; return it."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    folder = ensure_dir(tree.quarantine / stage / f"{stamp}-{uuid.uuid4().hex[:12]}")
    for name, data in files.items():
        atomic_write(folder / name, data)
    record = {"stage": stage, "reason": reason, "advice": advice,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **context}
    atomic_write(folder / "reason.json", (json.dumps(record, indent=1) + "\n").encode())
    log.warning("%s: quarantined %s: %s. %s", stage, folder, loggable(reason), advice)
    return folder
