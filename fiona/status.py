"""The gateway's state as facts: daemons, queues, disk against the watermarks, quarantine, switches.

One module gathers them for the web's Status page and for `fiona status` on the terminal (and
monitoring), so both say the same thing. A daemon is running when its pid file is locked (the
daemon holds the lock while it lives, `fiona.daemon.PidFile`): a stale file of a dead process
reads as stopped. Log text and server paths are only included for admins.

The states of a transfer request are defined here once (`request_state`): cleanup removes only
delivered studies by the same rule that the status counts.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ENABLED_PARTS, Config, Site, read_switches
from .control.base import ControlPlane, ControlPlaneError, TransferRequest
from .daemon import lock_state
from .ops.heartbeat import last_beat
from .suite import DAEMONS
from .tree import Tree

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")

DELIVERED, PENDING, HELD, FAILED = "delivered", "pending", "held", "failed"


def request_state(req: TransferRequest) -> str:
    """delivered: the forwarder completed and verified the revision last asked for (it sets
    `complete` only after the destination confirmed every series' instance count); held:
    pending with the reason it waits (project closed); pending: waiting to be sent; failed:
    the last revision ended in an error and waits for a resend."""
    if req.pending:
        return HELD if req.held else PENDING
    if req.complete and not req.error_message:
        return DELIVERED
    return FAILED


def _tail(path: Path, size: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def daemons(datadir: Path, site: Site, admin: bool, config: Config | None = None) -> list[dict]:
    """Each daemon: running (pid lock), pid, last activity and last error from its log
    (with `config`, only those it runs: MPPS only with MPPSPORT)."""
    site = replace(site, datadir=datadir)
    out = []
    for daemon in DAEMONS:
        if config is not None and not daemon.wanted(config):
            continue
        running, pid = lock_state(daemon.pid_path(site))
        lines = _tail(daemon.log_path(site))
        last = next((m.group(1) for line in reversed(lines) if (m := _STAMP.match(line))), "")
        error = next((line for line in reversed(lines) if " ERROR " in line), "")
        stamp = _STAMP.match(error)
        row = {"name": daemon.command, "running": running, "pid": pid if running else "",
               "last_activity": last, "last_error_at": stamp.group(1) if stamp else ""}
        if admin:
            row["last_error"] = error[:500]
        out.append(row)
    return out


def switches(datadir: Path) -> list[dict]:
    state = read_switches(datadir)
    return [{"part": part, "enabled": state[part]}
            for part, _ in sorted(ENABLED_PARTS.items(), key=lambda kv: kv[1])]


def queues(control: ControlPlane) -> dict[str, int]:
    """Studies waiting for assignment and requests by state."""
    reqs = control.requests()
    requested = {r.study_uid for r in reqs}
    waiting = sum(1 for s in control.studies() if s.uid not in requested)
    states = [request_state(r) for r in reqs]
    return {"studies_waiting": waiting, "requests_pending": states.count(PENDING),
            "requests_held": states.count(HELD), "requests_failed": states.count(FAILED)}


def disk(config: Config, datadir: Path, admin: bool,
         usage: Callable[[Path], Any] = shutil.disk_usage) -> dict[str, Any]:
    """Use of the data tree's file system against DISK's watermarks."""
    u = usage(datadir)
    percent = round(100 * u.used / u.total, 1) if u.total else 0.0
    out: dict[str, Any] = {
        "used_percent": percent, "free_gb": round(u.free / 1e9, 1),
        "cleanup_percent": config.cleanup_percent,
        "refuse_store_percent": config.refuse_store_percent,
        "state": ("refusing" if percent >= config.refuse_store_percent else
                  "cleanup" if percent >= config.cleanup_percent else "ok")}
    if admin:
        out["path"] = str(datadir)
    return out


def quarantine_counts(datadir: Path) -> dict[str, int]:
    """Objects held in quarantine per stage (receive, index, deidentify, ...)."""
    root = Tree(datadir).quarantine
    try:
        stages = sorted((e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)),
                        key=lambda e: e.name)
    except FileNotFoundError:
        return {}
    return {stage.name: sum(1 for e in os.scandir(stage.path) if e.is_dir())
            for stage in stages}


def scans(datadir: Path) -> dict[str, int]:
    """Scans announced by MPPS: active (images still awaited), finished, failed."""
    from .scanner.steps import Steps

    return Steps(datadir).counts()


def gather(config: Config, site: Site, control: ControlPlane, admin: bool,
           usage: Callable[[Path], Any] = shutil.disk_usage, strict: bool = True) -> dict:
    """Every fact for one site. With `strict`, an unreachable control plane raises
    ControlPlaneError; otherwise the queues say why they are unknown."""
    from .control.region import by_node

    nodes: list[dict] = []
    try:
        queue_facts: dict[str, Any] = queues(control)
        nodes = by_node(control)
    except ControlPlaneError as exc:
        if strict:
            raise
        queue_facts = {"error": f"control plane unreachable: {exc}"}
    return {"daemons": daemons(site.datadir, site, admin, config), "queues": queue_facts,
            "disk": disk(config, site.datadir, admin, usage),
            "quarantine": quarantine_counts(site.datadir), "switches": switches(site.datadir),
            "scans": scans(site.datadir),
            "heartbeat": last_beat(site), "node": config.node, "nodes": nodes}


def attention(facts: dict) -> list[str]:
    """What needs a person, one line each (empty when all is well)."""
    out = [f"daemon {d['name']} is not running" for d in facts["daemons"] if not d["running"]]
    q, d = facts["queues"], facts["disk"]
    if "error" in q:
        out.append(q["error"])
    elif q.get("requests_failed"):
        out.append(f"{q['requests_failed']} transfer request(s) failed")
    for n in facts.get("nodes", []):
        for split in n["split_studies"]:
            out.append(f"study {split['uid']} is split: node {n['node'] or '(none)'} holds it, "
                       f"{', '.join(split['also_at'])} received series of it too")
    if d["state"] == "refusing":
        out.append(f"disk {d['used_percent']}% used, at or above the refuse watermark "
                   f"{d['refuse_store_percent']}%: the receiver refuses studies")
    return out
