"""Grafana panel queries at a year of 15-minute data for 500 nodes (issue 9, bench/README.md).

Creates a fresh database ``bench_grafana_<random>`` (dropped at the end unless ``--keep``),
applies the project's migrations (``connectors.warm_postgres.migrate``) and generates the rows
directly with ``INSERT ... SELECT ... generate_series`` (no dataflow involved):

- ``nodes``: ``--nodes`` nodes in districts of 10 (1 inflow, 1 quality, 8 consumption meters);
- ``kpi_15m``: every 15-minute window of ``--days`` days for every node (500 x 365 = 17.5 M);
- ``kpi_daily``: one row per node and day; ``district_balance``: 'hour' and 'day' rows;
- ``readings``: 5-minute readings of the last ``--readings-days`` days (default 56: the
  retention's 8 weeks, so no deployment holds more; the panels reading it see at most that);
- ``anomalies`` (``--anomalies``), ``quarantine``, ``ingest_runs``;
- ``forecasts``: daily issues of the last ``--forecast-days`` days x 168 hours x 2 models x
  (flow nodes + districts), and ``forecast_accuracy`` for the same days.

Then ``VACUUM ANALYZE`` and every SQL panel query of every board, with Grafana's variables and
macros substituted by ``grafana.queries.interpolate_sql`` (as the tests do), as the role
``water_reader`` (Grafana's), for the board's default range (7 days), 30 days and 1 year, with
the multi-valued variables set to All and to one value; each query ``--repeat`` times. p50/p95
per panel go to a markdown table (printed, and written to ``--out``), the raw figures to a JSON
file beside it, and ``EXPLAIN (ANALYZE, BUFFERS)`` of the slowest queries to ``--explain``.

    .venv/bin/python bench/grafana_queries.py --keep             # generate, measure, keep the db
    .venv/bin/python bench/grafana_queries.py --db bench_grafana_xxxx --label after \\
        --baseline bench/results/grafana_queries_before.json      # measure again, compare
    .venv/bin/python bench/grafana_queries.py --db bench_grafana_xxxx --drop   # drop it

``--compare-with REV`` also runs REV's query of every panel whose query changed since, once, and
says whether it returned the same rows; with ``--compare-function 0009_kpi_district_rollup`` it
runs them on ``water.kpi_by_district`` as that migration defined it (created as
``bench_old.kpi_by_district``), for boards written for an older version of the function.

Reusing a database (``--db``) applies the migrations added since (``migrate`` is idempotent),
so a new index migration is measured on the same rows. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.warm_postgres import migrate  # noqa: E402
from grafana.queries import (  # noqa: E402
    Target,
    interpolate_sql,
    load_boards,
    panel_interval,
    reader_role,
    resolve_variables,
    targets,
    url_with,
)

ADMIN_URL = os.environ.get("WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: The end of the generated year: "now" for every board.
END = datetime(2026, 1, 1, tzinfo=UTC)
RANGES = {"7d": timedelta(days=7), "30d": timedelta(days=30), "1y": timedelta(days=365)}
TARGET_MS = 100.0
RESULTS = REPO / "bench" / "results"


# --------------------------------------------------------------------------------------------
# Data


def _step(conn: psycopg.Connection, what: str, query: str, params: dict[str, Any]) -> float:
    started = time.perf_counter()
    cur = conn.execute(query, params)  # type: ignore[arg-type]
    took = time.perf_counter() - started
    print(f"  {what}: {cur.rowcount if cur.rowcount >= 0 else '-'} rows in {took:.1f} s",
          flush=True)
    return took


def _months(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    out = []
    m = start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while m < end:
        nxt = (m.replace(day=28) + timedelta(days=4)).replace(day=1)
        out.append((max(m, start), min(nxt, end)))
        m = nxt
    return out


NODES_SQL = """
INSERT INTO water.nodes (node_id, name, district, role, lat, lon, source)
SELECT format('N%%s', lpad(i::text, 4, '0')), format('Node %%s', i),
       format('D%%s', lpad(((i - 1) / 10 + 1)::text, 2, '0')),
       CASE (i - 1) %% 10 WHEN 0 THEN 'inflow' WHEN 5 THEN 'quality' ELSE 'consumption' END,
       45.0 + ((i - 1) / 10) * 0.01 + random() * 0.005, 9.0 + ((i - 1) %% 10) * 0.01,
       'bench'
FROM generate_series(1, %(nodes)s) AS i
"""

# Per-node constants the generators share (bench schema, not the project's).
ATTR_SQL = """
CREATE TABLE bench.node_attr AS
SELECT node_id, district, role,
       CASE role WHEN 'inflow' THEN 20.0 + random() * 10 WHEN 'quality' THEN NULL
                 ELSE 0.5 + random() * 2 END AS base,
       role = 'quality' OR role = 'inflow' AS has_quality
