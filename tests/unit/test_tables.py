"""TableRows from column data: built lazily, joined as arrays, safe across threads."""

from __future__ import annotations

import pickle
import threading
from datetime import UTC, date, datetime

import numpy as np
import polars as pl
import pytest

from dataflows.tables import SCHEMAS, TableRows, concat_by_table, concat_rows, frame

T0 = 1_731_456_000_000_000  # 2024-11-13 00:00 UTC in µs


def _kpi(node: str, windows: int, **extra: np.ndarray) -> TableRows:
    return frame("kpi_15m", {
        "node_id": [node] * windows,
        "window_start": T0 + np.arange(windows, dtype=np.int64) * 900_000_000,
        "n": np.full(windows, 3, dtype=np.int64),
        **extra,
    })


def test_parts_with_different_columns_join_into_the_schema_with_nulls():
    a = _kpi("a", 2, flow_rate_avg=np.array([1.0, np.nan]))
    b = _kpi("b", 1, chlorine_avg=np.array([0.4]))
    joined = concat_rows([a, b])
    f = joined.frame
    assert f.columns == list(SCHEMAS["kpi_15m"]) and joined.height == 3
    assert f["node_id"].to_list() == ["a", "a", "b"]
    assert f["flow_rate_avg"].to_list() == [1.0, None, None]  # NaN is null in every table
    assert f["chlorine_avg"].to_list() == [None, None, 0.4]
    assert f["window_start"][2] == datetime(2024, 11, 13, tzinfo=UTC)
    # The same rows as joining the frames
    assert f.equals(pl.concat([a.frame, b.frame]))


def test_parts_join_per_table_in_order_as_their_frames_would():
    def readings(node, n, **columns):
        base = {"node_id": [node] * n, "ts": T0 + np.arange(n, dtype=np.int64) * 300_000_000}
        return frame("readings", {**base, **columns})

    parts = [
        readings("a", 2, flow_rate=np.array([1.0, 2.0]), flags=[["spike"], []]),
        _kpi("a", 1, flow_rate_avg=np.array([1.5])),
        readings("b", 1, pressure=np.array([3.5])),  # no flags, no flow: nulls
        readings("c", 2, flow_rate=np.array([4.0, 5.0]), run_id=["r", "r"]),
        _kpi("b", 2),
    ]
    joined = concat_by_table(parts)
    assert [j.table for j in joined] == ["readings", "kpi_15m"]
    expected = pl.concat([p.frame for p in parts if p.table == "readings"])
    assert joined[0].frame.equals(expected)
    assert joined[0].frame["flags"].to_list() == [["spike"], [], None, None, None]
    assert joined[0].frame["flow_rate"].to_list() == [1.0, 2.0, None, 4.0, 5.0]
    assert joined[0].frame["run_id"].to_list() == [None, None, None, "r", "r"]
    assert joined[1].frame.equals(pl.concat([parts[1].frame, parts[4].frame]))
    # An integer column some parts lack has no NaN to stand for null: joined through polars
    counts = [_kpi("a", 1), frame("kpi_15m", {"node_id": ["b"], "window_start": np.array([T0])})]
    assert concat_rows(counts).frame["n"].to_list() == [3, None]


def test_array_reads_a_column_without_building_the_frame():
    rows = frame("kpi_daily", {"node_id": ["a", "a"], "day": np.array([20040, 20041]),
                               "volume_m3": np.array([1.5, np.nan])})
    assert rows.array("day").tolist() == [20040, 20041]
    assert np.isnan(rows.array("mnf")).all()  # a column not given: NaN
    assert rows._frame is None
    assert rows.frame["day"].to_list() == [date(2024, 11, 13), date(2024, 11, 14)]
    built = TableRows("kpi_daily", rows.frame)  # from a frame: read back from it
    assert built.array("day").tolist() == [20040, 20041]
    assert np.isnan(built.array("volume_m3")[1])


def test_a_frame_built_by_several_threads_at_once_is_whole():
    for _ in range(50):
        rows = _kpi("a", 500, flow_rate_avg=np.arange(500.0))
        frames = []
        threads = [
            threading.Thread(target=lambda r=rows, out=frames: out.append(r.frame))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(f["flow_rate_avg"].null_count() == 0 for f in frames)
        assert rows.frame["flow_rate_avg"].sum() == sum(range(500))


def test_pickled_rows_keep_their_data_and_bad_columns_are_refused():
    rows = _kpi("a", 3, flow_rate_avg=np.ones(3))
    back = pickle.loads(pickle.dumps(rows))
    assert back.frame.equals(rows.frame)
    framed = pickle.loads(pickle.dumps(TableRows("kpi_15m", rows.frame)))
    assert framed.frame.equals(rows.frame)
    with pytest.raises(ValueError, match="unknown columns"):
        frame("kpi_15m", {"node_id": ["a"], "flow": [1.0]})
    with pytest.raises(ValueError, match="expected"):
        TableRows("kpi_15m", pl.DataFrame({"node_id": ["a"]}))


def test_coded_columns_join_as_the_lists_they_stand_for():
    """Coded columns (a node batch's repeated ids, its flag lists) give the frame the same
    rows as plain lists would, joined alone, with parts sharing their values, with parts
    lacking the column, and mixed with parts given as lists."""
    from dataflows.tables import Coded

    flags = [[], ["SPIKE"], ["LATE", "STUCK"]]  # one list object, shared like rows.py's table

    def part(node, codes, coded=True, with_flags=True):
        n = len(codes)
        columns = {"ts": T0 + np.arange(n, dtype=np.int64) * 300_000_000}
        if coded:
            columns["node_id"] = Coded.repeat(node, n)
            if with_flags:
                columns["flags"] = Coded(np.array(codes, dtype=np.int64), flags)
        else:
            columns["node_id"] = [node] * n
            if with_flags:
                columns["flags"] = [flags[c] for c in codes]
        return frame("readings", columns)

    cases = [
        [("a", [0, 1]), ("b", [2])],
        [("a", [0, 1], True, False), ("b", [2, 2]), ("c", [], True)],
        [("a", [1]), ("b", [0, 2], False)],
        [("a", [2, 0, 1])],
    ]
    for case in cases:
        coded = concat_rows([part(*c) for c in case]).frame
        plain = concat_rows([part(c[0], c[1], False, *c[3:]) for c in case]).frame
        assert coded.equals(plain), case
    # parts with values of their own (not shared): codes shifted past the values before
    own = frame("readings", {"node_id": Coded.repeat("x", 2), "ts": T0 + np.arange(2),
                             "flags": Coded(np.array([1, 0]), [["GAP_BEFORE"], ["LATE"]])})
    mixed = concat_rows([part("a", [1, 2]), own, part("b", [0])]).frame
    assert mixed["flags"].to_list() == [
        ["SPIKE"], ["LATE", "STUCK"], ["LATE"], ["GAP_BEFORE"], [],
    ]
    joined = concat_rows([part("a", [0, 1], True, False), part("b", [2])]).frame
    assert joined["node_id"].to_list() == ["a", "a", "b"]
    assert joined["flags"].to_list() == [None, None, ["LATE", "STUCK"]]
    # pickled (Bytewax recovery, or rows crossing processes) and read back alike
    again = pickle.loads(pickle.dumps(part("a", [2, 1])))
    assert again.frame["flags"].to_list() == [["LATE", "STUCK"], ["SPIKE"]]
