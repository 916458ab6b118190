"""Warm tier retention: drop whole monthly partitions past each table's retention, create ahead.

``waterflow db retention`` runs :func:`apply_retention` (typically daily, from cron or a
Kubernetes CronJob) as the role that owns the schema (the one that ran the migrations).

Rules:
- A partition is dropped only when its upper bound (exclusive) is at or before the table's
  cutoff, so every row it holds is older than the cutoff: retention never removes a row newer
  than the cutoff, and keeps up to one extra month of the oldest data instead.
- Dropping is ``ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY`` then ``DROP TABLE``: the
  parent only takes a SHARE UPDATE EXCLUSIVE lock, so Grafana's queries and the writers keep
  going (``DROP TABLE`` of an attached partition would lock the parent exclusively). A detach
  that was interrupted (left pending) is finished with ``FINALIZE`` on the next run.
- Partitions for the current month and ``ahead_months`` after it are created by the same
  migration-defined ``water.ensure_partitions`` the writer uses, so a live flow crossing into a
  new month never waits on DDL.
- ``quarantine`` is not partitioned (see migration 0003 for why); rows received before its
  cutoff are deleted instead.
- ``forecasts`` (not partitioned) keep every issue as long as the aggregates they are compared
  with (``aggregates_months``); older issues are deleted whole. Without this the table grew
  for ever: 500 series issue 168 hourly values of two models a day, 61 M rows a year. The
  issues are found through 0008's index of first-hour rows (every issue the pipeline writes
  has one), then deleted by primary-key prefix: a daily run reads only the day's issues (48 ms
  for a day of 100 series in a table of 12 M rows); the first run over many months of old
  issues may scan the table once.

Every SQL statement is composed with ``psycopg.sql``; bounds are read from the catalog
(``pg_inherits``, ``pg_get_expr(relpartbound)``), not guessed from partition names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql

from connectors.warm_postgres import CONNECT_TIMEOUT_S, PARTITIONED, SCHEMA, _applied

#: The migration that creates the partitioned tables and ``water.ensure_partitions``.
NEEDS_MIGRATION = "0003_partitions"
#: Waiting longer than this for a lock fails the step instead of queueing Grafana behind it.
LOCK_TIMEOUT_MS = 10_000
_BOUND = re.compile(r"^FOR VALUES FROM \('([^']*)'\) TO \('([^']*)'\)$")


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each table keeps its rows, and how many months to create ahead."""

    readings_weeks: int = 8
    aggregates_months: int = 13
    quarantine_months: int = 13
    ahead_months: int = 2

    def __post_init__(self) -> None:
        for name in ("readings_weeks", "aggregates_months", "quarantine_months"):
            if getattr(self, name) < 1:
                raise ValueError(f"retention: {name} must be at least 1, got {getattr(self, name)}")
        if self.ahead_months < 0:
            raise ValueError(f"retention: ahead_months must be >= 0, got {self.ahead_months}")

    def cutoffs(self, now: datetime) -> dict[str, datetime]:
        """Per table, the instant before which rows may go."""
        aggregates = add_months(now, -self.aggregates_months)
        return {
            "readings": now - timedelta(weeks=self.readings_weeks),
            "kpi_15m": aggregates,
            "kpi_daily": aggregates,
            "quarantine": add_months(now, -self.quarantine_months),
            "forecasts": aggregates,
        }


@dataclass(frozen=True)
class Partition:
    """One partition of a partitioned table, with its bounds as the catalog states them."""

    name: str
    lower: datetime | None  # None: DEFAULT or MINVALUE/MAXVALUE bounds (never dropped)
    upper: datetime | None
    detach_pending: bool = False


@dataclass(frozen=True)
class Action:
    """What retention did (or, on a dry run, would do) to one table."""

    table: str
    kind: str  # 'drop' | 'create' | 'delete'
    partition: str | None
    lower: datetime | None
    upper: datetime | None
    rows: int | None

    def describe(self, dry_run: bool) -> str:
        """One line for the terminal."""
        verb = {"drop": "dropped", "create": "created", "delete": "deleted"}[self.kind]
        if dry_run:
            verb = "would " + self.kind
        where = f"{SCHEMA}.{self.table}"
        if self.kind == "delete":
            by = _DELETED_BY[self.table]
            return f"{where}: {verb} {self.rows} row(s) {by} before {_fmt(self.upper)}"
        span = f"[{_fmt(self.lower)}, {_fmt(self.upper)})"
        rows = "" if self.rows is None else f", {self.rows} row(s)"
        return f"{where}: {verb} partition {self.partition} {span}{rows}"


