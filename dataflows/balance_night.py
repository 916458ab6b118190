"""A district's minimum night flow (MNF), its 30-day trend, leak suspicion, and the ILI.

*MNF.* The district's system input (inflow minus outflow, gaps filled) per local hour; the
night's MNF is the lowest hourly mean flow (L/s) of the hours starting at 02:00, 03:00 and
04:00 local, the window ``kpi_daily.mnf`` uses for nodes (DESIGN.md, step 3). Hourly means,
not 15-minute ones: a district's MNF is the level of its night, not its quietest quarter hour.

*History.* ``NightFlow`` keeps the MNF of the last ``HISTORY_NIGHTS`` closed nights. The
baseline is the median of the nights of the same day type (weekday, weekend: weekend nights
carry more demand) not judged leaky, the spread 1.4826 x their median
absolute deviation (at least ``SPREAD_REL`` of the baseline, and ``SPREAD_MIN_LPS``); the trend
is the least-squares slope of every kept night and this one (L/s per day).

*LeakSuspected.* A night is *high* when its MNF exceeds the baseline by ``LEAK_K`` spreads and
by ``LEAK_REL`` of the baseline. ``LEAK_NIGHTS`` high nights in a row open a leak event
(``AnomalyEvent`` with ``node_id`` = the district, ``kind`` 'leak', ``measurement`` 'mnf'),
starting at 02:00 of the first of them; the first night back under the baseline plus
``CLOSE_K`` spreads closes it. The event's ``observed`` is the highest MNF of the leak,
``expected_lo`` the baseline and ``expected_hi`` the threshold, so the estimated leak rate is
``observed - expected_lo`` (L/s), also stored per night as ``district_balance.leak_lps``. High
nights do not enter the baseline: a leak does not teach the district that it is normal.

*ILI* (IWA): current annual real losses / unavoidable annual real losses, where
UARL (L/day) = (18 x Lm + 0.8 x Nc + 25 x Lp) x P, Lm mains km, Nc service connections, Lp km
of private pipe from the property line to the meter, P average pressure (m). A day's losses
are taken as real losses (no apparent-loss allowance) and scaled to 24 h on DST days.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from dataflows.anomaly import anomaly_id
from dataflows.model import US_PER_HOUR, AnomalyEvent
from dataflows.topology import DistrictAssets

NIGHT_HOURS = (2, 3, 4)  # local hours whose start is in the night window 02:00-05:00
NIGHT_US = 3 * US_PER_HOUR
HISTORY_NIGHTS = 30
MIN_NIGHTS = 5  # weekday nights of history before a weekday night is judged
MIN_WEEKEND_NIGHTS = 3  # ...and weekend nights before a weekend night is
LEAK_K = 3.0
LEAK_REL = 0.05
LEAK_NIGHTS = 2
CLOSE_K = 1.5
SPREAD_REL = 0.02
SPREAD_MIN_LPS = 0.02
BAR_TO_M = 10.197  # metres of water column per bar


def _weekend(day: int) -> bool:
    """Saturday or Sunday (``day``: local days since 1970-01-01, a Thursday)."""
    return (day + 3) % 7 >= 5


def uarl_l_per_day(assets: DistrictAssets, pressure_m: float) -> float:
    """Unavoidable annual real losses per day (L/day) at an average pressure (m).

    >>> uarl_l_per_day(DistrictAssets(10.0, 1000, 2.0), 40.0)
    41200.0
    """
    per_m = 18.0 * assets.mains_km + 0.8 * assets.connections + 25.0 * assets.private_pipe_km
    return per_m * pressure_m


def ili(loss_m3: float, hours: float, assets: DistrictAssets | None, pressure_m: float) -> float:
    """The day's infrastructure leakage index; NaN without assets, pressure or losses."""
    if assets is None or not np.isfinite(pressure_m) or pressure_m <= 0 or not np.isfinite(loss_m3):
        return float("nan")
    uarl = uarl_l_per_day(assets, pressure_m)
    return loss_m3 * 1000.0 * (24.0 / hours) / uarl if uarl > 0 else float("nan")


@dataclass(slots=True)
class Night:
    """One night judged against the history before it."""

    day: int
    start_us: int  # 02:00 local of the night
    mnf: float  # L/s, NaN when the night hours are unknown
    baseline: float = float("nan")
    spread: float = float("nan")
    trend: float = float("nan")  # L/s per day
    high: bool = False
    leak_lps: float = float("nan")  # estimated leak rate while a leak is suspected


