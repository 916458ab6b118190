"""Warm tier: the PostgreSQL tables Grafana reads (schema ``water``).

Unit of parallelism: one writer (one connection) per Bytewax worker; any number of workers may
write the same tables at once, because every batch is an upsert on the table's natural key.

Delivery guarantee: each ``TableRows`` is written in one transaction (all rows or none). Bytewax
recovery replays output written after its last snapshot (at-least-once); since rows are upserted
on their natural key (``tables.KEYS``), a replayed batch rewrites the same rows: exactly-once in
effect.

How a batch is written: the frame is deduplicated on its key (last row wins, so ``ON CONFLICT``
never meets the same key twice in one statement) and converted to CSV by polars (vectorized, no
per-row Python), or to PostgreSQL's binary COPY format when that pays (:func:`copy_binary`:
large frames of few, plain columns, such as forecasts; the server then parses no text). Then,
in the batch's transaction, one query asks whether the table may hold a key of the batch
already (:func:`overlap_sql`: per value of the key's first column, any row in the batch's range
of the rest of the key). If not (a replay into new time ranges, most live batches of readings),
the rows are COPYed straight into the table: no staging table, no ``INSERT ... SELECT``, and
PostgreSQL inserts rows in bulk (about half the server time of the upsert). Otherwise it is
COPYed into a temporary staging table and moved with one ``INSERT ... SELECT ... ON CONFLICT
(key) DO UPDATE``. The check never decides what is stored: a key it misses (a concurrent
writer's commit since the check) fails the direct COPY on the primary key, which rolls the
transaction back, and the batch is upserted in a new one; a direct COPY stores what the upsert
would store when no key exists. SQL is composed with ``psycopg.sql``.

Schema changes are numbered SQL files in ``connectors/migrations`` applied by :func:`migrate`.

Time partitions: ``readings``, ``kpi_15m`` and ``kpi_daily`` are partitioned by UTC month
(migration 0003) with no DEFAULT partition, so a month's partition must exist before its rows
land. Before a batch, the writer calls ``water.ensure_partitions`` (a migration-defined SECURITY
DEFINER function, so the writer role needs no DDL right) for the months of the batch it has not
ensured yet on this connection: DDL happens about once a month per worker, in its own short
transaction, never in the upsert's.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from importlib import resources

import numpy as np
import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from dataflows.tables import KEYS, SCHEMAS, TableRows

log = logging.getLogger(__name__)
_MIGRATE_LOG = {"step": "migrate"}
#: Context of this module's log records (dataflows.logs shows it as fields).
LOG_CONTEXT = {"step": "write_tiers", "tier": "warm"}

SCHEMA = "water"
CONNECT_TIMEOUT_S = 10
#: Server-side cap on one statement, so a stuck lock fails the batch instead of hanging the flow.
STATEMENT_TIMEOUT_MS = 300_000
#: Attempts per batch when the connection fails (the batch is retried on a new connection).
ATTEMPTS = 4
BACKOFF_S = 0.5
#: Key of the advisory lock that serializes concurrent migrate() calls (workers, CLI).
_MIGRATION_LOCK = 0x57A7E2F1
#: Rows converted to CSV at a time while a COPY streams (about 12 MB of CSV for readings).
COPY_CHUNK_ROWS = 50_000

#: Partitioned tables (migration 0003) and their partition column: monthly ranges in UTC.
PARTITIONED: dict[str, str] = {"readings": "ts", "kpi_15m": "window_start", "kpi_daily": "day"}

#: Columns whose known value an upsert must not replace with NULL (a source that lacks them).
KEEP_KNOWN: dict[str, tuple[str, ...]] = {"nodes": ("name", "district", "role", "lat", "lon")}
#: Timestamps go to COPY with their UTC offset, so the session time zone cannot shift them.
_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S%.6f%:z"


# --------------------------------------------------------------------------------------------
# Migrations


def migration_files() -> list[tuple[str, str]]:
    """The numbered migrations shipped with the package, as (version, SQL) in order."""
    folder = resources.files("connectors") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text("utf-8")) for name in names]


def migrate(conninfo: str) -> list[str]:
    """Apply the migrations not yet recorded in ``water.schema_migrations``; return their names.

    Idempotent: a second call applies nothing and returns ``[]``. Each migration runs in its own
    transaction together with its bookkeeping row. Concurrent callers (several workers, the CLI)
    are serialized by an advisory lock. When everything is applied already nothing is executed
    but a read, so a role without DDL rights (``water_writer``) may call it safely.
    """
    wanted = migration_files()
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        if set(_applied(conn)) >= {v for v, _ in wanted}:
            return []
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                    " version text PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(SCHEMA))
            )
            done = set(_applied(conn))
            applied: list[str] = []
            for version, text in wanted:
                if version in done:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(text.encode("utf-8"))
                        record = sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)")
                        conn.execute(record.format(sql.Identifier(SCHEMA)), (version,))
                except psycopg.Error as exc:
                    raise RuntimeError(f"migration {version} failed: {exc}") from exc
                log.info("applied migration %s", version, extra=_MIGRATE_LOG)
                applied.append(version)
            return applied
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def _applied(conn: psycopg.Connection) -> list[str]:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.schema_migrations",)
    ).fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        sql.SQL("SELECT version FROM {}.schema_migrations ORDER BY version").format(
            sql.Identifier(SCHEMA)
        )
    ).fetchall()
    return [r[0] for r in rows]


# --------------------------------------------------------------------------------------------
# Pure row mapping (no database): tested in tests/unit/test_tier_rows.py


def dedupe_on_key(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with one row per natural key of ``table``: the last one wins."""
    key = list(KEYS[table])
    if frame.height < 2:
        return frame
    return frame.unique(subset=key, keep="last", maintain_order=True)