#: What a deleted row is older than, per table, as the terminal line says it.
_DELETED_BY = {"quarantine": "received", "forecasts": "issued"}


def _fmt(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00")


def add_months(t: datetime, months: int) -> datetime:
    """``t`` moved by whole calendar months, the day clamped to the target month's length.

    >>> add_months(datetime(2024, 3, 31, tzinfo=UTC), -1).date()
    datetime.date(2024, 2, 29)
    """
    index = t.year * 12 + (t.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    following = date(year + (month == 12), month % 12 + 1, 1)
    last_day = (following - timedelta(days=1)).day
    return t.replace(year=year, month=month, day=min(t.day, last_day))


def parse_bound(text: str) -> tuple[datetime | None, datetime | None]:
    """Lower and upper bound of ``pg_get_expr(relpartbound)`` for a one-column range partition.

    Dates (``kpi_daily``) count as 00:00 UTC. ``DEFAULT`` and ``MINVALUE``/``MAXVALUE`` bounds
    give ``(None, None)``: such a partition is never dropped.

    >>> parse_bound("FOR VALUES FROM ('2021-01-01 00:00:00+00') TO ('2021-02-01 00:00:00+00')")[1]
    datetime.datetime(2021, 2, 1, 0, 0, tzinfo=datetime.timezone.utc)
    >>> parse_bound("DEFAULT")
    (None, None)
    """
    match = _BOUND.match(text.strip())
    if match is None:
        return None, None

    def as_utc(s: str) -> datetime:
        t = datetime.fromisoformat(s)
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)

    return as_utc(match.group(1)), as_utc(match.group(2))


def list_partitions(conn: psycopg.Connection, table: str) -> list[Partition]:
    """The partitions of ``water.<table>`` in bound order (unbounded ones last)."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending"
        " FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass",
        (f"{SCHEMA}.{table}",),
    ).fetchall()
    parts = [Partition(name, *parse_bound(bound), pending) for name, bound, pending in rows]
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(parts, key=lambda p: (p.lower or far, p.name))


def plan_drops(partitions: list[Partition], cutoff: datetime) -> list[Partition]:
    """The partitions entirely before ``cutoff``: upper bound (exclusive) <= cutoff."""
    return [p for p in partitions if p.upper is not None and p.upper <= cutoff]


def apply_retention(
    conninfo: str, policy: RetentionPolicy, now: datetime | None = None, dry_run: bool = False
) -> list[Action]:
    """Drop expired partitions, delete expired quarantine rows and forecasts, create ahead.

    With ``dry_run`` nothing is changed and no lock beyond a plain read is taken; the actions
    returned are those a real run at the same ``now`` would take.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    cutoffs = policy.cutoffs(now)
    actions: list[Action] = []
    # autocommit: DETACH ... CONCURRENTLY cannot run inside a transaction block. TimeZone UTC so
    # that the bounds pg_get_expr prints carry +00.
    options = f"-c TimeZone=UTC -c lock_timeout={LOCK_TIMEOUT_MS}"
    with psycopg.connect(
        conninfo, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True, options=options
    ) as conn:
        if NEEDS_MIGRATION not in _applied(conn):
            raise RuntimeError(
                f"retention: migration {NEEDS_MIGRATION} is not applied to this database "
                "(run `waterflow db migrate` first)"
            )
        for table in PARTITIONED:
            for part in plan_drops(list_partitions(conn, table), cutoffs[table]):
                rows = _count(conn, sql.Identifier(SCHEMA, part.name))
                if not dry_run:
                    _drop_partition(conn, table, part)
                actions.append(Action(table, "drop", part.name, part.lower, part.upper, rows))
        actions.append(_trim_quarantine(conn, cutoffs["quarantine"], dry_run))
        actions.append(_trim_forecasts(conn, cutoffs["forecasts"], dry_run))
        if not dry_run:
            _refresh_forecast_choice(conn)
            _trim_kpi_rollup(conn)
        until = add_months(now, policy.ahead_months)
        for table in PARTITIONED:
            actions.extend(_create_ahead(conn, table, now, until, dry_run))
    return actions


def _count(conn: psycopg.Connection, relation: sql.Composable) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(relation)).fetchone()
    return int(row[0]) if row else 0


