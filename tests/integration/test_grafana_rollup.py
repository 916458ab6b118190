"""Migration 0009: the district panels read per-district rollups of kpi_15m kept by triggers.

Every panel that reads ``water.kpi_by_district`` is compared with the node-level query it ran
before 0009 (kept below), on rows written here, for several selections (All, one district, one
node, a district and a node of another), aligned and unaligned ranges and every bucket size the
rollups serve (15 minutes, an hour, 12 hours, a day): the same rows, floats to 1e-9 relative
(sums added in another order). Then the writes the rollups must follow: a re-written (upserted)
window and a late one through the warm writer, deleted rows, a node moved to another district,
two writers of the same district and window at once, retention dropping a month.

Migration 0010: the function returns one row per district and time bucket, and the bucketed
panels select its rows without grouping them again; they return the same rows as the 0009
boards' queries on 0009's function (kept below and created beside the new one).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
import pytest

from connectors.warm_postgres import WarmPostgresWriter, migrate, migration_files
from connectors.warm_retention import RetentionPolicy, apply_retention
from dataflows.tables import SCHEMAS, TableRows
from grafana.queries import interpolate_sql, load_boards, reader_role, targets
from tests.integration.conftest import fresh_database

pytestmark = pytest.mark.integration

START = datetime(2025, 3, 1, tzinfo=UTC)
DAYS = 3
#: (node_id, district, role): an inflow meter, consumption meters, a quality probe, a node
#: without a role, one without a district.
NODES = [
    ("N1", "D1", "inflow"), ("N2", "D1", "consumption"), ("N3", "D1", "consumption"),
    ("N4", "D1", "quality"), ("N5", "D2", "inflow"), ("N6", "D2", None),
    ("N7", "D2", "consumption"), ("N8", None, "consumption"),
]
TZ = "Europe/Rome"

#: The panels' queries before 0009 (node rows joined to nodes), by panel title.
FLOW_NODES = """
    FROM water.kpi_15m AS k JOIN water.nodes AS n USING (node_id)
    WHERE k.node_id IN ($node) AND $__timeFilter(k.window_start)
      AND k.flow_rate_avg IS NOT NULL AND n.role IS DISTINCT FROM 'inflow'"""
LOCAL = "k.window_start AT TIME ZONE '${tz}'"
HOURS = ",\n".join(f'max(flow) FILTER (WHERE h = {h}) AS "{h:02d}"' for h in range(24))
DOW = " ".join(f"WHEN {i + 1} THEN '{d}'" for i, d in
               enumerate(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]))
BEFORE = {
    "Readings per interval by district": """
        SELECT $__timeGroupAlias(k.window_start, $__interval),
               coalesce(n.district, 'none') AS metric, sum(k.n) AS value
        FROM water.kpi_15m AS k JOIN water.nodes AS n USING (node_id)
        WHERE $__timeFilter(k.window_start) AND k.node_id IN ($node)
        GROUP BY 1, 2 ORDER BY 1""",
    "Completeness by district (15-minute windows)": """
        SELECT $__timeGroupAlias(k.window_start, $__interval),
               coalesce(n.district, 'none') AS metric, avg(k.completeness) AS value
        FROM water.kpi_15m AS k JOIN water.nodes AS n USING (node_id)
        WHERE k.node_id IN ($node) AND $__timeFilter(k.window_start)
        GROUP BY 1, 2 ORDER BY 1""",
    "Flow by district (consumption meters, L/s)": f"""
        SELECT $__timeGroupAlias(k.window_start, $__interval),
               coalesce(n.district, 'none') AS metric,
               sum(k.flow_rate_avg) / count(DISTINCT k.window_start) AS value
        {FLOW_NODES}
        GROUP BY 1, 2 ORDER BY 1""",
    "Volume into the districts (m³)": """
        SELECT coalesce(sum(k.volume_m3), 0) AS "inflow volume"
        FROM water.kpi_15m AS k JOIN water.nodes AS n USING (node_id)
        WHERE n.role = 'inflow' AND k.node_id IN ($node) AND $__timeFilter(k.window_start)""",
    "Totals in the range": """
        WITH k AS (
            SELECT count(DISTINCT node_id) AS reporting, coalesce(sum(n), 0) AS readings
            FROM water.kpi_15m
            WHERE node_id IN ($node) AND $__timeFilter(window_start)
        ), a AS (
            SELECT count(*) FILTER (WHERE started_at <= $__timeTo()
                       AND (ended_at IS NULL OR ended_at >= $__timeFrom())) AS in_range,
                   count(*) FILTER (WHERE ended_at IS NULL) AS open
            FROM water.anomalies WHERE node_id IN ($node)
        )
        SELECT (SELECT count(*) FROM water.nodes WHERE node_id IN ($node)) AS "nodes",
               k.reporting AS "nodes reporting", k.readings AS "readings",
               a.in_range AS "anomaly events", a.open AS "open anomalies"
        FROM k CROSS JOIN a""",
    "Hour of week: average flow per node (L/s), local time": f"""
        WITH w AS (
            SELECT extract(isodow FROM {LOCAL})::int AS dow,
                   extract(hour FROM {LOCAL})::int AS h, avg(k.flow_rate_avg) AS flow
            {FLOW_NODES}
            GROUP BY 1, 2
        )
        SELECT CASE dow {DOW} END AS day,
        {HOURS}
        FROM w GROUP BY dow ORDER BY dow""",
    "Daily profile: weekdays vs weekend (L/s per node)": f"""
        SELECT lpad(extract(hour FROM {LOCAL})::int::text, 2, '0') AS hour,
               avg(k.flow_rate_avg) FILTER (WHERE extract(isodow FROM {LOCAL}) < 6)
                   AS weekday,
               avg(k.flow_rate_avg) FILTER (WHERE extract(isodow FROM {LOCAL}) >= 6)
                   AS weekend
        {FLOW_NODES}
        GROUP BY 1 ORDER BY 1""",
}
#: The bucketed panels' queries of 0009, which grouped the function's rows again.
BY_DISTRICT_0009 = "water_0009.kpi_by_district(ARRAY[$node]::text[], $__timeFrom(), $__timeTo(), "
PANELS_0009 = {
    "Readings per interval by district": f"""
        SELECT $__timeGroupAlias(r.t, $__interval), r.district AS metric, sum(r.n) AS value
        FROM {BY_DISTRICT_0009}'$__interval') AS r
        GROUP BY 1, 2 ORDER BY 1""",
    "Completeness by district (15-minute windows)": f"""
        SELECT $__timeGroupAlias(r.t, $__interval), r.district AS metric,
               sum(r.completeness_sum) / nullif(sum(r.completeness_n), 0) AS value
        FROM {BY_DISTRICT_0009}'$__interval') AS r
        GROUP BY 1, 2 ORDER BY 1""",
    "Flow by district (consumption meters, L/s)": f"""
        SELECT $__timeGroupAlias(r.t, $__interval), r.district AS metric,
               sum(r.flow_sum) / sum(r.flow_windows) AS value
        FROM {BY_DISTRICT_0009}'$__interval', 'not inflow') AS r
        WHERE r.flow_n > 0
        GROUP BY 1, 2 ORDER BY 1""",
}
#: Selections: every node (All), one district's nodes, one node, a district and a node of
#: another (the rollup for D2, N2's own rows), nodes of no district.
SELECTIONS = {
    "all": [n for n, _, _ in NODES],
    "district D1": ["N1", "N2", "N3", "N4"],
    "one node": ["N2"],
    "an inflow meter": ["N1"],
    "D2 and N2": ["N2", "N5", "N6", "N7"],
    "none": ["N8"],
}
#: (from, to): whole days; unaligned ends (whole hours and days inside, 15-minute rows at
#: the ends); less than an hour.
RANGES = [
    (START, START + timedelta(days=DAYS)),
    (START + timedelta(hours=5, minutes=7), START + timedelta(days=2, hours=19, minutes=52)),
    (START + timedelta(days=1, hours=10, minutes=10),
     START + timedelta(days=1, hours=10, minutes=40)),
]
STEPS = ["15m", "1h", "12h", "1d"]


def panels() -> dict[str, str]:
    """Title -> the committed boards' query of each panel that reads the rollups."""
    out = {t.panel["title"]: t.target["rawSql"] for t in targets(load_boards())
           if "kpi_by_district" in t.target.get("rawSql", "")}
    assert set(out) == set(BEFORE), sorted(out)
    return out


