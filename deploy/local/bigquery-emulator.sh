#!/usr/bin/env bash
# The local-bigquery emulator (shared/SERVICES.md) for the tests and the benchmark.
#
#   bigquery-emulator.sh start   install if needed, start unless already answering, print endpoint
#   bigquery-emulator.sh stop    stop the emulator this script started (by its recorded pid)
#   bigquery-emulator.sh status  print the endpoint if it answers, exit non-zero otherwise
#
# local-bigquery 0.3.2 needs Python 3.13 and DuckDB 1.5.5, whose extensions come from PyPI
# (the build machines are offline): they live in their own venv under .services/bigquery/
# (ignored by git), kept between runs so only the first run pays for the install (~1 min).
# Environment: WATERFLOW_BQ_PORT (default 9050), WATERFLOW_BQ_GRPC_PORT (default 9060),
# WATERFLOW_BQ_HOME (default .services/bigquery). The state of the emulator on port P (pid,
# log, data) lives in $WATERFLOW_BQ_HOME/port-P/, removed by stop. When it starts the emulator
# it appends "bigquery PID:PORT" to the file named by $STARTED, like services.sh, so a caller
# stops only what it started. Start, wait and stop: lib.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/local/lib.sh
STARTED=${STARTED:-/dev/null}
PORT=${WATERFLOW_BQ_PORT:-9050}
GRPC_PORT=${WATERFLOW_BQ_GRPC_PORT:-9060}
BASE=${WATERFLOW_BQ_HOME:-$PWD/.services/bigquery}
VENV=$BASE/venv
EMU_HOME=$BASE/home  # DuckDB reads its extensions from $HOME/.duckdb
# Per port: concurrent test runs (several engineers, one checkout) each use their own port and
# never stop each other's emulator.
RUN_DIR=$BASE/port-$PORT
PIDFILE=$RUN_DIR/emulator.pid
LOG=$RUN_DIR/emulator.log
ENDPOINT=http://127.0.0.1:$PORT
PACKAGES=(local-bigquery==0.3.2 duckdb==1.5.5 duckdb-extensions==1.5.5
          duckdb-extension-icu==1.5.5 duckdb-extension-ducklake==1.5.5
          duckdb-extension-spatial==1.5.5)
STAMP=$VENV/.waterflow-installed  # holds the package list: a changed pin reinstalls

answers() {
    # Any HTTP answer from the REST API means it is up (the path need not exist).
    curl -s -o /dev/null --max-time 2 "$ENDPOINT/bigquery/v2/projects/local/datasets"
}

find_python() {
    local root candidate
    if command -v pyenv >/dev/null 2>&1; then
        root=$(pyenv root)
        for candidate in $(ls -d "$root"/versions/3.13.* 2>/dev/null | sort -V -r); do
            [ -x "$candidate/bin/python" ] && { echo "$candidate/bin/python"; return 0; }
        done
    fi
    for candidate in python3.13 "$HOME/.pyenv/versions/3.13.0/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null
        then
            command -v "$candidate"; return 0
        fi
    done
    echo "error: the BigQuery emulator (local-bigquery 0.3.2) needs Python 3.13; none found" \
         "(looked for \$(pyenv root)/versions/3.13.*/bin/python and python3.13 on PATH)." \
         "Install one, e.g. 'pyenv install 3.13'." >&2
    return 1
}

install() {
    mkdir -p "$BASE"
    # One installer at a time: a second run waits, then finds the venv ready.
    exec 9> "$BASE/install.lock"
    flock 9
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PACKAGES[*]}" ]; then
        flock -u 9; exec 9>&-; return 0
    fi
    local python
    python=$(find_python)
    echo "installing local-bigquery into $VENV (first run only)" >&2
    rm -rf "$VENV"
    mkdir -p "$BASE"
    "$python" -m venv "$VENV"
    # pip's chatter (offline index warnings) goes to a log, shown only if the install fails.
    if ! "$VENV/bin/pip" install -q "${PACKAGES[@]}" > "$BASE/pip.log" 2>&1; then
        echo "error: installing ${PACKAGES[*]} failed; $BASE/pip.log:" >&2
        tail -n 30 "$BASE/pip.log" >&2; return 1
    fi
    # Copy the extensions into the emulator's own HOME once: DuckDB would otherwise try to
    # download them, which fails offline.
    mkdir -p "$EMU_HOME"
    HOME=$EMU_HOME "$VENV/bin/python" -c "import duckdb, duckdb_extensions as e; \
c = duckdb.connect(); \
[e.import_extension(n, force_install=True, con=c) for n in ('icu', 'ducklake', 'spatial')]"
    echo "${PACKAGES[*]}" > "$STAMP"
    flock -u 9; exec 9>&-
}

start() {
    if answers; then
        echo "$ENDPOINT"; return 0  # already running (ours or someone else's): leave it alone
    fi
    install
    mkdir -p "$RUN_DIR"
    # A fresh data folder per start: tests use unique dataset names, nothing needs keeping.
    local data=$RUN_DIR/data
    rm -rf "$data"
    HOME=$EMU_HOME wf_spawn "$PIDFILE" "$LOG" "$VENV/bin/local-bigquery" --host 127.0.0.1 \
        --port "$PORT" --grpc-port "$GRPC_PORT" --data-dir "$data"
    wf_wait_answers "$WF_PID" 120 "the BigQuery emulator" "$ENDPOINT" "$LOG" answers \
        || return 1
    echo "bigquery $WF_PID:$PORT" >> "$STARTED"  # pid:port, for the caller's stop
    echo "$ENDPOINT"
}

stop() {
    wf_stop "$PIDFILE" local-bigquery
    rm -rf "$RUN_DIR"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answers && echo "$ENDPOINT" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
