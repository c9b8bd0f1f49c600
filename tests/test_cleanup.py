"""`fiona clear-old-files` and `fiona clear-stale-links`.

Cleanup must never lose data that was not delivered: with a mix of studies above the watermark,
only those whose every request is complete and verified go (oldest first), unassigned ones only
when allowed and past their retention, and nothing at all when the control plane cannot be
reached or on a dry run. Data trees are laid out with `fiona.tree`'s names, disk usage and time
are injected."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from fiona import audit
from fiona.clock import FakeClock
from fiona.config import ConfigError, load
from fiona.control.base import Study, TransferRequest
from fiona.control.local import LocalControlPlane
from fiona.control.redcap import RedcapControlPlane
from fiona.journal import RECEIVED, JournalWriter
from fiona.ops.cleanup import Cleanup, CleanupError
from fiona.ops.links import StaleLinks
from fiona.scanner.steps import (
    COMPLETED,
    DISCONTINUED,
    FAILED,
    FINISHED,
    IN_PROGRESS,
    Step,
    Steps,
)
from fiona.tree import Tree, ensure_dir, series_links, symlink, touch
from helpers import Gateway, free_port
from redcap_emulator import RedcapEmulator

#: the job runs two days from now: files laid out by a test are not "just received"
NOW = datetime.now().replace(microsecond=0) + timedelta(days=2)
FILE_BYTES = 1000
TOTAL = 100_000
TOKENS = {"Incoming": "A" * 32, "Routing": "B" * 32, "CouplingList": "C" * 32,
          "AutoID": "D" * 32, "DataTransferProjects": "E" * 32, "PROJ": "F" * 32}


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{n}"


def lay_out(tree: Tree, study: str, n_files: int = 3, patient: str = "PAT0001",
            sr: bool = False) -> None:
    """A study as the receiver and indexer leave it: archive files, raw/ links and series
    JSON, the participants/ link, srs/ links."""
    series = study + ".1"
    folder = ensure_dir(tree.study_archive(study))
    links = ensure_dir(tree.series_dir(study, series))
    for i in range(n_files):
        sop = f"{series}.{i + 1}"
        path = folder / f"MR.{sop}"
        path.write_bytes(b"x" * FILE_BYTES)
        symlink(path, links / sop)
        if sr:
            symlink(path, ensure_dir(tree.srs_study("Maker", study)) / sop)
    tree.series_json(study, series).write_text(json.dumps({"NumFiles": n_files}))
    date = f"2024{int(study.rsplit('.', 1)[-1]):04d}_120000"  # one link per study
    symlink(tree.study_raw(study), ensure_dir(tree.participants / patient) / date)


def usage_of(tree: Tree, base: int = 50_000):
    """Disk usage from what the archive holds now: removing a study lowers it."""
    def usage(_path: Path) -> tuple[int, int]:
        used = base + sum(p.stat().st_size for p in tree.archive.glob("scp_*/*"))
        return used, TOTAL
    return usage


def request(study: str, project: str = "PROJ", participant: str = "P0001") -> TransferRequest:
    return TransferRequest(study, project, participant, "baseline", "2026-05-01 10:00:00")


def deliver(cp: LocalControlPlane, req: TransferRequest, flags: set[int] | None = None,
            error: str = "") -> TransferRequest:
    """Write an outcome as the forwarder does (`Forwarder._finish`)."""
    stored = cp.add_request(req)
    stored.done_revision = stored.revision
    stored.transferred = "2026-05-01 11:00:00"
    stored.complete = not error
    stored.error_flags = flags or ({2} if error else set())
    stored.error_message = error
    cp.update_request(stored)
    return stored


@pytest.fixture
def site(tmp_path):
    """A gateway's data tree and config (no daemons) with its local control plane."""
    gw = Gateway(tmp_path / "data", free_port(), {"DISK": {"refuse_store_percent": 95,
                                                           "cleanup_percent": 10}})
    config = load(str(gw.config))
    cp = LocalControlPlane(gw.datadir / "site" / "fiona.db")
    return gw, config, cp


