"""Per-node KPIs in event-time windows: 15-minute windows and local calendar days.

DESIGN.md, "The pipeline" step 3 and "Performance design". One ``NodeWindows`` holds the open
windows of one node inside a Bytewax ``stateful_map``; each call takes a whole ``ReadingBatch``
and aggregates it with numpy (one sort by window, then ``reduceat``), so the cost per reading
is flat and no Python code runs per reading.

Event time and lateness. The node's watermark is its newest reading's time minus
``Settings.allowed_lateness_s``. A 15-minute window ``[s, s + 15 min)`` (aligned on UTC epoch
multiples of 15 minutes) closes once the watermark passes ``s + 15 min``; a local day closes
once the watermark passes the day's end. A reading whose window is closed is *late*: it is
masked in ``WindowOutput.late`` and changes nothing. Within a batch the watermark advances
reading by reading, in arrival order, exactly as if the readings came one by one, so the
result does not depend on how the stream was cut into batches.

Output is upsert-shaped: every call emits the current row of each window and day it touched,
so a late-but-allowed reading re-emits its window (and its day) with corrected values.

Days are made of whole 15-minute windows (a window belongs to the local day of its start).
That is the calendar day exactly for every zone whose UTC offset is a multiple of 15 minutes
(all zones in use today). Day aggregates are kept as small accumulators updated by the
*change* of each window, so a window re-emitted after a late reading is never counted twice.

>>> from dataflows.settings import Settings
>>> from dataflows.model import empty_values
>>> values = empty_values(3)
>>> values[:, COL["flow_rate"]] = [1.0, 2.0, 3.0]
>>> batch = ReadingBatch("n1", "doc", np.arange(3, dtype=np.int64) * 300 * US_PER_S, values,
...                      np.zeros(3, dtype=np.int64), np.ones(3), np.zeros(3, dtype=np.int64),
...                      np.zeros(3))
>>> out = NodeWindows("n1", Settings(tz="UTC")).update(batch)
>>> out.kpi_15m.frame.select("n", "completeness", "flow_rate_avg", "volume_m3").row(0)
(3, 1.0, 2.0, 1.8)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from dataflows.arrays import nan_to_num
from dataflows.model import COL, MEASUREMENTS, US_PER_DAY, US_PER_MIN, US_PER_S, ReadingBatch
from dataflows.packing import (
    pack_counts,
    pack_decimals,
    pack_int64,
    unpack_counts,
    unpack_decimals,
    unpack_int64,
)
from dataflows.settings import Settings
from dataflows.tables import Coded, TableRows, frame

WINDOW_US = 15 * US_PER_MIN
WINDOW_S = WINDOW_US // US_PER_S
#: Positive sampling intervals remembered to estimate the node's usual interval.
INTERVAL_MEMORY = 32
#: Sampling periods loggers are configured with (s). A median interval within
#: ``NOMINAL_TOLERANCE`` of one of them is taken to be exactly it, so clock jitter does not
#: make completeness wobble from one emission of a window to the next.
NOMINAL_INTERVALS_S = (
    1,
    2,
    5,
    10,
    15,
    20,
    30,
    60,
    120,
    180,
    300,
    600,
    900,
    1200,
    1800,
    3600,
    7200,
    10800,
    14400,
    21600,
    43200,
    86400,
)
NOMINAL_TOLERANCE = 0.1
#: Local hours of the minimum night flow: windows starting from 02:00 to before 05:00.
NIGHT_START_H, NIGHT_END_H = 2, 5
#: 15-minute windows in local 02:00-04:59 on the longest day (a DST fall-back adds an hour).
NIGHT_SLOTS = 16

_NOMINAL = np.array(NOMINAL_INTERVALS_S, dtype=np.float64)
# Offsets of the last INTERVAL_MEMORY intervals from the count known (_usual_intervals_s).
_RECENT = np.arange(INTERVAL_MEMORY)[None, :] - INTERVAL_MEMORY
_FIRST = np.zeros(1, dtype=np.intp)  # the start of the first run of a batch
#: kpi_15m column names of each measurement's statistics.
_STAT_NAMES = tuple(tuple(f"{m}_{s}" for s in ("avg", "min", "max", "std")) for m in MEASUREMENTS)
_FLOW = COL["flow_rate"]
_PRESSURE = COL["pressure"]
_TOTAL = COL["total_flow"]
_NO_TS = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)

# Columns of NodeWindows.win_ (one row per open window). _INT: the node's usual interval as
# of the newest reading the window took, for its completeness.
_N, _QSUM, _QCNT, _SMAX, _TOT, _INT = range(6)
_WIN_INIT = np.array([0.0, 0.0, 0.0, np.nan, 0.0, np.nan])
# Planes of NodeWindows.stat_ (plane, window, active measurement): Chan et al. merge state.
_CNT, _MEAN, _M2, _MIN, _MAX = range(5)
_STAT_INIT = np.array([0.0, 0.0, 0.0, np.nan, np.nan])
# Columns of NodeWindows.day_key_ (int64) and NodeWindows.day_ (float64), one row per open day.
_DKEY, _DSTART, _DEND, _DNIGHT, _DNIGHT_END = range(5)
# _WQN/_WQIN: readings with a water-quality value that has a limit, and those within limits.
(_DN, _DVOL, _DVOLK, _FSUM, _FCNT, _FMIN, _FMAX, _PSUM, _PCNT, _PMIN, _PMAX, _PIN,
 _DINT, _WQN, _WQIN) = range(15)
_DAY_INIT = np.array(
    [0, 0, 0, 0, 0, np.nan, np.nan, 0, 0, np.nan, np.nan, 0, np.nan, 0, 0], dtype=np.float64
)
# Columns of NodeWindows.day_ that _accumulate_days adds to, in its order (then the volume's).
_DAY_SUMS = np.array([[_DN, _FSUM, _FCNT, _PSUM, _PCNT, _PIN, _WQN, _WQIN]])
_DVOL_COLS = np.array([[_DVOL, _DVOLK]])
_DAY_SUMS_VOL = np.concatenate((_DAY_SUMS, _DVOL_COLS), axis=1)


@dataclass(slots=True)
class WindowOutput:
    """What one call of ``NodeWindows`` produced.

    ``late`` is a mask over the input batch (empty for ``flush``); the tables hold the rows of
    the windows and days created or changed by the call (None when there are none), to be
    upserted downstream on (node_id, window_start) and (node_id, day).
    """

    late: np.ndarray
    kpi_15m: TableRows | None
    kpi_daily: TableRows | None


#: Version of the packed state (``NodeWindows.__getstate__``): 3 packs the windows' minima
#: and maxima (``pack_decimals``: 3-decimal readings as whole numbers).
_STATE_VERSION = 3
# Columns of NodeWindows.win_ that count readings (pickled in a narrow type), and the others.
_WIN_COUNTS = [_N, _QCNT]
_WIN_FLOATS = [_QSUM, _SMAX, _TOT, _INT]


def _utc_us(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (fold-aware, exact)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


class NodeWindows:
    """Open windows of one node; lives in a Bytewax stateful_map: pickles, < 20 KB per node.

    State is bounded by the lateness: about ``allowed_lateness_s / 900 + 1`` windows and one or
    two days. Per-window statistics are kept only for the measurements the node has reported
    (``cols_``), so a flow meter does not carry empty water-quality columns. Learned state ends
    in ``_``.
    """

    __slots__ = (
        "node_id",
        "tz",
        "lateness_us",
        "band",
        "limits",
        "max_ts_",
        "intervals_",
        "tf_ts_",
        "tf_val_",
        "has_totalizer_",
        "cols_",
        "win_w_",
        "win_",
        "stat_",
        "day_key_",
        "day_",
        "night_",
    )

    def __init__(self, node_id: str, settings: Settings) -> None:
        # Only what the windows need, not the whole Settings (the network can be large and
        # this object is pickled once per node in every snapshot).
        self.node_id = node_id
        self.tz = settings.tz
        self.lateness_us = int(settings.allowed_lateness_s) * US_PER_S
        lo, hi = settings.network.pressure_band
        self.band = (float(lo), float(hi))
        # Water-quality limits: the limited measurements' columns and their (low, high).
        limit_lo, limit_hi = settings.network.limit_arrays(node_id)
        limited = np.flatnonzero(np.isfinite(limit_lo) | np.isfinite(limit_hi))
        self.limits = (limited, limit_lo[limited], limit_hi[limited])
        self.max_ts_: int | None = None
        self.intervals_ = np.zeros(0, dtype=np.int64)  # µs, most recent last
        self.tf_ts_: int | None = None  # time and value of the last in-order totalizer reading
        self.tf_val_ = np.nan
        self.has_totalizer_ = False
        self.cols_ = np.zeros(0, dtype=np.int64)  # measurement index of each stat_ column
        self.win_w_ = np.zeros(0, dtype=np.int64)  # open window indices (start // 15 min), sorted
        self.win_ = np.zeros((0, len(_WIN_INIT)))
        self.stat_ = np.zeros((len(_STAT_INIT), 0, 0))
        self.day_key_ = np.zeros((0, 5), dtype=np.int64)  # sorted by day (days since epoch)
        self.day_ = np.zeros((0, len(_DAY_INIT)))
        self.night_ = np.zeros((0, NIGHT_SLOTS))

    def __getstate__(self) -> tuple[object, ...]:
        """The state, packed (lossless): what the snapshot of every node costs.

        Arrays as raw bytes (a pickled array costs about 130 bytes besides its data), the
        window indices and intervals as steps or multiples in the narrowest unsigned type, the
        windows' minima and maxima (readings) as whole thousandths when they are.
        """
        limited, limit_lo, limit_hi = self.limits
        return (
            _STATE_VERSION,
            self.node_id,
            self.tz,
            self.lateness_us,
            self.band,
            (tuple(limited.tolist()), limit_lo.tobytes(), limit_hi.tobytes()),
            self.max_ts_,
            pack_int64(self.intervals_),
            self.tf_ts_,
            self.tf_val_,
            self.has_totalizer_,
            tuple(self.cols_.tolist()),
            pack_int64(self.win_w_, steps=True),
            pack_counts(self.win_[:, _WIN_COUNTS]),
            self.win_[:, _WIN_FLOATS].tobytes(),
            pack_counts(self.stat_[_CNT]),
            self.stat_[_MEAN : _M2 + 1].tobytes(),
            pack_decimals(self.stat_[_MIN : _MAX + 1]),
            self.day_key_.tobytes(),
            self.day_.tobytes(),
            self.night_.tobytes(),
        )

    def __setstate__(self, state: Any) -> None:
        if len(state) == 2:  # the slots of the release before packing: (None, {slot: value})
            for name, value in state[1].items():
                setattr(self, name, value)
            return
        if len(state) == 20:  # version 2: the statistics' other planes as raw bytes
            state = (*state[:16], state[16], None, *state[17:])
        (_, self.node_id, self.tz, self.lateness_us, self.band, limits, self.max_ts_,
         intervals, self.tf_ts_, self.tf_val_, self.has_totalizer_, cols, win_w, win_counts,
         win_floats, stat_counts, stat_floats, extremes, day_key, day, night) = state
        limited, limit_lo, limit_hi = limits
        self.limits = (
            np.array(limited, dtype=np.int64),
            np.frombuffer(limit_lo).copy(),
            np.frombuffer(limit_hi).copy(),
        )
        self.intervals_ = unpack_int64(intervals)
        self.cols_ = np.array(cols, dtype=np.int64)
        self.win_w_ = unpack_int64(win_w, steps=True)
        nw, nc = self.win_w_.size, self.cols_.size
        self.win_ = np.empty((nw, len(_WIN_INIT)))
        self.win_[:, _WIN_COUNTS] = unpack_counts(win_counts).reshape(nw, len(_WIN_COUNTS))
        self.win_[:, _WIN_FLOATS] = np.frombuffer(win_floats).reshape(nw, len(_WIN_FLOATS))
        self.stat_ = np.empty((len(_STAT_INIT), nw, nc))
        self.stat_[_CNT] = unpack_counts(stat_counts).reshape(nw, nc)
        if extremes is None:
            self.stat_[_CNT + 1 :] = np.frombuffer(stat_floats).reshape(
                len(_STAT_INIT) - 1 - _CNT, nw, nc
            )
        else:
            self.stat_[_MEAN : _M2 + 1] = np.frombuffer(stat_floats).reshape(2, nw, nc)
            self.stat_[_MIN : _MAX + 1] = unpack_decimals(extremes).reshape(2, nw, nc)
        self.day_key_ = np.frombuffer(day_key, np.int64).reshape(-1, 5).copy()
        self.day_ = np.frombuffer(day).reshape(-1, len(_DAY_INIT)).copy()
        self.night_ = np.frombuffer(night).reshape(-1, NIGHT_SLOTS).copy()

    # -- public API ------------------------------------------------------------------------

    @property
    def watermark(self) -> int | None:
        """Event time (µs UTC) behind which windows are closed; None before any reading."""
        return None if self.max_ts_ is None else self.max_ts_ - self.lateness_us

    @property
    def interval_s(self) -> float:
        """The node's usual sampling interval in seconds (median of recent ones); NaN if unknown."""
        return float(_usual_intervals_s(self.intervals_, np.array([self.intervals_.size]))[0])

    def update(self, batch: ReadingBatch) -> WindowOutput:
        """Aggregate a batch into its windows and days; rows of everything it touched."""
        n = len(batch)
        if n == 0:
            return WindowOutput(np.zeros(0, dtype=bool), None, None)
        ts = np.asarray(batch.ts, dtype=np.int64)
        win = ts // WINDOW_US  # floor division: right for times before 1970 too
        prev_max = _NO_TS if self.max_ts_ is None else self.max_ts_
        # The watermark each reading meets on arrival: the stream's newest time up to it.
        newest = np.maximum(np.maximum.accumulate(ts), prev_max)
        late = (win + 1) * WINDOW_US <= newest - self.lateness_us
        values = np.asarray(batch.values, dtype=np.float64)
        keep = None
        if late.any():
            if late.all():
                return WindowOutput(late, None, None)
            keep = (~late).nonzero()[0]
            ts, win, values = ts[keep], win[keep], values[keep]
            n = keep.size

        known_before = self.intervals_.size
        memory, learned = self._learn_interval(ts, prev_max, newest if keep is None else None)
        self.max_ts_ = int(newest[-1]) if keep is None else int(max(prev_max, int(ts.max())))
        # Which measurements the batch carries: most nodes report two or three of ten, and a
        # missing one needs none of the work below (this runs once per node batch, where the
        # fixed cost of each numpy call, not the readings, is the bill).
        finite = np.isfinite(values)
        present = np.logical_or.reduce(finite, axis=0)
        bcols = present.nonzero()[0]
        increments = (
            self._totalizer_increments(ts, values[:, _TOTAL]) if present[_TOTAL] else None
        )

        # Group by window: one stable sort (none when the batch is in order: most are), then
        # reduceat over contiguous runs.
        order = None if n == 1 or (win[1:] >= win[:-1]).all() else win.argsort(kind="stable")

        def by_window(a: np.ndarray) -> np.ndarray:
            return a if order is None else a[order]

        sorted_win = by_window(win)
        if sorted_win[0] == sorted_win[-1]:  # one window: most live batches
            starts, ends = _FIRST, np.array([n])
        else:
            brk = (sorted_win[1:] != sorted_win[:-1]).nonzero()[0] + 1
            starts = np.concatenate((_FIRST, brk))
            ends = np.concatenate((brk, [n]))
        group_win = sorted_win[starts]
        zero = np.zeros(starts.size)
        if order is None:
            x, ok = values.take(bcols, axis=1), finite.take(bcols, axis=1)
        else:
            x, ok = values[order[:, None], bcols], finite[order[:, None], bcols]
        batch_stats = _group_stats(x, ok, starts, ends - starts)
        g_n = (ends - starts).astype(np.float64)
        g_qsum = g_qcnt = zero
        if batch.quality is not None:
            q = by_window(_floats(batch.quality, keep))
            q_ok = np.isfinite(q)
            g_qsum = np.add.reduceat(np.where(q_ok, q, 0.0), starts)
            g_qcnt = np.add.reduceat(q_ok.astype(np.float64), starts)
        if batch.score is None:
            g_smax = np.full(starts.size, np.nan)
        else:
            s = by_window(_floats(batch.score, keep))
            g_smax = np.maximum.reduceat(np.where(np.isfinite(s), s, -np.inf), starts)
            g_smax[g_smax == -np.inf] = np.nan
        g_tot = zero if increments is None else np.add.reduceat(by_window(increments), starts)
        g_pin = zero
        if present[_PRESSURE]:
            p = by_window(values[:, _PRESSURE])
            in_band = ((p >= self.band[0]) & (p <= self.band[1])).astype(np.float64)
            g_pin = np.add.reduceat(in_band, starts)
        g_wq = (zero, zero)
        if present[self.limits[0]].any():
            wq_n, wq_in = self._within_limits(by_window(values))
            g_wq = (np.add.reduceat(wq_n, starts), np.add.reduceat(wq_in, starts))

        bl = bcols.tolist()
        stat_cols = self._stat_columns(bl)
        rows = self._open_windows(group_win)
        # Each window's completeness uses the usual interval as of the newest reading it took
        # (in arrival order: the last of its group, the sort being stable), not as of the end
        # of the batch, so the value does not depend on where the input was cut into batches.
        last = ends - 1 if order is None else order[ends - 1]
        usual = _usual_intervals_s(memory, known_before + learned[last])

        had_totalizer = self.has_totalizer_
        self.has_totalizer_ = had_totalizer or bool(present[_TOTAL])
        # A node that starts reporting a totalizer changes how every open window's volume is
        # computed, so all of them are re-emitted (rare: once per node at most).
        same_way = self.has_totalizer_ == had_totalizer
        touched = rows if same_way else np.arange(self.win_w_.size)
        vol_old = self._volumes(touched, had_totalizer)
        self._merge(rows, stat_cols, batch_stats, g_n, g_qsum, g_qcnt, g_smax, g_tot, usual)
        vol_new = self._volumes(touched, self.has_totalizer_)

        day_rows = self._open_days(self.win_w_)
        g_day = day_rows[rows]
        t_day = g_day if same_way else day_rows[touched]
        # Volume is not additive over readings (the flow-based one is a mean), so the day
        # takes the change of each touched window's volume.
        d_vol = nan_to_num(vol_new) - nan_to_num(vol_old)
        d_volk = np.isfinite(vol_new).astype(float) - np.isfinite(vol_old)
        if same_way:
            self._accumulate_days(g_day, batch_stats, bl, g_n, g_pin, g_wq, (d_vol, d_volk))
        else:
            self._accumulate_days(g_day, batch_stats, bl, g_n, g_pin, g_wq, None)
            np.add.at(self.day_, (t_day[:, None], _DVOL_COLS), np.stack((d_vol, d_volk), 1))
        # A day likewise takes the interval of its window that took the newest reading.
        if g_day[0] == g_day[-1]:  # one day (g_day is sorted): most batches
            self.day_[g_day[0], _DINT] = usual[last.argmax()]
        else:
            by_arrival = np.argsort(last, kind="stable")
            a_day = g_day[by_arrival]
            _, from_end = np.unique(a_day[::-1], return_index=True)
            pick = by_arrival[a_day.size - 1 - from_end]
            self.day_[g_day[pick], _DINT] = usual[pick]
        self._update_night(touched, t_day)

        days = t_day[:1] if t_day[0] == t_day[-1] else np.unique(t_day)
        out = WindowOutput(late, self._rows_15m(touched, vol_new), self._rows_daily(days))
        self._close()
        return out

    def flush(self) -> WindowOutput:
        """End of input: the rows of every still-open window and day (state is kept).

        Keeping the state makes ``flush`` safe to call more than once and lets a stream go on
        after it; every row it returns was already emitted, with the same values, by the
        ``update`` that last changed it.
        """
        late = np.zeros(0, dtype=bool)
        if self.win_w_.size == 0 and self.day_key_.shape[0] == 0:
            return WindowOutput(late, None, None)
        return WindowOutput(
            late,
            self._rows_15m(np.arange(self.win_w_.size)),
            self._rows_daily(np.arange(self.day_key_.shape[0])),
        )

    # -- learning ----------------------------------------------------------------------------

    def _learn_interval(
        self, ts: np.ndarray, prev_max: int, newest: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Remember the intervals between successive newest readings (out-of-order ones skip).

        Returns every interval known, the remembered ones first, and per reading how many of
        the batch's intervals were known once it arrived. ``newest``: the newest time up to
        each reading, ``prev_max`` included, if the caller has it.
        """
        before = np.empty_like(ts)
        before[0] = prev_max
        if newest is None:
            np.maximum(np.maximum.accumulate(ts[:-1]), prev_max, out=before[1:])
        else:
            before[1:] = newest[:-1]
        advancing = (ts > before) & (before != _NO_TS)
        gaps = (ts - before)[advancing]
        memory = np.concatenate((self.intervals_, gaps)) if gaps.size else self.intervals_
        self.intervals_ = memory[-INTERVAL_MEMORY:]
        return memory, np.cumsum(advancing)

    def _totalizer_increments(self, ts: np.ndarray, total: np.ndarray) -> np.ndarray:
        """Volume (m3) each reading adds by its totalizer, in arrival order.

        Only readings newer than the last totalizer reading count: an out-of-order one would
        look like a reset, and the volume it carries is counted anyway by the reading after it
        (the increments telescope). A decrease is a reset or rollover: the new value counts
        from 0. The first totalizer reading of the node adds nothing (no reference yet).
        """
        out = np.zeros(ts.size)
        has = np.flatnonzero(np.isfinite(total))
        if has.size == 0:
            return out
        t, v = ts[has], total[has]
        last_ts = _NO_TS if self.tf_ts_ is None else self.tf_ts_
        before = np.maximum(np.concatenate(([last_ts], np.maximum.accumulate(t)[:-1])), last_ts)
        in_order = t > before
        if not in_order.any():
            return out
        v = v[in_order]
        prev = np.concatenate(([self.tf_val_], v[:-1]))
        step = v - prev
        inc = np.where(np.isnan(prev), 0.0, np.where(step >= 0, step, v))
        out[has[in_order]] = inc
        self.tf_ts_ = int(t[in_order][-1])
        self.tf_val_ = float(v[-1])
        return out

    # -- window state ------------------------------------------------------------------------

    def _stat_columns(self, bcols: list[int]) -> np.ndarray:
        """Column of ``stat_`` of each measurement of ``bcols``, activating the new ones.

        A new measurement gets a statistics column in every open window.
        """
        position = _positions(tuple(self.cols_.tolist()))
        found = [position.get(m, -1) for m in bcols]
        if -1 not in found:  # no new measurement: nearly every call
            return np.array(found, dtype=np.int64)
        new = np.array([m for m, j in zip(bcols, found, strict=True) if j < 0], dtype=np.int64)
        extra = np.broadcast_to(
            _STAT_INIT[:, None, None], (len(_STAT_INIT), self.win_w_.size, new.size)
        )
        self.stat_ = np.concatenate((self.stat_, extra), axis=2)
        self.cols_ = np.concatenate((self.cols_, new))
        position = _positions(tuple(self.cols_.tolist()))
        return np.array([position[m] for m in bcols], dtype=np.int64)

    def _open_windows(self, group_win: np.ndarray) -> np.ndarray:
        """Row of each window of ``group_win`` (sorted), opening those not open yet."""
        have = self.win_w_
        rows = have.searchsorted(group_win)
        nh, nc = have.size, self.cols_.size
        k = int(rows.searchsorted(nh))  # group_win[k:] come after every open window
        if (have[rows[:k]] == group_win[:k]).all():  # the others are open: a stream in order
            if k == rows.size:
                return rows
            m = rows.size - k
            win = np.empty((nh + m, len(_WIN_INIT)))
            win[:nh] = self.win_
            win[nh:] = _WIN_INIT
            stat = np.empty((len(_STAT_INIT), nh + m, nc))
            stat[:, :nh] = self.stat_
            stat[:, nh:] = _STAT_INIT[:, None, None]
            self.win_w_ = np.concatenate((have, group_win[k:]))
            self.win_, self.stat_ = win, stat
            rows[k:] += np.arange(m)
            return rows
        all_win = np.concatenate((have, group_win))
        all_win.sort()
        all_win = all_win[np.concatenate(([True], all_win[1:] != all_win[:-1]))]
        pos = all_win.searchsorted(have)
        win = np.empty((all_win.size, len(_WIN_INIT)))
        win[:] = _WIN_INIT
        win[pos] = self.win_
        stat = np.empty((len(_STAT_INIT), all_win.size, nc))
        stat[:] = _STAT_INIT[:, None, None]
        stat[:, pos] = self.stat_
        self.win_w_, self.win_, self.stat_ = all_win, win, stat
        return all_win.searchsorted(group_win)

    def _merge(
        self,
        rows: np.ndarray,
        stat_cols: np.ndarray,
        batch_stats: np.ndarray,
        g_n: np.ndarray,
        g_qsum: np.ndarray,
        g_qcnt: np.ndarray,
        g_smax: np.ndarray,
        g_tot: np.ndarray,
        interval_s: np.ndarray,
    ) -> None:
        """Fold per-window batch aggregates into the open windows (rows are unique).

        Each window's rows are read and written once (a fancy-indexed ``+=`` per column
        would read and write them once per column).
        """
        w = self.win_[rows]
        w[:, _N] += g_n
        w[:, _QSUM] += g_qsum
        w[:, _QCNT] += g_qcnt
        w[:, _SMAX] = np.fmax(w[:, _SMAX], g_smax)
        w[:, _TOT] += g_tot
        w[:, _INT] = interval_s
        self.win_[rows] = w
        cell = (slice(None), rows[:, None], stat_cols[None, :])
        b = batch_stats
        a = self.stat_[cell]
        na, nb = a[_CNT], b[_CNT]
        total = na + nb
        safe = np.maximum(total, 1.0)
        if nb.all():  # every window has a value of every column: the where()s pick b
            mb, m2b = b[_MEAN], b[_M2]
        else:
            mb = np.where(nb > 0, b[_MEAN], a[_MEAN])
            m2b = np.where(nb > 0, b[_M2], 0.0)
        delta = mb - a[_MEAN]
        # Chan et al.: merging (count, mean, M2) stays exact where sum of squares would cancel.
        a[_MEAN] = a[_MEAN] + delta * nb / safe
        a[_M2] = a[_M2] + m2b + delta * delta * na * nb / safe
        a[_CNT] = total
        a[_MIN] = np.fmin(a[_MIN], b[_MIN])
        a[_MAX] = np.fmax(a[_MAX], b[_MAX])
        self.stat_[cell] = a

    def _flow_avg(self, rows: np.ndarray) -> np.ndarray:
        """Mean flow rate (L/s) of the given open windows; NaN where there is no flow value."""
        cols = self.cols_.tolist()
        if _FLOW not in cols:
            return np.full(rows.size, np.nan)
        cnt, mean = self.stat_[_CNT : _MEAN + 1, rows, cols.index(_FLOW)]
        return np.where(cnt > 0, mean, np.nan)

    def _volumes(self, rows: np.ndarray, totalizer: bool) -> np.ndarray:
        """Volume (m3) of the given open windows, by totalizer or by flow; NaN with no reading."""
        if not totalizer:  # a window with no reading has no flow value either: NaN already
            return self._flow_avg(rows) * WINDOW_S / 1000.0  # L/s over 900 s, in m3
        vol = self.win_[rows, _TOT]
        vol[self.win_[rows, _N] == 0] = np.nan
        return vol

    # -- day state ---------------------------------------------------------------------------

    def _open_days(self, win: np.ndarray) -> np.ndarray:
        """Day row of each window (``win`` sorted), opening the days not open yet.

        A local day is within one day of the UTC day (offsets are under 14 h), so the days
        around the windows' UTC days, with their exact bounds, cover every window; a window
        belongs to the last of them starting at or before it.
        """
        start = win * WINDOW_US
        keys = self.day_key_
        if keys.shape[0]:
            # Every window inside an open day (all but a day's first batch): that day's row,
            # the one the table of all days around them would give too (days do not overlap).
            where = keys[:, _DSTART].searchsorted(start, side="right") - 1
            if where[0] >= 0 and (start < keys[where, _DEND]).all():
                return where
        first = int(win[0]) * WINDOW_US // US_PER_DAY - 1
        last = int(win[-1]) * WINDOW_US // US_PER_DAY + 1
        known = set(self.day_key_[:, _DKEY].tolist())
        # Python per day (a few per batch, cached), never per reading: DST needs zoneinfo.
        fresh = [_day_bounds(k, self.tz) for k in range(first, last + 1) if k not in known]
        table = self.day_key_
        if fresh:
            table = np.concatenate((table, np.array(fresh, dtype=np.int64)))
            table = table[np.argsort(table[:, _DKEY], kind="stable")]
        where = np.searchsorted(table[:, _DSTART], start, side="right") - 1
        if fresh:
            # The table's days the windows fall in that are not open yet, in table order (a
            # handful of rows: Python sets instead of np.unique and np.isin).
            table_keys = table[:, _DKEY].tolist()
            new = [r for r in sorted(set(where.tolist())) if table_keys[r] not in known]
            if new:
                keys = np.concatenate((self.day_key_, table[new]))
                order = np.argsort(keys[:, _DKEY], kind="stable")
                self.day_key_ = keys[order]
                fresh_days = np.empty((len(new), len(_DAY_INIT)))
                fresh_days[:] = _DAY_INIT
                self.day_ = np.concatenate((self.day_, fresh_days))[order]
                no_night = np.full((len(new), NIGHT_SLOTS), np.nan)
                self.night_ = np.concatenate((self.night_, no_night))[order]
            where = np.searchsorted(self.day_key_[:, _DKEY], table[where, _DKEY])
        return where

    def _accumulate_days(
        self,
        g_day: np.ndarray,
        batch_stats: np.ndarray,
        bcols: list[int],
        g_n: np.ndarray,
        g_pin: np.ndarray,
        g_wq: tuple[np.ndarray, np.ndarray],
        g_vol: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """Add a batch's per-window counts, sums and extremes to the days of those windows.

        These are additive over readings, so the batch's own contribution is exactly the
        change of the day, however often a window is re-emitted. ``g_vol``: the change of
        each window's volume and of whether it has one, when the windows are the touched ones.

        One ``ufunc.at`` per operation over all columns: it adds to each cell in the order
        of ``g_day``, as one call per column would, so the sums are the same to the bit.
        """
        b = batch_stats
        sums = np.zeros((g_day.size, _DAY_SUMS.shape[1] + (0 if g_vol is None else 2)))
        sums[:, 0] = g_n
        lows, highs, of = [], [], []
        for m, (s, c, lo, hi) in ((_FLOW, (1, 2, _FMIN, _FMAX)), (_PRESSURE, (3, 4, _PMIN, _PMAX))):
            if m in bcols:  # else its sums stay 0 and its extremes NaN, which fmin/fmax skip
                j = bcols.index(m)
                sums[:, s] = b[_MEAN, :, j] * b[_CNT, :, j]
                sums[:, c] = b[_CNT, :, j]
                lows.append(lo)
                highs.append(hi)
                of.append(j)
        sums[:, 5] = g_pin
        sums[:, 6], sums[:, 7] = g_wq
        if g_vol is not None:
            sums[:, 8], sums[:, 9] = g_vol
        at = g_day[:, None]
        np.add.at(self.day_, (at, _DAY_SUMS if g_vol is None else _DAY_SUMS_VOL), sums)
        if of:
            np.fmin.at(self.day_, (at, np.array([lows])), b[_MIN][:, of])
            np.fmax.at(self.day_, (at, np.array([highs])), b[_MAX][:, of])

    def _within_limits(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per reading: 1.0 if it has a limited water-quality value, 1.0 if all are in limits."""
        cols, lo, hi = self.limits
        if cols.size == 0:
            zero = np.zeros(values.shape[0])
            return zero, zero
        x = values[:, cols]
        seen = np.isfinite(x)
        ok = ~seen | (((x >= lo) | np.isnan(lo)) & ((x <= hi) | np.isnan(hi)))
        has = seen.any(axis=1)
        return has.astype(np.float64), (has & ok.all(axis=1)).astype(np.float64)

    def _update_night(self, touched: np.ndarray, d: np.ndarray) -> None:
        """Record the flow mean of touched night windows (in days ``d``) in their night slots.

        The day keeps each night window's current mean (not a running minimum) because a
        late reading can raise a window's mean, and then the minimum must be another window.
        """
        w = self.win_w_[touched]
        keys = self.day_key_[d]
        slot = w - keys[:, _DNIGHT]
        night = (slot >= 0) & (w < keys[:, _DNIGHT_END])
        night &= slot < NIGHT_SLOTS  # only a zone with a DST shift over 1 h could exceed it
        if night.any():
            self.night_[d[night], slot[night]] = self._flow_avg(touched[night])

    def _close(self) -> None:
        """Drop the windows and days the watermark has passed: the state stays bounded."""
        wm = self.watermark
        if wm is None:
            return
        # Both are sorted by time: the closed ones are a prefix, none while the first is open.
        w = self.win_w_
        if w.size and (int(w[0]) + 1) * WINDOW_US <= wm:
            i = w.searchsorted(wm // WINDOW_US)  # the first window with (w + 1) * 15 min > wm
            self.win_w_, self.win_, self.stat_ = w[i:], self.win_[i:], self.stat_[:, i:]
        ends = self.day_key_[:, _DEND]
        if ends.size and int(ends[0]) <= wm:
            i = ends.searchsorted(wm, side="right")  # the first day ending after wm
            self.day_key_, self.day_ = self.day_key_[i:], self.day_[i:]
            self.night_ = self.night_[i:]

    # -- rows --------------------------------------------------------------------------------

    def _rows_15m(self, rows: np.ndarray, volume: np.ndarray | None = None) -> TableRows | None:
        """kpi_15m rows of the given open windows (``volume``: theirs, if known)."""
        if rows.size == 0:
            return None
        k = rows.size
        w = self.win_[rows]
        n = w[:, _N]
        stat = self.stat_[:, rows]
        cnt = stat[_CNT]
        has = cnt > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            cols: dict[str, object] = {
                "node_id": Coded.repeat(self.node_id, k),
                "window_start": self.win_w_[rows] * WINDOW_US,
                "n": n.astype(np.int64),
                "completeness": _completeness(n, WINDOW_S, w[:, _INT]),
            }
            # All measurements at once; each column of the frame is a view of these.
            avg = np.where(has, stat[_MEAN], np.nan)
            std = np.where(has, np.sqrt(stat[_M2] / cnt), np.nan)
            for j, m in enumerate(self.cols_.tolist()):
                name_avg, name_min, name_max, name_std = _STAT_NAMES[m]
                cols[name_avg] = avg[:, j]
                cols[name_min] = stat[_MIN, :, j]
                cols[name_max] = stat[_MAX, :, j]
                cols[name_std] = std[:, j]
            cols["quality_avg"] = w[:, _QSUM] / w[:, _QCNT]
        cols["volume_m3"] = self._volumes(rows, self.has_totalizer_) if volume is None else volume
        cols["score_max"] = w[:, _SMAX]
        return frame("kpi_15m", cols)

    def _rows_daily(self, rows: np.ndarray) -> TableRows | None:
        """kpi_daily rows of the given open days."""
        if rows.size == 0:
            return None
        d, keys = self.day_[rows], self.day_key_[rows]
        day_s = (keys[:, _DEND] - keys[:, _DSTART]) / US_PER_S
        with np.errstate(invalid="ignore", divide="ignore"):
            cols: dict[str, object] = {
                "node_id": Coded.repeat(self.node_id, rows.size),
                "day": keys[:, _DKEY].copy(),  # days since the epoch
                "n": d[:, _DN].astype(np.int64),
                "completeness": _completeness(d[:, _DN], day_s, d[:, _DINT]),
                "volume_m3": np.where(d[:, _DVOLK] > 0, d[:, _DVOL], np.nan),
                "mnf": np.fmin.reduce(self.night_[rows], axis=1),
                "pressure_compliance": d[:, _PIN] / d[:, _PCNT],
                "water_quality_compliance": d[:, _WQIN] / d[:, _WQN],
                "flow_rate_avg": d[:, _FSUM] / d[:, _FCNT],
                "flow_rate_min": d[:, _FMIN],
                "flow_rate_max": d[:, _FMAX],
                "pressure_avg": d[:, _PSUM] / d[:, _PCNT],
                "pressure_min": d[:, _PMIN],
                "pressure_max": d[:, _PMAX],
            }
        return frame("kpi_daily", cols)


@lru_cache(maxsize=256)
def _positions(cols: tuple[int, ...]) -> dict[int, int]:
    """Column of each measurement in ``NodeWindows.stat_`` given its ``cols_``."""
    return {m: j for j, m in enumerate(cols)}


def _floats(a: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    """``a`` as float64, selected by ``index`` (all of it when None)."""
    a = np.asarray(a, dtype=np.float64)
    return a if index is None else a[index]


def _group_stats(x: np.ndarray, ok: np.ndarray, starts: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Per run of ``size`` rows starting at ``starts``, per column: count, mean, M2, min, max.

    Two passes (mean, then squared deviations from it) keep the variance exact for large
    values with small spread (conductivity, totalizers); values not ``ok`` (not finite) are
    left out.
    """
    out = np.empty((len(_STAT_INIT), starts.size, x.shape[1]))
    cnt, mean = out[_CNT], out[_MEAN]
    np.add.reduceat(ok.astype(np.float64), starts, axis=0, out=cnt)
    if ok.all():  # every value counts, no run is empty: the where()s below would keep x
        np.add.reduceat(x, starts, axis=0, out=mean)
        mean /= cnt
        dev = x - mean.repeat(size, axis=0)
        np.add.reduceat(dev * dev, starts, axis=0, out=out[_M2])
        np.minimum.reduceat(x, starts, axis=0, out=out[_MIN])
        np.maximum.reduceat(x, starts, axis=0, out=out[_MAX])
        return out
    with np.errstate(invalid="ignore", divide="ignore"):
        np.add.reduceat(np.where(ok, x, 0.0), starts, axis=0, out=mean)
        mean /= cnt
    dev = np.where(ok, x - mean.repeat(size, axis=0), 0.0)
    np.add.reduceat(dev * dev, starts, axis=0, out=out[_M2])
    np.minimum.reduceat(np.where(ok, x, np.inf), starts, axis=0, out=out[_MIN])
    np.maximum.reduceat(np.where(ok, x, -np.inf), starts, axis=0, out=out[_MAX])
    empty = cnt == 0
    mean[empty] = 0.0
    out[_MIN][empty] = np.nan
    out[_MAX][empty] = np.nan
    return out


def _usual_intervals_s(memory: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The usual interval (s) once the first ``known[i]`` intervals of ``memory`` were seen.

    The median of the last ``INTERVAL_MEMORY`` of them, snapped to a nominal logger period when
    within ``NOMINAL_TOLERANCE`` of it; NaN while none is known.
    """
    lo, hi = int(known.min()), int(known.max())
    if lo <= 0:
        out = np.full(known.shape, np.nan)
        if hi > 0:
            some = known > 0
            out[some] = _usual_intervals_s(memory, known[some])
        return out
    recent = memory[max(0, lo - INTERVAL_MEMORY) : hi]  # every interval any median takes
    if recent.min() == recent.max():  # a steady logger: every median is that interval
        return np.full(known.shape, _steady_interval_s(int(recent[0])))
    return _medians_s(memory, known)


@lru_cache(maxsize=1024)
def _steady_interval_s(gap_us: int) -> float:
    """The usual interval (s) of intervals all ``gap_us`` long (the same arithmetic)."""
    return float(_medians_s(np.array([gap_us]), np.array([1]))[0])


def _medians_s(memory: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``_usual_intervals_s`` where every ``known`` is positive."""
    at = known[:, None] + _RECENT
    # Unknown slots sort last as +inf; the median of the first k sorted (np.nanmedian is ~20x
    # slower, and this runs for every node batch).
    recent = np.where(at >= 0, memory[np.maximum(at, 0)], np.inf)
    recent.sort(axis=1)
    k = np.minimum(known, INTERVAL_MEMORY)
    rows = np.arange(k.size)
    median = (recent[rows, (k - 1) // 2] + recent[rows, k // 2]) / (2 * US_PER_S)
    nominal = _NOMINAL[np.abs(np.log(_NOMINAL[None, :] / median[:, None])).argmin(axis=1)]
    return np.where(np.abs(median / nominal - 1) <= NOMINAL_TOLERANCE, nominal, median)


def _completeness(n: np.ndarray, span_s: np.ndarray | float, interval_s: np.ndarray) -> np.ndarray:
    """min(1, n / expected readings), expected = span / usual interval; NaN if unknown.

    Call it under ``np.errstate(invalid="ignore", divide="ignore")`` (both callers are).
    """
    out = np.minimum(1.0, n * interval_s / span_s)
    return np.where(np.isfinite(interval_s) & (interval_s > 0), out, np.nan)


@lru_cache(maxsize=4096)
def _day_bounds(key: int, tz: str) -> tuple[int, int, int, int, int]:
    """A local day's key, UTC start and end (µs), and its night's first and end windows.

    fold=0 resolves a local time that does not exist (spring forward) to the instant the
    clock jumped, and one that happens twice (fall back) to its first occurrence, so a day
    lasts 23 or 25 hours on DST days and its night starts when local 02:00 first comes.
    """
    zone = ZoneInfo(tz)
    day = _EPOCH_DAY + timedelta(days=key)

    def utc(d: date, hour: int) -> int:
        return _utc_us(datetime.combine(d, time(hour), tzinfo=zone))

    night, night_end = utc(day, NIGHT_START_H), utc(day, NIGHT_END_H)
    return (
        key,
        utc(day, 0),
        utc(day + timedelta(days=1), 0),
        -(-night // WINDOW_US),  # the first window starting at or after local 02:00
        -(-night_end // WINDOW_US),
    )
