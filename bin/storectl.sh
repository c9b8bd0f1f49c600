#!/usr/bin/env bash
# storectl.sh start|stop|status|restart [SITE]
#
# Start and stop FIONA's DICOM receiver (`fiona storescp`) outside systemd, under the name the
# original installation used. It is a thin wrapper: the receiver itself is `fiona storescp
# [--site SITE]`, and on a systemd host `systemctl start fiona-storescp[@SITE]` is the better
# way (see systemd/). Do not mix the two for one site.
#
#   start    run the receiver detached (new session, stdin from /dev/null), unless the pid file
#            names a live receiver; wait until it accepts connections on its DICOM port
#   stop     SIGTERM the receiver named by the pid file and wait up to 30 s for it to finish
#            the associations in hand
#   status   print "running (pid N)" or "stopped"; exit 0 when running, 3 when stopped
#   restart  stop, then start
#
# Configuration: $FIONA_CONFIG, else /data/config/config.json. DATADIR (and SITES.SITE.DATADIR)
# come from `fiona config check`, so this script reads the same file the receiver does.
#   pid file  DATADIR/site/run/storescpd<SITE>.pid   (written by the receiver itself)
#   log       DATADIR/logs/storescpd<SITE>.log       (written by the receiver itself)
#   console   DATADIR/logs/storescpd<SITE>.out       (stdout/stderr: start-up errors, tracebacks)
#
# The `fiona` command is taken from PATH; without one, `python3 -m fiona` is run (interpreter
# overridable with $FIONA_PYTHON) with this checkout on PYTHONPATH.
#
# Exit codes (LSB): 0 success / running, 1 failure, 2 usage, 3 stopped (status),
# 4 status unknown (status with a broken config), 6 not configured (config error).

set -euo pipefail

PROG="storectl.sh"
DAEMON="storescpd"
SUBCOMMAND="storescp"
START_TIMEOUT="${FIONA_START_TIMEOUT:-30}"
STOP_TIMEOUT=30

usage() {
    printf 'usage: %s start|stop|status|restart [SITE]\n' "$PROG"
    printf '  SITE: a name from SITES in config.json (default: the main receiver)\n'
    printf '  config: $FIONA_CONFIG, else /data/config/config.json\n'
}

