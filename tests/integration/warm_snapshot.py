"""Whole-schema snapshots of the warm tier, for the disaster-recovery, upgrade and backup tests.

Tables and views are discovered from the catalog (every relation of schema ``water`` that is not
a partition), so a table added by a later migration is in every snapshot without a change here.
Rows are sorted by the relation's primary key (views: by every column that sorts), so two
snapshots compare as sets, whatever order the rows were written or scanned in.
"""

from __future__ import annotations

import polars as pl
import psycopg
from polars.testing import assert_frame_equal
from psycopg import sql


def relations(conn: psycopg.Connection) -> dict[str, str]:
    """``{name: kind}`` of schema ``water``: ``table`` (partitioned ones by parent) or ``view``."""
    rows = conn.execute(
        "SELECT c.relname, CASE WHEN c.relkind = 'v' THEN 'view' ELSE 'table' END"
        " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'water' AND c.relkind IN ('r', 'p', 'v') AND NOT c.relispartition"
        " ORDER BY 1"
    ).fetchall()
    return dict(rows)


def primary_key(conn: psycopg.Connection, name: str) -> list[str]:
    """The primary-key columns of ``water.<name>`` in key order; [] for a view."""
    rows = conn.execute(
        "SELECT a.attname FROM pg_index AS i"
        " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)"
        " JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.pos",
        (f"water.{name}",),
    ).fetchall()
    return [r[0] for r in rows]


def partitions(conn: psycopg.Connection) -> dict[str, list[str]]:
    """``{partitioned table: its partitions' names}`` of schema ``water``."""
    rows = conn.execute(
        "SELECT p.relname, c.relname FROM pg_inherits AS i"
        " JOIN pg_class AS c ON c.oid = i.inhrelid JOIN pg_class AS p ON p.oid = i.inhparent"
        " JOIN pg_namespace AS n ON n.oid = p.relnamespace"
        " WHERE n.nspname = 'water' ORDER BY 1, 2"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for parent, child in rows:
        out.setdefault(parent, []).append(child)
    return out


def read_relation(conn: psycopg.Connection, name: str) -> pl.DataFrame:
    """Every row of ``water.<name>``, sorted by its key (see the module docstring)."""
    cur = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("water", name)))
    cols = [d.name for d in cur.description or []]
    frame = pl.DataFrame(cur.fetchall(), schema=cols, orient="row", infer_schema_length=None)
    key = primary_key(conn, name) or [
        c for c, dtype in frame.schema.items() if not isinstance(dtype, pl.List | pl.Null)
    ]
    return frame.sort(key, nulls_last=True) if frame.height else frame


def snapshot(url: str) -> dict[str, pl.DataFrame]:
    """Every table and view of schema ``water`` (see :func:`read_relation`)."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return {name: read_relation(conn, name) for name in relations(conn)}


def counts(url: str) -> dict[str, int]:
    """Rows of every table and view of schema ``water``."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        query = sql.SQL("SELECT count(*) FROM {}")
        return {
            name: conn.execute(query.format(sql.Identifier("water", name))).fetchone()[0]
            for name in relations(conn)
        }


def assert_same_rows(name: str, before: pl.DataFrame, after: pl.DataFrame, *,
                     exact: bool) -> None:
    """The same rows (both sorted by key); floats to 1e-9 relative unless ``exact``."""
    try:
        assert_frame_equal(after, before, check_exact=exact, rel_tol=1e-9, abs_tol=1e-9,
                           check_dtypes=before.height > 0 and after.height > 0)
    except AssertionError as exc:
        raise AssertionError(f"water.{name} differs: {exc}") from None
