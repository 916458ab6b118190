"""Demand forecasts: calendar, the seasonal baseline and accuracy against hand-computed values,
issue schedule, no look-ahead, batching, districts, pickling."""

from __future__ import annotations

import pickle
from datetime import UTC, date, datetime

import numpy as np
import polars as pl
import pytest

from dataflows.cli_forecast import bwdf_metrics
from dataflows.forecast import (
    FLOW_QUANTUM,
    HORIZON_H,
    MODELS,
    ClosedDay,
    DistrictForecaster,
    NodeForecaster,
    SeriesForecaster,
    _Rows,
    closed_days_by_district,
)
from dataflows.forecast_calendar import (
    day_type,
    easter_sunday,
    is_holiday,
    local_hours,
    local_midnight_us,
    target_slots,
)
from dataflows.forecast_models import Grid, seasonal
from dataflows.model import COL, US_PER_HOUR, US_PER_MIN, ReadingBatch, empty_values
from dataflows.topology import parse_network

TZ = "Europe/Rome"
MONDAY = date(2024, 9, 2).toordinal()  # a Monday, no holiday for weeks around


def _us(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1_000_000)


# --------------------------------------------------------------------------- calendar


def test_italian_holidays_with_easter_monday_and_extra_days():
    assert easter_sunday(2024) == date(2024, 3, 31)
    assert is_holiday(date(2024, 4, 1))  # Pasquetta
    assert is_holiday(date(2023, 4, 10))
    assert not is_holiday(date(2024, 4, 2))
    assert is_holiday(date(2024, 6, 2)) and is_holiday(date(2024, 12, 26))
    assert not is_holiday(date(2024, 3, 18))
    assert is_holiday(date(2024, 3, 18), ("03-18",))  # a patron saint
    assert is_holiday(date(2024, 5, 2), ("2024-05-02",))
    assert not is_holiday(date(2025, 5, 2), ("2024-05-02",))
    assert day_type(date(2024, 8, 15).toordinal()) == 6  # Thursday, Ferragosto: a Sunday
    assert day_type(date(2024, 8, 14).toordinal()) == 2
    with pytest.raises(ValueError, match="MM-DD"):
        is_holiday(date(2024, 1, 2), ("second of january",))


def test_local_hours_across_the_autumn_and_spring_changes():
    # 2024-10-27: 02:00 local happens twice (00:00Z and 01:00Z); both fall in local hour 2
    autumn = np.array([_us("2024-10-27T00:30:00+00:00"), _us("2024-10-27T01:30:00+00:00")])
    hours = local_hours(autumn, TZ)
    assert (hours % 24).tolist() == [2, 2]
    # 2024-03-31: 01:30Z is 03:30 local (02:xx does not exist)
    assert (local_hours(np.array([_us("2024-03-31T01:30:00+00:00")]), TZ) % 24).tolist() == [3]
    # a week issued on the autumn Sunday spans 169 local slots: one slot repeats
    ts, slots = target_slots(date(2024, 10, 27).toordinal(), HORIZON_H, TZ)
    assert ts[0] == _us("2024-10-26T22:00:00+00:00")
    assert slots[:4].tolist() == [0, 1, 2, 2]
    assert slots[-1] == 166
    ts, slots = target_slots(date(2024, 3, 31).toordinal(), HORIZON_H, TZ)
    assert slots[:3].tolist() == [0, 1, 3] and slots[-1] == 168  # 8th local day, hour 0


# --------------------------------------------------------------------------- baseline


def _grid(values: np.ndarray, first: int = MONDAY) -> Grid:
    n = len(values)
    types = np.array([day_type(first + i) for i in range(n + 8)], dtype=np.int8)
    return Grid(first, values.astype(np.float32), types, np.zeros(n + 8, bool),
                np.full(n, np.nan), np.full(n, np.nan))


def test_seasonal_is_the_median_of_the_same_weekday_scaled_by_the_level():
    # four weeks; every Monday flat at its own value, one of them a burst (not learned)
    days = np.full((28, 24), 5.0)
    for week, value in enumerate([4.0, 6.0, 100.0, 5.0]):
        days[7 * week] = value
    grid = _grid(days)
    grid.ratio[-3:] = [1.1, 1.2, 0.9]  # the level of the last three days: median 1.1
    forecast = seasonal(grid)
    # Monday (day 28 = the first forecast day): median of 4, 6, 100, 5 = 5.5, times 1.1
    assert forecast.shape == (8, 24)
    assert forecast[0] == pytest.approx(np.full(24, 5.5 * 1.1))
    assert forecast[1] == pytest.approx(np.full(24, 5.0 * 1.1))  # Tuesdays: all 5