FROM water.nodes
"""

# A daily profile (night minimum, morning and evening peaks) times a per-node base, noisy.
#: A node's flow at 15-minute or 5-minute time t: morning and evening peaks, 10 % noise (NULL
#: for nodes without flow).
FLOW = """CASE WHEN a.base IS NULL THEN NULL ELSE a.base * (0.4
        + 0.8 * exp(-((extract(hour FROM t) - 7.5) ^ 2) / 4)
        + 0.6 * exp(-((extract(hour FROM t) - 19.5) ^ 2) / 6)) * (0.9 + random() * 0.2) END"""

KPI_15M_SQL = """
INSERT INTO water.kpi_15m (node_id, window_start, n, completeness,
    flow_rate_avg, flow_rate_min, flow_rate_max, flow_rate_std,
    pressure_avg, pressure_min, pressure_max, pressure_std,
    temperature_avg, temperature_min, temperature_max, temperature_std,
    total_flow_avg, total_flow_min, total_flow_max, total_flow_std,
    chlorine_avg, chlorine_min, chlorine_max, chlorine_std,
    ph_avg, ph_min, ph_max, ph_std,
    turbidity_avg, turbidity_min, turbidity_max, turbidity_std,
    conductivity_avg, conductivity_min, conductivity_max, conductivity_std,
    volume_m3, quality_avg, score_max)
SELECT a.node_id, t, c.n, c.n / 3.0,
       f, f * 0.9, f * 1.1, f * 0.05,
       p, p - 0.1, p + 0.1, 0.03,
       12 + random() * 2, 11.5, 14.5, 0.2,
       f * 900, f * 890, f * 910, 1.0,
       q * (0.5 + random() * 0.3), q * 0.45, q * 0.85, q * 0.02,
       q * (7.2 + random() * 0.3), q * 7.1, q * 7.6, q * 0.05,
       q * (0.2 + random() * 0.3), q * 0.15, q * 0.6, q * 0.03,
       q * (450 + random() * 50), q * 440, q * 510, q * 5,
       f * 0.9, 0.95 + random() * 0.05, random() * 3
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz - interval '15 minutes',
                     interval '15 minutes') AS t
CROSS JOIN bench.node_attr AS a
CROSS JOIN LATERAL (SELECT
    {FLOW} AS f,
    3.5 + random() * 0.5 AS p,
    CASE WHEN a.has_quality THEN 1.0 END AS q,
    CASE WHEN random() < 0.02 THEN 1 + floor(random() * 2)::int ELSE 3 END AS n
) AS c
""".replace("{FLOW}", FLOW)

KPI_DAILY_SQL = """
INSERT INTO water.kpi_daily (node_id, day, n, completeness, volume_m3, mnf, pressure_compliance,
    flow_rate_avg, flow_rate_min, flow_rate_max, pressure_avg, pressure_min, pressure_max,
    water_quality_compliance)
SELECT a.node_id, d::date, 288 - c.miss, (288 - c.miss) / 288.0,
       a.base * 0.75 * 86.4 * (0.9 + random() * 0.2), a.base * 0.4 * (0.95 + random() * 0.1),
       0.97 + random() * 0.03, a.base * 0.75, a.base * 0.35, a.base * 1.5,
       3.7, 3.4, 4.0, CASE WHEN a.has_quality THEN 0.98 + random() * 0.02 END
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz - interval '1 day',
                     interval '1 day') AS d
CROSS JOIN bench.node_attr AS a
CROSS JOIN LATERAL (SELECT CASE WHEN random() < 0.05 THEN floor(random() * 40)::int
                                ELSE 0 END AS miss) AS c
"""

BALANCE_SQL = """
INSERT INTO water.district_balance (district, period, period_start, inflow_m3, consumption_m3,
    loss_m3, nrw, outflow_m3, system_input_m3, filled_share, estimated, mnf_lps,
    mnf_baseline_lps, mnf_trend_lps_per_day, leak_lps, peak_hour, peak_lps, pressure_m, ili)
SELECT d.district, %(period)s, t, c.si, c.si * 0.8, c.si * 0.2, 0.2, 0, c.si, c.fs, c.fs > 0.5,
       CASE WHEN %(period)s = 'day' THEN 8 + random() END,
       CASE WHEN %(period)s = 'day' THEN 8.5 END,
       CASE WHEN %(period)s = 'day' THEN random() * 0.02 - 0.01 END,
       CASE WHEN %(period)s = 'day' AND random() < 0.05 THEN random() * 3 END,
       CASE WHEN %(period)s = 'day' THEN 7 + floor(random() * 2)::int END,
       CASE WHEN %(period)s = 'day' THEN 40 + random() * 5 END,
       CASE WHEN %(period)s = 'day' THEN 37 + random() * 3 END,
       CASE WHEN %(period)s = 'day' THEN 1.5 + random() END
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz - %(step)s::interval,
                     %(step)s::interval) AS t
CROSS JOIN (SELECT DISTINCT district FROM water.nodes) AS d
CROSS JOIN LATERAL (SELECT (CASE WHEN %(period)s = 'day' THEN 24 ELSE 1 END)
                               * (60 + random() * 20) AS si,
                           CASE WHEN random() < 0.03 THEN random() ELSE 0 END AS fs) AS c
"""

READINGS_SQL = """
INSERT INTO water.readings (node_id, ts, flow_rate, pressure, temperature, total_flow,
    chlorine, ph, turbidity, conductivity, quality, flags, anomaly_score, source, run_id)
