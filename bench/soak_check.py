"""The soak's end: wait until the gateway is quiet, then check what it owes.

Invariants (each failure is one line; the figures go into the last line of the soak):
- every image a sender got success for is in the archive and indexed (raw/ link);
- every study that has a way to a project (coupling row, routing rule, auto-ID) has exactly
  one request for that project, complete without error, and is in Orthanc exactly once, under
  one de-identified StudyInstanceUID, with as many instances as the archive holds for it;
  nothing else is in Orthanc; no instance holds a source identifier (patient name parts,
  patient ID, birth date, accession number, the original StudyInstanceUID);
- no request is pending without a reason (an error message);
- no daemon's peak RSS is above the bound; no log holds a traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak_send import PROJECT_OF, Ledger
from fiona.control.base import ControlPlane, ControlPlaneError, TransferRequest
from fiona.tree import Tree


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def fail(self, text: str) -> None:
        self.failures.append(text)


class Checker:
    def __init__(self, tree: Tree, control: Callable[[], ControlPlane], orthanc, ledger: Ledger):
        self.tree = tree
        self.control = control
        self.orthanc = orthanc
        self.ledger = ledger

    # --- what is on disk ---------------------------------------------------------------------
    def archived(self, study: str) -> set[str]:
        """SOPInstanceUIDs in archive/scp_<study>/ (files are named <MODALITY>.<SOP>)."""
        try:
            names = os.listdir(self.tree.study_archive(study))
        except FileNotFoundError:
            return set()
        return {n.split(".", 1)[1] for n in names if not n.startswith(".") and "." in n}

    def missing(self) -> tuple[list[str], list[str]]:
        """Acknowledged SOPs not archived, and archived ones not indexed."""
        with self.ledger.lock:
            acked = dict(self.ledger.acked)
        archived: dict[str, set[str]] = {}
        not_archived, not_indexed = [], []
        for sop, (study, series) in acked.items():
            if study not in archived:
                archived[study] = self.archived(study)
            if sop not in archived[study]:
                not_archived.append(sop)
            elif not os.path.lexists(self.tree.series_dir(study, series) / sop):
                not_indexed.append(sop)
        return not_archived, not_indexed

    def owed(self) -> dict[str, str]:
        """Sent studies that must reach Orthanc: study UID -> project."""
        with self.ledger.lock:
            sent = {study for study, _ in self.ledger.acked.values()}
            return {uid: PROJECT_OF[spec.kind] for uid, spec in self.ledger.studies.items()
                    if uid in sent and spec.kind in PROJECT_OF}

    def orthanc_studies(self) -> dict[str, tuple[str, int]]:
        """StudyInstanceUID -> (Orthanc ID, instance count)."""
        out = {}
        for study in self.orthanc.get("/studies?expand"):
            stats = self.orthanc.get(f"/studies/{study['ID']}/statistics")
            out[study["MainDicomTags"]["StudyInstanceUID"]] = (study["ID"],
                                                               int(stats["CountInstances"]))
        return out

    # --- waiting for quiet ---------------------------------------------------------------------
    def unsettled(self) -> str:
        """Why the gateway is not quiet yet, or '' when it is."""
        not_archived, not_indexed = self.missing()
        if not_archived or not_indexed:
            return f"{len(not_archived)} images not archived, {len(not_indexed)} not indexed"
        waiting = sum(1 for _, _, names in os.walk(self.tree.arrived) for _ in names)
        if waiting:
            return f"{waiting} arrival touch files"
        try:
            reqs = self.control().requests()
        except ControlPlaneError as exc:
            return f"control plane: {exc}"
        have = {r.study_uid for r in reqs}
        owed = self.owed()
        if without := [uid for uid in owed if uid not in have]:
            return f"{len(without)} studies without a request"
        if pending := [r for r in reqs if r.pending]:
            return f"{len(pending)} requests pending"
        try:
            in_pacs = self.orthanc_studies()
        except OSError as exc:
            return f"Orthanc: {exc}"
        for r in reqs:
            if r.complete and not r.error_flags and r.study_uid in owed:
                count = in_pacs.get(r.mapped_uid, ("", 0))[1]
                if count < len(self.archived(r.study_uid)):
                    return f"study {r.study_uid}: {count} instances in Orthanc so far"
        return ""

    def wait_quiet(self, deadline: float, say: Callable[[str], None]) -> str:
        """Poll until quiet twice in a row (nothing moved in between) or the deadline;
        returns '' or the last reason it was not quiet."""
        last, quiet_once, said = None, False, 0.0
        while True:
            why = self.unsettled()
            if not why:
                if quiet_once:
                    return ""
                quiet_once = True
            else:
                quiet_once = False
                if why != last and time.monotonic() - said > 10:
                    say(f"waiting for quiet: {why}")
                    said, last = time.monotonic(), why
            if time.monotonic() > deadline:
                return why or "not quiet twice in a row"
            time.sleep(2.0)

    # --- the invariants ------------------------------------------------------------------------
    def check(self, out: Outcome) -> None:
        not_archived, not_indexed = self.missing()
        out.figures["lost"] = len(not_archived) + len(not_indexed)
        if not_archived:
            out.fail(f"{len(not_archived)} acknowledged images not in the archive, "
                     f"e.g. {not_archived[:3]}")
        if not_indexed:
            out.fail(f"{len(not_indexed)} archived images not indexed, e.g. {not_indexed[:3]}")
        reqs = self.control().requests()
        self._requests(out, reqs)
        self._orthanc(out, reqs)

    def _requests(self, out: Outcome, reqs: list[TransferRequest]) -> None:
        stuck = [r for r in reqs if r.pending and not r.error_message]
        reasons = [r for r in reqs if r.pending and r.error_message]
        out.figures["stuck"] = len(stuck)
        out.figures["pending with a reason"] = len(reasons)
        for r in stuck[:5]:
            out.fail(f"request {r.project} for study {r.study_uid} pending without a reason")
        for r in reasons[:5]:
            out.fail(f"request {r.project} for study {r.study_uid} still pending: "
                     f"{r.error_message}")

    def _orthanc(self, out: Outcome, reqs: list[TransferRequest]) -> None:
        owed = self.owed()
        in_pacs = self.orthanc_studies()
        by_study: dict[str, list[TransferRequest]] = {}
        for r in reqs:
            by_study.setdefault(r.study_uid, []).append(r)
        expected: dict[str, str] = {}  # mapped UID -> source study
        duplicates = 0
        for uid, project in owed.items():
            mine = [r for r in by_study.get(uid, []) if r.project == project]
            others = [r for r in by_study.get(uid, []) if r.project != project]
            if len(mine) != 1 or others:
                out.fail(f"study {uid}: {len(mine)} requests for {project}, "
                         f"{len(others)} for other projects (expected exactly one)")
                duplicates += max(0, len(mine) - 1)
            if not mine:
                continue
            req = mine[0]
            if not req.complete or req.error_flags or not req.mapped_uid:
                out.fail(f"study {uid}: request for {project} not completed "
                         f"(flags {sorted(req.error_flags)}, {req.error_message or 'no message'})")
                continue
            expected[req.mapped_uid] = uid
            archived = len(self.archived(uid))
            count = in_pacs.get(req.mapped_uid, ("", 0))[1]
            if count != archived:
                out.fail(f"study {uid}: {count} instances in Orthanc under {req.mapped_uid}, "
                         f"{archived} in the archive")
                duplicates += max(0, count - archived)
        for uid, spec in self.ledger.studies.items():
            if uid not in owed and by_study.get(uid):
                out.fail(f"study {uid} ({spec.kind}) got a request it should not have")
        extra = {uid: n for uid, (_, n) in in_pacs.items() if uid not in expected}
        for uid, n in list(extra.items())[:5]:
            out.fail(f"Orthanc holds a study nobody asked for: {uid} ({n} instances)")
        duplicates += sum(extra.values())
        out.figures["duplicates"] = duplicates
        out.figures["studies in Orthanc"] = f"{len(in_pacs)}/{len(owed)}"
        out.figures["instances in Orthanc"] = sum(n for _, n in in_pacs.values())
        leaks = self._identifiers(in_pacs, expected)
        out.figures["identifiers found"] = len(leaks)
        for leak in leaks[:5]:
            out.fail(leak)

    def _identifiers(self, in_pacs: dict[str, tuple[str, int]],
                     expected: dict[str, str]) -> list[str]:
        """Download every instance of every forwarded study and search its bytes for the
        source study's identifying values."""
        jobs = []
        for mapped, source in expected.items():
            if mapped not in in_pacs:
                continue
            spec = self.ledger.studies[source]
            needles = [v.encode() for v in spec.identifiers()] + [source.encode()]
            for inst in self.orthanc.get(f"/studies/{in_pacs[mapped][0]}/instances"):
                jobs.append((inst["ID"], source, needles))

        def scan(job: tuple[str, str, list[bytes]]) -> list[str]:
            inst, source, needles = job
            data = self.orthanc.get_bytes(f"/instances/{inst}/file")
            return [f"Orthanc instance {inst} (from study {source}) holds a source identifier "
                    f"(value #{i} of its study)" for i, n in enumerate(needles) if n in data]

        with ThreadPoolExecutor(4) as pool:
            return [hit for hits in pool.map(scan, jobs) for hit in hits]


def tracebacks(logs: list[Path]) -> list[str]:
    """'file:line' of every traceback in the given logs."""
    found = []
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        found += [f"{log.name}:{i + 1}" for i, line in enumerate(lines)
                  if line.startswith("Traceback (most recent call last)")]
    return found
