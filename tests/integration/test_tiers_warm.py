"""Warm tier against the real PostgreSQL: schema, migrations, upserts, roles, retries."""

from __future__ import annotations

import datetime
import math
import uuid

import psycopg
import pytest

from connectors import warm_postgres
from connectors.warm_postgres import (
    WarmPostgresWriter,
    key_ranges,
    migrate,
    migration_files,
    overlap_sql,
)
from dataflows.model import MEASUREMENTS, US_PER_S
from dataflows.tables import KEYS, SCHEMAS, frame

pytestmark = pytest.mark.integration

T0 = 1_700_000_000 * US_PER_S


def uid() -> str:
    return f"n-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def writer(warm_url):
    w = WarmPostgresWriter(warm_url, backoff_s=0.05)
    yield w
    w.close()


def test_migrate_applies_everything_once(migrated):
    url, first = migrated
    assert first == [v for v, _ in migration_files()]
    assert migrate(url) == []
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM water.schema_migrations")]
    assert sorted(versions) == first


def test_tables_match_the_contract(pg):
    types = {
        (t, c): (dt, udt)
        for t, c, dt, udt in pg.execute(
            "SELECT table_name, column_name, data_type, udt_name FROM information_schema.columns"
            " WHERE table_schema = 'water'"
        )
    }
    for table, schema in SCHEMAS.items():
        for col in schema:
            assert (table, col) in types, f"water.{table}.{col} missing"
    for (table, col), (dt, _udt) in types.items():
        if col in ("ts", "window_start", "started_at", "ended_at", "received_at", "issued_at"):
            assert dt == "timestamp with time zone", (table, col)
    assert types[("readings", "flags")] == ("ARRAY", "_text")
    assert types[("kpi_daily", "day")][0] == "date"
    for table, key in KEYS.items():
        pk = [
            r[0]
            for r in pg.execute(
                "SELECT a.attname FROM pg_index i"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = %s::regclass AND i.indisprimary"
                " ORDER BY array_position(i.indkey, a.attnum)",
                (f"water.{table}",),
            )
        ]
        assert tuple(pk) == key, table
    for table in ("district_balance", "forecasts", "forecast_accuracy", "forecast_selected"):
        assert pg.execute("SELECT to_regclass(%s)", (f"water.{table}",)).fetchone()[0]


def readings_rows(node: str, n: int = 5, **extra):
    cols = {
        "node_id": [node] * n,
        "ts": [T0 + i * 300 * US_PER_S for i in range(n)],
        "flow_rate": [0.1 * i + 0.2 for i in range(n)],
        "pressure": [3.0 + i for i in range(n)],
        "quality": [1.0] * n,
        "flags": [["LATE"] if i % 2 else [] for i in range(n)],
        "anomaly_score": [0.01 * i for i in range(n)],
        "source": ["file.csv"] * n,
        "run_id": ["run-1"] * n,
    }
    cols.update(extra)
    return frame("readings", cols)


def fetch_readings(pg, node):
    cols = ", ".join(SCHEMAS["readings"])
    return pg.execute(
        f"SELECT {cols} FROM water.readings WHERE node_id = %s ORDER BY ts", (node,)
    ).fetchall()


def test_same_readings_twice_is_idempotent(writer, pg):
    node = uid()
    rows = readings_rows(node)
    writer.write(rows)
    first = fetch_readings(pg, node)
    writer.write(rows)
    assert fetch_readings(pg, node) == first
    assert len(first) == 5


def test_upsert_updates_changed_value_and_dedupes_batch(writer, pg):
    node = uid()
    writer.write(readings_rows(node, n=2))
    changed = readings_rows(node, n=2, pressure=[9.5, 8.5])
    writer.write(changed)
    assert [r[3] for r in fetch_readings(pg, node)] == [9.5, 8.5]
    # the same key twice in one batch: the last wins, no "ON CONFLICT ... a second time" error
    dup = frame("readings", {"node_id": [node, node], "ts": [T0, T0], "pressure": [1.0, 2.0]})
    writer.write(dup)
    assert fetch_readings(pg, node)[0][3] == 2.0


