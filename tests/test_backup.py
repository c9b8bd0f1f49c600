"""`fiona backup` and `fiona restore`: a running gateway with requests in flight is backed up,
restored into a fresh tree (its archive from the "site's file backup", here a copy), started,
and the pending requests complete. The backup keeps secrets 0600, leaves web sessions out and
is checked against its manifest before anything is restored; a tree that is not empty is
refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

from dicomgen import make_study
from fiona import audit
from fiona.config import load
from fiona.control import open_control_plane
from fiona.tree import Tree
from helpers import Gateway, free_port, wait_for


def control(config: Path):
    return open_control_plane(load(str(config)))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def restored_gateway(datadir: Path, port: int) -> Gateway:
    """A Gateway handle on a tree made by `fiona restore` (not by `fiona init`)."""
    gw = Gateway.__new__(Gateway)
    gw.datadir, gw.port, gw.procs = datadir, port, {}
    gw.config, gw.tree = datadir / "config" / "config.json", Tree(datadir)
    return gw


def test_backup_of_a_running_gateway_restores_and_pending_requests_complete(tmp_path):
    gw = Gateway(tmp_path / "data", free_port(), {"STUDY_QUIET_SECONDS": 1})
    gw.run("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline")
    password = tmp_path / "pw"
    password.write_text("correct horse battery staple\n")
    gw.run("user", "add", "alice", "--role", "admin", "--password-file", str(password))
    (gw.datadir / "site" / "web-sessions.sqlite").write_bytes(b"sessions")
    for daemon in ("storescp", "process-single-file", "detect-study-arrival"):
        gw.start(daemon)
    studies = [make_study(tmp_path / f"s{i}", n_series=1, images_per_series=3, seed=i,
                          accession=f"B{i}") for i in range(2)]
    for i, study in enumerate(studies):
        assert gw.storescu(tmp_path / f"s{i}").returncode == 0
        wait_for(lambda s=study: control(gw.config).study(s["study"]), 60, "registration")
        gw.run("assign", study["study"], "--project", "PROJ", "--participant", f"P000{i}",
               "--event", "baseline")
    assert all(r.pending for r in control(gw.config).requests())   # no forwarder yet

    backup = tmp_path / "backup"
    res = gw.run("backup", str(backup))          # while receiver, indexer and arrival run
    assert "backed up" in res.stdout
    manifest = json.loads((backup / "manifest.json").read_text())
    files = manifest["files"]
    assert {"config/config.json", "config/secret.key", "config/users.json",
            "config/audit.head", "logs/audit.log", "site/fiona.db"} <= set(files)
    assert not any("web-sessions" in name for name in files)
    for name in ("config/secret.key", "config/users.json", "manifest.json"):
        assert mode(backup / name) == 0o600, name
    assert mode(backup) == 0o700
    for name, rec in files.items():
        assert hashlib.sha256((backup / name).read_bytes()).hexdigest() == rec["sha256"]

    # a backup does not go into a folder with something in it
    assert gw.run("backup", str(backup), check=False).returncode == 1
    # nor is a tree that is not empty restored into
    refused = gw.run("restore", str(backup), check=False)
    assert refused.returncode == 1 and "not an empty data tree" in refused.stderr
    # a changed file is found before anything is written
    tampered = tmp_path / "tampered"
    shutil.copytree(backup, tampered)
    (tampered / "config" / "enabled").write_text("000\n")
    target = tmp_path / "restored"
    bad = gw.run("restore", str(tampered), "--data", str(target), check=False)
    assert bad.returncode == 1 and "config/enabled: checksum" in bad.stderr
    assert not target.exists()

    res = gw.run("restore", str(backup), "--data", str(target))
    assert "restored" in res.stdout
    gw.stop_all()
    # the site's file backup brings the archive (and the links made from it) back
    for part in ("archive", "raw"):
        shutil.copytree(gw.tree.site / part, target / "site" / part, symlinks=True,
                        dirs_exist_ok=True)
    new = restored_gateway(target, gw.port)
    assert load(str(new.config)).datadir == target
    assert mode(target / "config" / "secret.key") == 0o600
    assert not (target / "site" / "web-sessions.sqlite").exists()
    assert audit.verify(target) == (len(audit.audit_path(target).read_text().splitlines()),
                                    None)
    actions = [json.loads(line)["action"] for line in
               audit.audit_path(target).read_text().splitlines()]
    assert actions[-2:] == ["backup", "restore"]

    research = gw.datadir / "research"   # the folder destination, named in config.json
    assert not list(research.rglob("*.dcm"))
    new.start("anonymize-and-send")
    wait_for(lambda: all(r.complete and not r.pending
                         for r in control(new.config).requests()), 180,
             "the restored gateway to send the pending requests")
    assert len(list(research.rglob("*.dcm"))) == 6
    new.stop_all()


def test_a_backup_never_carries_permissions_for_others(tmp_path):
    """A file someone left world-writable in DATADIR/config is backed up and restored with at
    most owner read/write and group read."""
    from fiona.ops.backup import backup, restore

    gw = Gateway(tmp_path / "data", free_port())
    loose = gw.datadir / "config" / "profiles-note.txt"
    loose.write_text("site note\n")
    loose.chmod(0o666)
    config = load(str(gw.config))
    backup(config, config.site(None), tmp_path / "bk", "test")
    assert mode(tmp_path / "bk" / "config" / "profiles-note.txt") == 0o640
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    assert all(int(r["mode"], 8) & 0o007 == 0 for r in manifest["files"].values())
    restored, _ = restore(tmp_path / "bk", tmp_path / "fresh", "test")
    assert mode(restored / "config" / "profiles-note.txt") == 0o640
