"""Events, derived from durable state only (the control plane's requests with their revisions,
the export job files, the projects' ethics dates, the daemons' pid locks and the disk), so no
daemon has to report anything and `fiona notify` can run whenever it likes.

Each event's key names it for good: a request's failure at its done revision, a hold at its
revision, an export by its job id, an ethics end by its date, a receiver outage by the hour
and a disk state by the day. `fiona.notify.store` remembers the keys it has seen.

Texts name projects, participant pseudonyms, events, job ids and counts, never a patient's
name, ID, birth date or accession number, nor a clinical study UID.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ..config import Config, Site
from ..control.base import ControlPlane, TransferRequest
from ..export.jobs import READY, JobStore
from ..mail import site_url
from ..status import daemons, disk
from ..suite import RECEIVER
from .store import Event

ETHICS_WARNING_DAYS = 30


def _who(r: TransferRequest) -> str:
    return f"participant {r.participant}, event {r.event}"


def request_events(control: ControlPlane) -> Iterator[Event]:
    for r in control.requests():
        where = f"{r.study_uid}:{r.project}"
        yield Event(f"routed:{where}", "routed", r.project,
                    f"{_who(r)}: a study was {'routed' if r.source == 'routing' else 'assigned'}"
                    f" to the project")
        if r.held:
            yield Event(f"held:{where}:{r.revision}", "held", r.project,
                        f"{_who(r)}: the transfer is held until the project is open again")
        elif not r.pending and r.error_flags and r.done_revision:
            yield Event(f"failed:{where}:{r.done_revision}", "failed", r.project,
                        f"{_who(r)}: the transfer failed; see the Status page")


def export_events(site: Site, base_url: str) -> Iterator[Event]:
    for job in JobStore(site.datadir).all():
        if job.state == READY:
            yield Event(f"export:{job.id}", "export", job.project,
                        f"the {job.type} export {job.id} is ready: {base_url}/exports/{job.id}")


def ethics_events(control: ControlPlane, today: date) -> Iterator[Event]:
    for p in control.projects():
        try:
            end = date.fromisoformat(p.rec_end) if p.rec_end else None
        except ValueError:
            continue
        if end is not None and p.active and 0 <= (end - today).days <= ETHICS_WARNING_DAYS:
            yield Event(f"ethics:{p.name}:{p.rec_end}", "ethics", p.name,
                        f"the ethics approval ends on {p.rec_end} "
                        f"({(end - today).days} days from today)")


def site_events(config: Config, site: Site, now: datetime,
                usage: Callable[[Path], Any] = shutil.disk_usage) -> Iterator[Event]:
    """For admins: the receiver not running (once an hour while it lasts), the disk above a
    watermark (once a day per state)."""
    for d in daemons(site.datadir, site, admin=False, config=config):
        if d["name"] == RECEIVER.command and not d["running"]:
            yield Event(f"receiver:{site.name}:{now:%Y-%m-%dT%H}", "receiver", "",
                        f"the DICOM receiver{' of site ' + site.name if site.name else ''} "
                        f"is not running; see the Status page")
    d = disk(config, site.datadir, admin=False, usage=usage)
    if d["state"] != "ok":
        yield Event(f"disk:{site.name}:{d['state']}:{now:%Y-%m-%d}", "disk", "",
                    f"the disk is {d['used_percent']}% used ({d['state']}: cleanup from "
                    f"{d['cleanup_percent']}%, refused from {d['refuse_store_percent']}%)")


def shares_control_plane(config: Config, site: Site) -> bool:
    """Whether `site` shares the main site's control plane (every backend but `local`, which
    keeps one database per site): its requests and projects are then the main site's
    events, told once, by the main site's run."""
    return bool(site.name) and config.control_plane.get("type", "local") != "local"


def gather(config: Config, site: Site, control: ControlPlane, now: datetime,
           usage: Callable[[Path], Any] = shutil.disk_usage) -> list[Event]:
    base = site_url(config.exports, config.web)
    shared = shares_control_plane(config, site)
    return [*([] if shared else request_events(control)), *export_events(site, base),
            *([] if shared else ethics_events(control, now.date())),
            *site_events(config, site, now, usage)]
