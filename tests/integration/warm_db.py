"""Helpers for the warm tier's partition tests: catalog queries.

Partition tests create and drop partitions, and retention drops every month before a cutoff:
they get a database of their own (``conftest.fresh_database``), not the session's shared one.
"""

from __future__ import annotations

import psycopg
from psycopg import sql


def partitions(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """``{partition name: bound expression}`` of ``water.<table>``, read from the catalog."""
    conn.execute("SET TimeZone = 'UTC'")
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)"
        " FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass ORDER BY c.relname",
        (f"water.{table}",),
    ).fetchall()
    return dict(rows)


def rows_per_partition(conn: psycopg.Connection, table: str) -> dict[str, int]:
    """``{partition name: row count}``, counted through the parent (tableoid)."""
    query = sql.SQL(
        "SELECT tableoid::regclass::text, count(*) FROM {} GROUP BY 1 ORDER BY 1"
    ).format(sql.Identifier("water", table))
    return {name.removeprefix("water."): n for name, n in conn.execute(query).fetchall()}


def month_bound(lo: str, hi: str) -> str:
    """The bound text PostgreSQL prints (TimeZone UTC) for a timestamptz month partition."""
    return f"FOR VALUES FROM ('{lo} 00:00:00+00') TO ('{hi} 00:00:00+00')"
