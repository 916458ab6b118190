"""A district meter's 15-minute volumes, judged and, where missing or untrusted, estimated.

The water balance must not believe a meter that went silent or froze: a silent inflow meter
would fake a negative NRW, a frozen consumption meter a leak. So every 15-minute volume of a
balance meter is judged from its ``kpi_15m`` row (``meter_windows``):

- *measured*: a volume the balance takes as it is;
- *suspect*: a row exists but its volume cannot be trusted: a reading in it was flagged by
  validation (mean quality under ``QUALITY_MIN``: a spike, a stuck value, a removed value), or
  its flow is flat at a value other than 0 (``n >= 2`` and min == max: a frozen register
  repeats itself exactly; validation flags STUCK only after ``stuck_min_s``), or a totalizer
  that did not move while the flow says water went through;
- *missing*: no row, or (a totalizer meter) no totalizer reading in the window.

``estimate`` turns a meter's windows into volumes: measured ones as they are; for a totalizer
meter, the volume of the first reading after missing windows is the whole gap's (the register
kept counting), so it is *spread* over the gap by the meter's pattern and the total stays
exact; everything else is *filled* from the meter's own pattern (``MeterProfile``): its
hour-of-week volume, else its hour-of-day volume of the same day type, scaled to its recent
level (the mean of the two once a week has been seen). A meter with no pattern yet cannot
be filled: its volume stays unknown (NaN).

Times: windows are ``window_start // 15 min`` (UTC), as ``kpi_15m`` has them; a window belongs
to the local hour and local day of its start.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

from dataflows.model import US_PER_DAY, US_PER_HOUR, US_PER_MIN
from dataflows.tables import TableRows

WINDOW_US = 15 * US_PER_MIN
WINDOWS_PER_HOUR = US_PER_HOUR // WINDOW_US
#: Window status codes.
MISSING, MEASURED, SUSPECT = 0, 1, 2
#: A window whose readings' mean quality is below this holds a flagged reading (validation's
#: penalties: spike or stuck 0.5, removed value 0.4; one of three readings gives 0.83).
QUALITY_MIN = 0.9
#: A totalizer that did not move while the flow meter says at least this much (L/s) went through
#: is frozen.
FROZEN_FLOW_LPS = 0.05
#: Weight of the newest hour in a weekly slot (seen once a week), in a daily slot (once a day),
#: and in the level (every hour: about a day's memory).
ALPHA_WEEK = 0.5
ALPHA_DAY = 0.25
ALPHA_LEVEL = 1.0 / 24.0


@dataclass(slots=True)
class MeterWindows:
    """What one ``kpi_15m`` emission says of a meter's windows (the latest row wins)."""

    node_id: str
    role: str
    window: np.ndarray  # int64 window index
    volume: np.ndarray  # m3, NaN when none
    status: np.ndarray  # int8 MISSING / MEASURED / SUSPECT
    totalizer: np.ndarray  # bool: the window holds a totalizer reading
    pressure: np.ndarray  # mean pressure (bar), NaN when none


_JUDGED = ("volume_m3", "n", "flow_rate_min", "flow_rate_max", "flow_rate_avg", "total_flow_max",
           "quality_avg", "pressure_avg")


def meter_windows(node_id: str, role: str, kpi_15m: TableRows) -> MeterWindows:
    """Judge a meter's ``kpi_15m`` rows (see the module docstring).

    >>> from dataflows.tables import frame
    >>> rows = frame("kpi_15m", {"node_id": ["m"] * 3, "window_start": [0, 900e6, 1800e6],
    ...     "n": [3, 3, 3], "volume_m3": [1.0, 2.0, None], "quality_avg": [1.0, 0.5, 1.0],
    ...     "flow_rate_min": [1.0, 2.0, 1.0], "flow_rate_max": [1.2, 2.0, 1.1]})
    >>> meter_windows("m", "inflow", rows).status.tolist()
    [1, 2, 0]
    """
    # Column data as the windows made it, without a polars frame: a call per node batch.
    window = kpi_15m.array("window_start").astype(np.int64) // WINDOW_US
    volume, n, fmin, fmax, favg, total, quality, pressure = (
        kpi_15m.array(c).astype(np.float64) for c in _JUDGED
    )
    totalizer = np.isfinite(total)
    with np.errstate(invalid="ignore"):
        flat = (n >= 2) & (fmin == fmax) & (fmin != 0.0)
        flagged = quality < QUALITY_MIN
        frozen_total = totalizer & (volume == 0.0) & (favg > FROZEN_FLOW_LPS)
    suspect = np.where(totalizer, frozen_total, flagged | flat)
    status = np.where(np.isnan(volume), MISSING, np.where(suspect, SUSPECT, MEASURED))
    return MeterWindows(
        node_id, role, window, volume.copy(), status.astype(np.int8), totalizer, pressure.copy()
    )


