#!/usr/bin/env bash
# The live stack of docker-compose.yml without Docker, from Debian and PyPI packages, on
# 127.0.0.1 (shared/SERVICES.md):
#
#   stack.sh start    start what is not running yet, wait until it answers, publish the samples
#   stack.sh status   one line per service: up/down, pid, address; the dataflow's lag and counts
#   stack.sh stop     stop only what `start` started, by the pids recorded in the stack folder
#
# Services: a Kafka-protocol broker (Tansu, kafka.sh, in memory), PostgreSQL and Redis (the
# machine's own when they answer, as services.sh does; else the PostgreSQL cluster is started
# and Redis runs in the stack folder), Prometheus and Alertmanager (prometheus.sh, with the rules
# of prometheus/rules/ and the configuration of prometheus/), the dataflow (`waterflow run`, its
# /metrics scraped by Prometheus) and a publisher of dataflows/samples/ (`waterflow publish`,
# once per stack: it exits when the files are sent). Grafana has no Debian package: use
# docker-compose.yml for it.
#
# Everything of the stack lives in $WATERFLOW_STACK_DIR (default .waterflow/stack): pid files,
# logs, the Prometheus and Alertmanager data, the Parquet archive (cold tier), and stack.env,
# the settings `start` chose (read back by status and stop, removed by stop).
#
# Environment (read by the first start; later calls use stack.env):
#   WATERFLOW_KAFKA_PORT (9092), PROMETHEUS_PORT (9090), ALERTMANAGER_PORT (9093),
#   WATERFLOW_METRICS_PORT (9108)                      ports on 127.0.0.1
#   WATERFLOW_WARM_URL   PostgreSQL (default postgresql://postgres@127.0.0.1:5432/waterflow,
#                        the database created if missing); a given URL is used as it is
#   WATERFLOW_HOT_URL    Redis (default redis://127.0.0.1:6379/0); WATERFLOW_HOT_PREFIX as usual
#   WATERFLOW_KAFKA_TOPIC                              input topic (water.readings)
#   WATERFLOW_STACK_PUBLISH_SPEED   `waterflow publish --speed` (default: as fast as the broker
#                                   takes the messages)
#   WATERFLOW_STACK_SCRAPE_INTERVAL Prometheus scrape and evaluation interval (default 15s, as
#                                   shipped)
#   WATERFLOW_STACK_ALERT_FOR       if set (e.g. 20s), every rule's `for:` is replaced by it in
#                                   the stack's copy of the rules (demos: `make live`); the
#                                   expressions are always the shipped ones
#   WATERFLOW_AM_GROUP_WAIT, ... and the other WATERFLOW_* of prometheus/alertmanager.yml
set -Eeuo pipefail  # -E: the ERR trap of start also fires in the functions it calls
# A relative WATERFLOW_STACK_DIR is the caller's, before the cd to the repository.
STACK=${WATERFLOW_STACK_DIR:-$(dirname "$0")/../../.waterflow/stack}
mkdir -p "$STACK"
STACK=$(cd "$STACK" && pwd)
cd "$(dirname "$0")/../.."
REPO=$PWD
. deploy/local/lib.sh
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WATERFLOW=$REPO/.venv/bin/waterflow
ENV_FILE=$STACK/stack.env
SAMPLES=$REPO/dataflows/samples

settings() {  # the recorded settings of a started stack, else the environment's
    if [ -f "$ENV_FILE" ]; then
        # shellcheck source=/dev/null
        . "$ENV_FILE"
        return 0
    fi
    KAFKA_PORT=${WATERFLOW_KAFKA_PORT:-9092}
    PROM_PORT=${PROMETHEUS_PORT:-9090}
    AM_PORT=${ALERTMANAGER_PORT:-9093}
    METRICS_PORT=${WATERFLOW_METRICS_PORT:-9108}
    TOPIC=${WATERFLOW_KAFKA_TOPIC:-water.readings}
    DEFAULT_WARM=postgresql://postgres@127.0.0.1:5432/waterflow
    WARM_URL=${WATERFLOW_WARM_URL:-$DEFAULT_WARM}
    HOT_URL=${WATERFLOW_HOT_URL:-redis://127.0.0.1:6379/0}
    HOT_PREFIX=${WATERFLOW_HOT_PREFIX:-water:}
    PUBLISH_SPEED=${WATERFLOW_STACK_PUBLISH_SPEED:-}
    SCRAPE_INTERVAL=${WATERFLOW_STACK_SCRAPE_INTERVAL:-15s}
    ALERT_FOR=${WATERFLOW_STACK_ALERT_FOR:-}
}

save_settings() {
    local name
    for name in KAFKA_PORT PROM_PORT AM_PORT METRICS_PORT TOPIC DEFAULT_WARM WARM_URL HOT_URL \
                HOT_PREFIX PUBLISH_SPEED SCRAPE_INTERVAL ALERT_FOR; do
        printf '%s=%q\n' "$name" "${!name}"
    done > "$ENV_FILE"
}

# ---------------------------------------------------------------------------------------
# Checks

pg_up() { pg_isready -q -d "$1" -t 2 2>/dev/null; }
# The maintenance database of the default URL's server, for CREATE DATABASE.
pg_admin_url() { echo "${DEFAULT_WARM%/*}/postgres"; }
redis_up() { redis-cli -u "$HOT_URL" ping 2>/dev/null | grep -q PONG; }
kafka_up() { WATERFLOW_KAFKA_PORT=$KAFKA_PORT bash deploy/local/kafka.sh status >/dev/null 2>&1; }
http_up() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }
metrics_up() { http_up "http://127.0.0.1:$METRICS_PORT/metrics"; }

