"""TierSink in a real Bytewax flow, writing to the real PostgreSQL and Redis and to Parquet."""

from __future__ import annotations

import bytewax.operators as op
import psycopg
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main

from connectors.tier_sink import TierSink
from connectors.tiers import WARM_SIDE_TABLES, TierConfig, close_all, open_writers
from dataflows.model import US_PER_S
from dataflows.rows import RunCounts, run_rows
from dataflows.tables import SCHEMAS, frame

pytestmark = pytest.mark.integration

T0 = 1_700_000_000 * US_PER_S


@pytest.mark.parametrize("overlap", [False, True])
def test_tier_sink_writes_every_tier(warm_url, redis_url, redis_prefix, rdb, tmp_path, overlap):
    config = TierConfig(
        warm_url, redis_url, (tmp_path / "cold").as_uri(), tmp_path, hot_prefix=redis_prefix
    )
    node = redis_prefix.split(":")[1]  # unique per test, so the shared database stays clean
    items = [
        frame("nodes", {"node_id": [node], "name": ["Node"], "district": ["D"]}),
        frame(
            "readings",
            {
                "node_id": [node] * 3,
                "ts": [T0, T0 + 300 * US_PER_S, T0 + 600 * US_PER_S],
                "flow_rate": [1.0, 1.5, 2.0],
                "flags": [[], ["LATE"], []],
                "source": ["t.csv"] * 3,
            },
        ),
        frame("anomalies", {"anomaly_id": [node], "node_id": [node], "started_at": [T0]}),
    ]
    flow = Dataflow("tier_sink_test")
    rows = op.input("rows", flow, TestingSource(items))  # TableRows
    op.output("tiers", rows, TierSink(config, overlap))
    run_main(flow)
    run_main(flow)  # a replay writes the same again: nothing doubles

    with psycopg.connect(warm_url) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM water.readings WHERE node_id = %s", (node,)
        ).fetchone()
        (d,) = conn.execute(
            "SELECT district FROM water.nodes WHERE node_id = %s", (node,)
        ).fetchone()
    assert (n, d) == (3, "D")
    assert rdb.zcard(f"{redis_prefix}node:{node}:readings") == 3
    assert rdb.hget(f"{redis_prefix}node:{node}:latest", "flow_rate") == "2.0"
    assert rdb.hexists(f"{redis_prefix}anomalies:active", node)
    parts = list((tmp_path / "cold" / "readings").rglob("*.parquet"))
    assert len(parts) == 1 and parts[0].parent.name == "date=2023-11-14"


def test_open_writers_fails_early_on_a_bad_bigquery_url(warm_url, redis_url, tmp_path):
    config = TierConfig(warm_url, redis_url, "bigquery://p/not-a-dataset", tmp_path)
    with pytest.raises(ValueError, match="not-a-dataset"):
        open_writers(config)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_write_stops_the_flow(warm_url, redis_url, redis_prefix, tmp_path, overlap):
    """A row the warm tier refuses fails the flow, whether writes overlap computing or not.

    With batches in flight (overlap), the failure may surface when the sink closes.
    """
    node = redis_prefix.split(":")[1]
    items = [
        frame("nodes", {"node_id": [node], "name": ["Node"], "district": ["D"]}),
        frame("nodes", {"node_id": [None], "name": ["No id"], "district": ["D"]}),
        frame("nodes", {"node_id": [node + "-after"], "name": ["Node"], "district": ["D"]}),
    ]
    config = TierConfig(
        warm_url, redis_url, (tmp_path / "cold").as_uri(), tmp_path, hot_prefix=redis_prefix
    )
    flow = Dataflow("tier_sink_failure")
    op.output("tiers", op.input("rows", flow, TestingSource(items)), TierSink(config, overlap))
    failing = "error (writing output batch|closing StatelessSinkPartition)"
    with pytest.raises(Exception, match=failing) as failed:
        run_main(flow)
    causes, cause = [], failed.value
    while cause is not None:  # Bytewax wraps the writer's error
        causes.append(str(cause))
        cause = cause.__cause__
    assert any("not-null constraint" in c for c in causes), causes


