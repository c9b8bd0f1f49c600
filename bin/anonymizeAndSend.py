#!/usr/bin/env python3
"""anonymizeAndSend.py [start|stop|status|restart|send] [--site NAME] [--config PATH]

FIONA's de-identify-and-forward daemon (`fiona anonymize-and-send`) under its original name:
without an action it runs in the foreground; with one it is a shim over `fiona ctl ACTION
anonymize-and-send` (send: `fiona ctl wake`). Exit codes and the configuration: see
bin/_shim.py. On a systemd host use fiona-anonymize-and-send[@SITE].
"""

import sys

from _shim import main

if __name__ == "__main__":
    sys.exit(main("anonymizeAndSend.py", "anonymize-and-send", sys.argv[1:], foreground=True,
                  extra={"send": ("ctl wake anonymize-and-send", False)}))