def test_new_keys_are_copied_straight_and_stored_ones_upserted(writer, pg):
    node, other = uid(), uid()
    step = 300 * US_PER_S

    def overlaps(rows):
        types, args = key_ranges("readings", rows.frame)
        return pg.execute(overlap_sql("readings", types), args).fetchone()[0]

    first = readings_rows(node, n=5)
    assert not overlaps(first)
    writer.write(first)  # straight into the empty range
    later = readings_rows(node, n=5, ts=[T0 + (5 + i) * step for i in range(5)])
    assert overlaps(first) and not overlaps(later)
    writer.write(later)
    # late data: one stored key (changed) and one new key between stored ones, plus a new node
    late = frame("readings", {"node_id": [node, node, other], "ts": [T0 + 2 * step,
                 T0 + 2 * step + 1, T0], "pressure": [9.5, 7.5, 1.0]})
    assert overlaps(late)
    writer.write(late)
    got = fetch_readings(pg, node)
    assert len(got) == 11
    assert [r[3] for r in got[:4]] == [3.0, 4.0, 9.5, 7.5]
    assert got[3][2] is None and got[2][2] is None  # the late rows' own (absent) flow_rate
    assert len(fetch_readings(pg, other)) == 1
    before = fetch_readings(pg, node)
    writer.write(later)  # a replay of stored rows: upserted, nothing changes
    assert fetch_readings(pg, node) == before


def test_a_key_stored_after_the_check_is_upserted(writer, pg, monkeypatch):
    # What a concurrent writer committing the same keys between the check and the COPY does:
    # the check sees nothing, the direct COPY meets the key, and the batch is upserted.
    node = uid()
    writer.write(readings_rows(node, n=3))
    monkeypatch.setattr(warm_postgres, "key_ranges", lambda table, frame: (["text"], [[]]))
    writer.write(readings_rows(node, n=3, pressure=[7.0, 8.0, 9.0]))
    assert [r[3] for r in fetch_readings(pg, node)] == [7.0, 8.0, 9.0]
    writer.write(readings_rows(uid(), n=2))  # the connection is usable afterwards


def test_flags_nulls_text_and_floats_round_trip(writer, pg):
    node = 'n,"odd" \\ é ' + uid()
    rows = frame(
        "readings",
        {
            "node_id": [node] * 3,
            "ts": [T0, T0 + 1, T0 + 2],
            "flow_rate": [0.1 + 0.2, None, 1e-300],
            "flags": [['ST"UCK', "back\\slash", "with,comma", "NULL"], [], None],
            "source": ["", None, "ünïcode"],
        },
    )
    writer.write(rows)
    got = fetch_readings(pg, node)
    assert got[0][2] == 0.1 + 0.2 and got[2][2] == 1e-300 and got[1][2] is None
    flags_i = list(SCHEMAS["readings"]).index("flags")
    source_i = flags_i + 2
    assert got[0][flags_i] == ['ST"UCK', "back\\slash", "with,comma", "NULL"]
    assert got[1][flags_i] == []
    assert got[2][flags_i] is None
    assert [r[source_i] for r in got] == ["", None, "ünïcode"]
    assert got[0][1].utcoffset().total_seconds() == 0
    assert int(got[1][1].timestamp() * US_PER_S) == T0 + 1
    # NaN written straight from a frame (not via tables.frame) stays NaN
    raw = rows.frame.head(1).with_columns(flow_rate=float("nan"))
    writer.write(type(rows)("readings", raw))
    assert math.isnan(fetch_readings(pg, node)[0][2])


