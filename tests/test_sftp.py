"""The `sftp` destination and the outbox job (`fiona send-files`) against a real OpenSSH server
on loopback (tests/sshd.py): verified uploads, host-key checking, the key's file mode, a server
killed mid-upload, and the outbox's never-replace rule."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona.clock import FakeClock
from fiona.config import ConfigError, parse
from fiona.send.destinations import DestinationError, open_destination
from fiona.send.destinations.sftp import SftpDestination
from helpers import Gateway, free_port, wait_for
from sshd import Sshd, keygen, sshd_fixture  # noqa: F401  (the fixture `sshd`)
from test_forward import completed, couple, requests


def remote_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_key_readable_by_others_is_refused_at_config_check(tmp_path):
    key = keygen(tmp_path / "key")
    known = tmp_path / "known_hosts"
    known.write_text("")
    entry = {"type": "sftp", "host": "127.0.0.1", "user": "fiona", "key": str(key),
             "known_hosts": str(known), "remote_dir": "/in"}
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as err:
        parse({"DATADIR": str(tmp_path / "data"), "DESTINATIONS": {"remote": entry}},
              tmp_path / "config.json")
    assert any("DESTINATIONS.remote.key" in e and "mode 0644" in e and f"chmod 600 {key}" in e
               for e in err.value.errors), err.value.errors
    os.chmod(key, 0o600)
    config = parse({"DATADIR": str(tmp_path / "data"), "DESTINATIONS": {"remote": entry}},
                   tmp_path / "config.json")
    assert isinstance(open_destination("remote", config), SftpDestination)
    missing = {k: v for k, v in entry.items() if k != "known_hosts"}
    with pytest.raises(ConfigError, match="known_hosts"):
        parse({"DATADIR": str(tmp_path / "data"), "DESTINATIONS": {"remote": missing}},
              tmp_path / "config.json")


def test_wrong_or_unknown_host_key_is_refused_with_a_clear_message(tmp_path, sshd):
    other = keygen(tmp_path / "other_host_key")
    kind, key = Path(f"{other}.pub").read_text().split()[:2]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    dest = SftpDestination("remote", sshd.settings(known_hosts=str(wrong)))
    with pytest.raises(DestinationError, match=r"host key of 127\.0\.0\.1:\d+ .* is not the one "
                                               r"in .*wrong_known_hosts: refused"):
        dest.test_connection()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    dest = SftpDestination("remote", sshd.settings(known_hosts=str(empty)))
    with pytest.raises(DestinationError, match="is not in .*empty_known_hosts; its host key is "
                                               "never accepted unseen"):
        dest.test_connection()
    assert remote_files(sshd.remote) == []
    SftpDestination("remote", sshd.settings()).test_connection()  # the right key works


def test_server_killed_mid_upload_then_restarted_completes_once(tmp_path, sshd):
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2, rows=4096, cols=4096)
    dest = SftpDestination("remote", sshd.settings())
    cut = threading.Event()

    def kill_mid_upload() -> None:
        def partial():
            return [p for p in sshd.remote.rglob(".*.part") if p.stat().st_size > 1 << 20]
        wait_for(partial, 120, "an upload in progress", interval=0.005)
        sshd.stop(grace=0.2)
        cut.set()

    finals = [sshd.remote / study["study"] / study["series"][0] /
              f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm"
              for f in study["files"]]
    seen: list[list[Path]] = []

    class RestartingClock(FakeClock):
        """The retry's pause: check what the cut left, then bring the server back."""

        def sleep(self, seconds: float) -> None:
            super().sleep(seconds)
            if not seen:
                assert cut.wait(60)
                seen.append(remote_files(sshd.remote))
                sshd.start()

    dest.clock = RestartingClock()
    killer = threading.Thread(target=kill_mid_upload)
    killer.start()
    result = dest.send(study["files"])
    killer.join()
    assert cut.is_set() and seen, "the server was not stopped mid-upload"
    # after the cut: a partial temporary file, nothing under a final name that is not whole
    partial = [p for p in seen[0] if p.name.endswith(".part")]
    assert len(partial) == 1
    for p in seen[0]:
        if not p.name.endswith(".part"):
            assert p in finals and p.stat().st_size == Path(study["files"][finals.index(p)]) \
                .stat().st_size
    assert result.sent == 2 and result.complete
    assert remote_files(sshd.remote) == sorted(finals)
    for local, remote in zip(study["files"], finals, strict=True):
        assert remote.read_bytes() == Path(local).read_bytes()
    assert dest.count_instances(study["study"]) == {study["series"][0]: 2}


