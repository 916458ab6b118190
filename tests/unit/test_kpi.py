import math
import pickle
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from dataflows.kpi import NodeWindows, WindowOutput
from dataflows.model import COL, MEASUREMENTS, US_PER_MIN, US_PER_S, ReadingBatch, empty_values
from dataflows.settings import Settings
from dataflows.tables import SCHEMAS
from dataflows.topology import Network

MIN = US_PER_MIN
HOUR = 60 * MIN


def at(*args: int) -> int:
    """µs UTC of a UTC wall time."""
    return int(datetime(*args, tzinfo=UTC).timestamp()) * US_PER_S


def batch(ts, node="n1", quality=None, score=None, **measurements) -> ReadingBatch:
    ts = np.asarray(ts, dtype=np.int64)
    values = empty_values(len(ts))
    for name, col in measurements.items():
        values[:, COL[name]] = np.asarray(col, dtype=np.float64)
    return ReadingBatch(
        node_id=node,
        source="test",
        ts=ts,
        values=values,
        line=np.arange(1, len(ts) + 1, dtype=np.int64),
        quality=np.ones(len(ts)) if quality is None else np.asarray(quality, dtype=np.float64),
        flags=np.zeros(len(ts), dtype=np.int64),
        score=np.zeros(len(ts)) if score is None else np.asarray(score, dtype=np.float64),
    )


def settings(**kw) -> Settings:
    kw.setdefault("tz", "UTC")
    return Settings(**kw)


def rows(out: WindowOutput, table: str) -> list[dict]:
    tr = out.kpi_15m if table == "kpi_15m" else out.kpi_daily
    return [] if tr is None else tr.frame.to_dicts()


def by_window(out: WindowOutput) -> dict[datetime, dict]:
    return {r["window_start"]: r for r in rows(out, "kpi_15m")}


def by_day(out: WindowOutput) -> dict[date, dict]:
    return {r["day"]: r for r in rows(out, "kpi_daily")}


def test_five_minute_series_exact_window_stats():
    t0 = at(2024, 1, 1, 0, 0)
    ts = t0 + np.array([0, 5, 10, 15, 20, 25, 30, 40]) * MIN  # 00:35 missing
    flow = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 4.0, 6.0]
    pressure = [3.0, np.nan, 5.0, np.nan, np.nan, np.nan, 2.5, 2.5]
    quality = [1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 0.8, 0.6]
    score = [0.1, 0.9, 0.2, 0.0, 0.3, 0.1, 0.0, 0.0]
    nw = NodeWindows("n1", settings())
    out = nw.update(batch(ts, flow_rate=flow, pressure=pressure, quality=quality, score=score))

    assert not out.late.any()
    assert out.kpi_15m is not None and out.kpi_15m.frame.columns == list(SCHEMAS["kpi_15m"])
    w = by_window(out)
    assert len(w) == 3
    first = w[datetime(2024, 1, 1, 0, 0, tzinfo=UTC)]
    assert first["node_id"] == "n1"
    assert first["n"] == 3
    assert first["completeness"] == 1.0
    assert first["flow_rate_avg"] == pytest.approx(2.0)
    assert (first["flow_rate_min"], first["flow_rate_max"]) == (1.0, 3.0)
    assert first["flow_rate_std"] == pytest.approx(math.sqrt(2 / 3))  # population std
    assert first["pressure_avg"] == pytest.approx(4.0)
    assert first["pressure_std"] == pytest.approx(1.0)
    assert first["quality_avg"] == pytest.approx(0.5)
    assert first["score_max"] == pytest.approx(0.9)
    assert first["temperature_avg"] is None and first["temperature_std"] is None
    second = w[datetime(2024, 1, 1, 0, 15, tzinfo=UTC)]
    assert second["flow_rate_avg"] == pytest.approx(20.0)
    assert second["flow_rate_std"] == pytest.approx(math.sqrt(200 / 3))
    assert second["pressure_avg"] is None  # no pressure in that window: null, not NaN
    third = w[datetime(2024, 1, 1, 0, 30, tzinfo=UTC)]
    assert third["n"] == 2
    assert third["completeness"] == pytest.approx(2 / 3)
    assert third["flow_rate_std"] == pytest.approx(1.0)
    assert third["pressure_std"] == 0.0


