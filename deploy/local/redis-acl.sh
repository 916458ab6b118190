#!/usr/bin/env bash
# Least-privilege Redis users for the hot tier (connectors/hot_redis.py), printed for redis-cli
# or for an ACL file:
#
#   redis-acl.sh | redis-cli -h HOST --user ADMIN --pass ...   apply them (ACL SETUSER lines)
#   redis-acl.sh --aclfile > users.acl                          or: redis-server --aclfile users.acl
#
# Users (the password is given as its SHA-256, so neither output holds it in clear):
#   waterflow         the dataflows: exactly the commands the hot writer sends (its Lua scripts'
#                     commands included: Redis checks those too), on keys under the prefix only.
#                     Connect with --hot redis://waterflow:PASSWORD@HOST:6379/0 (rediss:// for TLS).
#   waterflow_reader  optional, for whatever reads the hot state (an API, a dashboard): reads of
#                     the hash and sorted-set keys under the prefix, nothing else (no SCAN/KEYS).
# No user gets FLUSHALL, CONFIG, KEYS, DEBUG or any key outside the prefix.
#
# Environment:
#   WATERFLOW_REDIS_PASSWORD         password of waterflow (required)
#   WATERFLOW_REDIS_READER_PASSWORD  password of waterflow_reader (no reader user when unset)
#   WATERFLOW_HOT_PREFIX             key prefix of the hot tier (default water:)
#   WATERFLOW_REDIS_USER             name of the writing user (default waterflow)
set -euo pipefail

mode=setuser
case ${1:-} in
    '') ;;
    --aclfile) mode=aclfile ;;
    *) echo "usage: $0 [--aclfile]" >&2; exit 2 ;;
esac
: "${WATERFLOW_REDIS_PASSWORD:?set WATERFLOW_REDIS_PASSWORD to the password of the waterflow user}"
prefix=${WATERFLOW_HOT_PREFIX:-water:}
user=${WATERFLOW_REDIS_USER:-waterflow}
case $prefix in
    '' | *[*?\[\]\\\ ]*)
        echo "error: WATERFLOW_HOT_PREFIX must be non-empty, without glob characters or spaces, got '$prefix'" >&2
        exit 2 ;;
esac

hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

# What hot_redis.py sends: PING (connect), SELECT (a database other than 0), SET ... EX ... GET
# (the writer's marker), ZADD GT, ZREMRANGEBYSCORE, EXPIRE, HSET, HDEL, and its two scripts run
# by EVALSHA after SCRIPT EXISTS / SCRIPT LOAD (redis-py's pipeline), which call HGET, DEL,
# HSET, EXPIRE, ZREMRANGEBYSCORE and ZADD.
writer_rules="+ping +select +set +zadd +zremrangebyscore +expire +hset +hdel +hget +del +evalsha +script|exists +script|load"
reader_rules="+ping +select +hget +hgetall +hmget +zrange +zrangebyscore +zrevrange +zrevrangebyscore +zscore +zcard +ttl +exists +type"

line() {  # name, password, rules
    if [ "$mode" = aclfile ]; then
        echo "user $1 on #$(hash "$2") resetchannels ~${prefix}* -@all $3"
    else
        echo "ACL SETUSER $1 reset on #$(hash "$2") ~${prefix}* $3"
    fi
}

line "$user" "$WATERFLOW_REDIS_PASSWORD" "$writer_rules"
if [ -n "${WATERFLOW_REDIS_READER_PASSWORD:-}" ]; then
    line "${user}_reader" "$WATERFLOW_REDIS_READER_PASSWORD" "$reader_rules"
fi