def _pg_array_literal(column: str) -> pl.Expr:
    """A ``list<str>`` column as PostgreSQL array literal text (``{"A","B"}``), vectorized."""
    quoted = (
        pl.lit('"')
        + pl.element()
        .str.replace_all("\\", "\\\\", literal=True)
        .str.replace_all('"', '\\"', literal=True)
        + pl.lit('"')
    )
    col = pl.col(column)
    text = pl.concat_str([pl.lit("{"), col.list.eval(quoted).list.join(","), pl.lit("}")])
    return pl.when(col.is_null()).then(pl.lit(None, dtype=pl.String)).otherwise(text).alias(column)


#: What a NUL in text becomes (as in the quarantine's raw text, ``dataflows.rows``).
_NUL_STAND_IN = b"\\x00"


def copy_payload(frame: pl.DataFrame) -> bytes:
    r"""The frame as CSV for ``COPY ... (FORMAT csv)``: NULL is an empty unquoted field.

    polars quotes empty strings (``""``), which PostgreSQL reads as '' and not NULL, so text
    survives exactly; floats are written in shortest round-trip form; timestamps in UTC with
    their offset; lists of strings as array literals. PostgreSQL text cannot hold a NUL, which
    an input file may (in a node id it quarantines, a header naming a node), so a NUL is
    written as the four characters ``\x00``.

    >>> copy_payload(pl.DataFrame({"node_id": ["a\x00b"]}))
    b'a\\x00b\n'
    """
    lists = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.List)]
    if lists:
        frame = frame.with_columns([_pg_array_literal(c) for c in lists])
    buf = io.BytesIO()
    frame.write_csv(buf, include_header=False, datetime_format=_DATETIME_FORMAT, null_value="")
    payload = buf.getvalue()
    return payload.replace(b"\x00", _NUL_STAND_IN) if b"\x00" in payload else payload


#: Binary COPY (:func:`copy_binary`) for frames of at least this many rows (below, CSV is as
#: cheap) and at most this many field parts a row (a text column or a column holding nulls is
#: two parts, another one): each part of each row is one element the client gathers, which
#: costs more than CSV for wide frames with nulls (kpi_15m), while PostgreSQL's parse of text
#: timestamps and floats is what binary saves (forecasts: ~0.2 s of server CPU per 100 000).
BINARY_MIN_ROWS = 1_000
BINARY_MAX_PARTS = 16
_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_PGCOPY_TRAILER = b"\xff\xff"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01, PostgreSQL's epoch
_PG_EPOCH_DAYS = 10_957
#: The NaN PostgreSQL's float8in returns for 'NaN' (CSV), so binary stores the same bits.
_NAN = np.frombuffer(b"\x7f\xf8" + bytes(6), ">f8")[0]


def _binary(sizes: np.ndarray, data: np.ndarray) -> pa.Array:
    """A binary array of ``len(sizes)`` elements: consecutive slices of ``data``."""
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))]
    return pa.Array.from_buffers(pa.large_binary(), len(sizes), buffers)