def test_nodes_keep_known_values_and_ingest_runs_replace(writer, pg):
    node = uid()
    writer.write(
        frame(
            "nodes",
            {"node_id": [node], "name": ["A"], "district": ["D1"], "lat": [39.2], "lon": [9.1]},
        )
    )
    writer.write(frame("nodes", {"node_id": [node], "name": ["A2"], "source": ["x.csv"]}))
    row = pg.execute(
        "SELECT name, district, lat, lon, source FROM water.nodes WHERE node_id = %s", (node,)
    ).fetchone()
    assert row == ("A2", "D1", 39.2, 9.1, "x.csv")

    run = uid()
    writer.write(frame("ingest_runs", {"run_id": [run], "rows_in": [10], "late": [3],
                                       "status": ["running"]}))
    writer.write(frame("ingest_runs", {"run_id": [run], "rows_in": [12], "accepted": [12],
                                       "status": ["running"]}))
    row = pg.execute(
        "SELECT rows_in, accepted, late FROM water.ingest_runs WHERE run_id = %s", (run,)
    ).fetchone()
    assert row == (12, 12, None)


def test_every_contract_table_accepts_its_frame(writer, pg):
    node = uid()
    data = {
        "kpi_15m": {"node_id": [node], "window_start": [T0], "n": [3], "pressure_avg": [3.1]},
        "kpi_daily": {"node_id": [node], "day": [datetime.date(2023, 11, 14)], "mnf": [0.4]},
        "anomalies": {"anomaly_id": [node], "node_id": [node], "started_at": [T0]},
        "quarantine": {"id": [node], "raw": ["x;y"], "reason": ["parse"], "received_at": [T0]},
    }
    for table, cols in data.items():
        writer.write(frame(table, cols))
        (n,) = pg.execute(
            f"SELECT count(*) FROM water.{table} WHERE {KEYS[table][0]} = %s", (node,)
        ).fetchone()
        assert n == 1, table
    assert all(f"{m}_std" in SCHEMAS["kpi_15m"] for m in MEASUREMENTS)


def test_bad_rows_raise_with_table_and_count(writer):
    rows = frame("readings", {"node_id": [None, "x"], "ts": [T0, T0]})
    with pytest.raises(RuntimeError, match=r"2 rows to water\.readings"):
        writer.write(rows)
    writer.write(readings_rows(uid()))  # the connection is usable afterwards


def test_lost_connection_is_retried(writer, pg):
    node = uid()
    writer.write(readings_rows(node, n=1))
    pid = writer._conn.info.backend_pid
    pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
    writer.write(readings_rows(node, n=3))
    assert len(fetch_readings(pg, node)) == 3
    assert writer._conn.info.backend_pid != pid


def test_connection_refused_gives_up_with_context():
    w = WarmPostgresWriter(
        "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", attempts=2, backoff_s=0.01
    )
    with pytest.raises(RuntimeError, match=r"5 rows to water\.readings failed after 2 attempts"):
        w.write(readings_rows(uid()))
    w.close()


