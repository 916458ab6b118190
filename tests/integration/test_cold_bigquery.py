"""Cold tier in BigQuery, against the local-bigquery emulator the test command starts."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from connectors.cold_bigquery import (
    TABLE,
    ColdBigQueryWriter,
    make_client,
    parse_url,
    read_readings,
)
from connectors.tiers import cold_writer
from dataflows.model import US_PER_DAY, US_PER_HOUR, US_PER_S
from dataflows.tables import frame
from tests.integration.conftest import bigquery_count as count

pytestmark = pytest.mark.integration

T0 = 1_700_000_000 * US_PER_S  # 2023-11-14T22:13:20Z


def readings(nodes, hours, *, flow=1.0, run_id="run-1"):
    """One reading per node and hour from T0, flags and scores set."""
    node_ids = [n for n in nodes for _ in hours]
    ts = [T0 + h * US_PER_HOUR for _ in nodes for h in hours]
    n = len(ts)
    return frame(
        "readings",
        {
            "node_id": node_ids,
            "ts": pl.Series(ts).cast(pl.Datetime("us", "UTC")),
            "flow_rate": [flow + i for i in range(n)],
            "pressure": [None if i % 3 == 0 else 3.5 for i in range(n)],
            "quality": [1.0] * n,
            "flags": [["STUCK", "LATE"] if i % 4 == 0 else [] for i in range(n)],
            "anomaly_score": [i / n for i in range(n)],
            "source": ["test.csv"] * n,
            "run_id": [run_id] * n,
        },
    )


def read_all(url: str) -> pl.DataFrame:
    return pl.concat(list(read_readings(url, 0, 2**62))).sort("node_id", "ts")


def test_writes_are_idempotent_across_batches_and_restarts(bigquery_url):
    writer = cold_writer(bigquery_url)
    assert isinstance(writer, ColdBigQueryWriter)
    writer.connect()
    first = readings(["a", "b"], range(30))  # 30 h: two UTC days
    writer.write(first)
    assert count(bigquery_url) == 60
    writer.write(first)  # a batch replayed by Bytewax recovery
    assert count(bigquery_url) == 60
    # The same readings cut into other batches (a restart regroups them), with new values:
    # still one row per (node_id, ts), and the last write wins.
    again = readings(["a", "b"], range(30), flow=100.0, run_id="run-2")
    writer.write(frame("readings", again.frame.head(25).to_dict()))
    writer.write(frame("readings", again.frame.tail(35).to_dict()))
    assert count(bigquery_url) == 60
    writer.close()

    # A restarted worker: new client, new staging table, same table.
    restarted = ColdBigQueryWriter.from_url(bigquery_url)
    restarted.connect()
    restarted.write(again)
    restarted.write(readings(["c"], range(2)))
    restarted.write(frame("kpi_15m", {"node_id": ["a"], "window_start": [T0]}))  # not stored
    restarted.close()
    assert count(bigquery_url) == 62

    back = read_all(bigquery_url)
    expected = pl.concat([again.frame, readings(["c"], range(2)).frame]).sort("node_id", "ts")
    assert_frame_equal(back, expected)  # flags, scores and nulls come back as written


def test_table_is_day_partitioned_on_ts_and_clustered_by_node(bigquery_url):
    writer = ColdBigQueryWriter.from_url(bigquery_url)
    writer.connect()
    writer.close()
    target = parse_url(bigquery_url)
    client = make_client(target)
    try:
        table = client.get_table(target.table_id)
        tables = {t.table_id for t in client.list_tables(target.dataset)}
    finally:
        client.close()
    assert table.table_id == TABLE
    assert table.time_partitioning.type_ == "DAY"
    assert table.time_partitioning.field == "ts"
    assert table.clustering_fields == ["node_id"]
    fields = {f.name: (f.field_type, f.mode) for f in table.schema}
    assert fields["flags"] == ("STRING", "REPEATED")
    assert fields["node_id"] == ("STRING", "REQUIRED")
    assert fields["ts"] == ("TIMESTAMP", "REQUIRED")
    assert fields["anomaly_score"][0] in ("FLOAT", "FLOAT64")
    assert tables == {TABLE}  # the writer dropped its staging table on close


def test_read_readings_gives_one_sorted_frame_per_day_in_range(bigquery_url):
    writer = ColdBigQueryWriter.from_url(bigquery_url)
    writer.connect()
    writer.write(readings(["b", "a"], range(48)))
    writer.close()
    day0 = T0 - T0 % US_PER_DAY
    frames = list(read_readings(bigquery_url, day0, day0 + 2 * US_PER_DAY))
    assert [f.height for f in frames] == [2 * 2, 2 * 24]  # 22:00-23:00 on day 0, then day 1
    assert frames[0]["node_id"].to_list() == ["a", "a", "b", "b"]
    assert list(read_readings(bigquery_url, 0, US_PER_DAY)) == []


def test_bad_urls_fail_before_connecting():
    with pytest.raises(ValueError, match="dataset"):
        parse_url("bigquery://project")
    with pytest.raises(ValueError, match="project id"):
        parse_url("bigquery://Bad_Project/ds")
    with pytest.raises(ValueError, match="unknown option"):
        parse_url("bigquery://p/ds?tabel=x")


def test_the_parquet_archive_loads_into_bigquery_as_is(bigquery_url, tmp_path):
    """The embedded cold tier's files are the BigQuery format too: a load job takes them."""
    from google.cloud import bigquery

    from connectors.cold_bigquery import ensure_table
    from connectors.cold_parquet import ColdParquetWriter

    rows = readings(["n1", "n2"], range(30))  # 22:13Z on the 14th + 29 h: three UTC days
    ColdParquetWriter.from_url(tmp_path.as_uri()).write(rows)
    files = sorted(tmp_path.rglob("*.parquet"))
    assert {f.parent.name for f in files} == {
        "date=2023-11-14",
        "date=2023-11-15",
        "date=2023-11-16",
    }

    target = parse_url(bigquery_url)
    client = make_client(target)
    try:
        ensure_table(client, target)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        )
        options = bigquery.ParquetOptions()
        options.enable_list_inference = True
        config.parquet_options = options
        for f in files:
            with f.open("rb") as fh:
                client.load_table_from_file(fh, target.table_id, job_config=config).result(
                    timeout=120
                )
    finally:
        client.close()
    assert_frame_equal(read_all(bigquery_url), rows.frame.sort("node_id", "ts"))
