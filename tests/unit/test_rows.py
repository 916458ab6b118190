import numpy as np
import polars as pl
import pytest

from dataflows.model import COL, Flag, NodeInfo, Quarantined, ReadingBatch, empty_values
from dataflows.rows import (
    RunCounts,
    nodes_rows,
    quarantine_id,
    quarantine_rows,
    readings_rows,
    run_rows,
)
from dataflows.tables import SCHEMAS, TableRows


def _batch():
    values = empty_values(3)
    values[:, COL["flow_rate"]] = [1.5, np.nan, 3.0]
    values[:, COL["pressure"]] = [3.2, 3.1, 3.0]
    return ReadingBatch(
        node_id="n1",
        source="f.csv",
        ts=np.array([0, 300, 600], dtype=np.int64) * 1_000_000,
        values=values,
        line=np.array([2, 3, 4]),
        quality=np.array([1.0, 0.5, 0.9]),
        flags=np.array([0, int(Flag.STUCK | Flag.LATE), 0]),
        score=np.array([0.0, 0.7, 0.1]),
    )


def test_readings_rows_map_values_flags_and_nulls():
    df = readings_rows(_batch(), "run-1").frame
    assert df.columns == list(SCHEMAS["readings"])
    assert df["flow_rate"].to_list() == [1.5, None, 3.0]  # NaN = not measured = NULL
    assert df["flags"].to_list() == [[], ["LATE", "STUCK"], []]
    assert df["ts"].dt.epoch("s").to_list() == [0, 300, 600]
    assert df["run_id"].unique().to_list() == ["run-1"]
    assert df["anomaly_score"].to_list() == [0.0, 0.7, 0.1]


def test_quarantine_ids_are_stable_and_distinct():
    a = Quarantined("f.csv", 7, "x;y", "parse_error")
    b = Quarantined("f.csv", 8, "x;y", "parse_error")
    assert quarantine_id(a) == quarantine_id(Quarantined("f.csv", 7, "x;y", "parse_error"))
    assert quarantine_id(a) != quarantine_id(b)
    bad = Quarantined("f.csv", 9, "bad\x00raw", "bad_timestamp", ts=10)
    df = quarantine_rows([a, bad], "r", 5).frame
    assert df["raw"].to_list() == ["x;y", "bad\\x00raw"]  # NUL cannot go into PostgreSQL text
    assert df["ts"].dt.epoch("us").to_list() == [None, 10]
    assert df["received_at"].dt.epoch("us").to_list() == [5, 5]


def test_nodes_and_run_rows():
    df = nodes_rows([NodeInfo("n1", "Node 1", "f.csv", district="d1", lat=39.2, lon=9.1)]).frame
    assert df.row(0) == ("n1", "Node 1", "d1", None, 39.2, 9.1, "f.csv")
    counts = RunCounts(rows_in=10, accepted=7, quarantined=2, duplicates=1, late=1)
    assert counts.reconciled
    assert not (counts + RunCounts(rows_in=1)).reconciled
    run = run_rows("r", "f.csv", 0, 1_000_000, counts).frame
    assert run.select("rows_in", "accepted", "quarantined", "duplicates", "late").row(0) == (
        10, 7, 2, 1, 1,
    )
    # Only the command that ran the flow marks a run finished (after every tier committed).
    assert run.select("status", "finished_at").row(0) == ("running", None)


def test_table_rows_refuse_wrong_columns():
    with pytest.raises(ValueError, match="expected"):
        TableRows("nodes", pl.DataFrame({"node_id": ["x"]}))
