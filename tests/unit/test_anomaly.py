"""Unit tests of dataflows.anomaly: scores, incidents, batching invariance, state size."""

from __future__ import annotations

import pickle

import numpy as np
import polars as pl
import pytest

from dataflows.anomaly import NodeScorer, anomaly_id
from dataflows.model import (
    COL,
    US_PER_DAY,
    US_PER_HOUR,
    US_PER_MIN,
    AnomalyEvent,
    Flag,
    ReadingBatch,
    empty_values,
)
from dataflows.rows import events_rows
from dataflows.settings import Settings
from dataflows.tables import SCHEMAS

START = 1_704_063_600_000_000  # 2024-01-01 00:00 Europe/Rome (a Monday), in µs UTC
STEP = 5 * US_PER_MIN
SETTINGS = Settings(tz="Europe/Rome")


def series(days: int, seed: int = 0, base: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """A clean node: diurnal and weekly demand with noise; pressure falling with flow."""
    rng = np.random.default_rng(seed)
    n = days * 288
    ts = START + np.arange(n, dtype=np.int64) * STEP
    local_h = ((ts - START) // US_PER_MIN % (24 * 60)) / 60.0
    dow = (ts - START) // US_PER_DAY % 7
    peaks = 0.55 * np.exp(-((local_h - 8) ** 2) / 6) + 0.5 * np.exp(-((local_h - 20) ** 2) / 8)
    shape = 0.45 + peaks
    shape = np.where(local_h < 5, 0.35, shape)
    flow = base * shape * np.where(dow >= 5, 0.9, 1.0) * (1 + 0.04 * rng.standard_normal(n))
    values = empty_values(n)
    values[:, COL["flow_rate"]] = flow
    values[:, COL["pressure"]] = 4.5 - 0.008 * flow**2 + 0.03 * rng.standard_normal(n)
    return ts, values


def batch(ts: np.ndarray, values: np.ndarray, flags: np.ndarray | None = None) -> ReadingBatch:
    n = ts.size
    return ReadingBatch(
        "n1",
        "test",
        ts,
        values,
        np.zeros(n, dtype=np.int64),
        quality=np.ones(n),
        flags=np.zeros(n, dtype=np.int64) if flags is None else flags,
    )


def run(
    ts: np.ndarray, values: np.ndarray, sizes: int | list[int] = 288,
    flags: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, AnomalyEvent], NodeScorer]:
    """Score a series in batches; the last state of every event by id, plus flush."""
    scorer = NodeScorer("n1", SETTINGS)
    scores, events = [], []
    if isinstance(sizes, int):
        cuts = list(range(0, ts.size, sizes))
    else:
        cuts = [int(c) for c in np.cumsum([0, *sizes])]
    cuts.append(ts.size)
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        f = None if flags is None else flags[a:b]
        s, ev = scorer.score(batch(ts[a:b], values[a:b], f))
        assert s.shape == (b - a,)
        scores.append(s)
        events += ev
    events += scorer.flush()
    return np.concatenate(scores), {e.anomaly_id: e for e in events}, scorer


def test_scores_in_range_and_neutral_before_warm_up() -> None:
    ts, values = series(21)
    scores, events, _ = run(ts, values)
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.all(scores[:288] == 0.0)  # the first day teaches, it is not judged


def test_clean_seasonal_series_scores_low() -> None:
    ts, values = series(35)
    scores, events, _ = run(ts, values)
    after = scores[7 * 288 :]
    assert np.percentile(after, 99) < 0.5
    assert not events


def inject_burst(values: np.ndarray, ts: np.ndarray, t0: int, t1: int) -> np.ndarray:
    out = values.copy()
    m = (ts >= t0) & (ts < t1)
    out[m, COL["flow_rate"]] += 8.0
    out[m, COL["pressure"]] -= 1.0
    return out


def test_burst_opens_one_event_of_the_right_kind_and_closes() -> None:
    ts, values = series(28)
    t0 = START + 22 * US_PER_DAY + 10 * US_PER_HOUR
    t1 = t0 + 3 * US_PER_HOUR
    scores, events, _ = run(ts, inject_burst(values, ts, t0, t1))
    flow = [e for e in events.values() if e.measurement == "flow_rate"]
    assert len(flow) == 1
    ev = flow[0]
    assert ev.kind == "burst"
    assert abs(ev.started_at - t0) <= 3 * STEP
    assert ev.ended_at is not None and abs(ev.ended_at - (t1 - STEP)) <= 3 * STEP
    assert ev.peak_score >= 0.97 and ev.observed > ev.expected_hi
    assert ev.anomaly_id == anomaly_id("n1", "flow_rate", ev.started_at)
    pressure = [e for e in events.values() if e.measurement == "pressure"]
    assert [e.kind for e in pressure] == ["burst"]
    # Burst readings score high, and only them (a few steps of hysteresis aside).
    inside = (ts >= t0) & (ts < t1)
    assert scores[inside].min() > 0.9


def test_leak_at_night_is_detected_within_a_day_or_two() -> None:
    ts, values = series(28)
    t0 = START + 16 * US_PER_DAY + 13 * US_PER_HOUR  # starts in the afternoon
    night_flow = 0.35 * 10.0
    leaky = values.copy()
    leaky[ts >= t0, COL["flow_rate"]] += 0.5 * night_flow
    _, events, _ = run(ts, leaky)
    leaks = [e for e in events.values() if e.kind == "leak"]
    assert len(leaks) == 1
    assert t0 <= leaks[0].started_at <= t0 + 2 * US_PER_DAY
    assert leaks[0].ended_at is None  # never repaired: still open at the end


def test_anomalous_period_does_not_poison_the_baseline() -> None:
    ts, values = series(35)
    t0 = START + 21 * US_PER_DAY
    t1 = t0 + US_PER_DAY  # a whole-day burst
    scores, events, _ = run(ts, inject_burst(values, ts, t0, t1))
    assert scores[(ts >= t0) & (ts < t1)].mean() > 0.9
    after = scores[ts >= t1 + 2 * US_PER_HOUR]
    assert np.percentile(after, 99) < 0.5
    assert all(e.ended_at is not None and e.ended_at < t1 + US_PER_HOUR for e in events.values())


def test_batch_size_does_not_change_scores_or_events() -> None:
    ts, values = series(24)
    t0 = START + 20 * US_PER_DAY + 3 * US_PER_HOUR
    burst = inject_burst(values, ts, t0, t0 + 2 * US_PER_HOUR)
    s1, e1, _ = run(ts, burst, sizes=288)
    s2, e2, _ = run(ts, burst, sizes=ts.size)
    rng = np.random.default_rng(3)
    sizes = list(rng.integers(1, 500, size=ts.size))
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), ts.size))]
    s3, e3, _ = run(ts, burst, sizes=sizes)
    np.testing.assert_allclose(s1, s2, atol=1e-9)
    np.testing.assert_allclose(s1, s3, atol=1e-9)
    assert set(e1) == set(e2) == set(e3)
    for k in e1:
        assert (e1[k].kind, e1[k].started_at, e1[k].ended_at) == (
            e3[k].kind, e3[k].started_at, e3[k].ended_at
        )
        assert e1[k].peak_score == pytest.approx(e3[k].peak_score)


