"""Unit tests for fiona.config, fiona.bootstrap and the `fiona config check` / `fiona init` CLI.

SPEC §1: unknown keys are an error naming the key; a missing required key names the key and
shows an example value; secrets are separate files that must be mode 0600; the `enabled` file
switches parts on and off (missing means all on).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fiona import config as cfgmod
from fiona.bootstrap import init
from fiona.config import ConfigError, Site, config_path, is_enabled, load, parse, read_secret

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def write_config(tmp_path: Path, raw: object, name: str = "config.json") -> Path:
    folder = tmp_path / "config"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw, indent=2))
    return path


def errors_of(tmp_path: Path, raw: object) -> list[str]:
    path = write_config(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.errors, "a ConfigError must carry at least one message"
    return info.value.errors


def one_error(tmp_path: Path, raw: object, needle: str) -> str:
    """The single error message containing `needle` (fails if none)."""
    errs = errors_of(tmp_path, raw)
    hits = [e for e in errs if needle in e]
    assert hits, f"no error mentions {needle!r}: {errs}"
    return hits[0]


def run_fiona(*args: str, env_extra: dict | None = None, drop_env: bool = True
              ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if drop_env:
        env.pop("FIONA_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fiona", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


GOOD_SITE = {"DATADIR": "ct", "DICOMPORT": 11113, "DICOMAETITLE": "FIONACT"}


# ---------------------------------------------------------------- unknown keys

def test_unknown_top_level_key_is_named_with_known_keys(tmp_path):
    msg = one_error(tmp_path, {"DICOMPORTT": 11112}, "DICOMPORTT")
    assert "unknown key" in msg
    for known in ("DATADIR", "DICOMPORT", "SITES", "DESTINATIONS"):
        assert known in msg


@pytest.mark.parametrize("raw, path", [
    ({"DISK": {"refuse_percent": 90}}, "DISK.refuse_percent"),
    ({"SITES": {"CT": {**GOOD_SITE, "PORT": 11113}}}, "SITES.CT.PORT"),
    ({"DESTINATIONS": {"research": {"type": "folder", "path": "/x", "pth": "/y"}}},
     "DESTINATIONS.research.pth"),
    ({"WEB": {"hots": "127.0.0.1"}}, "WEB.hots"),
    ({"CONTROL_PLANE": {"type": "local", "url": "https://x"}}, "CONTROL_PLANE.url"),
])
def test_unknown_nested_key_is_named_with_its_path(tmp_path, raw, path):
    msg = one_error(tmp_path, raw, path)
    assert "unknown key" in msg and "known keys" in msg


def test_all_errors_are_reported_at_once(tmp_path):
    errs = errors_of(tmp_path, {"FOO": 1, "DICOMPORT": "abc", "DISK": {"bar": 1}})
    text = "\n".join(errs)
    assert "FOO" in text and "DICOMPORT" in text and "DISK.bar" in text
    assert len(errs) >= 3


# ---------------------------------------------------------------- missing required keys

@pytest.mark.parametrize("entry,key", [({"DATADIR": "/x"}, "SITES.CT.DICOMPORT"),
                                       ({"DICOMPORT": 11113}, "SITES.CT.DATADIR"),
                                       ({}, "SITES.CT.DATADIR")])
def test_site_without_a_required_key(tmp_path, entry, key):
    with pytest.raises(ConfigError) as info:
        parse({"SITES": {"CT": entry}}, tmp_path / "config.json")
    text = "; ".join(info.value.errors)
    assert f"missing required key {key}, e.g." in text

def test_folder_destination_without_path(tmp_path):
    msg = one_error(tmp_path, {"DESTINATIONS": {"research": {"type": "folder"}}},
                    "DESTINATIONS.research.path")
    assert "missing required key" in msg
    assert '"/data/research"' in msg  # the example value


def test_dicom_destination_without_host_and_port(tmp_path):
    errs = errors_of(tmp_path, {"DESTINATIONS": {"pacs": {"type": "dicom", "aetitle": "PACS"}}})
    text = "\n".join(errs)
    assert "DESTINATIONS.pacs.host" in text and "127.0.0.1" in text
    assert "DESTINATIONS.pacs.port" in text and "4242" in text


def test_redcap_control_plane_without_url(tmp_path):
    msg = one_error(tmp_path, {"CONTROL_PLANE": {"type": "redcap",
                                                 "tokens": "/data/config/tokens.json"}},
                    "CONTROL_PLANE.url")
    assert "missing required key" in msg
    assert "https://redcap.example.org/api/" in msg


def test_unknown_destination_type_and_control_plane_type(tmp_path):
    errs = errors_of(tmp_path, {"DESTINATIONS": {"x": {"type": "ftp"}},
                                "CONTROL_PLANE": {"type": "mysql"}})
    text = "\n".join(errs)
    assert "DESTINATIONS.x.type" in text and "folder" in text
    assert "CONTROL_PLANE.type" in text and "local" in text


# ---------------------------------------------------------------- types and values

@pytest.mark.parametrize("value", ["abc", 70000, 0, -1, True, 11112.5])
def test_bad_dicomport(tmp_path, value):
    msg = one_error(tmp_path, {"DICOMPORT": value}, "DICOMPORT")
    assert "65535" in msg


def test_bad_site_port(tmp_path):
    one_error(tmp_path, {"SITES": {"CT": {**GOOD_SITE, "DICOMPORT": 70000}}},
              "SITES.CT.DICOMPORT")


@pytest.mark.parametrize("value", [-1, 0, "16", None])
def test_bad_study_quiet_seconds(tmp_path, value):
    one_error(tmp_path, {"STUDY_QUIET_SECONDS": value}, "STUDY_QUIET_SECONDS")


@pytest.mark.parametrize("value", ["FI\\ONA", "A" * 17, "", "   ", "FI\x01ONA", 42])
def test_bad_ae_title(tmp_path, value):
    msg = one_error(tmp_path, {"DICOMAETITLE": value}, "DICOMAETITLE")
    assert "16" in msg and '"FIONA"' in msg


def test_ae_title_of_16_characters_is_fine(tmp_path):
    cfg = load(str(write_config(tmp_path, {"DICOMAETITLE": "A" * 16, "DATADIR": "d"})))
    assert cfg.dicom_aetitle == "A" * 16


def test_bad_site_ae_title(tmp_path):
    one_error(tmp_path, {"SITES": {"CT": {**GOOD_SITE, "DICOMAETITLE": "X" * 17}}},
              "SITES.CT.DICOMAETITLE")


def test_bad_site_name(tmp_path):
    one_error(tmp_path, {"SITES": {"../ct": GOOD_SITE}}, "SITES name")


def test_duplicate_ports_between_main_and_sites(tmp_path):
    msg = one_error(tmp_path, {"DICOMPORT": 11113, "SITES": {"CT": GOOD_SITE}}, "differ")
    assert "11113" in msg


def test_duplicate_ports_between_two_sites(tmp_path):
    one_error(tmp_path, {"SITES": {"CT": GOOD_SITE, "PET": {**GOOD_SITE, "DATADIR": "pet"}}},
              "differ")


def test_bad_disk_and_web_values(tmp_path):
    errs = errors_of(tmp_path, {"DISK": {"refuse_store_percent": 150},
                                "WEB": {"auth": "basic"}})
    text = "\n".join(errs)
    assert "DISK.refuse_store_percent" in text
    assert "WEB.auth" in text and "remote-user" in text


def test_bad_mppsport(tmp_path):
    one_error(tmp_path, {"MPPSPORT": "x"}, "MPPSPORT")


def test_top_level_not_an_object(tmp_path):
    errs = errors_of(tmp_path, [1, 2])
    assert "must be an object" in errs[0]


def test_invalid_json_names_line_and_column(tmp_path):
    errs = errors_of(tmp_path, '{\n  "DICOMPORT": 11112,\n  "DATADIR": \n}\n')
    assert len(errs) == 1
    assert "JSON" in errs[0] and "line 4" in errs[0] and "column" in errs[0]


def test_missing_file_says_how_to_create_one(tmp_path):
    path = tmp_path / "nope" / "config.json"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert "fiona init" in str(info.value)
    assert str(path) in str(info.value)


def test_verify_tls_false_is_refused(tmp_path):
    msg = one_error(tmp_path, {"CONTROL_PLANE": {
        "type": "redcap", "url": "https://r/api/", "tokens": "/t.json", "verify_tls": False}},
        "verify_tls")
    assert "true" in msg


def test_redcap_control_plane_defaults_verify_tls_true(tmp_path):
    cfg = load(str(write_config(tmp_path, {"DATADIR": "d", "CONTROL_PLANE": {
        "type": "redcap", "url": "https://r/api/", "tokens": "/t.json"}})))
    assert cfg.control_plane == {"type": "redcap", "url": "https://r/api/", "tokens": "/t.json",
                                 "verify_tls": True}


# ---------------------------------------------------------------- valid configs

def test_defaults(tmp_path):
    cfg = load(str(write_config(tmp_path, {})))
    assert cfg.datadir == Path("/data")
    assert (cfg.dicom_ip, cfg.dicom_port, cfg.dicom_aetitle) == ("0.0.0.0", 11112, "FIONA")
    assert cfg.study_quiet_seconds == 16
    assert (cfg.refuse_store_percent, cfg.cleanup_percent) == (95, 80)
    assert cfg.control_plane == {"type": "local"}
    assert cfg.destinations == {"research": {"type": "folder", "path": "/data/research"}}
    assert cfg.sites == {} and cfg.mpps_port is None and cfg.scanner == {}
    assert cfg.web == {"host": "127.0.0.1", "port": 8080, "auth": "local", "trusted_proxies": [],
                       "secure_cookies": False, "session_idle_minutes": 30, "session_hours": 12,
                       "ldap": None}


def test_relative_datadir_is_relative_to_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    path = write_config(tmp_path, {"DATADIR": "../data"})
    cfg = load(str(path))
    assert cfg.datadir == (tmp_path / "data").resolve()
    assert cfg.datadir.is_absolute()
    assert cfg.destinations["research"]["path"] == str(cfg.datadir / "research")


def test_relative_config_path_resolves_datadir_against_the_file(tmp_path, monkeypatch):
    write_config(tmp_path, {"DATADIR": "data"})
    monkeypatch.chdir(tmp_path)
    cfg = load("config/config.json")
    assert cfg.datadir == (tmp_path / "config" / "data").resolve()


def test_sites_are_site_objects(tmp_path):
    path = write_config(tmp_path, {
        "DATADIR": "/srv/main", "DICOMIP": "127.0.0.1", "DICOMAETITLE": "MAIN",
        "SITES": {"CT": {"DATADIR": "ct", "DICOMPORT": 11113, "DICOMAETITLE": "FIONACT"},
                  "PET": {"DATADIR": "/srv/pet", "DICOMPORT": 11114, "DICOMIP": "10.0.0.1"}}})
    cfg = load(str(path))
    ct = cfg.site("CT")
    assert isinstance(ct, Site)
    assert ct == Site("CT", (tmp_path / "config" / "ct").resolve(), "127.0.0.1", 11113,
                      "FIONACT")
    assert ct.suffix == "CT"
    pet = cfg.site("PET")
    assert (pet.datadir, pet.ip, pet.port, pet.aetitle) == (Path("/srv/pet"), "10.0.0.1", 11114,
                                                            "MAIN")  # AE title inherited
    main = cfg.site(None)
    assert main == cfg.site("") == Site("", Path("/srv/main"), "127.0.0.1", 11112, "MAIN")
    assert main.suffix == ""
    assert [s.name for s in cfg.all_sites()] == ["", "CT", "PET"]


def test_unknown_site_lists_known_ones(tmp_path):
    cfg = load(str(write_config(tmp_path, {"SITES": {"CT": GOOD_SITE}})))
    with pytest.raises(ConfigError) as info:
        cfg.site("MR")
    assert "'MR'" in str(info.value) and "CT" in str(info.value)


def test_unknown_site_without_sites(tmp_path):
    cfg = load(str(write_config(tmp_path, {})))
    with pytest.raises(ConfigError, match="none"):
        cfg.site("CT")


def test_effective_shows_values_in_force(tmp_path):
    cfg = load(str(write_config(tmp_path, {"DATADIR": "d", "STUDY_QUIET_SECONDS": 30,
                                           "SITES": {"CT": GOOD_SITE}})))
    eff = cfg.effective()
    assert set(eff) == set(cfgmod.TOP_LEVEL)
    assert eff["DATADIR"] == str((tmp_path / "config" / "d").resolve())
    assert eff["STUDY_QUIET_SECONDS"] == 30
    assert eff["DICOMPORT"] == 11112
    assert eff["SITES"]["CT"]["DICOMPORT"] == 11113
    assert eff["SITES"]["CT"]["DATADIR"] == str((tmp_path / "config" / "ct").resolve())
    json.dumps(eff)  # printable


def test_parse_directly(tmp_path):
    cfg = parse({"DICOMPORT": 4000}, tmp_path / "config.json")
    assert cfg.dicom_port == 4000 and cfg.path == tmp_path / "config.json"


# ---------------------------------------------------------------- config path precedence

def test_config_path_precedence(monkeypatch):
    monkeypatch.delenv("FIONA_CONFIG", raising=False)
    assert config_path(None) == Path(cfgmod.DEFAULT_CONFIG_PATH) == Path(
        "/data/config/config.json")
    monkeypatch.setenv("FIONA_CONFIG", "/env/config.json")
    assert config_path(None) == Path("/env/config.json")
    assert config_path("/explicit/config.json") == Path("/explicit/config.json")
    monkeypatch.setenv("FIONA_CONFIG", "")
    assert config_path(None) == Path(cfgmod.DEFAULT_CONFIG_PATH)


def test_load_uses_env(tmp_path, monkeypatch):
    path = write_config(tmp_path, {"DICOMPORT": 4321})
    monkeypatch.setenv("FIONA_CONFIG", str(path))
    assert load().dicom_port == 4321
    other = write_config(tmp_path, {"DICOMPORT": 1234}, name="other.json")
    assert load(str(other)).dicom_port == 1234


# ---------------------------------------------------------------- secrets

def _secret(tmp_path: Path, mode: int, data: bytes = b"s3cret\n") -> Path:
    path = tmp_path / "secret.key"
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_read_secret_0600(tmp_path):
    assert read_secret(_secret(tmp_path, 0o600)) == b"s3cret"


def test_read_secret_0400(tmp_path):
    assert read_secret(_secret(tmp_path, 0o400)) == b"s3cret"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_read_secret_refuses_group_or_world_access(tmp_path, mode):
    path = _secret(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        read_secret(path)
    assert "chmod 600" in str(info.value)
    assert str(path) in str(info.value)


def test_read_secret_missing(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        read_secret(tmp_path / "secret.key")


def test_read_secret_empty(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        read_secret(_secret(tmp_path, 0o600, b" \n"))


# ---------------------------------------------------------------- enabled

def _enabled(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "enabled").write_text(text)
    return tmp_path


def test_enabled_missing_file_means_all_on(tmp_path):
    assert is_enabled(tmp_path, "receive") and is_enabled(tmp_path, "scanner")


def test_enabled_011(tmp_path):
    d = _enabled(tmp_path, "011\n")
    assert not is_enabled(d, "receive")
    assert is_enabled(d, "scanner")


def test_enabled_101(tmp_path):
    d = _enabled(tmp_path, "101")
    assert is_enabled(d, "receive") and not is_enabled(d, "scanner")


def test_enabled_short_string(tmp_path):
    d = _enabled(tmp_path, "1")
    assert is_enabled(d, "receive") and is_enabled(d, "scanner")
    d = _enabled(tmp_path, "0")
    assert not is_enabled(d, "receive") and is_enabled(d, "scanner")


def test_enabled_change_is_seen_at_once(tmp_path):
    d = _enabled(tmp_path, "111")
    assert is_enabled(d, "receive")
    _enabled(tmp_path, "011")
    assert not is_enabled(d, "receive")


# ---------------------------------------------------------------- bootstrap.init (in process)

def test_init_in_process(tmp_path):
    data = tmp_path / "data"
    path = init(data, port=4100, aetitle="TEST", ip="127.0.0.1")
    assert path == data.resolve() / "config" / "config.json"
    cfg = load(str(path))
    assert (cfg.dicom_port, cfg.dicom_aetitle, cfg.dicom_ip) == (4100, "TEST", "127.0.0.1")
    assert cfg.datadir == data.resolve()
    key = read_secret(data / "config" / "secret.key")
    assert len(key) == 64
    with pytest.raises(ConfigError, match="--force"):
        init(data)
    # --force rewrites config.json but keeps the secret key
    init(data, port=4200, force=True)
    assert load(str(path)).dicom_port == 4200
    assert read_secret(data / "config" / "secret.key") == key


def test_init_extra_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="BOGUS"):
        init(tmp_path / "data", extra={"BOGUS": 1})


# ---------------------------------------------------------------- CLI

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_init_and_check(tmp_path):
    data = tmp_path / "data"
    res = run_fiona("init", "--data", str(data), "--port", "4242")
    assert res.returncode == 0, res.stderr
    conf = data / "config"
    cfg_file = conf / "config.json"
    assert str(cfg_file) in res.stdout

    assert json.loads(cfg_file.read_text())["DICOMPORT"] == 4242
    assert (conf / "enabled").read_text().strip() == "111"
    assert _mode(conf / "secret.key") == 0o600
    assert (conf / "secret.key").read_text().strip()
    rules = json.loads((conf / "classifyRules.json").read_text())
    assert isinstance(rules, list) and rules
    assert not _mode(conf / "config.json") & 0o007

    folders = [data] + [p for p in data.rglob("*") if p.is_dir()]
    assert {"config", "site", "logs"} <= {p.name for p in folders}
    assert any(p.name == "archive" for p in folders)
    for p in folders:
        assert _mode(p) == 0o750, f"{p} has mode {_mode(p):o}"
    for p in data.rglob("*"):
        if p.is_file():
            assert not _mode(p) & 0o007, f"{p} is accessible to others"

    # a second init without --force refuses and explains
    again = run_fiona("init", "--data", str(data))
    assert again.returncode == 2
    assert "--force" in again.stderr and "exists" in again.stderr

    # config check prints the effective values as JSON
    res = run_fiona("--config", str(cfg_file), "config", "check")
    assert res.returncode == 0, res.stderr
    eff = json.loads(res.stdout)
    assert eff["DATADIR"] == str(data.resolve()) and os.path.isabs(eff["DATADIR"])
    assert eff["DICOMPORT"] == 4242
    assert eff["STUDY_QUIET_SECONDS"] == 16
    assert eff["DISK"] == {"refuse_store_percent": 95, "cleanup_percent": 80}
    assert eff["CONTROL_PLANE"] == {"type": "local"}


def test_cli_check_broken_config(tmp_path):
    path = write_config(tmp_path, {"DICOMPORT": "abc", "FOO": 1, "DISK": {"bar": 2}})
    res = run_fiona("--config", str(path), "config", "check")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert any("DICOMPORT" in x and "65535" in x for x in lines)
    assert any("unknown key FOO" in x for x in lines)
    assert any("unknown key DISK.bar" in x for x in lines)
    # each error on its own line
    error_lines = [x for x in lines if x.lstrip().startswith("- ")]
    assert len(error_lines) == 3, res.stderr


def test_cli_check_missing_config(tmp_path):
    res = run_fiona("--config", str(tmp_path / "none.json"), "config", "check")
    assert res.returncode == 2
    assert "fiona init" in res.stderr


def test_cli_config_flag_beats_env(tmp_path):
    good = write_config(tmp_path, {"DATADIR": "d", "DICOMPORT": 4001})
    bad = write_config(tmp_path, {"NOPE": 1}, name="bad.json")
    res = run_fiona("--config", str(good), "config", "check",
                    env_extra={"FIONA_CONFIG": str(bad)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["DICOMPORT"] == 4001
    res = run_fiona("config", "check", env_extra={"FIONA_CONFIG": str(bad)})
    assert res.returncode == 2 and "NOPE" in res.stderr
    res = run_fiona("config", "check", env_extra={"FIONA_CONFIG": str(good)})
    assert res.returncode == 0 and json.loads(res.stdout)["DICOMPORT"] == 4001
