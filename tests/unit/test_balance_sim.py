"""The district balance against the simulator's ground truth (``balance_truth.csv``).

Each test simulates a network, maybe breaks a meter in the readings file, replays it through
the whole flow (Bytewax ``TestingSource``) and compares the final ``district_balance`` rows and
district events with what the simulator says really flowed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from connectors.formats import read_path
from dataflows.pipeline import build_flow
from dataflows.settings import Settings
from dataflows.simulate import SimulationResult, simulate
from dataflows.tables import KEYS
from dataflows.topology import load_network

TZ = "Europe/Rome"
SILENT_DAY = dt.date(2024, 11, 13)  # a Wednesday, the tenth local day


def replay(sim: SimulationResult, readings: Path | None = None) -> dict[str, pl.DataFrame]:
    """Final rows of every table after replaying the (maybe altered) readings."""
    settings = Settings(run_id="t", network=load_network(sim.network_path), tz=TZ,
                        now_us=2_000_000_000_000_000)
    out: list = []
    chunks = list(read_path(readings or sim.readings_path, settings))
    run_main(build_flow(TestingSource(chunks), TestingSink(out), settings))
    tables: dict[str, list[pl.DataFrame]] = {}
    for rows in out:
        tables.setdefault(rows.table, []).append(rows.frame)
    return {t: pl.concat(f).unique(list(KEYS[t]), keep="last", maintain_order=True)
            for t, f in tables.items()}


def days(tables: dict[str, pl.DataFrame], sim: SimulationResult) -> pl.DataFrame:
    """Day rows joined with the truth (columns ``*_true``), by district and local day."""
    local = pl.col("period_start").dt.convert_time_zone(TZ).dt.date().alias("day")
    rows = tables["district_balance"].filter(pl.col("period") == "day").with_columns(local)
    truth = pl.read_csv(sim.truth_path, try_parse_dates=True)
    return rows.join(truth, on=["district", "day"], suffix="_true").sort("district", "day")


def altered(sim: SimulationResult, tmp: Path, change: pl.Expr | None,
            drop: pl.Expr | None = None) -> Path:
    """The readings with rows dropped and/or flow values replaced, as a new file."""
    df = pl.read_csv(sim.readings_path, infer_schema_length=None)
    ts = pl.col("timestamp").str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_zone="UTC")
    df = df.with_columns(ts.dt.convert_time_zone(TZ).alias("_local"))
    if drop is not None:
        df = df.filter(~drop)
    if change is not None:
        df = df.with_columns(change)
    path = tmp / "altered.csv"
    df.drop("_local").write_csv(path)
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate(tmp_path_factory.mktemp("clean"), districts=2, nodes_per_district=5,
                    days=14, seed=3, events=False)


@pytest.fixture(scope="module")
def clean_replay(clean: SimulationResult) -> dict[str, pl.DataFrame]:
    return replay(clean)


def on_day(node: str, day: dt.date = SILENT_DAY) -> pl.Expr:
    return (pl.col("node_id") == node) & (pl.col("_local").dt.date() == day)


def test_losses_match_the_injected_leakage_within_one_percent(clean, clean_replay):
    d = days(clean_replay, clean)
    assert d.height == 28 and d["loss_m3"].null_count() == 0
    assert d["filled_share"].max() == 0.0 and not d["estimated"].any()
    totals = d.group_by("district").agg(pl.col("loss_m3").sum(), pl.col("loss_m3_true").sum())
    for row in totals.iter_rows(named=True):
        assert row["loss_m3"] == pytest.approx(row["loss_m3_true"], rel=0.01), row
    # every day within 6 % (meter noise of 1.5 % on inflow and consumption, no bias)
    assert ((d["loss_m3"] / d["loss_m3_true"] - 1).abs() < 0.06).all()
    assert d["nrw"].min() > 0.05


def test_no_district_leak_on_a_clean_network(clean_replay):
    events = clean_replay.get("anomalies", pl.DataFrame(schema={"measurement": pl.String}))
    assert events.filter(pl.col("measurement") == "mnf").height == 0


def test_an_inflow_meter_silent_for_a_day_keeps_that_day_within_five_percent(clean, tmp_path):
    # Its totalizer carries the silent day's volume to the next reading: spread over the day
    # by the meter's pattern, nothing is filled and the day's total is the measured one.
    sim = replay(clean, altered(clean, tmp_path, None, drop=on_day("d1-inflow")))
    d = days(sim, clean).filter(pl.col("district") == "d1")
    day = d.filter(pl.col("day") == SILENT_DAY).row(0, named=True)
    assert day["filled_share"] == 0.0
    assert day["loss_m3"] == pytest.approx(day["loss_m3_true"], rel=0.05)
    assert d["loss_m3"].sum() == pytest.approx(d["loss_m3_true"].sum(), rel=0.01)
    hours = sim["district_balance"].filter(
        (pl.col("period") == "hour") & (pl.col("district") == "d1")
        & (pl.col("period_start").dt.convert_time_zone(TZ).dt.date() == SILENT_DAY))
    assert hours.height == 24 and hours["inflow_m3"].min() > 0


def test_a_consumption_meter_silent_for_a_day_is_filled_from_its_pattern(
    clean, clean_replay, tmp_path
):
    sim = replay(clean, altered(clean, tmp_path, None, drop=on_day("d1-c01")))
    d = days(sim, clean).filter(pl.col("district") == "d1")
    day = d.filter(pl.col("day") == SILENT_DAY).row(0, named=True)
    assert 0.1 < day["filled_share"] < 0.5 and not day["estimated"]
    # The meter's own day varies 4 % around its pattern (the simulator's day factor), so the
    # day's consumption is within 5 %, its losses (a tenth of the inflow) within 40 %, and the
    # whole period's losses within 5 %.
    assert day["consumption_m3"] == pytest.approx(day["consumption_m3_true"], rel=0.05)
    assert day["loss_m3"] == pytest.approx(day["loss_m3_true"], rel=0.4)
    assert d["loss_m3"].sum() == pytest.approx(d["loss_m3_true"].sum(), rel=0.05)
    # the days before are as in the clean replay (the day before may differ: its last window
    # is the silent day's neighbour in the KPIs)
    early = pl.col("day") < SILENT_DAY - dt.timedelta(days=1)
    ref = days(clean_replay, clean).filter((pl.col("district") == "d1") & early)
    assert d.filter(early)["loss_m3"].to_list() == pytest.approx(ref["loss_m3"].to_list())


def test_a_frozen_consumption_meter_does_not_give_a_negative_nrw(clean, tmp_path):
    # d1-c01 repeats its value of 09:00 (a morning peak) from 09:00 to 21:00
    hour = pl.col("_local").dt.hour()
    frozen = on_day("d1-c01") & (hour >= 9) & (hour < 21)
    peak = pl.read_csv(clean.readings_path).filter(
        (pl.col("node_id") == "d1-c01")
        & (pl.col("timestamp") == f"{SILENT_DAY}T08:00:00Z"))["flow_rate"][0]
    sim = replay(clean, altered(
        clean, tmp_path, pl.when(frozen).then(peak).otherwise(pl.col("flow_rate"))
        .alias("flow_rate")))
    d = days(sim, clean).filter(pl.col("district") == "d1")
    day = d.filter(pl.col("day") == SILENT_DAY).row(0, named=True)
    believed = day["consumption_m3_true"] + 12 * 3.6 * peak  # what the frozen value claims
    assert believed > day["inflow_m3_true"]  # taken as measured, the NRW would be negative
    assert d["nrw"].min() > 0.03
    assert day["loss_m3"] == pytest.approx(day["loss_m3_true"], rel=0.25)
    assert day["filled_share"] > 0.05


def test_district_leak_suspected_with_its_rate(tmp_path):
    sim = simulate(tmp_path, districts=2, nodes_per_district=5, days=16, seed=5, events=False,
                   district_leaks=(("d1", 10.0, 0.6),))
    tables = replay(sim)
    events = tables["anomalies"].filter(pl.col("measurement") == "mnf")
    assert events["node_id"].to_list() == ["d1"] and events["kind"][0] == "leak"
    leak = events.row(0, named=True)
    start = sim_start(sim) + dt.timedelta(days=10)
    # opened by the second high night, dated from the first: the night after the leak began
    assert start <= leak["started_at"] <= start + dt.timedelta(days=2)
    assert leak["ended_at"] is None  # not repaired
    assert leak["observed"] - leak["expected_lo"] == pytest.approx(0.6, rel=0.35)
    d = days(tables, sim).filter(pl.col("district") == "d1")
    rates = d.filter(pl.col("leak_lps").is_not_null())["leak_lps"]
    assert rates.len() >= 4 and rates.median() == pytest.approx(0.6, rel=0.25)
    assert d.filter(pl.col("day") < dt.date(2024, 11, 14))["leak_lps"].null_count() == 10
    assert d["mnf_trend_lps_per_day"][-1] > 0.02  # the night flow trends up


def sim_start(sim: SimulationResult) -> dt.datetime:
    first = pl.read_csv(sim.readings_path, n_rows=1)["timestamp"][0]
    return dt.datetime.strptime(first, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