def _fixed_fields(values: np.ndarray, valid: np.ndarray | None) -> list[pa.Array]:
    """Binary COPY fields of a fixed-size type: length (-1: NULL), then the big-endian value."""
    n, k = len(values), values.dtype.itemsize
    if valid is None:
        rows = np.empty((n, 4 + k), np.uint8)
        rows[:, :4] = np.array([k], ">i4").view(np.uint8)
        rows[:, 4:] = values.view(np.uint8).reshape(n, k)
        return [_binary(np.full(n, 4 + k, np.int64), rows.reshape(-1))]
    lengths = np.where(valid, k, -1).astype(">i4")
    prefix = _binary(np.full(n, 4, np.int64), lengths.view(np.uint8))
    return [prefix, _binary(np.where(valid, k, 0).astype(np.int64), values[valid].view(np.uint8))]


def _text_fields(series: pl.Series) -> list[pa.Array]:
    """Binary COPY fields of text: length (-1: NULL), then the UTF-8 bytes."""
    if series.str.contains("\x00", literal=True).any():
        series = series.str.replace_all("\x00", _NUL_STAND_IN.decode(), literal=True)
    arr = series.to_arrow().cast(pa.large_binary())
    lengths = pc.binary_length(arr).fill_null(-1).to_numpy().astype(">i4")
    prefix = _binary(np.full(len(arr), 4, np.int64), lengths.view(np.uint8))
    return [prefix, arr.fill_null(b"") if arr.null_count else arr]


def _binary_parts(frame: pl.DataFrame, pg_types: dict[str, str]) -> list[pa.Array] | None:
    """Per column, the arrays of its fields' parts; ``None`` if a column has no binary form here.

    Only exact pairs of polars dtype and column type: the binary format has no casts (an
    int8 into an integer column is an error, not a conversion).
    """
    n = frame.height
    count = np.array([frame.width], ">i2").view(np.uint8)
    parts = [_binary(np.full(n, 2, np.int64), np.tile(count, n))]
    for name, dtype in frame.schema.items():
        s = frame.get_column(name)
        pg = pg_types.get(name)
        valid = s.is_not_null().to_numpy() if s.null_count() else None
        if dtype == pl.Float64 and pg == "double precision":
            v = s.fill_null(0.0).to_numpy()
            nan = np.isnan(v)
            parts += _fixed_fields(np.where(nan, _NAN, v).astype(">f8") if nan.any()
                                   else v.astype(">f8"), valid)
        elif dtype == pl.Int64 and pg == "bigint":
            parts += _fixed_fields(s.fill_null(0).to_numpy().astype(">i8"), valid)
        elif dtype == pl.Datetime("us", "UTC") and pg == "timestamp with time zone":
            us = s.dt.epoch("us").fill_null(_PG_EPOCH_US).to_numpy() - _PG_EPOCH_US
            parts += _fixed_fields(us.astype(">i8"), valid)
        elif dtype == pl.Date and pg == "date":
            days = s.dt.epoch("d").fill_null(_PG_EPOCH_DAYS).to_numpy() - _PG_EPOCH_DAYS
            parts += _fixed_fields(days.astype(">i4"), valid)
        elif dtype == pl.Boolean and pg == "boolean":
            parts += _fixed_fields(s.fill_null(False).cast(pl.UInt8).to_numpy(), valid)
        elif dtype == pl.String and pg == "text":
            parts += _text_fields(s)
        else:
            return None
    return parts


def binary_parts_count(frame: pl.DataFrame) -> int:
    """The field parts a row of ``frame`` has in :func:`copy_binary` (see ``BINARY_MAX_PARTS``)."""
    return 1 + sum(
        2 if dtype == pl.String or frame.get_column(name).null_count() else 1
        for name, dtype in frame.schema.items()
    )


