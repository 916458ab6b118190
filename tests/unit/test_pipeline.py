"""The whole flow on hand-made chunks, with Bytewax's TestingSource and TestingSink."""

import pickle
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from dataflows import pipeline
from dataflows.model import COL, NodeInfo, ParsedChunk, Quarantined, ReadingBatch, empty_values
from dataflows.pipeline import build_flow
from dataflows.settings import Settings
from dataflows.tables import KEYS

T0 = 1_731_456_000_000_000  # 2024-11-13T00:00:00Z in µs
STEP = 300 * 1_000_000


def _node_batch(node_id, start, n, flow, pressure, line0=2):
    values = empty_values(n)
    values[:, COL["flow_rate"]] = flow
    values[:, COL["pressure"]] = pressure
    return ReadingBatch(
        node_id=node_id,
        source="test.csv",
        ts=T0 + (start + np.arange(n, dtype=np.int64)) * STEP,
        values=values,
        line=np.arange(line0, line0 + n, dtype=np.int64),
    )


def _chunks():
    rng = np.random.default_rng(3)
    first = ParsedChunk(
        source="test.csv",
        batches=[
            _node_batch("a", 0, 144, 10 + rng.normal(0, 0.2, 144), 3.5),
            _node_batch("b", 0, 144, 5 + rng.normal(0, 0.1, 144), 4.0),
        ],
        quarantined=[Quarantined("test.csv", 999, "garbage;;", "parse_error")],
        nodes=[NodeInfo("a", "Node A", "test.csv"), NodeInfo("b", "Node B", "test.csv")],
    )
    dup = _node_batch("a", 143, 1, first.batches[0].values[143, COL["flow_rate"]], 3.5, 300)
    bad = _node_batch("b", 144, 2, [5.0, 5.1], [99.0, 4.0], 301)  # pressure 99 bar: out of range
    second = ParsedChunk(source="test.csv", batches=[dup, bad])
    return [first, second]


def _run(chunks, workers=1, snapshots=True, **settings):
    out = []
    flow = build_flow(
        TestingSource(chunks),
        TestingSink(out),
        Settings(run_id="t", now_us=T0 + 10 * 86_400_000_000, **settings),
        snapshots=snapshots,
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    tables = {}
    for rows in out:
        tables.setdefault(rows.table, []).append(rows.frame)
    return {name: pl.concat(frames) for name, frames in tables.items()}


def test_ledger_reconciles_with_exact_counts():
    tables = _run(_chunks())
    run = tables["ingest_runs"].row(0, named=True)
    # 288 + 1 parse error + 1 duplicate + 2 = 292 readings in
    assert run["rows_in"] == 292
    assert run["duplicates"] == 1
    assert run["quarantined"] == 1  # the garbage line; the bad pressure is one value only
    assert run["accepted"] == 290
    assert run["values_quarantined"] == 1
    assert run["rows_in"] == run["accepted"] + run["quarantined"] + run["duplicates"]


def test_readings_quarantine_and_kpis_are_emitted():
    tables = _run(_chunks())
    readings = tables["readings"]
    assert readings.height == 290
    assert readings.filter(pl.col("node_id") == "b")["pressure"].null_count() == 1
    assert readings["anomaly_score"].is_between(0, 1).all()
    assert readings["quality"].is_between(0, 1).all()
    reasons = sorted(tables["quarantine"]["reason"].to_list())
    assert reasons == ["out_of_range:pressure", "parse_error"]
    kpi = tables["kpi_15m"].unique(subset=["node_id", "window_start"], keep="last")
    # 12 h of 5-minute data per node = 48 windows, plus the window of b's two extra readings
    assert kpi.filter(pl.col("node_id") == "a").height == 48
    assert kpi.filter(pl.col("node_id") == "b").height == 49
    first = kpi.filter(pl.col("node_id") == "b").sort("window_start").row(0, named=True)
    assert first["n"] == 3
    assert first["pressure_avg"] == pytest.approx(4.0)
    assert set(tables["nodes"]["node_id"]) == {"a", "b"}


def test_output_does_not_depend_on_worker_count():
    one = _run(_chunks(), workers=1)
    two = _run(_chunks(), workers=2)
    key = ["node_id", "ts"]
    cols = ["node_id", "ts", "flow_rate", "pressure", "quality", "flags", "anomaly_score"]
    assert one["readings"].select(cols).sort(key).equals(two["readings"].select(cols).sort(key))
    clock = ["finished_at", "updated_at"]  # wall-clock times of the run
    assert one["ingest_runs"].drop(clock).equals(two["ingest_runs"].drop(clock))


def test_a_flow_without_snapshots_pickles_no_state_and_gives_the_same_rows(monkeypatch):
    pickled = []

    class CountingPickle:
        HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
        loads = staticmethod(pickle.loads)

        @staticmethod
        def dumps(obj, protocol=None):
            pickled.append(type(obj).__name__)
            return pickle.dumps(obj, protocol=protocol)

    monkeypatch.setattr(pipeline, "pickle", CountingPickle)
    kept = _run(_chunks())
    assert {"NodeValidator", "NodeScorer", "NodeWindows", "NodeForecaster"} <= set(pickled)
    pickled.clear()
    skipped = _run(_chunks(), snapshots=False)
    assert pickled == []
    # wall-clock times: of the run, of a quarantined line's arrival
    clock = {"ingest_runs": ["finished_at", "updated_at"], "quarantine": ["received_at"]}
    assert set(kept) == set(skipped)
    for table, frame in kept.items():
        drop = clock.get(table, [])
        assert frame.drop(drop).equals(skipped[table].drop(drop)), table


def test_the_flow_updates_its_prometheus_metrics():
    from connectors.metrics import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "accepted": value("waterflow_readings_total", outcome="accepted"),
        "duplicate": value("waterflow_readings_total", outcome="duplicate"),
        "parse_error": value("waterflow_quarantine_records_total", reason="parse_error"),
    }
    _run(_chunks())
    assert value("waterflow_readings_total", outcome="accepted") - before["accepted"] == 290
    assert value("waterflow_readings_total", outcome="duplicate") - before["duplicate"] == 1
    assert (
        value("waterflow_quarantine_records_total", reason="parse_error") - before["parse_error"]
        == 1
    )
    # node b's newest reading is the 146th 5-minute step; its pressure is the last accepted one
    last_b = (T0 + 145 * STEP) / 1e6
    assert value("waterflow_node_last_reading_timestamp_seconds", node_id="b") == last_b
    assert value("waterflow_node_pressure_bar", node_id="b") == 4.0


