"""Hourly demand forecasts per node and per district, issued daily, and their accuracy.

DESIGN.md, "The pipeline" step 5. No I/O: the flow (``dataflows.pipeline``) and the backtest
(``waterflow forecast backtest``) drive the same objects.

A series is a node's hourly mean flow (L/s) or a district's: the sum of its inflow meters
minus its outflow meters (topology roles), stored under ``node_id`` = the district id. Every
day at 00:00 local time (``Settings.tz``) each model issues the next ``HORIZON_H`` hourly
values with a prediction interval into ``forecasts``.

No look-ahead, whatever the batching: a node's local day closes when its first reading of a
later day arrives (or, at the end of a replay, when its readings reach the day's last hour);
readings of a closed day are late and ignored. Days close in arrival order, one reading
after another, so how the stream is cut into batches changes nothing. The forecast issued at
the midnight that ends a day is computed from the closed days only, i.e. from readings with
event time before it. A district closes a day once all its meters have closed it (or a
silent meter is ``MAX_WAIT_DAYS`` behind the fastest; its hours are then unknown).

Accuracy (``forecast_accuracy``): when a day closes, each forecast still pending for it is
scored, per model and horizon band, over the day's hours: MAE (L/s), MAPE (hours whose
actual is 0 left out) and n. ``horizon_h`` is the band's last hour (bands 1-24, 25-72 and
73-168 h; they fall on whole local days after the issue) and ``period_start`` the local day
of the actuals, so an accuracy row is complete once its day has ended (``forecast_selected``
only uses rows whose period started before the issue). Horizons are counted in local hours
(the forecast is scored on the local grid): around a change of clock one hour is off by one.

Prediction intervals: the 5 % and 95 % quantiles of the last ``RING`` relative errors of the
model in the same horizon band; +-``DEFAULT_SPREAD`` until ``MIN_ERRORS`` are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataflows.forecast_calendar import (
    EPOCH_ORDINAL,
    day_types,
    holiday_flags,
    local_hours,
    local_midnight_us,
    target_slots,
)
from dataflows.forecast_models import (
    DAYS_AHEAD,
    HISTORY_DAYS,
    N_FEATURES,
    Grid,
    RidgeLearner,
    day_facts,
    ridge_day,
    seasonal,
    seasonal_day,
)
from dataflows.model import COL, US_PER_HOUR, Flag, ReadingBatch
from dataflows.packing import pack_means, unpack_means
from dataflows.tables import Coded, TableRows, frame
from dataflows.topology import Network

MODELS = ("seasonal", "ridge")
#: The models' names as the one list every series' forecast rows code into (``tables.Coded``).
_MODEL_NAMES = list(MODELS)
HORIZON_H = 168
#: Horizon bands as (first hour, last hour); ``BAND_OF_DAY[k]`` is the band of the k-th local
#: day after the issue.
BANDS = ((1, 24), (25, 72), (73, 168))
BAND_OF_DAY = (0, 1, 1, 2, 2, 2, 2)
#: The band of each hour ahead, 1 to HORIZON_H.
_BAND_OF_HOUR = np.searchsorted([b[1] for b in BANDS], np.arange(1, HORIZON_H + 1))
RING = 168
MIN_ERRORS = 24
DEFAULT_SPREAD = 0.25
QUANTILES = (0.05, 0.95)
#: A forecast is issued only with this many valid hours among the last 14 closed days (a
#: node silent for longer gets none until it reports again).
MIN_RECENT_HOURS = 24
#: A district waits at most this many days for a silent meter (like the balance does).
MAX_WAIT_DAYS = 62
#: Roles of the meters whose flow makes a district's demand, with their sign.
METER_SIGNS = {"inflow": 1.0, "outflow": -1.0}
#: Flows are summed per hour in this unit (L/s), as whole numbers.
FLOW_QUANTUM = 1e-6
#: Readings with these flags are not demand: they are left out of the hourly means.
_NOT_DEMAND = int(Flag.SPIKE | Flag.STUCK)
#: The resolution (L/s) a meter's hourly means are packed in when they are means of it.
MEAN_UNIT = 1e-3
#: Day facts (``ratio_``, ``tail_``) a snapshot keeps: an issue still learning (6 days back)
#: reads those of the 7 days before it.
FACT_DAYS = 14
#: Version of the packed state (``SeriesForecaster.__getstate__``): 3 added it, its hourly
#: means as ``pack_means``, the last ``FACT_DAYS`` day facts and float16 error rings.
_STATE_VERSION = 3


@dataclass(slots=True)
class ClosedDay:
    """One closed local day of a series: its ordinal and 24 hourly means (NaN unknown)."""

    series_id: str
    day: int
    values: np.ndarray


@dataclass(slots=True)
class ForecastOut:
    """What a step produced: forecast rows, accuracy rows, and the days it closed."""

    forecasts: TableRows | None = None
    accuracy: TableRows | None = None
    closed: list[ClosedDay] = field(default_factory=list)

    def rows(self) -> list[TableRows]:
        return [r for r in (self.forecasts, self.accuracy) if r is not None]


@dataclass(slots=True)
class _Rows:
    """Columns gathered over the issues and days of one step."""

    forecasts: list[dict[str, np.ndarray]] = field(default_factory=list)
    accuracy: list[tuple[str, int, int, float, float, int]] = field(default_factory=list)

    def out(self, series_id: str, closed: list[ClosedDay]) -> ForecastOut:
        forecasts = accuracy = None
        if self.forecasts:
            cols: dict[str, Any] = {
                k: np.concatenate([f[k] for f in self.forecasts]) for k in self.forecasts[0]
            }
            cols["model"] = Coded(cols["model"], _MODEL_NAMES)
            n = len(cols["yhat"])
            forecasts = frame("forecasts", {"node_id": Coded.repeat(series_id, n), **cols})
        if self.accuracy:
            model, horizon, start, mae, mape, n_ = zip(*self.accuracy, strict=True)
            accuracy = frame(
                "forecast_accuracy",
                {
                    "node_id": [series_id] * len(model),
                    "model": list(model),
                    "horizon_h": list(horizon),
                    "period_start": np.array(start, dtype=np.int64),
                    "mae": np.array(mae),
                    "mape": np.array(mape),
                    "n": list(n_),
                },
            )
        return ForecastOut(forecasts, accuracy, closed)


class SeriesForecaster:
    """The closed days, models, pending forecasts and error rings of one series.

    Pickled packed (``__getstate__``, lossless): the ``HISTORY_DAYS`` x 24 hourly means
    (float32, 5.4 KB when all known; means of whole mL/s, as from a meter reporting 3
    decimals, are kept as compressed steps: about 2.5-3.5 KB), the error rings' filled part
    (float16, 2 KB when full), the ridge statistics (1.3 KB), the 17 coefficients of each of at
    most 7 pending issues and the last ``FACT_DAYS`` day facts: about 7-8 KB for a flow meter
    after eight weeks, under 1 KB for a node without flow. The state changes only when a day
    closes, so the packed state is kept until then (a snapshot every batch packs it once).
    """

    def __init__(self, series_id: str, tz: str, holidays: tuple[str, ...] = ()) -> None:
        self.series_id = series_id
        self.tz = tz
        self.holidays = holidays
        self.first_: int | None = None  # ordinal of values_[0]
        self.values_ = np.zeros((0, 24), np.float32)
        self.ratio_ = np.zeros(0)
        self.tail_ = np.zeros(0)
        self.learner_ = RidgeLearner.new()
        # Pending forecasts: issue day -> the ridge coefficients they were issued with, which
        # with the days kept give back both models' forecasts (``seasonal_day``, ``ridge_day``)
        # in 136 bytes instead of 2 x 7 x 24 floats (``pending_``). (models, days left, 24)
        # float32 arrays from a snapshot of an older release are kept and used as they are.
        self.issues_: dict[int, np.ndarray] = {}
        self.errors_ = np.full((len(MODELS), len(BANDS), RING), np.nan, np.float32)
        self.error_pos_ = np.zeros((len(MODELS), len(BANDS)), np.int64)
        # Grid.memo, for the days pending forecasts were issued from: not state, not pickled
        self._memo: dict[int, dict[tuple[object, ...], object]] = {}
        # (values_, the packed state) as of the last close: not state, not pickled
        self._packed: tuple[np.ndarray, tuple[object, ...]] | None = None

    def __getstate__(self) -> tuple[object, ...]:
        """The state, packed (lossless) and without ``_memo``: what every snapshot costs.

        The hourly means as compressed whole steps (``pack_means``, by hour of the day so that
        a step is from the same hour a day before) or, if they are not such means, the known
        ones only; the day facts of the last ``FACT_DAYS`` days (older ones are never read
        again); the filled part of each error ring; the pending forecasts as one block of bytes
        (a pickled array costs about 130 bytes besides its data). Packed once per closed day.
        """
        if self._packed is not None and self._packed[0] is self.values_:
            return self._packed[1]
        days = sorted(self.issues_)
        pending: object = self.issues_
        if all(self.issues_[d].shape == (N_FEATURES,) for d in days):
            pending = (tuple(days), b"".join(self.issues_[d].tobytes() for d in days))
        values = pack_means(self.values_.T, MEAN_UNIT) or _pack_known(self.values_)
        state = (
            _STATE_VERSION,
            self.series_id,
            self.tz,
            self.holidays,
            self.first_,
            values,
            len(self.ratio_),
            _pack_known(self.ratio_[-FACT_DAYS:]),
            _pack_known(self.tail_[-FACT_DAYS:]),
            self.learner_,
            pending,
            _pack_rings(self.errors_, self.error_pos_),
        )
        self._packed = (self.values_, state)
        return state

    def __setstate__(self, state: Any) -> None:
        self._memo = {}
        self._packed = None
        if isinstance(state, dict):  # a snapshot of the release before packing
            state = dict(state)
            state["issues_"] = state.pop("pending_", {})
            self.__dict__.update(state)
            self.errors_ = _ring_values(self.errors_)
            return
        if len(state) == 10:  # packed by the release before 3
            (self.series_id, self.tz, self.holidays, self.first_, values, ratio, tail,
             self.learner_, pending, rings) = state
            self.ratio_ = _unpack_known(ratio)
            self.tail_ = _unpack_known(tail)
        else:
            (_, self.series_id, self.tz, self.holidays, self.first_, values, days, ratio, tail,
             self.learner_, pending, rings) = state
            self.ratio_ = np.full(days, np.nan)
            self.tail_ = np.full(days, np.nan)
            if days:
                self.ratio_[-FACT_DAYS:] = _unpack_known(ratio)
                self.tail_[-FACT_DAYS:] = _unpack_known(tail)
        if values[0] == "means":
            self.values_ = unpack_means(values).reshape(24, -1).T.copy()
        else:
            self.values_ = _unpack_known(values).reshape(-1, 24)
        if isinstance(pending, dict):
            self.issues_ = pending
        else:
            days_p, blob = pending
            w = np.frombuffer(blob).reshape(-1, N_FEATURES)
            self.issues_ = {d: w[i].copy() for i, d in enumerate(days_p)}
        self.errors_, self.error_pos_ = _unpack_rings(rings)

    @property
    def pending_(self) -> dict[int, np.ndarray]:
        """Issue day -> (models, days still to score, 24) float32 of the forecasts pending.

        Computed from the coefficients kept (``issues_``), for inspection.
        """
        out: dict[int, np.ndarray] = {}
        last = self.last_closed
        grid = self.grid() if self.issues_ else None
        for issue, kept in sorted(self.issues_.items()):
            if kept.ndim != 1:
                out[issue] = kept
                continue
            assert grid is not None
            done = 0 if last is None else max(last - issue + 1, 0)
            out[issue] = np.stack([
                np.stack([
                    seasonal_day(grid, issue - grid.first, k),
                    ridge_day(grid, issue - grid.first, k, kept),
                ])
                for k in range(done, len(BAND_OF_DAY))
            ], axis=1).astype(np.float32)
        return out

    @property
    def last_closed(self) -> int | None:
        return None if self.first_ is None else self.first_ + len(self.values_) - 1

    def close(self, day: int, values: np.ndarray, rows: _Rows) -> None:
        """Close local day ``day``, then issue the forecasts of the next midnight.

        Days skipped since the last closed one are closed first, unknown; days already
        closed are ignored.
        """
        last = self.last_closed
        if last is not None and day <= last:
            return
        self._packed = None
        if last is None or day - last > HISTORY_DAYS + 7:
            self._reset(day)
            last = day - 1
        for gap_day in range(last + 1, day):
            self._close_one(gap_day, np.full(24, np.nan), rows)
        self._close_one(day, values, rows)

    def use_holidays(self, holidays: tuple[str, ...]) -> None:
        """Take the run's extra holidays (a resumed run's configuration, not its snapshot's).

        What was computed with the old ones is dropped: the memo of the pending issues' grids
        and the packed state (which holds the holidays). Forecasts still pending are scored as
        recomputed with the new ones.
        """
        if holidays != self.holidays:
            self.holidays = holidays
            self._memo = {}
            self._packed = None

    def _reset(self, day: int) -> None:
        self._memo = {}
        self.first_ = day
        self.values_ = np.zeros((0, 24), np.float32)
        self.ratio_ = np.zeros(0)
        self.tail_ = np.zeros(0)
        self.issues_ = {}

    def grid(self) -> Grid:
        assert self.first_ is not None
        span = len(self.values_) + DAYS_AHEAD
        return Grid(
            self.first_,
            self.values_,
            day_types(self.first_, span, self.holidays),
            holiday_flags(self.first_, span, self.holidays),
            self.ratio_,
            self.tail_,
            self._memo,
        )

    def _close_one(self, day: int, values: np.ndarray, rows: _Rows) -> None:
        self.values_ = np.vstack([self.values_, values.astype(np.float32)[None, :]])
        self.ratio_ = np.append(self.ratio_, np.nan)
        self.tail_ = np.append(self.tail_, np.nan)
        extra = len(self.values_) - HISTORY_DAYS
        if extra > 0:
            assert self.first_ is not None
            self.first_ += extra
            self.values_ = self.values_[extra:].copy()
            self.ratio_ = self.ratio_[extra:].copy()
            self.tail_ = self.tail_[extra:].copy()
        for seen_from in [d for d in self._memo if d < day - 7]:
            del self._memo[seen_from]
        grid = self.grid()
        index = grid.days - 1
        self.ratio_[index], self.tail_[index] = day_facts(grid, index)
        self._score(day, values.astype(np.float64), rows, grid)
        self.learner_.learn_day(grid, index, first_issue=1)
        self._issue(day + 1, grid, rows)

    def _score(self, day: int, actual: np.ndarray, rows: _Rows, grid: Grid) -> None:
        """Accuracy rows of ``day`` for every pending forecast that covers it."""
        issues = sorted(self.issues_)
        if not issues:
            return
        yhat = np.stack([self._issued_for(issue, day, grid) for issue in issues])
        band = np.array([BAND_OF_DAY[day - issue] for issue in issues])
        # (issues, models, hours); every issue and model at once
        ok = ~np.isnan(actual) & ~np.isnan(yhat)
        err = actual - yhat
        with np.errstate(all="ignore"):
            ape = np.abs(err) / np.abs(actual)
            rel = err / yhat
        has_ape = ok & (actual != 0)
        sums = np.zeros((len(BANDS), len(MODELS), 4))  # abs error, ape, n, n for ape
        # np.add.at adds the issues in order, as one addition per issue did
        np.add.at(sums[..., 0], band, np.where(ok, np.abs(err), 0).sum(axis=2))
        np.add.at(sums[..., 1], band, np.where(has_ape, ape, 0).sum(axis=2))
        np.add.at(sums[..., 2], band, ok.sum(axis=2))
        np.add.at(sums[..., 3], band, has_ape.sum(axis=2))
        # A band's errors of the day in issue order: at most 4 issues x 24 hours, fewer than
        # a ring holds, so one write per ring is the same as one per issue.
        keep = ok & np.isfinite(rel)
        for b in np.unique(band):
            of_band = band == b
            for m in range(len(MODELS)):
                self._remember(m, int(b), rel[of_band, m][keep[of_band, m]])
        for issue in issues:
            ahead = self.issues_[issue]
            if ahead.ndim == 1:
                if day - issue >= len(BAND_OF_DAY) - 1:
                    del self.issues_[issue]
            elif ahead.shape[1] > 1:
                self.issues_[issue] = ahead[:, 1:].copy()
            else:
                del self.issues_[issue]
        start = local_midnight_us(day, self.tz)
        for m, model in enumerate(MODELS):
            for b, (_, last_hour) in enumerate(BANDS):
                abs_sum, ape_sum, n, n_ape = sums[b, m]
                if n:
                    mape = ape_sum / n_ape if n_ape else float("nan")
                    rows.accuracy.append((model, last_hour, start, abs_sum / n, mape, int(n)))

    def _issued_for(self, issue: int, day: int, grid: Grid) -> np.ndarray:
        """Both models' forecasts (models, 24) for ``day``, as issued on ``issue``."""
        ahead = self.issues_[issue]
        if ahead.ndim != 1:  # (models, days left, 24) from an older release's snapshot
            return ahead[:, 0].astype(np.float64)
        kept = self._memo.get(issue, {}).get(("issued",))
        if kept is not None:  # kept since the issue (not after a restore)
            return kept[:, day - issue].astype(np.float64)  # type: ignore[index]
        at = issue - grid.first
        issued = np.stack([
            seasonal_day(grid, at, day - issue),
            ridge_day(grid, at, day - issue, ahead),
        ])
        # float32, as the forecasts were issued and kept (the same accuracy)
        return issued.astype(np.float32).astype(np.float64)

    def _remember(self, model: int, band: int, rel: np.ndarray) -> None:
        rel = rel[-RING:]
        pos = (self.error_pos_[model, band] + np.arange(len(rel))) % RING
        self.errors_[model, band, pos] = _ring_values(rel)
        self.error_pos_[model, band] += len(rel)

    def _issue(self, day: int, grid: Grid, rows: _Rows) -> None:
        recent = grid.values[-14:]
        if np.sum(~np.isnan(recent)) < MIN_RECENT_HOURS:
            return
        w = self.learner_.weights()
        forecasts = np.stack([seasonal(grid), self.learner_.forecast(grid, w)])
        self.issues_[day] = w
        # The days to score, while the series lives (the memo is not pickled: a restored
        # series recomputes them from ``w``, to the same values).
        self._memo.setdefault(day, {})[("issued",)] = forecasts[:, :7].astype(np.float32)
        ts, slots = target_slots(day, HORIZON_H, self.tz)
        band = _BAND_OF_HOUR
        issued = np.full(HORIZON_H, local_midnight_us(day, self.tz), dtype=np.int64)
        for m in range(len(MODELS)):
            yhat = forecasts[m][slots // 24, slots % 24]
            lo, hi = self._spread(m)
            rows.forecasts.append(
                {
                    "issued_at": issued,
                    "target_ts": ts,
                    "model": np.full(HORIZON_H, m),  # codes into _MODEL_NAMES
                    "yhat": yhat,
                    "yhat_lo": yhat * (1 + lo[band]),
                    "yhat_hi": yhat * (1 + hi[band]),
                }
            )

    def _spread(self, model: int) -> tuple[np.ndarray, np.ndarray]:
        """Relative interval bounds per band, from the band's recent relative errors."""
        lo = np.full(len(BANDS), -DEFAULT_SPREAD)
        hi = np.full(len(BANDS), DEFAULT_SPREAD)
        for b in range(len(BANDS)):
            known = self.errors_[model, b][~np.isnan(self.errors_[model, b])]
            if known.size >= MIN_ERRORS:
                lo[b], hi[b] = _quantiles(known)
        return lo, hi


def _pack_known(a: np.ndarray) -> tuple[str, int, bytes, bytes]:
    """A float array as (dtype, size, bitmap of its NaN, its other values), exactly.

    Only when every NaN in it is the canonical one; otherwise as (dtype, -1, b"", its bytes).

    >>> a = np.array([1.5, np.nan, np.nan, -2.0], np.float32)
    >>> packed = _pack_known(a)
    >>> len(packed[3]), _unpack_known(packed).tolist()
    (8, [1.5, nan, nan, -2.0])
    """
    flat = a.ravel()
    nan = np.isnan(flat)
    canonical = np.array(np.nan, dtype=a.dtype).view(f"u{a.itemsize}")
    if nan.any() and not (flat[nan].view(f"u{a.itemsize}") == canonical).all():
        return a.dtype.str, -1, b"", flat.tobytes()
    return a.dtype.str, flat.size, np.packbits(nan).tobytes(), flat[~nan].tobytes()


def _unpack_known(packed: tuple[str, int, bytes, bytes]) -> np.ndarray:
    """The flat array ``_pack_known`` packed."""
    dtype, size, bitmap, data = packed
    if size < 0:
        return np.frombuffer(data, dtype=dtype).copy()
    nan = np.unpackbits(np.frombuffer(bitmap, np.uint8), count=size).astype(bool)
    out = np.full(size, np.nan, dtype=dtype)
    out[~nan] = np.frombuffer(data, dtype=dtype)
    return out


def _ring_values(rel: np.ndarray) -> np.ndarray:
    """Relative errors as the rings keep them: float16 values, in float32 arrays.

    11 significant bits, within +-65504; rounded through float32, so that a ring of a
    snapshot before version 3 (float32) rounds alike.

    >>> _ring_values(np.array([0.1, -1e6, np.nan])).tolist()
    [0.0999755859375, -65504.0, nan]
    """
    narrow = np.clip(np.asarray(rel, dtype=np.float32), -_F16_MAX, _F16_MAX)
    return narrow.astype(np.float16).astype(np.float32)


_F16_MAX = float(np.finfo(np.float16).max)


def _pack_rings(errors: np.ndarray, pos: np.ndarray) -> tuple[bytes, bytes, bytes | None, str]:
    """The error rings as their write positions and the filled part of each, as float16.

    Exact: a ring holds float16 values (``_ring_values``), filled from its start and only
    with finite ones, so its first ``min(pos, RING)`` entries are known and the rest NaN; a
    ring that is not so (never made by ``_remember``) is kept whole, as float32.
    """
    filled = np.minimum(pos, RING).ravel()
    rings = errors.reshape(-1, RING)
    known = np.arange(RING)[None, :] < filled[:, None]
    data = rings[known]
    narrow = data.astype(np.float16)
    if not np.array_equal(~np.isnan(rings), known) or not np.array_equal(narrow, data):
        return pos.tobytes(), b"", errors.astype(np.float32).tobytes(), "<f4"
    return pos.tobytes(), narrow.tobytes(), None, "<f2"


def _unpack_rings(packed: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    pos_b, data, whole = packed[:3]
    dtype = packed[3] if len(packed) > 3 else "<f4"  # float32 before 3
    shape = (len(MODELS), len(BANDS))
    pos = np.frombuffer(pos_b, dtype=np.int64).reshape(shape).copy()
    if whole is not None:
        errors = np.frombuffer(whole, dtype=np.float32).reshape(*shape, RING)
        return _ring_values(errors), pos
    errors = np.full((*shape, RING), np.nan, np.float32)
    known = np.arange(RING)[None, :] < np.minimum(pos, RING).reshape(-1, 1)
    errors.reshape(-1, RING)[known] = _ring_values(np.frombuffer(data, dtype=dtype))
    return errors, pos


def _quantiles(values: np.ndarray) -> tuple[float, float]:
    """``QUANTILES`` of ``values``, interpolated linearly like numpy's default.

    Sorted once: ``np.quantile`` costs about 20 times more on arrays this small.

    >>> _quantiles(np.arange(21.0))
    (1.0, 19.0)
    """
    ordered = np.sort(values.astype(np.float64))
    out = []
    for q in QUANTILES:
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        out.append(float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low)))
    return out[0], out[1]


