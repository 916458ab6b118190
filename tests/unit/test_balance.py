"""District water balance on hand-made meter windows: sums, fills, spreads, closing, ILI."""

import datetime as dt
import math
import pickle
from dataclasses import fields

import numpy as np
import polars as pl
import pytest

from dataflows.balance import DistrictBalance, district_windows, new_balance
from dataflows.balance_fill import (
    MEASURED,
    MISSING,
    SUSPECT,
    WINDOW_US,
    Clock,
    MeterProfile,
    MeterWindows,
    clock,
    day_windows,
    estimate,
    local_day,
    span_clock,
)
from dataflows.balance_night import NightFlow, uarl_l_per_day
from dataflows.settings import Settings
from dataflows.tables import KEYS, frame
from dataflows.topology import DistrictAssets, parse_network

DAY0 = dt.date(2024, 11, 4)  # a Monday
W0 = int(dt.datetime(2024, 11, 4, tzinfo=dt.UTC).timestamp()) * 1_000_000 // WINDOW_US
PER_DAY = 96


def windows(node, role, day, volume, *, status=MEASURED, totalizer=False, pressure=np.nan,
            n=PER_DAY):
    """``n`` windows of a UTC day (0 = DAY0) with the given volume (scalar or per window)."""
    w = W0 + day * PER_DAY + np.arange(n, dtype=np.int64)
    full = np.broadcast_to
    return MeterWindows(
        node, role, w, full(np.asarray(volume, float), n).copy(),
        full(np.asarray(status, np.int8), n).copy(), full(np.asarray(totalizer), n).copy(),
        full(np.asarray(pressure, float), n).copy(),
    )


def final(balance, items, flush=True):
    """Each key's last row, as the warm tier keeps it, and every event."""
    parts, events = [], []
    for mw in items:
        out = balance.update(mw)
        parts += [out.rows.frame] if out.rows is not None else []
        events += out.events
    if flush:
        out = balance.flush()
        parts += [out.rows.frame] if out.rows is not None else []
        events += out.events
    rows = pl.concat(parts).unique(list(KEYS["district_balance"]), keep="last",
                                   maintain_order=True)
    return rows.sort("period", "period_start"), events


def days_of(rows):
    return rows.filter(pl.col("period") == "day")


def test_hourly_and_daily_sums_with_an_outflow():
    b = DistrictBalance("d1", "UTC", frozenset({"in", "out", "c1"}))
    rows, _ = final(b, [
        windows("in", "inflow", 0, 1.0),  # 4 m3 per hour
        windows("out", "outflow", 0, 0.25),  # 1 m3 per hour exported
        windows("c1", "consumption", 0, 0.5),
    ])
    day = days_of(rows).row(0, named=True)
    assert day["period_start"] == dt.datetime(2024, 11, 4, tzinfo=dt.UTC)
    assert (day["inflow_m3"], day["outflow_m3"], day["system_input_m3"]) == (96.0, 24.0, 72.0)
    assert day["consumption_m3"] == 48.0 and day["loss_m3"] == 24.0
    assert math.isclose(day["nrw"], 24.0 / 72.0)
    assert day["filled_share"] == 0.0 and day["estimated"] is False
    # system input 3 m3/h = 0.8333 L/s all night, every hour the peak (the first wins)
    assert math.isclose(day["mnf_lps"], 3000.0 / 3600.0) and day["peak_hour"] == 0
    hours = rows.filter(pl.col("period") == "hour")
    assert hours.height == 24 and hours["loss_m3"].to_list() == [1.0] * 24
    assert hours["mnf_lps"].is_null().all()


def test_no_inflow_meter_gives_unknown_not_zero():
    b = DistrictBalance("d1", "UTC", frozenset({"c1"}))
    day = days_of(final(b, [windows("c1", "consumption", 0, 0.5)])[0]).row(0, named=True)
    assert day["inflow_m3"] is None and day["loss_m3"] is None and day["nrw"] is None
    assert day["consumption_m3"] == 48.0


def _pattern(day, scale=1.0):
    """A meter volume per window with a daily shape (low at night), days 2 % apart."""
    hours = np.arange(PER_DAY) / 4.0
    shape = 0.2 + 0.1 * np.sin(2 * np.pi * (hours - 9) / 24) ** 2
    return scale * shape * (1.0 + 0.02 * (day % 3 - 1))


def _week(days=9, **silence):
    """Inflow = 1.1 x consumption of two meters; ``silence`` maps a node to (day, status)."""
    items = []
    for d in range(days):
        c1, c2 = _pattern(d), _pattern(d, 2.0)
        vols = {"in": 1.1 * (c1 + c2), "c1": c1, "c2": c2}
        roles = {"in": "inflow", "c1": "consumption", "c2": "consumption"}
        for node, vol in vols.items():
            mw = windows(node, roles[node], d, vol)
            if node in silence and silence[node][0] == d:
                mw.status[:] = silence[node][1]
                if silence[node][1] == MISSING:
                    mw.volume[:] = np.nan
            items.append(mw)
    return items