def test_hourly_node_window_is_complete_with_its_one_reading():
    ts = at(2024, 1, 1) + np.arange(6) * HOUR
    out = NodeWindows("n1", settings()).update(batch(ts, flow_rate=np.ones(6)))
    frame = out.kpi_15m.frame
    assert frame["n"].to_list() == [1] * 6
    # The first reading comes before any interval is known: its window's completeness is
    # unknown (as it would be had the reading arrived alone), the others are complete.
    assert frame["completeness"].to_list() == [None] + [1.0] * 5
    # A day of hourly readings: 6 of 24 expected.
    assert by_day(out)[date(2024, 1, 1)]["completeness"] == pytest.approx(6 / 24)


def test_interval_estimate_snaps_to_the_nominal_period_under_jitter():
    rng = np.random.default_rng(0)
    ts = at(2024, 1, 1) + np.arange(40) * 5 * MIN + rng.integers(-20, 20, 40) * US_PER_S
    nw = NodeWindows("n1", settings())
    nw.update(batch(ts, flow_rate=np.ones(40)))
    assert nw.interval_s == 300.0
    odd = NodeWindows("n1", settings())
    odd.update(batch(at(2024, 1, 1) + np.arange(5) * 400 * US_PER_S, flow_rate=np.ones(5)))
    assert odd.interval_s == 400.0  # not near a usual period: the median as measured


def test_volume_from_totalizer_with_reset():
    ts = at(2024, 1, 1) + np.arange(6) * 5 * MIN
    total = [100.0, 100.5, 101.0, 1.0, 1.5, 2.0]  # reset between 00:10 and 00:15
    flow = [50.0] * 6  # ignored for volume: the node has a totalizer
    out = NodeWindows("n1", settings()).update(batch(ts, total_flow=total, flow_rate=flow))
    w = by_window(out)
    # First reading has no reference (0); the reset counts the new value from 0 (1.0).
    assert w[datetime(2024, 1, 1, 0, 0, tzinfo=UTC)]["volume_m3"] == pytest.approx(1.0)
    assert w[datetime(2024, 1, 1, 0, 15, tzinfo=UTC)]["volume_m3"] == pytest.approx(2.0)
    assert by_day(out)[date(2024, 1, 1)]["volume_m3"] == pytest.approx(3.0)


def test_totalizer_increment_goes_to_the_window_of_the_later_reading_across_batches():
    nw = NodeWindows("n1", settings())
    t0 = at(2024, 1, 1)
    nw.update(batch([t0 + 10 * MIN], total_flow=[10.0]))
    out = nw.update(batch([t0 + 20 * MIN], total_flow=[12.5]))
    w = by_window(out)
    assert list(w) == [datetime(2024, 1, 1, 0, 15, tzinfo=UTC)]
    assert w[datetime(2024, 1, 1, 0, 15, tzinfo=UTC)]["volume_m3"] == pytest.approx(2.5)
    # An out-of-order totalizer value neither looks like a reset nor adds volume.
    out = nw.update(batch([t0 + 12 * MIN, t0 + 30 * MIN], total_flow=[11.0, 13.0]))
    w = by_window(out)
    assert w[datetime(2024, 1, 1, 0, 0, tzinfo=UTC)]["volume_m3"] == 0.0
    assert w[datetime(2024, 1, 1, 0, 30, tzinfo=UTC)]["volume_m3"] == pytest.approx(0.5)
    assert by_day(out)[date(2024, 1, 1)]["volume_m3"] == pytest.approx(3.0)


def test_volume_from_flow_without_totalizer():
    ts = at(2024, 1, 1) + np.arange(96 * 3) * 5 * MIN  # a whole day
    flow = np.tile([1.0, 2.0, 3.0], 96)  # 2 L/s on average in every window
    out = NodeWindows("n1", settings()).update(batch(ts, flow_rate=flow))
    volumes = out.kpi_15m.frame["volume_m3"].to_numpy()
    assert np.allclose(volumes, 2.0 * 900 / 1000)  # 1.8 m3
    day = by_day(out)[date(2024, 1, 1)]
    assert day["volume_m3"] == pytest.approx(96 * 1.8)
    assert day["n"] == 288 and day["completeness"] == 1.0
    assert day["flow_rate_avg"] == pytest.approx(2.0)
    assert (day["flow_rate_min"], day["flow_rate_max"]) == (1.0, 3.0)
    assert day["mnf"] == pytest.approx(2.0)
    assert day["pressure_compliance"] is None and day["pressure_avg"] is None


