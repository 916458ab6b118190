#!/usr/bin/env python3
"""Give the roles of the migrations their passwords, after ``waterflow db migrate``.

Migration 0002 creates ``water_writer`` and ``water_reader`` with LOGIN and no password; a
deployment sets them from its secrets. Run as the migrating superuser (``WATERFLOW_WARM_URL``),
with ``WATERFLOW_WRITER_PASSWORD`` and ``WATERFLOW_READER_PASSWORD`` set; running it again sets
them again (a password rotation). Used by docker-compose.yml and deploy/k8s/job-migrate.yaml.
"""

from __future__ import annotations

import os
import sys

import psycopg
from psycopg import sql

ROLES = {"water_writer": "WATERFLOW_WRITER_PASSWORD", "water_reader": "WATERFLOW_READER_PASSWORD"}


def main() -> int:
    """Set each role's password; exit 2 naming a missing setting, never printing a password."""
    url = os.environ.get("WATERFLOW_WARM_URL", "")
    missing = [name for name in ("WATERFLOW_WARM_URL", *ROLES.values()) if not os.environ.get(name)]
    if missing:
        print(f"error: {', '.join(missing)} not set", file=sys.stderr)
        return 2
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        for role, variable in ROLES.items():
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(os.environ[variable])
                )
            )
            print(f"password of {role} set from {variable}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