@pytest.mark.parametrize("status", [MISSING, SUSPECT])
def test_a_silent_or_untrusted_meter_is_filled_from_its_own_pattern(status):
    members = frozenset({"in", "c1", "c2"})
    clean, _ = final(DistrictBalance("d1", "UTC", members), _week())
    rows, _ = final(DistrictBalance("d1", "UTC", members), _week(c2=(7, status)))
    truth, got = days_of(clean).row(7, named=True), days_of(rows).row(7, named=True)
    # c2 is 2/3 of the consumption: its day is estimated from last week and the recent level
    assert got["consumption_m3"] == pytest.approx(truth["consumption_m3"], rel=0.03)
    assert got["loss_m3"] == pytest.approx(truth["loss_m3"], rel=0.3)
    assert got["filled_share"] == pytest.approx(2.0 / (3.3 + 3.0), rel=0.05)
    assert got["estimated"] is False  # a third of the metered volume is not most of it
    assert days_of(rows).row(6, named=True)["filled_share"] == 0.0


def test_a_balance_built_mostly_from_estimates_is_marked():
    members = frozenset({"in", "c1", "c2"})
    items = [mw for mw in _week() if mw.node_id != "c2" or mw.window[0] < W0 + 7 * PER_DAY]
    items = [mw if mw.window[0] < W0 + 7 * PER_DAY or mw.node_id == "c2" else
             windows(mw.node_id, mw.role, 7, np.nan, status=MISSING) for mw in items]
    rows, _ = final(DistrictBalance("d1", "UTC", members), items)
    day = days_of(rows).row(7, named=True)
    assert day["filled_share"] == 1.0 and day["estimated"] is True
    assert day["nrw"] == pytest.approx(1 / 11, rel=0.05)


def test_no_pattern_yet_leaves_the_side_unknown():
    b = DistrictBalance("d1", "UTC", frozenset({"in", "c1"}))
    rows, _ = final(b, [windows("in", "inflow", 0, 1.0),
                        windows("c1", "consumption", 0, np.nan, status=MISSING)])
    day = days_of(rows).row(0, named=True)
    assert day["inflow_m3"] == 96.0 and day["consumption_m3"] is None and day["nrw"] is None


def test_a_frozen_meter_does_not_make_the_nrw_negative():
    members = frozenset({"in", "c1", "c2"})
    items = _week()
    for mw in items:  # c1 frozen at three times its peak on day 7 (validation flagged it)
        if mw.node_id == "c1" and mw.window[0] == W0 + 7 * PER_DAY:
            mw.volume[:] = 3 * mw.volume.max()
            mw.status[:] = SUSPECT
    day = days_of(final(DistrictBalance("d1", "UTC", members), items)[0]).row(7, named=True)
    assert 0.05 < day["nrw"] < 0.15  # the truth is 1/11; believed, the frozen value gave -0.5
    assert day["filled_share"] > 0.1


def test_a_totalizer_gap_is_spread_over_the_gap_and_the_day_stays_exact():
    members = frozenset({"in", "c1"})
    items = []
    for d in range(3):
        vol = _pattern(d)
        mw = windows("in", "inflow", d, 1.1 * vol, totalizer=True)
        if d == 2:  # silent from 06:00 to 12:00: the 12:00 reading carries the six hours
            gap = slice(24, 48)
            mw.volume[48] = 1.1 * vol[gap].sum() + 1.1 * vol[48]
            mw.volume[gap], mw.status[gap], mw.totalizer[gap] = np.nan, MISSING, False
        items += [mw, windows("c1", "consumption", d, vol)]
    rows, _ = final(DistrictBalance("d1", "UTC", members), items)
    day = days_of(rows).row(2, named=True)
    assert day["inflow_m3"] == pytest.approx(1.1 * _pattern(2).sum(), rel=1e-12)
    assert day["nrw"] == pytest.approx(0.1 / 1.1, rel=1e-9) and day["filled_share"] == 0.0
    hours = rows.filter(pl.col("period") == "hour").filter(
        pl.col("period_start").dt.date() == DAY0 + dt.timedelta(days=2))
    # the spread follows the meter's pattern: hour by hour within 1 % of the truth
    assert np.allclose(hours["inflow_m3"].to_numpy()[6:12],
                       1.1 * _pattern(2)[24:48].reshape(6, 4).sum(axis=1), rtol=0.01)


