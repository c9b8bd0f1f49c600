"""The forwarder's rules, in process, against each control-plane backend (local SQLite, the
REDCap emulator) and a folder destination, on a fake clock: back-off after a destination
error, permanent failures, resends (also in the same second as the completion), a revision
raised while sending, a reassigned request, and requests held while their project is closed.
Nothing sleeps: time moves when a test advances it."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from dicomgen import make_study
from fiona.bootstrap import init
from fiona.clock import FakeClock
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.assign import Assigner
from fiona.control.base import ControlPlane, Project, TransferRequest, now_iso
from fiona.control.keyed import Keyed
from fiona.control.redcap import RedcapControlPlane
from fiona.send.forward import BACKOFF_SECONDS, HOLD_SECONDS, Forwarder
from redcap_emulator import RedcapEmulator

TOKENS = {"Incoming": "A" * 32, "Routing": "B" * 32, "CouplingList": "C" * 32,
          "AutoID": "D" * 32, "DataTransferProjects": "E" * 32, "PROJ": "F" * 32}

NOW = datetime(2026, 3, 2, 9, 30, 0)


class Site:
    """A data tree with one study on disk, a project and a forwarder on a fake clock."""

    def __init__(self, tmp_path: Path, control: ControlPlane | None = None):
        self.blocker = tmp_path / "blocker"        # a file here blocks the destination
        self.research = self.blocker / "research"
        config = load(str(init(tmp_path / "data", port=11112, ip="127.0.0.1", extra={
            "DESTINATIONS": {"research": {"type": "folder", "path": str(self.research)}}})))
        site = config.site(None)
        self.control: ControlPlane = control or open_control_plane(config, site)
        self.control.save_project(Project("PROJ", naming="^P[0-9]{4}$",
                                          events=["baseline", "followup"]))
        self.clock = FakeClock(start=NOW)
        self.forwarder = Forwarder(config, site, self.control, self.clock)
        made = make_study(tmp_path / "src", n_series=1, images_per_series=2, seed=3)
        self.study = made["study"]
        series_dir = self.forwarder.tree.raw / self.study / made["series"][0]
        series_dir.mkdir(parents=True)
        for f in made["files"]:
            shutil.copy(f, series_dir / f.name)

    def request(self, study_uid: str | None = None) -> TransferRequest:
        return self.control.add_request(TransferRequest(
            study_uid or self.study, "PROJ", "P0001", "baseline", requested=now_iso(self.clock)))

    def stored(self, req: TransferRequest) -> TransferRequest:
        return next(r for r in self.control.requests(req.study_uid) if r.instance == req.instance)

    def due(self) -> list[tuple[str, int]]:
        return [(r.study_uid, r.revision) for r in self.forwarder.due()]

    def run_due(self) -> int:
        """Process what is due now, as one turn of the daemon's loop does."""
        work = self.forwarder.due()
        for req in work:
            self.forwarder.process(req)
        return len(work)

    def delivered(self) -> int:
        return sum(1 for _ in self.research.rglob("*.dcm")) if self.research.is_dir() else 0

    def set_project(self, **changes) -> None:
        self.control.save_project(replace(self.control.project("PROJ"), **changes))


@pytest.fixture(params=["local", "redcap"])
def site(request, tmp_path) -> Site:
    if request.param == "local":
        yield Site(tmp_path)
        return
    emulator = RedcapEmulator()
    emulator.add_from_manifest(TOKENS, research_events=("baseline", "followup"))
    emulator.start()
    try:
        yield Site(tmp_path, RedcapControlPlane(emulator.url, dict(TOKENS), timeout=30))
    finally:
        emulator.stop()


def test_sent_once_and_recorded(site):
    req = site.request()
    assert site.run_due() == 1
    done = site.stored(req)
    assert done.complete and not done.pending and done.done_revision == done.revision == 1
    assert done.transferred == "2026-03-02 09:30:00" and done.mapped_uid
    assert site.delivered() == 2
    site.clock.advance(3600)
    assert site.due() == []


