"""Cold tier: the Parquet archive on the local file system (no service needed)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.cold_parquet import ColdParquetWriter
from dataflows.model import US_PER_HOUR, US_PER_S
from dataflows.tables import frame

pytestmark = pytest.mark.integration

T0 = 1_700_000_000 * US_PER_S  # 2023-11-14T22:13:20Z


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_date_folders_types_and_a_rewrite_compacted_on_close(tmp_path):
    writer = ColdParquetWriter.from_url(tmp_path.as_uri())
    rows = frame(
        "readings",
        {
            "node_id": ["b", "a", "a"],
            "ts": [T0, T0, T0 + 3 * US_PER_HOUR],
            "pressure": [3.0, None, 3.3],
            "flags": [["LATE", "SPIKE"], [], None],
            "source": ["x.csv"] * 3,
        },
    )
    writer.write(rows)
    first = files(tmp_path)
    assert [f.split("/")[:2] for f in first] == [
        ["readings", "date=2023-11-14"],
        ["readings", "date=2023-11-15"],
    ]
    writer.write(rows)
    assert len(files(tmp_path)) == 2 * len(first)  # a rewrite adds files ...
    writer.close()
    first = files(tmp_path)
    assert len(first) == 2 and first[0].startswith("readings/date=2023-11-14/")  # ... until close

    table = pq.read_table(tmp_path / first[0])
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert pa.types.is_list(table.schema.field("flags").type) or pa.types.is_large_list(
        table.schema.field("flags").type
    )
    assert table.column("node_id").to_pylist() == ["a", "b"]
    assert table.column("flags").to_pylist() == [[], ["LATE", "SPIKE"]]
    assert table.column("pressure").to_pylist() == [None, 3.0]
    # the whole archive reads back as one Hive-partitioned dataset
    dataset = pq.read_table(tmp_path / "readings")
    assert dataset.num_rows == 3 and "date" in dataset.column_names

    # other tables are not archived
    writer.write(frame("kpi_15m", {"node_id": ["a"], "window_start": [T0]}))
    assert files(tmp_path) == first


def test_bigquery_url_is_not_an_archive(tmp_path):
    with pytest.raises(ValueError, match="BigQuery dataset"):
        ColdParquetWriter.from_url("bigquery://project/dataset")
