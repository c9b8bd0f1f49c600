#!/bin/sh
# detectStudyArrival.sh [start|stop|status|restart] [SITE]
#
# FIONA's study-arrival daemon (`fiona detect-study-arrival`) under its original name: without
# an action it runs in the foreground; with one it is a shim over `fiona ctl ACTION
# detect-study-arrival [--site SITE]`. Exit codes (LSB) and the configuration ($FIONA_CONFIG):
# see bin/_shim.py. On a systemd host use fiona-detect-study-arrival[@SITE] instead.
exec "${FIONA_PYTHON:-python3}" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from _shim import main; sys.exit(main("detectStudyArrival.sh", "detect-study-arrival", sys.argv[1:], positional_site=True, foreground=True))' "$(dirname -- "$0")" "$@"
