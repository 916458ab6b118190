#!/usr/bin/env bash
# Install the Debian packages the tests and the local stack need, when they are missing.
# Idempotent and quiet when everything is there. Needs root (the build machines run as root).
set -euo pipefail
need=()
command -v pg_isready >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
