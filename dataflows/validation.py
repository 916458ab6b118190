"""Per-node validation of reading batches (DESIGN.md, "The pipeline", step 2).

``NodeValidator`` holds the state of one node and turns each ``ReadingBatch`` into a
``Validated``: the accepted readings with ``quality`` and ``flags`` set, the quarantine records,
and the number of exact duplicates dropped. For every call::

    len(batch) == len(accepted) + (quarantined records with whole_reading) + duplicates

Checks, in this order:

1. Values: ``+-inf`` is removed as ``non_finite`` (NaN already means "not measured"); a finite
   value outside the node's range (``Network.range_arrays``) is removed as
   ``out_of_range:<measurement>``. A removed value becomes NaN in the accepted reading, which
   gets ``Flag.VALUE_REMOVED``; a reading that loses every value it had is quarantined whole,
   with the reason of its first removed value (column order), and has no value-level records.
2. ``future_timestamp``: ``ts > now + future_tolerance_s`` (``now`` is ``settings.now_us`` or
   the wall clock at the call), quarantined whole; ``too_old_timestamp``: ``ts`` before
   ``settings.min_ts_us`` (default 2000-01-01, ``WATERFLOW_MIN_TIMESTAMP``: a logger's clock
   reset to 1970 must not open a 1970 partition or archive folder), quarantined whole.
3. Duplicates, against the recently accepted readings and earlier readings of the batch (file
   order): same ts and bitwise identical values (NaN positions included, -0.0 == 0.0) are
   dropped and counted; same ts with other values is quarantined whole as ``conflict`` (the
   first one seen wins). The memory holds the ``SEEN_MAX`` (512) newest accepted timestamps
   with a 32-bit hash of their values (the high half of ``row_hash``), about 42 h of
   5-minute data in 2 KB of hashes (the timestamps are pickled as steps: a few hundred bytes
   at most). The memory is keyed by timestamp, so the hash only tells a re-send from a
   conflicting reading of the same timestamp: a conflict is taken for a duplicate with
   probability 2**-32 per such pair (within a batch the full 64 bits are compared). An older
   reading is not checked: it is accepted with ``OUT_OF_ORDER`` (the sinks upsert on
   (node_id, ts), so a re-sent old reading still does not count twice there).
4. Flags on the accepted readings, computed in time order although the output keeps file order:

   - ``OUT_OF_ORDER``: older than the newest reading accepted before it in arrival order.
   - The time-series checks run on the node's in-order series: the accepted readings newer than
     the newest one of earlier batches, sorted by time (a batch may arrive unsorted). Readings
     older than that (late data) only get ``OUT_OF_ORDER``: the state has moved past them.
   - ``GAP_BEFORE``: the interval since the previous reading exceeds ``gap_factor`` x the usual
     interval, a geometric exponentially weighted mean of recent intervals (a mean of logs,
     so a day-long gap moves it by a few percent instead of dragging it up).
   - ``STUCK``: a measurement of ``STUCK_COLUMNS`` repeats exactly the same value (0.0 flow
     too: a dead meter) for at least ``stuck_min_s``; flagged from the reading where the run
     reaches that duration. Missing values neither break nor extend a run; a gap
     (over ``gap_factor`` x the usual interval) breaks it.
   - ``SPIKE``: ``|step| > spike_z x scale``, where the scale is a geometric EW mean of recent
     ``|step|``, calibrated to the standard deviation of Gaussian steps, and at least
     ``SPIKE_FLOOR`` (per measurement: keeps a flat series from flagging its first wiggle).
     Logs keep a spike from inflating the scale much (one 100x step moves it by ~15 %).
     No look-ahead: the step back from a spike to the level before it is not a spike. Steps
     across a gap (in that measurement's own series) are not judged.
   - ``TOTALIZER_RESET``: ``total_flow`` lower than the previous value beyond
     ``TOTALIZER_TOLERANCE``.
   - ``TOTALIZER_MISMATCH``: the totalizer's volume over the last hour disagrees with the
     flow integrated over it (``dataflows.totalizer_check``).

``quality = clip(1 - sum of PENALTIES of the flags set, 0, 1)``: spike, stuck and removed values
weigh most, out-of-order and gaps little (``quality_of``).

The state stays small and fixed in size whatever the number of readings (about 2.8 KB
pickled, 2 KB of it the duplicate memory's hashes): per-measurement scalars, the interval
estimate, the node's limits and the duplicate memory, packed by ``NodeValidator.__getstate__``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from dataflows.model import COL, MEASUREMENTS, Flag, Quarantined, ReadingBatch
from dataflows.packing import pack_int64, unpack_int64
from dataflows.settings import MIN_TS_US, Settings
from dataflows.totalizer_check import TotalizerCheck

#: Accepted readings remembered (newest timestamps) for duplicate and conflict detection.
SEEN_MAX = 512
#: Measurements checked for a flat line (a totalizer is flat whenever nothing flows).
STUCK_COLUMNS: tuple[str, ...] = (
    "flow_rate",
    "pressure",
    "level",
    "chlorine",
    "ph",
    "turbidity",
    "conductivity",
    "temperature",
    "redox",
)
#: Measurements checked for spikes: all but the totalizer, whose steps are volumes.
SPIKE_COLUMNS: tuple[str, ...] = STUCK_COLUMNS
#: Smallest step scale per measurement (canonical units), about the sensors' resolution.
SPIKE_FLOOR: dict[str, float] = {
    "flow_rate": 0.1,
    "pressure": 0.02,
    "temperature": 0.1,
    "level": 0.02,
    "chlorine": 0.02,
    "ph": 0.02,
    "turbidity": 0.1,
    "conductivity": 2.0,
    "redox": 2.0,
}
#: A totalizer may go down by this much (m3) from rounding before it counts as a reset.
TOTALIZER_TOLERANCE = 1e-3
#: Quality lost per flag; the sum is taken from 1.0 and clipped to [0, 1].
PENALTIES: dict[Flag, float] = {
    Flag.SPIKE: 0.5,
    Flag.STUCK: 0.5,
    Flag.VALUE_REMOVED: 0.4,
    Flag.TOTALIZER_RESET: 0.3,
    Flag.TOTALIZER_MISMATCH: 0.3,
    Flag.LATE: 0.1,
    Flag.OUT_OF_ORDER: 0.1,
    Flag.GAP_BEFORE: 0.05,
}
#: Weight of the newest observation in the interval and step-scale estimates.
EW_ALPHA = 1.0 / 32.0
#: Intervals seen before gaps are flagged, steps seen before spikes are flagged.
GAP_WARMUP = 3
SPIKE_WARMUP = 8
#: exp(E[log |Z|]) for a standard normal Z is exp(-(gamma + ln 2) / 2) = 0.530; dividing by it
#: turns the geometric mean of |steps| into an estimate of their standard deviation.
_GEOMEAN_TO_SIGMA = 1.0 / 0.5298

_INT64_MIN = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STUCK_IDX = tuple(COL[m] for m in STUCK_COLUMNS)
_SPIKE_IDX = tuple(COL[m] for m in SPIKE_COLUMNS)
_TOTAL_IDX = COL["total_flow"]
_FLOW_IDX = COL["flow_rate"]
_FLOOR = np.array([SPIKE_FLOOR.get(m, 1.0) for m in MEASUREMENTS], dtype=np.float64)
# The same as Python floats (a numpy scalar costs more per operation), and the offset inside
# the log of the steps (``_spikes``).
_FLOOR_LIST: list[float] = _FLOOR.tolist()
_LOG_OFFSET = [0.1 * f for f in _FLOOR_LIST]
# Microseconds per second, times the margin that keeps exp(log(x)) rounding from turning
# "exactly gap_factor intervals" into a gap.
_GAP_US = 1e6 * (1.0 + 1e-9)
_N_FLAG_BITS = max(int(f) for f in Flag).bit_length()
# Quality of every combination of flags: one table lookup per reading instead of a pass per flag.
_QUALITY_TABLE = np.clip(
    1.0
    - np.array(
        [sum(p for f, p in PENALTIES.items() if bits & int(f)) for bits in range(1 << _N_FLAG_BITS)]
    ),
    0.0,
    1.0,
)
# One salt per column, so that the same value in another column hashes differently.
_SALT = np.arange(1, len(MEASUREMENTS) + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
_EW_BLOCK = 2048
_EW_POWERS = (1.0 - EW_ALPHA) ** np.arange(1, _EW_BLOCK + 1, dtype=np.float64)
# NodeValidator's per-measurement arrays, pickled packed (``NodeValidator.__getstate__``).
_FLOAT_SLOTS = ("lo", "hi", "last_value_", "scale_log_", "spike_ref_")
_INT_SLOTS = ("last_ts_", "run_start_", "steps_n_")
# The learned ones, written only for a measurement with a value (``_column``), and their
# values before: a snapshot holds the measurements the node has reported only.
_LEARNED_FLOATS = {"last_value_": np.nan, "scale_log_": 0.0, "spike_ref_": np.nan}
_LEARNED_INTS = _INT_SLOTS
#: Version of the packed state (``NodeValidator.__getstate__``); a dict is an older one.
_STATE_VERSION = 3
# The slots pickled as they are, in this order, after the version.
_PLAIN_SLOTS = (
    "node_id", "now_us", "future_tolerance_us", "min_ts_us", "gap_factor", "stuck_min_us",
    "spike_z", "tip_", "interval_log_", "interval_n_", "totalizer_",
)
# Whole-reading outcomes of the dedup step, per reading of a batch.
_ACCEPT, _DUPLICATE, _CONFLICT = 0, 1, 2


@dataclass(slots=True)
class Validated:
    """Outcome of validating one batch.

    ``accepted`` is the batch's node with ``quality`` and ``flags`` set (``score`` None), in
    file order, with removed values set to NaN. ``duplicates`` counts the exact duplicates
    dropped; they are not in ``quarantined``.
    """

    accepted: ReadingBatch
    quarantined: list[Quarantined]
    duplicates: int


def quality_of(flags: np.ndarray) -> np.ndarray:
    """Quality in [0, 1] of readings with the given ``Flag`` bitmasks (``PENALTIES``).

    >>> quality_of(np.array([0, int(Flag.SPIKE | Flag.OUT_OF_ORDER), 255])).tolist()
    [1.0, 0.4, 0.0]
    """
    flags = np.asarray(flags, dtype=np.int64)
    if (flags >> _N_FLAG_BITS).any():
        raise ValueError(f"flags outside the Flag bits: {flags[flags >> _N_FLAG_BITS != 0][:5]}")
    return _QUALITY_TABLE[flags]


def row_hash(values: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """A 64-bit hash per row of ``values``, equal for rows with identical values.

    A sum over the measured values of a 64-bit mix of (column, value bits): NaN adds nothing,
    so any NaN bit pattern hashes alike, and ``columns`` may leave out columns that are all
    NaN in this batch without changing any hash. -0.0 hashes as 0.0.

    >>> rows = np.array([[1.5, np.nan], [1.5, -np.nan], [1.5, 0.0], [-0.0, 1.5]])
    >>> h = row_hash(rows)
    >>> bool(h[0] == h[1]), bool(h[0] == h[2]), bool(h[3] == row_hash(np.array([[0.0, 1.5]]))[0])
    (True, False, True)
    """
    values = np.asarray(values, dtype=np.float64)
    # All the columns at once: a few array operations per batch, not per column. A copy, so
    # the view below is ours, and -0.0 + 0.0 is 0.0.
    if columns is None:
        v, salt = values + 0.0, _SALT[: values.shape[1]]
    else:
        v, salt = values[:, columns] + 0.0, _SALT[columns]
    x = v.view(np.uint64) ^ salt
    # splitmix64 finalizer: every input bit flips about half of the output bits.
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap modulo 2**64, as intended
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    x[np.isnan(v)] = 0
    # The sum wraps modulo 2**64 too, so the order of the terms does not matter.
    return np.add.reduce(x, axis=1, dtype=np.uint64)


def _memory_hash(hashes: np.ndarray) -> np.ndarray:
    """The 32-bit hash the duplicate memory keeps of a ``row_hash``: its high half."""
    return (hashes >> np.uint64(32)).astype(np.uint32)


def _ewm_before(x: np.ndarray, start: float) -> tuple[np.ndarray, float]:
    """The exponentially weighted mean before each element of ``x``, and after the last one.

    ``s[0] = start``; ``s[i+1] = (1 - a) s[i] + a x[i]``. Computed in closed form per block
    (cumulative sums of ``x / d**k``), so there is a Python loop per 2048 elements, not per
    element; the block stays short enough that ``d**-k`` cannot overflow or lose precision.
    """
    out = np.empty(x.shape[0] + 1, dtype=np.float64)
    out[0] = start
    for b0 in range(0, x.shape[0], _EW_BLOCK):
        # dk * (out[b0] + a * cumsum(x / dk)), computed in place in the output.
        w = out[b0 + 1 : b0 + 1 + _EW_BLOCK]
        dk = _EW_POWERS[: w.shape[0]]
        np.divide(x[b0 : b0 + _EW_BLOCK], dk, out=w)
        np.add.accumulate(w, out=w)
        w *= EW_ALPHA
        w += out[b0]
        w *= dk
    return out[:-1], float(out[-1])


def _format_raw(node_id: str, ts: int, row: np.ndarray) -> str:
    """The reading as a canonical CSV line (FORMATS.md, section 1): what validation saw."""
    try:
        when = (_EPOCH + timedelta(microseconds=int(ts))).isoformat()
    except OverflowError:  # a timestamp past year 9999 is still traceable, in µs
        when = f"{int(ts)}us"
    cells = ["" if np.isnan(v) else repr(float(v)) for v in row]
    return ",".join([node_id, when, *cells])


class NodeValidator:
    """Validation state of one node; lives in a Bytewax ``stateful_map``.

    It pickles, and stays under 20 KB whatever the number of readings: only the thresholds
    it needs are copied from the settings (not the whole network), and the duplicate memory
    is bounded by ``SEEN_MAX``. Learned state ends in ``_``.

    >>> from dataflows.model import empty_values
    >>> v = NodeValidator("n1", Settings(now_us=10**15, min_ts_us=0))
    >>> vals = empty_values(2)
    >>> vals[:, 1] = [3.5, float("inf")]
    >>> out = v.validate(ReadingBatch("n1", "f.csv", np.array([0, 300_000_000]), vals,
    ...                               np.array([2, 3])))
    >>> len(out.accepted), [q.reason for q in out.quarantined], out.duplicates
    (1, ['non_finite'], 0)
    """

    __slots__ = (
        "node_id",
        "lo",
        "hi",
        "now_us",
        "future_tolerance_us",
        "min_ts_us",
        "gap_factor",
        "stuck_min_us",
        "spike_z",
        "tip_",
        "seen_ts_",
        "seen_hash_",
        "interval_log_",
        "interval_n_",
        "last_value_",
        "last_ts_",
        "run_start_",
        "scale_log_",
        "steps_n_",
        "spike_ref_",
        "totalizer_",
    )

    def __init__(self, node_id: str, settings: Settings) -> None:
        self.node_id = node_id
        lo, hi = settings.network.range_arrays(node_id)
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)
        self.now_us = settings.now_us
        self.future_tolerance_us = int(settings.future_tolerance_s) * 1_000_000
        self.min_ts_us = int(settings.min_ts_us)
        self.gap_factor = float(settings.gap_factor)
        self.stuck_min_us = int(settings.stuck_min_s) * 1_000_000
        self.spike_z = float(settings.spike_z)
        k = len(MEASUREMENTS)
        # Newest accepted ts (None before the first): the in-order series continues after it.
        self.tip_: int | None = None
        # Duplicate memory, sorted by ts.
        self.seen_ts_ = np.empty(0, dtype=np.int64)
        self.seen_hash_ = np.empty(0, dtype=np.uint32)
        # Usual interval: EW mean of log(seconds) and how many intervals went into it.
        self.interval_log_ = 0.0
        self.interval_n_ = 0
        # Per measurement, on the in-order series: last valid value and its ts, start of the
        # current flat run, EW mean of log(|step| + floor), steps seen, and the value before
        # the last value when that last value was a spike (NaN otherwise).
        self.last_value_ = np.full(k, np.nan)
        self.last_ts_ = np.zeros(k, dtype=np.int64)
        self.run_start_ = np.zeros(k, dtype=np.int64)
        self.scale_log_ = np.zeros(k)
        self.steps_n_ = np.zeros(k, dtype=np.int64)
        self.spike_ref_ = np.full(k, np.nan)
        self.totalizer_ = TotalizerCheck()

    def __getstate__(self) -> tuple[object, ...]:
        """The state, packed (lossless): what the snapshot of every node costs.

        A tuple, not a dict of the slots' names; the duplicate memory's timestamps as steps in
        the narrowest unsigned type (5-minute data: one byte each, not eight); the limits and
        the learned per-measurement arrays as raw bytes (a pickled array costs about 130 bytes
        besides its data), the learned ones only for the measurements the node has reported
        (the others are as ``__init__`` made them).
        """
        cols = np.flatnonzero(~np.isnan(self.last_value_))
        return (
            _STATE_VERSION,
            *(getattr(self, name) for name in _PLAIN_SLOTS),
            pack_int64(self.seen_ts_, steps=True),
            self.seen_hash_.tobytes(),
            np.concatenate([self.lo, self.hi]).tobytes(),
            cols.astype(np.uint8).tobytes(),
            np.concatenate([getattr(self, n)[cols] for n in _LEARNED_FLOATS]).tobytes(),
            np.concatenate([getattr(self, n)[cols] for n in _LEARNED_INTS]).tobytes(),
        )

    def __setstate__(self, state: Any) -> None:
        k = len(MEASUREMENTS)
        if isinstance(state, tuple):
            plain = state[1 : 1 + len(_PLAIN_SLOTS)]
            seen_ts, hashes, limits, cols_b, floats_b, ints_b = state[1 + len(_PLAIN_SLOTS) :]
            for name, value in zip(_PLAIN_SLOTS, plain, strict=True):
                setattr(self, name, value)
            self.seen_ts_ = unpack_int64(seen_ts, steps=True)
            self.seen_hash_ = np.frombuffer(hashes, dtype=np.uint32).copy()
            limits_a = np.frombuffer(limits)
            self.lo, self.hi = limits_a[:k].copy(), limits_a[k:].copy()
            cols = np.frombuffer(cols_b, dtype=np.uint8).astype(np.intp)
            floats = np.frombuffer(floats_b).reshape(len(_LEARNED_FLOATS), cols.size)
            ints = np.frombuffer(ints_b, dtype=np.int64).reshape(len(_LEARNED_INTS), cols.size)
            for i, (name, init) in enumerate(_LEARNED_FLOATS.items()):
                full = np.full(k, init)
                full[cols] = floats[i]
                setattr(self, name, full)
            for i, name in enumerate(_LEARNED_INTS):
                full_i = np.zeros(k, dtype=np.int64)
                full_i[cols] = ints[i]
                setattr(self, name, full_i)
            return
        # The dicts of older releases: the arrays themselves, or packed by name.
        state.setdefault("min_ts_us", MIN_TS_US)  # a snapshot from before the lower bound
        if "seen_" in state:
            packed_ts, hashes = state.pop("seen_")
            state["seen_ts_"] = unpack_int64(packed_ts, steps=True)
            state["seen_hash_"] = np.frombuffer(hashes, dtype=np.uint64)
            floats = np.frombuffer(state.pop("floats_"), dtype=np.float64)
            ints = np.frombuffer(state.pop("ints_"), dtype=np.int64)
            for i, name in enumerate(_FLOAT_SLOTS):
                state[name] = floats[i * k : (i + 1) * k].copy()
            for i, name in enumerate(_INT_SLOTS):
                state[name] = ints[i * k : (i + 1) * k].copy()
        # Their memory held 64-bit hashes: this release keeps the high half.
        state["seen_hash_"] = _memory_hash(np.asarray(state["seen_hash_"], dtype=np.uint64))
        for name, value in state.items():
            setattr(self, name, value)

    # -- the entry point -------------------------------------------------------------------

    def validate(self, batch: ReadingBatch) -> Validated:
        """Validate one batch of this node, updating the state; see the module docstring."""
        if batch.node_id != self.node_id:
            raise ValueError(
                f"NodeValidator of node {self.node_id!r} got a batch of node {batch.node_id!r}"
            )
        n = len(batch)
        ts = np.asarray(batch.ts, dtype=np.int64)
        raw = np.asarray(batch.values, dtype=np.float64)
        if raw.shape != (n, len(MEASUREMENTS)):
            raise ValueError(
                f"batch of node {self.node_id!r}: values shape {raw.shape}, "
                f"expected {(n, len(MEASUREMENTS))}"
            )
        # A batch costs mostly a fixed number of small array operations (live, it holds a few
        # readings): the usual case (nothing removed, late, duplicated) takes short cuts, and
        # the arrays only the exceptions need are made for them (None: nothing to record).

        # 1. Value checks, over the whole matrix at once: NaN compares False, so a value the
        # batch lacks is never out of range nor removed.
        present = ~np.isnan(raw)
        measured = np.logical_or.reduce(present, axis=0).nonzero()[0]
        inf = np.isinf(raw)
        removed = inf | (raw < self.lo) | (raw > self.hi)
        n_removed: np.ndarray | None = None
        lost_all: np.ndarray | None = None
        clean = raw
        if np.count_nonzero(removed):
            n_removed = removed.sum(axis=1)
            lost_all = (n_removed > 0) & (n_removed == present.sum(axis=1))
            clean = np.where(removed, np.nan, raw)

        # 2. Future timestamps.
        now = self.now_us if self.now_us is not None else time.time_ns() // 1000
        future = ts > now + self.future_tolerance_us
        too_old = ts < self.min_ts_us
        standing = ~(future | too_old)
        if lost_all is not None:
            standing &= ~lost_all

        # 3. Duplicates and conflicts among the readings still standing.
        hashes = row_hash(raw, measured)
        status = self._dedup(ts, hashes, standing)
        accepted = standing if status is None else standing & (status == _ACCEPT)
        acc = accepted.nonzero()[0]
        everything = acc.size == n  # the usual case: no copy of the arrays needed

        # 4. Flags, then the state moves on.
        flags = np.zeros(n, dtype=np.int64)
        if n_removed is not None:
            flags[accepted & (n_removed > 0)] |= int(Flag.VALUE_REMOVED)
        self._flag_series(ts, clean, measured, acc, flags)
        self._remember(ts if everything else ts[acc], hashes if everything else hashes[acc])

        out_flags = flags if everything else flags[acc]
        accepted_batch = replace(
            batch,
            ts=ts if everything else ts[acc],
            values=clean if everything else clean[acc],
            line=batch.line if everything else batch.line[acc],
            quality=_QUALITY_TABLE[out_flags],  # quality_of without its check: our own flags
            flags=out_flags,
            score=None,
        )
        quarantined: list[Quarantined] = []
        if not everything or n_removed is not None:
            quarantined = self._records(
                batch, raw, removed, inf, future, too_old, lost_all, status, accepted, n_removed
            )
        return Validated(
            accepted=accepted_batch,
            quarantined=quarantined,
            duplicates=0 if status is None else int(np.count_nonzero(status == _DUPLICATE)),
        )

    # -- duplicates ------------------------------------------------------------------------

    def _dedup(
        self, ts: np.ndarray, hashes: np.ndarray, standing: np.ndarray
    ) -> np.ndarray | None:
        """Per reading: _ACCEPT, _DUPLICATE or _CONFLICT (only ``standing`` ones are judged).

        None when every standing reading is accepted (the usual case).
        """
        status: np.ndarray | None = None
        idx = standing.nonzero()[0]
        if idx.size == 0:
            return status
        sts = ts[idx]
        # Against the memory of accepted readings.
        if self.seen_ts_.size:
            pos = self.seen_ts_.searchsorted(sts)
            np.minimum(pos, self.seen_ts_.size - 1, out=pos)
            known = self.seen_ts_[pos] == sts
            if np.count_nonzero(known):
                status = np.zeros(ts.shape[0], dtype=np.int8)  # _ACCEPT is 0
                same = self.seen_hash_[pos] == _memory_hash(hashes[idx])
                status[idx[known & same]] = _DUPLICATE
                status[idx[known & ~same]] = _CONFLICT
                idx = idx[~known]
                sts = ts[idx]
        # Within the batch. Timestamps in increasing order (the usual case) cannot repeat.
        if idx.size < 2 or not np.count_nonzero(sts[1:] <= sts[:-1]):
            return status
        # A stable sort by ts keeps file order inside each group of equal ts, so the first of
        # each group is the first seen, and wins.
        order = idx[sts.argsort(kind="stable")]
        sts = ts[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = sts[1:] != sts[:-1]
        if np.count_nonzero(first) == order.size:
            return status
        if status is None:
            status = np.zeros(ts.shape[0], dtype=np.int8)
        head = order[np.maximum.accumulate(np.where(first, np.arange(order.size), 0))]
        later = ~first
        same = hashes[order] == hashes[head]
        status[order[later & same]] = _DUPLICATE
        status[order[later & ~same]] = _CONFLICT
        return status

    def _remember(self, ts: np.ndarray, hashes: np.ndarray) -> None:
        """Add accepted readings to the duplicate memory, keeping the SEEN_MAX newest."""
        if ts.size == 0:
            return
        all_ts = np.concatenate([self.seen_ts_, ts])
        all_h = np.concatenate([self.seen_hash_, _memory_hash(hashes)])
        old = self.seen_ts_.size
        if (old == 0 or ts[0] >= self.seen_ts_[-1]) and not np.count_nonzero(ts[1:] < ts[:-1]):
            # Already in order (the usual case): the stable sort would keep it as it is.
            if all_ts.size <= SEEN_MAX:
                self.seen_ts_, self.seen_hash_ = all_ts, all_h
                return
            order: np.ndarray | slice = slice(-SEEN_MAX, None)
        else:
            order = all_ts.argsort(kind="stable")[-SEEN_MAX:]
        # Copies, so the state does not keep the batch's arrays alive through views.
        self.seen_ts_ = all_ts[order].copy()
        self.seen_hash_ = all_h[order].copy()

    # -- time-series flags -----------------------------------------------------------------

    def _flag_series(
        self,
        ts: np.ndarray,
        clean: np.ndarray,
        measured: np.ndarray,
        acc: np.ndarray,
        flags: np.ndarray,
    ) -> None:
        """Set OUT_OF_ORDER, GAP_BEFORE, STUCK, SPIKE, TOTALIZER_* on accepted readings."""
        if acc.size == 0:
            return
        tip = self.tip_ if self.tip_ is not None else _INT64_MIN
        acc_ts = ts[acc]
        if acc_ts[0] > tip and not np.count_nonzero(acc_ts[1:] < acc_ts[:-1]):
            # All newer than the tip and in time order (the usual case): none is out of
            # order, and they are the in-order series as they are.
            rows, t = acc, acc_ts
        else:
            # Out of order: older than the newest accepted before it, in arrival order.
            newest_before = np.empty(acc.size, dtype=np.int64)
            newest_before[0] = tip
            np.maximum.accumulate(acc_ts[:-1], out=newest_before[1:])
            np.maximum(newest_before, tip, out=newest_before)
            flags[acc[acc_ts < newest_before]] |= int(Flag.OUT_OF_ORDER)
            # The in-order series: readings past the previous tip, in time order.
            newer = acc[acc_ts > tip]
            if newer.size == 0:
                return
            rows = newer[ts[newer].argsort(kind="stable")]
            t = ts[rows]
        n = t.size
        self.tip_ = int(t[-1])

        # Intervals (the first has none before the node's first reading) and the usual
        # interval before each reading, as the limit of a gap (NaN: no estimate yet).
        prev_t = np.empty(n, dtype=np.int64)
        prev_t[0] = tip
        prev_t[1:] = t[:-1]
        dt = t - prev_t
        first = 1 if tip == _INT64_MIN else 0
        gap_limit_us = np.empty(n)
        gap_limit_us[:first] = np.nan
        if n > first:
            logs = np.log(dt[first:] / 1e6)
            start = self.interval_log_ if self.interval_n_ else float(logs[0])
            before, self.interval_log_ = _ewm_before(logs, start)
            usual = gap_limit_us[first:]
            np.exp(before, out=usual)
            usual[: max(GAP_WARMUP - self.interval_n_, 0)] = np.nan  # before the warm-up
            self.interval_n_ += n - first
            # NaN compares False: no gap flagged before the estimate exists. The 1e-9 keeps
            # exp(log(x)) rounding from turning "exactly gap_factor intervals" into a gap.
            usual *= self.gap_factor
            usual *= _GAP_US
        gap = dt > gap_limit_us
        if np.count_nonzero(gap):
            flags[rows[gap]] |= int(Flag.GAP_BEFORE)

        # One row per measurement, the in-order series' values: contiguous, one gather.
        mlist = measured.tolist()
        block = clean.T[measured[:, None], rows]
        valid = ~np.isnan(block)
        dense = np.count_nonzero(valid) == valid.size  # every reading has every measurement
        series_flags: np.ndarray | None = None
        for j, c in enumerate(mlist):
            k: np.ndarray | slice = slice(None)  # the readings with this measurement
            if dense:
                f = self._column(c, block[j], t, gap_limit_us)
            else:
                has = valid[j].nonzero()[0]
                if has.size == 0:
                    continue
                k = has
                f = self._column(c, block[j][has], t[has], gap_limit_us[has])
            if f is not None:
                if series_flags is None:
                    series_flags = np.zeros(n, dtype=np.int64)
                series_flags[k] |= f
        if series_flags is not None:
            flags[rows] |= series_flags
        if _FLOW_IDX in mlist and _TOTAL_IDX in mlist:
            if series_flags is None:
                suspect = np.zeros(n, dtype=bool)
            else:
                suspect = (series_flags & int(Flag.SPIKE | Flag.STUCK)) != 0
            diverge = self.totalizer_.mismatch(
                t, clean[rows, _FLOW_IDX], clean[rows, _TOTAL_IDX], gap, suspect
            )
            flags[rows[diverge]] |= int(Flag.TOTALIZER_MISMATCH)

    def _column(
        self, c: int, x: np.ndarray, t: np.ndarray, gap_limit_us: np.ndarray
    ) -> np.ndarray | None:
        """Flags from one measurement's valid values on the in-order series; updates its state.

        None when no reading gets a flag (the usual case).
        """
        n = x.size
        out: np.ndarray | None = None
        last = float(self.last_value_[c])
        prev_x = np.empty(n)
        prev_x[0] = last
        prev_x[1:] = x[:-1]
        prev_t = np.empty(n, dtype=np.int64)
        prev_t[0] = self.last_ts_[c]
        prev_t[1:] = t[:-1]
        col_gap = (t - prev_t) > gap_limit_us  # a gap in this measurement's own series
        # Only prev_x[0] can be NaN (no value before): it compares False, and unequal.

        if c == _TOTAL_IDX:
            reset = x < prev_x - TOTALIZER_TOLERANCE
            if np.count_nonzero(reset):
                out = np.zeros(n, dtype=np.int64)
                out[reset] |= int(Flag.TOTALIZER_RESET)

        if c in _STUCK_IDX:
            breaks = (x != prev_x) | col_gap
            if np.count_nonzero(breaks) == n:
                run_start = t  # every reading starts a run (the usual case for noisy values)
            else:
                # 1 + index of the newest break at or before each reading, 0 for none, and
                # the start of each run: the ts of that break, or of the run before the batch.
                last_break = breaks * np.arange(1, n + 1)
                np.maximum.accumulate(last_break, out=last_break)
                starts = np.empty(n + 1, dtype=np.int64)
                starts[0] = self.run_start_[c]
                starts[1:] = t
                run_start = starts[last_break]
            stuck = (t - run_start) >= self.stuck_min_us
            if np.count_nonzero(stuck):
                if out is None:
                    out = np.zeros(n, dtype=np.int64)
                out[stuck] |= int(Flag.STUCK)
            self.run_start_[c] = run_start[-1]

        if c in _SPIKE_IDX:
            judged = ~col_gap
            judged[0] &= last == last  # not NaN: there is a value before
            spikes = self._spikes(c, x, prev_x, judged)
            if spikes is not None:
                out = spikes if out is None else out | spikes

        self.last_value_[c] = x[-1]
        self.last_ts_[c] = t[-1]
        return out

    def _spikes(
        self, c: int, x: np.ndarray, prev_x: np.ndarray, judged: np.ndarray
    ) -> np.ndarray | None:
        """SPIKE flags of one measurement (None: none); updates its step scale and reference."""
        n_judged = np.count_nonzero(judged)
        if n_judged == 0:
            self.spike_ref_[c] = np.nan
            return None
        if n_judged == x.size:
            j: np.ndarray | None = None
            step = np.abs(x - prev_x)
        else:
            j = judged.nonzero()[0]
            step = np.abs(x[j] - prev_x[j])
        # A tenth of the floor inside the log only keeps log(0) finite for repeated values;
        # the floor itself bounds the scale below.
        logs = np.log(step + _LOG_OFFSET[c])
        steps_n = int(self.steps_n_[c])
        start = self.scale_log_[c] if steps_n else float(logs[0])
        before, self.scale_log_[c] = _ewm_before(logs, start)
        limit = np.exp(before)
        limit *= _GEOMEAN_TO_SIGMA
        np.maximum(limit, _FLOOR_LIST[c], out=limit)
        limit *= self.spike_z
        over = step > limit
        over[: max(SPIKE_WARMUP - steps_n, 0)] = False  # before the warm-up
        self.steps_n_[c] += n_judged
        if not np.count_nonzero(over):
            self.spike_ref_[c] = np.nan
            return None
        at = over.nonzero()[0]
        candidates = (at if j is None else j[at]).tolist()
        limit_at = limit[at].tolist()

        # Few readings: resolve in order, because whether a jump is a spike or the way back
        # from one depends on the decision for the reading before.
        spike = np.zeros(x.size, dtype=bool)
        ref_state = float(self.spike_ref_[c])
        for i, lim in zip(candidates, limit_at, strict=True):
            if i == 0:
                after_spike, ref = not np.isnan(ref_state), ref_state
            else:
                after_spike, ref = bool(spike[i - 1]), float(prev_x[i - 1])
            if after_spike and abs(x[i] - ref) <= lim:
                continue  # back to the level before the spike
            spike[i] = True
        self.spike_ref_[c] = prev_x[-1] if spike[-1] else np.nan
        out = np.zeros(x.size, dtype=np.int64)
        out[spike] |= int(Flag.SPIKE)
        return out

    # -- quarantine records ----------------------------------------------------------------

    def _records(
        self,
        batch: ReadingBatch,
        raw: np.ndarray,
        removed: np.ndarray,
        inf: np.ndarray,
        future: np.ndarray,
        too_old: np.ndarray,
        lost_all: np.ndarray | None,
        status: np.ndarray | None,
        accepted: np.ndarray,
        n_removed: np.ndarray | None,
    ) -> list[Quarantined]:
        """Quarantine records in file order; a loop over the few exceptional readings only.

        ``lost_all`` and ``n_removed`` are None when no value was removed, ``status`` when
        every standing reading was accepted.
        """
        records: list[Quarantined] = []
        exceptional = future | too_old
        if lost_all is not None and n_removed is not None:
            exceptional |= lost_all | (accepted & (n_removed > 0))
        if status is not None:
            exceptional |= status == _CONFLICT
        for i in exceptional.nonzero()[0].tolist():
            ts = int(batch.ts[i])
            record = Quarantined(
                source=batch.source,
                line=int(batch.line[i]),
                raw=_format_raw(self.node_id, ts, raw[i]),
                reason="",
                node_id=self.node_id,
                ts=ts,
            )
            cols = removed[i].nonzero()[0].tolist()
            reasons = [
                "non_finite" if inf[i, c] else f"out_of_range:{MEASUREMENTS[c]}" for c in cols
            ]
            if future[i]:
                records.append(replace(record, reason="future_timestamp"))
            elif too_old[i]:
                records.append(replace(record, reason="too_old_timestamp"))
            elif lost_all is not None and lost_all[i]:
                records.append(
                    replace(record, reason=reasons[0], measurement=MEASUREMENTS[cols[0]])
                )
            elif status is not None and status[i] == _CONFLICT:
                records.append(replace(record, reason="conflict"))
            else:
                records.extend(
                    replace(record, reason=reason, measurement=MEASUREMENTS[c], whole_reading=False)
                    for c, reason in zip(cols, reasons, strict=True)
                )
        return records