def _drop_partition(conn: psycopg.Connection, table: str, part: Partition) -> None:
    parent = sql.Identifier(SCHEMA, table)
    child = sql.Identifier(SCHEMA, part.name)
    how = sql.SQL("FINALIZE" if part.detach_pending else "CONCURRENTLY")
    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} {}").format(parent, child, how))
    conn.execute(sql.SQL("DROP TABLE {}").format(child))


def _trim_quarantine(conn: psycopg.Connection, cutoff: datetime, dry_run: bool) -> Action:
    older = sql.SQL("t.received_at < %s")
    rows = _delete_where(conn, "quarantine", older, cutoff, dry_run)
    return Action("quarantine", "delete", None, None, cutoff, rows)


def _trim_forecasts(conn: psycopg.Connection, cutoff: datetime, dry_run: bool) -> Action:
    """Delete (or count) the forecast issues before ``cutoff``, every row of each."""
    # The issues through 0008's partial index of first-hour rows, then their rows through the
    # primary key (node_id, issued_at, ...): a semi-join of index probes, no table scan.
    older = sql.SQL(
        "(t.node_id, t.issued_at) IN (SELECT node_id, issued_at FROM {}"
        " WHERE target_ts = issued_at AND issued_at < %s)"
    ).format(sql.Identifier(SCHEMA, "forecasts"))
    rows = _delete_where(conn, "forecasts", older, cutoff, dry_run)
    return Action("forecasts", "delete", None, None, cutoff, rows)


def _delete_where(
    conn: psycopg.Connection, table: str, where: sql.Composable, cutoff: datetime, dry_run: bool
) -> int:
    """Delete the rows of ``table`` (as ``t``) meeting ``where``; count them on a dry run."""
    verb = sql.SQL("SELECT count(*) FROM" if dry_run else "DELETE FROM")
    query = sql.SQL("{} {} AS t WHERE {}").format(verb, sql.Identifier(SCHEMA, table), where)
    cur = conn.execute(query, (cutoff,))
    if not dry_run:
        return cur.rowcount
    row = cur.fetchone()
    return int(row[0]) if row else 0


def _refresh_forecast_choice(conn: psycopg.Connection) -> None:
    """Keep the forecast choices forecast_selected reads (migration 0008) up to date.

    The refresh is concurrent: Grafana keeps reading.
    """
    _call_if_migrated(conn, "refresh_forecast_choice")


def _trim_kpi_rollup(conn: psycopg.Connection) -> None:
    """Delete the district rollups of kpi_15m (migration 0009) before its oldest partition.

    Dropping a partition fires no trigger, so the rollups of the months just dropped are
    deleted here.
    """
    _call_if_migrated(conn, "trim_kpi_rollup")


def _call_if_migrated(conn: psycopg.Connection, function: str) -> None:
    """Call ``water.<function>()``; a no-op on a database whose migrations lack it."""
    name = f"{SCHEMA}.{function}()"
    row = conn.execute("SELECT to_regprocedure(%s)", (name,)).fetchone()
    if row is not None and row[0] is not None:
        conn.execute(sql.SQL("SELECT {}()").format(sql.Identifier(SCHEMA, function)))


def _create_ahead(
    conn: psycopg.Connection, table: str, now: datetime, until: datetime, dry_run: bool
) -> list[Action]:
    regclass = f"{SCHEMA}.{table}"
    months = conn.execute(
        sql.SQL(
            "SELECT partition_name, lower_bound, upper_bound"
            " FROM {}.month_partitions(%s::regclass, %s, %s)"
            " WHERE to_regclass(quote_ident(%s) || '.' || quote_ident(partition_name)) IS NULL"
        ).format(sql.Identifier(SCHEMA)),
        (regclass, now, until, SCHEMA),
    ).fetchall()
    if not months:
        return []
    if not dry_run:
        created = {
            r[0]
            for r in conn.execute(
                sql.SQL("SELECT {}.ensure_partitions(%s::regclass, %s, %s)").format(
                    sql.Identifier(SCHEMA)
                ),
                (regclass, now, until),
            )
        }
        months = [m for m in months if m[0] in created]
    return [Action(table, "create", name, lo, hi, None) for name, lo, hi in months]