SELECT a.node_id, t, f, 3.5 + random() * 0.5, 12 + random() * 2, f * 300,
       q * (0.5 + random() * 0.3), q * (7.2 + random() * 0.3), q * (0.2 + random() * 0.3),
       q * (450 + random() * 50), 1.0,
       CASE WHEN c.r < 0.01 THEN ARRAY['stuck'] WHEN c.r < 0.015 THEN ARRAY['spike'] END,
       random() * 2, 'bench', 'bench-run'
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz - interval '5 minutes',
                     interval '5 minutes') AS t
CROSS JOIN bench.node_attr AS a
CROSS JOIN LATERAL (SELECT
    {FLOW} AS f,
    CASE WHEN a.has_quality THEN 1.0 END AS q, random() AS r) AS c
""".replace("{FLOW}", FLOW)

ANOMALIES_SQL = """
INSERT INTO water.anomalies (anomaly_id, node_id, started_at, ended_at, peak_score, kind,
    measurement, expected_lo, expected_hi, observed)
SELECT format('A%%s', i),
       format('N%%s', lpad((1 + floor(random() * %(nodes)s))::int::text, 4, '0')), s,
       CASE WHEN i <= 20 THEN NULL ELSE s + (15 + floor(random() * 720)) * interval '1 minute' END,
       3 + random() * 5,
       (ARRAY['spike', 'drift', 'flatline', 'leak'])[1 + floor(random() * 4)::int],
       (ARRAY['flow_rate', 'pressure'])[1 + floor(random() * 2)::int], 0.5, 2.0, 4.0
FROM generate_series(1, %(count)s) AS i
CROSS JOIN LATERAL (SELECT CASE WHEN i <= 20 THEN %(hi)s::timestamptz - random() * interval '2 days'
                           ELSE %(lo)s::timestamptz + random() * (%(hi)s::timestamptz
                                - %(lo)s::timestamptz - interval '1 day') END AS s) AS x
"""

QUARANTINE_SQL = """
INSERT INTO water.quarantine (id, run_id, source, line, node_id, ts, measurement, reason, raw,
    whole_reading, received_at)
SELECT format('Q%%s', i), format('run-%%s', i / 100), format('file-%%s.csv', i %% 40), i,
       format('N%%s', lpad((1 + i %% %(nodes)s)::text, 4, '0')),
       CASE WHEN i %% 10 = 0 THEN NULL ELSE r END, 'flow_rate',
       (ARRAY['out_of_range', 'unparseable', 'unknown_node', 'future_ts'])[1 + i %% 4],
       format('N%%s,%%s,abc', i %% 500, i), i %% 3 = 0, r + interval '1 minute'
FROM generate_series(1, %(count)s) AS i
CROSS JOIN LATERAL (SELECT %(lo)s::timestamptz
                           + random() * (%(hi)s::timestamptz - %(lo)s::timestamptz) AS r) AS x
"""

RUNS_SQL = """
INSERT INTO water.ingest_runs (run_id, started_at, finished_at, source, rows_in, accepted,
    quarantined, duplicates, values_quarantined, late, status, updated_at)
SELECT format('run-%%s', i), s, s + interval '20 minutes', 'kafka', 144000, 143900, 60, 40, 12, 3,
       'finished', s + interval '20 minutes'
