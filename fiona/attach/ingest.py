"""Filing attached objects exactly as received ones: each Part-10 object goes through the
receiver's `StoreHandler.on_store` (validation, durable write, UID-conflict quarantine, journal
line, arrival touch file, indexer wake-up), as if sent by the AE title ATTACH. The study is then
tied to its (project, participant, event) by a coupling row keyed by StudyInstanceUID, which
the arrival daemon applies when the study (or its new series) has arrived; a study that is
registered already gets its request at once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ..config import Config, Site
from ..control.assign import Assigner, Refused
from ..control.base import ControlPlane, CouplingRow, TransferRequest, now_iso
from ..control.keyed import Keyed
from ..receive.store import SUCCESS, StoreHandler
from ..receive.ul import Association, StoreRequest
from ..suite import INDEXER
from ..tree import Tree
from .media import Part10

log = logging.getLogger("fiona.attach")

#: the calling and called AE title of attached objects (what the Assign page shows as sender)
ATTACH_AE = "ATTACH"


class IngestError(RuntimeError):
    """The receiver refused an object (it is in quarantine/receive with the reason)."""


def file_objects(config: Config, site: Site, objects: Iterable[Part10],
                 progress: Callable[[int], None] | None = None) -> int:
    """File every object; returns how many. Objects are read one at a time."""
    # joins the receiver's journal: neither a segment of its own (the indexer would leave
    # the receiver's behind) nor the recovery of the receiver's receipts
    handler = StoreHandler(Tree(site.datadir), config.refuse_store_percent,
                           INDEXER.pipe_path(site), join=True)
    assoc = Association(ATTACH_AE, ATTACH_AE, "127.0.0.1", 0)
    count = 0
    try:
        for obj in objects:
            status = handler.on_store(StoreRequest(assoc, count + 1, obj.sop_class,
                                                   obj.sop_instance, obj.transfer_syntax,
                                                   obj.dataset()))
            if status != SUCCESS:
                raise IngestError(f"the receiver refused {obj.path.name} (status {status:#06x}); "
                                  f"see quarantine/receive for the reason. {count} object(s) "
                                  f"before it were filed")
            count += 1
            if progress:
                progress(count)
    finally:
        handler.close()
    return count


def check_request(control: ControlPlane, keyed: Keyed, studies: Iterable[str], project: str,
                  participant: str, event: str) -> None:
    """Refuse (ControlPlaneError) before anything is stored: the project must take this
    participant and event now, and no study may be assigned in it to someone else."""
    assigner = Assigner(control, keyed)
    assigner.checked(project, participant, event)
    studies = set(studies)
    rows = control.coupling_rows()
    for study in studies:
        # a study requested (or attached) for other projects only belongs to them: coupling
        # it here would show it, and send it, to a project whose users may not see it
        owners = {r.project for r in control.requests(study)} | \
            {r.project for r in rows if r.study_uid == study}
        if owners and project not in owners:
            raise Refused(f"study {study} belongs to another project; it is not attached to "
                          f"{project} (an administrator can assign it on the Assign page)")
        assigner.existing(study, project, participant, event)
    for row in rows:  # attached before, not yet arrived
        if row.study_uid in studies and row.project == project and \
                (row.participant, row.event) != (participant, event):
            raise Refused(f"study {row.study_uid} is already attached in project {project} to "
                          f"participant {row.participant} (event {row.event}); an "
                          f"administrator can move it once it has arrived", row.participant)


def couple(control: ControlPlane, keyed: Keyed, studies: Iterable[str], project: str,
           participant: str, event: str) -> list[TransferRequest]:
    """A coupling row per study (unless it exists); the requests made at once for studies
    that are registered already and lack one (the others get theirs on arrival)."""
    wanted = {(uid, project, participant, event) for uid in studies}
    have = {(r.study_uid, r.project, r.participant, r.event) for r in control.coupling_rows()}
    control.add_coupling_rows([
        CouplingRow(accession="", project=project, participant=participant, event=event,
                    study_uid=uid, added=now_iso()) for uid, *_ in sorted(wanted - have)])
    rows = [r for r in control.coupling_rows()
            if (r.study_uid, r.project, r.participant, r.event) in wanted]
    return Assigner(control, keyed).apply_coupling(rows)
