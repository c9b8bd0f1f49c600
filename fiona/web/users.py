"""Local web users: `DATADIR/config/users.json` (mode 0600, written atomically), bcrypt hashes.

Roles: `admin`, or `project:P:assign`, `project:P:export`, `project:P:review`.

Passwords are pre-hashed before bcrypt (scheme `sha256-bcrypt`): bcrypt reads at most 72 bytes
and the library refuses longer input, so the password's SHA-256, base64-encoded (44 bytes, no
NUL byte), is what bcrypt hashes. Every length then works and every byte counts. Records written
before this scheme (no `scheme` key: bcrypt of the raw password) are still accepted, and are
re-hashed with the new scheme at the first successful login.

Checking an unknown user costs one bcrypt check against a fixed dummy hash, like a known one, so
the time taken does not tell which user names exist.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

from ..tree import atomic_write

RIGHTS = ("assign", "export", "review")
_ROLE = re.compile(r"^project:([A-Za-z0-9_.-]+):(assign|export|review)$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SCHEME = "sha256-bcrypt"
MIN_LENGTH = 12
MAX_LENGTH = 1024
_dummy_hash: bytes | None = None


class UserError(ValueError):
    pass


def check_role(role: str) -> str:
    if role == "admin" or _ROLE.match(role):
        return role
    raise UserError(f"role {role!r} must be admin or project:P:assign|export|review")


def _prehash(password: str) -> bytes:
    return base64.b64encode(hashlib.sha256(password.encode()).digest())


def _hash(password: str) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt()).decode()


def _matches(password: str, rec: dict) -> bool:
    """Whether `password` matches the record's hash, in its scheme (legacy: raw bcrypt)."""
    stored = rec.get("hash", "").encode()
    if rec.get("scheme") == SCHEME:
        return bcrypt.checkpw(_prehash(password), stored)
    raw = password.encode()
    return len(raw) <= 72 and bcrypt.checkpw(raw, stored)


def _dummy() -> bytes:
    """A hash no password matches, made once, for checking unknown users at the same cost."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = bcrypt.hashpw(secrets.token_bytes(32).hex().encode(), bcrypt.gensalt())
    return _dummy_hash


def check_password_policy(name: str, password: str) -> None:
    """The one password rule, for the web and `fiona user add`: at least 12 characters (a
    passphrase of several words is welcome: spaces count), at most 1024, and not the user name."""
    if len(password) < MIN_LENGTH:
        raise UserError(f"the password must have at least {MIN_LENGTH} characters; a passphrase "
                        "of a few words is easiest to remember")
    if len(password) > MAX_LENGTH:
        raise UserError(f"the password must have at most {MAX_LENGTH} characters")
    if "".join(password.split()).lower() == name.lower():
        raise UserError("the password must not be the user name")


@dataclass
class User:
    name: str
    roles: list[str] = field(default_factory=list)
    one_time: bool = False

    @property
    def admin(self) -> bool:
        return "admin" in self.roles

    def can(self, project: str, right: str | None = None) -> bool:
        """Whether the user has `right` (any right when None) in `project`."""
        if self.admin:
            return True
        for role in self.roles:
            m = _ROLE.match(role)
            if m and m.group(1) == project and (right is None or m.group(2) == right):
                return True
        return False

    def projects(self, right: str | None, known: list[str]) -> list[str]:
        return [p for p in known if self.can(p, right)]

    def has_right(self, right: str) -> bool:
        return self.admin or any((m := _ROLE.match(r)) and m.group(2) == right for r in self.roles)


class UserStore:
    def __init__(self, datadir: Path):
        self.datadir = Path(datadir)
        self.path = self.datadir / "config" / "users.json"

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text()).get("users", {})
        except FileNotFoundError:
            return {}

    def _save(self, users: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, (json.dumps({"users": users}, indent=2) + "\n").encode(),
                     mode=0o600)

    def names(self) -> list[str]:
        return sorted(self._load())

    def get(self, name: str) -> User | None:
        rec = self._load().get(name)
        if rec is None:
            return None
        return User(name, list(rec.get("roles", [])), bool(rec.get("one_time")))

    def add(self, name: str, password: str | None, roles: list[str],
            one_time: bool = False) -> None:
        if not _NAME.match(name or ""):
            raise UserError(f"user name {name!r}: letters, digits and _.@- only")
        roles = [check_role(r) for r in roles]
        users = self._load()
        rec = users.get(name, {})
        if password is not None:
            check_password_policy(name, password)
            rec.update(hash=_hash(password), scheme=SCHEME)
        rec["roles"] = roles
        rec["one_time"] = one_time
        users[name] = rec
        self._save(users)

    def remove(self, name: str) -> None:
        users = self._load()
        if users.pop(name, None) is not None:
            self._save(users)

    def set_password(self, name: str, password: str) -> None:
        """A password change by the user: the policy, and not the current password again."""
        rec = self._load().get(name)
        if rec is None:
            raise UserError(f"no user {name!r}")
        if rec.get("hash") and _matches(password, rec):
            raise UserError("the new password must differ from the current one")
        self.add(name, password, list(rec.get("roles", [])), one_time=False)

    def check(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs; one bcrypt check whether or not `name` exists."""
        users = self._load()
        rec = users.get(name)
        if not rec or not rec.get("hash"):
            bcrypt.checkpw(_prehash(password), _dummy())
            return None
        if not _matches(password, rec):
            return None
        if rec.get("scheme") != SCHEME:  # migrate a legacy raw-bcrypt hash
            rec.update(hash=_hash(password), scheme=SCHEME)
            self._save(users)
        return self.get(name)

    def bootstrap_admin(self) -> str | None:
        """With no users yet: create `admin` with a random one-time password and return it."""
        if self._load():
            return None
        password = secrets.token_urlsafe(12)
        self.add("admin", password, ["admin"], one_time=True)
        return password
