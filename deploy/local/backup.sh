#!/usr/bin/env bash
# Back up the warm tier (README, "Backup and recovery"): a custom-format pg_dump of schema
# `water` into a dated file, restorable with pg_restore.
#
#   deploy/local/backup.sh [WARM_URL [DIR]]
#
# WARM_URL defaults to $WATERFLOW_WARM_URL; DIR to $WATERFLOW_BACKUP_DIR, else ./backups.
# Writes DIR/water-YYYYMMDDTHHMMSSZ.dump (UTC) and prints its path on stdout. With
# WATERFLOW_BACKUP_ROLES=1 it also writes the cluster's roles beside it (pg_dumpall
# --roles-only --no-role-passwords, water-...-roles.sql: a new cluster needs them before a
# restore). With WATERFLOW_BACKUP_KEEP_DAYS=N, dumps of this script in DIR older than N days
# are deleted after a successful dump (never the one just written).
# Passwords: put them in ~/.pgpass or PGPASSWORD rather than the URL, which `ps` shows.
# Exit codes: 0 written, 2 usage (no URL, bad setting), 1 pg_dump failed (nothing left behind).
set -euo pipefail

url=${1:-${WATERFLOW_WARM_URL:-}}
dir=${2:-${WATERFLOW_BACKUP_DIR:-backups}}
keep_days=${WATERFLOW_BACKUP_KEEP_DAYS:-}
if [ -z "$url" ]; then
    echo "error: no database to back up: pass a postgresql:// URL or set WATERFLOW_WARM_URL" >&2
    exit 2
fi
if [ -n "$keep_days" ] && ! [[ "$keep_days" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: WATERFLOW_BACKUP_KEEP_DAYS must be a whole number of days >= 1," \
        "got '$keep_days'" >&2
    exit 2
fi
mkdir -p "$dir"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
file="$dir/water-$stamp.dump"
if [ -e "$file" ]; then
    echo "error: $file exists already (one dump a second at most)" >&2
    exit 1
fi
# Written beside the target and renamed: a failed or interrupted dump never looks complete.
partial="$dir/.water-$stamp.dump.partial"
trap 'rm -f "$partial" "$partial.roles"' EXIT
# --no-password: never wait for a prompt in cron; --schema=water: the tables, views,
# functions, partitions and grants of the warm tier, and nothing else of the database.
if ! pg_dump --format=custom --schema=water --no-password --file="$partial" --dbname="$url"; then
    echo "error: pg_dump of schema water failed (see above); nothing written" >&2
    exit 1
fi
if [ "${WATERFLOW_BACKUP_ROLES:-0}" = 1 ]; then
    if ! pg_dumpall --roles-only --no-role-passwords --no-password --file="$partial.roles" \
        --dbname="$url"; then
        echo "error: pg_dumpall --roles-only failed (see above); nothing written" >&2
        exit 1
    fi
    mv "$partial.roles" "$dir/water-$stamp-roles.sql"
fi
mv "$partial" "$file"
if [ -n "$keep_days" ]; then
    find "$dir" -maxdepth 1 -type f \( -name 'water-*.dump' -o -name 'water-*-roles.sql' \) \
        -mtime "+$((keep_days - 1))" ! -name "water-$stamp*" -delete
fi
echo "$file"