def register(cp, study: str, arrival: datetime) -> None:
    cp.register_study(Study(uid=study, arrival=arrival.isoformat(sep=" ")))


@pytest.fixture
def mix(site):
    """Ten studies, arrival order = number: which may go is in the names."""
    gw, config, cp = site
    tree = gw.tree
    studies = {name: uid(n) for n, name in enumerate(
        ["delivered_old", "pending", "failed", "held", "unassigned_old", "unassigned_young",
         "resent", "delivered_masked", "half_delivered", "arriving", "unindexed",
         "just_received", "unregistered"], 1)}
    for n, (name, study) in enumerate(studies.items()):
        lay_out(tree, study, sr=(name == "delivered_old"))
        if name != "unregistered":
            young = name == "unassigned_young"
            register(cp, study, NOW - timedelta(days=5 if young else 60 - n))
    deliver(cp, request(studies["delivered_old"]))
    cp.add_request(request(studies["pending"]))
    deliver(cp, request(studies["failed"]), error="send: 1 object(s) refused")
    held = cp.add_request(request(studies["held"]))
    held.error_message = "held: project PROJ is inactive; it is sent when the project is open"
    cp.update_request(held)
    cp.request_again(deliver(cp, request(studies["resent"])))
    deliver(cp, request(studies["delivered_masked"]), flags={3})
    deliver(cp, request(studies["half_delivered"]))
    cp.add_request(request(studies["half_delivered"], project="OTHER"))
    deliver(cp, request(studies["arriving"]))
    touch(tree.arrived / f"SCU FIONA 127.0.0.1 {studies['arriving']} {studies['arriving']}.2")
    # a file received but not indexed yet: the receiver's journal line is past the indexer's
    deliver(cp, request(studies["unindexed"]))
    late = tree.archive_file(studies["unindexed"], "MR", studies["unindexed"] + ".2.1")
    late.write_bytes(b"x" * FILE_BYTES)
    journal = JournalWriter(tree.journal, RECEIVED)
    journal.append(f"SCU,FIONA,127.0.0.1,{late.parent},{late.name}")
    journal.close()
    # a file stored a moment ago, before its journal line
    deliver(cp, request(studies["just_received"]))
    moment = (NOW - timedelta(minutes=10)).timestamp()
    os.utime(tree.study_archive(studies["just_received"]), (moment, moment))
    return gw, config, cp, studies


def on_disk(tree: Tree, study: str) -> bool:
    return tree.study_archive(study).is_dir() and tree.study_raw(study).is_dir()


def cleanup(config, cp, gw, **kw) -> Cleanup:
    return Cleanup(config, config.site(None), cp, "os:test", clock=FakeClock(NOW),
                   usage=usage_of(gw.tree), **kw)


def test_only_delivered_studies_go_and_every_trace_of_them(mix, caplog):
    gw, config, cp, studies = mix
    caplog.set_level("INFO", logger="fiona.cleanup")
    report = cleanup(config, cp, gw).run()
    gone = {c.study for c in report.removed}
    assert gone == {studies["delivered_old"], studies["delivered_masked"]}
    assert [c.study for c in report.removed] == [studies["delivered_old"],
                                                studies["delivered_masked"]]  # oldest first
    for name, study in studies.items():
        assert on_disk(gw.tree, study) == (study not in gone), name
    assert report.kept == {"pending": 3, "failed": 1, "held": 1, "unassigned": 2,
                           "still arriving": 3, "not registered in the control plane": 1}
    old = studies["delivered_old"]
    assert not list(gw.tree.participants.glob("*/*")) or all(
        os.readlink(p) != f"../../raw/{old}" for p in gw.tree.participants.glob("*/*"))
    assert not gw.tree.srs_study("Maker", old).exists()
    assert len([p for p in gw.tree.participants.glob("*/*")]) == len(studies) - 2
    # one log line and one audit entry per study, with the UID and no patient identifier
    lines = [r.getMessage() for r in caplog.records if r.name == "fiona.cleanup"]
    assert len(lines) == 2 and all("PAT0001" not in line for line in lines)
    assert old in lines[0]
    entries = [json.loads(x) for x in audit.audit_path(gw.datadir).read_text().splitlines()]
    assert [e["details"]["study"] for e in entries if e["action"] == "remove study"] == \
        [old, studies["delivered_masked"]]
    assert audit.verify(gw.datadir)[1] is None