def test_stuck_and_spike_flags_raise_their_kinds() -> None:
    ts, values = series(10)
    flags = np.zeros(ts.size, dtype=np.int64)
    a, b = 8 * 288 + 100, 8 * 288 + 200
    values = values.copy()
    values[a - 72 : b, COL["pressure"]] = values[a - 73, COL["pressure"]]  # flat for 14 h
    flags[a:b] |= int(Flag.STUCK)
    flags[9 * 288 + 5] |= int(Flag.SPIKE)
    values[9 * 288 + 5, COL["flow_rate"]] *= 4
    scores, events, _ = run(ts, values, sizes=100, flags=flags)
    by_kind = {e.kind: e for e in events.values() if e.kind in ("stuck", "spike")}
    assert by_kind["stuck"].measurement == "pressure"
    assert (by_kind["stuck"].started_at, by_kind["stuck"].ended_at) == (ts[a], ts[b - 1])
    assert by_kind["spike"].measurement == "flow_rate"
    assert by_kind["spike"].started_at == by_kind["spike"].ended_at == ts[9 * 288 + 5]
    assert scores[flags != 0].min() >= 0.8


def test_state_pickles_small_after_sixty_days() -> None:
    ts, values = series(60)
    _, _, scorer = run(ts, values, sizes=2000)
    blob = pickle.dumps(scorer)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    nxt = ts[-1] + STEP * np.arange(1, 289)
    s_a, _ = scorer.score(batch(nxt, values[:288]))
    s_b, _ = clone.score(batch(nxt, values[:288]))
    np.testing.assert_array_equal(s_a, s_b)