def test_back_off_after_a_destination_error_then_retried(site):
    site.blocker.write_text("not a folder")        # the destination cannot be created
    req = site.request()
    assert site.run_due() == 1
    stored = site.stored(req)
    assert stored.pending and not stored.error_flags and not stored.transferred
    first, second = BACKOFF_SECONDS[:2]
    site.clock.advance(first - 0.5)
    assert site.due() == []                         # not before the back-off has elapsed
    site.clock.advance(0.5)
    assert site.run_due() == 1                      # retried, still failing: waits longer
    site.clock.advance(second - 0.5)
    assert site.due() == []
    site.blocker.unlink()                           # the destination is back
    site.clock.advance(0.5)
    assert site.run_due() == 1
    assert site.stored(req).complete and site.delivered() == 2


def test_permanent_failure_is_recorded_with_its_message_and_not_retried(site):
    req = site.request("1.2.826.0.1.3680043.8.498.1")  # no such study on disk
    assert site.run_due() == 1
    failed = site.stored(req)
    assert "gone from disk" in failed.error_message and failed.error_flags == {1}
    assert not failed.complete and not failed.pending and failed.transferred
    site.clock.advance(24 * 3600)
    assert site.due() == []


def test_resend_in_the_same_second_as_the_completion_is_sent_again(site):
    """Before revisions, `requested > transferred` was false within one second: lost."""
    req = site.request()
    site.run_due()
    done = site.stored(req)
    assert not done.pending
    again = site.control.request_again(done, requested=done.transferred)  # same second
    assert again.pending and again.revision == 2
    assert site.due() == [(site.study, 2)]
    site.run_due()
    assert (site.stored(req).done_revision, site.stored(req).complete) == (2, True)


def test_assigner_resend_without_waiting_for_the_clock(site):
    req = site.request()
    site.run_due()
    assigner = Assigner(site.control, Keyed(site.forwarder.key))
    assert assigner.resend("PROJ") == 1
    assert site.stored(req).pending
    assert site.run_due() == 1 and not site.stored(req).pending


def test_revision_raised_while_sending_stays_pending(site):
    req = site.request()
    [read] = site.forwarder.due()                   # the forwarder reads revision 1 ...
    site.control.request_again(read)                # ... a late series raises it to 2 ...
    site.forwarder.process(read)                    # ... and revision 1 is sent
    stored = site.stored(req)
    assert (stored.revision, stored.done_revision) == (2, 1) and stored.pending
    assert site.due() == [(site.study, 2)]
    site.run_due()
    assert not site.stored(req).pending and site.stored(req).done_revision == 2


@pytest.mark.parametrize("closed,reopened,reason", [
    ({"active": False}, {"active": True}, "project PROJ is inactive"),
    ({"rec_end": "2026-03-01"}, {"rec_end": "2026-12-31"},
     "ethics approval ended on 2026-03-01"),
    ({"rec_start": "2026-03-03"}, {"rec_start": "2026-03-02"},
     "ethics approval starts on 2026-03-03"),
])
def test_closed_project_holds_the_request_until_it_is_open(site, closed, reopened, reason):
    site.set_project(**closed)
    req = site.request()
    assert site.run_due() == 1
    held = site.stored(req)
    assert held.pending and not held.complete and not held.error_flags
    assert held.error_message.startswith("held: ") and reason in held.error_message
    assert site.delivered() == 0
    site.clock.advance(HOLD_SECONDS - 1)
    assert site.due() == []                         # looked at again later, not at every turn
    site.clock.advance(1)
    assert site.run_due() == 1 and site.stored(req).pending  # still closed: still held
    site.set_project(**reopened)
    site.clock.advance(HOLD_SECONDS)
    assert site.run_due() == 1
    sent = site.stored(req)
    assert sent.complete and not sent.pending and sent.error_message == ""
    assert site.delivered() == 2


def test_approval_period_ends_are_inclusive(site):
    site.set_project(rec_start="2026-03-02", rec_end="2026-03-02")
    req = site.request()
    site.run_due()
    assert site.stored(req).complete


def test_a_reassigned_request_goes_under_its_new_participant_only(site):
    """The forwarder knows requests by instance: a reassign changes the key, and the old
    participant's version must not linger in what it has cached (REDCap's changes-since)."""
    req = site.request()
    site.set_project(active=False)
    site.run_due()                                  # held, cached by the forwarder
    site.control.reassign_request(site.stored(req), "P0002", "followup")
    site.set_project(active=True)
    site.clock.advance(HOLD_SECONDS)
    assert [(r.participant, r.event) for r in site.forwarder.due()] == [("P0002", "followup")]
    site.run_due()
    sent = site.stored(req)
    assert sent.participant == "P0002" and sent.complete and not sent.pending
