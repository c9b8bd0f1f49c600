#!/bin/sh
# mppsctl.sh start|stop|status|restart
#
# FIONA's MPPS SCP (`fiona mpps`, on MPPSPORT) outside systemd, under its original name: a shim
# over `fiona ctl ACTION mpps`; `start` returns once it listens. Exit codes (LSB) and the
# configuration ($FIONA_CONFIG): see bin/_shim.py. On a systemd host use fiona-mpps instead.
exec "${FIONA_PYTHON:-python3}" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from _shim import main; sys.exit(main("mppsctl.sh", "mpps", sys.argv[1:]))' "$(dirname -- "$0")" "$@"