def _kpi_rows(rng: random.Random, nodes: list[str], windows: list[datetime]) -> pl.DataFrame:
    rows: dict[str, list[Any]] = {c: [] for c in ("node_id", "window_start", "n", "completeness",
                                                  "flow_rate_avg", "volume_m3")}
    roles = {n: r for n, _, r in NODES}
    for w in windows:
        for node in nodes:
            if rng.random() < 0.1:
                continue  # a window the node did not report
            n = rng.choice([1, 2, 3, 3, 3])
            flow = None if roles[node] == "quality" or rng.random() < 0.05 else rng.uniform(0, 9)
            rows["node_id"].append(node)
            rows["window_start"].append(w)
            rows["n"].append(n)
            rows["completeness"].append(None if rng.random() < 0.03 else n / 3)
            rows["flow_rate_avg"].append(flow)
            rows["volume_m3"].append(None if flow is None else flow * 0.9)
    return pl.DataFrame(rows, schema={"node_id": pl.String,
                                      "window_start": pl.Datetime("us", "UTC"),
                                      "n": pl.Int64, "completeness": pl.Float64,
                                      "flow_rate_avg": pl.Float64, "volume_m3": pl.Float64})


def _windows(start: datetime, count: int) -> list[datetime]:
    return [start + timedelta(minutes=15 * i) for i in range(count)]


