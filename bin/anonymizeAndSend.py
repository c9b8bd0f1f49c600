#!/usr/bin/env python3
"""anonymizeAndSend.py [--site NAME] [--config PATH]

Runs FIONA's de-identify-and-forward daemon in the foreground under its original name; a thin
wrapper over `fiona anonymize-and-send`. On a systemd host use
`systemctl start fiona-anonymize-and-send[@SITE]` instead (see systemd/).
"""

import argparse
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", help="one of SITES in config.json")
    parser.add_argument("--config", default=os.environ.get("FIONA_CONFIG",
                                                           "/data/config/config.json"))
    args = parser.parse_args()
    fiona = shutil.which("fiona")
    argv = [fiona] if fiona else [os.environ.get("FIONA_PYTHON", sys.executable), "-m", "fiona"]
    if not fiona:
        repo = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    argv += ["--config", args.config, "anonymize-and-send"]
    if args.site:
        argv += ["--site", args.site]
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