def test_no_volume_without_flow_or_totalizer():
    ts = at(2024, 1, 1) + np.arange(3) * 5 * MIN
    out = NodeWindows("n1", settings()).update(batch(ts, pressure=[3.0, 3.0, 3.0]))
    assert out.kpi_15m.frame["volume_m3"].to_list() == [None]
    day = by_day(out)[date(2024, 1, 1)]
    assert day["volume_m3"] is None and day["mnf"] is None


def test_minimum_night_flow_uses_local_night_window_means():
    # 2024-06-10 in Rome is UTC+2: local 02:00-04:59 is 00:00-02:59 UTC.
    ts = at(2024, 6, 9, 22, 0) + np.arange(24 * 12) * 5 * MIN  # the local day, 5-min steps
    local_hour = (np.arange(24 * 12) * 5 // 60) % 24
    flow = np.full(ts.size, 5.0)
    flow[local_hour == 1] = 0.1  # 01:xx local: before the night, must not count
    flow[local_hour == 5] = 0.2  # 05:xx local: after it
    i = np.flatnonzero(local_hour == 3)[6:9]  # the 03:30 local window
    flow[i] = [0.6, 0.7, 0.8]  # mean 0.7
    j = np.flatnonzero(local_hour == 2)[:3]  # 02:00 window: lowest reading, mean 1.0
    flow[j] = [0.5, 1.5, 1.0]
    out = NodeWindows("n1", settings(tz="Europe/Rome")).update(batch(ts, flow_rate=flow))
    days = by_day(out)
    assert list(days) == [date(2024, 6, 10)]
    assert days[date(2024, 6, 10)]["mnf"] == pytest.approx(0.7)
    assert days[date(2024, 6, 10)]["flow_rate_min"] == pytest.approx(0.1)


def test_minimum_night_flow_follows_a_late_reading_that_raises_the_minimum():
    nw = NodeWindows("n1", settings())
    t0 = at(2024, 1, 1, 2, 0)
    nw.update(batch(t0 + np.array([0, 15, 30]) * MIN, flow_rate=[1.0, 0.5, 2.0]))
    out = nw.update(batch([t0 + 20 * MIN], flow_rate=[1.5]))  # 02:15 window now averages 1.0
    assert by_day(out)[date(2024, 1, 1)]["mnf"] == pytest.approx(1.0)


def test_pressure_compliance_share():
    ts = at(2024, 1, 1) + np.arange(7) * 5 * MIN
    pressure = [1.5, 2.0, 3.0, 6.0, 6.5, np.nan, 4.0]  # in [2, 6]: 2.0, 3.0, 6.0, 4.0
    s = settings(network=Network(pressure_band=(2.0, 6.0)))
    out = NodeWindows("n1", s).update(batch(ts, pressure=pressure))
    day = by_day(out)[date(2024, 1, 1)]
    assert day["pressure_compliance"] == pytest.approx(4 / 6)
    assert day["pressure_avg"] == pytest.approx(23.0 / 6)
    assert (day["pressure_min"], day["pressure_max"]) == (1.5, 6.5)
    assert day["n"] == 7


@pytest.mark.parametrize(
    ("day", "hours"), [(date(2024, 10, 27), 25), (date(2024, 3, 31), 23), (date(2024, 6, 1), 24)]
)
def test_dst_days_in_rome_group_the_local_day(day, hours):
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * US_PER_S
    ts = start + np.arange(-6, 30) * HOUR  # hourly, from the evening before to the day after
    flow = np.arange(ts.size, dtype=np.float64)
    out = NodeWindows("n1", settings(tz="Europe/Rome")).update(batch(ts, flow_rate=flow))
    days = by_day(out)
    row = days[day]
    assert row["n"] == hours
    assert row["completeness"] == 1.0
    # Local midnight is 22:00 or 23:00 UTC the evening before.
    midnight = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo("Europe/Rome"))
    first = int(midnight.timestamp()) * US_PER_S
    expected = flow[(ts >= first) & (ts < first + hours * HOUR)]
    assert expected.size == hours
    assert row["flow_rate_avg"] == pytest.approx(expected.mean())
    assert (row["flow_rate_min"], row["flow_rate_max"]) == (expected.min(), expected.max())
    assert sum(r["n"] for r in days.values()) == ts.size


def test_night_of_the_fall_back_day_spans_four_hours():
    # 2024-10-27 Rome: local 02:00-04:59 is 00:00-03:59 UTC (02:xx happens twice).
    ts = at(2024, 10, 26, 22, 0) + np.arange(25) * HOUR
    flow = np.full(25, 9.0)
    flow[5] = 0.3  # 03:00 UTC = 04:00 CET: still night
    flow[6] = 0.1  # 04:00 UTC = 05:00 CET: morning
    flow[1] = 0.2  # 23:00 UTC = 00:00 CEST: before the night
    out = NodeWindows("n1", settings(tz="Europe/Rome")).update(batch(ts, flow_rate=flow))
    assert by_day(out)[date(2024, 10, 27)]["mnf"] == pytest.approx(0.3)