def test_unassigned_only_when_allowed_and_past_retention(mix):
    gw, config, cp, studies = mix
    report = cleanup(config, cp, gw, include_unassigned=True).run()
    assert {c.study for c in report.removed} == {
        studies["delivered_old"], studies["delivered_masked"], studies["unassigned_old"]}
    assert on_disk(gw.tree, studies["unassigned_young"])
    assert report.kept["unassigned, within retention"] == 1


def test_config_switch_allows_unassigned(mix):
    gw, config, cp, studies = mix
    config.cleanup_unassigned = True
    config.retention_days_unassigned = 1
    gone = {c.study for c in cleanup(config, cp, gw).run().removed}
    assert {studies["unassigned_old"], studies["unassigned_young"]} <= gone
    assert studies["pending"] not in gone


def test_stops_below_the_watermark(mix):
    gw, config, cp, studies = mix
    used = usage_of(gw.tree)(gw.datadir)[0]
    config.cleanup_percent = 100 * (used - FILE_BYTES) / TOTAL  # one study is enough
    report = cleanup(config, cp, gw).run()
    assert [c.study for c in report.removed] == [studies["delivered_old"]]
    assert on_disk(gw.tree, studies["delivered_masked"])


def test_below_the_watermark_nothing_goes(mix):
    gw, config, cp, studies = mix
    config.cleanup_percent = 90
    assert cleanup(config, cp, gw).run().removed == []
    assert all(on_disk(gw.tree, s) for s in studies.values())


def test_dry_run_removes_nothing_and_says_what_would_go(mix):
    gw, config, cp, studies = mix
    before = sorted(str(p) for p in gw.datadir.rglob("*") if "logs" not in p.parts)
    report = cleanup(config, cp, gw).run(dry_run=True)
    assert {c.study for c in report.removed} == {studies["delivered_old"],
                                                 studies["delivered_masked"]}
    assert sorted(str(p) for p in gw.datadir.rglob("*") if "logs" not in p.parts) == before
    assert not audit.audit_path(gw.datadir).exists()


def test_a_resend_between_plan_and_removal_keeps_the_study(mix):
    gw, config, cp, studies = mix
    job = cleanup(config, cp, gw)
    candidates, _ = job.candidates()
    assert candidates[0].study == studies["delivered_old"]
    cp.request_again(cp.requests(studies["delivered_old"])[0])
    report = job.run()
    assert on_disk(gw.tree, studies["delivered_old"])
    assert report.kept["pending"] == 4


def test_cli_dry_run(mix):
    gw, config, cp, studies = mix
    # the real disk: DISK.cleanup_percent 0 puts any disk above the watermark
    raw = json.loads(gw.config.read_text())
    raw["DISK"] = {"refuse_store_percent": 95, "cleanup_percent": 0}
    gw.config.write_text(json.dumps(raw))
    hours_ago = (datetime.now() - timedelta(hours=2)).timestamp()  # the real clock, here
    for folder in gw.tree.archive.iterdir():
        os.utime(folder, (hours_ago, hours_ago))
    res = gw.run("clear-old-files", "--dry-run")
    assert f"would remove study {studies['delivered_old']}" in res.stdout
    assert studies["pending"] not in res.stdout
    assert all(on_disk(gw.tree, s) for s in studies.values())