def copy_binary(
    frame: pl.DataFrame, pg_types: dict[str, str], rows_per_chunk: int = COPY_CHUNK_ROWS
) -> Iterator[bytes] | None:
    r"""The frame as ``COPY ... (FORMAT binary)`` data in chunks, or ``None`` (use CSV).

    ``pg_types``: column name -> ``format_type`` of the target's column. ``None`` when the
    frame is small or wide (``BINARY_MIN_ROWS``, ``BINARY_MAX_PARTS``) or a column has no
    exact binary form here. Stores what :func:`copy_payload` stores: floats bit for bit (NaN
    as PostgreSQL's own), timestamps in microseconds, NUL in text as ``\x00``.
    """
    if frame.height < BINARY_MIN_ROWS or binary_parts_count(frame) > BINARY_MAX_PARTS:
        return None
    if any(pg_types.get(c) is None for c in frame.columns):
        return None
    chunks = [frame.slice(i, rows_per_chunk) for i in range(0, frame.height, rows_per_chunk)]
    first = _binary_parts(chunks[0], pg_types)
    if first is None:
        return None
    return _binary_chunks(first, chunks, pg_types)


def _binary_chunks(
    first: list[pa.Array], chunks: list[pl.DataFrame], pg_types: dict[str, str]
) -> Iterator[bytes]:
    yield _PGCOPY_HEADER
    for i, chunk in enumerate(chunks):
        parts = first if i == 0 else _binary_parts(chunk, pg_types)
        assert parts is not None  # same columns and dtypes as the first chunk
        yield _binary_rows(parts)
    yield _PGCOPY_TRAILER


def _binary_rows(parts: list[pa.Array]) -> bytes:
    """Every part's element of row 0, then of row 1, ...: the rows of a binary COPY."""
    n, q = len(parts[0]), len(parts)
    order = np.arange(n, dtype=np.int64)[:, None] + np.arange(q, dtype=np.int64)[None, :] * n
    out = pa.concat_arrays(parts).take(pa.array(order.ravel()))
    offsets = np.frombuffer(out.buffers()[1], np.int64, n * q + 1, out.offset * 8)
    return out.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]


def copy_chunks(frame: pl.DataFrame, rows_per_chunk: int = COPY_CHUNK_ROWS) -> Iterator[bytes]:
    """:func:`copy_payload` in slices of ``rows_per_chunk`` rows.

    The server parses one slice while the next is converted, and a frame of millions of rows
    never sits in memory twice as CSV.
    """
    for start in range(0, frame.height, rows_per_chunk):
        yield copy_payload(frame.slice(start, rows_per_chunk))


#: PostgreSQL type of a key column's values, to pass them as a typed array; a key with a
#: column of another dtype is never checked (its batches are always upserted).
_KEY_TYPES: dict[type[pl.DataType], str] = {
    pl.String: "text",
    pl.Datetime: "timestamptz",
    pl.Date: "date",
    pl.Int64: "bigint",
    pl.Int32: "integer",
    pl.Int16: "smallint",
}


#: Tables always upserted. ``kpi_15m``: its statement triggers (migration 0009) keep transition
#: tables, with which PostgreSQL's COPY inserts row by row (no faster than the upsert), and
#: they sum floats in the order they read kpi_15m rows, which a direct COPY changes (district
#: rollups equal to ~1e-15, not bit for bit).
UPSERT_ONLY = frozenset({"kpi_15m"})


def key_ranges(table: str, frame: pl.DataFrame) -> tuple[list[str], list[list[object]]] | None:
    """What :func:`overlap_sql` checks for ``frame``: (type of each argument, argument arrays).

    Per distinct value of the key's first column: that value, then the smallest and the largest
    value of the key's next columns up to the first text one (a text range would need the
    server's collation order). ``None`` (always upsert) for the tables of ``UPSERT_ONLY`` and
    if a key column has a type not in ``_KEY_TYPES``.

    >>> import datetime as d
    >>> f = pl.DataFrame({"node_id": ["b", "a", "b"], "ts": [d.date(2024, 1, 3),
    ...     d.date(2024, 1, 1), d.date(2024, 1, 2)]})
    >>> key_ranges("kpi_daily", f.rename({"ts": "day"}))[1]
    [['a', 'b'], [datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)], \
[datetime.date(2024, 1, 1), datetime.date(2024, 1, 3)]]
    """
    if table in UPSERT_ONLY:
        return None
    key = list(KEYS[table])
    types = []
    for name in key:
        dtype = frame.schema[name]
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
            return None  # naive: the server would read it in its session's time zone
        if dtype.base_type() not in _KEY_TYPES:
            return None
        types.append(_KEY_TYPES[dtype.base_type()])
    rest = 1
    while rest < len(key) and types[rest] != "text":
        rest += 1
    lead, ranged = key[0], key[1:rest]
    if not ranged:
        return [types[0]], [frame.get_column(lead).unique().sort().to_list()]
    # The smallest and largest tuple of ``ranged`` per lead value (row order, as ROW() compares).
    bounds = (
        frame.select(key[:rest])
        .sort(key[:rest])
        .group_by(lead, maintain_order=True)
        .agg([pl.col(c).first().alias(f"lo_{c}") for c in ranged]
             + [pl.col(c).last().alias(f"hi_{c}") for c in ranged])
    )
    args = [bounds.get_column(c).to_list() for c in bounds.columns]
    return [types[0]] + types[1:rest] * 2, args


