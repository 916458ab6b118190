#!/usr/bin/env bash
# Prometheus and Alertmanager (Debian packages, shared/SERVICES.md) for the local stack and
# the tests, bound to 127.0.0.1, with their data and pid files under one folder.
#
#   prometheus.sh render-alertmanager OUT   prometheus/alertmanager.yml with ${WATERFLOW_*}
#                                           substituted (defaults below) into OUT
#   prometheus.sh start DIR                 start both (idempotent: a port that already answers
#                                           is left alone), wait until ready
#   prometheus.sh stop DIR                  stop only what `start DIR` started (its pid files)
#
# Environment: PROMETHEUS_PORT (9090), ALERTMANAGER_PORT (9093), PROMETHEUS_CONFIG
# (prometheus/prometheus.yml), ALERTMANAGER_CONFIG (default: rendered into DIR), and the
# WATERFLOW_* names documented in prometheus/alertmanager.yml.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)

render_alertmanager() {
    export WATERFLOW_ONCALL_RECEIVER=${WATERFLOW_ONCALL_RECEIVER:-oncall}
    export WATERFLOW_ONCALL_WEBHOOK_URL=${WATERFLOW_ONCALL_WEBHOOK_URL:-http://127.0.0.1:9095/oncall}
    export WATERFLOW_TICKET_WEBHOOK_URL=${WATERFLOW_TICKET_WEBHOOK_URL:-http://127.0.0.1:9095/tickets}
    # Read only when a page goes to PagerDuty: a missing file fails that notification, loudly.
    export WATERFLOW_PAGERDUTY_KEY_FILE=${WATERFLOW_PAGERDUTY_KEY_FILE:-/etc/waterflow/pagerduty.key}
    export WATERFLOW_ONCALL_EMAIL=${WATERFLOW_ONCALL_EMAIL:-oncall@localhost}
    export WATERFLOW_SMTP_FROM=${WATERFLOW_SMTP_FROM:-waterflow-alerts@localhost}
    export WATERFLOW_SMTP_SMARTHOST=${WATERFLOW_SMTP_SMARTHOST:-127.0.0.1:25}
    export WATERFLOW_SMTP_USER=${WATERFLOW_SMTP_USER:-}
    export WATERFLOW_SMTP_PASSWORD_FILE=${WATERFLOW_SMTP_PASSWORD_FILE:-}
    export WATERFLOW_AM_GROUP_WAIT=${WATERFLOW_AM_GROUP_WAIT:-30s}
    export WATERFLOW_AM_GROUP_INTERVAL=${WATERFLOW_AM_GROUP_INTERVAL:-5m}
    export WATERFLOW_AM_REPEAT_INTERVAL=${WATERFLOW_AM_REPEAT_INTERVAL:-4h}
    # An explicit list: only these names are substituted, any other $ stays as written.
    local names
    names=$(grep -o '\${WATERFLOW_[A-Z_]*}' "$repo/prometheus/alertmanager.yml" | sort -u | tr '\n' ' ')
    envsubst "$names" < "$repo/prometheus/alertmanager.yml" > "$1"
}

answers() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

wait_ready() {  # name, url, seconds
    local deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do answers "$2" && return 0; sleep 0.2; done
    echo "error: $1 did not answer at $2 within $3 s" >&2
    return 1
}

start() {
    local dir=$1
    local prom_port=${PROMETHEUS_PORT:-9090} am_port=${ALERTMANAGER_PORT:-9093}
    local prom_config=${PROMETHEUS_CONFIG:-$repo/prometheus/prometheus.yml}
    local am_config=${ALERTMANAGER_CONFIG:-}
    mkdir -p "$dir/alertmanager-data" "$dir/prometheus-data"
    if [ -z "$am_config" ]; then
        am_config=$dir/alertmanager.yml
        render_alertmanager "$am_config"
    fi
    if answers "http://127.0.0.1:$am_port/-/ready"; then
        echo "Alertmanager already answers on 127.0.0.1:$am_port, left alone" >&2
    else
        # --cluster.listen-address= (empty): no gossip port, nothing bound beyond loopback.
        prometheus-alertmanager --config.file="$am_config" \
            --storage.path="$dir/alertmanager-data" \
            --web.listen-address="127.0.0.1:$am_port" --cluster.listen-address= \
            >"$dir/alertmanager.log" 2>&1 &
        echo $! > "$dir/alertmanager.pid"
    fi
    if answers "http://127.0.0.1:$prom_port/-/ready"; then
        echo "Prometheus already answers on 127.0.0.1:$prom_port, left alone" >&2
    else
        prometheus --config.file="$prom_config" --storage.tsdb.path="$dir/prometheus-data" \
            --web.listen-address="127.0.0.1:$prom_port" \
            >"$dir/prometheus.log" 2>&1 &
        echo $! > "$dir/prometheus.pid"
    fi
    wait_ready Alertmanager "http://127.0.0.1:$am_port/-/ready" 30 \
        || { tail -n 20 "$dir/alertmanager.log" >&2; return 1; }
    wait_ready Prometheus "http://127.0.0.1:$prom_port/-/ready" 30 \
        || { tail -n 20 "$dir/prometheus.log" >&2; return 1; }
}

stop() {
    local dir=$1 name pid
    for name in prometheus alertmanager; do
        [ -f "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        if kill "$pid" 2>/dev/null; then
            # Up to 10 s for a clean shutdown (TSDB head flush), then no more waiting.
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

case "${1:-}" in
    render-alertmanager) render_alertmanager "${2:?usage: $0 render-alertmanager OUT}" ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 render-alertmanager OUT | start DIR | stop DIR" >&2; exit 2 ;;
esac