def test_empty_batch_and_missing_measurements() -> None:
    scorer = NodeScorer("n1", SETTINGS)
    s, ev = scorer.score(batch(np.zeros(0, dtype=np.int64), empty_values(0)))
    assert s.shape == (0,) and ev == []
    ts = START + np.arange(3 * 288, dtype=np.int64) * STEP
    s, ev = scorer.score(batch(ts, empty_values(ts.size)))  # nothing measured: neutral
    assert np.all(s == 0.0) and ev == []


def test_events_rows_match_the_anomalies_schema() -> None:
    open_ev = AnomalyEvent("a1", "n1", "flow_rate", "leak", START, None, 0.9, 1.0, 2.0, 3.0)
    closed = AnomalyEvent("a1", "n1", "flow_rate", "leak", START, START + US_PER_HOUR, 0.95,
                          1.0, 2.0, float("nan"))
    rows = events_rows([open_ev, closed])
    assert rows.table == "anomalies"
    assert dict(rows.frame.schema) == SCHEMAS["anomalies"]
    assert rows.frame.height == 1
    row = rows.frame.row(0, named=True)
    assert row["ended_at"] is not None and row["peak_score"] == 0.95
    assert row["observed"] is None  # NaN is NULL in the tables
    assert rows.frame["started_at"].dtype == pl.Datetime("us", "UTC")
    assert events_rows([]).frame.height == 0


def test_small_night_flow_leak_on_an_inflow_meter_is_a_leak() -> None:
    """A leak of a few % of the flow (an inflow meter) shows only in the night flow."""
    ts, values = series(28, base=60.0)
    t0 = START + 16 * US_PER_DAY + 13 * US_PER_HOUR
    leaky = values.copy()
    leaky[ts >= t0, COL["flow_rate"]] += 0.05 * 0.35 * 60.0 * 2  # ~10 % of the night flow
    scores, events, _ = run(ts, leaky)
    kinds = sorted(e.kind for e in events.values())
    assert kinds == ["leak"]
    leak = next(iter(events.values()))
    # Judged at the end of the first night window after the start: no look-ahead possible.
    assert t0 < leak.started_at <= t0 + US_PER_DAY
    assert leak.ended_at is None and leak.measurement == "flow_rate"
    first_night_end = START + 17 * US_PER_DAY + 4 * US_PER_HOUR
    assert np.percentile(scores[(ts > START + 7 * US_PER_DAY) & (ts < t0)], 99) < 0.5
    assert scores[ts >= first_night_end].min() > 0.5  # every reading after it is in the leak


def test_repaired_leak_closes_after_a_clean_night() -> None:
    ts, values = series(28)
    t0 = START + 14 * US_PER_DAY + 12 * US_PER_HOUR
    t1 = START + 18 * US_PER_DAY + 12 * US_PER_HOUR
    leaky = values.copy()
    leaky[(ts >= t0) & (ts < t1), COL["flow_rate"]] += 0.5 * 0.35 * 10.0
    _, events, _ = run(ts, leaky)
    leaks = [e for e in events.values() if e.kind == "leak"]
    assert len(leaks) == 1
    assert leaks[0].ended_at is not None and t1 - US_PER_DAY <= leaks[0].ended_at < t1
    assert not [e for e in events.values() if e.kind == "high" and e.started_at >= t0]


