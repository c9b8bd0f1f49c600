"""Local web users: `DATADIR/config/users.json` (mode 0600, written atomically), bcrypt hashes.

Roles: `admin`, or `project:P:assign`, `project:P:export`, `project:P:review`.
"""

from __future__ import annotations

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


class UserError(ValueError):
    pass


def check_role(role: str) -> str:
    if role == "admin" or _ROLE.match(role):
        return role
    raise UserError(f"role {role!r} must be admin or project:P:assign|export|review")


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
        self.path = Path(datadir) / "config" / "users.json"

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

    def add(self, name: str, password: str | None, roles: list[str], one_time: bool = False) -> None:
        if not _NAME.match(name or ""):
            raise UserError(f"user name {name!r}: letters, digits and _.@- only")
        roles = [check_role(r) for r in roles]
        if password is not None and len(password) < 8:
            raise UserError("the password must be at least 8 characters")
        users = self._load()
        rec = users.get(name, {})
        rec["roles"] = roles
        if password is not None:
            rec["hash"] = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
        rec["one_time"] = one_time
        users[name] = rec
        self._save(users)

    def set_password(self, name: str, password: str) -> None:
        user = self.get(name)
        if user is None:
            raise UserError(f"no user {name!r}")
        self.add(name, password, user.roles, one_time=False)

    def check(self, name: str, password: str) -> User | None:
        rec = self._load().get(name)
        stored = (rec or {}).get("hash", "")
        if not stored:
            bcrypt.checkpw(b"x", bcrypt.hashpw(b"y", bcrypt.gensalt()))  # same cost either way
            return None
        if bcrypt.checkpw(password.encode(), stored.encode()):
            return self.get(name)
        return None

    def bootstrap_admin(self) -> str | None:
        """With no users yet: create `admin` with a random one-time password and return it."""
        if self._load():
            return None
        password = secrets.token_urlsafe(12)
        self.add("admin", password, ["admin"], one_time=True)
        return password
