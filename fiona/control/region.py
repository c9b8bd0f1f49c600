"""Several FIONA nodes on one control plane (a region): the checks that keep them apart and
together.

Each node names itself (`NODE` in config.json); studies carry the node that holds them and a
node does only its own studies' work (`fiona.control.base.takes`). Keyed identifiers must be
comparable across nodes (auto-ID gives the same patient the same participant ID at every
hospital), so the nodes share one `secret.key`; the control plane records the key's
fingerprint, and a node with another key is refused before it writes a single hash.
"""

from __future__ import annotations

from .base import ControlPlane, ControlPlaneError
from .keyed import Keyed


class KeyMismatch(ControlPlaneError):
    """This node's secret.key is not the one the control plane's other nodes use."""


def check_key(control: ControlPlane, keyed: Keyed, where: str) -> None:
    """Record this node's key fingerprint, or refuse (KeyMismatch) when the control plane
    recorded another: hashes and auto-IDs made with two keys would never match."""
    mine = keyed.fingerprint()
    recorded = control.claim_key_fingerprint(mine)
    if recorded != mine:
        raise KeyMismatch(
            f"this node's pseudonymization key ({where}, fingerprint {mine}) is not the "
            f"region's: the {control.kind} control plane recorded {recorded}. Copy the "
            f"region's secret.key to {where} (mode 0600, owned by the FIONA user) and start "
            f"again; see README 'Running a region'")


def by_node(control: ControlPlane, node: str = "") -> list[dict]:
    """Per node (`node`: only that one): its studies, pending and failed requests, and its
    split studies (series of one study at two nodes: what to sort out by hand), for Status.
    Studies and requests of no node (from before regions) are listed under ""."""
    rows: dict[str, dict] = {}

    def row(name: str) -> dict:
        return rows.setdefault(name, {"node": name, "studies": 0, "requests_pending": 0,
                                      "requests_failed": 0, "split_studies": []})

    for s in control.studies(include_hidden=True):
        row(s.node)["studies"] += 1
        if s.split:
            row(s.node)["split_studies"].append({"uid": s.uid, "also_at": s.split_nodes})
    from ..status import FAILED, HELD, PENDING, request_state

    for r in control.requests():
        state = request_state(r)
        if state in (PENDING, HELD):
            row(r.node)["requests_pending"] += 1
        elif state == FAILED:
            row(r.node)["requests_failed"] += 1
    return [rows[k] for k in sorted(rows) if not node or k == node]
