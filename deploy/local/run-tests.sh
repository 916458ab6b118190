#!/usr/bin/env bash
# The whole test run (`make test`): start what the tests need, run unit, integration and e2e
# tests with coverage, stop only what this script started.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(mktemp)
cleanup() {
    while read -r name pid; do
        case "$name" in
            redis) kill "$pid" 2>/dev/null || true ;;
            postgresql) pg_ctlcluster --skip-systemctl-redirect "${pid#cluster:}" main stop || true ;;
            bigquery) WATERFLOW_BQ_PORT=${pid#*:} bash deploy/local/bigquery-emulator.sh stop || true ;;
            kafka) WATERFLOW_KAFKA_PORT=${pid#*:} bash deploy/local/kafka.sh stop || true ;;
        esac
    done < "$started"
    rm -f "$started"
}
trap cleanup EXIT
# A run stopped by a signal still stops what it started (bash skips EXIT traps on signals).
trap "exit 130" INT
trap "exit 143" TERM
STARTED=$started bash deploy/local/services.sh

export WATERFLOW_TEST_PG_URL=${WATERFLOW_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
export WATERFLOW_TEST_REDIS_URL=${WATERFLOW_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
# The BigQuery emulator (its venv is cached under .services/, so only the first run installs).
# Free ports of this run's own: concurrent runs in one checkout never share (or stop) one.
if [ -z "${WATERFLOW_TEST_BIGQUERY_ENDPOINT:-}" ]; then
    read -r WATERFLOW_BQ_PORT WATERFLOW_BQ_GRPC_PORT < <(.venv/bin/python -c "
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*(s.getsockname()[1] for s in socks))")
    export WATERFLOW_BQ_PORT WATERFLOW_BQ_GRPC_PORT
    WATERFLOW_TEST_BIGQUERY_ENDPOINT=$(STARTED=$started bash deploy/local/bigquery-emulator.sh start)
fi
export WATERFLOW_TEST_BIGQUERY_ENDPOINT
# A Kafka-protocol broker (Tansu, in memory) on a free port of this run's own.
if [ -z "${WATERFLOW_TEST_KAFKA_BROKERS:-}" ]; then
    WATERFLOW_KAFKA_PORT=$(.venv/bin/python -c "
import socket
s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    export WATERFLOW_KAFKA_PORT
    WATERFLOW_TEST_KAFKA_BROKERS=$(STARTED=$started bash deploy/local/kafka.sh start)
fi
export WATERFLOW_TEST_KAFKA_BROKERS
# The house style's gates first (seconds): lint and types.
.venv/bin/ruff check dataflows connectors tests bench grafana
.venv/bin/mypy
bash deploy/local/security-checks.sh  # bandit, pip-audit (skipped with a notice offline)
# A hung service call fails its test after 10 minutes instead of eating CI's 90.
.venv/bin/pytest tests/unit tests/integration tests/e2e --timeout=600 \
    --doctest-modules dataflows connectors \
    --cov=dataflows --cov=connectors --cov-report=term:skip-covered --cov-fail-under=85 "$@"