def test_result_does_not_depend_on_how_meters_interleave_nor_on_pickling():
    members = frozenset({"in", "c1", "c2"})
    items = _week(c2=(5, MISSING))
    whole, _ = final(DistrictBalance("d1", "Europe/Rome", members), items)
    # the same windows cut in hours and interleaved across meters, through pickle
    b = DistrictBalance("d1", "Europe/Rome", members)
    cut = []
    for k in range(0, 9 * PER_DAY, 4):
        for mw in items:
            sel = (mw.window >= W0 + k) & (mw.window < W0 + k + 4)
            if sel.any():
                cut.append(MeterWindows(mw.node_id, mw.role, mw.window[sel], mw.volume[sel],
                                        mw.status[sel], mw.totalizer[sel], mw.pressure[sel]))
    parts = []
    for i, mw in enumerate(cut):
        if i % 50 == 0:
            b = pickle.loads(pickle.dumps(b))
        out = b.update(mw)
        parts += [out.rows.frame] if out.rows is not None else []
    parts.append(b.flush().rows.frame)
    interleaved = pl.concat(parts).unique(list(KEYS["district_balance"]), keep="last",
                                          maintain_order=True).sort("period", "period_start")
    # 9 UTC days are 216 hours, over 10 local days (from 01:00 on the first)
    assert whole.height == interleaved.height == 216 + 10
    for col in whole.columns:
        a, c = whole[col], interleaved[col]
        if a.dtype.is_float():
            assert np.allclose(a.to_numpy(), c.to_numpy(), rtol=1e-9, equal_nan=True), col
        else:
            assert a.equals(c), col
    assert len(pickle.dumps(b)) < 20_000


def test_days_close_behind_the_slowest_meter_and_then_ignore_late_rows():
    b = DistrictBalance("d1", "UTC", frozenset({"in", "c1"}), lateness_s=3600)
    for d in range(3):
        b.update(windows("in", "inflow", d, 1.0))
    assert b.closed_ is None  # c1 has not reported: nothing closes
    for d in range(3):
        b.update(windows("c1", "consumption", d, 0.5))
    # closed: the days before the slowest newest window minus the lateness (day 2 stays open)
    assert b.closed_ == W0 + 2 * PER_DAY
    assert b.update(windows("c1", "consumption", 0, 0.9)).rows is None


def test_ili_by_hand():
    assets = DistrictAssets(mains_km=10.0, connections=1000, private_pipe_km=2.0)
    # UARL = (18 x 10 + 0.8 x 1000 + 25 x 2) L/day/m x 40 m = 41 200 L/day
    assert uarl_l_per_day(assets, 40.0) == 41_200.0
    b = DistrictBalance("d1", "UTC", frozenset({"in", "c1", "p1"}), assets=assets)
    rows, _ = final(b, [
        windows("in", "inflow", 0, 1.0),
        windows("c1", "consumption", 0, 1.0 - 82.4 / 96),  # losses 82.4 m3 = 82 400 L/day
        windows("p1", "pressure", 0, np.nan, status=MISSING, pressure=40.0 / 10.197),
    ])
    day = days_of(rows).row(0, named=True)
    assert day["pressure_m"] == pytest.approx(40.0)
    assert day["ili"] == pytest.approx(2.0)


def test_topology_gives_members_assets_and_the_outflow_role():
    net = parse_network({
        "districts": {"d1": {"name": "A", "mains_km": 12.5, "connections": 800}},
        "nodes": {"i": {"district": "d1", "role": "inflow"},
                  "o": {"district": "d1", "role": "outflow"},
                  "p": {"district": "d1", "role": "pressure"},
                  "t": {"district": "d1", "role": "tank"}},
    })
    assert net.assets["d1"] == DistrictAssets(12.5, 800)
    balance = new_balance(Settings(network=net, tz="UTC"), "d1")
    assert balance.members == frozenset({"i", "o", "p"}) and balance.assets == net.assets["d1"]
    rows = frame("kpi_15m", {"node_id": ["o"], "window_start": [0], "n": [3],
                             "volume_m3": [2.0], "quality_avg": [1.0]})
    keyed = district_windows(net, "o", rows)
    assert keyed is not None and keyed[0] == "d1" and keyed[1].role == "outflow"
    assert district_windows(net, "t", rows) is None
    with pytest.raises(ValueError, match="go together"):
        parse_network({"districts": {"d1": {"mains_km": 3.0}}})


# -- the work per batch cut down (issue 9): the same results as the plain way -----------------


@pytest.mark.parametrize(("tz", "lateness_days", "open_days"),
                         [("UTC", 0, 1), ("Europe/Rome", 0, 2), ("Europe/Rome", 2, 4)])
