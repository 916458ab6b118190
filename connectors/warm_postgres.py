"""Warm tier: the PostgreSQL tables Grafana reads (schema ``water``).

Unit of parallelism: one writer (one connection) per Bytewax worker; any number of workers may
write the same tables at once, because every batch is an upsert on the table's natural key.

Delivery guarantee: each ``TableRows`` is written in one transaction (all rows or none). Bytewax
recovery replays output written after its last snapshot (at-least-once); since rows are upserted
on their natural key (``tables.KEYS``), a replayed batch rewrites the same rows: exactly-once in
effect.

How a batch is written: the frame is deduplicated on its key (last row wins, so ``ON CONFLICT``
never meets the same key twice in one statement) and converted to CSV by polars (vectorized, no
per-row Python). Then, in the batch's transaction, one query asks whether the table may hold a
key of the batch already (:func:`overlap_sql`: per value of the key's first column, any row in
the batch's range of the rest of the key). If not (a replay into new time ranges, most live
batches of readings), the CSV is COPYed straight into the table: no staging table, no
``INSERT ... SELECT``, and PostgreSQL inserts rows in bulk (about half the server time of the
upsert). Otherwise it is COPYed into a temporary staging table and moved with one
``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE``. The check never decides what is stored:
a key it misses (a concurrent writer's commit since the check) fails the direct COPY on the
primary key, which rolls the transaction back, and the batch is upserted in a new one; a
direct COPY stores what the upsert would store when no key exists. SQL is composed with
``psycopg.sql``.

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

import polars as pl
import psycopg
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


def _copy(cur: psycopg.Cursor, target: sql.Identifier, frame: pl.DataFrame) -> None:
    """COPY the frame's rows (CSV, :func:`copy_chunks`) into ``target``."""
    cols = sql.SQL(", ").join(map(sql.Identifier, frame.columns))
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(target, cols)
    with cur.copy(copy) as cp:
        for chunk in copy_chunks(frame):
            cp.write(chunk)


def _upsert(cur: psycopg.Cursor, table: str, staging: str, frame: pl.DataFrame) -> None:
    """COPY the frame into the (empty) staging table and upsert it into ``water.<table>``."""
    _copy(cur, sql.Identifier(staging), frame)
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
        ranges = key_ranges(table, frame)
        direct = False
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    if ranges is not None:
                        found = cur.execute(overlap_sql(table, ranges[0]), ranges[1]).fetchone()
                        direct = found is not None and not found[0]
                    if direct:
                        _copy(cur, sql.Identifier(SCHEMA, table), frame)
                    else:
                        _upsert(cur, table, staging, frame)
        except psycopg.errors.UniqueViolation:
            if not direct:
                raise
            # A key of the batch was stored since the check (a concurrent writer): the direct
            # COPY's transaction was rolled back; upsert the batch in a new one.
            with conn.transaction():
                with conn.cursor() as cur:
                    _upsert(cur, table, staging, frame)

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