# -- local calendar -----------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _offset_us(tz: str, utc_hour: int) -> int:
    """The zone's UTC offset (µs) during a UTC hour (zones change offset on whole hours)."""
    moment = dt.datetime.fromtimestamp(utc_hour * 3600, dt.UTC).astimezone(ZoneInfo(tz))
    offset = moment.utcoffset()
    assert offset is not None
    return offset // dt.timedelta(microseconds=1)


def local_day(window: int, tz: str) -> int:
    """The local day (days since 1970-01-01) of a window's start."""
    start = window * WINDOW_US
    return (start + _offset_us(tz, start // US_PER_HOUR)) // US_PER_DAY


@lru_cache(maxsize=4096)
def day_start_us(day: int, tz: str) -> int:
    """UTC start (µs) of a local day (days since 1970-01-01)."""
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    start = dt.datetime.combine(date, dt.time(), ZoneInfo(tz))
    return (start - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def day_windows(day: int, tz: str) -> tuple[int, int]:
    """The windows of a local day: ``[first, end)`` (a window belongs to its start's day)."""
    return -(-day_start_us(day, tz) // WINDOW_US), -(-day_start_us(day + 1, tz) // WINDOW_US)


@dataclass(slots=True)
class Clock:
    """Local time of each window: day, hour of day, hour of week, the local hour's UTC start."""

    day: np.ndarray  # local day, days since 1970-01-01
    hour: np.ndarray  # 0..23
    weekend: np.ndarray  # bool (Saturday, Sunday)
    how: np.ndarray  # hour of week, Monday 00:00 = 0
    hour_start: np.ndarray  # µs UTC of the local hour the window is in


def clock(window: np.ndarray, tz: str) -> Clock:
    """The local calendar of windows (one zone lookup per distinct UTC hour, cached)."""
    start = window * WINDOW_US
    utc_hour = start // US_PER_HOUR
    hours, inverse = np.unique(utc_hour, return_inverse=True)
    offsets = np.array([_offset_us(tz, int(h)) for h in hours], dtype=np.int64)[inverse]
    local = start + offsets
    day = local // US_PER_DAY
    hour = (local % US_PER_DAY) // US_PER_HOUR
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday
    return Clock(
        day=day,
        hour=hour,
        weekend=weekday >= 5,
        how=weekday * 24 + hour,
        hour_start=start - local % US_PER_HOUR,
    )


@lru_cache(maxsize=512)
def _day_clock(day: int, tz: str) -> Clock:
    """``clock`` of a local day's windows, computed once (read-only arrays, shared)."""
    first, end = day_windows(day, tz)
    c = clock(np.arange(first, end, dtype=np.int64), tz)
    for f in _CLOCK_FIELDS:
        getattr(c, f).flags.writeable = False
    return c


_CLOCK_FIELDS = tuple(f.name for f in fields(Clock))


def span_clock(origin: int, length: int, tz: str) -> Clock:
    """``clock`` of the ``length`` windows from ``origin``, the first window of a local day.

    The same values as ``clock(origin + np.arange(length), tz)``, from the days' cached clocks
    (a district's span is rebuilt every time a day closes or its rows are written). The
    arrays may be read-only views: not to be written.
    """
    day = local_day(origin, tz)
    parts = [_day_clock(day, tz)]
    have = parts[0].day.size
    while have < length:
        day += 1
        parts.append(_day_clock(day, tz))
        have += parts[-1].day.size
    if len(parts) == 1:
        c = parts[0]
        return Clock(c.day[:length], c.hour[:length], c.weekend[:length], c.how[:length],
                     c.hour_start[:length])
    return Clock(*(np.concatenate([getattr(p, f) for p in parts])[:length]
                   for f in _CLOCK_FIELDS))


# -- the meter's own pattern ----------------------------------------------------------------------


#: Per hour of the week (Monday 00:00 = 0), its slot in ``MeterProfile.hod_`` flattened (day
#: type x hour of day), and the other day type's slot for the same hour.
_HOW_HOUR = np.arange(168) % 24
_HOW_WEEKEND = (np.arange(168) // 24 >= 5).astype(np.int64)
_DAILY_SLOT = _HOW_WEEKEND * 24 + _HOW_HOUR
_OTHER_SLOT = (1 - _HOW_WEEKEND) * 24 + _HOW_HOUR
#: A new profile's slots (copied: np.full costs more than a copy, and every meter has one).
_NOTHING_HOW = np.full(168, np.nan)
_NOTHING_HOD = np.full((2, 24), np.nan)


class MeterProfile:
    """A meter's hourly volume by hour of week and by hour of day (weekday, weekend), and level.

    Learned only from whole measured hours of closed days, in time order, so the pattern is the
    same whatever order the stream came in. ``level_`` holds exponentially weighted sums of the
    actual and the expected volume of each kind (weekly, daily): their ratio scales the pattern
    to the meter's recent level (sums, not ratios, so a near-zero night hour cannot blow it up).
    Pickles to about 2 KB.
    """

    # _week: the expected volume per hour of the week, worked out when first needed after
    # learning (a district's rows are written every hour, its meters learn once a day); not
    # pickled, unset in a profile unpickled.
    __slots__ = ("how_", "hod_", "level_", "_week")

    def __init__(self) -> None:
        self.how_ = _NOTHING_HOW.copy()
        self.hod_ = _NOTHING_HOD.copy()
        self.level_ = np.zeros((2, 2))  # (weekly, daily) x (actual, expected)
        self._week: np.ndarray | None = None

    def __getstate__(self) -> tuple[None, dict[str, np.ndarray]]:
        # What a profile always pickled to (the slots' default): what it learned.
        return None, {"how_": self.how_, "hod_": self.hod_, "level_": self.level_}

    def copy(self) -> MeterProfile:
        new = MeterProfile.__new__(MeterProfile)
        new.how_, new.hod_, new.level_ = self.how_.copy(), self.hod_.copy(), self.level_.copy()
        new._week = None
        return new

    def hourly(self, c: Clock) -> np.ndarray:
        """Expected volume (m3) of the local hour of each window; NaN with no pattern yet."""
        week: np.ndarray | None = getattr(self, "_week", None)
        if week is None:
            week = self._week = self._hourly_of_week()
        return week[c.how]

    def _hourly_of_week(self) -> np.ndarray:
        """``hourly`` per hour of the week (day type and hour of day follow from it)."""
        if np.isnan(self.hod_).all():
            # Nothing learned yet (every learned hour sets a daily slot): NaN whatever the level.
            return np.full(168, np.nan)
        hod = self.hod_.ravel()
        daily, other = hod[_DAILY_SLOT], hod[_OTHER_SLOT]
        daily = np.where(np.isnan(daily), other, daily)
        if self.level_[0, 1] <= 0:
            return daily * self._level(1)  # no week compared yet: the weekly level is unknown
        # Last week's same hour and the recent days' same hour, each at its level: their mean
        # halves the noise of one past day (measured on the simulator: 2.3 % rms on a meter's
        # filled day against 2.8 % for the weekly slot alone).
        weekly = self.how_
        both = (weekly * self._level(0) + daily * self._level(1)) / 2
        return np.where(np.isnan(weekly), daily * self._level(1), both)

    def _level(self, kind: int) -> float:
        actual, expected = self.level_[kind]
        return float(actual / expected) if expected > 0 else 1.0

    def learn(
        self, how: np.ndarray, weekend: np.ndarray, hour: np.ndarray, volume: np.ndarray
    ) -> None:
        """Take whole measured hours (m3), in time order."""
        # On Python floats (the same IEEE operations as on the arrays' float64), written back
        # once: numpy scalar arithmetic costs ~20 µs an hour, and a closing day learns 24 hours
        # of every meter.
        how_, hod = self.how_.tolist(), self.hod_.tolist()
        level = self.level_.tolist()  # [[weekly actual, expected], [daily actual, expected]]
        hours = zip(how.tolist(), weekend.tolist(), hour.tolist(), volume.tolist(), strict=True)
        for h, we, hd, v in hours:
            d = int(we)
            for lv, slot in ((level[0], how_[h]), (level[1], hod[d][hd])):
                if not math.isnan(slot):
                    lv[0] += ALPHA_LEVEL * (v - lv[0])
                    lv[1] += ALPHA_LEVEL * (slot - lv[1])
            old = how_[h]
            how_[h] = v if math.isnan(old) else old + ALPHA_WEEK * (v - old)
            old = hod[d][hd]
            hod[d][hd] = v if math.isnan(old) else old + ALPHA_DAY * (v - old)
        self.how_[:] = how_
        self.hod_[:] = hod
        self.level_[:] = level
        self._week = None


def hour_starts(c: Clock) -> np.ndarray:
    """Index of the first window of each local hour of ``c``."""
    return np.flatnonzero(np.concatenate(([True], c.hour_start[1:] != c.hour_start[:-1])))


def measured_hours(
    measured: np.ndarray, volume: np.ndarray, c: Clock, starts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Index (first window) and volume of the local hours whose every window is measured.

    ``measured``, ``volume`` and ``c`` cover whole local hours, in time order; ``starts`` is
    ``hour_starts(c)`` when the caller has it.
    """
    if starts is None:
        starts = hour_starts(c)
    good = np.add.reduceat(measured.astype(np.int64), starts)
    size = np.diff(starts, append=measured.size)
    # A normal hour has 4 windows; the repeated autumn hour 8, taken as two hours' worth.
    whole = (good == size) & (size >= WINDOWS_PER_HOUR)
    vol = np.add.reduceat(np.where(measured, volume, 0.0), starts)
    per_hour = vol * WINDOWS_PER_HOUR / size
    return starts[whole], per_hour[whole]


# -- estimating a meter's volumes ---------------------------------------------------------------


@dataclass(slots=True)
class Estimate:
    """A meter's volume per window, and which of it is filled from the pattern."""

    volume: np.ndarray  # m3, NaN: unknown (missing, and no pattern to fill it)
    filled: np.ndarray  # bool: the volume is the pattern's
    measured: np.ndarray  # bool: the window's own measured volume (what the pattern learns)
    spreads: list[tuple[int, int]]  # (first, carrier) of each totalizer gap spread


def estimate(
    volume: np.ndarray,
    status: np.ndarray,
    totalizer: np.ndarray,
    profile: MeterProfile,
    c: Clock,
    *,
    is_totalizer: bool,
    counted_before: bool,
    since: int = 0,
) -> Estimate:
    """Volumes of a meter's open windows (see the module docstring).

    ``counted_before``: the meter reported before the first of these windows, so a totalizer
    reading after missing windows at the start carries their volume too. ``since``: the index
    of the meter's first window ever; before it the meter was not in service (volume 0).
    """
    if is_totalizer:
        # Flow readings without a totalizer reading add no volume: the next reading carries it.
        status = status.copy()
        status[(status != MISSING) & ~totalizer] = MISSING
    filled = status != MEASURED
    measured = ~filled
    out = np.where(measured, volume, np.nan)
    spreads: list[tuple[int, int]] = []
    # The pattern only where something is filled (or spread) from ``since`` on: before it the
    # volume is 0 whatever the pattern says.
    if is_totalizer or filled[since:].any():
        expected = profile.hourly(c) / WINDOWS_PER_HOUR
        if is_totalizer:
            spreads = _spread_lumps(
                out, filled, measured, volume, status, expected, counted_before
            )
        out = np.where(filled, expected, out)
    if since > 0:
        out[:since], filled[:since], measured[:since] = 0.0, False, False
    return Estimate(out, filled, measured, spreads)


def _spread_lumps(
    out: np.ndarray,
    filled: np.ndarray,
    measured: np.ndarray,
    volume: np.ndarray,
    status: np.ndarray,
    expected: np.ndarray,
    counted_before: bool,
) -> list[tuple[int, int]]:
    """Spread the volume a totalizer carried over a gap across the gap, by the pattern."""
    spreads = []
    missing = status == MISSING
    # Runs of missing windows followed by a measured one.
    after = np.flatnonzero(~missing[1:] & missing[:-1]) + 1
    for end in after.tolist():
        if status[end] != MEASURED:
            continue
        start = end
        while start > 0 and missing[start - 1]:
            start -= 1
        if start == 0 and not counted_before:
            continue  # the meter's first reading: it carried nothing
        weights = expected[start : end + 1]
        if not np.all(np.isfinite(weights)) or weights.sum() <= 0:
            weights = np.ones(end + 1 - start)
        out[start : end + 1] = volume[end] * weights / weights.sum()
        filled[start : end + 1] = False
        measured[end] = False  # a gap's volume, not the window's own
        spreads.append((start, end))
    return spreads
