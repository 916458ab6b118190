"""Bytewax recovery: a flow that dies mid-input and resumes gives the same results."""

from datetime import timedelta

import polars as pl
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.model import ParsedChunk
from dataflows.pipeline import build_flow
from dataflows.settings import Settings
from tests.unit.test_pipeline import T0, _chunks, _node_batch


def _more_chunks():
    # a third chunk after the first two, so the abort falls between real work
    extra = _node_batch("a", 144, 12, 10.0, 3.5, 400)
    return _chunks() + [ParsedChunk("test.csv", batches=[extra])]


def _tables(out):
    tables = {}
    for rows in out:
        tables.setdefault(rows.table, []).append(rows.frame)
    return {name: pl.concat(frames) for name, frames in tables.items()}


def _flow(items, out):
    settings = Settings(run_id="t", now_us=T0 + 10 * 86_400_000_000)
    return build_flow(TestingSource(items), TestingSink(out), settings)


def test_resume_after_abort_gives_the_clean_result(tmp_path):
    clean_out = []
    run_main(_flow(_more_chunks(), clean_out))
    clean = _tables(clean_out)

    init_db_dir(tmp_path, 1)
    config = RecoveryConfig(str(tmp_path))
    chunks = _more_chunks()
    items = chunks[:2] + [TestingSource.ABORT()] + chunks[2:]
    first_out, second_out = [], []
    # epoch every item, so the snapshot lands right before the abort
    run_main(_flow(items, first_out), epoch_interval=timedelta(0), recovery_config=config)
    run_main(_flow(items, second_out), epoch_interval=timedelta(0), recovery_config=config)
    assert not any(r.table == "ingest_runs" for r in first_out)  # it died before the end
    assert second_out  # and the resumed run did the rest
    resumed = _tables(first_out + second_out)

    key = ["node_id", "ts"]
    cols = ["node_id", "ts", "flow_rate", "pressure", "quality", "flags", "anomaly_score"]
    # at-least-once: rows may be written twice; the sinks upsert on the key, so compare by key
    got = resumed["readings"].select(cols).unique(subset=key, keep="last").sort(key)
    assert got.equals(clean["readings"].select(cols).sort(key))
    run_cols = ["rows_in", "accepted", "quarantined", "duplicates", "values_quarantined"]
    want = clean["ingest_runs"].select(run_cols).row(0)
    assert resumed["ingest_runs"].select(run_cols).row(-1) == want
    kpi_key = ["node_id", "window_start"]
    got_kpi = resumed["kpi_15m"].unique(subset=kpi_key, keep="last").sort(kpi_key)
    want_kpi = clean["kpi_15m"].unique(subset=kpi_key, keep="last").sort(kpi_key)
    assert got_kpi.equals(want_kpi)
