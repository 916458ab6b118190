"""Disaster recovery: the three tiers agree after a replay, and `waterflow backfill` rebuilds
the warm tier from the cold one (Parquet archive or BigQuery) to the same query results.

One module-wide replay of dataflows/samples/ (real PostgreSQL, Redis, BigQuery emulator),
then each backfill test drops schema ``water``, migrates and backfills into the same database.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import polars as pl
import psycopg
import pytest
import redis
from polars.testing import assert_frame_equal
from psycopg import sql

from connectors.cold_bigquery import BigQueryTarget, make_client
from connectors.cold_parquet import read_readings
from dataflows.cli import main
from tests.integration.conftest import PG_ADMIN_URL, REDIS_URL, bigquery_count, url_with

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).parents[2] / "dataflows" / "samples"
NETWORK = SAMPLES / "network.toml"
#: Each table's query, ordered by its key; floats compared to 1e-9 relative (see _compare).
SNAPSHOT = {
    "readings": "SELECT * FROM water.readings ORDER BY node_id, ts",
    "kpi_15m": "SELECT * FROM water.kpi_15m ORDER BY node_id, window_start",
    "kpi_daily": "SELECT * FROM water.kpi_daily ORDER BY node_id, day",
    "anomalies": "SELECT * FROM water.anomalies ORDER BY anomaly_id",
    "district_balance":
        "SELECT * FROM water.district_balance ORDER BY district, period, period_start",
    "nodes": "SELECT node_id, district, role FROM water.nodes ORDER BY node_id",
    "per_node": """
        SELECT r.node_id, count(*) AS n, sum(r.flow_rate) AS flow, sum(r.pressure) AS pressure,
               sum(r.quality) AS quality, sum(r.anomaly_score) AS score,
               sum(cardinality(r.flags)) AS flags,
               (SELECT sum(k.volume_m3) FROM water.kpi_15m k WHERE k.node_id = r.node_id) AS vol,
               (SELECT sum(d.mnf) FROM water.kpi_daily d WHERE d.node_id = r.node_id) AS mnf
        FROM water.readings r GROUP BY r.node_id ORDER BY r.node_id""",
}


def snapshot(url: str) -> dict[str, pl.DataFrame]:
    with psycopg.connect(url) as conn:
        out = {}
        for name, query in SNAPSHOT.items():
            cur = conn.execute(query)
            cols = [d.name for d in cur.description]
            out[name] = pl.DataFrame(
                cur.fetchall(), schema=cols, orient="row", infer_schema_length=None
            )
        return out


def compare(
    before: dict[str, pl.DataFrame], after: dict[str, pl.DataFrame], tables: tuple[str, ...]
) -> None:
    """Readings exactly; recomputed aggregates to 1e-9 relative (float sums in another order)."""
    for name in tables:
        assert before[name].height > 0, f"{name}: the replay left no rows to compare"
        try:
            assert_frame_equal(
                after[name], before[name], check_exact=name == "readings", rel_tol=1e-9,
                abs_tol=1e-9,
            )
        except AssertionError as exc:
            raise AssertionError(f"{name} differs after the backfill: {exc}") from None


@pytest.fixture(scope="module")
def replayed(bigquery_endpoint, tmp_path_factory):
    """The samples replayed with --cold bigquery://..., then again with --cold file://..."""
    name = f"waterflow_backfill_{uuid.uuid4().hex[:10]}"
    dataset = f"waterflow_backfill_{uuid.uuid4().hex[:10]}"
    prefix = f"water:test-{uuid.uuid4().hex[:8]}:"
    tmp = tmp_path_factory.mktemp("backfill")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    warm = url_with(PG_ADMIN_URL, dbname=name)
    bq = f"bigquery://local/{dataset}"
    cold = (tmp / "cold").as_uri()

    def replay(cold_url: str) -> None:
        args = [
            "replay", str(SAMPLES), "--network", str(NETWORK), "--quiet",
            "--warm", warm, "--hot", REDIS_URL, "--hot-prefix", prefix,
            "--cold", cold_url, "--out", str(tmp / "out"),
        ]
        assert main(args) == 0

    try:
        replay(bq)
        # Each cold tier holds the run_id of the replay that wrote it: compare with its own.
        after_bigquery = snapshot(warm)
        replay(cold)
        yield {
            "warm": warm,
            "bigquery": bq,
            "cold": cold,
            "snapshot_bigquery": after_bigquery,
            "snapshot_cold": snapshot(warm),
        }
    finally:
        r = redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=prefix + "*"))
        if keys:
            r.delete(*keys)
        client = make_client(BigQueryTarget("local", dataset))
        try:
            client.delete_dataset(dataset, delete_contents=True, not_found_ok=True, timeout=30)
        finally:
            client.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_the_three_tiers_agree_on_counts(replayed):
    warm_count = replayed["snapshot_cold"]["readings"].height
    archived = sum(f.height for f in read_readings(replayed["cold"], 0, 2**62))
    assert warm_count > 20_000
    # The second replay (same files, Parquet cold tier) upserted the same readings.
    assert replayed["snapshot_bigquery"]["readings"].height == warm_count
    assert bigquery_count(replayed["bigquery"]) == warm_count
    assert archived == warm_count


