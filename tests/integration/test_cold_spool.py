"""The live cold tier: readings spooled on disk, loaded into BigQuery (the emulator) in bulk."""

from __future__ import annotations

import time

import polars as pl
import pytest

from connectors.cold_bigquery import ColdBigQueryWriter
from connectors.cold_spool import SpooledBigQueryWriter
from dataflows.tables import TableRows
from tests.integration.conftest import bigquery_count as count
from tests.integration.test_cold_bigquery import read_all, readings

pytestmark = pytest.mark.integration


def _batches(frame: TableRows, size: int) -> list[TableRows]:
    return [TableRows("readings", frame.frame.slice(i, size))
            for i in range(0, frame.frame.height, size)]


def test_many_small_batches_become_one_load(bigquery_url, tmp_path):
    writer = SpooledBigQueryWriter(ColdBigQueryWriter.from_url(bigquery_url), tmp_path, 3600)
    writer.connect()
    first = readings(["a", "b", "c"], range(40))
    for batch in _batches(first, 7):  # 18 small batches, as a live flow writes them
        writer.write(batch)
    again = readings(["a"], range(40), flow=100.0)  # a correction, cut otherwise
    for batch in _batches(again, 11):
        writer.write(batch)
    assert count(bigquery_url) == 0  # nothing loaded before the period is over
    assert len(writer.pending()) == 18 + 4
    writer.close()
    assert writer.loads == 1 and writer.pending() == []
    stored = read_all(bigquery_url)
    assert stored.height == 120
    a = stored.filter(pl.col("node_id") == "a")["flow_rate"].to_list()
    assert a == [100.0 + i for i in range(40)]  # the newest spooled value wins


def test_a_killed_writers_spool_is_loaded_by_the_next_one(bigquery_url, tmp_path):
    killed = SpooledBigQueryWriter(ColdBigQueryWriter.from_url(bigquery_url), tmp_path, 3600)
    killed.connect()
    for batch in _batches(readings(["a", "b"], range(24)), 5):
        killed.write(batch)
    killed._stop.set()  # the process dies: no close, no load; the files stay on disk
    assert count(bigquery_url) == 0

    # After the restart, Bytewax replays the batches since its snapshot: written again.
    resumed = SpooledBigQueryWriter(ColdBigQueryWriter.from_url(bigquery_url), tmp_path, 3600)
    resumed.connect()
    for batch in _batches(readings(["b"], range(12, 24)), 4):
        resumed.write(batch)
    resumed.close()
    assert count(bigquery_url) == 48  # every reading exactly once
    killed.inner.close()


def test_loads_run_in_the_background_every_period(bigquery_url, tmp_path):
    writer = SpooledBigQueryWriter(ColdBigQueryWriter.from_url(bigquery_url), tmp_path, 0.5)
    writer.connect()
    try:
        writer.write(readings(["a"], range(10)))
        deadline = time.monotonic() + 60
        while writer.pending():
            assert time.monotonic() < deadline, "the spool was not loaded within 60 s"
            time.sleep(0.2)
        assert count(bigquery_url) == 10
        assert writer.loads >= 1
    finally:
        writer.close()
