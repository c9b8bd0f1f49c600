#!/bin/sh
# storectl.sh start|stop|status|restart [SITE]
#
# FIONA's DICOM receiver (`fiona storescp`) outside systemd, under its original name: a shim over
# `fiona ctl ACTION storescp [--site SITE]`; `start` returns once the receiver accepts
# connections. Exit codes (LSB) and the configuration ($FIONA_CONFIG): see bin/_shim.py.
# On a systemd host use fiona-storescp[@SITE] instead; do not mix the two for one site.
exec "${FIONA_PYTHON:-python3}" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from _shim import main; sys.exit(main("storectl.sh", "storescp", sys.argv[1:], positional_site=True))' "$(dirname -- "$0")" "$@"
