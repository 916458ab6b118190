#!/bin/sh
# One process of the waterflow Bytewax cluster, in a container (docker-compose.yml, deploy/k8s/):
# `waterflow run` with its index in the cluster, its share of the recovery partitions on a volume
# of its own, and its metrics reachable from outside the container.
#
# Environment, besides the WATERFLOW_* settings of `waterflow run`:
#   CLUSTER_ADDRESSES    host:port;host:port of every process, in index order (required)
#   PROCESS_ID           this process's index in CLUSTER_ADDRESSES; default: the number ending
#                        the host name (StatefulSet pod waterflow-1 -> 1)
#   WORKERS              worker threads of this process (default 1)
#   RECOVERY_PARTITIONS  recovery partitions of the whole cluster (default 4). Bytewax needs the
#                        cluster as a whole to hold each partition once; with a volume per
#                        process, process i keeps partitions i, i+n, i+2n... (n processes) in
#                        its WATERFLOW_RECOVERY_DIR. Lose one volume, wipe them all: the
#                        snapshots of the others no longer match.
#   METRICS_PUBLIC_PORT  serve /metrics and /healthz on this port, the same in every process
#                        (one container each), on WATERFLOW_METRICS_ADDR: the deploy files set
#                        0.0.0.0 so that Prometheus and the probes reach it (default: loopback).
#                        `waterflow run` serves on WATERFLOW_METRICS_PORT + its index (several
#                        processes on one host), so this sets WATERFLOW_METRICS_PORT to the
#                        public port minus the index; set one or the other. Default: no server.
# Extra arguments go to `waterflow run`.
set -eu

: "${CLUSTER_ADDRESSES:?CLUSTER_ADDRESSES must list every process as host:port;host:port}"
: "${WATERFLOW_RECOVERY_DIR:?WATERFLOW_RECOVERY_DIR must name the recovery volume of this process}"
: "${WATERFLOW_RUN_ID:?WATERFLOW_RUN_ID must be set: processes with a recovery folder each share the run only by its id}"
whole() {  # name, value
    case $2 in
        '' | *[!0-9]*) echo "error: $1 must be a whole number, got '$2'" >&2; exit 2 ;;
    esac
}
host=${HOSTNAME:-}
process_id=${PROCESS_ID:-${host##*-}}
whole PROCESS_ID "$process_id"
processes=$(printf '%s' "$CLUSTER_ADDRESSES" | tr ';' '\n' | grep -c .)
if [ "$process_id" -ge "$processes" ]; then
    echo "error: PROCESS_ID $process_id is not an index of CLUSTER_ADDRESSES ($processes processes)" >&2
    exit 2
fi

partitions=${RECOVERY_PARTITIONS:-4}
whole RECOVERY_PARTITIONS "$partitions"
if [ "$partitions" -lt "$processes" ]; then
    echo "error: RECOVERY_PARTITIONS ($partitions) must be at least the number of processes ($processes)" >&2
    exit 2
fi
if [ -n "${METRICS_PUBLIC_PORT:-}" ]; then
    whole METRICS_PUBLIC_PORT "$METRICS_PUBLIC_PORT"
    if [ -n "${WATERFLOW_METRICS_PORT:-}" ]; then
        echo "error: METRICS_PUBLIC_PORT sets WATERFLOW_METRICS_PORT: set only one" >&2
        exit 2
    fi
    if [ "$METRICS_PUBLIC_PORT" -lt "$process_id" ] || [ "$METRICS_PUBLIC_PORT" -gt 65535 ]; then
        echo "error: METRICS_PUBLIC_PORT must be a port number, got '$METRICS_PUBLIC_PORT'" >&2
        exit 2
    fi
    WATERFLOW_METRICS_PORT=$((METRICS_PUBLIC_PORT - process_id))
    export WATERFLOW_METRICS_PORT
fi

mkdir -p "$WATERFLOW_RECOVERY_DIR"
if ! ls "$WATERFLOW_RECOVERY_DIR"/part-*.sqlite3 >/dev/null 2>&1; then
    # A first start: create every partition, keep this process's share.
    fresh=$(mktemp -d)
    python -m bytewax.recovery "$fresh" "$partitions"
    part=$process_id
    while [ "$part" -lt "$partitions" ]; do
        mv "$fresh/part-$part.sqlite3" "$WATERFLOW_RECOVERY_DIR/"
        part=$((part + processes))
    done
    rm -rf "$fresh"
    echo "recovery partitions of process $process_id created in $WATERFLOW_RECOVERY_DIR" >&2
fi

exec waterflow run -i "$process_id" -a "$CLUSTER_ADDRESSES" -w "${WORKERS:-1}" "$@"
