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
        esac
    done < "$started"
    rm -f "$started"
}
trap cleanup EXIT
STARTED=$started bash deploy/local/services.sh

export WATERFLOW_TEST_PG_URL=${WATERFLOW_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
export WATERFLOW_TEST_REDIS_URL=${WATERFLOW_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
.venv/bin/pytest tests/unit tests/integration tests/e2e \
    --cov=dataflows --cov=connectors --cov-report=term:skip-covered --cov-fail-under=80 "$@"