def forwarding_gateway(tmp_path: Path, server: Sshd) -> Gateway:
    gw = Gateway(tmp_path / "data", free_port(), {
        "STUDY_QUIET_SECONDS": 2, "DESTINATIONS": {"research": server.settings()}})
    gw.run("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events", "baseline")
    for daemon in ("storescp", "process-single-file", "detect-study-arrival",
                   "anonymize-and-send"):
        gw.start(daemon)
    return gw


@pytest.mark.e2e
def test_study_forwarded_to_sftp_arrives_deidentified_and_verified(tmp_path, sshd):
    gw = forwarding_gateway(tmp_path, sshd)
    study = make_study(tmp_path / "s", n_series=2, images_per_series=3, patient_id="NID0202",
                       patient_name="Berg^Nils", accession="SFTP1")
    couple(gw, tmp_path, "SFTP1", "P0002", "baseline")
    assert gw.storescu(tmp_path / "s").returncode == 0
    req = completed(gw, study["study"])
    assert not req.error_message and req.mapped_uid != study["study"]
    files = remote_files(sshd.remote)
    assert len(files) == 6 and not [p for p in files if p.name.startswith(".")]
    for f in files:
        assert f.relative_to(sshd.remote).parts[0] == req.mapped_uid
        ds = pydicom.dcmread(f)
        assert ds.PatientID == "P0002" and ds.StudyInstanceUID == req.mapped_uid
        assert "Berg" not in str(ds.PatientName) and ds.get("AccessionNumber", "") != "SFTP1"
    assert len(requests(gw, study["study"])) == 1


@pytest.mark.e2e
def test_server_down_shows_on_the_request_and_the_study_goes_when_it_is_back(tmp_path, sshd):
    gw = forwarding_gateway(tmp_path, sshd)
    sshd.stop()
    study = make_study(tmp_path / "s", n_series=1, images_per_series=2, accession="SFTP2")
    couple(gw, tmp_path, "SFTP2", "P0003", "baseline")
    assert gw.storescu(tmp_path / "s").returncode == 0

    def waiting():
        reqs = requests(gw, study["study"])
        return reqs[0] if reqs and "destination unavailable, retrying" in reqs[0].error_message \
            else None

    req = wait_for(waiting, 180, "the request to show the unreachable server")
    assert not req.complete and "cannot connect" in req.error_message
    sshd.start()
    req = completed(gw, study["study"])
    assert not req.error_message and not req.error_flags
    assert len(remote_files(sshd.remote)) == 2


def queue(outbox: Path, name: str, data: bytes, md5: str | None = None) -> Path:
    path = outbox / name
    path.write_bytes(data)
    (outbox / f"{name}.md5sum").write_text(f"{md5 or hashlib.md5(data).hexdigest()}  {name}\n")
    return path


@pytest.mark.e2e
def test_outbox_delivered_moved_to_done_and_a_differing_remote_file_reported(tmp_path, sshd):
    gw = Gateway(tmp_path / "data", free_port(), {"DESTINATIONS": {"outbox": sshd.settings()}})
    outbox, done = gw.tree.outbox, gw.tree.outbox / "done"
    big = os.urandom(3 << 20)
    queue(outbox, "export_P0001.zip", big)
    queue(outbox, "export_P0002.zip", b"second")
    queue(outbox, "clash.zip", b"ours")
    (sshd.remote / "clash.zip").write_bytes(b"theirs, different")
    queue(outbox, "corrupt.zip", b"bytes", md5="0" * 32)
    (outbox / "half-written.zip").write_bytes(b"no md5sum yet")

    res = gw.run("send-files", check=False)
    assert res.returncode == 1, res.stderr
    assert "2 delivered" in res.stdout and "1 waiting" in res.stdout
    assert "clash.zip" in res.stderr and "differs" in res.stderr and "not replaced" in res.stderr
    assert "corrupt.zip: the file does not match its .md5sum" in res.stderr
    assert (sshd.remote / "export_P0001.zip").read_bytes() == big
    assert (sshd.remote / "export_P0002.zip").read_bytes() == b"second"
    assert (sshd.remote / "clash.zip").read_bytes() == b"theirs, different"
    assert sorted(p.name for p in done.iterdir()) == [
        "export_P0001.zip", "export_P0001.zip.md5sum", "export_P0002.zip",
        "export_P0002.zip.md5sum"]
    assert sorted(p.name for p in outbox.iterdir() if not p.name.startswith(".")) == [
        "clash.zip", "clash.zip.md5sum", "corrupt.zip", "corrupt.zip.md5sum", "done",
        "half-written.zip"]
    assert not [p for p in sshd.remote.iterdir() if p.name.startswith(".")]

    # the next run checks delivered files again: one gone from the server is sent again, one
    # the server's .md5 sidecar contradicts is reported and left alone
    (sshd.remote / "clash.zip").unlink()
    (sshd.remote / "export_P0001.zip").unlink()
    (sshd.remote / "export_P0002.zip.md5").write_text("0" * 32 + "  export_P0002.zip\n")
    res = gw.run("send-files", check=False)
    assert res.returncode == 1
    assert "export_P0002.zip" in res.stderr and "the server's .md5 file" in res.stderr
    assert (sshd.remote / "export_P0001.zip").read_bytes() == big
    assert (sshd.remote / "clash.zip").read_bytes() == b"ours"
    assert (done / "clash.zip").exists() and not (outbox / "clash.zip").exists()

    (sshd.remote / "export_P0002.zip.md5").write_text(
        hashlib.md5(b"second").hexdigest() + "  export_P0002.zip\n")
    (outbox / "corrupt.zip").unlink()
    (outbox / "corrupt.zip.md5sum").unlink()
    res = gw.run("send-files", check=False)
    assert res.returncode == 0, res.stderr
    assert "0 delivered, 3 checked again, 1 waiting" in res.stdout
    log = (gw.datadir / "logs" / "sendFiles.log").read_text()
    assert "clash.zip delivered" in log