def write_kpi(url: str, frame: pl.DataFrame) -> None:
    """Upsert kpi_15m rows as the pipeline does (WarmPostgresWriter)."""
    schema = SCHEMAS["kpi_15m"]
    frame = frame.with_columns(pl.lit(None, dtype=schema[c]).alias(c)
                               for c in schema if c not in frame.columns)
    frame = frame.select(pl.col(c).cast(schema[c]) for c in schema)
    writer = WarmPostgresWriter(url)
    try:
        writer.write(TableRows("kpi_15m", frame))
    finally:
        writer.close()


@pytest.fixture
def db() -> Iterator[str]:
    """A migrated database with NODES and DAYS days of their kpi_15m rows."""
    with fresh_database("waterflow_rollup") as url:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            for node, district, role in NODES:
                conn.execute("INSERT INTO water.nodes (node_id, district, role)"
                             " VALUES (%s, %s, %s)", (node, district, role))
        write_kpi(url, _kpi_rows(random.Random(9), [n for n, _, _ in NODES],
                                 _windows(START, DAYS * 96)))
        yield url


def _run(conn: psycopg.Connection, query: str, nodes: list[str],
         time_range: tuple[datetime, datetime], step: str) -> list[tuple]:
    variables = {"node": nodes, "district": ["D1", "D2", "none"], "tz": [TZ]}
    q = interpolate_sql(query, variables, {"node", "district"}, time_range, step)
    return conn.execute(q).fetchall()  # type: ignore[call-overload]


def _key(row: tuple) -> tuple:
    return tuple((v is None, str(v)) if not isinstance(v, float) else (False, "") for v in row)