# ---------------------------------------------------------------------------------------
# Start

start_postgresql() {
    if [ "$WARM_URL" != "$DEFAULT_WARM" ]; then
        pg_up "$WARM_URL" || {
            echo "error: PostgreSQL of WATERFLOW_WARM_URL does not answer" >&2; return 1; }
        return 0  # a given database is the caller's: used as it is
    fi
    if ! pg_up "$(pg_admin_url)"; then
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        echo "starting the PostgreSQL $version cluster" >&2
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
        echo "$version" > "$STACK/postgresql.started"
        for _ in $(seq 1 60); do pg_up "$(pg_admin_url)" && break; sleep 0.5; done
        pg_up "$(pg_admin_url)" || {
            echo "error: PostgreSQL did not answer on 127.0.0.1:5432 within 30 s" >&2; return 1; }
    fi
    # The stack's own database on the shared server (the tests' databases stay apart).
    if [ -z "$(psql "$(pg_admin_url)" -tAc "SELECT 1 FROM pg_database WHERE datname = 'waterflow'")" ]
    then
        psql "$(pg_admin_url)" -qc 'CREATE DATABASE waterflow'
    fi
}

start_redis() {
    redis_up && return 0  # the machine's (or the caller's) Redis
    local port
    port=$(echo "$HOT_URL" | sed -nE 's#^redis://([^@/]*@)?127\.0\.0\.1:([0-9]+).*#\2#p')
    [ -n "$port" ] || {
        echo "error: Redis of WATERFLOW_HOT_URL does not answer (and is not local)" >&2; return 1; }
    mkdir -p "$STACK/redis"
    wf_spawn "$STACK/redis.pid" "$STACK/redis.log" redis-server --bind 127.0.0.1 --port "$port" \
        --save "" --appendonly no --dir "$STACK/redis"
    wf_wait_answers "$WF_PID" 30 Redis "127.0.0.1:$port" "$STACK/redis.log" redis_up
}

start_kafka() {
    local address
    # kafka.sh leaves an answering broker alone; it appends to kafka.started only if it started one.
    address=$(WATERFLOW_KAFKA_PORT=$KAFKA_PORT WATERFLOW_KAFKA_RUN_DIR=$STACK/kafka \
              STARTED=$STACK/kafka.started PYTHON=$PYTHON bash deploy/local/kafka.sh start)
    # The topics of docker-compose.yml's kafka-topics job, 4 partitions each.
    "$PYTHON" - "$address" "$TOPIC" <<'EOF'
import sys
from connectors.kafka import KafkaConfig, ensure_topic
brokers, topic = sys.argv[1], sys.argv[2]
for name in (topic, "water.quarantine", "water.anomalies"):
    ensure_topic(KafkaConfig(brokers=(brokers,), topic=name), name, 4)
EOF
}