FROM generate_series(1, 365) AS i
CROSS JOIN LATERAL (SELECT %(lo)s::timestamptz + (i - 1) * interval '1 day' AS s) AS x
"""

# Series: the flow nodes and the districts; issues at 23:00 UTC (local midnight, winter).
FORECASTS_SQL = """
INSERT INTO water.forecasts (node_id, issued_at, target_ts, model, yhat, yhat_lo, yhat_hi)
SELECT s.id, i, i + h * interval '1 hour', m, s.base * (0.9 + random() * 0.2),
       s.base * 0.8, s.base * 1.2
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz, interval '1 day') AS i
CROSS JOIN bench.series AS s
CROSS JOIN generate_series(0, 167) AS h
CROSS JOIN (VALUES ('seasonal'), ('ridge')) AS mm(m)
"""

ACCURACY_SQL = """
INSERT INTO water.forecast_accuracy (node_id, model, horizon_h, period_start, mae, mape, n)
SELECT s.id, m, b, d, s.base * (0.05 + random() * 0.1), 0.05 + random() * 0.1, 24
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz, interval '1 day') AS d
CROSS JOIN bench.series AS s
CROSS JOIN (VALUES ('seasonal'), ('ridge')) AS mm(m)
CROSS JOIN (VALUES (24), (72), (168)) AS bb(b)
"""


def generate(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Fill a migrated database; seconds per step."""
    start = END - timedelta(days=args.days)
    took: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        took["nodes"] = _step(conn, "nodes", NODES_SQL, {"nodes": args.nodes})
        _step(conn, "node_attr", ATTR_SQL, {})
        conn.execute("CREATE TABLE bench.series AS SELECT node_id AS id, base FROM bench.node_attr"
                     " WHERE base IS NOT NULL UNION ALL SELECT district, sum(base)"
                     " FROM bench.node_attr WHERE role = 'inflow' GROUP BY district")
        for table, lo in (("kpi_15m", start), ("kpi_daily", start),
                          ("readings", END - timedelta(days=args.readings_days))):
            conn.execute("SELECT water.ensure_partitions(%s::regclass, %s, %s)",
                         (f"water.{table}", lo, END - timedelta(seconds=1)))
        took["kpi_15m"] = 0.0
        for lo, hi in _months(start, END):
            took["kpi_15m"] += _step(conn, f"kpi_15m {lo:%Y-%m}", KPI_15M_SQL, {"lo": lo, "hi": hi})
        took["kpi_daily"] = _step(conn, "kpi_daily", KPI_DAILY_SQL, {"lo": start, "hi": END})
        took["district_balance"] = sum(
            _step(conn, f"district_balance {period}", BALANCE_SQL,
                  {"lo": start, "hi": END, "period": period, "step": step})
            for period, step in (("hour", "1 hour"), ("day", "1 day")))
        took["readings"] = 0.0
        for lo, hi in _months(END - timedelta(days=args.readings_days), END):
            took["readings"] += _step(conn, f"readings {lo:%Y-%m-%d}", READINGS_SQL,
                                      {"lo": lo, "hi": hi})
        took["anomalies"] = _step(conn, "anomalies", ANOMALIES_SQL,
                                  {"count": args.anomalies, "nodes": args.nodes,
                                   "lo": start, "hi": END})
        took["quarantine"] = _step(conn, "quarantine", QUARANTINE_SQL,
                                   {"count": args.quarantine, "nodes": args.nodes,
                                    "lo": start, "hi": END})
        took["ingest_runs"] = _step(conn, "ingest_runs", RUNS_SQL, {"lo": start})
        f_lo = END - timedelta(days=args.forecast_days) - timedelta(hours=1)
        f_hi = END - timedelta(hours=1)
        took["forecasts"] = _step(conn, "forecasts", FORECASTS_SQL, {"lo": f_lo, "hi": f_hi})
        took["forecast_accuracy"] = _step(conn, "forecast_accuracy", ACCURACY_SQL,
                                          {"lo": f_lo - timedelta(days=28), "hi": f_hi})
        # What retention does on a deployment (`waterflow db retention`, the live schedule):
        # without it every forecast panel chooses the models of all issues at read time.
        took["forecast_choice"] = _step(conn, "forecast_choice",
                                        "SELECT water.refresh_forecast_choice()", {})
        started = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        took["vacuum_analyze"] = time.perf_counter() - started
        print(f"  VACUUM ANALYZE in {took['vacuum_analyze']:.1f} s", flush=True)
    return took


def sizes(url: str) -> dict[str, tuple[int, str]]:
    """Rows and total size (with indexes and partitions) of each table of the water schema."""
    out: dict[str, tuple[int, str]] = {}
    with psycopg.connect(url) as conn:
        for (table,) in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'water' AND c.relkind IN ('r', 'p', 'm')"
                " AND NOT c.relispartition ORDER BY 1").fetchall():
            ident = sql.Identifier("water", table)
            row = conn.execute(sql.SQL(
                "SELECT count(*), pg_size_pretty(coalesce("
                "(SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree({}::regclass)),"
                " pg_total_relation_size({}::regclass)))"
                " FROM {}").format(sql.Literal(f"water.{table}"), sql.Literal(f"water.{table}"),
                                   ident)).fetchone()
            assert row is not None
            out[table] = (int(row[0]), str(row[1]))
    return out


# --------------------------------------------------------------------------------------------
# Queries


@dataclass
class Result:
    """The timings of one panel query in one configuration."""

    board: str
    panel: str
    ref: str
    range: str
    variables: str  # "all" | "one"
    rows: int
    runs_ms: list[float]
    sql: str
    error: str | None = None
    #: With --compare-with REV, when REV's query of this panel differs: whether it returned the
    #: same rows (floats to 1e-9 relative), and its milliseconds (one run); else None.
    same_rows: bool | None = None
    rev_ms: float | None = None
    #: With --server-time: planning + execution ms reported by EXPLAIN (ANALYZE, TIMING OFF),
    #: as many runs as runs_ms. The rows are computed but not sent, so runs_ms minus this is
    #: the transfer and this client's conversion of the rows (psycopg builds a Python object
    #: per value: 35 k rows of a node's year cost 0.1-0.2 s here, the server 10-30 ms).
    server_ms: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.board} | {self.panel} | {self.ref} | {self.range} | {self.variables}"

    def p(self, q: float) -> float:
        """The q-quantile of the runs (linear interpolation, like numpy's default)."""
        return _quantile(self.runs_ms, q)


def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _uses_multi(t: Target, multi: set[str]) -> bool:
    return any(re.search(rf"\$\{{?{name}\b", t.target["rawSql"]) for name in multi)


def _reader(url: str) -> psycopg.Connection:
    """A session as Grafana's: logged in as water_reader (so that the role's settings for the
    database apply, which SET ROLE would not do), else the admin session under SET ROLE."""
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'water_reader'").fetchone()
    if exists:
        parts = urlsplit(url)
        netloc = f"water_reader@{parts.hostname}:{parts.port or 5432}"
        login = urlunsplit(parts._replace(netloc=netloc))
        try:
            return psycopg.connect(login, autocommit=True)
        except psycopg.OperationalError as exc:
            print(f"  cannot log in as water_reader ({exc}): SET ROLE instead", flush=True)
    conn = psycopg.connect(url, autocommit=True)
    reader_role(conn)
    return conn


