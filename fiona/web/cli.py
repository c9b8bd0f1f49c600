"""`fiona user add`: through `fiona.actions`, like the admin pages (same rules, same audit
entries, under the OS user `os:<login>`)."""

from __future__ import annotations

import getpass
import sys

from ..actions import ActionError, Actions, OsActor
from .users import UserError


def _password(args) -> str:
    if args.password_file:
        if str(args.password_file) == "-":
            return sys.stdin.readline().rstrip("\n")
        return args.password_file.read_text().splitlines()[0] if \
            args.password_file.read_text() else ""
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the passwords differ")
    return first


def user_add(config, args) -> int:
    """Add or update a user with the password given (asked for, or from a file)."""
    try:
        password = _password(args)
        Actions.open(config, args.site).save_user(OsActor.current(), args.name, args.role,
                                                  password, new=False)
    except (ActionError, UserError, OSError) as exc:
        print(f"fiona user add: {exc}", file=sys.stderr)
        return 1
    print(f"user {args.name} saved with roles {', '.join(args.role)}")
    return 0