def test_night_of_the_spring_forward_day_spans_two_hours():
    # 2024-03-31 Rome: 02:xx does not exist; the night is 03:00-04:59 CEST = 01:00-02:59 UTC.
    ts = at(2024, 3, 30, 23, 0) + np.arange(23) * HOUR
    flow = np.full(23, 9.0)
    flow[1] = 0.1  # 00:00 UTC = 01:00 CET: before the night
    flow[2] = 0.4  # 01:00 UTC = 03:00 CEST: the night's first hour
    flow[4] = 0.2  # 03:00 UTC = 05:00 CEST: morning
    out = NodeWindows("n1", settings(tz="Europe/Rome")).update(batch(ts, flow_rate=flow))
    assert by_day(out)[date(2024, 3, 31)]["mnf"] == pytest.approx(0.4)


def late_fixture() -> tuple[NodeWindows, np.ndarray, np.ndarray]:
    """Three hours of 5-min readings without 02:10, lateness 1 h (watermark 01:55)."""
    ts = at(2024, 1, 1) + np.arange(36) * 5 * MIN
    flow = np.arange(36, dtype=np.float64)
    keep = ts != at(2024, 1, 1, 2, 10)
    nw = NodeWindows("n1", settings(allowed_lateness_s=3600))
    out = nw.update(batch(ts[keep], flow_rate=flow[keep]))
    assert not out.late.any()
    return nw, ts, flow


def test_late_but_allowed_reading_re_emits_its_window_and_day():
    nw, ts, flow = late_fixture()
    out = nw.update(batch([at(2024, 1, 1, 2, 10)], flow_rate=[100.0]))
    assert out.late.tolist() == [False]
    w = by_window(out)
    assert list(w) == [datetime(2024, 1, 1, 2, 0, tzinfo=UTC)]
    row = w[datetime(2024, 1, 1, 2, 0, tzinfo=UTC)]
    assert row["n"] == 3
    assert row["flow_rate_avg"] == pytest.approx((24 + 25 + 100) / 3)
    assert row["flow_rate_max"] == 100.0
    assert row["volume_m3"] == pytest.approx((24 + 25 + 100) / 3 * 0.9)
    day = by_day(out)[date(2024, 1, 1)]
    assert day["n"] == 36  # the reading counts once, the window's earlier state is not re-added
    total = flow.sum() - 26 + 100
    assert day["flow_rate_avg"] == pytest.approx(total / 36)
    assert day["volume_m3"] == pytest.approx(total / 3 * 0.9)


def test_too_late_reading_is_masked_and_changes_nothing():
    nw, _, _ = late_fixture()
    before = nw.flush()
    state = pickle.dumps(nw)
    out = nw.update(batch([at(2024, 1, 1, 0, 20)], flow_rate=[1000.0]))
    assert out.late.tolist() == [True]
    assert out.kpi_15m is None and out.kpi_daily is None
    assert pickle.dumps(nw) == state
    after = nw.flush()
    assert after.kpi_15m.frame.equals(before.kpi_15m.frame)
    assert after.kpi_daily.frame.equals(before.kpi_daily.frame)


def test_mixed_batch_masks_only_the_late_readings():
    nw, _, _ = late_fixture()
    ts = [at(2024, 1, 1, 0, 20), at(2024, 1, 1, 2, 10), at(2024, 1, 1, 1, 50)]
    out = nw.update(batch(ts, flow_rate=[1.0, 2.0, 3.0]))
    # 01:50 is behind the watermark (01:55) but its window (01:45-02:00) is still open.
    assert out.late.tolist() == [True, False, False]
    assert sorted(by_window(out)) == [
        datetime(2024, 1, 1, 1, 45, tzinfo=UTC),
        datetime(2024, 1, 1, 2, 0, tzinfo=UTC),
    ]


def test_lateness_follows_arrival_order_within_a_batch():
    s = settings(allowed_lateness_s=3600)
    old, new = at(2024, 1, 1, 0, 0), at(2024, 1, 1, 5, 0)
    out = NodeWindows("n1", s).update(batch([old, new], flow_rate=[1.0, 2.0]))
    assert out.late.tolist() == [False, False]  # the old one came first: its window was open
    out = NodeWindows("n1", s).update(batch([new, old], flow_rate=[2.0, 1.0]))
    assert out.late.tolist() == [False, True]