class NodeForecaster:
    """One node's forecasts from its accepted readings (flow_rate, L/s).

    The hourly means of the open local day are gathered until the node's readings move on to
    a later day, which closes it.
    """

    def __init__(self, node_id: str, tz: str, holidays: tuple[str, ...] = ()) -> None:
        self.series = SeriesForecaster(node_id, tz, holidays)
        self.open_day_: int | None = None
        self.sums_ = np.zeros(24)
        self.counts_ = np.zeros(24, np.int64)
        self.newest_us_: int | None = None

    def __getstate__(self) -> tuple[object, ...]:
        # The open day's hours that have readings only, the counts in the narrowest type.
        hours = (self.counts_ != 0) | (self.sums_ != 0) | np.signbit(self.sums_)
        counts = self.counts_[hours]
        top = int(counts.max()) if counts.size else 0
        dtype = "u2" if 0 <= counts.min(initial=0) and top <= 0xFFFF else "i8"
        return (
            self.series,
            self.open_day_,
            self.newest_us_,
            np.packbits(hours).tobytes(),
            self.sums_[hours].tobytes(),
            dtype,
            counts.astype(dtype).tobytes(),
        )

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):  # a snapshot of the release before packing
            self.__dict__.update(state)
            return
        self.series, self.open_day_, self.newest_us_, hours_b, sums, dtype, counts = state
        hours = np.unpackbits(np.frombuffer(hours_b, np.uint8), count=24).astype(bool)
        self.sums_ = np.zeros(24)
        self.sums_[hours] = np.frombuffer(sums)
        self.counts_ = np.zeros(24, np.int64)
        self.counts_[hours] = np.frombuffer(counts, dtype=dtype)

    def update(self, batch: ReadingBatch) -> ForecastOut:
        """Take a batch in arrival order; the rows of the forecasts it issued and scored."""
        rows = _Rows()
        closed: list[ClosedDay] = []
        if len(batch) == 0:
            return rows.out(self.series.series_id, closed)
        hours = local_hours(batch.ts, self.series.tz)
        days = hours // 24 + EPOCH_ORDINAL
        start = self.open_day_ if self.open_day_ is not None else int(days[0])
        before = np.maximum.accumulate(np.concatenate([[start], days[:-1]]))
        accepted = days >= before  # days only move forward; an older day is late
        flow = batch.values[:, COL["flow_rate"]]
        usable = accepted & np.isfinite(flow)
        if batch.flags is not None:
            usable &= (batch.flags & _NOT_DEMAND) == 0
        newest = int(batch.ts.max())
        self.newest_us_ = newest if self.newest_us_ is None else max(self.newest_us_, newest)
        for day in np.unique(days[accepted]):
            if self.open_day_ is not None and day > self.open_day_:
                self._close_open(rows, closed)
                if day > self.open_day_ + 1:  # days without a reading: unknown, closed too
                    self.series.close(int(day) - 1, np.full(24, np.nan), rows)
            self.open_day_ = int(day)
            sel = usable & (days == day)
            hour = hours[sel] % 24
            # whole µL/s: sums of integers below 2**53 are exact in float64, so the hour's
            # mean does not depend on how its readings were split into batches
            micro = np.rint(flow[sel] / FLOW_QUANTUM)
            self.sums_ += np.bincount(hour, weights=micro, minlength=24)
            self.counts_ += np.bincount(hour, minlength=24)
        return rows.out(self.series.series_id, closed)

    def flush(self) -> ForecastOut:
        """At the end of a replay: close the open day if its readings reach its last hour."""
        rows = _Rows()
        closed: list[ClosedDay] = []
        day = self.open_day_
        if day is not None and self.newest_us_ is not None:
            end = local_midnight_us(day + 1, self.series.tz)
            if self.newest_us_ >= end - US_PER_HOUR:
                self._close_open(rows, closed)
                self.open_day_ = day + 1
        return rows.out(self.series.series_id, closed)

    def _close_open(self, rows: _Rows, closed: list[ClosedDay]) -> None:
        assert self.open_day_ is not None
        with np.errstate(all="ignore"):
            values = np.where(self.counts_ > 0, self.sums_ / self.counts_ * FLOW_QUANTUM, np.nan)
        self.series.close(self.open_day_, values, rows)
        closed.append(ClosedDay(self.series.series_id, self.open_day_, values))
        self.sums_ = np.zeros(24)
        self.counts_ = np.zeros(24, np.int64)