render_prometheus() {
    local dir=$STACK/prometheus
    mkdir -p "$dir/rules"
    # The shipped rules; with WATERFLOW_STACK_ALERT_FOR only their hold times changed.
    local rules
    for rules in prometheus/rules/*.yml; do
        if [ -n "$ALERT_FOR" ]; then
            sed -E "s/^( +for: ).*/\1$ALERT_FOR/" "$rules" > "$dir/rules/$(basename "$rules")"
        else
            cp "$rules" "$dir/rules/"
        fi
    done
    # The shipped configuration with the stack's ports, rules folder and interval.
    sed -e "s#127\.0\.0\.1:9093#127.0.0.1:$AM_PORT#; s#127\.0\.0\.1:9108#127.0.0.1:$METRICS_PORT#" \
        -e "s#127\.0\.0\.1:9090#127.0.0.1:$PROM_PORT#; s#- rules/\*\.yml#- $dir/rules/*.yml#" \
        -e "s#_interval: 15s#_interval: $SCRAPE_INTERVAL#" \
        prometheus/prometheus.yml > "$dir/prometheus.yml"
    promtool check config "$dir/prometheus.yml" > "$dir/promtool.log" 2>&1 || {
        echo "error: the stack's Prometheus configuration is invalid:" >&2
        cat "$dir/promtool.log" >&2; return 1; }
}

start_prometheus() {
    render_prometheus
    PROMETHEUS_PORT=$PROM_PORT ALERTMANAGER_PORT=$AM_PORT \
        PROMETHEUS_CONFIG=$STACK/prometheus/prometheus.yml \
        bash deploy/local/prometheus.sh start "$STACK/prometheus"
}

start_dataflow() {
    if wf_running_pid "$STACK/waterflow.pid" "waterflow run" >/dev/null; then
        return 0
    fi
    # No recovery folder: the broker keeps its topics in memory, so a restarted stack starts
    # from empty topics and the dataflow reads them from the start. The sinks are idempotent.
    WATERFLOW_HOT_PREFIX=$HOT_PREFIX wf_spawn "$STACK/waterflow.pid" "$STACK/waterflow.log" \
        "$WATERFLOW" run --brokers "127.0.0.1:$KAFKA_PORT" --topic "$TOPIC" \
        --warm "$WARM_URL" --hot "$HOT_URL" --cold "file://$STACK/cold" --out "$STACK/out" \
        --network "$SAMPLES/network.toml" --metrics-port "$METRICS_PORT"
    # /metrics answers before the migrations and the run's row: wait for its "running" line too.
    wf_wait_answers "$WF_PID" 90 "the dataflow (waterflow run)" \
        "http://127.0.0.1:$METRICS_PORT/metrics" "$STACK/waterflow.log" dataflow_up
}

dataflow_up() { metrics_up && grep -qE '(^|"message": ")running ' "$STACK/waterflow.log"; }

start_publisher() {
    # Once per stack: the sinks are idempotent, but the counters would count a second copy.
    # A broker started by this very start holds nothing: then the samples go again.
    if [ -f "$STACK/publisher.pid" ] && [ "${KAFKA_FRESH:-0}" = 0 ]; then
        return 0
    fi
    local pace=()
    [ -z "$PUBLISH_SPEED" ] || pace=(--speed "$PUBLISH_SPEED")
    wf_spawn "$STACK/publisher.pid" "$STACK/publisher.log" "$WATERFLOW" publish "$SAMPLES/" \
        --brokers "127.0.0.1:$KAFKA_PORT" --topic "$TOPIC" "${pace[@]}"
}

start() {
    settings
    save_settings
    bash deploy/local/install-debs.sh
    local before=0 after=0
    [ -f "$STACK/kafka.started" ] && before=$(wc -l < "$STACK/kafka.started")
    trap 'echo "stack.sh start failed; what it started still runs: deploy/local/stack.sh stop" >&2' ERR
    start_kafka >/dev/null
    [ -f "$STACK/kafka.started" ] && after=$(wc -l < "$STACK/kafka.started")
    KAFKA_FRESH=$((after > before ? 1 : 0))
    start_postgresql
    start_redis
    start_prometheus
    start_dataflow
    start_publisher
    status
}

# ---------------------------------------------------------------------------------------
# Status

# The pid recorded in the stack folder (started by the stack), "external" (answering, not
# started by the stack) or "-" (down). Uses $state, set by the caller's check.
owner() {  # pidfile pattern
    local pid
    if pid=$(wf_running_pid "$1" "$2"); then echo "pid $pid"
    elif [ "$state" = up ]; then echo external
    else echo -; fi
}

line() { printf '%-13s %-7s %-14s %s\n' "$@"; }

# The sum of a metric's samples on the dataflow's /metrics (label filter optional), or "?".
metric() {  # text name [label-substring]
    awk -v name="$2" -v want="${3:-}" '
        index($1, name) == 1 && (substr($1, length(name) + 1, 1) == "{" || $1 == name) \
            && (want == "" || index($1, want) > 0) { sum += $2; seen = 1 }
        END { if (seen) printf "%.0f", sum; else printf "?" }' <<< "$1"
}