def test_windows_and_days_close_behind_the_watermark():
    nw = NodeWindows("n1", settings(allowed_lateness_s=3600))
    ts = at(2024, 1, 1) + np.arange(3 * 24 * 12) * 5 * MIN  # three days
    nw.update(batch(ts, flow_rate=np.ones(ts.size)))
    assert nw.watermark == ts[-1] - HOUR
    left = nw.flush()
    starts = left.kpi_15m.frame["window_start"]
    assert starts.min() == datetime(2024, 1, 3, 22, 45, tzinfo=UTC)
    assert starts.len() == 5
    assert left.kpi_daily.frame["day"].to_list() == [date(2024, 1, 3)]
    assert left.late.size == 0


def test_flush_of_a_fresh_node_is_empty():
    out = NodeWindows("n1", settings()).flush()
    assert out.late.size == 0 and out.kpi_15m is None and out.kpi_daily is None


def realistic_series(seed: int = 7) -> ReadingBatch:
    """Three days at 5 min in Rome across the fall-back: gaps, local disorder, a reset."""
    rng = np.random.default_rng(seed)
    n = 3 * 24 * 12
    ts = at(2024, 10, 26) + np.arange(n) * 5 * MIN
    ts = ts + rng.integers(-60, 60, n) * US_PER_S  # jitter within the window mostly
    flow = 10 + 5 * np.sin(np.arange(n) / 40) + rng.normal(0, 0.5, n)
    pressure = 4 + rng.normal(0, 1.5, n)
    pressure[rng.random(n) < 0.1] = np.nan
    total = np.cumsum(flow * 0.3)
    total[500:] -= total[499] + 5  # a reset: counts from 0 again
    total = np.abs(total)
    keep = rng.random(n) > 0.05  # some readings missing
    order = np.arange(n)[keep]
    for k in range(0, order.size - 4, 37):  # some arrive a few steps late
        order[k : k + 4] = order[k : k + 4][::-1]
    b = batch(
        ts[order],
        flow_rate=flow[order],
        pressure=pressure[order],
        total_flow=total[order],
        quality=rng.random(order.size)[: order.size],
        score=rng.random(order.size),
    )
    # Two readings far too late for any window, and one duplicate time.
    extra = batch(
        [at(2024, 10, 26, 1), at(2024, 10, 27, 3), ts[order][100]],
        flow_rate=[1.0, 2.0, 3.0],
        pressure=[4.0, 4.0, 4.0],
        total_flow=[np.nan, np.nan, np.nan],
    )
    cut = order.size // 2
    return ReadingBatch.concat([b.take(np.arange(cut)), extra, b.take(np.arange(cut, order.size))])


def final_rows(nw: NodeWindows, batches: list[ReadingBatch]) -> tuple:
    last15: dict = {}
    lastday: dict = {}
    late = []

    def keep(out: WindowOutput) -> None:
        for r in rows(out, "kpi_15m"):
            last15[r["window_start"]] = r
        for r in rows(out, "kpi_daily"):
            lastday[r["day"]] = r
        late.append(out.late)

    for b in batches:
        keep(nw.update(b))
    keep(nw.flush())
    return last15, lastday, np.concatenate(late)


def assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for col, value in a[key].items():
            other = b[key][col]
            if isinstance(value, float):
                assert other == pytest.approx(value, rel=1e-9, abs=1e-9), (key, col)
            else:
                assert other == value, (key, col)


def test_many_small_batches_give_the_same_rows_as_one_batch():
    whole = realistic_series()
    s = settings(tz="Europe/Rome", allowed_lateness_s=2 * 3600)
    one15, oneday, onelate = final_rows(NodeWindows("n1", s), [whole])
    rng = np.random.default_rng(3)
    cuts = np.cumsum(rng.integers(1, 20, size=len(whole)))
    cuts = cuts[cuts < len(whole)]
    pieces = [whole.take(idx) for idx in np.split(np.arange(len(whole)), cuts)]
    assert len(pieces) > 50
    many15, manyday, manylate = final_rows(NodeWindows("n1", s), pieces)
    assert onelate.tolist() == manylate.tolist()
    assert onelate.sum() >= 2
    assert_same_rows(one15, many15)
    assert_same_rows(oneday, manyday)
    # Three UTC days seen from Rome: the last hour falls on the local 29th.
    assert set(oneday) == {date(2024, 10, d) for d in (26, 27, 28, 29)}
    # Every accepted reading is in exactly one window and one day.
    accepted = int((~onelate).sum())
    assert sum(r["n"] for r in one15.values()) == accepted
    assert sum(r["n"] for r in oneday.values()) == accepted
    assert sum(r["volume_m3"] for r in oneday.values()) == pytest.approx(
        sum(r["volume_m3"] for r in one15.values())
    )