def overlap_sql(table: str, types: list[str]) -> sql.Composed:
    """Whether ``water.<table>`` holds a row in a range of :func:`key_ranges` (its arguments).

    One index probe per value of the key's first column. True may be a false alarm (a range
    holding other keys than the batch's): the batch is then upserted, as it always was.
    """
    key = list(KEYS[table])
    target = sql.Identifier(SCHEMA, table)
    lead = sql.Identifier(key[0])
    if len(types) == 1:
        return sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} = ANY(%s::{}[]))").format(
            target, lead, sql.SQL(types[0])
        )
    n = (len(types) - 1) // 2
    ranged = [sql.Identifier(c) for c in key[1 : 1 + n]]
    lo = [sql.Identifier(f"lo{i}") for i in range(n)]
    hi = [sql.Identifier(f"hi{i}") for i in range(n)]
    names = [sql.Identifier("k")] + lo + hi
    arrays = sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in types)
    cols = sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in ranged)

    def row(parts: list[sql.Identifier]) -> sql.Composable:
        return sql.SQL("ROW({})").format(sql.SQL(", ").join(sql.SQL("b.") + p for p in parts))

    return sql.SQL(
        "SELECT EXISTS (SELECT 1 FROM unnest({arrays}) AS b({names}) WHERE EXISTS ("
        "SELECT 1 FROM {target} AS t WHERE t.{lead} = b.k"
        " AND ROW({cols}) >= {lo} AND ROW({cols}) <= {hi}))"
    ).format(
        arrays=arrays,
        names=sql.SQL(", ").join(names),
        target=target,
        lead=lead,
        cols=cols,
        lo=row(lo),
        hi=row(hi),
    )


def batch_months(table: str, frame: pl.DataFrame) -> list[datetime]:
    """The UTC months (their first instant) that rows of ``frame`` fall in; ``[]`` if unpartitioned.

    ``kpi_daily.day`` is a local calendar day stored as a date; its month is the date's month,
    which is how the date-keyed partitions are bounded too.
    """
    col = PARTITIONED.get(table)
    if col is None or frame.height == 0:
        return []
    months = frame.get_column(col).drop_nulls().dt.truncate("1mo").unique().sort()
    out = []
    for m in months.to_list():
        if isinstance(m, datetime):
            out.append(m.astimezone(UTC))
        else:
            assert isinstance(m, date)
            out.append(datetime(m.year, m.month, 1, tzinfo=UTC))
    return out


def upsert_sql(table: str, columns: Iterable[str], staging: str) -> sql.Composed:
    """``INSERT ... SELECT ... FROM staging ON CONFLICT (key) DO UPDATE`` for ``table``.

    Unchanged rows are not rewritten (the ``WHERE ... IS DISTINCT FROM``), so replaying a file
    costs reads, not dead tuples and WAL. ``nodes`` keeps known values a source leaves empty.
    """
    cols = list(columns)
    key = list(KEYS[table])
    rest = [c for c in cols if c not in key]
    target = sql.Identifier(SCHEMA, table)
    t = sql.Identifier("t")
    keep = KEEP_KNOWN.get(table, ())

    def new_value(c: str) -> sql.Composable:
        excluded = sql.SQL("EXCLUDED.{}").format(sql.Identifier(c))
        if c in keep:
            return sql.SQL("COALESCE({}, {}.{})").format(excluded, t, sql.Identifier(c))
        return excluded

    col_list = sql.SQL(", ").join(map(sql.Identifier, cols))
    query = sql.SQL("INSERT INTO {target} AS t ({cols}) SELECT {cols} FROM {staging} ").format(
        target=target, cols=col_list, staging=sql.Identifier(staging)
    )
    conflict = sql.SQL("ON CONFLICT ({}) ").format(sql.SQL(", ").join(map(sql.Identifier, key)))
    if not rest:
        return query + conflict + sql.SQL("DO NOTHING")
    sets = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(c), new_value(c)) for c in rest
    )
    old = sql.SQL(", ").join(sql.SQL("{}.{}").format(t, sql.Identifier(c)) for c in rest)
    new = sql.SQL(", ").join(new_value(c) for c in rest)
    # ROW(...) so that a single-column comparison is still a row comparison.
    changed = sql.SQL("WHERE ROW({}) IS DISTINCT FROM ROW({})").format(old, new)
    return query + conflict + sql.SQL("DO UPDATE SET ") + sets + sql.SQL(" ") + changed


