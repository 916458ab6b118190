"""Validation of per-node batches: each check on small hand-built series, plus properties."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from dataflows.model import COL, US_PER_MIN, US_PER_S, Flag, ReadingBatch, empty_values
from dataflows.settings import Settings
from dataflows.topology import Network, NodeSpec
from dataflows.validation import (
    PENALTIES,
    SEEN_MAX,
    NodeValidator,
    Validated,
    quality_of,
    row_hash,
)

NODE = "sel-001"
T0 = 1_700_000_000 * US_PER_S  # 2023-11-14, well before NOW
NOW = T0 + 365 * 24 * 3600 * US_PER_S
STEP = 5 * US_PER_MIN


def settings(**kw: object) -> Settings:
    kw.setdefault("now_us", NOW)
    return Settings(**kw)  # type: ignore[arg-type]


def batch(ts: list[int] | np.ndarray, **cols: list[float] | np.ndarray) -> ReadingBatch:
    """A batch of NODE with the given timestamps and measurement columns (others NaN)."""
    ts = np.asarray(ts, dtype=np.int64)
    values = empty_values(ts.size)
    for name, col in cols.items():
        values[:, COL[name]] = col
    return ReadingBatch(NODE, "test.csv", ts, values, np.arange(2, ts.size + 2, dtype=np.int64))


def series(n: int, start: int = 0) -> np.ndarray:
    """n timestamps every 5 minutes, from reading index ``start``."""
    return T0 + (start + np.arange(n, dtype=np.int64)) * STEP


def noisy(n: int, seed: int = 1, level: float = 10.0, sd: float = 0.5) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0.0, sd, n)


def flagged(v: Validated, flag: Flag) -> list[int]:
    """Positions (in the accepted batch) of readings carrying ``flag``."""
    assert v.accepted.flags is not None
    return np.flatnonzero(v.accepted.flags & int(flag)).tolist()


def reasons(v: Validated, whole: bool | None = None) -> Counter[str]:
    return Counter(q.reason for q in v.quarantined if whole is None or q.whole_reading == whole)


def check_invariant(b: ReadingBatch, v: Validated) -> None:
    whole = sum(1 for q in v.quarantined if q.whole_reading)
    assert len(b) == len(v.accepted) + whole + v.duplicates
    assert v.accepted.quality is not None and v.accepted.flags is not None
    assert v.accepted.score is None
    assert v.accepted.quality.dtype == np.float64 and v.accepted.flags.dtype == np.int64
    assert ((v.accepted.quality >= 0) & (v.accepted.quality <= 1)).all()
    n = len(v.accepted)
    assert v.accepted.ts.shape == (n,) and v.accepted.line.shape == (n,)
    assert v.accepted.values.shape == (n, 10) and v.accepted.quality.shape == (n,)


# -- clean data and the API -----------------------------------------------------------------


def test_clean_series_is_accepted_untouched() -> None:
    b = batch(series(50), flow_rate=noisy(50), pressure=noisy(50, 2, 4.0, 0.05))
    v = NodeValidator(NODE, settings()).validate(b)
    check_invariant(b, v)
    assert len(v.accepted) == 50 and v.quarantined == [] and v.duplicates == 0
    assert (v.accepted.flags == 0).all() and (v.accepted.quality == 1.0).all()
    np.testing.assert_array_equal(v.accepted.values, b.values)
    np.testing.assert_array_equal(v.accepted.line, b.line)
    assert v.accepted.node_id == NODE and v.accepted.source == "test.csv"


def test_empty_batch() -> None:
    v = NodeValidator(NODE, settings()).validate(batch([]))
    assert len(v.accepted) == 0 and v.quarantined == [] and v.duplicates == 0
    assert v.accepted.flags is not None and v.accepted.flags.shape == (0,)


def test_batch_of_another_node_is_refused() -> None:
    b = batch(series(1), flow_rate=[1.0])
    other = ReadingBatch("other", b.source, b.ts, b.values, b.line)
    with pytest.raises(ValueError, match="'other'"):
        NodeValidator(NODE, settings()).validate(other)


# -- values ------------------------------------------------------------------------------


def test_nan_is_not_measured_but_inf_is_removed() -> None:
    b = batch(
        series(4),
        flow_rate=[1.0, np.inf, np.nan, -np.inf],
        pressure=[3.0, 3.1, np.nan, np.nan],
    )
    v = NodeValidator(NODE, settings()).validate(b)
    check_invariant(b, v)
    # Reading 2 (NaN only) is accepted as is; reading 3 had only -inf: quarantined whole.
    assert len(v.accepted) == 3
    assert reasons(v, whole=True) == Counter({"non_finite": 1})
    assert reasons(v, whole=False) == Counter({"non_finite": 1})
    value_rec = next(q for q in v.quarantined if not q.whole_reading)
    assert (value_rec.line, value_rec.measurement, value_rec.ts) == (3, "flow_rate", b.ts[1])
    assert "inf" in value_rec.raw and NODE in value_rec.raw
    whole_rec = next(q for q in v.quarantined if q.whole_reading)
    assert whole_rec.line == 5 and whole_rec.measurement == "flow_rate"
    assert np.isnan(v.accepted.values[1, COL["flow_rate"]])
    assert v.accepted.values[1, COL["pressure"]] == 3.1
    assert flagged(v, Flag.VALUE_REMOVED) == [1]
    assert v.accepted.quality[1] == pytest.approx(1.0 - PENALTIES[Flag.VALUE_REMOVED])
    assert v.accepted.quality[2] == 1.0


def test_range_uses_per_node_limits() -> None:
    network = Network(nodes={NODE: NodeSpec(NODE, ranges={"flow_rate": (0.0, 60.0)})})
    b = batch(
        series(4),
        flow_rate=[10.0, 61.0, -0.5, 60.0],
        pressure=[3.0, 3.0, 30.0, 3.0],  # default pressure range is [-1, 25]
    )
    v = NodeValidator(NODE, settings(network=network)).validate(b)
    check_invariant(b, v)
    assert len(v.accepted) == 3
    assert reasons(v, whole=False) == Counter({"out_of_range:flow_rate": 1})
    # Reading 2 lost both of its values: one whole record, with the first removed value's reason.
    assert reasons(v, whole=True) == Counter({"out_of_range:flow_rate": 1})
    assert flagged(v, Flag.VALUE_REMOVED) == [1]
    assert v.accepted.values[2, COL["flow_rate"]] == 60.0  # the limit itself is in range
    # Another node keeps the default flow range, in which 61 is fine.
    other = ReadingBatch("other", b.source, b.ts, b.values, b.line)
    v2 = NodeValidator("other", settings(network=network)).validate(other)
    assert reasons(v2) == Counter({"out_of_range:pressure": 1})


# -- future timestamps -----------------------------------------------------------------------


def test_future_timestamp_with_fixed_now() -> None:
    s = settings(future_tolerance_s=300)
    b = batch([NOW - STEP, NOW + 300 * US_PER_S, NOW + 300 * US_PER_S + 1], pressure=[3.0] * 3)
    v = NodeValidator(NODE, s).validate(b)
    check_invariant(b, v)
    assert v.accepted.ts.tolist() == [NOW - STEP, NOW + 300 * US_PER_S]
    assert reasons(v) == Counter({"future_timestamp": 1})
    assert v.quarantined[0].whole_reading and v.quarantined[0].line == 4


def test_future_with_wall_clock() -> None:
    b = batch([T0, 2**62], pressure=[3.0, 3.0])  # 2**62 µs is year ~148,000
    v = NodeValidator(NODE, Settings()).validate(b)
    assert len(v.accepted) == 1 and reasons(v) == Counter({"future_timestamp": 1})


def test_implausibly_old_timestamps_are_quarantined() -> None:
    """A logger reset to 1970 (or a year typed as 0024) never becomes an accepted reading."""
    epoch_day = 86_400 * US_PER_S  # 1970-01-02
    bound = 946_684_800 * US_PER_S  # 2000-01-01, the default lower bound
    b = batch([epoch_day, bound - 1, bound, T0], pressure=[3.0, 3.1, 3.2, 3.3])
    v = NodeValidator(NODE, settings()).validate(b)
    check_invariant(b, v)
    assert v.accepted.ts.tolist() == [bound, T0]
    assert [(q.line, q.reason, q.whole_reading) for q in v.quarantined] == [
        (2, "too_old_timestamp", True), (3, "too_old_timestamp", True)]
    assert v.quarantined[0].raw.startswith(f"{NODE},1970-01-02T00:00:00+00:00,")
    # the bound is a setting: a utility with older archives lowers it
    v = NodeValidator(NODE, settings(min_ts_us=0)).validate(b)
    assert len(v.accepted) == 4 and not v.quarantined
    # a duplicate of an old reading is not "seen": it is judged by its time like the first
    v = NodeValidator(NODE, settings()).validate(batch([epoch_day] * 2, pressure=[3.0] * 2))
    assert reasons(v) == Counter({"too_old_timestamp": 2}) and v.duplicates == 0


def test_state_pickled_before_the_lower_bound_gets_the_default() -> None:
    v = NodeValidator(NODE, settings(min_ts_us=0))
    # the slots as the releases before packing pickled them (a 64-bit duplicate memory)
    state = {name: getattr(v, name) for name in NodeValidator.__slots__ if name != "min_ts_us"}
    state["seen_hash_"] = np.empty(0, dtype=np.uint64)
    old = NodeValidator.__new__(NodeValidator)
    old.__setstate__(state)
    assert old.min_ts_us == 946_684_800 * US_PER_S
    assert pickle.loads(pickle.dumps(v)).min_ts_us == 0


# -- duplicates and conflicts -------------------------------------------------------------------


def test_duplicates_across_two_batches_and_within_one() -> None:
    val = NodeValidator(NODE, settings())
    first = batch(series(5), flow_rate=[1.0, 2.0, 3.0, 4.0, 5.0], pressure=[3.0, np.nan, 3, 3, 3])
    v1 = val.validate(first)
    assert len(v1.accepted) == 5 and v1.duplicates == 0
    # Readings 1..3 again (same NaN positions, -0.0 vs 0.0 would still match), plus two new
    # readings of which the second is sent twice in this batch.
    again = batch(
        np.concatenate([series(3, 1), series(2, 5), series(1, 6)]),
        flow_rate=[2.0, 3.0, 4.0, 6.0, 7.0, 7.0],
        pressure=[np.nan, 3.0, 3.0, 3.0, 3.0, 3.0],
    )
    v2 = val.validate(again)
    check_invariant(again, v2)
    assert v2.duplicates == 4 and v2.quarantined == []
    assert v2.accepted.ts.tolist() == series(2, 5).tolist()
    assert (v2.accepted.flags == 0).all()


def test_nan_positions_matter_for_duplicates() -> None:
    val = NodeValidator(NODE, settings())
    val.validate(batch(series(1), flow_rate=[1.0], pressure=[np.nan]))
    v = val.validate(batch(np.repeat(series(1), 2), flow_rate=[1.0, 1.0], pressure=[np.nan, 0.0]))
    assert v.duplicates == 1 and reasons(v) == Counter({"conflict": 1})
    assert v.quarantined[0].line == 3


def test_conflict_first_seen_wins() -> None:
    val = NodeValidator(NODE, settings())
    ts = [T0, T0 + STEP, T0 + STEP, T0 + STEP, T0 + 2 * STEP]
    b = batch(ts, pressure=[3.0, 3.2, 3.3, 3.2, 3.4])
    v = val.validate(b)
    check_invariant(b, v)
    assert v.accepted.values[:, COL["pressure"]].tolist() == [3.0, 3.2, 3.4]
    assert v.duplicates == 1 and reasons(v) == Counter({"conflict": 1})
    assert v.quarantined[0].line == 4 and v.quarantined[0].whole_reading
    # Across batches: the accepted value stays the reference; the quarantined one was not kept.
    b2 = batch([T0 + STEP, T0 + STEP], pressure=[3.3, 3.2])
    v2 = val.validate(b2)
    check_invariant(b2, v2)
    assert len(v2.accepted) == 0 and v2.duplicates == 1 and reasons(v2) == {"conflict": 1}


def test_rejected_reading_does_not_block_a_later_good_one() -> None:
    b = batch([T0, T0], flow_rate=[np.inf, 2.0])
    v = NodeValidator(NODE, settings()).validate(b)
    check_invariant(b, v)
    assert reasons(v) == Counter({"non_finite": 1}) and len(v.accepted) == 1


def test_duplicate_memory_is_bounded() -> None:
    val = NodeValidator(NODE, settings())
    n = SEEN_MAX + 100
    val.validate(batch(series(n), pressure=np.full(n, 3.0) + np.arange(n) * 1e-3))
    assert val.seen_ts_.size == SEEN_MAX
    recent = val.validate(batch(series(1, n - 1), pressure=[3.0 + (n - 1) * 1e-3]))
    assert recent.duplicates == 1
    # Older than the memory: not recognised, accepted as out of order (documented bound).
    old = val.validate(batch(series(1, 0), pressure=[3.0]))
    assert old.duplicates == 0 and flagged(old, Flag.OUT_OF_ORDER) == [0]


def test_row_hash_canonicalises_nan_and_negative_zero() -> None:
    a = np.array([[0.0, np.nan, 1.5]])
    b = np.array([[-0.0, -np.nan, 1.5]])
    weird_nan = np.array([0x7FF8000000000ABC], dtype=np.uint64).view(np.float64)[0]
    c = np.array([[0.0, weird_nan, 1.5]])
    assert row_hash(a)[0] == row_hash(b)[0] == row_hash(c)[0]
    assert row_hash(a)[0] != row_hash(np.array([[0.0, 0.0, 1.5]]))[0]
    assert row_hash(a)[0] != row_hash(np.array([[0.0, np.nan, np.nextafter(1.5, 2)]]))[0]
    # Leaving out columns that are all NaN changes no hash; the same value elsewhere does.
    assert row_hash(a, np.array([0, 2]))[0] == row_hash(a)[0]
    assert row_hash(np.array([[1.5, np.nan]]))[0] != row_hash(np.array([[np.nan, 1.5]]))[0]


# -- order and gaps ---------------------------------------------------------------------------


def test_out_of_order_is_flagged_and_kept_in_file_order() -> None:
    val = NodeValidator(NODE, settings())
    val.validate(batch(series(10), pressure=noisy(10, 3, 4.0, 0.05)))
    ts = [series(1, 10)[0], series(1, 5)[0] + 1, series(1, 12)[0], series(1, 11)[0]]
    b = batch(ts, pressure=[4.0, 4.0, 4.0, 4.0])
    v = val.validate(b)
    check_invariant(b, v)
    assert v.accepted.ts.tolist() == ts  # file order kept
    assert flagged(v, Flag.OUT_OF_ORDER) == [1, 3]
    q = v.accepted.quality
    assert q[1] == pytest.approx(1 - PENALTIES[Flag.OUT_OF_ORDER]) and q[0] == 1.0


def test_gap_flagged_on_the_reading_after_it() -> None:
    ts = np.concatenate([series(20), series(20, 32)])  # one hour missing after reading 19
    b = batch(ts, pressure=noisy(40, 4, 4.0, 0.05))
    v = NodeValidator(NODE, settings(gap_factor=3.0)).validate(b)
    assert flagged(v, Flag.GAP_BEFORE) == [20]
    assert v.accepted.quality[20] == pytest.approx(1 - PENALTIES[Flag.GAP_BEFORE])
    # A 15-minute hole is exactly 3 intervals: not over the factor.
    ts2 = np.concatenate([series(20), series(20, 22)])
    v2 = NodeValidator(NODE, settings(gap_factor=3.0)).validate(batch(ts2, pressure=noisy(40)))
    assert flagged(v2, Flag.GAP_BEFORE) == []


def test_gap_across_batches_and_usual_interval_learned() -> None:
    val = NodeValidator(NODE, settings())
    val.validate(batch(series(10), flow_rate=noisy(10)))
    v = val.validate(batch(series(5, 14), flow_rate=noisy(5, 2)))
    assert flagged(v, Flag.GAP_BEFORE) == [0]
    # Hourly data is usual for an hourly node: no gap flags.
    hourly = T0 + np.arange(30, dtype=np.int64) * 12 * STEP
    v2 = NodeValidator(NODE, settings()).validate(batch(hourly, flow_rate=noisy(30)))
    assert flagged(v2, Flag.GAP_BEFORE) == []


def test_unsorted_batch_is_checked_in_time_order() -> None:
    ts = np.concatenate([series(20), series(20, 32)])
    p = noisy(40, 5, 4.0, 0.05)
    p[30] = 9.0  # a spike, in time order at position 30
    perm = np.random.default_rng(7).permutation(40)
    b = batch(ts[perm], pressure=p[perm])
    v = NodeValidator(NODE, settings()).validate(b)
    check_invariant(b, v)
    assert v.accepted.ts.tolist() == ts[perm].tolist()
    where = {int(t): i for i, t in enumerate(v.accepted.ts)}
    assert flagged(v, Flag.GAP_BEFORE) == [where[int(ts[20])]]
    assert flagged(v, Flag.SPIKE) == [where[int(ts[30])]]


# -- stuck sensors ---------------------------------------------------------------------------


def test_stuck_run_across_batch_boundary_flagged_from_the_right_reading() -> None:
    s = settings(stuck_min_s=3600)  # 12 intervals of 5 minutes
    p = noisy(40, 6, 4.0, 0.05)
    p[10:30] = 3.87  # flat from reading 10 to 29: reaches one hour at reading 22
    whole = NodeValidator(NODE, s).validate(batch(series(40), pressure=p))
    assert flagged(whole, Flag.STUCK) == list(range(22, 30))
    val = NodeValidator(NODE, s)
    a = val.validate(batch(series(15), pressure=p[:15]))
    b = val.validate(batch(series(25, 15), pressure=p[15:]))
    assert flagged(a, Flag.STUCK) == []
    assert flagged(b, Flag.STUCK) == [i - 15 for i in range(22, 30)]
    assert b.accepted.quality[7] == pytest.approx(1 - PENALTIES[Flag.STUCK])


def test_dead_meter_zero_flow_is_stuck_but_a_flat_totalizer_is_not() -> None:
    s = settings(stuck_min_s=3600)
    v = NodeValidator(NODE, s).validate(
        batch(series(20), flow_rate=np.zeros(20), total_flow=np.full(20, 1234.5))
    )
    assert flagged(v, Flag.STUCK) == list(range(12, 20))
    assert flagged(v, Flag.TOTALIZER_RESET) == []


def test_stuck_run_survives_missing_values_but_not_a_gap() -> None:
    s = settings(stuck_min_s=3600)
    p = np.full(20, 3.0)
    p[5:7] = np.nan  # missing values (not a gap: 15 min = 3 intervals): the run goes on
    v = NodeValidator(NODE, s).validate(batch(series(20), pressure=p))
    assert flagged(v, Flag.STUCK) == list(range(12, 20))
    ts = np.concatenate([series(10), series(10, 40)])  # a 2.5 h hole breaks the run
    v2 = NodeValidator(NODE, s).validate(batch(ts, pressure=np.full(20, 3.0)))
    assert flagged(v2, Flag.STUCK) == []


# -- spikes ----------------------------------------------------------------------------------


def test_spike_flagged_and_its_neighbours_not() -> None:
    p = noisy(100, 8, 4.0, 0.05)
    p[60] = 8.0
    v = NodeValidator(NODE, settings()).validate(batch(series(100), pressure=p))
    assert flagged(v, Flag.SPIKE) == [60]
    assert v.accepted.quality[60] == pytest.approx(1 - PENALTIES[Flag.SPIKE])
    assert v.accepted.quality[59] == 1.0 and v.accepted.quality[61] == 1.0


def test_spike_at_batch_end_and_return_in_next_batch() -> None:
    p = noisy(100, 9, 10.0, 0.5)
    p[59] = 60.0
    val = NodeValidator(NODE, settings())
    a = val.validate(batch(series(60), flow_rate=p[:60]))
    b = val.validate(batch(series(40, 60), flow_rate=p[60:]))
    assert flagged(a, Flag.SPIKE) == [59] and flagged(b, Flag.SPIKE) == []


def test_level_shift_flags_only_its_first_reading() -> None:
    p = noisy(100, 10, 4.0, 0.05)
    p[50:] += 2.0
    v = NodeValidator(NODE, settings()).validate(batch(series(100), pressure=p))
    assert flagged(v, Flag.SPIKE) == [50]


def test_spikes_do_not_inflate_the_scale_much() -> None:
    p = noisy(300, 11, 4.0, 0.05)
    for i in range(100, 200, 20):  # five large spikes
        p[i] = 9.0
    p[250] = 4.0 + 1.2  # a moderate one later must still be caught
    v = NodeValidator(NODE, settings()).validate(batch(series(300), pressure=p))
    assert flagged(v, Flag.SPIKE) == [100, 120, 140, 160, 180, 250]


def test_flat_series_first_wiggle_is_not_a_spike() -> None:
    p = np.full(50, 4.0)
    p[30] = 4.05  # one resolution step, well under the floor x spike_z
    v = NodeValidator(NODE, settings()).validate(batch(series(50), pressure=p))
    assert flagged(v, Flag.SPIKE) == []


def test_no_spike_during_warm_up() -> None:
    v = NodeValidator(NODE, settings()).validate(batch(series(4), pressure=[4.0, 4.0, 9.0, 4.0]))
    assert flagged(v, Flag.SPIKE) == []


# -- totalizer --------------------------------------------------------------------------------


def test_totalizer_reset_and_rollover() -> None:
    tot = 1000.0 + np.arange(20) * 1.5
    tot[8:] -= 1000.0  # reset at reading 8
    tot[14] = tot[13] - 0.0005  # rounding noise, within the tolerance
    tot[15:] = tot[13] + np.arange(5) * 1.5
    val = NodeValidator(NODE, settings())
    v = val.validate(batch(series(10), total_flow=tot[:10]))
    assert flagged(v, Flag.TOTALIZER_RESET) == [8]
    assert v.accepted.quality[8] == pytest.approx(1 - PENALTIES[Flag.TOTALIZER_RESET])
    v2 = val.validate(batch(series(10, 10), total_flow=tot[10:]))
    assert flagged(v2, Flag.TOTALIZER_RESET) == []
    # Across the batch boundary, with missing values in between.
    v3 = val.validate(batch(series(3, 20), total_flow=[np.nan, np.nan, 5.0]))
    assert flagged(v3, Flag.TOTALIZER_RESET) == [2]


# -- quality ----------------------------------------------------------------------------------


def test_quality_penalties_add_up_and_clip() -> None:
    flags = np.array(
        [0, int(Flag.GAP_BEFORE), int(Flag.SPIKE | Flag.STUCK), int(Flag.SPIKE | Flag.OUT_OF_ORDER)]
    )
    q = quality_of(flags)
    assert q.tolist() == pytest.approx([1.0, 0.95, 0.0, 0.4])
    assert quality_of(np.array([sum(int(f) for f in Flag)]))[0] == 0.0


# -- properties -------------------------------------------------------------------------------


def hostile_batch(rng: np.random.Generator, n: int, start: int) -> ReadingBatch:
    """Duplicates, conflicts, disorder, inf, NaN, out-of-range and future readings mixed."""
    ts = series(n, start)
    ts = np.concatenate([ts, rng.choice(ts, n // 5), rng.choice(series(n, start - n), n // 10)])
    ts[rng.random(ts.size) < 0.02] = NOW + 3600 * US_PER_S
    rng.shuffle(ts)
    m = ts.size
    values = rng.normal(5.0, 3.0, (m, 10))
    values[rng.random((m, 10)) < 0.4] = np.nan
    values[rng.random((m, 10)) < 0.03] = np.inf
    values[rng.random((m, 10)) < 0.03] = -np.inf
    values[rng.random((m, 10)) < 0.03] = 1e12
    values[rng.random(m) < 0.05] = np.inf  # whole readings of inf only
    flat = rng.random(m) < 0.3
    values[flat, 0] = 0.0
    # Exact copies of earlier rows, same ts and values.
    src = rng.integers(0, m, m // 10)
    dst = rng.integers(0, m, m // 10)
    ts[dst] = ts[src]
    values[dst] = values[src]
    return ReadingBatch(NODE, "hostile.csv", ts, values, np.arange(m, dtype=np.int64))


def test_invariant_holds_on_random_hostile_batches() -> None:
    rng = np.random.default_rng(20240611)
    val = NodeValidator(NODE, settings(stuck_min_s=1800))
    accepted_ts: set[int] = set()
    totals: Counter[str] = Counter()
    for k in range(12):
        b = hostile_batch(rng, int(rng.integers(0, 400)), start=k * 200)
        v = val.validate(b)
        check_invariant(b, v)
        acc = v.accepted.ts.tolist()
        assert len(set(acc)) == len(acc)  # one reading per instant
        assert not accepted_ts & set(acc) or len(accepted_ts) > SEEN_MAX
        accepted_ts |= set(acc)
        assert np.isfinite(v.accepted.values[~np.isnan(v.accepted.values)]).all()
        assert (v.accepted.ts <= NOW + 300 * US_PER_S).all()
        removed_per_line = Counter(q.line for q in v.quarantined if not q.whole_reading)
        assert set(removed_per_line) <= set(v.accepted.line.tolist())
        has_removed = v.accepted.flags & int(Flag.VALUE_REMOVED) > 0
        assert set(v.accepted.line[has_removed].tolist()) == set(removed_per_line)
        totals.update(q.reason for q in v.quarantined)
    assert {"conflict", "non_finite", "future_timestamp"} <= set(totals)
    assert any(r.startswith("out_of_range:") for r in totals)


def _flagged_stream(
    rng: np.random.Generator, n: int, *, seed: int, spikes: int, stuck: slice, reset_at: int,
    gap_at: int, flow: Callable[[np.ndarray], np.ndarray],
) -> ReadingBatch:
    """Pressure with ``spikes`` spikes and a stuck stretch, a totalizer reset at ``reset_at``,
    a 3 h gap before ``gap_at``; flow_rate is ``flow`` of the pressure (drawn last)."""
    p = noisy(n, seed, 4.0, 0.05)
    p[rng.integers(0, n, spikes)] = 9.0
    p[stuck] = 4.2
    tot = np.cumsum(rng.random(n))
    tot[reset_at:] -= tot[reset_at - 1]
    ts = series(n)
    ts[gap_at:] += 3 * 3600 * US_PER_S
    return batch(ts, pressure=p, total_flow=tot, flow_rate=flow(p))


def test_sorted_input_gives_the_same_result_whatever_the_batching() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    b = _flagged_stream(
        rng, n, seed=12, spikes=10, stuck=slice(1000, 1200), reset_at=2000, gap_at=1500,
        flow=lambda p: np.where(rng.random(n) < 0.3, np.nan, p),
    )
    one = NodeValidator(NODE, settings(stuck_min_s=3600)).validate(b)
    val = NodeValidator(NODE, settings(stuck_min_s=3600))
    cuts = [0, 1, 7, 500, 1499, 1500, 2100, n]
    parts = [val.validate(b.take(np.arange(a, z))) for a, z in zip(cuts, cuts[1:], strict=False)]
    flags = np.concatenate([p.accepted.flags for p in parts])
    np.testing.assert_array_equal(flags, one.accepted.flags)
    for f in (Flag.SPIKE, Flag.STUCK, Flag.GAP_BEFORE, Flag.TOTALIZER_RESET):
        assert flagged(one, f), f"expected some {f.name} flags"


def test_live_sized_batches_give_the_same_result_as_one_batch() -> None:
    # Batches of 1-10 readings, as live: the usual-case short cuts (in order, nothing removed,
    # every measurement present) and the general paths must agree with one big batch.
    rng = np.random.default_rng(4)
    n = 1500
    b = _flagged_stream(
        rng, n, seed=14, spikes=8, stuck=slice(600, 800), reset_at=1000, gap_at=700,
        flow=lambda _p: np.where(rng.random(n) < 0.1, np.nan, noisy(n, 15, 10.0, 0.5)),
    )
    one = NodeValidator(NODE, settings(stuck_min_s=3600)).validate(b)
    val = NodeValidator(NODE, settings(stuck_min_s=3600))
    cuts = np.unique(np.concatenate([[0, n], np.cumsum(rng.integers(1, 11, n))]))
    cuts = cuts[cuts <= n]
    parts = [val.validate(b.take(np.arange(a, z))) for a, z in zip(cuts, cuts[1:], strict=False)]
    for name in ("flags", "quality", "ts"):
        got = np.concatenate([getattr(part.accepted, name) for part in parts])
        np.testing.assert_array_equal(got, getattr(one.accepted, name))
    for f in (Flag.SPIKE, Flag.STUCK, Flag.GAP_BEFORE, Flag.TOTALIZER_RESET):
        assert flagged(one, f), f"expected some {f.name} flags"
    again = val.validate(b.take(np.arange(n - 5, n)))  # a re-send of the last five readings
    assert again.duplicates == 5 and len(again.accepted) == 0


def test_state_pickles_and_stays_small_after_100k_readings() -> None:
    val = NodeValidator(NODE, settings())
    n = 100_000
    rng = np.random.default_rng(5)
    values = empty_values(n)
    values[:, :] = rng.normal(5.0, 1.0, (n, 10))
    ts = series(n)
    for a in range(0, n, 10_000):
        val.validate(
            ReadingBatch(
                NODE,
                "big.csv",
                ts[a : a + 10_000],
                values[a : a + 10_000],
                np.arange(a, a + 10_000),
            )
        )
    blob = pickle.dumps(val)
    assert len(blob) < 20_000, len(blob)
    # The restored state continues exactly like the original.
    restored = pickle.loads(blob)
    nxt = batch(series(50, n), pressure=noisy(50, 13, 5.0, 1.0))
    a, b = val.validate(nxt), restored.validate(nxt)
    np.testing.assert_array_equal(a.accepted.flags, b.accepted.flags)
    assert restored.validate(nxt).duplicates == 50