WHOLE_CENTURY = ("--since", "2000-01-01", "--until", "2100-01-01")


def _drop_migrate_backfill(warm: str, cold: str, capsys, bounds=WHOLE_CENTURY) -> str:
    with psycopg.connect(warm, autocommit=True) as conn:
        conn.execute("DROP SCHEMA water CASCADE")
    assert main(["db", "migrate", "--warm", warm]) == 0
    with psycopg.connect(warm) as conn:
        (n,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
    assert n == 0
    capsys.readouterr()
    args = [
        "backfill", "--from", cold, *bounds, "--warm", warm, "--network", str(NETWORK),
    ]
    assert main(args) == 0
    return capsys.readouterr().err


#: Every query but the anomalies (compared on their own below).
REBUILT = tuple(t for t in SNAPSHOT if t != "anomalies")


@pytest.mark.parametrize("tier", ["cold", "bigquery"])
def test_backfill_rebuilds_the_warm_tier_to_the_same_query_results(replayed, tier, capsys):
    # No --since/--until: the whole archive, from year 1 to 9999 (BigQuery's TIMESTAMP range).
    err = _drop_migrate_backfill(replayed["warm"], replayed[tier], capsys, bounds=())
    # Anomaly scores recomputed on the archive equal the archived ones (to 1e-9) for every
    # node, so the anomalies were rebuilt too (the CLI warns about any node where not).
    assert "anomalies not rebuilt" not in err
    compare(replayed[f"snapshot_{tier}"], snapshot(replayed["warm"]), REBUILT)


def test_backfilled_anomalies_equal_the_pipeline_ones(replayed, capsys):
    _drop_migrate_backfill(replayed["warm"], replayed["cold"], capsys)
    compare(replayed["snapshot_cold"], snapshot(replayed["warm"]), ("anomalies",))


def test_backfill_twice_leaves_the_same_rows(replayed, capsys):
    warm = replayed["warm"]
    _drop_migrate_backfill(warm, replayed["cold"], capsys)
    args = [
        "backfill", "--from", replayed["cold"], "--since", "2000-01-01T00:00:00Z",
        "--until", "2100-01-01T00:00:00+00:00", "--warm", warm, "--network", str(NETWORK),
    ]
    assert main(args) == 0
    compare(replayed["snapshot_cold"], snapshot(warm), REBUILT)


def test_backfill_refuses_bad_arguments(replayed, capsys):
    with pytest.raises(SystemExit):
        main(["backfill", "--from", replayed["cold"], "--since", "2024-01-01T00:00",
              "--until", "2025-01-01"])
    assert "UTC offset" in capsys.readouterr().err
    assert main(["backfill", "--from", replayed["cold"], "--since", "2025-01-01",
                 "--until", "2024-01-01", "--warm", replayed["warm"]]) == 2
