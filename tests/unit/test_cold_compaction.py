"""Compaction of the Parquet archive: each (node_id, ts) once, the last written row (no service)."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pytest

from connectors.cold_parquet import ColdParquetWriter, day_files, read_readings
from dataflows.model import US_PER_HOUR, US_PER_S
from dataflows.tables import TableRows, frame

T0 = 1_700_000_000 * US_PER_S  # 2023-11-14T22:13:20Z
DAY0, DAY1 = dt.date(2023, 11, 14), dt.date(2023, 11, 15)
HALF_HOUR = US_PER_HOUR // 2


def readings(keys: list[tuple[str, int]], flow: list[float], run_id: str = "r") -> TableRows:
    return frame(
        "readings",
        {
            "node_id": [k[0] for k in keys],
            "ts": [k[1] for k in keys],
            "flow_rate": flow,
            "flags": [["LATE"]] * len(keys),
            "source": ["f.csv"] * len(keys),
            "run_id": [run_id] * len(keys),
        },
    )


def archived(root: Path) -> pl.DataFrame:
    """Every row of the archive as a plain load sees it: all ``*.parquet`` files, no dedup."""
    table = ds.dataset(root / "readings", format="parquet", partitioning="hive").to_table()
    return pl.from_arrow(table).select("node_id", "ts", "flow_rate", "run_id")  # type: ignore[union-attr]


def flows(root: Path) -> dict[tuple[str, int], float]:
    """(node_id, ts µs) -> flow_rate, as ``read_readings`` gives them."""
    out = {}
    for day in read_readings(str(root), 0, 2**62):
        for node, ts, flow in day.select("node_id", "ts", "flow_rate").iter_rows():
            out[(node, int(ts.timestamp() * US_PER_S))] = flow
    return out


def folder(root: Path, day: dt.date) -> Path:
    return root / "readings" / f"date={day.isoformat()}"


KEYS = [(node, T0 + i * HALF_HOUR) for node in ("a", "b", "c") for i in range(60)]  # 2 days


def test_a_killed_run_then_a_rerun_in_other_batches_leaves_each_reading_once(tmp_path):
    killed = ColdParquetWriter(tmp_path)
    first = KEYS[:100]
    for i in range(0, len(first), 7):
        killed.write(readings(first[i : i + 7], [1.0] * len(first[i : i + 7]), "killed"))
    # killed -9: never closed, its parts stay

    rerun = ColdParquetWriter(tmp_path)
    for i in range(0, len(KEYS), 11):
        batch = KEYS[i : i + 11]
        rerun.write(readings(batch, [float(KEYS.index(k)) for k in batch], "rerun"))
    assert len(archived(tmp_path)) > len(KEYS)  # before close: the killed run's duplicates
    rerun.close()

    rows = archived(tmp_path)
    assert len(rows) == len(KEYS) == rows.select("node_id", "ts").n_unique()
    assert rows["run_id"].unique().to_list() == ["rerun"]
    assert flows(tmp_path) == {k: float(i) for i, k in enumerate(KEYS)}
    assert [len(day_files(folder(tmp_path, d))) for d in (DAY0, DAY1)] == [1, 1]
    by_polars = pl.scan_parquet(tmp_path / "readings" / "**" / "*.parquet").collect()
    assert by_polars.height == len(KEYS)
    day0 = pl.read_parquet(day_files(folder(tmp_path, DAY0))[0])
    assert day0.select("node_id", "ts").equals(day0.sort("node_id", "ts").select("node_id", "ts"))


def test_batches_with_the_same_source_span_and_count_are_both_kept(tmp_path):
    # The old digest name (sources, first ts, last ts, count) gave these one name: b replaced a.
    writer = ColdParquetWriter(tmp_path)
    writer.write(readings([("a", T0), ("a", T0 + US_PER_S)], [1.0, 2.0]))
    writer.write(readings([("b", T0), ("b", T0 + US_PER_S)], [3.0, 4.0]))
    writer.close()
    assert sorted(archived(tmp_path)["flow_rate"].to_list()) == [1.0, 2.0, 3.0, 4.0]


def test_a_crash_between_the_merged_file_and_the_deletes_still_reads_the_last_rows(
    tmp_path, monkeypatch
):
    writer = ColdParquetWriter(tmp_path)
    keys = [("a", T0 + i * US_PER_S) for i in range(4)]
    writer.write(readings(keys, [1.0] * 4))
    writer.write(readings(keys[:2], [2.0] * 2))
    writer.write(readings(keys[1:], [3.0] * 3))

    def crash(path, *args, **kwargs):
        raise OSError(f"killed before deleting {path}")

    monkeypatch.setattr(os, "unlink", crash)
    with pytest.raises(RuntimeError, match="deleting the files it absorbed failed"):
        writer.close()
    monkeypatch.undo()
    files = day_files(folder(tmp_path, DAY0))
    assert [f.name.split("-")[2] for f in files] == ["0", "0", "0", "9"]  # the merge is last
    expected = {keys[0]: 2.0, keys[1]: 3.0, keys[2]: 3.0, keys[3]: 3.0}
    assert flows(tmp_path) == expected

    ColdParquetWriter(tmp_path).compact(DAY0)  # the next run's compaction
    assert len(day_files(folder(tmp_path, DAY0))) == 1
    rows = archived(tmp_path)
    assert len(rows) == 4
    assert dict(zip(rows["ts"].dt.epoch("us"), rows["flow_rate"], strict=True)) == {
        ts: v for (_, ts), v in expected.items()
    }


def test_a_part_written_after_a_compaction_wins_even_with_a_clock_behind(tmp_path, monkeypatch):
    keys = [("a", T0), ("b", T0)]
    writer = ColdParquetWriter(tmp_path)
    writer.write(readings(keys, [1.0, 1.0]))
    writer.write(readings(keys, [2.0, 2.0]))
    writer.close()
    (compacted,) = day_files(folder(tmp_path, DAY0))
    future = time.time() + 3600
    os.utime(compacted, (future, future))  # a copy of the archive need not keep mtimes

    # A later run on a host whose clock is far behind: the name still sorts after the archive's.
    monkeypatch.setattr(time, "time_ns", lambda: 1)
    later = ColdParquetWriter(tmp_path)
    later.write(readings(keys[:1], [3.0]))
    files = day_files(folder(tmp_path, DAY0))
    assert files[0] == compacted and len(files) == 2
    assert flows(tmp_path) == {keys[0]: 3.0, keys[1]: 2.0}
    later.close()
    assert len(day_files(folder(tmp_path, DAY0))) == 1
    assert sorted(archived(tmp_path)["flow_rate"].to_list()) == [2.0, 3.0]


def test_files_of_one_level_are_merged_as_they_pile_up(tmp_path):
    writer = ColdParquetWriter(tmp_path, merge_fanout=4)
    shared = [("a", T0 + i * US_PER_S) for i in range(3)]

    def write(i: int) -> list[str]:
        writer.write(readings([*shared, (f"n{i}", T0)], [float(i)] * 4))
        return [f.name.split("-")[2] for f in day_files(folder(tmp_path, DAY0))]

    assert [write(i) for i in range(4)] == [["0"], ["0", "0"], ["0", "0", "0"], ["1"]]
    levels = [write(i) for i in range(4, 19)]
    assert levels[11] == ["2"]  # the 16th write: four level-1 files became one level-2 file
    assert levels[-1] == ["2", "0", "0", "0"]
    assert flows(tmp_path) == {
        **{k: 18.0 for k in shared},
        **{(f"n{i}", T0): float(i) for i in range(19)},
    }
    # merged files hold each key once: only the three newest parts repeat the shared keys
    assert len(archived(tmp_path)) == 3 + 19 + 3 * 3
    writer.close()
    assert len(archived(tmp_path)) == 3 + 19


def test_a_long_run_compacts_the_days_it_wrote_to_every_compact_every_seconds(tmp_path):
    writer = ColdParquetWriter(tmp_path, compact_every=0.0)
    keys = [("a", T0), ("a", T0 + 2 * US_PER_HOUR)]  # two UTC days
    for i in range(3):
        writer.write(readings(keys, [float(i)] * 2))
        assert [len(day_files(folder(tmp_path, d))) for d in (DAY0, DAY1)] == [1, 1]
    assert archived(tmp_path)["flow_rate"].to_list() == [2.0, 2.0]


def test_old_digest_named_files_are_older_than_any_sequence_named_file(tmp_path):
    ColdParquetWriter(tmp_path).write(readings([("a", T0)], [1.0]))
    (new,) = day_files(folder(tmp_path, DAY0))
    old = new.with_name("part-0123456789abcdef0123.parquet")  # the old name scheme
    new.rename(old)
    future = time.time() + 3600
    os.utime(old, (future, future))  # a newer mtime does not make it newer
    writer = ColdParquetWriter(tmp_path)
    writer.write(readings([("a", T0)], [2.0]))
    assert day_files(folder(tmp_path, DAY0))[0] == old
    assert flows(tmp_path) == {("a", T0): 2.0}
    writer.close()
    assert archived(tmp_path)["flow_rate"].to_list() == [2.0]


def test_writers_of_several_workers_merge_and_close_the_same_day_concurrently(tmp_path):
    def work(worker: int) -> None:
        writer = ColdParquetWriter(tmp_path, merge_fanout=4)
        for i in range(40):
            keys = [(f"w{worker}", T0 + i * US_PER_S), ("a", T0 + (worker * 100 + i) * US_PER_S)]
            writer.write(readings(keys, [float(i)] * 2))
        writer.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(day_files(folder(tmp_path, DAY0))) == 1
    rows = archived(tmp_path)
    assert len(rows) == 4 * 40 * 2 == rows.select("node_id", "ts").n_unique()
    assert sorted(rows.filter(pl.col("node_id") == "w3")["flow_rate"]) == list(range(40))
