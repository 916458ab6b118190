#!/usr/bin/env bash
# Make sure the services the integration tests need answer on 127.0.0.1, starting those that
# do not. Idempotent: a service already running is left alone. Prints what it started, one
# "name pid" line each, to the file named by $STARTED (so the caller can stop only those).
set -euo pipefail
STARTED=${STARTED:-/dev/null}

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

wait_for() {  # name, check function, seconds
    for _ in $(seq 1 "$3"); do "$2" && return 0; sleep 1; done
    echo "error: $1 did not answer on 127.0.0.1 within $3 s" >&2; return 1
}

bash "$(dirname "$0")/install-debs.sh"

if ! pg_up; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "starting PostgreSQL $version" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for PostgreSQL pg_up 30
    echo "postgresql cluster:$version" >> "$STARTED"
fi

if ! redis_up; then
    echo "starting Redis" >&2
    dir=$(mktemp -d /tmp/waterflow-redis.XXXXXX)
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_for Redis redis_up 30
    echo "redis $(cat "$dir/redis.pid")" >> "$STARTED"
fi
