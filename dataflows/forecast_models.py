"""The demand forecast models: pure functions and small online learners on a local-day grid.

Both models see a ``Grid``: the closed local days of one series (a node's hourly mean flow,
or a district's), oldest first, with what was learned about each day when it closed. They
forecast the ``DAYS_AHEAD`` local days from the day after the last closed one, 24 local hours
each; nothing else enters, so a forecast depends only on the data before its issue time.

- ``seasonal``: the hour-of-week profile, the per-hour median of the last ``K`` days of the
  same day type (holidays count as Sundays), scaled by the recent level: the median ratio of
  the last ``LEVEL_DAYS`` days' volume to their own profile's. Medians make it robust to
  anomalous days and NaN-aware medians to gaps; days with too few hours are skipped.
- ``ridge``: a linear model of the relative deviation from the (unscaled) profile, on the
  recent level ratios (yesterday, 3 and 7 days), the last evening's deviation decaying with
  the horizon, the target's day type and holiday flag, the same hour a week before, and a
  mean profile. Learned online by exponentially forgotten sufficient statistics: each closed
  day adds the 7 x 24 (issue, target) pairs whose target it is, with the features those
  issues saw (recomputed from the frozen grid, so nothing per forecast is stored).

Tuned on the BWDF data (``waterflow forecast backtest``; README, "Forecasts").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Local days forecast per issue: 7, and one more so the 168 UTC hours of a week that
#: loses an hour in the spring still all have a local slot.
DAYS_AHEAD = 8
#: Days a profile looks back for days of its type: ``K_MEAN`` weeks and one for holidays.
LOOKBACK = 49
#: Days of history kept: the profiles of the oldest issue still learning (6 days back) look
#: ``LOOKBACK`` days before it.
HISTORY_DAYS = LOOKBACK + 7
#: Same-type days in the median profile, and in the mean profile (a ridge feature).
K = 4
K_MEAN = 6
#: A day counts for a profile or a level only with at least this many valid hours.
MIN_HOURS = 12
#: Days in the seasonal model's level ratio.
LEVEL_DAYS = 3
#: The relative deviations the ridge model learns from and may predict are clipped here:
#: beyond, a day is an anomaly (a burst, a meter fault), not demand to learn.
MAX_DEVIATION = 0.6
#: The ridge model forgets with this factor per closed day (about a 300-day memory).
FORGET = 1.0 - 1.0 / 300.0
RIDGE_LAMBDA = 1.0
N_FEATURES = 17
_UPPER = np.triu_indices(N_FEATURES)


@dataclass(slots=True)
class Grid:
    """Closed local days of one series, oldest first, with the day facts models use.

    ``first`` is the local day (ordinal) of ``values[0]``; ``values`` (days, 24) hourly means,
    NaN where unknown; ``types`` day types of the ``len(values) + DAYS_AHEAD`` days from the
    first (holidays as Sundays); ``holiday`` the same span's holiday flags; ``ratio`` each
    closed day's volume over its own profile's (NaN when unknown); ``tail`` the last four
    hours' relative deviation from the day's own profile.

    ``memo`` keeps profiles and issue facts by the absolute local day they are seen from. They
    depend only on closed days within ``LOOKBACK`` days, which never change (history is
    trimmed only beyond), so the
    series may keep the memo from one step to the next: it saves recomputing, on each closed
    day, the profiles the pending forecasts were built from.
    """

    first: int
    values: np.ndarray
    types: np.ndarray
    holiday: np.ndarray
    ratio: np.ndarray
    tail: np.ndarray
    memo: dict[int, dict[tuple[object, ...], object]] = field(default_factory=dict)
    usable: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # a day counts for a profile with at least MIN_HOURS valid hours
        self.usable = np.sum(~np.isnan(self.values), axis=1) >= MIN_HOURS

    @property
    def days(self) -> int:
        return int(self.values.shape[0])


def profile(grid: Grid, before: int, day: int, k: int = K, how: str = "median") -> np.ndarray:
    """The hourly profile of grid day ``day`` from the ``LOOKBACK`` days before index ``before``.

    The last ``k`` days of the same type with at least ``MIN_HOURS`` valid hours; if there is
    none (the first week of a series), the last ``k`` days of any type. NaN if no day.
    """
    return profiles(grid, before, k, how)[int(grid.types[day])]


def profiles(grid: Grid, before: int, k: int = K, how: str = "median") -> np.ndarray:
    """``profile`` of every day type (``N_TYPES``, 24) seen from index ``before``, read-only.

    All types together, on first need: an issue asks for every type (its 8 days ahead), and
    one computation for all costs about what one for a single type does.
    """
    memo = grid.memo.setdefault(grid.first + before, {})
    key = ("profiles", k, how)
    found = memo.get(key)
    if found is None:
        found = memo[key] = _profiles(grid, before, k, how)
        found.flags.writeable = False
    return found  # type: ignore[return-value]


def _profiles(grid: Grid, before: int, k: int, how: str) -> np.ndarray:
    """The profile of each day type (``N_TYPES``, 24), from the days before index ``before``."""
    start = max(0, before - LOOKBACK)
    usable = grid.usable[start:before]
    types = grid.types[start:before]
    anyday = np.nonzero(usable)[0][-k:]
    # Each type's days as rows of grid values, padded with an all-NaN row (index -1 of
    # ``padded``) to k rows: NaN counts for nothing below and sorts last.
    picks = np.full((N_TYPES, k), -1)
    for kind in range(N_TYPES):
        same = np.nonzero(usable & (types == kind))[0][-k:]
        if same.size == 0:
            same = anyday
        picks[kind, : same.size] = start + same
    padded = np.vstack((grid.values, np.full((1, 24), np.nan, grid.values.dtype)))
    rows = padded[picks].astype(np.float64)  # (types, k, 24), oldest day first
    counts = np.sum(~np.isnan(rows), axis=1)
    if how == "mean":
        out = np.nansum(rows, axis=1) / np.maximum(counts, 1)
    else:
        rows.sort(axis=1)  # NaN last: the median of the valid ones, per hour
        lo = np.maximum((counts - 1) // 2, 0)
        hi = np.maximum(counts // 2, 0)
        at = np.arange(N_TYPES)[:, None]
        out = (rows[at, lo, _HOURS] + rows[at, hi, _HOURS]) / 2
    return np.where(counts > 0, out, np.nan)


#: Day types: Monday=0 ... Sunday=6 (``forecast_calendar.day_type``).
N_TYPES = 7
_HOURS = np.arange(24)


def day_facts(grid: Grid, day: int) -> tuple[float, float]:
    """(ratio, tail) of grid day ``day``, against its own profile from the days before it."""
    own = profile(grid, day, day)
    y = grid.values[day].astype(np.float64)
    ok = ~np.isnan(y) & ~np.isnan(own)
    ratio = tail = float("nan")
    if ok.sum() >= MIN_HOURS and own[ok].sum() > 0:
        ratio = float(y[ok].sum() / own[ok].sum())
    last = ok.copy()
    last[:20] = False
    if last.any() and own[last].sum() > 0:
        tail = float(y[last].sum() / own[last].sum() - 1.0)
    return ratio, tail


def _nanmedian(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else float("nan")


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def seasonal(grid: Grid) -> np.ndarray:
    """The seasonal forecast of the ``DAYS_AHEAD`` days after the grid, (DAYS_AHEAD, 24).

    >>> import numpy as np
    >>> g = Grid(0, np.tile(np.arange(24.0), (14, 1)), np.arange(22, dtype=np.int8) % 7,
    ...          np.zeros(22, bool), np.full(14, 2.0), np.zeros(14))
    >>> seasonal(g)[0, :3]  # the profile 0, 1, 2 ... scaled by the level ratio 2
    array([0., 2., 4.])
    """
    n = grid.days
    out = profiles(grid, n)[grid.types[n + _AHEAD]]
    level = _level(grid, n)
    return out * level if np.isfinite(level) else out


def seasonal_day(grid: Grid, issue: int, k: int) -> np.ndarray:
    """Day ``k`` after the issue of the seasonal forecast issued at grid index ``issue``.

    The same values as ``seasonal`` gave then: the profiles and levels of an issue depend only
    on the days before it, which a series keeps while the issue's forecasts are pending.
    """
    day = profile(grid, issue, issue + k)
    level = _level(grid, issue)
    return day * level if np.isfinite(level) else day


def _level(grid: Grid, issue: int) -> float:
    """The seasonal model's level at an issue: median ratio of the ``LEVEL_DAYS`` before it."""
    memo = grid.memo.setdefault(grid.first + issue, {})
    found = memo.get(("level",))
    if found is None:
        found = memo[("level",)] = _nanmedian(grid.ratio[max(0, issue - LEVEL_DAYS) : issue])
    return found  # type: ignore[return-value]


