"""The synthetic network: determinism, physics that KPIs rely on, and the injected incidents."""

from __future__ import annotations

import csv
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest

from dataflows.model import MEASUREMENTS
from dataflows.simulate import SimulationResult, main, simulate
from dataflows.topology import load_network

SAMPLES = Path(__file__).resolve().parents[2] / "dataflows" / "samples"
KINDS = {"leak", "burst", "stuck", "spike", "gap", "clock_skew", "duplicate", "conflict"}
STEP = 300


@pytest.fixture(scope="module")
def with_events(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate(
        tmp_path_factory.mktemp("events"), districts=2, nodes_per_district=6, days=7, seed=7
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate(
        tmp_path_factory.mktemp("clean"),
        districts=2,
        nodes_per_district=7,
        days=14,
        seed=3,
        events=False,
    )


def read(path: Path) -> pl.DataFrame:
    """Readings with UTC timestamps and local hour, day and district columns."""
    df = pl.read_csv(path, schema_overrides={"timestamp": pl.String})
    ts = (
        pl.col("timestamp")
        .str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%SZ")
        .dt.replace_time_zone("UTC")
    )
    df = df.with_columns(ts.alias("ts"))
    local = pl.col("ts").dt.convert_time_zone("Europe/Rome")
    return df.with_columns(
        local.dt.hour().alias("hour"),
        local.dt.date().alias("day"),
        pl.col("node_id").str.split("-").list.first().alias("district"),
    )


def labels(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def utc(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# --- files, determinism, order -------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    args = dict(districts=2, nodes_per_district=5, days=3, seed=11)
    a = simulate(tmp_path / "a", **args)
    b = simulate(tmp_path / "b", **args)
    for pa, pb in [
        (a.readings_path, b.readings_path),
        (a.labels_path, b.labels_path),
        (a.network_path, b.network_path),
    ]:
        assert pa.read_bytes() == pb.read_bytes()
    c = simulate(tmp_path / "c", **{**args, "seed": 12})
    assert c.readings_path.read_bytes() != a.readings_path.read_bytes()


def test_row_count_header_and_node_count(with_events: SimulationResult) -> None:
    lines = with_events.readings_path.read_text().splitlines()
    assert lines[0] == "node_id,timestamp," + ",".join(MEASUREMENTS)
    assert len(lines) - 1 == with_events.n_readings
    assert with_events.n_nodes == 12
    # 2 districts x 6 nodes x 7 days x 288 steps, minus gaps, plus duplicates.
    assert 0.95 * 12 * 7 * 288 < with_events.n_readings < 1.01 * 12 * 7 * 288


def test_rows_sorted_by_time_then_node(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    ts = df["ts"].to_numpy()
    assert (np.diff(ts.astype("int64")) >= 0).all()
    same = df.with_columns(
        pl.col("node_id").shift(1).alias("prev"), pl.col("ts").shift(1).alias("pts")
    )
    same = same.filter(pl.col("ts") == pl.col("pts"))
    assert (same["prev"] <= same["node_id"]).all()


def test_timestamps_are_utc_with_z(with_events: SimulationResult) -> None:
    df = pl.read_csv(with_events.readings_path, schema_overrides={"timestamp": pl.String})
    assert df["timestamp"].str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$").all()
    # 2024-11-04 local midnight in Rome (CET, UTC+1) is 23:00 UTC the day before (a node
    # whose clock runs late may write earlier instants: those are off the 5-minute grid).
    on_grid = read(with_events.readings_path).filter(pl.col("ts").dt.epoch("s") % STEP == 0)
    assert on_grid["timestamp"][0] == "2024-11-03T23:00:00Z"


def test_each_role_reports_only_its_measurements(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    expect = {
        "inflow": {"flow_rate", "pressure", "total_flow"},
        "c": {"flow_rate", "pressure"},
        "tank": {"level"},
        "p": {"pressure"},
        "q": {"chlorine", "ph", "turbidity", "conductivity", "temperature"},
    }
    for prefix, cols in expect.items():
        part = df.filter(pl.col("node_id").str.contains(f"-{prefix}"))
        assert part.height > 0
        for m in MEASUREMENTS:
            nulls = part[m].null_count()
            if m in cols:
                assert nulls == 0, (prefix, m)
            else:
                assert nulls == part.height, (prefix, m)


# --- topology -------------------------------------------------------------------------------


def test_network_loads_and_matches_the_readings(with_events: SimulationResult) -> None:
    net = load_network(with_events.network_path)
    assert net.districts == {"d1": "Castello", "d2": "Pirri"}
    assert len(net.nodes) == with_events.n_nodes
    roles = {s.role for s in net.nodes.values()}
    assert roles == {"inflow", "consumption", "tank", "pressure", "quality"}
    for spec in net.nodes.values():
        assert spec.district in net.districts
        assert spec.lat is not None and 39.19 <= spec.lat <= 39.31
        assert spec.lon is not None and 9.07 <= spec.lon <= 9.21
    df = read(with_events.readings_path)
    assert set(df["node_id"].unique()) == set(net.nodes)


def test_every_value_is_within_its_node_ranges(with_events: SimulationResult) -> None:
    # Spikes and bursts must reach anomaly scoring, not be quarantined as impossible.
    net = load_network(with_events.network_path)
    df = read(with_events.readings_path)
    for (node,), part in df.group_by(["node_id"]):
        lo, hi = net.range_arrays(str(node))
        vals = part.select(MEASUREMENTS).to_numpy().astype(float)
        ok = np.isnan(vals) | ((vals >= lo) & (vals <= hi))
        assert ok.all(), node


# --- physics ----------------------------------------------------------------------------------


def test_inflow_is_consumption_plus_losses_every_day(clean: SimulationResult) -> None:
    df = read(clean.readings_path)
    vol = (
        df.filter(pl.col("flow_rate").is_not_null())
        .with_columns(pl.col("node_id").str.contains("inflow").alias("is_inflow"))
        .group_by("district", "day", "is_inflow")
        .agg((pl.col("flow_rate").sum() * STEP / 1000).alias("m3"), pl.len().alias("n"))
    )
    inflow = vol.filter(pl.col("is_inflow")).drop("is_inflow")
    cons = vol.filter(~pl.col("is_inflow")).drop("is_inflow")
    both = inflow.join(cons, on=["district", "day"], suffix="_c")
    both = both.filter(pl.col("n") == 288)  # whole local days
    assert both.height >= 2 * 13
    loss_share = (both["m3"] - both["m3_c"]) / both["m3"]
    # Background leakage is 8-15 % of demand, i.e. 7-13 % of inflow, give or take noise.
    assert loss_share.min() > 0.05
    assert loss_share.max() < 0.16


def test_night_flow_is_lower_than_day_flow(clean: SimulationResult) -> None:
    df = read(clean.readings_path).filter(pl.col("flow_rate").is_not_null())
    by = df.group_by("node_id").agg(
        pl.col("flow_rate").filter(pl.col("hour").is_between(2, 3)).mean().alias("night"),
        pl.col("flow_rate").filter(pl.col("hour").is_between(7, 21)).mean().alias("day"),
    )
    assert by.height == 2 * 4  # per district: three consumption meters and the inflow
    assert (by["night"] < 0.6 * by["day"]).all()
    assert (by["night"] > 0).all()


def test_night_minimum_is_around_three_local(clean: SimulationResult) -> None:
    df = read(clean.readings_path).filter(pl.col("node_id") == "d1-inflow")
    hourly = df.group_by("hour").agg(pl.col("flow_rate").mean()).sort("flow_rate")
    assert hourly["hour"][0] in (1, 2, 3, 4)


def test_pressure_falls_when_demand_rises(clean: SimulationResult) -> None:
    df = read(clean.readings_path)
    for d in ("d1", "d2"):
        inflow = df.filter(pl.col("node_id") == f"{d}-inflow").select("ts", "flow_rate")
        for node in (f"{d}-c01", f"{d}-p01", f"{d}-inflow"):
            p = df.filter(pl.col("node_id") == node).select("ts", "pressure")
            j = p.join(inflow, on="ts")
            r = np.corrcoef(j["pressure"].to_numpy(), j["flow_rate"].to_numpy())[0, 1]
            assert r < -0.6, (node, r)


def test_totalizer_integrates_the_inflow(clean: SimulationResult) -> None:
    df = read(clean.readings_path).filter(pl.col("node_id") == "d2-inflow").sort("ts")
    vol = np.diff(df["total_flow"].to_numpy())
    expected = df["flow_rate"].to_numpy()[:-1] * STEP / 1000
    # Both are rounded to 3 decimals in the file.
    assert np.abs(vol - expected).max() < 0.01
    assert (vol >= 0).all()


def test_tank_fills_at_night_and_drains_by_day(clean: SimulationResult) -> None:
    df = read(clean.readings_path).filter(pl.col("node_id") == "d1-tank")
    hourly = dict(df.group_by("hour").agg(pl.col("level").mean()).iter_rows())
    assert hourly[6] > hourly[0] > hourly[21]
    assert 0 < df["level"].min() and df["level"].max() < 6


def test_no_events_means_empty_labels(clean: SimulationResult) -> None:
    assert labels(clean.labels_path) == []
    text = clean.readings_path.read_text().splitlines()
    assert len(text) == len(set(text))  # no duplicates either


# --- injected incidents ----------------------------------------------------------------------


def test_labels_cover_every_kind_and_reference_existing_nodes(
    with_events: SimulationResult,
) -> None:
    rows = labels(with_events.labels_path)
    assert list(rows[0]) == ["node_id", "measurement", "kind", "start", "end", "detail"]
    assert {r["kind"] for r in rows} == KINDS
    net = load_network(with_events.network_path)
    df = read(with_events.readings_path)
    for r in rows:
        assert r["node_id"] in net.nodes
        assert utc(r["start"]) <= utc(r["end"])
        if r["measurement"]:
            part = df.filter(pl.col("node_id") == r["node_id"])
            assert part[r["measurement"]].null_count() < part.height, r
    kinds = [r["kind"] for r in rows]
    for kind in ("leak", "burst", "stuck", "spike"):  # enough to evaluate a detector on
        assert kinds.count(kind) >= 2, kind


def test_leak_raises_night_flow_after_its_start(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    rows = labels(with_events.labels_path)
    leaks = [r for r in rows if r["kind"] == "leak" and "-c" in r["node_id"]]
    assert leaks
    tested = 0
    for r in leaks:
        start, end = utc(r["start"]), utc(r["end"])
        node = df.filter(
            (pl.col("node_id") == r["node_id"])
            & pl.col("hour").is_between(2, 3)
            & (pl.col("ts").dt.epoch("s") % STEP == 0)  # not moved by a clock skew
        )
        # Leave out what other incidents on this node did (a burst at night, a stuck meter).
        for o in rows:
            if o["node_id"] == r["node_id"] and o["kind"] not in ("leak", "duplicate"):
                node = node.filter(~pl.col("ts").is_between(utc(o["start"]), utc(o["end"])))
        nightly = node.group_by("day").agg(
            pl.col("flow_rate").median(), pl.col("ts").min().alias("first"), pl.len()
        )
        nightly = nightly.filter(pl.col("len") >= 20)  # most of the two night hours
        before = nightly.filter(pl.col("first") < start - pl.duration(hours=2))["flow_rate"]
        after = nightly.filter(
            (pl.col("first") > start) & (pl.col("first") < end - pl.duration(hours=2))
        )["flow_rate"]
        if before.len() == 0 or after.len() == 0:
            continue
        tested += 1
        rise = after.median() / before.median() - 1
        assert 0.1 < rise < 1.0, (r, rise)  # 20-60 %, give or take noise
    assert tested >= 1


def test_burst_raises_flow_and_lowers_pressure(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    rows = labels(with_events.labels_path)
    bursts = [r for r in rows if r["kind"] == "burst" and r["measurement"] == "flow_rate"]
    assert bursts
    for r in (b for b in bursts if "-c" in b["node_id"]):
        start, end = utc(r["start"]), utc(r["end"])
        q = float(r["detail"].split()[0])  # "+4.2 L/s"
        node = df.filter(pl.col("node_id") == r["node_id"])
        inside = node.filter(pl.col("ts").is_between(start, end))
        # The same hours of the nearest day of the same kind (weekday or weekend), else of
        # the nearest day, show the demand without the burst.
        local = start.astimezone(ZoneInfo("Europe/Rome"))
        first, last = node["ts"].min(), node["ts"].max()
        shifts = [timedelta(days=k) for k in (-1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6)]
        busy = [
            (utc(o["start"]), utc(o["end"]))
            for o in rows
            if o["node_id"] == r["node_id"]
            and o["kind"] in ("burst", "stuck", "gap", "clock_skew")
            and o["start"] != r["start"]
        ]
        inside_run = [
            k
            for k in shifts
            if first <= start + k
            and end + k <= last
            and not any(b0 <= end + k and start + k <= b1 for b0, b1 in busy)
        ]
        same_kind = [
            k for k in inside_run if ((local + k).weekday() >= 5) == (local.weekday() >= 5)
        ]
        ref = None
        if inside_run:
            k = (same_kind or inside_run)[0]
            ref = node.filter(pl.col("ts").is_between(start + k, end + k))
        assert ref is not None and ref.height > 0
        rise = inside["flow_rate"].median() - ref["flow_rate"].median()
        assert rise > 0.6 * q, (r, rise)
        assert inside["pressure"].median() < ref["pressure"].median() - 0.3, r


def test_stuck_values_are_frozen(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    for r in (x for x in labels(with_events.labels_path) if x["kind"] == "stuck"):
        part = df.filter(
            (pl.col("node_id") == r["node_id"])
            & pl.col("ts").is_between(utc(r["start"]), utc(r["end"]))
        )
        assert part.height >= 8 * 12 * 0.9
        assert part[r["measurement"]].n_unique() == 1


def test_spike_is_a_single_outlier(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    for r in (x for x in labels(with_events.labels_path) if x["kind"] == "spike"):
        t, m = utc(r["start"]), r["measurement"]
        series = df.filter(pl.col("node_id") == r["node_id"]).sort("ts")[m].drop_nulls()
        typical = np.median(np.abs(np.diff(series.to_numpy())))  # step-to-step noise
        part = df.filter(
            (pl.col("node_id") == r["node_id"])
            & pl.col("ts").is_between(t - pl.duration(minutes=10), t + pl.duration(minutes=10))
        )
        v = part.filter(pl.col("ts") == t)[m][0]
        others = part.filter(pl.col("ts") != t)[m].to_numpy()
        assert abs(v - np.median(others)) > 10 * max(typical, 0.001), r


def test_gap_has_no_readings(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    for r in (x for x in labels(with_events.labels_path) if x["kind"] == "gap"):
        inside = df.filter(
            (pl.col("node_id") == r["node_id"])
            & pl.col("ts").is_between(utc(r["start"]), utc(r["end"]))
        )
        assert inside.height == 0
        hours = (utc(r["end"]) - utc(r["start"])).total_seconds() / 3600
        assert 1.9 <= hours <= 12


def test_clock_skew_moves_timestamps_off_the_grid(with_events: SimulationResult) -> None:
    df = read(with_events.readings_path)
    off_grid = df.filter(pl.col("ts").dt.epoch("s") % STEP != 0)
    skews = [x for x in labels(with_events.labels_path) if x["kind"] == "clock_skew"]
    assert skews
    assert set(off_grid["node_id"].unique()) <= {r["node_id"] for r in skews}
    for r in skews:
        mine = off_grid.filter(pl.col("node_id") == r["node_id"])
        n_true = (utc(r["end"]) - utc(r["start"])).total_seconds() // STEP + 1
        assert mine.height >= n_true  # every reading of the period, written at a wrong time


def test_duplicates_are_adjacent_exact_copies(with_events: SimulationResult) -> None:
    lines = with_events.readings_path.read_text().splitlines()
    rows = labels(with_events.labels_path)
    dups = [r for r in rows if r["kind"] == "duplicate"]
    assert len(dups) >= 10
    index = {}
    for k, line in enumerate(lines[1:], start=1):
        index.setdefault(tuple(line.split(",")[:2]), []).append(k)
    for r in dups:
        where = index[(r["node_id"], r["start"])]
        assert len(where) == 2 and where[1] == where[0] + 1
        assert lines[where[0]] == lines[where[1]]
    exact = len(lines) - 1 - len(set(lines[1:]))
    assert exact == len(dups)


def test_conflicting_duplicates_differ_in_the_labelled_measurement(
    with_events: SimulationResult,
) -> None:
    df = read(with_events.readings_path)
    conflicts = [r for r in labels(with_events.labels_path) if r["kind"] == "conflict"]
    assert conflicts
    for r in conflicts:
        pair = df.filter((pl.col("node_id") == r["node_id"]) & (pl.col("timestamp") == r["start"]))
        assert pair.height == 2
        assert pair[r["measurement"]].n_unique() == 2
        others = [m for m in MEASUREMENTS if m != r["measurement"]]
        assert pair.select(others).n_unique() == 1


def test_autumn_dst_start_runs_and_keeps_local_calendar(tmp_path: Path) -> None:
    r = simulate(
        tmp_path, districts=1, nodes_per_district=4, days=3, start="2024-10-26", events=False
    )
    df = read(r.readings_path)
    assert df["timestamp"][0] == "2024-10-25T22:00:00Z"  # CEST, UTC+2
    # The 27th has 25 local hours: 300 readings a node, and the 02:00 hour twice.
    per_day = df.filter(pl.col("node_id") == "d1-tank").group_by("day").len()
    assert dict(per_day.iter_rows())[date(2024, 10, 27)] == 300


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        simulate(tmp_path, nodes_per_district=3)
    with pytest.raises(ValueError):
        simulate(tmp_path, days=0)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--districts", "1", "--nodes-per-district", "4", "--days", "2"]
    assert main([*argv, "--step", "600", "--seed", "5", "--no-events"]) == 0
    said = capsys.readouterr().out
    assert "readings" in said and str(out / "readings.csv") in said
    assert len((out / "readings.csv").read_text().splitlines()) == 1 + 4 * 2 * 144
    assert main(["--out", str(out), "--nodes-per-district", "2"]) == 2


# --- the samples shipped with the project ------------------------------------------------------


def test_sample_is_what_simulate_writes(tmp_path: Path) -> None:
    # The documented command (samples/README.md) must still produce the committed files.
    r = simulate(tmp_path, districts=2, nodes_per_district=6, days=7, seed=42)
    assert (SAMPLES / "simulated_2districts_7days.csv").read_bytes() == r.readings_path.read_bytes()
    assert (
        SAMPLES / "labels" / "simulated_2districts_7days_labels.csv"
    ).read_bytes() == r.labels_path.read_bytes()
    assert (SAMPLES / "network.toml").read_bytes() == r.network_path.read_bytes()
    assert (SAMPLES / "simulated_2districts_7days.csv").stat().st_size < 2_000_000


def test_samples_folder_holds_only_csv_data_at_top_level() -> None:
    top = {p.name for p in SAMPLES.iterdir() if p.is_file()}
    assert {p for p in top if not p.endswith(".csv")} == {"README.md", "network.toml"}
    assert "bwdf_dma_inflows_excerpt_2021-10.csv" in top


def test_bwdf_excerpt_span_and_repeated_hour() -> None:
    raw = (SAMPLES / "bwdf_dma_inflows_excerpt_2021-10.csv").read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[0].startswith(b"Date-time CET-CEST (DD/MM/YYYY HH:mm),DMA 1 (L/s)")
    assert lines[1].startswith(b"18/10/2021 00:00,")
    assert lines[-1] == b""  # ends with CRLF, as the source
    assert lines[-2].startswith(b"07/11/2021 23:00,")
    assert sum(1 for x in lines if x.startswith(b"31/10/2021 02:00,")) == 2
    assert len(lines) - 2 == 21 * 24 + 1
    readme = (SAMPLES / "README.md").read_text()
    assert "Alvisi et al. 2025" in readme and "CC BY 4.0" in readme