def test_pickled_state_stays_small_and_resumes_identically():
    s = settings(tz="Europe/Rome")  # default lateness: 6 h, about 25 open windows
    nw = NodeWindows("n1", s)
    n = 30 * 24 * 12  # a month at 5 min, every measurement
    ts = at(2024, 3, 1) + np.arange(n) * 5 * MIN
    rng = np.random.default_rng(1)
    values = rng.random((n, len(MEASUREMENTS))) * 10
    values[:, COL["total_flow"]] = np.cumsum(values[:, COL["flow_rate"]]) * 0.3
    whole = ReadingBatch("n1", "t", ts, values, np.zeros(n, np.int64), np.ones(n), None, None)
    for piece in np.array_split(np.arange(n), 40):
        nw.update(whole.take(piece))
    blob = pickle.dumps(nw)
    assert len(blob) < 20_000, len(blob)
    clone = pickle.loads(blob)
    more = batch(ts[-1] + np.arange(1, 4) * 5 * MIN, flow_rate=[1.0, 2.0, 3.0])
    a, b = nw.update(more), clone.update(more)
    assert a.kpi_15m.frame.equals(b.kpi_15m.frame)
    assert a.kpi_daily.frame.equals(b.kpi_daily.frame)


def test_empty_batch_changes_nothing():
    nw = NodeWindows("n1", settings())
    out = nw.update(batch([]))
    assert out.late.size == 0 and out.kpi_15m is None and out.kpi_daily is None
    assert nw.watermark is None


def test_water_quality_compliance_share_per_day_against_the_limits():
    """Defaults: chlorine 0.2-1.0 mg/L, pH 6.5-9.5. Four readings: only the first has every
    limited value within its limits (0.15 mg/L is too little, pH 10 too high, 1.2 mg/L too
    much): 1/4. A node whose own limits allow 0.1-1.5 mg/L: only pH 10 fails, 3/4. Turbidity
    missing from a reading does not count against it; a flow meter has no share."""
    import tomllib

    from dataflows.topology import parse_network

    ts = at(2024, 1, 1, 8) + np.arange(4) * 5 * MIN
    chlorine = np.array([0.3, 0.15, 0.5, 1.2])
    ph = np.array([7.0, 7.0, 10.0, 7.0])
    network = parse_network(tomllib.loads('[nodes.own]\nlimits.chlorine = [0.1, 1.5]\n'))
    s = settings(network=network)
    default = NodeWindows("n1", s).update(batch(ts, chlorine=chlorine, ph=ph))
    assert by_day(default)[date(2024, 1, 1)]["water_quality_compliance"] == 0.25
    own = NodeWindows("own", s).update(batch(ts, node="own", chlorine=chlorine, ph=ph))
    assert by_day(own)[date(2024, 1, 1)]["water_quality_compliance"] == 0.75
    flow = NodeWindows("n1", s).update(batch(ts, flow_rate=np.ones(4)))
    assert by_day(flow)[date(2024, 1, 1)]["water_quality_compliance"] is None


def test_steady_intervals_take_the_shortcut_with_the_same_values():
    from dataflows.kpi import _medians_s, _usual_intervals_s

    steady = np.full(40, 300 * US_PER_S)
    known = np.array([1, 5, 32, 40])
    assert _usual_intervals_s(steady, known).tolist() == [300.0] * 4
    assert _usual_intervals_s(steady, known).tobytes() == _medians_s(steady, known).tobytes()
    jittery = steady + np.arange(40) * 7 * US_PER_S  # 300 s + 0..273 s: no shortcut
    assert _usual_intervals_s(jittery, known).tobytes() == _medians_s(jittery, known).tobytes()
    # The fifth median, 314 s, is within 10 % of 300 s: snapped.
    assert _usual_intervals_s(jittery, known).tolist() == [300.0, 300.0, 408.5, 464.5]
    # Nothing known yet: NaN; the shortcut serves the rest.
    both = _usual_intervals_s(steady, np.array([0, 3]))
    assert math.isnan(both[0]) and both[1] == 300.0