status() {
    settings
    local down=0 state
    if kafka_up; then state=up; else state=down; down=1; fi
    line kafka "$state" "$(owner "$STACK/kafka/broker.pid" tansu)" "127.0.0.1:$KAFKA_PORT"
    if pg_up "$WARM_URL"; then state=up; else state=down; down=1; fi
    local pg_owner=external
    [ "$state" = up ] || pg_owner=-
    [ -f "$STACK/postgresql.started" ] && pg_owner="cluster $(cat "$STACK/postgresql.started")"
    line postgresql "$state" "$pg_owner" "$(redact "$WARM_URL")"
    if redis_up; then state=up; else state=down; down=1; fi
    line redis "$state" "$(owner "$STACK/redis.pid" redis-server)" "$(redact "$HOT_URL")"
    if http_up "http://127.0.0.1:$PROM_PORT/-/ready"; then state=up; else state=down; down=1; fi
    line prometheus "$state" "$(owner "$STACK/prometheus/prometheus.pid" prometheus)" \
        "http://127.0.0.1:$PROM_PORT"
    if http_up "http://127.0.0.1:$AM_PORT/-/ready"; then state=up; else state=down; down=1; fi
    line alertmanager "$state" \
        "$(owner "$STACK/prometheus/alertmanager.pid" prometheus-alertmanager)" \
        "http://127.0.0.1:$AM_PORT"
    local text detail=""
    if text=$(curl -fsS --max-time 3 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null); then
        state=up
        detail="  consumer lag $(metric "$text" waterflow_kafka_consumer_lag_messages) messages,"
        detail+=" readings accepted $(metric "$text" waterflow_readings_total 'outcome="accepted"'),"
        detail+=" quarantined $(metric "$text" waterflow_readings_total 'outcome="quarantined"')"
    else
        state=down; down=1
    fi
    line waterflow "$state" "$(owner "$STACK/waterflow.pid" "waterflow run")" \
        "http://127.0.0.1:$METRICS_PORT/metrics$detail"
    local published
    if wf_running_pid "$STACK/publisher.pid" "waterflow publish" >/dev/null; then
        line publisher running "$(owner "$STACK/publisher.pid" "waterflow publish")" \
            "$SAMPLES/ -> $TOPIC"
    elif [ -f "$STACK/publisher.pid" ] \
        && published=$(grep -m1 '^published ' "$STACK/publisher.log" 2>/dev/null); then
        line publisher done "-" "$published"
    elif [ -f "$STACK/publisher.pid" ]; then
        line publisher failed "-" "see $STACK/publisher.log"; down=1
    else
        line publisher down "-" "not started"; down=1
    fi
    line grafana n/a "-" \
        "not installable here (no Debian package): the Docker stack has it (docker-compose.yml)"
    return "$down"
}