def _same(a: list[tuple], b: list[tuple]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(sorted(a, key=_key), sorted(b, key=_key), strict=True):
        for u, v in zip(x, y, strict=True):
            if isinstance(u, float) or isinstance(v, float):
                if u is None or v is None or not math.isclose(float(u), float(v),
                                                              rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif u != v:
                return False
    return True


def assert_panels_match(url: str, selections: dict[str, list[str]] | None = None,
                        ranges: list[tuple[datetime, datetime]] | None = None) -> int:
    """Every rollup panel equals its node-level query; returns the rows compared."""
    compared = 0
    with psycopg.connect(url, autocommit=True) as conn:
        assert reader_role(conn) == "water_reader"
        for title, query in panels().items():
            for name, nodes in (selections or SELECTIONS).items():
                for rng in ranges or RANGES:
                    for step in STEPS:
                        got = _run(conn, query, nodes, rng, step)
                        want = _run(conn, BEFORE[title], nodes, rng, step)
                        assert _same(got, want), (
                            f"{title}, {name}, {rng[0]:%d %H:%M}-{rng[1]:%d %H:%M}, {step}:"
                            f"\n  rollup     {sorted(got, key=_key)[:6]}"
                            f"\n  node rows  {sorted(want, key=_key)[:6]}")
                        compared += len(got)
    return compared


def readings_by_district(url: str, rng: tuple[datetime, datetime], step: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        reader_role(conn)
        return sorted(_run(conn, panels()["Readings per interval by district"],
                           SELECTIONS["all"], rng, step), key=_key)


def expected_rows(url: str) -> tuple[int, int, int]:
    """(district, window), (district, hour), (district, day) pairs with a kpi_15m row."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT (d, k.window_start)),"
            " count(DISTINCT (d, date_trunc('hour', k.window_start, 'UTC'))),"
            " count(DISTINCT (d, date_trunc('day', k.window_start, 'UTC')))"
            " FROM water.kpi_15m AS k JOIN water.nodes AS n USING (node_id),"
            " LATERAL (SELECT coalesce(n.district, 'none') AS d) AS x").fetchone()
        assert row is not None
        return row


def rollup_rows(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM water.kpi_district_15m),"
            " (SELECT count(*) FROM water.kpi_district_hour),"
            " (SELECT count(*) FROM water.kpi_district_day)").fetchone()
        assert row is not None
        return row


def test_panels_show_what_the_node_level_queries_showed(db):
    assert assert_panels_match(db) > 1000
    # every district and window with a row, once; hours and days over them
    assert rollup_rows(db) == expected_rows(db)
    assert rollup_rows(db)[1:] == (3 * DAYS * 24, 3 * DAYS)


def test_the_migration_rolls_up_the_rows_already_written():
    with fresh_database("waterflow_rollup") as url:
        # A database of the previous release (0001-0008, recorded as migrate() records them)
        # with its rows; then migrate() applies 0009.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA water")
            conn.execute("CREATE TABLE water.schema_migrations (version text PRIMARY KEY,"
                         " applied_at timestamptz NOT NULL DEFAULT now())")
            for version, text in migration_files():
                if version < "0009":
                    conn.execute(text.encode("utf-8"))
                    conn.execute("INSERT INTO water.schema_migrations (version) VALUES (%s)",
                                 (version,))
            for node, district, role in NODES:
                conn.execute("INSERT INTO water.nodes (node_id, district, role)"
                             " VALUES (%s, %s, %s)", (node, district, role))
            conn.execute("SELECT water.ensure_partitions('water.kpi_15m', %s, %s)",
                         (START, START + timedelta(days=DAYS)))
        frame = _kpi_rows(random.Random(3), [n for n, _, _ in NODES], _windows(START, DAYS * 96))
        with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO water.kpi_15m (node_id, window_start, n, completeness,"
                " flow_rate_avg, volume_m3) VALUES (%s, %s, %s, %s, %s, %s)",
                frame.rows())
            exists = conn.execute("SELECT to_regclass('water.kpi_district_15m')").fetchone()
            assert exists == (None,)
        assert migrate(url) == ["0009_kpi_district_rollup", "0010_kpi_by_district_buckets"]
        assert rollup_rows(url) == expected_rows(url)
        assert rollup_rows(url)[2] == 3 * DAYS
        assert_panels_match(url, {"all": SELECTIONS["all"]}, RANGES[:2])


def test_a_rewritten_window_and_a_late_one_change_the_panels(db):
    rng = (START, START + timedelta(days=DAYS))
    before = readings_by_district(db, rng, "1h")
    # The pipeline re-writes a window of three nodes of D1 (an upsert on their key) and writes
    # a window of D2 that arrives late.
    w = START + timedelta(days=1, hours=7, minutes=30)
    late = START + timedelta(days=2, hours=3)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM water.kpi_15m WHERE node_id = 'N7' AND window_start = %s",
                     (late,))
    after_delete = readings_by_district(db, rng, "1h")
    rewritten = pl.DataFrame({
        "node_id": ["N1", "N2", "N3", "N7"], "window_start": [w, w, w, late],
        "n": [40, 50, 60, 7], "completeness": [0.1, 0.2, 0.3, 0.4],
        "flow_rate_avg": [100.0, 200.0, None, 3.0], "volume_m3": [90.0, 180.0, None, 2.7],
    }, schema_overrides={"window_start": pl.Datetime("us", "UTC")})
    write_kpi(db, rewritten)
    after = readings_by_district(db, rng, "1h")
    assert before != after_delete != after
    hour = w.replace(minute=0)
    d1 = {r[0]: r[2] for r in after if r[1] == "D1"}
    with psycopg.connect(db) as conn:
        expect = conn.execute(
            "SELECT sum(n) FROM water.kpi_15m WHERE node_id IN ('N1', 'N2', 'N3', 'N4')"
            " AND window_start >= %s AND window_start < %s", (hour, hour + timedelta(hours=1))
        ).fetchone()
    assert expect is not None and d1[hour.timestamp()] == expect[0] >= 150
    assert_panels_match(db)


def test_a_node_moved_to_another_district_or_role_moves_its_rows(db):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE water.nodes SET district = 'D2' WHERE node_id = 'N3'")
        conn.execute("UPDATE water.nodes SET role = 'consumption' WHERE node_id = 'N1'")
        conn.execute("UPDATE water.nodes SET name = 'renamed' WHERE node_id = 'N2'")
    assert_panels_match(db, {"all": SELECTIONS["all"], "D1": ["N1", "N2", "N4"],
                             "D2": ["N3", "N5", "N6", "N7"]}, RANGES[:2])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM water.nodes WHERE node_id = 'N5'")
        conn.execute("INSERT INTO water.nodes (node_id, district, role)"
                     " VALUES ('N9', 'D3', 'consumption')")
    write_kpi(db, _kpi_rows(random.Random(4), ["N8"], _windows(START, 8)).with_columns(
        node_id=pl.lit("N9")))
    assert_panels_match(db, {"all": ["N1", "N2", "N3", "N4", "N6", "N7", "N8", "N9"]}, RANGES[:2])


def test_two_writers_of_the_same_district_and_window_both_count(db):
    """The second writer's recompute waits for the first's commit and includes its rows."""
    w = START + timedelta(days=DAYS)  # a window no one wrote yet
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT water.ensure_partitions('water.kpi_15m', %s, %s)", (w, w))
    first = psycopg.connect(db)
    first.execute("INSERT INTO water.kpi_15m (node_id, window_start, n) VALUES ('N2', %s, 2)",
                  (w,))

    def second() -> None:
        with psycopg.connect(db) as conn:
            conn.execute("INSERT INTO water.kpi_15m (node_id, window_start, n)"
                         " VALUES ('N3', %s, 3)", (w,))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive(), "the second writer did not wait for the first"
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT n FROM water.kpi_district_15m"
                            " WHERE district = 'D1' AND window_start = %s", (w,)).fetchone() == (5,)
    assert_panels_match(db, {"all": SELECTIONS["all"]}, [(START, w)])


def test_retention_deletes_the_rollups_of_the_months_it_drops(db):
    old = datetime(2024, 1, 10, tzinfo=UTC)
    write_kpi(db, _kpi_rows(random.Random(5), ["N1", "N2", "N5"], _windows(old, 8)))
    assert rollup_rows(db)[2] == 3 * DAYS + 2
    # kpi_15m keeps 13 months: at 2025-03-15, January 2024 goes.
    apply_retention(db, RetentionPolicy(), now=datetime(2025, 3, 15, tzinfo=UTC))
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM water.kpi_15m WHERE window_start < %s",
                            (START,)).fetchone() == (0,)
        for table, col in (("kpi_district_15m", "window_start"), ("kpi_district_hour", "hour"),
                           ("kpi_district_day", "day")):
            assert conn.execute(f"SELECT count(*) FROM water.{table} WHERE {col} < %s",
                                (START,)).fetchone() == (0,)
    assert rollup_rows(db) == expected_rows(db)
    assert rollup_rows(db)[2] == 3 * DAYS
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("TRUNCATE water.kpi_15m")
    assert rollup_rows(db) == (0, 0, 0)


def create_0009_function(url: str) -> None:
    """0009's kpi_by_district, as water_0009.kpi_by_district, readable by water_reader."""
    text = dict(migration_files())["0009_kpi_district_rollup"]
    start = text.index("CREATE FUNCTION water.kpi_by_district(")
    body = text[start:text.index("$$;", start) + 3]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA water_0009")
        conn.execute(body.replace("water.kpi_by_district(", "water_0009.kpi_by_district(")
                     .encode("utf-8"))
        conn.execute("GRANT USAGE ON SCHEMA water_0009 TO water_reader")


def test_the_bucketed_panels_return_what_their_0009_queries_returned(db):
    create_0009_function(db)
    now = panels()
    compared = 0
    with psycopg.connect(db, autocommit=True) as conn:
        assert reader_role(conn) == "water_reader"
        for title, before in PANELS_0009.items():
            assert "GROUP BY" not in now[title]
            for name, nodes in SELECTIONS.items():
                for rng in RANGES:
                    for step in STEPS:
                        got = _run(conn, now[title], nodes, rng, step)
                        want = _run(conn, before, nodes, rng, step)
                        assert _same(got, want), (
                            f"{title}, {name}, {rng[0]:%d %H:%M}-{rng[1]:%d %H:%M}, {step}:"
                            f"\n  0010  {sorted(got, key=_key)[:6]}"
                            f"\n  0009  {sorted(want, key=_key)[:6]}")
                        compared += len(got)
    assert compared > 1000


@pytest.mark.parametrize("roles", [None, "inflow", "not inflow"])
def test_one_row_per_district_and_bucket_starting_at_the_bucket(db, roles):
    """What lets the panels drop their GROUP BY: t is date_bin(step, window, epoch), once."""
    with psycopg.connect(db, autocommit=True) as conn:
        for nodes in SELECTIONS.values():
            for lo, hi in RANGES:
                for step in STEPS:
                    rows = conn.execute(
                        "SELECT r.district, r.t,"
                        " r.t = date_bin(%s::interval, r.t, timestamptz '1970-01-01 00:00:00+00')"
                        " FROM water.kpi_by_district(%s, %s, %s, %s::interval, %s) AS r",
                        (step, nodes, lo, hi, step, roles)).fetchall()
                    assert all(aligned for _, _, aligned in rows), (nodes, lo, step)
                    keys = [(d, t) for d, t, _ in rows]
                    assert len(keys) == len(set(keys)), (nodes, lo, step)
