#!/usr/bin/env python3
"""processSingleFile3.py start|stop|status|restart|send|test [--site NAME] [--config PATH]

FIONA's indexer (`fiona process-single-file`) outside systemd, under its original name: a shim
over `fiona ctl ACTION process-single-file` (send: `fiona ctl wake`, which never blocks and
loses nothing when the indexer is down; test FILE...: `fiona classify --test`). Exit codes and
the configuration: see bin/_shim.py. On a systemd host use fiona-process-single-file[@SITE].
"""

import sys

from _shim import main

if __name__ == "__main__":
    sys.exit(main("processSingleFile3.py", "process-single-file", sys.argv[1:],
                  extra={"send": ("ctl wake process-single-file", False),
                         "test": ("classify --test", True)}))