def boards_at(rev: str) -> dict[str, dict[str, Any]]:
    """The committed boards at git revision ``rev``, as ``load_boards`` reads today's."""
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", rev,
                              "grafana/dashboards/"], capture_output=True, text=True, check=True)
    out = {}
    for path in listing.stdout.split():
        if path.endswith(".json"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"],
                                  capture_output=True, text=True, check=True).stdout
            out[Path(path).stem] = json.loads(text)
    return out


def _cell_key(row: tuple) -> tuple:
    return tuple((v is None, "" if isinstance(v, float) else str(v)) for v in row)


def same_rows(a: list[tuple], b: list[tuple]) -> bool:
    """The same rows in any order; floats (and numerics against floats) to 1e-9 relative."""
    if len(a) != len(b):
        return False
    for x, y in zip(sorted(a, key=_cell_key), sorted(b, key=_cell_key), strict=True):
        for u, v in zip(x, y, strict=True):
            if isinstance(u, float) or isinstance(v, float):
                if u is None or v is None or not math.isclose(
                        float(u), float(v), rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif u != v:
                return False
    return True


#: --compare-function VERSION: where that migration's water.kpi_by_district is created.
OLD_FUNCTION_SCHEMA = "bench_old"


def create_old_function(url: str, version: str) -> None:
    """Migration ``version``'s ``water.kpi_by_district`` as ``bench_old.kpi_by_district``, so
    that --compare-with runs the old boards' queries on the function they were written for
    (a later migration replaced it in ``water``)."""
    from connectors.warm_postgres import migration_files

    text = dict(migration_files())[version]
    start = re.search(r"CREATE (OR REPLACE )?FUNCTION water\.kpi_by_district\(", text)
    if start is None:
        raise SystemExit(f"migration {version} defines no water.kpi_by_district")
    body = text[start.start():text.index("$$;", start.start()) + 3]
    body = re.sub(r"CREATE (OR REPLACE )?FUNCTION water\.kpi_by_district\(",
                  f"CREATE OR REPLACE FUNCTION {OLD_FUNCTION_SCHEMA}.kpi_by_district(", body)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
            sql.Identifier(OLD_FUNCTION_SCHEMA)))
        conn.execute(body.encode("utf-8"))
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'water_reader'").fetchone():
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO water_reader").format(
                sql.Identifier(OLD_FUNCTION_SCHEMA)))


def measure(url: str, args: argparse.Namespace) -> list[Result]:
    """Every SQL panel query of every board in every configuration, ``args.repeat`` times."""
    boards = boards_at(args.boards_rev) if args.boards_rev else load_boards()
    if args.only:
        boards = {k: v for k, v in boards.items() if k in args.only.split(",")}
    old: dict[tuple[str, str, str], str] = {}
    if args.compare_with:
        old = {(t.board, t.panel["title"], t.target["refId"]): t.target["rawSql"]
               for t in targets(boards_at(args.compare_with)) if "rawSql" in t.target}
    results: list[Result] = []
    with _reader(url) as conn:
        print(f"  as {conn.execute('SELECT current_user').fetchone()}, jit "
              f"{conn.execute('SHOW jit').fetchone()}", flush=True)
        conn.execute(sql.SQL("SET statement_timeout = {}").format(
            sql.Literal(f"{args.timeout_s}s")))
        for name, board in boards.items():
            sql_targets = [t for t in targets({name: board}) if "rawSql" in t.target]
            for rng, length in RANGES.items():
                if args.ranges and rng not in args.ranges.split(","):
                    continue
                time_range = (END - length, END)
                for mode, pick in (("all", None), ("one", {"district": 0, "node": 0})):
                    variables, multi = resolve_variables(conn, board, time_range, pick)
                    for t in sql_targets:
                        if mode == "one" and not _uses_multi(t, multi):
                            continue  # the same query as with All
                        q = interpolate_sql(t.target["rawSql"], variables, multi, time_range,
                                            panel_interval(t.panel, time_range))
                        res = Result(name, t.panel["title"], t.target["refId"], rng, mode, 0,
                                     [], q)
                        for i in range(args.repeat):
                            started = time.perf_counter()
                            try:
                                cur = conn.execute(q)  # type: ignore[call-overload]
                                rows = cur.fetchall()
                            except psycopg.errors.QueryCanceled:
                                res.error = f"timeout {args.timeout_s} s"
                                res.runs_ms.append(args.timeout_s * 1000.0)
                                break
                            res.runs_ms.append((time.perf_counter() - started) * 1000)
                            res.rows = len(rows)
                            # A query over 5 s is measured 3 times, not 7: the figure is clear.
                            if i >= 2 and res.p(0.5) > 5000:
                                break
                        if args.server_time and not res.error:
                            for _ in res.runs_ms:
                                plan = conn.execute(  # type: ignore[call-overload]
                                    f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {q}"
                                ).fetchone()[0][0]
                                res.server_ms.append(plan["Planning Time"]
                                                     + plan["Execution Time"])
                        before = old.get((name, t.panel["title"], t.target["refId"]))
                        # The same query text reads another function with --compare-function.
                        changed = before != t.target["rawSql"] or (
                            args.compare_function is not None
                            and "water.kpi_by_district(" in (before or ""))
                        if before is not None and changed and not res.error:
                            oq = interpolate_sql(before, variables, multi, time_range,
                                                 panel_interval(t.panel, time_range))
                            if args.compare_function:
                                oq = oq.replace("water.kpi_by_district(",
                                                f"{OLD_FUNCTION_SCHEMA}.kpi_by_district(")
                            rows = conn.execute(q).fetchall()  # type: ignore[call-overload]
                            started = time.perf_counter()
                            conn.execute("SET statement_timeout = '300s'")
                            try:
                                old_rows = conn.execute(oq).fetchall()  # type: ignore[call-overload]
                                res.same_rows = same_rows(rows, old_rows)
                            except psycopg.errors.QueryCanceled:
                                pass  # not compared: same_rows stays None, rev_ms says why
                            res.rev_ms = (time.perf_counter() - started) * 1000
                            conn.execute(sql.SQL("SET statement_timeout = {}").format(
                                sql.Literal(f"{args.timeout_s}s")))
                        results.append(res)
                        same = ("" if res.rev_ms is None else
                                f"  same rows as {args.compare_with}: {res.same_rows}"
                                f" ({res.rev_ms:.0f} ms there)")
                        print(f"  {res.p(0.5):9.1f} {res.p(0.95):9.1f} ms  {res.rows:6d} rows  "
                              f"{res.key}{'  ' + res.error if res.error else ''}{same}",
                              flush=True)
    return results