def test_seasonal_skips_gaps_and_falls_back_to_any_day_in_the_first_week():
    days = np.tile(np.arange(24.0), (10, 1))
    days[3] = np.nan  # a day without data (the Thursday)
    days[8, :20] = np.nan  # 4 valid hours only: too few for a profile (Tuesday)
    forecast = seasonal(_grid(days))
    # Wednesday (forecast day 2 = day 12): only one Wednesday (day 2) so far
    assert forecast[2] == pytest.approx(np.arange(24.0))
    # the Thursday before was empty, there is none other: the last days of any type
    assert forecast[3] == pytest.approx(np.arange(24.0))
    # level unknown (no ratio yet): unscaled


def _flow_batch(node: str, start_us: int, values: np.ndarray, step_min: int = 5) -> ReadingBatch:
    n = len(values)
    vals = empty_values(n)
    vals[:, COL["flow_rate"]] = values
    ts = start_us + np.arange(n, dtype=np.int64) * step_min * US_PER_MIN
    return ReadingBatch(node, "t.csv", ts, vals, np.arange(1, n + 1), np.ones(n),
                        np.zeros(n, np.int64))


def test_forecasts_issued_every_local_midnight_with_168_hours_per_model():
    start = local_midnight_us(MONDAY, TZ)
    node = NodeForecaster("n1", TZ)
    out = node.update(_flow_batch("n1", start, np.full(4 * 288, 10.0)))  # 4 days, 5-min steps
    frame = out.forecasts.frame
    issues = sorted(set(frame["issued_at"].dt.epoch("us").to_list()))
    # days 1, 2 and 3 closed when the next day's first reading came; day 4 is still open
    assert issues == [local_midnight_us(MONDAY + d, TZ) for d in (1, 2, 3)]
    assert frame.group_by("issued_at", "model").len()["len"].to_list() == [HORIZON_H] * 6
    assert set(frame["model"]) == set(MODELS)
    assert frame["yhat"].to_numpy() == pytest.approx(10.0)  # a flat series
    first = frame.filter(pl.col("issued_at").dt.epoch("us") == issues[0]).sort("target_ts")
    assert first["target_ts"][0] == datetime(2024, 9, 2, 22, tzinfo=UTC)  # 00:00 local
    assert (first["yhat_lo"] < first["yhat"]).all() and (first["yhat_hi"] > first["yhat"]).all()
    # at the end of the replay the last day is complete: it closes and issues day 5
    flushed = node.flush().forecasts.frame
    assert set(flushed["issued_at"].dt.epoch("us")) == {local_midnight_us(MONDAY + 4, TZ)}


def test_accuracy_rows_hand_computed():
    series = SeriesForecaster("n1", TZ)
    rows = _Rows()
    for d in range(14):
        series.close(MONDAY + d, np.full(24, 10.0), rows)
    # both models forecast 10 L/s flat for the day after (nothing learned deviates)
    assert series.pending_[MONDAY + 14][:, 0] == pytest.approx(10.0)
    rows = _Rows()
    actual = np.r_[np.full(12, 12.0), np.full(12, 8.0), ]
    actual[5] = np.nan  # an hour without data is not scored
    series.close(MONDAY + 14, actual, rows)
    out = rows.out("n1", [])
    acc = out.accuracy.frame.sort("model", "horizon_h")
    day_start = datetime.fromtimestamp(local_midnight_us(MONDAY + 14, TZ) / 1e6, UTC)
    first_band = acc.filter(pl.col("horizon_h") == 24)
    assert first_band["model"].to_list() == sorted(MODELS)
    assert first_band["period_start"].to_list() == [day_start, day_start]
    assert first_band["n"].to_list() == [23, 23]
    assert first_band["mae"].to_list() == pytest.approx([2.0, 2.0])
    # 11 hours of |10-12|/12 and 12 of |10-8|/8
    assert first_band["mape"].to_list() == pytest.approx([(11 / 6 + 12 / 4) / 23] * 2)
    # the issues of the 6 days before also covered that day, in the longer bands
    assert sorted(acc.filter(pl.col("model") == "seasonal")["horizon_h"]) == [24, 72, 168]
    assert acc.filter(pl.col("horizon_h") == 168)["n"].to_list() == [4 * 23, 4 * 23]


