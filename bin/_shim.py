"""What the legacy scripts in bin/ share: each is a shim over `fiona ctl ACTION DAEMON`.

They run the `fiona` command as a program (nothing of fiona is imported here): `fiona` from
PATH, else `$FIONA_PYTHON -m fiona` (default python3) with this checkout on PYTHONPATH. The
configuration is --config PATH (the Python scripts), else $FIONA_CONFIG, else
/data/config/config.json.

Exit codes (LSB): 0 done / running, 1 failed, 2 usage, 3 stopped (status), and for a
configuration `fiona ctl` cannot use (unreadable, unknown site; it says 2): 4 for status
("unknown"), 6 ("not configured") for the other actions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CONTROL = ("start", "stop", "status", "restart")
DEFAULT_CONFIG = "/data/config/config.json"
SITE = re.compile(r"^[A-Za-z0-9_-]+$")


def fiona(*args: str) -> int:
    """Run `fiona ARGS`, inheriting stdin, stdout and stderr; its exit code."""
    exe = shutil.which("fiona")
    env = dict(os.environ)
    if exe:
        argv = [exe]
    else:
        repo = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        argv = [env.get("FIONA_PYTHON") or "python3", "-m", "fiona"]
    return subprocess.run([*argv, *args], env=env).returncode


def main(prog: str, daemon: str, argv: list[str], positional_site: bool = False,
         extra: dict[str, tuple[str, bool]] | None = None, foreground: bool = False) -> int:
    """`prog ACTION [SITE]` (positional_site) or `prog ACTION [--site NAME] [--config PATH]`.
    `extra` maps more actions to (fiona subcommand, pass ACTION's further words on?);
    with `foreground`, no action runs the daemon in the foreground, as the original did."""
    extra = extra or {}
    actions = [*CONTROL, *extra]
    if positional_site:
        action, site_name, config, words = _positional(prog, actions, argv, foreground)
    else:
        parser = argparse.ArgumentParser(
            prog=prog, description=f"Control FIONA's `fiona {daemon}` under its original name "
            f"(a shim over `fiona ctl ACTION {daemon}`).",
            epilog="Exit codes: 0 ok/running, 1 failure, 2 usage, 3 stopped, 4 status unknown, "
            "6 not configured.")
        parser.add_argument("action", choices=actions, nargs="?" if foreground else None)
        parser.add_argument("words", nargs="*", metavar="ARG")
        parser.add_argument("--site", metavar="NAME", default="")
        parser.add_argument("--config", metavar="PATH")
        args = parser.parse_intermixed_args(argv)
        action, site_name, config, words = args.action, args.site, args.config, args.words
    if action == "usage":
        return 2
    if site_name and not SITE.match(site_name):
        print(f"{prog}: invalid SITE {site_name!r}: use letters, digits, '_' or '-'",
              file=sys.stderr)
        return 2
    config = os.path.abspath(config or os.environ.get("FIONA_CONFIG") or DEFAULT_CONFIG)
    site = ["--site", site_name] if site_name else []
    if action is None:
        return fiona("--config", config, daemon, *site)
    if action in extra:
        command, pass_words = extra[action]
        return fiona("--config", config, *command.split(), *site, *(words if pass_words else []))
    code = fiona("--config", config, "ctl", action, daemon, *site)
    if code == 2:
        return 4 if action == "status" else 6
    return code


def _positional(prog: str, actions: list[str], argv: list[str], foreground: bool
                ) -> tuple[str | None, str, None, list[str]]:
    """`prog [ACTION] [SITE]` (the shell scripts' form); ("usage", ...) after printing it."""
    words = list(argv)
    action = words.pop(0) if words and words[0] in actions else None
    site = words.pop(0) if words else ""
    if words or (action is None and not foreground) or site.startswith("-"):
        print(f"usage: {prog} {'[' if foreground else ''}{'|'.join(actions)}"
              f"{']' if foreground else ''} [SITE]\n  SITE: a name from SITES in config.json "
              f"(default: the main receiver)", file=sys.stderr)
        return "usage", "", None, []
    return action, site, None, []
