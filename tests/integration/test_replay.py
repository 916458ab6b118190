"""`waterflow replay` end to end: real PostgreSQL and Redis, Parquet archive, all formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import psycopg
import pytest
import redis
from psycopg import sql

from dataflows.cli import main
from tests.integration.conftest import REDIS_URL, fresh_database, hot_prefixes

pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[1] / "data"
SAMPLES = Path(__file__).parents[2] / "dataflows" / "samples"
BWDF = SAMPLES / "bwdf_dma_inflows_excerpt_2021-10.csv"
TABLES = ("nodes", "readings", "kpi_15m", "kpi_daily", "anomalies", "quarantine")


@pytest.fixture
def replay_env(tmp_path):
    """A database of its own, a Redis key prefix of its own, a Parquet folder; cleaned up."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in DATA.glob("*.csv"):
        shutil.copy(f, inputs)
    shutil.copy(BWDF, inputs)
    with hot_prefixes(REDIS_URL, 1) as (prefix,), fresh_database("waterflow_replay") as url:
        args = [
            "replay", str(inputs), "--quiet", "--now", "2026-01-01T00:00:00+00:00",
            "--warm", url, "--hot", REDIS_URL,
            "--hot-prefix", prefix, "--cold", (tmp_path / "cold").as_uri(),
            "--out", str(tmp_path / "out"),
        ]
        yield args, url, prefix, tmp_path / "cold"


def _counts(conn):
    return {
        t: conn.execute(sql.SQL("SELECT count(*) FROM water.{}").format(sql.Identifier(t)))
        .fetchone()[0]
        for t in TABLES
    }