def test_bwdf_metrics_hand_computed():
    actual = np.full(168, 10.0)
    yhat = actual.copy()
    yhat[:24] += np.r_[np.full(12, 1.0), np.full(12, -3.0)]
    yhat[24:] -= 0.5
    actual[30] = np.nan
    assert bwdf_metrics(yhat, actual) == pytest.approx((2.0, 3.0, 0.5))


# --------------------------------------------------------------------------- no look-ahead


def _history(days: int, seed: int = 1) -> tuple[int, np.ndarray]:
    """Five-minute flows with a daily and weekly pattern and noise, from a Monday."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * 288)
    hour = (t // 12) % 24
    weekday = (t // 288) % 7
    flow = 10 + 5 * np.sin((hour - 6) / 24 * 2 * np.pi) + (weekday >= 5) * 2
    return local_midnight_us(MONDAY, TZ), flow + rng.normal(0, 0.5, len(t))


def _run(node: NodeForecaster, batches: list[ReadingBatch], flush: bool = True) -> pl.DataFrame:
    frames = [o.forecasts.frame for o in map(node.update, batches) if o.forecasts is not None]
    if flush and (last := node.flush()).forecasts is not None:
        frames.append(last.forecasts.frame)
    return pl.concat(frames).sort("issued_at", "model", "target_ts")


def _accuracy(node: NodeForecaster, batches: list[ReadingBatch]) -> pl.DataFrame:
    frames = [o.accuracy.frame for o in map(node.update, batches) if o.accuracy is not None]
    return pl.concat(frames).sort("period_start", "model", "horizon_h")


def test_forecast_at_t_is_the_same_without_the_data_after_t():
    start, flow = _history(30)
    whole = _flow_batch("n1", start, flow)
    issue = local_midnight_us(MONDAY + 20, TZ)
    everything = _run(NodeForecaster("n1", TZ), [whole])
    before = whole.take(whole.ts < issue)
    cut = _run(NodeForecaster("n1", TZ), [before])  # the flush closes the last day
    at_issue = pl.col("issued_at").dt.epoch("us") == issue
    expected = everything.filter(at_issue)
    assert expected.height == 2 * HORIZON_H
    assert cut.filter(at_issue).equals(expected)
    assert cut["issued_at"].max() == expected["issued_at"][0]  # nothing later was issued


def test_results_do_not_depend_on_how_the_readings_are_batched():
    start, flow = _history(24, seed=2)
    whole = _flow_batch("n1", start, flow)
    one = _run(NodeForecaster("n1", TZ), [whole])
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, len(whole)), 400, replace=False))
    pieces = [whole.take(idx) for idx in np.split(np.arange(len(whole)), cuts)]
    many = _run(NodeForecaster("n1", TZ), pieces)
    assert many.equals(one)
    assert _accuracy(NodeForecaster("n1", TZ), pieces).equals(
        _accuracy(NodeForecaster("n1", TZ), [whole])
    )


def test_a_late_reading_of_a_closed_day_changes_nothing():
    start, flow = _history(10, seed=4)
    whole = _flow_batch("n1", start, flow)
    late = whole.take(np.array([100]))  # day 0, arriving after everything
    late_values = late.values.copy()
    late_values[:, COL["flow_rate"]] = 1000.0
    late = ReadingBatch("n1", "t.csv", late.ts, late_values, late.line, late.quality, late.flags)
    clean = _run(NodeForecaster("n1", TZ), [whole])
    node = NodeForecaster("n1", TZ)
    node.update(whole)
    assert node.update(late).forecasts is None
    assert _run(node, [], flush=True).equals(clean.filter(
        pl.col("issued_at") == clean["issued_at"].max()))


def test_state_pickles_and_resumes_identically():
    start, flow = _history(20, seed=5)
    whole = _flow_batch("n1", start, flow)
    half = len(whole) // 2
    first, second = whole.take(np.arange(half)), whole.take(np.arange(half, len(whole)))
    straight = NodeForecaster("n1", TZ)
    straight.update(first)
    resumed = pickle.loads(pickle.dumps(straight))
    assert "_memo" not in pickle.dumps(straight).decode("latin-1")
    assert len(pickle.dumps(straight)) < 20_000
    assert _run(resumed, [second]).equals(_run(straight, [second]))


def test_ridge_learns_what_the_seasonal_median_cannot():
    # weeks alternate between 8 and 12 L/s: the median of the last weeks says 10, the same
    # day a week before (a ridge feature) says the opposite of what comes
    days, rows = 84, _Rows()
    series = SeriesForecaster("n1", TZ)
    for d in range(days):
        series.close(MONDAY + d, np.full(24, 8.0 if (d // 7) % 2 else 12.0), rows)
    frame = rows.out("n1", []).accuracy.frame
    recent = frame.filter(pl.col("period_start").dt.epoch("us")
                          >= local_midnight_us(MONDAY + days - 14, TZ))
    mae = dict(recent.group_by("model").agg(pl.col("mae").mean()).iter_rows())
    assert mae["ridge"] < 0.5 * mae["seasonal"]


# --------------------------------------------------------------------------- districts

NETWORK = parse_network({
    "districts": {"d1": {}},
    "nodes": {
        "a": {"district": "d1", "role": "inflow"},
        "b": {"district": "d1", "role": "inflow"},
        "o": {"district": "d1", "role": "outflow"},
        "c": {"district": "d1", "role": "consumption"},
    },
})


def test_district_demand_is_inflows_minus_outflows_whatever_the_meters_order():
    def days(node: str, value: float) -> list[ClosedDay]:
        return [ClosedDay(node, MONDAY + d, np.full(24, value)) for d in range(10)]

    meters = {"a": 1.0, "b": 1.0, "o": -1.0}
    feeds = {"a": days("a", 5.0), "b": days("b", 4.0), "o": days("o", 2.0)}
    orders = [
        [d for trio in zip(feeds["a"], feeds["b"], feeds["o"], strict=True) for d in trio],
        feeds["o"] + feeds["b"] + feeds["a"],
    ]
    results = []
    for order in orders:
        district = DistrictForecaster("d1", TZ, meters)
        frames = [f for f in (district.update(d).forecasts for d in order) if f is not None]
        results.append(pl.concat([f.frame for f in frames]).sort("issued_at", "model", "target_ts"))
        assert district.series.values_[0] == pytest.approx(np.full(24, 7.0))
    assert results[0].equals(results[1])
    assert set(results[0]["node_id"]) == {"d1"}
    assert results[0]["yhat"].to_numpy() == pytest.approx(7.0)


def test_only_meters_feed_their_district():
    day = ClosedDay("a", MONDAY, np.zeros(24))
    from dataflows.forecast import ForecastOut

    assert closed_days_by_district(NETWORK, ForecastOut(closed=[day])) == [("d1", day)]
    consumer = ForecastOut(closed=[ClosedDay("c", MONDAY, np.zeros(24))])
    assert closed_days_by_district(NETWORK, consumer) == []
    assert closed_days_by_district(NETWORK, ForecastOut()) == []


def test_a_silent_meter_holds_the_district_back_at_most_max_wait_days():
    from dataflows.forecast import MAX_WAIT_DAYS

    district = DistrictForecaster("d1", TZ, {"a": 1.0, "b": 1.0})
    for d in range(MAX_WAIT_DAYS + 2):
        district.update(ClosedDay("a", MONDAY + d, np.full(24, 3.0)))
    # b never reported: the first days were combined without it (unknown hours)
    assert district.series.last_closed == MONDAY + 1
    assert np.isnan(district.series.values_).all()


def test_flow_per_hour_is_the_mean_of_the_hours_readings():
    start = local_midnight_us(MONDAY, TZ)
    values = np.r_[np.full(6, 1.0), np.full(6, 3.0), np.full(288 - 12, 2.0), [9.0]]
    node = NodeForecaster("n1", TZ)
    out = node.update(_flow_batch("n1", start, values))
    (day,) = out.closed
    assert day.day == MONDAY
    assert day.values[0] == pytest.approx(2.0) and day.values[1:] == pytest.approx(2.0)
    assert node.open_day_ == MONDAY + 1 and node.sums_[0] == 9.0 / FLOW_QUANTUM
    assert US_PER_HOUR == 12 * 5 * US_PER_MIN