def _decay(value: float) -> float:
    return 0.0 if not np.isfinite(value) else value


def _issue_facts(grid: Grid, issue: int) -> tuple[float, float, float, float]:
    """The recent level ratios (1, 3, 7 days) and last evening's deviation at an issue."""
    memo = grid.memo.setdefault(grid.first + issue, {})
    found = memo.get(("facts",))
    if found is None:
        ratio = grid.ratio
        found = memo[("facts",)] = (
            _decay(ratio[issue - 1] - 1) if issue >= 1 else 0.0,
            _decay(_nanmean(ratio[max(0, issue - 3) : issue]) - 1),
            _decay(_nanmedian(ratio[max(0, issue - 7) : issue]) - 1),
            _decay(float(grid.tail[issue - 1])) if issue >= 1 else 0.0,
        )
    return found  # type: ignore[return-value]


def ridge_features(grid: Grid, issue: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (24, N_FEATURES) of target day ``issue + k`` seen at grid index ``issue``.

    Returns them with the profile they are relative to (``issue_features`` of the day).
    """
    x, base = issue_features(grid, issue)
    return x[k], base[k]


def issue_features(grid: Grid, issue: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (DAYS_AHEAD, 24, N_FEATURES) of the days after grid index ``issue``.

    Returned with the profiles (DAYS_AHEAD, 24) they are relative to. They depend only on
    the days before ``issue``, so they are kept in the memo: the day a forecast is issued
    computes them, and the days its targets close learn from the same ones (read-only).
    """
    memo = grid.memo.setdefault(grid.first + issue, {})
    found = memo.get(("ridge",))
    if found is None:
        found = memo[("ridge",)] = _ridge_features(grid, issue)
    return found  # type: ignore[return-value]


def _ridge_features(grid: Grid, issue: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (DAYS_AHEAD, 24, N_FEATURES) of the days after ``issue``, and their profiles."""
    days = issue + _AHEAD
    kinds = grid.types[days].astype(np.int64)
    base = profiles(grid, issue)[kinds]
    mean6 = profiles(grid, issue, K_MEAN, "mean")[kinds]
    r1, r3, r7, tail = _issue_facts(grid, issue)
    week_before = days - 7
    closed = (week_before >= 0) & (week_before < issue)  # not so for the 8th day ahead
    x = np.zeros((DAYS_AHEAD, 24, N_FEATURES))
    with np.errstate(all="ignore"):
        x[..., 0] = 1.0
        x[..., 1] = r1
        x[..., 2] = (r1 * _AHEAD / 6)[:, None]
        x[..., 3] = r3
        x[..., 4] = (r3 * _AHEAD / 6)[:, None]
        x[..., 5] = r7
        x[..., 6] = tail * _DECAY_3H
        x[..., 7] = tail * _DECAY_12H
        weekday = np.flatnonzero(kinds < 6)  # Monday .. Saturday; Sundays, holidays the base
        x[weekday, :, 8 + kinds[weekday]] = 1.0
        x[..., 14] = (grid.holiday[days] & (kinds == 6)).astype(np.float64)[:, None]
        x[closed, :, 15] = grid.values[week_before[closed]] / base[closed] - 1
        x[..., 16] = mean6 / base - 1
    x[~np.isfinite(x)] = 0.0
    np.clip(x[..., 15:], -MAX_DEVIATION, MAX_DEVIATION, out=x[..., 15:])
    x.flags.writeable = False
    base.flags.writeable = False
    return x, base


_AHEAD = np.arange(DAYS_AHEAD)
# The last evening's deviation decays with the hours after the issue, per day ahead (each
# day's 24 hours computed as its own array, as the features always were).
_DECAY_3H = np.stack([np.exp(-(k * 24 + np.arange(24)) / 3.0) for k in range(DAYS_AHEAD)])
_DECAY_12H = np.stack([np.exp(-(k * 24 + np.arange(24)) / 12.0) for k in range(DAYS_AHEAD)])


@dataclass(slots=True)
class RidgeLearner:
    """Online ridge regression of a day's relative deviation from its profile.

    ``gram_`` and ``moment_`` are the forgotten sums of x x' and x z; ``rows_`` the rows
    learned. Pickled as the upper triangle of ``gram_`` (symmetric): about 1.3 KB.
    """

    gram_: np.ndarray
    moment_: np.ndarray
    rows_: int = 0

    def __getstate__(self) -> tuple[int, bytes | None, bytes, bool]:
        # Packed, exactly: nothing while nothing was learned (a node without flow), else the
        # upper triangle of the Gram matrix when it is symmetric (numpy computes x' x with
        # syrk, which makes it so) and the raw bytes of the arrays.
        gram = self.gram_
        if not gram.any() and not self.moment_.any() and not np.signbit(gram).any():
            return self.rows_, None, self.moment_.tobytes(), False
        if np.array_equal(gram, gram.T):
            return self.rows_, gram[_UPPER].tobytes(), self.moment_.tobytes(), True
        return self.rows_, gram.tobytes(), self.moment_.tobytes(), False

    def __setstate__(self, state: Any) -> None:
        if len(state) == 2:  # (None, {slot: value}): a snapshot of the release before packing
            for name, value in state[1].items():
                setattr(self, name, value)
            return
        rows, gram_b, moment_b, upper = state
        self.rows_ = rows
        self.moment_ = np.frombuffer(moment_b).copy()
        if gram_b is None:
            self.gram_ = np.zeros((N_FEATURES, N_FEATURES))
        elif upper:
            self.gram_ = np.zeros((N_FEATURES, N_FEATURES))
            self.gram_[_UPPER] = np.frombuffer(gram_b)
            self.gram_.T[_UPPER] = self.gram_[_UPPER]
        else:
            self.gram_ = np.frombuffer(gram_b).reshape(N_FEATURES, N_FEATURES).copy()

    @staticmethod
    def new() -> RidgeLearner:
        return RidgeLearner(np.zeros((N_FEATURES, N_FEATURES)), np.zeros(N_FEATURES))

    def learn_day(self, grid: Grid, day: int, first_issue: int) -> None:
        """Learn from closed grid day ``day`` as the target of the issues that covered it.

        Those of the 6 days before it and its own, at grid index >= ``first_issue``.
        """
        self.gram_ *= FORGET
        self.moment_ *= FORGET
        y = grid.values[day].astype(np.float64)
        for issue in range(max(first_issue, day - 6), day + 1):
            x, base = ridge_features(grid, issue, day - issue)
            with np.errstate(all="ignore"):
                z = y / base - 1
            ok = np.isfinite(z) & (base > 0) & (np.abs(z) < MAX_DEVIATION)
            if ok.any():
                xs = x[ok]
                self.gram_ += xs.T @ xs
                self.moment_ += xs.T @ z[ok]
                self.rows_ += int(ok.sum())

    def weights(self) -> np.ndarray:
        """The model's coefficients as learned so far, (N_FEATURES,)."""
        return np.linalg.solve(self.gram_ + RIDGE_LAMBDA * np.eye(N_FEATURES), self.moment_)

    def forecast(self, grid: Grid, w: np.ndarray | None = None) -> np.ndarray:
        """The ``DAYS_AHEAD`` days after the grid, (DAYS_AHEAD, 24), with ``weights()``."""
        w = self.weights() if w is None else w
        x, base = issue_features(grid, grid.days)
        # matmul takes the stack day by day (one product per day, as ridge_day does)
        z = np.clip(np.matmul(x, w), -MAX_DEVIATION, MAX_DEVIATION)
        return base * (1 + z)


def ridge_day(grid: Grid, issue: int, k: int, w: np.ndarray) -> np.ndarray:
    """Day ``k`` after the issue of the ridge forecast issued at grid index ``issue``.

    With the coefficients ``w`` it was issued with, the same values as
    ``RidgeLearner.forecast`` gave then (see ``seasonal_day``): a series keeps a pending
    forecast as its 17 coefficients.
    """
    x, base = ridge_features(grid, issue, k)
    z = np.clip(x @ w, -MAX_DEVIATION, MAX_DEVIATION)
    return base * (1 + z)