def test_replay_of_every_format_reconciles_and_fills_the_contract(replay_env, capsys):
    args, url, prefix, cold = replay_env
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reconciled" in out

    with psycopg.connect(url) as conn:
        run = conn.execute(
            "SELECT rows_in, accepted, quarantined, duplicates, values_quarantined"
            " FROM water.ingest_runs"
        ).fetchall()
        assert len(run) == 1
        rows_in, accepted, quarantined, duplicates, values_q = run[0]
        # canonical 24 + Hidroconta 1008 + Selargius 336 rows x 4 nodes + hostile 15
        # + BWDF excerpt (its non-empty (row, DMA) cells), counted from the file itself
        bwdf = pl.read_csv(BWDF, infer_schema_length=0)
        bwdf_readings = sum(
            bwdf[c].str.len_chars().fill_null(0).gt(0).sum() for c in bwdf.columns[1:]
        )
        assert rows_in == 24 + 1008 + 1344 + 15 + bwdf_readings
        assert (quarantined, duplicates, values_q) == (6, 1, 2)  # all from the hostile file
        assert accepted == rows_in - quarantined - duplicates
        (stored,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
        assert stored == accepted

        reasons = dict(
            conn.execute("SELECT reason, count(*) FROM water.quarantine GROUP BY 1").fetchall()
        )
        assert reasons == {
            "conflict": 1, "parse_error": 1, "bad_timestamp": 1, "future_timestamp": 1,
            "non_finite": 2, "out_of_range:pressure": 1, "missing_field": 1,
        }
        raws = [r for (r,) in conn.execute(
            "SELECT raw FROM water.quarantine WHERE reason = 'parse_error' ORDER BY line")]
        assert raws == ["this is not a csv line at all"]
        # a row that left off its trailing empty fields keeps the values it carries
        assert conn.execute(
            "SELECT flow_rate, pressure FROM water.readings WHERE node_id = 'HST-001'"
            " AND ts = '2024-11-13T05:10:00Z'").fetchone() == (12.5, None)
        # hostile node ids are data, not SQL
        ids = {n for (n,) in conn.execute("SELECT node_id FROM water.nodes")}
        assert {"x'; DROP TABLE water.readings;--", "nodo-àèì-水", "HST-001"} <= ids

        # local time: Selargius 13/11/2024 06:00 CET = 05:00Z; M3/H / 3.6 = L/s
        first = conn.execute(
            "SELECT ts::text, flow_rate, level FROM water.readings"
            " WHERE node_id = 'selargius-serbatoio-selargius' ORDER BY ts LIMIT 1"
        ).fetchone()
        assert first[0] == "2024-11-13 05:00:00+00"
        assert first[1] == pytest.approx(38.80 / 3.6)
        assert first[2] == pytest.approx(3.20)
        # Hidroconta 2023/06/11 00:00 CEST = 2023-06-10 22:00Z, pressure 3,41 bar
        assert conn.execute(
            "SELECT ts::text, pressure FROM water.readings"
            " WHERE node_id = 'teatinos-pcr-4-entrada' ORDER BY ts LIMIT 1"
        ).fetchone() == ("2023-06-10 22:00:00+00", pytest.approx(3.41))
        # BWDF: the repeated 02:00 of 31/10/2021 is two instants, CEST then CET
        dst = conn.execute(
            "SELECT ts::text, flow_rate FROM water.readings WHERE node_id = 'dma-1'"
            " AND ts BETWEEN '2021-10-30 23:00Z' AND '2021-10-31 02:00Z' ORDER BY ts"
        ).fetchall()
        assert dst == [
            ("2021-10-30 23:00:00+00", pytest.approx(6.6825)),
            ("2021-10-31 00:00:00+00", pytest.approx(6.55)),
            ("2021-10-31 01:00:00+00", pytest.approx(6.4825)),
            ("2021-10-31 02:00:00+00", pytest.approx(6.225)),
        ]
        # KPIs: Selargius via Sant'Anna has a totalizer; the daily volume is its increase
        day = conn.execute(
            "SELECT n, volume_m3, mnf FROM water.kpi_daily"
            " WHERE node_id = 'selargius-nodo-via-sant-anna' AND day = '2024-11-14'"
        ).fetchone()
        assert day[0] == 48
        assert day[1] > 0 and day[2] > 0
        counts = _counts(conn)
        assert all(counts[t] > 0 for t in ("nodes", "readings", "kpi_15m", "kpi_daily"))

    r = redis.from_url(REDIS_URL, decode_responses=True)
    latest = r.hgetall(f"{prefix}node:dma-1:latest")
    assert latest["ts"].startswith("2021-11-07T22:00:00")  # 07/11/2021 23:00 CET, the last row
    assert 0 < r.ttl(f"{prefix}node:dma-1:latest") <= 48 * 3600
    assert r.zscore(f"{prefix}nodes:last_seen", "dma-1") is not None

    parquet = pl.read_parquet(cold / "readings" / "**" / "*.parquet", hive_partitioning=False)
    assert parquet.height == accepted


def test_replaying_the_same_files_twice_leaves_the_same_rows(replay_env):
    args, url, _, cold = replay_env
    assert main(args) == 0
    with psycopg.connect(url) as conn:
        before = _counts(conn)
        sums = conn.execute(
            "SELECT sum(flow_rate), sum(anomaly_score) FROM water.readings"
        ).fetchone()
    parquet = cold / "readings" / "**" / "*.parquet"
    archived = pl.read_parquet(parquet, hive_partitioning=False).sort("node_id", "ts")
    days = sorted(p.parent.name for p in cold.rglob("*.parquet"))
    assert len(days) == len(set(days))  # one file a day once the replay closed its writer
    assert main(args) == 0
    with psycopg.connect(url) as conn:
        assert _counts(conn) == before
        assert conn.execute(
            "SELECT sum(flow_rate), sum(anomaly_score) FROM water.readings"
        ).fetchone() == sums
        (runs,) = conn.execute("SELECT count(*) FROM water.ingest_runs").fetchone()
        assert runs == 2  # each run is recorded; the data tables are not doubled
    # The second replay's rows replaced the first's (its run_id), each reading once a day.
    assert sorted(p.parent.name for p in cold.rglob("*.parquet")) == days
    again = pl.read_parquet(parquet, hive_partitioning=False).sort("node_id", "ts")
    assert again.drop("run_id").equals(archived.drop("run_id"))
    assert again["run_id"].n_unique() == 1 and again["run_id"][0] != archived["run_id"][0]


def test_sample_network_replay_fills_the_district_balance(replay_env):
    args, url, _, _ = replay_env
    sample = str(SAMPLES / "simulated_2districts_7days.csv")
    args = [args[0], sample, "--network", str(SAMPLES / "network.toml"), *args[2:]]
    assert main(args) == 0
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT district, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY nrw)"
            " FROM water.district_balance WHERE period = 'day' GROUP BY 1 ORDER BY 1"
        ).fetchall()
        names = dict(conn.execute("SELECT node_id, district FROM water.nodes").fetchall())
    # two districts, 7 local days each; the simulator leaks 8-15 % of the inflow
    assert [(d, n) for d, n, _ in rows] == [("d1", 7), ("d2", 7)]
    assert all(0.05 < median < 0.2 for _, _, median in rows)
    assert names["d1-inflow"] == "d1"  # the topology's districts reach the nodes table


def test_embedded_replay_stops_its_servers_unless_asked_to_keep_them(capsys):
    import tempfile

    from connectors.embedded import stop_embedded

    # pgserver runs PostgreSQL as another user under root: the folder must be reachable
    out = Path(tempfile.mkdtemp(prefix="waterflow-embedded-"))
    out.chmod(0o755)
    try:
        sample = str(DATA / "canonical_example.csv")
        env_free = ["--warm", "", "--hot", "", "--cold", ""]  # ignore WATERFLOW_*_URL here
        assert main(["replay", sample, "--quiet", "--out", str(out), *env_free]) == 0
        assert not (out / "pg" / "postmaster.pid").exists()
        assert "24 readings in" in capsys.readouterr().out
        keep = ["--keep-serving", *env_free]
        assert main(["replay", sample, "--quiet", "--out", str(out), *keep]) == 0
        pid_file = out / "pg" / "postmaster.pid"
        assert pid_file.exists()
        # the data of the first replay is still there: the same rows, upserted
        url = f"postgresql://postgres:@/postgres?host={out / 'pg'}"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM water.readings").fetchone() == (24,)
            assert conn.execute("SELECT count(*) FROM water.ingest_runs").fetchone() == (2,)
    finally:
        stop_embedded(out)
        shutil.rmtree(out, ignore_errors=True)
