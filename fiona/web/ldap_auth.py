"""Log in with the hospital's directory (`WEB.auth = "ldap"`): OpenLDAP or Active Directory.

The user's password is checked by binding as the user: either directly with a DN made from a
template (`user_dn`, e.g. `uid={user},ou=people,dc=example,dc=org`) or, as Active Directory
sites need, by searching the user's entry first with a service account (`search_base`,
`search_filter`, `bind_dn`, `bind_password_file`) and then binding as the DN found. Roles come
from group membership: `role_groups` maps a group DN to the FIONA roles its members get, and the
groups are found with one search under `group_base` for `groupOfNames`/`groupOfUniqueNames`
entries that list the user's DN (works without the `memberOf` overlay).

Only TLS connections are made: `ldaps://` or `ldap://` with `start_tls`; the server certificate
is verified against `ca_file` or the system store, and a plain connection is a configuration
error. The library is ldap3 (pure Python, well kept); user names are escaped for DNs and filters
with its helpers, and an empty password is refused before any bind (an LDAP bind with an empty
password is an *unauthenticated* bind, which many servers accept).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from .users import UserError, check_role

log = logging.getLogger("fiona.web.ldap")

#: keys of WEB.ldap and what each is for, for the configuration error messages
LDAP_KEYS = {
    "url": "ldaps://ldap.example.org:636 (or ldap://... with start_tls)",
    "start_tls": "true to upgrade an ldap:// connection with StartTLS",
    "ca_file": "PEM file of the CA that signed the directory's certificate",
    "tls_name": "the name the certificate must carry when the URL names an address",
    "user_dn": "uid={user},ou=people,dc=example,dc=org (direct bind)",
    "search_base": "ou=people,dc=example,dc=org (search, then bind)",
    "search_filter": "(uid={user}) or (sAMAccountName={user})",
    "bind_dn": "cn=fiona,ou=services,dc=example,dc=org (service account for the search)",
    "bind_password_file": "/data/config/ldap-bind.secret (mode 0600)",
    "group_base": "ou=groups,dc=example,dc=org",
    "role_groups": '{"cn=fiona-admins,ou=groups,dc=example,dc=org": ["admin"]}',
    "timeout": "seconds to wait for the directory (default 10)",
}


class LdapConfigError(ValueError):
    """WEB.ldap is incomplete or unsafe; the text names the key and an example."""


@dataclass
class LdapSettings:
    """WEB.ldap, validated once (see `from_config`)."""

    url: str
    start_tls: bool = False
    ca_file: str = ""
    tls_name: str = ""
    user_dn: str = ""
    search_base: str = ""
    search_filter: str = "(uid={user})"
    bind_dn: str = ""
    bind_password_file: str = ""
    group_base: str = ""
    role_groups: dict[str, list[str]] = field(default_factory=dict)
    timeout: int = 10

    @classmethod
    def from_config(cls, raw: Any) -> LdapSettings:
        """Check WEB.ldap and return the settings; every problem is named with an example."""
        if not isinstance(raw, dict):
            raise LdapConfigError(f"WEB.ldap must be an object such as {{\"url\": "
                                  f"\"{LDAP_KEYS['url']}\", ...}}")
        errors = [f"WEB.ldap.{k} is not a known key; known keys: {', '.join(LDAP_KEYS)}"
                  for k in raw if k not in LDAP_KEYS]
        url = raw.get("url")
        if not isinstance(url, str) or not url.startswith(("ldap://", "ldaps://")):
            errors.append(f"WEB.ldap.url must be an ldaps:// or ldap:// URL, e.g. "
                          f"{LDAP_KEYS['url']}")
        elif url.startswith("ldap://") and not raw.get("start_tls"):
            errors.append("WEB.ldap.url is a plain ldap:// URL: passwords would cross the network "
                          "in clear. Use ldaps:// or set WEB.ldap.start_tls to true")
        timeout = raw.get("timeout", 10)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 300:
            errors.append("WEB.ldap.timeout must be a whole number of seconds from 1 to 300")
        if bool(raw.get("user_dn")) == bool(raw.get("search_base")):
            errors.append(f"WEB.ldap needs exactly one of user_dn (e.g. {LDAP_KEYS['user_dn']}) "
                          f"or search_base (e.g. {LDAP_KEYS['search_base']})")
        if raw.get("user_dn") and "{user}" not in str(raw["user_dn"]):
            errors.append(f"WEB.ldap.user_dn must contain {{user}}, e.g. {LDAP_KEYS['user_dn']}")
        if raw.get("search_filter") and "{user}" not in str(raw["search_filter"]):
            errors.append(f"WEB.ldap.search_filter must contain {{user}}, e.g. "
                          f"{LDAP_KEYS['search_filter']}")
        if raw.get("bind_dn") and not raw.get("bind_password_file"):
            errors.append(f"WEB.ldap.bind_dn needs bind_password_file, e.g. "
                          f"{LDAP_KEYS['bind_password_file']}")
        for key in ("ca_file", "bind_password_file"):
            if raw.get(key) and not Path(raw[key]).is_file():
                errors.append(f"WEB.ldap.{key}: no file {raw[key]}")
        secret = raw.get("bind_password_file")
        if secret and Path(secret).is_file() and Path(secret).stat().st_mode & 0o077:
            errors.append(f"WEB.ldap.bind_password_file {secret} is readable by group or others; "
                          f"run: chmod 600 {secret}")
        groups = raw.get("role_groups", {})
        if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
            errors.append(f"WEB.ldap.role_groups must map group DNs to role lists, e.g. "
                          f"{LDAP_KEYS['role_groups']}")
        else:
            for dn, roles in groups.items():
                for role in roles:
                    try:
                        check_role(role)
                    except UserError as exc:
                        errors.append(f"WEB.ldap.role_groups[{dn!r}]: {exc}")
            if groups and not raw.get("group_base"):
                errors.append(f"WEB.ldap.role_groups needs group_base, e.g. "
                              f"{LDAP_KEYS['group_base']}")
        if errors:
            raise LdapConfigError("; ".join(errors))
        known = {k: v for k, v in raw.items() if k in LDAP_KEYS}
        known["role_groups"] = {dn.lower(): list(r) for dn, r in groups.items()}
        return cls(**known)


@dataclass
class DirectoryUser:
    """Who the directory says the user is, and the roles their groups give."""

    name: str
    dn: str
    roles: list[str]


class LdapAuthenticator:
    """Checks a user name and password against the directory; one connection per check, as a
    login is rare and a pooled connection would carry the previous user's bind."""

    def __init__(self, settings: LdapSettings):
        self.settings = settings
        validate = ssl.CERT_REQUIRED
        valid_names = [settings.tls_name] if settings.tls_name else None
        self._tls = ldap3.Tls(validate=validate, ca_certs_file=settings.ca_file or None,
                              version=ssl.PROTOCOL_TLS_CLIENT, valid_names=valid_names)
        self._server = ldap3.Server(settings.url, tls=self._tls, get_info=ldap3.NONE,
                                    connect_timeout=settings.timeout)

    def _connection(self, user: str | None = None, password: str | None = None) -> ldap3.Connection:
        conn = ldap3.Connection(self._server, user=user, password=password,
                                receive_timeout=self.settings.timeout, raise_exceptions=False,
                                auto_bind=ldap3.AUTO_BIND_NONE, read_only=True)
        conn.open()
        if self.settings.url.startswith("ldap://") and not conn.start_tls():
            conn.unbind()
            raise LDAPException("StartTLS was refused by the directory")
        return conn

    def _find_dn(self, name: str) -> str | None:
        s = self.settings
        if s.user_dn:
            return s.user_dn.replace("{user}", escape_rdn(name))
        password = Path(s.bind_password_file).read_text().strip() if s.bind_password_file else None
        conn = self._connection(s.bind_dn or None, password)
        try:
            if not conn.bind():
                raise LDAPException(f"the service account {s.bind_dn!r} cannot bind: "
                                    f"{conn.result.get('description')}")
            conn.search(s.search_base, s.search_filter.replace("{user}", escape_filter_chars(name)),
                        attributes=[], size_limit=2)
            entries = [e.entry_dn for e in conn.entries]
        finally:
            conn.unbind()
        return entries[0] if len(entries) == 1 else None

    def authenticate(self, name: str, password: str) -> DirectoryUser | None:
        """The directory user when the password is right, else None. Raises LDAPException when
        the directory cannot be asked (the caller says so, and local users still work)."""
        if not name or not password:
            return None
        dn = self._find_dn(name)
        if dn is None:
            return None
        conn = self._connection(dn, password)
        try:
            if not conn.bind():
                return None
            roles = self._roles(conn, dn)
        finally:
            conn.unbind()
        return DirectoryUser(name, dn, roles)

    def _roles(self, conn: ldap3.Connection, dn: str) -> list[str]:
        s = self.settings
        if not s.role_groups:
            return []
        escaped = escape_filter_chars(dn)
        conn.search(s.group_base, f"(|(member={escaped})(uniqueMember={escaped}))",
                    attributes=[])
        roles: list[str] = []
        for entry in conn.entries:
            for role in s.role_groups.get(entry.entry_dn.lower(), []):
                if role not in roles:
                    roles.append(role)
        return roles