die() {
    local code="$1"
    shift
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

# --- arguments ---------------------------------------------------------------------------------
if [[ $# -lt 1 || $# -gt 2 ]]; then
    usage >&2
    exit 2
fi
ACTION="$1"
SITE="${2:-}"
case "$ACTION" in
    start | stop | status | restart) ;;
    -h | --help | help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
if [[ -n "$SITE" && ! "$SITE" =~ ^[A-Za-z0-9_-]+$ ]]; then
    die 2 "invalid SITE '$SITE': use letters, digits, '_' or '-'"
fi

CFG="${FIONA_CONFIG:-/data/config/config.json}"
# absolute, because the daemon runs with / as its working directory
if [[ "$CFG" != /* ]]; then
    CFG="$(pwd -P)/$CFG"
fi

# --- the fiona command -------------------------------------------------------------------------
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(dirname -- "$SCRIPT_DIR")"
PYTHON="${FIONA_PYTHON:-python3}"
if command -v fiona >/dev/null 2>&1; then
    FIONA=(fiona)
else
    FIONA=("$PYTHON" -m fiona)
    if [[ -f "$REPO_DIR/fiona/__init__.py" ]]; then
        export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

TMPERR="$(mktemp)"
trap 'rm -f -- "$TMPERR"' EXIT

# --- where this site's files are (asked from `fiona config check`) -----------------------------
config_error_code() {
    if [[ "$ACTION" == status ]]; then echo 4; else echo 6; fi
}

if ! CHECK_JSON="$("${FIONA[@]}" --config "$CFG" config check 2>"$TMPERR")"; then
    cat -- "$TMPERR" >&2
    die "$(config_error_code)" "cannot read the configuration $CFG (see above)"
fi

# Prints DATADIR, DICOMIP and DICOMPORT of the site, NUL-separated. `config check` shows SITES
# as written in the file, so a relative SITES.X.DATADIR is resolved here the way fiona does:
# against the folder that holds config.json.
# shellcheck disable=SC2016
PARSE_PY='
import json, os, sys
cfg, site = sys.argv[1], sys.argv[2]
c = json.load(sys.stdin)
base = os.path.dirname(os.path.abspath(cfg))
def folder(p):
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
datadir, ip, port = c["DATADIR"], c.get("DICOMIP") or "0.0.0.0", c.get("DICOMPORT") or 11112
if site:
    sites = c.get("SITES") or {}
    if site not in sites:
        known = ", ".join(sorted(sites)) or "none"
        sys.exit("unknown site %r; SITES in %s has: %s" % (site, cfg, known))
    s = sites[site]
    datadir, port, ip = s["DATADIR"], s["DICOMPORT"], s.get("DICOMIP") or ip
sys.stdout.write("\0".join([folder(str(datadir)), str(ip), str(port)]) + "\0")
'
if ! SITE_INFO="$(printf '%s' "$CHECK_JSON" | "$PYTHON" -c "$PARSE_PY" "$CFG" "$SITE" | tr '\0' '\n')"; then
    die "$(config_error_code)" "cannot find site '${SITE:-(main)}' in $CFG"
fi
{
    IFS= read -r DATADIR
    IFS= read -r DICOMIP
    IFS= read -r DICOMPORT
} <<<"$SITE_INFO"
[[ -n "$DATADIR" && "$DICOMPORT" =~ ^[0-9]+$ ]] || die 6 "unexpected output from 'fiona config check'"

NAME="${DAEMON}${SITE}"
RUN_DIR="$DATADIR/site/run"
LOG_DIR="$DATADIR/logs"
PID_FILE="$RUN_DIR/$NAME.pid"
LOG_FILE="$LOG_DIR/$NAME.log"
OUT_FILE="$LOG_DIR/$NAME.out"

SITE_ARGS=()
if [[ -n "$SITE" ]]; then
    SITE_ARGS=(--site "$SITE")
fi

# --- processes ---------------------------------------------------------------------------------
# alive: exists and is not a zombie (an exited daemon whose parent has not reaped it yet)
alive() {
    local pid="$1" stat state
    if [[ -r "/proc/$pid/stat" ]]; then
        stat="$(cat -- "/proc/$pid/stat" 2>/dev/null)" || return 1
        state="${stat##*) }"
        state="${state%% *}"
        [[ "$state" != Z && "$state" != X ]]
    else
        kill -0 "$pid" 2>/dev/null
    fi
}

# ours: the pid is a live `fiona ... storescp` (a pid file can outlive its daemon, and the number
# can be reused by an unrelated process)
ours() {
    local pid="$1" arg has_fiona=0 has_cmd=0
    alive "$pid" || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 0 # no /proc: trust the pid file
    local -a argv=()
    mapfile -d '' -t argv 2>/dev/null <"/proc/$pid/cmdline" || return 1
    for arg in "${argv[@]}"; do
        [[ "${arg##*/}" == fiona ]] && has_fiona=1
        [[ "$arg" == "$SUBCOMMAND" ]] && has_cmd=1
    done
    [[ $has_fiona == 1 && $has_cmd == 1 ]]
}

# prints the pid from the pid file (empty if none or garbage)
pid_from_file() {
    local pid=""
    if [[ -f "$PID_FILE" ]]; then
        IFS= read -r pid <"$PID_FILE" || true
    fi
    if [[ "$pid" =~ ^[0-9]+$ && "$pid" -gt 1 ]]; then
        printf '%s\n' "$pid"
    fi
}

# prints the pid of the running receiver and returns 0, else returns 1
running_pid() {
    local pid
    pid="$(pid_from_file)"
    [[ -n "$pid" ]] && ours "$pid" && printf '%s\n' "$pid"
}

remove_pid_file_if() {
    # the daemon does not remove its pid file when it exits; drop it if it names `$1`
    local pid="$1"
    if [[ "$(pid_from_file)" == "$pid" ]]; then
        rm -f -- "$PID_FILE"
    fi
}

# Exit 0 when `pid` has a listening TCP socket on DICOMPORT, 1 when not, 2 when /proc cannot
# tell (then a plain connection attempt decides). Asking whose socket it is matters: when another
# program holds the port, a connection succeeds although our receiver is about to fail.
# shellcheck disable=SC2016
OWNS_PORT_PY='
import os, sys
pid, port = sys.argv[1], int(sys.argv[2])
inodes = set()
try:
    for fd in os.listdir("/proc/%s/fd" % pid):
        try:
            link = os.readlink("/proc/%s/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
except OSError:
    sys.exit(2)
tables = 0
for name in ("tcp", "tcp6"):
    try:
        with open("/proc/net/" + name) as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        continue
    tables += 1
    for row in rows:
        col = row.split()
        if len(col) > 9 and col[3] == "0A" and int(col[1].rsplit(":", 1)[1], 16) == port \
                and col[9] in inodes:
            sys.exit(0)
sys.exit(1 if tables else 2)
'

listening() {
    local pid="$1" host="$DICOMIP" rc=0
    "$PYTHON" -c "$OWNS_PORT_PY" "$pid" "$DICOMPORT" || rc=$?
    if ((rc != 2)); then
        return "$rc"
    fi
    case "$host" in
        "" | 0.0.0.0) host=127.0.0.1 ;;
        "::") host=::1 ;;
    esac
    (exec 3<>"/dev/tcp/$host/$DICOMPORT") 2>/dev/null
}

show_console_tail() {
    if [[ -s "$OUT_FILE" ]]; then
        printf '%s: last lines of %s:\n' "$PROG" "$OUT_FILE" >&2
        tail -n 20 -- "$OUT_FILE" >&2
    fi
}

# --- actions -----------------------------------------------------------------------------------
do_status() {
    local pid stale
    if pid="$(running_pid)"; then
        printf '%s is running (pid %s, port %s, log %s)\n' "$NAME" "$pid" "$DICOMPORT" "$LOG_FILE"
        return 0
    fi
    stale="$(pid_from_file)"
    if [[ -n "$stale" ]]; then
        printf '%s is stopped (stale pid file %s names pid %s)\n' "$NAME" "$PID_FILE" "$stale"
    else
        printf '%s is stopped\n' "$NAME"
    fi
    return 3
}

do_start() {
    local pid child stale deadline rc
    if pid="$(running_pid)"; then
        printf '%s is already running (pid %s)\n' "$NAME" "$pid"
        return 0
    fi
    stale="$(pid_from_file)"
    if [[ -n "$stale" ]]; then
        rm -f -- "$PID_FILE"
    fi
    umask 027
    mkdir -p -- "$LOG_DIR"
    # new session (no controlling terminal, no SIGHUP), cwd /, output appended to the console file
    (cd / && exec setsid "${FIONA[@]}" --config "$CFG" "$SUBCOMMAND" \
        ${SITE_ARGS[@]+"${SITE_ARGS[@]}"} </dev/null >>"$OUT_FILE" 2>&1) &
    child=$!

    # The daemon writes its own pid file. `setsid` runs it in this very process (it only forks
    # when started as a process group leader), so `child` is normally the daemon itself.
    deadline=$((SECONDS + START_TIMEOUT))
    pid=""
    while ((SECONDS < deadline)); do
        [[ -n "$pid" ]] || pid="$(running_pid)" || true
        if [[ -n "$pid" ]] && listening "$pid"; then
            printf '%s started (pid %s, port %s, log %s)\n' "$NAME" "$pid" "$DICOMPORT" "$LOG_FILE"
            return 0
        fi
        if ! alive "${pid:-$child}"; then
            rc=0
            if [[ -z "$pid" ]]; then
                wait "$child" || rc=$?
                # a forking setsid exits 0 at once; the daemon may still be coming up
                if ((rc == 0)) && pid="$(running_pid)"; then
                    continue
                fi
            fi
            printf '%s: %s exited during start-up%s\n' "$PROG" "$NAME" \
                "$([[ -n "$pid" ]] || printf ' (status %s)' "$rc")" >&2
            remove_pid_file_if "${pid:-$child}"
            show_console_tail
            return 1
        fi
        sleep 0.2
    done
    printf '%s: %s (pid %s) is not accepting connections on port %s after %s s; see %s and %s\n' \
        "$PROG" "$NAME" "${pid:-$child}" "$DICOMPORT" "$START_TIMEOUT" "$LOG_FILE" "$OUT_FILE" >&2
    return 1
}

do_stop() {
    local pid deadline stale
    if ! pid="$(running_pid)"; then
        stale="$(pid_from_file)"
        if [[ -n "$stale" ]]; then
            rm -f -- "$PID_FILE"
        fi
        printf '%s is not running\n' "$NAME"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            printf '%s: %s (pid %s) is still running %s s after SIGTERM; see %s\n' \
                "$PROG" "$NAME" "$pid" "$STOP_TIMEOUT" "$LOG_FILE" >&2
            return 1
        fi
        sleep 0.2
    done
    remove_pid_file_if "$pid"
    printf '%s stopped (was pid %s)\n' "$NAME" "$pid"
    return 0
}

case "$ACTION" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    restart)
        do_stop
        do_start
        ;;
esac