class DistrictForecaster:
    """A district's forecasts from its meters' closed days: inflows minus outflows.

    ``meters`` maps each meter of the topology to +1 (inflow) or -1 (outflow). A day is
    combined once every meter closed it, or once the fastest meter is ``MAX_WAIT_DAYS`` ahead
    (a missing meter's hours are then unknown), so the result does not depend on how the
    meters' readings interleave.
    """

    def __init__(
        self, district: str, tz: str, meters: dict[str, float], holidays: tuple[str, ...] = ()
    ) -> None:
        self.series = SeriesForecaster(district, tz, holidays)
        self.meters = dict(meters)
        self.days_: dict[int, dict[str, np.ndarray]] = {}
        self.newest_: dict[str, int] = {}

    def update(self, day: ClosedDay) -> ForecastOut:
        rows = _Rows()
        if day.series_id in self.meters:
            last = self.series.last_closed
            if last is None or day.day > last:
                self.days_.setdefault(day.day, {})[day.series_id] = day.values
            self.newest_[day.series_id] = max(day.day, self.newest_.get(day.series_id, day.day))
            self._combine(rows)
        return rows.out(self.series.series_id, [])

    def _combine(self, rows: _Rows) -> None:
        fastest = max(self.newest_.values())
        limit = fastest - MAX_WAIT_DAYS
        if self.meters.keys() <= self.newest_.keys():
            limit = max(limit, min(self.newest_.values()))
        for day in sorted(d for d in self.days_ if d <= limit):
            parts = self.days_.pop(day)
            total = np.zeros(24)
            for meter, sign in self.meters.items():
                total += sign * parts.get(meter, np.full(24, np.nan))
            self.series.close(day, total, rows)


def district_meters(network: Network, district: str) -> dict[str, float]:
    """The meters of ``district`` in the topology, with their sign in its demand."""
    return {
        spec.node_id: METER_SIGNS[spec.role]
        for spec in network.district_nodes(district)
        if spec.role in METER_SIGNS
    }


def closed_days_by_district(network: Network, out: ForecastOut) -> list[tuple[str, ClosedDay]]:
    """The days a node closed, keyed by its district, if it is one of a district's meters."""
    if not out.closed:
        return []
    spec = network.nodes.get(out.closed[0].series_id)
    if spec is None or spec.district is None or spec.role not in METER_SIGNS:
        return []
    return [(spec.district, day) for day in out.closed]
