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
    memo = grid.memo.setdefault(grid.first + before, {})
    key = (int(grid.types[day]), k, how)
    found = memo.get(key)
    if found is None:
        found = memo[key] = _profile(grid, before, day, k, how)
    return found  # type: ignore[return-value]


def _profile(grid: Grid, before: int, day: int, k: int, how: str) -> np.ndarray:
    start = max(0, before - LOOKBACK)
    usable = grid.usable[start:before]
    same = np.nonzero(usable & (grid.types[start:before] == grid.types[day]))[0][-k:]
    if same.size == 0:
        same = np.nonzero(usable)[0][-k:]
    if same.size == 0:
        return np.full(24, np.nan)
    rows = grid.values[start + same].astype(np.float64)
    counts = np.sum(~np.isnan(rows), axis=0)
    if how == "mean":
        out = np.nansum(rows, axis=0) / np.maximum(counts, 1)
    else:
        rows.sort(axis=0)  # NaN last: the median of the valid ones, per hour
        lo = np.maximum((counts - 1) // 2, 0)
        hi = np.maximum(counts // 2, 0)
        out = (rows[lo, _HOURS] + rows[hi, _HOURS]) / 2
    return np.where(counts > 0, out, np.nan)


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
    out = np.stack([profile(grid, n, n + k) for k in range(DAYS_AHEAD)])
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

    Returns them with the profile they are relative to. They depend only on the days before
    ``issue``, so they are kept in the memo: the day a forecast is issued computes them, and the
    days its targets close learn from the same ones (read-only arrays).
    """
    memo = grid.memo.setdefault(grid.first + issue, {})
    found = memo.get(("ridge", k))
    if found is None:
        found = memo[("ridge", k)] = _ridge_features(grid, issue, k)
    return found  # type: ignore[return-value]


def _ridge_features(grid: Grid, issue: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    base = profile(grid, issue, issue + k)
    mean6 = profile(grid, issue, issue + k, K_MEAN, "mean")
    r1, r3, r7, tail = _issue_facts(grid, issue)
    horizon = k * 24 + np.arange(24)  # hours after the issue
    day = issue + k
    week_before = day - 7
    x = np.zeros((24, N_FEATURES))
    with np.errstate(all="ignore"):
        x[:, 0] = 1.0
        x[:, 1] = r1
        x[:, 2] = r1 * k / 6
        x[:, 3] = r3
        x[:, 4] = r3 * k / 6
        x[:, 5] = r7
        x[:, 6] = tail * np.exp(-horizon / 3.0)
        x[:, 7] = tail * np.exp(-horizon / 12.0)
        kind = int(grid.types[day])
        if kind < 6:
            x[:, 8 + kind] = 1.0  # Monday .. Saturday; Sundays and holidays are the base
        x[:, 14] = float(grid.holiday[day] and kind == 6)
        if 0 <= week_before < issue:  # a closed day (not so for the 8th day ahead)
            x[:, 15] = grid.values[week_before] / base - 1
        x[:, 16] = mean6 / base - 1
    x[~np.isfinite(x)] = 0.0
    np.clip(x[:, 15:], -MAX_DEVIATION, MAX_DEVIATION, out=x[:, 15:])
    x.flags.writeable = False
    base.flags.writeable = False
    return x, base


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
        out = np.empty((DAYS_AHEAD, 24))
        issue = grid.days
        for k in range(DAYS_AHEAD):
            out[k] = ridge_day(grid, issue, k, w)
        return out


def ridge_day(grid: Grid, issue: int, k: int, w: np.ndarray) -> np.ndarray:
    """Day ``k`` after the issue of the ridge forecast issued at grid index ``issue``.

    With the coefficients ``w`` it was issued with, the same values as
    ``RidgeLearner.forecast`` gave then (see ``seasonal_day``): a series keeps a pending
    forecast as its 17 coefficients.
    """
    x, base = ridge_features(grid, issue, k)
    z = np.clip(x @ w, -MAX_DEVIATION, MAX_DEVIATION)
    return base * (1 + z)
