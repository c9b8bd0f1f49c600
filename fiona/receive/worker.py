"""Entry point of a receiver worker process (`python -m fiona.receive.worker`), started by the
receiver daemon (`fiona.receive.storescp.Workers`).

It asks the kernel for SIGKILL when the daemon dies before it imports anything heavy: until
then an orphaned worker would hold the daemon's listening socket (a restarted receiver could
not bind the port, and connections queued on the old socket would be lost)."""

from __future__ import annotations

import argparse
import signal
import sys

from ..parentdeath import die_with


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else __name__}")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--site")
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    problem = die_with(args.parent, signal.SIGKILL, "receiver daemon")
    if problem:
        print(f"fiona receiver worker: {problem}; exiting", file=sys.stderr)
        return 1
    from .storescp import run_worker  # the heavy imports, once we die with the daemon

    return run_worker(args.config, args.site, args.listen_fd, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
