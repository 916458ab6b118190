"""Totalizer against integrated flow: hand-computed cases, real faults, batch independence."""

from __future__ import annotations

import pickle

import numpy as np

from dataflows.model import COL, US_PER_S, Flag, ReadingBatch, empty_values
from dataflows.settings import Settings
from dataflows.totalizer_check import TotalizerCheck
from dataflows.validation import NodeValidator

T0 = 1_700_000_000 * US_PER_S  # 2023-11-14 22:13:20 UTC
STEP = 300 * US_PER_S
HOUR = 12  # readings an hour


def _check(t, flow, total, chunk=None):
    """Mismatch flags of one meter fed whole, or in chunks of ``chunk`` readings (pickled
    between chunks, as a recovery snapshot would be)."""
    n = t.size
    chunk = chunk or n
    check, out = TotalizerCheck(), []
    for a in range(0, n, chunk):
        b = slice(a, a + chunk)
        k = t[b].size
        out.append(check.mismatch(t[b], flow[b], total[b], np.zeros(k, bool), np.zeros(k, bool)))
        check = pickle.loads(pickle.dumps(check))
    return np.concatenate(out)


def test_a_meter_whose_counter_agrees_with_its_flow_is_never_flagged():
    rng = np.random.default_rng(5)
    n = 2 * 24 * HOUR
    t = T0 + np.arange(n) * STEP
    flow = 10 + 3 * np.sin(np.arange(n) / 40) + rng.normal(0, 0.3, n)  # L/s
    # The counter integrates the true flow (trapezoids), to the litre.
    steps = np.concatenate(([0.0], (flow[1:] + flow[:-1]) / 2 * 300 / 1000))
    total = np.round(1000 + np.cumsum(steps), 3)
    assert not _check(t, flow, total).any()


def test_an_under_registering_counter_is_flagged_once_an_hour_shows_it():
    """10 L/s = 3 m3 per 5 minutes; from reading 24 on the counter adds 2 m3 a step.

    The first checkpoint is the first reading (22:13:20, bucket 22:07:30-22:15); a reading is
    judged once a checkpoint an hour before it exists: from reading 12 (23:13:20) on. Reading
    12..23: an hour of 3 m3 steps on both sides, no flag. Reading 24 adds 2 m3 against 3 m3;
    the difference over the last hour grows by 1 m3 a step and passes max(10 % of ~36 m3, 0.5)
    = 3.6 m3 at its 4th step: reading 27 is the first flagged.
    """
    n = 4 * HOUR
    t = T0 + np.arange(n) * STEP
    flow = np.full(n, 10.0)
    steps = np.where(np.arange(n) >= 24, 2.0, 3.0)
    steps[0] = 0.0
    total = 500 + np.cumsum(steps)
    flags = _check(t, flow, total)
    assert np.flatnonzero(flags)[0] == 27
    assert flags[27:].all()


def test_flags_do_not_depend_on_how_the_readings_are_cut():
    rng = np.random.default_rng(9)
    n = 3 * 24 * HOUR
    t = T0 + np.arange(n) * STEP + rng.integers(-20, 20, n) * US_PER_S
    flow = 10 + rng.normal(0, 1.0, n)
    steps = np.where((np.arange(n) > 300) & (np.arange(n) < 500), 2.0, 3.0) + rng.normal(0, .2, n)
    total = 100 + np.cumsum(steps)
    whole = _check(t, flow, total)
    assert 0 < whole.sum() < n
    for chunk in (1, 7, 100):
        assert np.array_equal(_check(t, flow, total, chunk), whole)


def _batch(t, flow, total):
    values = empty_values(t.size)
    values[:, COL["flow_rate"]] = flow
    values[:, COL["total_flow"]] = total
    return ReadingBatch("m1", "t.csv", t, values, np.arange(t.size, dtype=np.int64))


def test_validation_flags_a_frozen_flow_sensor_through_the_counter_and_penalizes_it():
    """The flow value freezes at 9.7 L/s for 4 h while the counter goes on with the true 14 L/s:
    caught within the hour, long before the 6 h the flat-line check needs."""
    n = 12 * HOUR
    t = T0 + np.arange(n) * STEP
    true = np.full(n, 14.0)
    true[: 4 * HOUR] = 10.0
    flow = true + np.random.default_rng(2).normal(0, 0.2, n)
    flow[4 * HOUR: 8 * HOUR] = 9.7
    steps = np.concatenate(([0.0], (true[1:] + true[:-1]) / 2 * 0.3))
    total = 2000 + np.cumsum(steps)
    settings = Settings(now_us=T0 + 10 * 86_400 * US_PER_S)
    out = NodeValidator("m1", settings).validate(_batch(t, flow, total)).accepted
    mism = (out.flags & int(Flag.TOTALIZER_MISMATCH)) != 0
    assert not mism[: 4 * HOUR].any()
    first = int(np.flatnonzero(mism)[0])
    assert 4 * HOUR < first <= 5 * HOUR
    assert not (out.flags[first] & int(Flag.STUCK))  # the flat-line check has not seen it yet
    assert out.quality[first] < 1.0


def test_a_reset_and_a_gap_are_not_mismatches():
    n = 2 * 24 * HOUR
    t = T0 + np.arange(n) * STEP
    keep = (np.arange(n) < 200) | (np.arange(n) >= 236)  # three hours missing
    flow = np.full(n, 8.0)
    total = 900 + np.cumsum(np.full(n, 2.4)) - 2.4
    total[400:] -= total[400] - 1.0  # rollover to 1 m3 at reading 400
    t, flow, total = t[keep], flow[keep], total[keep]
    settings = Settings(now_us=T0 + 10 * 86_400 * US_PER_S)
    out = NodeValidator("m1", settings).validate(_batch(t, flow, total)).accepted
    assert out.flags[(out.flags & int(Flag.TOTALIZER_RESET)) != 0].size == 1
    assert not ((out.flags & int(Flag.TOTALIZER_MISMATCH)) != 0).any()