def _final_state(chunks, settings):
    """Each table as the warm tier would hold it: the last row per natural key."""
    from dataflows.tables import KEYS

    out = []
    run_main(build_flow(TestingSource(chunks), TestingSink(out), settings))
    frames = {}
    for rows in out:
        frames.setdefault(rows.table, []).append(rows.frame)
    state = {}
    for table, parts in frames.items():
        key = list(KEYS[table])
        state[table] = pl.concat(parts).unique(key, keep="last", maintain_order=True).sort(key)
    return state


def test_results_do_not_depend_on_how_the_input_is_cut():
    """The sample replayed in one chunk, and cut into chunks of 37 lines (a live flow's batches
    are that small): every table's final rows are the same, anomalies and balance included."""
    from pathlib import Path

    from connectors.formats import read_path
    from dataflows.topology import load_network

    samples = Path(__file__).parents[2] / "dataflows" / "samples"
    path = samples / "simulated_2districts_7days.csv"
    network = load_network(samples / "network.toml")
    whole, cut = (
        Settings(run_id="t", network=network, chunk_rows=rows, now_us=T0 + 400 * 86_400_000_000)
        for rows in (100_000, 37)
    )
    one = _final_state(list(read_path(path, whole)), whole)
    many = _final_state(list(read_path(path, cut)), cut)
    assert set(one) == set(many)
    days = one["district_balance"].filter(pl.col("period") == "day")
    assert one["anomalies"].height > 20 and days.height == 14
    for table in sorted(set(one) - {"ingest_runs", "quarantine"}):
        a, b = one[table], many[table]
        assert a.shape == b.shape, table
        for column in a.columns:
            if a[column].dtype.is_float():  # sums in another order: equal to rounding
                assert np.allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-9,
                                   atol=1e-12, equal_nan=True), (table, column)
            else:
                assert a[column].equals(b[column]), (table, column)
    # quarantine ids are per line; received_at is the wall clock
    assert one["quarantine"].drop("received_at").equals(many["quarantine"].drop("received_at"))


def test_a_node_waits_for_the_next_tick_of_the_wall_clock_and_goes_on_as_one_batch():
    tick = timedelta(milliseconds=200)
    first, second = _node_batch("a", 0, 3, 1.0, 3.5), _node_batch("a", 3, 2, 2.0, 3.5, 5)
    gather = pipeline._GatherOnTicks(None, tick, most=256)
    before = datetime.now(UTC)
    assert gather.on_item(first) == ([], False) and gather.on_item(second) == ([], False)
    due = gather.notify_at()
    assert due is not None and before < due <= before + tick
    assert due.timestamp() * 1000 % 200 == pytest.approx(0, abs=1e-3)  # a tick for every node
    # What waits is in the snapshot: a crash before the tick loses none of it.
    resumed = pipeline._GatherOnTicks(gather.snapshot(), tick, most=256)
    assert resumed.notify_at() is not None
    for logic in (gather, resumed):
        (out,), done = logic.on_notify()
        assert done and out.ts.tolist() == first.ts.tolist() + second.ts.tolist()
        assert out.line.tolist() == [2, 3, 4, 5, 6]
        assert logic.notify_at() is None
    # A node with `most` batches waiting goes at once; a tick of 0 passes batches on as they come.
    full = pipeline._GatherOnTicks(None, tick, most=2)
    assert full.on_item(first) == ([], False)
    assert len(full.on_item(second)[0][0]) == 5
    assert pipeline._GatherOnTicks(None, timedelta(0), most=256).on_item(first) == ([first], True)


def test_gathering_on_ticks_gives_the_same_rows_as_passing_batches_on():
    # Gathered, a node's two chunks are one batch: fewer intermediate versions of a window or
    # an event are emitted, and the last version of every row (what an upsert keeps) is equal.
    clock = {"ingest_runs": ["finished_at", "updated_at"], "quarantine": ["received_at"]}
    at_once = _run(_chunks())
    ticked = _run(_chunks(), node_gather_ms=50)
    assert set(at_once) == set(ticked)
    for table, frame in at_once.items():
        drop, key = clock.get(table, []), list(KEYS[table])
        last = [
            f.drop(drop).unique(subset=key, keep="last", maintain_order=True).sort(key)
            for f in (frame, ticked[table])
        ]
        assert last[0].equals(last[1]), table