redact() { echo "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }

# ---------------------------------------------------------------------------------------
# Stop

stop() {
    settings
    wf_stop "$STACK/publisher.pid" "waterflow publish"
    # SIGTERM drains the flow gracefully (every tier holds what was read); a minute at most.
    wf_stop "$STACK/waterflow.pid" "waterflow run" 60
    PROMETHEUS_PORT=$PROM_PORT ALERTMANAGER_PORT=$AM_PORT \
        bash deploy/local/prometheus.sh stop "$STACK/prometheus"
    if [ -s "$STACK/kafka.started" ]; then
        WATERFLOW_KAFKA_PORT=$KAFKA_PORT WATERFLOW_KAFKA_RUN_DIR=$STACK/kafka \
            bash deploy/local/kafka.sh stop
    fi
    rm -f "$STACK/kafka.started"
    wf_stop "$STACK/redis.pid" redis-server
    if [ -f "$STACK/postgresql.started" ]; then
        pg_ctlcluster --skip-systemctl-redirect "$(cat "$STACK/postgresql.started")" main stop \
            || true
        rm -f "$STACK/postgresql.started"
    fi
    rm -f "$ENV_FILE"
    echo "stopped what the stack started ($STACK)"
}

# ---------------------------------------------------------------------------------------
# Watch (`make live`)

# One line per check, printed once it passes: rows in water.readings, hot-tier keys, the
# dataflow's counters, an alert active in Alertmanager. Bounded by $1 seconds; exit 1 if a
# check did not pass by then. The stack keeps running.
watch() {
    settings
    local seconds=$1 deadline=$((SECONDS + $1)) metrics_url="http://127.0.0.1:$METRICS_PORT/metrics"
    local rows=no keys=no counters=no alert=no n text first_accepted="" accepted sinks
    while [ $SECONDS -lt $deadline ]; do
        if [ $rows = no ]; then
            n=$(psql "$WARM_URL" -tAc 'SELECT count(*) FROM water.readings' 2>/dev/null || true)
            if [ -n "$n" ] && [ "$n" -gt 0 ]; then
                rows=yes; echo "ok  PostgreSQL: $n rows in water.readings ($(redact "$WARM_URL"))"
            fi
        fi
        if [ $keys = no ]; then
            # Each node's newest reading (other users of the database have other prefixes).
            n=$(redis-cli -u "$HOT_URL" --scan --pattern "${HOT_PREFIX}node:*:latest" 2>/dev/null \
                | wc -l)
            if [ "$n" -gt 0 ]; then
                keys=yes
                echo "ok  Redis: $n keys ${HOT_PREFIX}node:*:latest ($(redact "$HOT_URL"))"
            fi
        fi
        if [ $counters = no ] && text=$(curl -fsS --max-time 3 "$metrics_url" 2>/dev/null); then
            accepted=$(metric "$text" waterflow_readings_total 'outcome="accepted"')
            sinks=$(metric "$text" waterflow_sink_rows_total)
            [ -n "$first_accepted" ] || first_accepted=${accepted/\?/0}
            # Counters start at 0 with the process: above 0 they moved. Wait for the backlog
            # to be read (lag 0) so the line shows the whole movement.
            if [ "$accepted" != "?" ] && [ "$accepted" -gt 0 ] \
                && [ "$(metric "$text" waterflow_kafka_consumer_lag_messages)" = 0 ]; then
                counters=yes
                echo "ok  metrics: waterflow_readings_total{outcome=\"accepted\"} $first_accepted ->" \
                     "$accepted during the watch, waterflow_sink_rows_total $sinks," \
                     "consumer lag 0 ($metrics_url)"
            fi
        fi
        if [ $alert = no ]; then
            n=$(curl -fsS --max-time 3 "http://127.0.0.1:$AM_PORT/api/v2/alerts?active=true" \
                2>/dev/null | "$PYTHON" -c '
import collections, json, sys
by_name = collections.defaultdict(set)
for a in json.load(sys.stdin):
    labels = a["labels"]
    by_name[labels["alertname"]].add(labels.get("node_id") or labels.get("instance") or "-")
parts = []
for name, who in sorted(by_name.items()):
    shown = ", ".join(sorted(who)[:4]) + (", ..." if len(who) > 4 else "")
    parts.append(f"{name} for {len(who)} ({shown})")
print("; ".join(parts))' 2>/dev/null || true)
            if [ -n "$n" ]; then
                alert=yes; echo "ok  Alertmanager: firing $n (http://127.0.0.1:$AM_PORT)"
            fi
        fi
        [ "$rows$keys$counters$alert" = yesyesyesyes ] && return 0
        sleep 2
    done
    [ $rows = yes ] || echo "NO  PostgreSQL: no rows in water.readings within $seconds s"
    [ $keys = yes ] || echo "NO  Redis: no key ${HOT_PREFIX}node:*:latest within $seconds s"
    [ $counters = yes ] || echo "NO  metrics: waterflow_readings_total not moving, or lag not 0," \
                                "within $seconds s ($metrics_url)"
    [ $alert = yes ] || echo "NO  Alertmanager: no alert active within $seconds s (rules' for:" \
                             "${ALERT_FOR:-as shipped, 5m or more}; see the Prometheus alerts page)"
    return 1
}

# `make live`: start with demo settings (the shipped rules with `for: 20s`, scrape every 5 s,
# unless the stack already runs or the environment says otherwise), then watch.
live() {
    export WATERFLOW_STACK_ALERT_FOR=${WATERFLOW_STACK_ALERT_FOR-20s}
    export WATERFLOW_STACK_SCRAPE_INTERVAL=${WATERFLOW_STACK_SCRAPE_INTERVAL-5s}
    start
    settings
    echo "watching for up to ${WATERFLOW_LIVE_WATCH_S:-180} s (rules' for: ${ALERT_FOR:-as shipped})"
    local rc=0
    watch "${WATERFLOW_LIVE_WATCH_S:-180}" || rc=$?
    echo "the stack keeps running: deploy/local/stack.sh status; stop it with deploy/local/stack.sh stop"
    return $rc
}

case "${1:-}" in
    start) start ;;
    status) status ;;
    stop) stop ;;
    watch) watch "${2:-180}" ;;
    live) live ;;
    *) echo "usage: $0 start|status|stop|watch [SECONDS]|live" >&2; exit 2 ;;
esac