def test_burst_step_is_not_a_spike_but_a_single_reading_excursion_is() -> None:
    """Validation flags a burst's first step SPIKE (it cannot look ahead); the scorer waits for
    the next reading: back to the level before = spike, still off = a step (not a spike)."""
    ts, values = series(28)
    t0 = START + 22 * US_PER_DAY + 10 * US_PER_HOUR
    burst = inject_burst(values, ts, t0, t0 + 3 * US_PER_HOUR)
    flags = np.zeros(ts.size, dtype=np.int64)
    i0 = int(np.searchsorted(ts, t0))
    flags[i0] |= int(Flag.SPIKE)  # the burst's onset, as validation flags it
    flags[i0 + 36] |= int(Flag.SPIKE)  # the step back down at its end
    sp = 25 * 288 + 7
    burst[sp, COL["flow_rate"]] *= 4
    flags[sp] |= int(Flag.SPIKE)
    for sizes in (288, [i0 + 1, 300, 288 * 3]):  # a cut right after the flagged onset too
        _, events, _ = run(ts, burst, sizes=sizes, flags=flags)
        spikes = [e for e in events.values() if e.kind == "spike"]
        assert [(e.started_at, e.measurement) for e in spikes] == [(ts[sp], "flow_rate")]
        assert {e.kind for e in events.values() if e.measurement == "flow_rate"} == {
            "burst", "spike"}


def test_abrupt_pressure_drop_on_a_pressure_only_node_is_a_burst() -> None:
    ts, values = series(28)
    values = values.copy()
    values[:, COL["flow_rate"]] = np.nan  # a pressure logger
    t0 = START + 22 * US_PER_DAY + 10 * US_PER_HOUR
    step = values.copy()
    step[(ts >= t0) & (ts < t0 + 2 * US_PER_HOUR), COL["pressure"]] -= 0.8
    slow = values.copy()
    ramp = np.clip((ts - t0) / (3 * US_PER_HOUR), 0, 1) * (ts < t0 + 6 * US_PER_HOUR)
    slow[:, COL["pressure"]] -= 0.8 * ramp
    _, ev_step, _ = run(ts, step)
    _, ev_slow, _ = run(ts, slow)
    assert [e.kind for e in ev_step.values()] == ["burst"]
    assert [e.kind for e in ev_slow.values()] == ["pressure_drop"]


def test_zone_offsets_follow_dst_within_a_batch() -> None:
    from dataflows.anomaly import utc_offsets_us

    # 2024-03-31 01:00 UTC: Europe/Rome goes from +1 h to +2 h.
    change = 1_711_846_800_000_000
    ts = change + np.arange(-3, 3, dtype=np.int64) * 30 * US_PER_MIN
    hours = (utc_offsets_us(ts, "Europe/Rome") // US_PER_HOUR).tolist()
    assert hours == [1, 1, 1, 2, 2, 2]
    wide = np.array([START, START + 200 * US_PER_DAY], dtype=np.int64)  # spanning months
    assert (utc_offsets_us(wide, "Europe/Rome") // US_PER_HOUR).tolist() == [1, 2]


def test_local_time_adds_one_offset_only_when_it_holds_for_the_whole_batch() -> None:
    from dataflows.anomaly_kernels import _local_us

    # 2024-03-31 01:00 UTC: Europe/Rome goes from +1 h to +2 h. The day before the change and
    # the day of it are two UTC days with different offsets: the short path must not apply.
    change = 1_711_846_800_000_000
    across = change + np.array([-2, -1, 0, 2], dtype=np.int64) * US_PER_HOUR
    assert ((_local_us(across, "Europe/Rome") - across) // US_PER_HOUR).tolist() == [1, 1, 2, 2]
    # Two UTC days of one offset (a local day in winter): one offset for all.
    winter = START + np.array([-1, 1], dtype=np.int64) * US_PER_HOUR
    assert ((_local_us(winter, "Europe/Rome") - winter) // US_PER_HOUR).tolist() == [1, 1]


def test_batch_size_does_not_change_events_around_a_night_flow_leak() -> None:
    ts, values = series(24)
    leaky = values.copy()
    t0 = START + 15 * US_PER_DAY + 14 * US_PER_HOUR
    leaky[ts >= t0, COL["flow_rate"]] += 0.5 * 0.35 * 10.0
    # Flow rises before and during the leak, and a burst on top of it.
    for day, amount in ((15, 3.0), (17, 3.0), (19, 9.0)):
        a = START + day * US_PER_DAY + 15 * US_PER_HOUR
        leaky[(ts >= a) & (ts < a + US_PER_HOUR), COL["flow_rate"]] += amount
    rng = np.random.default_rng(5)
    sizes = list(rng.integers(1, 700, size=ts.size))
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), ts.size))]
    runs = [run(ts, leaky, sizes=s) for s in (288, ts.size, sizes)]
    states = [
        {k: (e.kind, e.started_at, e.ended_at) for k, e in ev.items()} for _, ev, _ in runs
    ]
    assert states[0] == states[1] == states[2]
    assert "leak" in {kind for kind, _, _ in states[0].values()}
    np.testing.assert_allclose(runs[0][0], runs[2][0], atol=1e-9)