@dataclass(slots=True)
class NightFlow:
    """The district's closed nights and its open leak (picklable, under 2 KB)."""

    district: str
    days_: list[int] = field(default_factory=list)
    mnf_: list[float] = field(default_factory=list)
    high_: list[bool] = field(default_factory=list)
    run_: list[int] = field(default_factory=list)  # starts of high nights in a row, no leak yet
    leak_: AnomalyEvent | None = None  # the open leak
    leak_end_: int | None = None  # end of its last leaky night (µs)

    def copy(self) -> NightFlow:
        """A copy whose history lists are its own (the events are not changed in place)."""
        return replace(self, days_=list(self.days_), mnf_=list(self.mnf_),
                       high_=list(self.high_), run_=list(self.run_))

    def judge(self, day: int, start_us: int, mnf: float) -> Night:
        """A night against the history (nothing is learned: see ``commit``)."""
        # The district's open nights are judged again every time their rows are written (once
        # an hour), against a history that changes once a day: the fit and medians are cached
        # on the exact inputs (the MNFs by their bits).
        values = np.array(self.mnf_ + [mnf]).tobytes()
        trend, baseline, spread, high = _judged(
            day, tuple(self.days_), values, tuple(self.high_)
        )
        return Night(day, start_us, mnf, baseline, spread, trend, high)

    def commit(self, night: Night) -> list[AnomalyEvent]:
        """Learn a closed night; the leak event it opened, changed or closed, if any."""
        self.peek(night)
        events = self._events(night)
        self.days_.append(night.day)
        self.mnf_.append(night.mnf)
        # Nights of a leak stay out of the baseline.
        self.high_.append(night.high or np.isfinite(night.leak_lps))
        del self.days_[:-HISTORY_NIGHTS], self.mnf_[:-HISTORY_NIGHTS], self.high_[:-HISTORY_NIGHTS]
        return events

    def peek(self, night: Night) -> Night:
        """Set the night's leak rate if it is (in) a suspected leak; the state is unchanged."""
        if np.isnan(night.baseline):
            return night
        excess = night.mnf - night.baseline
        ongoing = self.leak_ is not None and excess >= CLOSE_K * night.spread
        opening = self.leak_ is None and night.high and len(self.run_) + 1 >= LEAK_NIGHTS
        if ongoing or opening:
            night.leak_lps = excess
        return night

    def _events(self, night: Night) -> list[AnomalyEvent]:
        if np.isnan(night.baseline):
            return []
        if self.leak_ is not None:
            if np.isfinite(night.leak_lps):  # still leaking
                self.leak_end_ = night.start_us + NIGHT_US
                if night.mnf > self.leak_.observed:
                    self.leak_ = self._leak(self.leak_.started_at, night, self.leak_.peak_score)
                    return [self.leak_]
                return []
            closed = replace(self.leak_, ended_at=self.leak_end_)
            self.leak_ = None
            return [closed]
        if not night.high:
            self.run_ = []
            return []
        self.run_.append(night.start_us)
        if len(self.run_) < LEAK_NIGHTS:
            return []
        self.leak_ = self._leak(self.run_[0], night, 0.0)
        self.leak_end_ = night.start_us + NIGHT_US
        self.run_ = []
        return [self.leak_]

    def _leak(self, started_at: int, night: Night, peak: float) -> AnomalyEvent:
        z = (night.mnf - night.baseline) / night.spread
        score = round(max(peak, float(1.0 - np.exp(-z / LEAK_K))), 6)
        return AnomalyEvent(
            anomaly_id=anomaly_id(self.district, "mnf", started_at),
            node_id=self.district,
            measurement="mnf",
            kind="leak",
            started_at=started_at,
            ended_at=None,
            peak_score=score,
            expected_lo=night.baseline,
            expected_hi=night.baseline + LEAK_K * night.spread,
            observed=night.mnf,
        )


@lru_cache(maxsize=8192)
def _judged(
    day: int, days_: tuple[int, ...], mnf_bits: bytes, high_: tuple[bool, ...]
) -> tuple[float, float, float, bool]:
    """Trend, baseline, spread and high of a night (``NightFlow.judge``).

    ``mnf_bits``: the float64 MNFs of the history, then the night's.
    """
    trend = baseline = spread = float("nan")
    values = np.frombuffer(mnf_bits, dtype=np.float64)
    history, mnf = values[:-1].tolist(), float(values[-1])
    days = np.array([*days_, day], dtype=np.float64)
    ok = np.isfinite(values)
    if ok.sum() >= MIN_NIGHTS and np.ptp(days[ok]) > 0:
        trend = float(np.polyfit(days[ok], values[ok], 1)[0])
    # Nights of the same day type only: weekend nights carry more demand than weekdays'.
    kind = _weekend(day)
    clean = np.array([
        m for d, m, h in zip(days_, history, high_, strict=True)
        if np.isfinite(m) and not h and _weekend(d) == kind
    ])
    if clean.size < (MIN_WEEKEND_NIGHTS if kind else MIN_NIGHTS) or not np.isfinite(mnf):
        return trend, baseline, spread, False
    base = float(np.median(clean))
    mad = float(np.median(np.abs(clean - base))) * 1.4826
    spread = max(mad, SPREAD_REL * abs(base), SPREAD_MIN_LPS)
    excess = mnf - base
    high = excess >= LEAK_K * spread and excess >= LEAK_REL * abs(base)
    return trend, base, spread, bool(high)