def test_control_plane_unreachable_removes_nothing(site):
    gw, config, _local = site
    emu = RedcapEmulator()
    emu.add_from_manifest(TOKENS, research_events=("baseline",))
    emu.start()
    study = uid(1)
    lay_out(gw.tree, study)
    cp = RedcapControlPlane(emu.url, dict(TOKENS), timeout=5)
    register(cp, study, NOW - timedelta(days=90))
    deliver(cp, request(study))
    emu.stop()
    with pytest.raises(CleanupError, match="cannot be reached.*nothing was removed"):
        cleanup(config, cp, gw, include_unassigned=True).run()
    assert on_disk(gw.tree, study)
    assert not audit.audit_path(gw.datadir).exists()


def test_cli_exits_1_when_the_control_plane_is_down(site):
    gw, config, _local = site
    emu = RedcapEmulator()
    emu.add_from_manifest(TOKENS, research_events=("baseline",))
    emu.start()
    url = emu.url
    emu.stop()
    tokens = gw.datadir / "config" / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    tokens.chmod(0o600)
    raw = json.loads(gw.config.read_text())
    raw["DISK"] = {"refuse_store_percent": 95, "cleanup_percent": 0}
    raw["CONTROL_PLANE"] = {"type": "redcap", "url": url, "tokens": str(tokens)}
    gw.config.write_text(json.dumps(raw))
    lay_out(gw.tree, uid(1))
    res = gw.run("clear-old-files", "--include-unassigned", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "cannot be reached" in res.stderr and "nothing was removed" in res.stderr
    assert on_disk(gw.tree, uid(1))


# --- clear-stale-links ----------------------------------------------------------------------------
def test_stale_links_go_and_nothing_else(site):
    gw, _config, _cp = site
    tree = gw.tree
    kept, orphan, arriving = uid(1), uid(2), uid(3)
    for study in (kept, orphan, arriving):
        lay_out(tree, study, sr=True)
    # files deleted by hand: the orphan's whole archive, one file of the kept study
    for path in tree.study_archive(orphan).iterdir():
        path.unlink()
    tree.study_archive(orphan).rmdir()
    one = sorted(tree.study_archive(kept).iterdir())[0]
    one.unlink()
    for path in tree.study_archive(arriving).iterdir():
        path.unlink()
    touch(tree.arrived / f"SCU FIONA 127.0.0.1 {arriving} {arriving}.1")
    fresh = ensure_dir(tree.raw / uid(9) / (uid(9) + ".1"))   # the indexer's next series
    clock = FakeClock(datetime.now() + timedelta(hours=2))
    os.utime(fresh, (clock.time(), clock.time()))
    # links a killed indexer left under their temporary names: one long ago, one just now
    series = tree.series_dir(kept, kept + ".1")
    target = os.readlink(sorted(series.iterdir())[-1])
    (series / ".tmp.1.2.3.4242").symlink_to(target)
    (series / ".tmp.1.2.4.4243").symlink_to(target)
    os.utime(series / ".tmp.1.2.4.4243", (clock.time(), clock.time()), follow_symlinks=False)
    half_written = tree.study_raw(kept) / ".tmp.k2j4l1x9"        # a series JSON's
    half_written.write_text("{")

    dry = StaleLinks(tree, clock).run(dry_run=True)
    assert tree.study_raw(orphan).is_dir()           # a dry run removes nothing
    report = StaleLinks(tree, clock).run()
    assert sorted(map(str, dry.links)) == sorted(map(str, report.links))
    assert not tree.study_raw(orphan).exists()
    assert not (tree.srs / "Maker" / orphan).exists()
    assert all(os.path.exists(p) for p in tree.participants.glob("*/*"))
    assert len(list(tree.participants.glob("*/*"))) == 2
    assert not (tree.series_dir(kept, kept + ".1") / one.name.split(".", 1)[1]).is_symlink()
    assert sorted(os.listdir(series)) == [".tmp.1.2.4.4243"] + sorted(
        p.name for p in series_links(series))     # the old leftover went, the fresh one stays
    assert len(series_links(series)) == 2
    assert not half_written.exists()
    assert tree.series_json(kept, kept + ".1").exists()
    assert tree.study_raw(arriving).is_dir()          # still arriving: left alone
    assert fresh.is_dir()                             # within the grace period
    assert tree.study_archive(kept).is_dir()          # the archive is never touched


def test_cli_clear_stale_links(site):
    gw, _config, _cp = site
    lay_out(gw.tree, uid(1))
    (gw.tree.study_raw(uid(1)) / (uid(1) + ".1") / "1.2.3").symlink_to("../../nowhere")
    res = gw.run("clear-stale-links")
    assert "removed 1 dangling link(s) or temporaries" in res.stdout


# --- MPPS steps and scan outcomes -----------------------------------------------------------------
def test_old_concluded_scans_and_steps_go_never_an_active_one(site):
    gw, config, cp = site
    steps = Steps(gw.datadir)

    def ago(days: float) -> float:
        return (NOW - timedelta(days=days)).timestamp()

    def step(sop: str, status: str, studies: list[str], days: float) -> None:
        steps.put(Step(uid(sop), status, [uid(s) for s in studies], ago(days),
                       {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}}))

    def conclude(study: str, state: str, sops: list[str], days: float) -> None:
        steps.conclude(uid(study), state, [uid(s) for s in sops], ago(days))

    step("101", COMPLETED, ["1"], 40)                # finished 35 days ago: both go
    conclude("1", FINISHED, ["101"], 35)
    step("102", IN_PROGRESS, ["2"], 40)              # failed 39 days ago: both go
    conclude("2", FAILED, ["102"], 39)
    step("103", COMPLETED, ["3"], 60)                # active (images still missing): stays
    step("104", COMPLETED, ["4"], 40)                # finished 5 days ago: stays
    conclude("4", FINISHED, ["104"], 5)
    step("105", COMPLETED, ["5", "6"], 40)           # one of its studies recent: all stay
    conclude("5", FINISHED, ["105"], 35)
    conclude("6", FINISHED, ["105"], 2)
    step("107", COMPLETED, ["7"], 50)                # a rescan: the old step goes, the
    conclude("7", FINISHED, ["107"], 45)             # outcome stays with the new step
    step("108", IN_PROGRESS, ["7"], 1)
    step("109", DISCONTINUED, [], 40)                # no study: goes once concluded
    step("110", IN_PROGRESS, [], 40)                 # ... not while in progress
    active = steps.active()
    assert set(active) == {uid(3), uid(7)}

    dry = cleanup(config, cp, gw).run(dry_run=True).scans
    assert (dry.steps, dry.scans) == ([uid(s) for s in ("101", "102", "107", "109")],
                                      [uid(1), uid(2)])
    assert len(steps.all()) == 9 and not audit.audit_path(gw.datadir).exists()

    report = cleanup(config, cp, gw).run()
    assert (report.scans.steps, report.scans.scans) == (dry.steps, dry.scans)
    assert sorted(s.sop for s in steps.all()) == [uid(s) for s in ("103", "104", "105", "108",
                                                                  "110")]  # was: all kept
    assert [steps.outcome(uid(s)) is not None for s in range(1, 8)] == \
        [False, False, False, True, True, True, True]
    assert set(steps.active()) == set(active)
    entry = audit.audit_path(gw.datadir).read_text().splitlines()[-1]
    assert "prune scan records" in entry and "Doe" not in entry
    # a shorter retention (DISK.scan_retention_days) takes the rest that is concluded
    config.scan_retention_days = 1
    cleanup(config, cp, gw).run()
    assert sorted(s.sop for s in steps.all()) == [uid("103"), uid("108"), uid("110")]


def test_scan_retention_is_checked(tmp_path):
    gw = Gateway(tmp_path / "data", free_port())
    raw = json.loads(gw.config.read_text())
    raw["DISK"] = {"scan_retention_days": 0}
    gw.config.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="DISK.scan_retention_days"):
        load(str(gw.config))
    raw["DISK"] = {"scan_retention_days": 7}
    gw.config.write_text(json.dumps(raw))
    assert load(str(gw.config)).scan_retention_days == 7
    del raw["DISK"]
    gw.config.write_text(json.dumps(raw))
    assert load(str(gw.config)).scan_retention_days == 30
