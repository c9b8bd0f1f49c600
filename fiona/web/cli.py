"""`fiona user add`."""

from __future__ import annotations

import getpass
import sys

from .. import audit
from .users import UserError, UserStore


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
    datadir = config.site(args.site).datadir
    try:
        password = _password(args)
        UserStore(datadir).add(args.name, password, args.role)
    except (UserError, OSError) as exc:
        print(f"fiona user add: {exc}", file=sys.stderr)
        return 1
    audit.append(datadir, "fiona", "user added", {"user": args.name, "roles": args.role})
    print(f"user {args.name} saved with roles {', '.join(args.role)}")
    return 0