def test_flush_gives_what_closing_a_copy_gives_and_keeps_the_state(tz, lateness_days, open_days):
    # one open day (nothing learned on the copy) or several (the first ones learned from)
    b = DistrictBalance("d1", tz, frozenset({"in", "c1", "c2"}),
                        lateness_s=lateness_days * 86400 + 3600)
    for mw in _week(c2=(8, MISSING)):
        b.update(mw)
    state = pickle.dumps(b)
    out = b.flush()
    want = pickle.loads(state)._close(None)  # every open day closed on a full copy
    assert out.rows.frame.equals(want.rows.frame) and out.events == want.events
    assert out.rows.frame.filter(pl.col("period") == "day").height == open_days
    assert pickle.dumps(b) == state
    assert b.flush().rows.frame.equals(out.rows.frame)


def test_span_clock_is_the_windows_clock_across_a_dst_change():
    # Europe/Rome left summer time on 27 October 2024: a 25-hour local day (100 windows)
    tz = "Europe/Rome"
    origin = day_windows(local_day(W0 - 10 * PER_DAY, tz), tz)[0]
    for length in (1, 50, 96, 100, 250, 9 * PER_DAY + 7):
        got = span_clock(origin, length, tz)
        want = clock(origin + np.arange(length, dtype=np.int64), tz)
        for f in fields(Clock):
            assert np.array_equal(getattr(got, f.name), getattr(want, f.name)), (length, f.name)


def test_estimates_of_part_of_the_span_are_the_whole_span_estimates_cut():
    b = DistrictBalance("d1", "UTC", frozenset({"in", "c1"}), lateness_s=5 * 86400)
    for d in range(4):
        vol = _pattern(d)
        mw = windows("in", "inflow", d, 1.1 * vol, totalizer=True)
        if d in (1, 2):  # silent from day 1 18:00 to day 2 06:00, then from day 2 20:00 on
            gap = slice(72, None) if d == 1 else slice(0, 24)
            mw.volume[gap], mw.status[gap], mw.totalizer[gap] = np.nan, MISSING, False
            if d == 2:
                mw.volume[24] = 1.1 * 12 * 4 * 0.25  # carries the night
                mw.volume[80:], mw.status[80:], mw.totalizer[80:] = np.nan, MISSING, False
        b.update(mw)
        b.update(windows("c1", "consumption", d, vol, status=SUSPECT if d == 1 else MEASURED))
    assert b.closed_ is None and b.length_ == 4 * PER_DAY
    whole = clock(b.origin_ + np.arange(b.length_, dtype=np.int64), "UTC")
    for a, end in [(0, 96), (96, 192), (96, 150), (150, 250), (0, b.length_), (200, 300)]:
        c, est = b._estimates(a, end)
        assert np.array_equal(c.hour_start, whole.hour_start[a:end])
        for node_id, m in b.meters_.items():
            full = estimate(m.volume, m.status, m.totalizer, m.profile, whole,
                            is_totalizer=m.is_totalizer, counted_before=m.counted_before,
                            since=max(0, m.first - b.origin_))
            part = est[node_id]
            assert np.array_equal(part.volume, full.volume[a:end], equal_nan=True), (a, end)
            assert np.array_equal(part.filled, full.filled[a:end])
            assert np.array_equal(part.measured, full.measured[a:end])
            if a == 0:
                assert [s for s in full.spreads if s[0] < end] == part.spreads


def test_a_profile_pickles_what_it_learned_and_no_cache():
    p = MeterProfile()
    c = clock(W0 + np.arange(8, dtype=np.int64), "UTC")  # Monday 00:00-02:00
    assert np.isnan(p.hourly(c)).all()
    p.learn(np.array([0, 1]), np.array([False, False]), np.array([0, 1]), np.array([2.0, 4.0]))
    assert p.hourly(c).tolist() == [2.0] * 4 + [4.0] * 4
    assert set(p.__reduce_ex__(pickle.HIGHEST_PROTOCOL)[2][1]) == {"how_", "hod_", "level_"}
    q = pickle.loads(pickle.dumps(p))  # as a profile pickled before the cache existed
    assert q.hourly(c).tolist() == p.hourly(c).tolist()


def test_a_night_judged_twice_is_two_nights():
    nights = NightFlow("d1")
    for d in range(10):
        nights.commit(nights.judge(d, 0, 1.0 + 0.01 * (d % 3)))
    first = nights.peek(nights.judge(10, 0, 5.0))
    first.leak_lps = 3.0
    again = nights.judge(10, 0, 5.0)
    assert again is not first and math.isnan(again.leak_lps) and again.high
    assert (again.baseline, again.spread, again.trend) == (
        first.baseline, first.spread, first.trend)