def _copy(
    cur: psycopg.Cursor, target: sql.Identifier, frame: pl.DataFrame, pg_types: dict[str, str]
) -> None:
    """COPY the frame's rows into ``target``: binary if :func:`copy_binary` can, else CSV."""
    cols = sql.SQL(", ").join(map(sql.Identifier, frame.columns))
    binary = copy_binary(frame, pg_types)
    fmt = sql.SQL("csv" if binary is None else "binary")
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(target, cols, fmt)
    with cur.copy(copy) as cp:
        for chunk in copy_chunks(frame) if binary is None else binary:
            cp.write(chunk)


def _upsert(
    cur: psycopg.Cursor, table: str, staging: str, frame: pl.DataFrame, pg_types: dict[str, str]
) -> None:
    """COPY the frame into the (empty) staging table and upsert it into ``water.<table>``."""
    _copy(cur, sql.Identifier(staging), frame, pg_types)
    cur.execute(upsert_sql(table, frame.columns, staging))


# --------------------------------------------------------------------------------------------
# The writer


@dataclass
class WarmPostgresWriter:
    """Upserts ``TableRows`` into the ``water`` schema; one connection, one transaction per batch.

    The schema must exist (:func:`migrate`, which ``tiers.open_writers`` calls first): ``write``
    never runs DDL on the tables of the contract, only creates its session-local staging tables.
    """

    conninfo: str
    name: str = "warm"
    attempts: int = ATTEMPTS
    backoff_s: float = BACKOFF_S
    #: ``False`` sets ``synchronous_commit = off`` for this session. Not the default, on purpose:
    #: a PostgreSQL crash may then forget the last ~0.6 s (3 x wal_writer_delay) of commits this
    #: writer already reported as done, and Bytewax may have snapshotted past them, so a live
    #: Kafka run would lose them for good; a CSV replay can simply be run again. The speed-up
    #: is measured in bench/warm_write.py (small for large batches: one fsync per batch).
    synchronous_commit: bool = True
    #: The tables this writer takes (a lane of the warm tier, ``tiers.open_writers``); a sink
    #: hands it no other. ``None``: every table.
    tables: frozenset[str] | None = None
    _conn: psycopg.Connection | None = field(default=None, init=False, repr=False)
    _staged: set[str] = field(default_factory=set, init=False, repr=False)
    #: (table, month) pairs whose partition is known to exist on this connection.
    _ensured: set[tuple[str, datetime]] = field(default_factory=set, init=False, repr=False)
    #: Per table, its columns' types (``format_type``), read once per connection.
    _pg_types: dict[str, dict[str, str]] = field(default_factory=dict, init=False, repr=False)

    def connect(self) -> None:
        """Connect now, so a wrong URL fails when the flow starts, not at its first batch."""
        try:
            self._connect()
        except psycopg.Error as exc:
            raise RuntimeError(f"warm tier: cannot connect to PostgreSQL: {exc}") from exc

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            options = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
            if not self.synchronous_commit:
                options += " -c synchronous_commit=off"
            self._conn = psycopg.connect(
                self.conninfo,
                connect_timeout=CONNECT_TIMEOUT_S,
                options=options,
                application_name="waterflow-warm",
            )
            self._staged = set()
            self._ensured = set()
            self._pg_types = {}
        return self._conn

    def _ensure_partitions(self, conn: psycopg.Connection, table: str, frame: pl.DataFrame) -> None:
        """Create the batch's missing month partitions (their own transaction), once each."""
        missing = [m for m in batch_months(table, frame) if (table, m) not in self._ensured]
        if not missing:
            return
        query = sql.SQL(
            "SELECT p FROM unnest(%s::timestamptz[]) AS m,"
            " LATERAL {}.ensure_partitions(%s::regclass, m, m) AS p"
        ).format(sql.Identifier(SCHEMA))
        with conn.transaction():
            created = conn.execute(query, (missing, f"{SCHEMA}.{table}")).fetchall()
        if created:
            log.info("warm tier: created partitions %s", ", ".join(r[0] for r in created),
                     extra=LOG_CONTEXT)
        self._ensured.update((table, m) for m in missing)

    def _column_types(self, conn: psycopg.Connection, table: str) -> dict[str, str]:
        """``water.<table>``'s column types (staging tables have the same), once per connection."""
        if table not in self._pg_types:
            with conn.transaction():
                rows = conn.execute(
                    "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                    " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                    (f"{SCHEMA}.{table}",),
                ).fetchall()
            self._pg_types[table] = dict(rows)
        return self._pg_types[table]

    def _staging(self, conn: psycopg.Connection, table: str) -> str:
        """A temporary table shaped like ``water.<table>``, created once per connection.

        ``ON COMMIT DELETE ROWS`` empties it at every commit, so batches never see each other's
        rows, without creating and dropping a table (catalog churn) per batch.
        """
        name = f"_stage_{table}"
        if name not in self._staged:
            conn.execute(
                sql.SQL(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS"
                ).format(sql.Identifier(name), sql.Identifier(SCHEMA, table))
            )
            conn.commit()
            self._staged.add(name)
        return name

    def write(self, rows: TableRows) -> None:
        """Upsert ``rows`` in one transaction; retry on connection failures, then raise."""
        if rows.table not in SCHEMAS:
            raise ValueError(f"warm tier: unknown table {rows.table!r}")
        frame = dedupe_on_key(rows.table, rows.frame)
        if frame.height == 0:
            return
        last: Exception | None = None
        table_forgotten = False
        for attempt in range(1, self.attempts + 1):
            try:
                self._write_once(rows.table, frame)
                return
            except psycopg.errors.CheckViolation as exc:
                # "no partition of relation ... found for row": a partition this connection had
                # ensured was dropped since (retention), so forget what it knows and retry.
                self._rollback()
                if table_forgotten or rows.table not in PARTITIONED:
                    raise RuntimeError(
                        f"warm tier: writing {frame.height} rows to water.{rows.table} failed: "
                        f"{exc}"
                    ) from exc
                table_forgotten = True
                last = exc
                self._ensured = {k for k in self._ensured if k[0] != rows.table}
            except psycopg.OperationalError as exc:
                # Connection lost or server restarting: a new connection may succeed. The failed
                # transaction was rolled back by the server, so retrying cannot write twice.
                last = exc
                self._discard()
                if attempt < self.attempts:
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.warning(
                        "warm tier: %s rows for water.%s failed (try %d/%d), retry in %.1fs: %s",
                        frame.height,
                        rows.table,
                        attempt,
                        self.attempts,
                        delay,
                        exc, extra=LOG_CONTEXT,
                    )
                    time.sleep(delay)
            except psycopg.Error as exc:
                # Bad data or schema mismatch: retrying would fail the same way.
                self._rollback()
                raise RuntimeError(
                    f"warm tier: writing {frame.height} rows to water.{rows.table} failed: {exc}"
                ) from exc
        raise RuntimeError(
            f"warm tier: writing {frame.height} rows to water.{rows.table} failed after "
            f"{self.attempts} attempts: {last}"
        ) from last

    def _write_once(self, table: str, frame: pl.DataFrame) -> None:
        conn = self._connect()
        self._ensure_partitions(conn, table, frame)
        staging = self._staging(conn, table)
        types = self._column_types(conn, table)
        ranges = key_ranges(table, frame)
        direct = False
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    if ranges is not None:
                        found = cur.execute(overlap_sql(table, ranges[0]), ranges[1]).fetchone()
                        direct = found is not None and not found[0]
                    if direct:
                        _copy(cur, sql.Identifier(SCHEMA, table), frame, types)
                    else:
                        _upsert(cur, table, staging, frame, types)
        except psycopg.errors.UniqueViolation:
            if not direct:
                raise
            # A key of the batch was stored since the check (a concurrent writer): the direct
            # COPY's transaction was rolled back; upsert the batch in a new one.
            with conn.transaction():
                with conn.cursor() as cur:
                    _upsert(cur, table, staging, frame, types)

    def _rollback(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self._discard()

    def _discard(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        """Close the connection (nothing is pending: every write committed before returning)."""
        self._discard()
