#!/bin/sh
# moveFromScanner.sh start|stop|status|restart
#
# FIONA's pull of missing series from the scanner (`fiona pull-from-scanner`, a pass every 15 s)
# outside systemd, under its original name: a shim over `fiona ctl ACTION pull-from-scanner`.
# Exit codes (LSB) and the configuration ($FIONA_CONFIG): see bin/_shim.py. On a systemd host use
# fiona-pull-from-scanner instead; `fiona pull-from-scanner --once` makes a single pass.
exec "${FIONA_PYTHON:-python3}" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from _shim import main; sys.exit(main("moveFromScanner.sh", "pull-from-scanner", sys.argv[1:]))' "$(dirname -- "$0")" "$@"