def test_roles_reader_selects_only_writer_writes(conninfo_as, pg):
    roles = {r[0] for r in pg.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'water_%'")}
    if roles != {"water_reader", "water_writer"}:
        # the session user is a superuser on the build machines, so this must not happen there
        pytest.fail(f"migration 0002 did not create the roles: found {roles}")
    node = uid()
    writer = WarmPostgresWriter(conninfo_as("water_writer"))
    try:
        writer.write(readings_rows(node, n=2))
        writer.write(readings_rows(node, n=2, pressure=[1.0, 2.0]))
    finally:
        writer.close()
    with psycopg.connect(conninfo_as("water_reader"), autocommit=True) as reader:
        (n,) = reader.execute(
            "SELECT count(*) FROM water.readings WHERE node_id = %s", (node,)
        ).fetchone()
        assert n == 2
        reader.execute("SELECT count(*) FROM water.forecast_selected")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("INSERT INTO water.nodes (node_id) VALUES (%s)", (node,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("DELETE FROM water.readings")
    # the writer cannot change the schema: migrate with everything applied only reads
    assert migrate(conninfo_as("water_writer")) == []


def test_forecast_selected_picks_lowest_mae(pg):
    node = uid()
    issued = "2024-01-10T00:00:00Z"
    for model, yhat in (("baseline", 1.0), ("river", 2.0)):
        pg.execute(
            "INSERT INTO water.forecasts VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (node, issued, "2024-01-10T01:00:00Z", model, yhat, yhat - 0.5, yhat + 0.5),
        )
    for model, mae in (("baseline", 0.9), ("river", 0.3)):
        pg.execute(
            "INSERT INTO water.forecast_accuracy VALUES (%s, %s, 24, %s, %s, 0.1, 96)",
            (node, model, "2024-01-09T00:00:00Z", mae),
        )
    # accuracy measured after the issue time must not influence the choice
    pg.execute(
        "INSERT INTO water.forecast_accuracy VALUES (%s, 'baseline', 24, %s, 0.0, 0.0, 10000)",
        (node, "2024-01-11T00:00:00Z"),
    )
    rows = pg.execute(
        "SELECT model, yhat FROM water.forecast_selected WHERE node_id = %s", (node,)
    ).fetchall()
    assert rows == [("river", 2.0)]


def test_binary_copy_stores_what_csv_stores(pg, monkeypatch):
    import numpy as np
    import polars as pl

    from connectors.warm_postgres import copy_binary, copy_chunks

    monkeypatch.setattr(warm_postgres, "BINARY_MIN_ROWS", 1)
    monkeypatch.setattr(warm_postgres, "BINARY_MAX_PARTS", 99)
    neg_nan = np.frombuffer(b"\xff\xf8" + bytes(6), ">f8")[0].item()  # what 0/0 gives on x86
    floats = [0.1 + 0.2, -0.0, float("inf"), float("-inf"), float("nan"), neg_nan, 5e-324, None]
    n = len(floats)
    data = pl.DataFrame(
        {
            "t": ["", None, 'ü,"q"\\', "a\x00b", "x\ny", "NULL", "\\N", "z"],
            "ts": [T0, None, -T0, 0, 1, T0 + 123_456, 946_684_800 * US_PER_S, T0],
            "d": [datetime.date(2024, 2, 29), None, datetime.date(1969, 12, 31),
                  datetime.date(2000, 1, 1), datetime.date(1999, 12, 31)] + [None] * 3,
            "b": [True, False, None] * 2 + [True, True],
            "n": [0, -1, 2**62, None, 7, -(2**62), 1, 2],
            "x": floats,
            "y": [float(i) for i in range(n)],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    types = {"t": "text", "ts": "timestamp with time zone", "d": "date", "b": "boolean",
             "n": "bigint", "x": "double precision", "y": "double precision"}
    cols = ", ".join(f"{c} {t}" for c, t in types.items())
    binary = copy_binary(data, types, rows_per_chunk=3)  # chunks of 3 rows: 3, 3, 2
    assert binary is not None
    with pg.transaction():
        pg.execute(f"CREATE TEMPORARY TABLE via_csv (i serial, {cols})")
        pg.execute(f"CREATE TEMPORARY TABLE via_binary (i serial, {cols})")
        names = ", ".join(types)
        with pg.cursor().copy(f"COPY via_csv ({names}) FROM STDIN (FORMAT csv)") as cp:
            for chunk in copy_chunks(data):
                cp.write(chunk)
        with pg.cursor().copy(f"COPY via_binary ({names}) FROM STDIN (FORMAT binary)") as cp:
            for chunk in binary:
                cp.write(chunk)
        # Bit for bit: floats by their send form (NaN's bits too), the rest as text.
        row = "t, ts, d, b, n, float8send(x), float8send(y)"
        got = [pg.execute(f"SELECT {row} FROM {t} ORDER BY i").fetchall()
               for t in ("via_csv", "via_binary")]
    assert got[0] == got[1]
    assert len(got[0]) == n and got[0][3][0] == "a\\x00b" and got[0][1][0] is None
    # Not for small frames, nor for column types it has no exact binary form of.
    monkeypatch.setattr(warm_postgres, "BINARY_MIN_ROWS", 1_000)
    assert copy_binary(data, types) is None
    monkeypatch.setattr(warm_postgres, "BINARY_MIN_ROWS", 1)
    assert copy_binary(data, dict(types, n="integer")) is None
    assert copy_binary(data.with_columns(pl.col("y").cast(pl.Float32)), types) is None
