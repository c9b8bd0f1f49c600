"""What only the PostgreSQL backend has: its connection string's rules (no password in it, TLS
verification for a remote server, checked by `fiona config check`), a 0600 password file and
a server that is down. (The interface is tested on every backend in test_control_contract.py.)"""

from __future__ import annotations

import pytest

from fiona.config import ConfigError, parse
from fiona.control.base import Unavailable
from fiona.control.postgres import PostgresControlPlane
from helpers import free_port


def config_with(dsn: str, tmp_path, **extra):
    return parse({"CONTROL_PLANE": {"type": "postgres", "dsn": dsn, **extra}},
                 tmp_path / "config.json")


def test_the_connection_string_is_checked_with_the_configuration(tmp_path):
    ok = config_with("host=127.0.0.1 dbname=fiona user=fiona", tmp_path)
    assert ok.control_plane["dsn"].startswith("host=127.0.0.1")
    assert config_with("host=db.example.org dbname=fiona sslmode=verify-full", tmp_path)
    with pytest.raises(ConfigError, match="must not hold the password.*mode 0600"):
        config_with("host=127.0.0.1 dbname=fiona password=secret", tmp_path)
    with pytest.raises(ConfigError, match="db.example.org is not on this machine.*verify-full"):
        config_with("host=db.example.org dbname=fiona sslmode=require", tmp_path)
    with pytest.raises(ConfigError, match="10.0.0.5 is not on this machine.*verify-full"):
        config_with("host=localhost hostaddr=10.0.0.5 dbname=fiona", tmp_path)
    with pytest.raises(ConfigError, match="not a libpq connection string"):
        config_with("host='unclosed", tmp_path)
    with pytest.raises(ConfigError, match="CONTROL_PLANE.dsn"):
        parse({"CONTROL_PLANE": {"type": "postgres"}}, tmp_path / "config.json")


def test_the_password_file_must_be_private(tmp_path):
    secret = tmp_path / "postgres.password"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others.*chmod 600"):
        PostgresControlPlane.from_config({"dsn": "host=127.0.0.1 dbname=x",
                                          "password_file": str(secret)})


def test_a_server_that_is_down_is_unavailable_naming_the_database():
    with pytest.raises(Unavailable, match="cannot reach PostgreSQL fiona at 127.0.0.1"):
        PostgresControlPlane(f"host=127.0.0.1 port={free_port()} dbname=fiona user=fiona",
                             timeout=5)
