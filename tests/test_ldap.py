"""LDAP login against a real OpenLDAP slapd on loopback: bind, search-then-bind, TLS, roles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ldap3.core.exceptions import LDAPException

from fiona.web.ldap_auth import LdapAuthenticator, LdapConfigError, LdapSettings
from slapd import PEOPLE, USERS

pytestmark = pytest.mark.e2e


def settings(directory, **extra) -> LdapSettings:
    raw = {"url": directory.ldaps_url, "ca_file": str(directory.ca_file), "tls_name": "localhost",
           "user_dn": f"uid={{user}},{PEOPLE}", "group_base": "ou=groups,dc=example,dc=org",
           "role_groups": {directory.group_dn("fiona-admins"): ["admin"],
                           directory.group_dn("proj-assigners"): ["project:PROJ1:assign",
                                                                  "project:PROJ1:review"]}}
    raw.update(extra)
    return LdapSettings.from_config(raw)


def test_direct_bind_gives_roles_from_groups(slapd):
    auth = LdapAuthenticator(settings(slapd))
    alice = auth.authenticate("alice", USERS["alice"][0])
    assert alice is not None and alice.roles == ["admin"]
    bob = auth.authenticate("bob", USERS["bob"][0])
    assert bob is not None and bob.roles == ["project:PROJ1:assign", "project:PROJ1:review"]
    carol = auth.authenticate("carol", USERS["carol"][0])
    assert carol is not None and carol.roles == []


def test_wrong_password_empty_password_and_unknown_user_are_refused(slapd):
    auth = LdapAuthenticator(settings(slapd))
    assert auth.authenticate("alice", "wrong-password-123") is None
    # an empty password would be an unauthenticated bind, which slapd accepts
    assert auth.authenticate("alice", "") is None
    assert auth.authenticate("nobody", "whatever-password") is None


def search_then_bind(directory, tmp_path: Path) -> LdapAuthenticator:
    """An authenticator that finds users with the service account `svc` (its password in a
    0600 file), then binds as them."""
    secret = tmp_path / "bind.secret"
    secret.write_text(USERS["svc"][0] + "\n")
    os.chmod(secret, 0o600)
    return LdapAuthenticator(settings(
        directory, user_dn="", search_base=PEOPLE, search_filter="(uid={user})",
        bind_dn=f"uid=svc,{PEOPLE}", bind_password_file=str(secret)))


def test_user_names_cannot_inject_into_dn_or_filter(slapd, tmp_path: Path):
    auth = search_then_bind(slapd, tmp_path)
    assert auth.authenticate("*", USERS["alice"][0]) is None
    assert auth.authenticate("alice)(uid=*", USERS["alice"][0]) is None
    assert LdapAuthenticator(settings(slapd)).authenticate(
        "alice,ou=people", USERS["alice"][0]) is None


def test_search_then_bind_with_a_service_account(slapd, tmp_path: Path):
    auth = search_then_bind(slapd, tmp_path)
    bob = auth.authenticate("bob", USERS["bob"][0])
    assert bob is not None and bob.dn == f"uid=bob,{PEOPLE}"
    assert "project:PROJ1:assign" in bob.roles
    assert auth.authenticate("bob", "not-bobs-password") is None


def test_starttls_works_and_an_unknown_ca_is_refused(slapd, tmp_path: Path):
    auth = LdapAuthenticator(settings(slapd, url=slapd.ldap_url, start_tls=True))
    assert auth.authenticate("alice", USERS["alice"][0]) is not None
    other_ca = tmp_path / "other-ca.pem"
    import subprocess
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=other", "-keyout", str(tmp_path / "k"), "-out", str(other_ca)],
                   check=True, capture_output=True)
    untrusted = LdapAuthenticator(settings(slapd, ca_file=str(other_ca)))
    with pytest.raises(LDAPException):
        untrusted.authenticate("alice", USERS["alice"][0])


def test_configuration_errors_name_the_key(tmp_path: Path):
    with pytest.raises(LdapConfigError, match="start_tls"):
        LdapSettings.from_config({"url": "ldap://h:389", "user_dn": "uid={user},o=x"})
    with pytest.raises(LdapConfigError, match="exactly one of user_dn"):
        LdapSettings.from_config({"url": "ldaps://h"})
    with pytest.raises(LdapConfigError, match="role"):
        LdapSettings.from_config({"url": "ldaps://h", "user_dn": "uid={user},o=x",
                                  "group_base": "o=x", "role_groups": {"cn=g": ["superuser"]}})
    loose = tmp_path / "pw"
    loose.write_text("x")
    os.chmod(loose, 0o644)
    with pytest.raises(LdapConfigError, match="chmod 600"):
        LdapSettings.from_config({"url": "ldaps://h", "search_base": "o=x",
                                  "bind_dn": "cn=s", "bind_password_file": str(loose)})
    with pytest.raises(LdapConfigError, match="not a known key"):
        LdapSettings.from_config({"url": "ldaps://h", "user_dn": "uid={user}", "passwd": "x"})


# --- the web application with WEB.auth = "ldap" ---------------------------------------------------
def web_site(tmp_path: Path, directory):
    from test_web_auth import Site

    ldap = {"url": directory.ldaps_url, "ca_file": str(directory.ca_file), "tls_name": "localhost",
            "user_dn": f"uid={{user}},{PEOPLE}", "group_base": "ou=groups,dc=example,dc=org",
            "role_groups": {directory.group_dn("fiona-admins"): ["admin"],
                            directory.group_dn("proj-assigners"): ["project:PROJ1:assign"]}}
    return Site(tmp_path, {"auth": "ldap", "ldap": ldap})


def test_directory_users_log_in_with_roles_from_their_groups(slapd, tmp_path: Path):
    from test_web_auth import PASSWORD, change_password, login

    site = web_site(tmp_path, slapd)
    bob = site.client("bob", USERS["bob"][0])
    assert bob.get("/api/session").json()["roles"] == ["project:PROJ1:assign"]
    assert bob.get("/status").status_code == 200
    # the directory keeps bob's password, not FIONA
    r = change_password(bob, USERS["bob"][0], "a brand new passphrase for bob")
    assert r.status_code == 403
    # local accounts still work, and win over a directory entry of the same name
    assert site.client("admin", PASSWORD).get("/api/session").json()["roles"] == ["admin"]
    site.users.add("alice", "local alice passphrase", ["project:X:review"])
    c = site.client()
    assert login(c, "alice", USERS["alice"][0]).status_code == 401
    # wrong directory passwords are refused and audited, and the login is audited with its roles
    assert login(site.client(), "carol", "not carols password").status_code == 401
    assert any(e["user"] == "carol" for e in site.audit("login failed"))
    assert [e["details"].get("source") for e in site.audit("login")
            if e["user"] == "bob"] == ["ldap"]


def test_directory_down_refuses_directory_users_but_not_local_admins(slapd, tmp_path: Path):
    from test_web_auth import PASSWORD, login

    site = web_site(tmp_path, slapd)
    slapd.proc.terminate()
    slapd.proc.wait(20)
    r = login(site.client(), "bob", USERS["bob"][0])
    assert r.status_code == 503 and "directory cannot be reached" in r.text
    assert site.client("admin", PASSWORD).get("/api/session").status_code == 200


def test_ldap_configuration_is_checked_with_the_rest(tmp_path: Path):
    from fiona.config import ConfigError
    from helpers import Gateway, free_port

    with pytest.raises(ConfigError, match="needs WEB.ldap"):
        Gateway(tmp_path / "data", free_port(), {"WEB": {"auth": "ldap"}})
    with pytest.raises(ConfigError, match="start_tls"):
        Gateway(tmp_path / "d2", free_port(), {"WEB": {"auth": "ldap", "ldap": {
            "url": "ldap://h", "user_dn": "uid={user},o=x"}}})
