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
from dataflows.tables import TableRows, frame

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
        if late.all():
            return WindowOutput(late, None, None)

        keep = np.flatnonzero(~late)
        ts, win = ts[keep], win[keep]
        values = np.asarray(batch.values, dtype=np.float64)[keep]
        quality = _optional(batch.quality, keep)
        score = _optional(batch.score, keep)

        known_before = self.intervals_.size
        memory, learned = self._learn_interval(ts, prev_max)
        self.max_ts_ = int(max(prev_max, int(ts.max())))
        increments = self._totalizer_increments(ts, values[:, _TOTAL])

        # Group by window: one stable sort, then reduceat over contiguous runs.
        order = np.argsort(win, kind="stable")
        sorted_win = win[order]
        starts = np.concatenate(([0], np.flatnonzero(sorted_win[1:] != sorted_win[:-1]) + 1))
        group_win = sorted_win[starts]
        # Only the measurements this batch carries: most nodes report two or three of ten.
        bcols = np.flatnonzero(np.isfinite(values).any(axis=0))
        batch_stats = _group_stats(values[order[:, None], bcols], starts)
        g_n = np.diff(np.append(starts, len(order))).astype(np.float64)
        q = quality[order]
        q_ok = np.isfinite(q)
        g_qsum = np.add.reduceat(np.where(q_ok, q, 0.0), starts)
        g_qcnt = np.add.reduceat(q_ok.astype(np.float64), starts)
        s = score[order]
        g_smax = np.maximum.reduceat(np.where(np.isfinite(s), s, -np.inf), starts)
        g_smax[np.isneginf(g_smax)] = np.nan
        g_tot = np.add.reduceat(increments[order], starts)
        p = values[order, _PRESSURE]
        in_band = ((p >= self.band[0]) & (p <= self.band[1])).astype(np.float64)
        g_pin = np.add.reduceat(in_band, starts)
        wq_n, wq_in = self._within_limits(values[order])
        g_wq = (np.add.reduceat(wq_n, starts), np.add.reduceat(wq_in, starts))

        self._activate_columns(bcols)
        self._open_windows(group_win)
        rows = np.searchsorted(self.win_w_, group_win)
        # Each window's completeness uses the usual interval as of the newest reading it took
        # (in arrival order: the last of its group, the sort being stable), not as of the end
        # of the batch, so the value does not depend on where the input was cut into batches.
        last = order[np.append(starts[1:], len(order)) - 1]
        self.win_[rows, _INT] = _usual_intervals_s(memory, known_before + learned[last])

        had_totalizer = self.has_totalizer_
        vol_old = self._volumes()
        self._merge(rows, batch_stats, bcols, g_n, g_qsum, g_qcnt, g_smax, g_tot)
        self.has_totalizer_ = had_totalizer or bool(np.isfinite(values[:, _TOTAL]).any())
        vol_new = self._volumes()
        # A node that starts reporting a totalizer changes how every open window's volume is
        # computed, so all of them are re-emitted (rare: once per node at most).
        touched = rows if self.has_totalizer_ == had_totalizer else np.arange(self.win_w_.size)

        day_rows = self._open_days(self.win_w_)
        flow = _column(batch_stats, bcols, _FLOW)
        pressure = _column(batch_stats, bcols, _PRESSURE)
        self._accumulate_days(day_rows[rows], flow, pressure, g_n, g_pin, g_wq)
        # A day likewise takes the interval of its window that took the newest reading.
        by_arrival = np.argsort(last, kind="stable")
        g_day = day_rows[rows][by_arrival]
        _, from_end = np.unique(g_day[::-1], return_index=True)
        pick = by_arrival[g_day.size - 1 - from_end]
        self.day_[day_rows[rows[pick]], _DINT] = self.win_[rows[pick], _INT]
        # Volume is not additive over readings (the flow-based one is a mean), so the day
        # takes the change of each touched window's volume.
        t_day = day_rows[touched]
        old, new = vol_old[touched], vol_new[touched]
        np.add.at(self.day_[:, _DVOL], t_day, np.nan_to_num(new) - np.nan_to_num(old))
        np.add.at(self.day_[:, _DVOLK], t_day, np.isfinite(new).astype(float) - np.isfinite(old))
        self._update_night(touched, day_rows)

        out = WindowOutput(late, self._rows_15m(touched), self._rows_daily(np.unique(t_day)))
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

    def _learn_interval(self, ts: np.ndarray, prev_max: int) -> tuple[np.ndarray, np.ndarray]:
        """Remember the intervals between successive newest readings (out-of-order ones skip).

        Returns every interval known, the remembered ones first, and per reading how many of
        the batch's intervals were known once it arrived.
        """
        before = np.concatenate(([prev_max], np.maximum.accumulate(ts)[:-1]))
        before = np.maximum(before, prev_max)
        advancing = (ts > before) & (before != _NO_TS)
        gaps = ts[advancing] - before[advancing]
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

    def _activate_columns(self, seen: np.ndarray) -> None:
        """Give new measurements a statistics column in every open window."""
        new = np.setdiff1d(seen, self.cols_)
        if new.size == 0:
            return
        extra = np.broadcast_to(
            _STAT_INIT[:, None, None], (len(_STAT_INIT), self.win_w_.size, new.size)
        )
        self.stat_ = np.concatenate((self.stat_, extra), axis=2)
        self.cols_ = np.concatenate((self.cols_, new))

    def _open_windows(self, group_win: np.ndarray) -> None:
        """Add state rows for the windows of ``group_win`` not open yet (kept sorted)."""
        all_win = np.union1d(self.win_w_, group_win)
        if all_win.size == self.win_w_.size:
            return
        pos = np.searchsorted(all_win, self.win_w_)
        win = np.tile(_WIN_INIT, (all_win.size, 1))
        win[pos] = self.win_
        stat = np.broadcast_to(
            _STAT_INIT[:, None, None], (len(_STAT_INIT), all_win.size, self.cols_.size)
        ).copy()
        stat[:, pos] = self.stat_
        self.win_w_, self.win_, self.stat_ = all_win, win, stat

    def _merge(
        self,
        rows: np.ndarray,
        batch_stats: np.ndarray,
        bcols: np.ndarray,
        g_n: np.ndarray,
        g_qsum: np.ndarray,
        g_qcnt: np.ndarray,
        g_smax: np.ndarray,
        g_tot: np.ndarray,
    ) -> None:
        """Fold per-window batch aggregates into the open windows (rows are unique)."""
        self.win_[rows, _N] += g_n
        self.win_[rows, _QSUM] += g_qsum
        self.win_[rows, _QCNT] += g_qcnt
        self.win_[rows, _SMAX] = np.fmax(self.win_[rows, _SMAX], g_smax)
        self.win_[rows, _TOT] += g_tot
        lut = np.empty(len(MEASUREMENTS), dtype=np.int64)
        lut[self.cols_] = np.arange(self.cols_.size)
        cell = (slice(None), rows[:, None], lut[bcols][None, :])
        b = batch_stats
        a = self.stat_[cell]
        na, nb = a[_CNT], b[_CNT]
        total = na + nb
        safe = np.maximum(total, 1.0)
        mb = np.where(nb > 0, b[_MEAN], a[_MEAN])
        delta = mb - a[_MEAN]
        # Chan et al.: merging (count, mean, M2) stays exact where sum of squares would cancel.
        a[_MEAN] = a[_MEAN] + delta * nb / safe
        a[_M2] = a[_M2] + np.where(nb > 0, b[_M2], 0.0) + delta * delta * na * nb / safe
        a[_CNT] = total
        a[_MIN] = np.fmin(a[_MIN], b[_MIN])
        a[_MAX] = np.fmax(a[_MAX], b[_MAX])
        self.stat_[cell] = a

    def _flow_avg(self) -> np.ndarray:
        """Mean flow rate (L/s) of each open window; NaN where there is no flow value."""
        where = np.flatnonzero(self.cols_ == _FLOW)
        if where.size == 0:
            return np.full(self.win_w_.size, np.nan)
        j = int(where[0])
        return np.where(self.stat_[_CNT, :, j] > 0, self.stat_[_MEAN, :, j], np.nan)

    def _volumes(self) -> np.ndarray:
        """Volume (m3) of each open window; NaN for a window with no reading yet."""
        if self.has_totalizer_:
            vol = self.win_[:, _TOT].copy()
        else:
            vol = self._flow_avg() * WINDOW_S / 1000.0  # L/s over 900 s, in m3
        vol[self.win_[:, _N] == 0] = np.nan
        return vol

    # -- day state ---------------------------------------------------------------------------

    def _open_days(self, win: np.ndarray) -> np.ndarray:
        """Day row of each window (``win`` sorted), opening the days not open yet.

        A local day is within one day of the UTC day (offsets are under 14 h), so the days
        around the windows' UTC days, with their exact bounds, cover every window; a window
        belongs to the last of them starting at or before it.
        """
        first = int(win[0]) * WINDOW_US // US_PER_DAY - 1
        last = int(win[-1]) * WINDOW_US // US_PER_DAY + 1
        known = set(self.day_key_[:, _DKEY].tolist())
        # Python per day (a few per batch, cached), never per reading: DST needs zoneinfo.
        fresh = [_day_bounds(k, self.tz) for k in range(first, last + 1) if k not in known]
        table = self.day_key_
        if fresh:
            table = np.concatenate((table, np.array(fresh, dtype=np.int64)))
            table = table[np.argsort(table[:, _DKEY], kind="stable")]
        where = np.searchsorted(table[:, _DSTART], win * WINDOW_US, side="right") - 1
        if fresh:
            used = np.unique(where)
            new = used[~np.isin(table[used, _DKEY], self.day_key_[:, _DKEY])]
            if new.size:
                keys = np.concatenate((self.day_key_, table[new]))
                order = np.argsort(keys[:, _DKEY], kind="stable")
                self.day_key_ = keys[order]
                self.day_ = np.concatenate((self.day_, np.tile(_DAY_INIT, (new.size, 1))))[order]
                no_night = np.full((new.size, NIGHT_SLOTS), np.nan)
                self.night_ = np.concatenate((self.night_, no_night))[order]
            where = np.searchsorted(self.day_key_[:, _DKEY], table[where, _DKEY])
        return where

    def _accumulate_days(
        self,
        g_day: np.ndarray,
        flow: np.ndarray,
        pressure: np.ndarray,
        g_n: np.ndarray,
        g_pin: np.ndarray,
        g_wq: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Add a batch's per-window counts, sums and extremes to the days of those windows.

        These are additive over readings, so the batch's own contribution is exactly the
        change of the day, however often a window is re-emitted.
        """
        day = self.day_
        for col, value in (
            (_DN, g_n),
            (_FSUM, flow[_MEAN] * flow[_CNT]),
            (_FCNT, flow[_CNT]),
            (_PSUM, pressure[_MEAN] * pressure[_CNT]),
            (_PCNT, pressure[_CNT]),
            (_PIN, g_pin),
            (_WQN, g_wq[0]),
            (_WQIN, g_wq[1]),
        ):
            np.add.at(day[:, col], g_day, value)
        for lo, hi, stats in ((_FMIN, _FMAX, flow), (_PMIN, _PMAX, pressure)):
            np.fmin.at(day[:, lo], g_day, stats[_MIN])
            np.fmax.at(day[:, hi], g_day, stats[_MAX])

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

    def _update_night(self, touched: np.ndarray, day_rows: np.ndarray) -> None:
        """Record the flow mean of touched night windows in their day's night slots.

        The day keeps each night window's current mean (not a running minimum) because a
        late reading can raise a window's mean, and then the minimum must be another window.
        """
        d = day_rows[touched]
        slot = self.win_w_[touched] - self.day_key_[d, _DNIGHT]
        night = (slot >= 0) & (self.win_w_[touched] < self.day_key_[d, _DNIGHT_END])
        night &= slot < NIGHT_SLOTS  # only a zone with a DST shift over 1 h could exceed it
        if night.any():
            self.night_[d[night], slot[night]] = self._flow_avg()[touched[night]]

    def _close(self) -> None:
        """Drop the windows and days the watermark has passed: the state stays bounded."""
        wm = self.watermark
        if wm is None:
            return
        open_w = (self.win_w_ + 1) * WINDOW_US > wm
        if not open_w.all():
            self.win_w_, self.win_ = self.win_w_[open_w], self.win_[open_w]
            self.stat_ = self.stat_[:, open_w]
        open_d = self.day_key_[:, _DEND] > wm
        if not open_d.all():
            self.day_key_, self.day_ = self.day_key_[open_d], self.day_[open_d]
            self.night_ = self.night_[open_d]

    # -- rows --------------------------------------------------------------------------------

    def _rows_15m(self, rows: np.ndarray) -> TableRows | None:
        """kpi_15m rows of the given open windows."""
        if rows.size == 0:
            return None
        k = rows.size
        n = self.win_[rows, _N]
        cols: dict[str, object] = {
            "node_id": [self.node_id] * k,
            "window_start": self.win_w_[rows] * WINDOW_US,
            "n": n.astype(np.int64),
            "completeness": _completeness(n, WINDOW_S, self.win_[rows, _INT]),
        }
        stat = self.stat_[:, rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            for j, m in enumerate(self.cols_):
                name = MEASUREMENTS[int(m)]
                cnt = stat[_CNT, :, j]
                has = cnt > 0
                cols[f"{name}_avg"] = np.where(has, stat[_MEAN, :, j], np.nan)
                cols[f"{name}_min"] = stat[_MIN, :, j]
                cols[f"{name}_max"] = stat[_MAX, :, j]
                cols[f"{name}_std"] = np.where(has, np.sqrt(stat[_M2, :, j] / cnt), np.nan)
            cols["quality_avg"] = self.win_[rows, _QSUM] / self.win_[rows, _QCNT]
        cols["volume_m3"] = self._volumes()[rows]
        cols["score_max"] = self.win_[rows, _SMAX]
        return frame("kpi_15m", cols)

    def _rows_daily(self, rows: np.ndarray) -> TableRows | None:
        """kpi_daily rows of the given open days."""
        if rows.size == 0:
            return None
        d, keys = self.day_[rows], self.day_key_[rows]
        day_s = (keys[:, _DEND] - keys[:, _DSTART]) / US_PER_S
        with np.errstate(invalid="ignore", divide="ignore"):
            cols: dict[str, object] = {
                "node_id": [self.node_id] * rows.size,
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


def _optional(a: np.ndarray | None, index: np.ndarray) -> np.ndarray:
    """A float array selected by ``index``, NaN when the batch does not carry it."""
    if a is None:
        return np.full(index.size, np.nan)
    return np.asarray(a, dtype=np.float64)[index]


def _group_stats(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per run of rows starting at ``starts``, per column: count, mean, M2, min, max.

    Two passes (mean, then squared deviations from it) keep the variance exact for large
    values with small spread (conductivity, totalizers); NaN values are left out.
    """
    ok = np.isfinite(x)
    cnt = np.add.reduceat(ok.astype(np.float64), starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.add.reduceat(np.where(ok, x, 0.0), starts, axis=0) / cnt
    size = np.diff(np.append(starts, x.shape[0]))
    dev = np.where(ok, x - np.repeat(mean, size, axis=0), 0.0)
    m2 = np.add.reduceat(dev * dev, starts, axis=0)
    mn = np.minimum.reduceat(np.where(ok, x, np.inf), starts, axis=0)
    mx = np.maximum.reduceat(np.where(ok, x, -np.inf), starts, axis=0)
    empty = cnt == 0
    mean[empty] = 0.0
    mn[empty] = np.nan
    mx[empty] = np.nan
    return np.stack((cnt, mean, m2, mn, mx))


def _column(stats: np.ndarray, bcols: np.ndarray, m: int) -> np.ndarray:
    """(count, mean, M2, min, max) per window of measurement ``m``; empty if not in the batch."""
    j = np.flatnonzero(bcols == m)
    if j.size:
        return stats[:, :, int(j[0])]
    return np.broadcast_to(_STAT_INIT[:, None], (len(_STAT_INIT), stats.shape[1]))


def _usual_intervals_s(memory: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The usual interval (s) once the first ``known[i]`` intervals of ``memory`` were seen.

    The median of the last ``INTERVAL_MEMORY`` of them, snapped to a nominal logger period when
    within ``NOMINAL_TOLERANCE`` of it; NaN while none is known.
    """
    out = np.full(known.shape, np.nan)
    some = known > 0
    if not some.any():
        return out
    known = known[some]
    at = known[:, None] - INTERVAL_MEMORY + np.arange(INTERVAL_MEMORY)[None, :]
    # Unknown slots sort last as +inf; the median of the first k sorted (np.nanmedian is ~20x
    # slower, and this runs for every node batch).
    recent = np.sort(np.where(at >= 0, memory[np.clip(at, 0, None)], np.inf), axis=1)
    k = np.minimum(known, INTERVAL_MEMORY)
    rows = np.arange(k.size)
    median = (recent[rows, (k - 1) // 2] + recent[rows, k // 2]) / (2 * US_PER_S)
    nominal = _NOMINAL[np.argmin(np.abs(np.log(_NOMINAL[None, :] / median[:, None])), axis=1)]
    out[some] = np.where(np.abs(median / nominal - 1) <= NOMINAL_TOLERANCE, nominal, median)
    return out


def _completeness(n: np.ndarray, span_s: np.ndarray | float, interval_s: np.ndarray) -> np.ndarray:
    """min(1, n / expected readings), expected = span / usual interval; NaN if unknown."""
    with np.errstate(invalid="ignore", divide="ignore"):
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
