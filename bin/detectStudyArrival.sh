#!/usr/bin/env bash
# detectStudyArrival.sh [SITE]
#
# Runs FIONA's study-arrival daemon in the foreground under its original name; it is a thin
# wrapper over `fiona detect-study-arrival [--site SITE]`. On a systemd host use
# `systemctl start fiona-detect-study-arrival[@SITE]` instead (see systemd/).
# Configuration: $FIONA_CONFIG, else /data/config/config.json.
set -euo pipefail

SITE="${1:-}"
if [ -n "$SITE" ] && ! [[ "$SITE" =~ ^[A-Za-z0-9_-]+$ ]]; then
  echo "detectStudyArrival.sh: site names are letters, digits, '_' and '-'" >&2
  exit 2
fi
CFG="${FIONA_CONFIG:-/data/config/config.json}"
if command -v fiona >/dev/null 2>&1; then
  FIONA=(fiona)
else
  HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
  FIONA=("${FIONA_PYTHON:-python3}" -m fiona)
fi
ARGS=(--config "$CFG" detect-study-arrival)
[ -n "$SITE" ] && ARGS+=(--site "$SITE")
exec "${FIONA[@]}" "${ARGS[@]}"