def test_outbox_job_without_sftp_destination(tmp_path):
    """The cron line runs on every site: with no sftp destination and nothing queued it does
    nothing; a queued file with nowhere to go is a configuration error (exit 2)."""
    gw = Gateway(tmp_path / "data", free_port())
    res = gw.run("send-files")
    assert (res.stdout, res.stderr) == ("", "")
    queue(gw.tree.outbox, "export.zip", b"data")
    res = gw.run("send-files", check=False)
    assert res.returncode == 2 and "no sftp destination" in res.stderr
    assert (gw.tree.outbox / "export.zip").exists()


def test_replacing_a_file_drops_the_servers_sidecar_of_the_old_one(tmp_path, sshd):
    """The destination replaces a different file of the same name (as a PACS overwrites an
    instance); the server's checksum file described the old contents and must not fail the
    new upload's verification."""
    dest = SftpDestination("remote", sshd.settings())
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"old contents")
    new.write_bytes(b"new contents!")
    remote = str(sshd.remote / "f.dcm")
    assert dest.run(lambda sftp: sftp.put(old, remote)) is True
    (sshd.remote / "f.dcm.md5").write_text(hashlib.md5(b"old contents").hexdigest() + "\n")
    assert dest.run(lambda sftp: sftp.put(old, remote)) is False  # the sidecar agrees
    assert dest.run(lambda sftp: sftp.put(new, remote)) is True
    assert (sshd.remote / "f.dcm").read_bytes() == b"new contents!"
    assert [p.name for p in sshd.remote.iterdir()] == ["f.dcm"]


def test_an_interrupted_upload_resumes_from_what_the_server_holds(tmp_path, sshd, monkeypatch):
    """A temporary file left by a cut upload that is a true prefix of the file is appended to
    (its bytes are not sent again); one that differs is started again from zero."""
    import paramiko

    data = os.urandom(3 << 20)
    local = tmp_path / "big.zip"
    local.write_bytes(data)
    final, temp = sshd.remote / "big.zip", sshd.remote / ".big.zip.part"
    written: list[int] = []
    real_write = paramiko.SFTPFile.write
    monkeypatch.setattr(paramiko.SFTPFile, "write",
                        lambda fh, chunk: written.append(len(chunk)) or real_write(fh, chunk))
    dest = SftpDestination("remote", sshd.settings())

    temp.write_bytes(data[:2 << 20])                    # the cut left two thirds
    assert dest.run(lambda sftp: sftp.put(local, str(final))) is True
    assert final.read_bytes() == data and not temp.exists()
    assert sum(written) == len(data) - (2 << 20)          # was: the whole file again

    final.unlink()
    written.clear()
    temp.write_bytes(data[:1 << 20] + b"\0" * 10)        # not a prefix: start again
    assert dest.run(lambda sftp: sftp.put(local, str(final))) is True
    assert final.read_bytes() == data and not temp.exists()
    assert sum(written) == len(data)