def _short(text: str) -> str:
    """SQL or a plan with its long value lists ('N0001', ... 500 of them) cut to their ends."""
    text = re.sub(r"((?:'[^',]{1,12}',){3})(?:'[^',]{1,12}',){5,}('[^',]{1,12}')",
                  lambda m: f"{m[1]} ... {m[2]}", text)
    return re.sub(r"(\{(?:[\w-]{1,12},){3})(?:[\w-]{1,12},){5,}([\w-]{1,12}\})",
                  lambda m: f"{m[1]} ... ,{m[2]}", text)


def explain(url: str, results: list[Result], path: Path, top: int) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the ``top`` slowest configurations, one per panel."""
    seen: set[tuple[str, str, str]] = set()
    chosen: list[Result] = []
    for r in sorted(results, key=lambda r: -r.p(0.95)):
        if (r.board, r.panel, r.ref) in seen or r.p(0.95) <= TARGET_MS:
            continue
        seen.add((r.board, r.panel, r.ref))
        chosen.append(r)
    chosen = chosen[:top]
    parts = [f"# EXPLAIN (ANALYZE, BUFFERS) of the slowest panel queries\n\n"
             f"Queries whose p95 is over {TARGET_MS:.0f} ms, slowest first, each in the "
             f"configuration where it was slowest.\n"]
    with _reader(url) as conn:
        conn.execute("SET statement_timeout = '300s'")
        for r in chosen:
            try:
                plan = "\n".join(row[0] for row in conn.execute(
                    f"EXPLAIN (ANALYZE, BUFFERS) {r.sql}").fetchall())  # type: ignore[call-overload]
            except psycopg.Error as exc:
                plan = f"failed: {exc}"
            parts.append(f"\n## {r.key} (p95 {r.p(0.95):.0f} ms)\n\n```sql\n{_short(r.sql)}\n"
                         f"```\n\n```\n{_short(plan)}\n```\n")
    path.write_text("".join(parts), encoding="utf-8")
    print(f"wrote {path}")


def table(results: list[Result], baseline: dict[str, dict[str, Any]] | None) -> str:
    """The markdown table, one row per panel query and configuration."""
    head = "| board | panel | ref | range | vars | rows | p50 ms | p95 ms |"
    rule = "|---|---|---|---|---|---:|---:|---:|"
    if baseline is not None:
        head += " before p50 | before p95 |"
        rule += "---:|---:|"
    server = any(r.server_ms for r in results)
    if server:
        head += " server p50 | server p95 |"
        rule += "---:|---:|"
    compared = any(r.rev_ms is not None for r in results)
    if compared:
        head += " same rows as before |"
        rule += "---|"
    lines = [head, rule]
    for r in results:
        over = " **over**" if r.p(0.95) > TARGET_MS else ""
        err = f" ({r.error})" if r.error else ""
        line = (f"| {r.board} | {r.panel} | {r.ref} | {r.range} | {r.variables} | {r.rows} | "
                f"{r.p(0.5):.1f} | {r.p(0.95):.1f}{over}{err} |")
        if baseline is not None:
            b = baseline.get(r.key)
            line += (f" {b['p50']:.1f} | {b['p95']:.1f} |" if b else " - | - |")
        if server:
            line += (f" {_quantile(r.server_ms, 0.5):.1f} | {_quantile(r.server_ms, 0.95):.1f} |"
                     if r.server_ms else " - | - |")
        if compared:
            line += (" (same query) |" if r.rev_ms is None else
                     " (not compared: the old query timed out) |" if r.same_rows is None else
                     f" {'yes' if r.same_rows else '**NO**'} |")
        lines.append(line)
    return "\n".join(lines)


def report(results: list[Result], args: argparse.Namespace, url: str,
           took: dict[str, float] | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    baseline = None
    if args.baseline:
        data = json.loads(Path(args.baseline).read_text(encoding="utf-8"))
        baseline = {r["key"]: r for r in data["results"]}
    over = [r for r in results if r.p(0.95) > TARGET_MS]
    text = [f"# Grafana panel queries ({args.label})\n",
            f"Database `{url.rsplit('/', 1)[-1]}`, year ending {END:%Y-%m-%d}, "
            f"{args.repeat} runs per query (3 when over 5 s; p50/p95 interpolated linearly), "
            f"logged in as water_reader; {len(results)} configurations, {len(over)} with p95 over "
            f"{TARGET_MS:.0f} ms.\n",
            "Table sizes (rows, total size with indexes): " + ", ".join(
                f"{k} {v[0]:,} ({v[1]})" for k, v in sizes(url).items()) + ".\n"]
    compared = [r for r in results if r.rev_ms is not None]
    if compared:
        differ = [r.key for r in compared if r.same_rows is False]
        timed_out = [r.key for r in compared if r.same_rows is None]
        if timed_out:
            text.append(f"Not compared (the old query took over 300 s): {'; '.join(timed_out)}."
                        "\n")
        on = (f" (on water.kpi_by_district as {args.compare_function} defined it)"
              if args.compare_function else "")
        text.append(f"{len(compared)} configurations run a query other than the boards at "
                    f"{args.compare_with}: that query was run once too{on}, and "
                    + (f"{len(differ)} returned other rows: {'; '.join(differ)}.\n" if differ
                       else "each returned the same rows (floats to 1e-9 relative).\n"))
    if took:
        text.append("Generation seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in took.items())
                    + ".\n")
    text.append(table(results, baseline) + "\n")
    out = Path(args.out or RESULTS / f"grafana_queries_{args.label}.md")
    out.write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))
    print(f"wrote {out}")
    out.with_suffix(".json").write_text(json.dumps({"label": args.label, "took": took, "results": [
        {**{k: v for k, v in asdict(r).items() if k != "sql"}, "key": r.key,
         "p50": r.p(0.5), "p95": r.p(0.95)} for r in results]},
        indent=1), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Write cost of the kpi_15m triggers (migration 0009)

ROLLUP_TRIGGERS = ("kpi_rollup_insert", "kpi_rollup_update", "kpi_rollup_delete")


def _kpi_frame(nodes: int, start: datetime, windows: int, seed: int) -> Any:
    """kpi_15m rows of ``nodes`` nodes for ``windows`` windows from ``start``, every column."""
    import numpy as np
    import polars as pl

    from dataflows.tables import SCHEMAS

    rng = np.random.default_rng(seed)
    count = nodes * windows
    ids = [f"N{i:04d}" for i in range(1, nodes + 1)]
    base = int(start.timestamp() * 1_000_000)
    data: dict[str, Any] = {
        "node_id": ids * windows,
        "window_start": np.repeat(base + np.arange(windows, dtype=np.int64) * 900_000_000, nodes),
        "n": rng.integers(1, 4, count),
        "completeness": rng.random(count),
        "flow_rate_avg": rng.random(count) * 5,
        "pressure_avg": 3.5 + rng.random(count),
        "volume_m3": rng.random(count) * 4,
    }
    schema = SCHEMAS["kpi_15m"]
    frame = pl.DataFrame(data).with_columns(
        pl.col("window_start").cast(pl.Datetime("us", "UTC")))
    return frame.with_columns(pl.lit(None, dtype=schema[c]).alias(c)
                              for c in schema if c not in frame.columns).select(
        pl.col(c).cast(schema[c]) for c in schema)


def write_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to write kpi_15m batches through WarmPostgresWriter, 0009's triggers off and on.

    A database of its own with ``--nodes`` nodes (50 districts of 10 at 500): the live case
    (one batch per 15-minute window of every node), a replay's (one batch per day of every
    node), and the replay again with other values (every row an upsert that changes it). Each
    case alternates off/on ``--write-rounds`` times, each round on windows of its own.
    """
    from connectors.warm_postgres import WarmPostgresWriter
    from dataflows.tables import TableRows

    name = f"bench_grafana_w{uuid.uuid4().hex[:8]}"
    url = url_with(args.admin_url, dbname=name)
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    out: dict[str, Any] = {"nodes": args.nodes, "rounds": args.write_rounds, "cases": {}}
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(NODES_SQL, {"nodes": args.nodes})
            conn.execute("SELECT water.ensure_partitions('water.kpi_15m', %s, %s)",
                         (datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 12, 31, tzinfo=UTC)))
        writer = WarmPostgresWriter(url)

        def triggers(conn: psycopg.Connection, on: bool) -> None:
            for t in ROLLUP_TRIGGERS:
                conn.execute(sql.SQL("ALTER TABLE water.kpi_15m {} TRIGGER {}").format(
                    sql.SQL("ENABLE" if on else "DISABLE"), sql.Identifier(t)))

        cases = {"live: 1 window x all nodes": (96, 1), "replay: 1 day x all nodes": (4, 96)}
        day = 0
        with psycopg.connect(url, autocommit=True) as conn:
            for case, (batches, windows) in cases.items():
                for rewrite in (False, True):
                    label = case + (", rewritten" if rewrite else "")
                    took: dict[str, list[float]] = {"off": [], "on": []}
                    for r in range(args.write_rounds):
                        for mode in ("off", "on"):
                            triggers(conn, mode == "on")
                            start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=day)
                            frames = [_kpi_frame(args.nodes, start + timedelta(minutes=15 * b
                                                                               * windows),
                                                 windows, seed=b) for b in range(batches)]
                            if rewrite:  # write them first, then time writing other values
                                for f in frames:
                                    writer.write(TableRows("kpi_15m", f))
                                frames = [_kpi_frame(args.nodes, start + timedelta(
                                    minutes=15 * b * windows), windows, seed=1000 + b)
                                    for b in range(batches)]
                            started = time.perf_counter()
                            for f in frames:
                                writer.write(TableRows("kpi_15m", f))
                            took[mode].append(time.perf_counter() - started)
                            day += 2
                            print(f"  {label} round {r + 1} triggers {mode}: "
                                  f"{took[mode][-1]:.2f} s for {batches} batches", flush=True)
                    out["cases"][label] = {"batches": batches, "rows_per_batch":
                                           args.nodes * windows, **took}
            triggers(conn, True)
            # the rollups the triggers kept equal a recompute from kpi_15m (the "on" rounds)
            out["rollup_rows"] = conn.execute(
                "SELECT count(*) FROM water.kpi_district_15m").fetchone()[0]  # type: ignore[index]
        writer.close()
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))
    lines = ["| case | batches x rows | triggers off, s (median) | on, s (median) | on/off |"
             " ms per batch off -> on |", "|---|---:|---:|---:|---:|---:|"]
    for label, c in out["cases"].items():
        off, on = sorted(c["off"])[len(c["off"]) // 2], sorted(c["on"])[len(c["on"]) // 2]
        lines.append(f"| {label} | {c['batches']} x {c['rows_per_batch']:,} | {off:.2f} |"
                     f" {on:.2f} | {on / off:.2f} | {1000 * off / c['batches']:.1f} ->"
                     f" {1000 * on / c['batches']:.1f} |")
    out["table"] = "\n".join(lines)
    print(out["table"])
    return out


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--admin-url", default=ADMIN_URL)
    ap.add_argument("--db", help="reuse this benchmark database (generated earlier with --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the database at the end")
    ap.add_argument("--drop", action="store_true", help="only drop --db and exit")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--readings-days", type=int, default=56)
    ap.add_argument("--forecast-days", type=int, default=30)
    ap.add_argument("--anomalies", type=int, default=5000)
    ap.add_argument("--quarantine", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--timeout-s", type=int, default=60)
    ap.add_argument("--only", help="boards, comma-separated")
    ap.add_argument("--ranges", help="of 7d,30d,1y (default all)")
    ap.add_argument("--label", default="before")
    ap.add_argument("--baseline", help="a JSON written by an earlier run, for before/after")
    ap.add_argument("--out", help="markdown (default bench/results/grafana_queries_LABEL.md)")
    ap.add_argument("--explain-top", type=int, default=8)
    ap.add_argument("--write-cost", action="store_true",
                    help="only measure the write cost of 0009's kpi_15m triggers (own database)")
    ap.add_argument("--write-rounds", type=int, default=3)
    ap.add_argument("--boards-rev", metavar="REV",
                    help="measure the boards committed at git revision REV instead of today's")
    ap.add_argument("--compare-with", metavar="REV",
                    help="also run the boards' queries at git revision REV where they differ"
                         " (once) and say whether they return the same rows")
    ap.add_argument("--compare-function", metavar="VERSION",
                    help="with --compare-with: run REV's queries on water.kpi_by_district as"
                         " migration VERSION defined it (e.g. 0009_kpi_district_rollup)")
    ap.add_argument("--server-time", action="store_true",
                    help="also run each query under EXPLAIN (ANALYZE, TIMING OFF) as many times"
                         " and report the server's planning + execution time beside the wall")
    args = ap.parse_args(argv)

    def drop(name: str) -> None:
        if not name.startswith("bench_grafana_"):
            raise SystemExit(f"refusing to drop {name!r}: not a bench_grafana_ database")
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))
        print(f"dropped {name}")

    if args.drop:
        drop(args.db)
        return 0
    if args.write_cost:
        cost = write_cost(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = Path(args.out or RESULTS / f"grafana_write_{args.label}.json")
        out.write_text(json.dumps(cost, indent=1), encoding="utf-8")
        print(f"wrote {out}")
        return 0
    name = args.db or f"bench_grafana_{uuid.uuid4().hex[:8]}"
    url = url_with(args.admin_url, dbname=name)
    took = None
    try:
        if not args.db:
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created {name}", flush=True)
        started = time.perf_counter()
        applied = migrate(url)
        if applied:
            print(f"migrations applied: {', '.join(applied)} in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            if args.db:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("ANALYZE")
        if not args.db:
            took = generate(url, args)
        if args.generate_only:
            return 0
        if args.compare_function:
            create_old_function(url, args.compare_function)
        results = measure(url, args)
        report(results, args, url, took)
        explain(url, results, RESULTS / f"grafana_explain_{args.label}.md", args.explain_top)
    finally:
        if not args.keep and not args.db:
            drop(name)
        elif not args.db:
            print(f"kept {name}: --db {name} to reuse, --db {name} --drop to drop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