@pytest.mark.parametrize("overlap", [False, True])
def test_no_batch_is_written_after_a_failed_one(warm_url, redis_url, redis_prefix, tmp_path,
                                                overlap):
    """With batches in flight, the tier that failed writes none of the later ones."""
    node = redis_prefix.split(":")[1]
    items = [
        frame("nodes", {"node_id": [None], "name": ["No id"], "district": ["D"]}),
        frame("nodes", {"node_id": [node + "-1"], "name": ["Node"], "district": ["D"]}),
        frame("nodes", {"node_id": [node + "-2"], "name": ["Node"], "district": ["D"]}),
    ]
    config = TierConfig(
        warm_url, redis_url, (tmp_path / "cold").as_uri(), tmp_path, hot_prefix=redis_prefix
    )
    _run_failing("tier_sink_failure_first", items, TierSink(config, overlap))
    assert _count(warm_url, "SELECT count(*) FROM water.nodes WHERE node_id LIKE %s",
                  node + "-%") == 0


def _run_failing(name: str, items: list, sink: TierSink) -> None:
    """The items through ``sink`` in a flow that must fail (with overlap, maybe at close)."""
    flow = Dataflow(name)
    op.output("tiers", op.input("rows", flow, TestingSource(items)), sink)
    with pytest.raises(Exception, match="error (writing output batch|closing)"):
        run_main(flow)


def _count(warm_url: str, query: str, arg: str) -> int:
    with psycopg.connect(warm_url) as conn:
        (n,) = conn.execute(query, (arg,)).fetchone()
    return n


def test_two_warm_lanes_take_every_table_once(warm_url, redis_url, redis_prefix, tmp_path):
    config = TierConfig(
        warm_url, redis_url, (tmp_path / "cold").as_uri(), tmp_path, hot_prefix=redis_prefix
    )
    writers = open_writers(config, warm_lanes=2)
    try:
        lanes = [w for w in writers if w.name == "warm"]
        assert len(lanes) == 2
        assert [w.tables for w in lanes] == [  # type: ignore[attr-defined]
            frozenset(SCHEMAS) - WARM_SIDE_TABLES, WARM_SIDE_TABLES]
        assert all(getattr(w, "tables", None) is None for w in writers if w.name != "warm")
    finally:
        close_all(writers)
    single = open_writers(config)  # live flows: one connection per worker
    try:
        assert [w.name for w in single].count("warm") == 1
    finally:
        close_all(single)
    with pytest.raises(ValueError, match="warm_lanes"):
        open_writers(config, warm_lanes=3)


def test_the_run_row_waits_for_the_rows_it_counts(warm_url, redis_url, redis_prefix, tmp_path):
    """With batches in flight on two warm lanes, a run row after a failed batch is not stored.

    The readings go to the second lane and fail (no node id); the run's row, one batch later on
    the first lane, would otherwise commit beside them while they are still being written.
    """
    node = redis_prefix.split(":")[1]
    run_id = f"run-{node}"
    items = [
        frame("readings", {"node_id": [None], "ts": [T0], "flow_rate": [1.0], "flags": [[]],
                           "source": ["t.csv"]}),
        run_rows(run_id, "t.csv", T0, T0, RunCounts(rows_in=1, accepted=1)),
    ]
    config = TierConfig(
        warm_url, redis_url, (tmp_path / "cold").as_uri(), tmp_path, hot_prefix=redis_prefix
    )
    _run_failing("tier_sink_run_row", items, TierSink(config, True))
    assert _count(warm_url, "SELECT count(*) FROM water.ingest_runs WHERE run_id = %s",
                  run_id) == 0


def test_the_run_row_is_stored_after_its_batch(warm_url, redis_url, redis_prefix, tmp_path):
    """The same with rows that store: the run row and the rows it counts are all there."""
    node = redis_prefix.split(":")[1]
    run_id = f"run-{node}"
    readings = frame("readings", {"node_id": [node], "ts": [T0], "flow_rate": [1.0],
                                  "flags": [[]], "source": ["t.csv"]})
    run = run_rows(run_id, "t.csv", T0, T0, RunCounts(rows_in=1, accepted=1))
    config = TierConfig(
        warm_url, redis_url, (tmp_path / "cold").as_uri(), tmp_path, hot_prefix=redis_prefix
    )
    flow = Dataflow("tier_sink_run_row_stored")
    source = TestingSource([readings, run, readings], batch_size=2)  # a run row mid-batch
    op.output("tiers", op.input("rows", flow, source), TierSink(config, True))
    run_main(flow)
    assert _count(warm_url, "SELECT accepted FROM water.ingest_runs WHERE run_id = %s",
                  run_id) == 1
    assert _count(warm_url, "SELECT count(*) FROM water.readings WHERE node_id = %s", node) == 1