def test_a_quality_probe_is_scored_on_its_own_measurements() -> None:
    """A probe whose role is ``quality``: its chlorine falling from 0.5 to 0.1 mg/L for a day
    (a dosing failure) opens a ``low`` chlorine event; scored as a hydraulic node (no role),
    the same readings give nothing, and a flow meter keeps the small hydraulic state."""
    import tomllib

    from dataflows.topology import parse_network

    rng = np.random.default_rng(4)
    n = 21 * 288
    ts = START + np.arange(n, dtype=np.int64) * STEP
    values = empty_values(n)
    values[:, COL["chlorine"]] = 0.5 + 0.01 * rng.standard_normal(n)
    values[:, COL["ph"]] = 7.4 + 0.02 * rng.standard_normal(n)
    drop = (ts >= START + 18 * US_PER_DAY) & (ts < START + 19 * US_PER_DAY)
    values[drop, COL["chlorine"]] = 0.1 + 0.01 * rng.standard_normal(int(drop.sum()))
    network = parse_network(tomllib.loads('[nodes.n1]\nrole = "quality"\n'))
    settings = Settings(tz="Europe/Rome", network=network)
    probe = NodeScorer("n1", settings)
    assert probe.measurements == ("chlorine", "ph", "turbidity", "conductivity",
                                 "temperature", "redox")
    events = []
    for a in range(0, n, 288):
        events += probe.score(batch(ts[a:a + 288], values[a:a + 288]))[1]
    found = {(e.measurement, e.kind) for e in events}
    assert ("chlorine", "low") in found
    first = min(e.started_at for e in events if e.measurement == "chlorine")
    assert START + 18 * US_PER_DAY <= first < START + 18 * US_PER_DAY + US_PER_HOUR
    hydraulic = NodeScorer("n1", SETTINGS)
    assert all(not hydraulic.score(batch(ts[a:a + 288], values[a:a + 288]))[1]
               for a in range(0, n, 288))
    assert NodeScorer("other", settings).measurements == ("flow_rate", "pressure", "level")


def test_how_a_pressure_fall_near_a_flow_burst_is_judged_does_not_depend_on_the_batches() -> None:
    """A fall counts as the burst's only from an hour before the burst on. A batch that ends while
    a burst is open used to make every fall judged in it a burst, even one over before the burst
    began: the same data cut elsewhere said pressure_drop (a live run against a replay)."""
    ts, values = series(28)
    t0 = START + 22 * US_PER_DAY + 10 * US_PER_HOUR  # the flow burst, 2 h
    flow_burst = (ts >= t0) & (ts < t0 + 2 * US_PER_HOUR)
    cut_a = int(np.searchsorted(ts, t0 - 4 * US_PER_HOUR))
    cut_b = int(np.searchsorted(ts, t0 + 30 * US_PER_MIN))  # a batch ends inside the burst
    for fall_at, kind in ((-90, "pressure_drop"), (-45, "burst")):
        fall = values.copy()
        # A gradual fall of 0.8 bar: 20 minutes down, 20 held, 20 back up.
        minutes = (ts - (t0 + fall_at * US_PER_MIN)) / US_PER_MIN
        shape = np.clip(minutes / 20, 0, 1) * np.clip((60 - minutes) / 20, 0, 1)
        fall[:, COL["pressure"]] -= 0.8 * shape
        fall[flow_burst, COL["flow_rate"]] += 8.0
        seen = []
        for sizes in (ts.size, [1] * ts.size, [cut_a, cut_b - cut_a, ts.size - cut_b]):
            _, events, _ = run(ts, fall, sizes=sizes)
            seen.append(sorted((e.measurement, e.kind, e.started_at, e.ended_at)
                               for e in events.values()))
        assert seen[0] == seen[1] == seen[2], (fall_at, seen)
        assert [k for m, k, _, _ in seen[0] if m == "pressure"] == [kind], (fall_at, seen[0])
