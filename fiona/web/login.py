"""Which source checks a password at login: local users, and with `WEB.auth = "ldap"` the
hospital's directory for everyone who has no local account.

A local account always wins over a directory entry of the same name (admins keep working when
the directory is down, and a directory user can never take over a local admin's name). The roles
of a directory user are read from their groups at login and kept in the server-side session, so
a change of groups takes effect at the next login.
"""

from __future__ import annotations

import logging
from typing import Any

from ldap3.core.exceptions import LDAPException

from ..notify.store import NotifyStore
from .ldap_auth import LdapAuthenticator, LdapSettings
from .users import User, UserStore

log = logging.getLogger("fiona.web.login")

#: the session value that marks a directory login and holds its roles
DIRECTORY_ROLES = "directory_roles"


class DirectoryDown(Exception):
    """The directory could not be asked; the login page says so."""


class Login:
    """Checks a user name and password against the configured sources."""

    def __init__(self, users: UserStore, web: dict[str, Any]):
        self.users = users
        self.auth = web.get("auth", "local")
        self.directory = (LdapAuthenticator(LdapSettings.from_config(web["ldap"]))
                          if self.auth == "ldap" else None)

    @property
    def password_form(self) -> bool:
        """Whether this server shows a login form (not behind a REMOTE_USER proxy)."""
        return self.auth in ("local", "ldap")

    def check(self, name: str, password: str) -> tuple[User | None, dict[str, Any]]:
        """The user and the values to keep in their session, or (None, {}) when refused."""
        local = self.users.check(name, password)  # one bcrypt round for any name, known or not
        if local is not None or self.directory is None or self.users.get(name) is not None:
            return local, {}
        try:
            found = self.directory.authenticate(name, password)
        except LDAPException as exc:
            log.warning("the LDAP directory cannot be reached (%s): directory users cannot log "
                        "in; check WEB.ldap.url and the directory server", type(exc).__name__)
            raise DirectoryDown from exc
        if found is None:
            return None, {}
        NotifyStore(self.users.datadir).refresh_roles(found.name, found.roles)
        return User(found.name, found.roles), {DIRECTORY_ROLES: found.roles}

    def session_user(self, name: str, values: dict[str, Any]) -> User | None:
        """Who a session belongs to: its directory roles, or the local account's current roles."""
        if DIRECTORY_ROLES in values:
            if self.directory is None or self.users.get(name) is not None:
                return None  # the server's auth changed, or a local account took the name
            return User(name, list(values[DIRECTORY_ROLES]))
        return self.users.get(name)

    def is_local(self, name: str) -> bool:
        """Whether `name` has a password that FIONA keeps (and so can change here)."""
        return self.password_form and self.users.get(name) is not None
