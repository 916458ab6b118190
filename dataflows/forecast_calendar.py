"""The local calendar demand forecasts work on: local days and hours, day types, holidays.

Demand follows the local clock, so forecasts are computed on a grid of local days x 24 local
hours (DESIGN.md, "Records and units": times are UTC inside the system). A local day is an
integer, its proleptic Gregorian ordinal (``date.toordinal()``). In the autumn the repeated
hour falls into one local hour (its two UTC hours are averaged); in the spring the skipped
hour stays empty.

Day types: Monday=0 ... Sunday=6; a public holiday is a Sunday, since water use on a holiday
looks like a Sunday's. Italian public holidays by default (national ones, Easter Monday
included); a utility adds its own (the patron saint's day of the town) as ``extra``.

>>> is_holiday(date(2024, 4, 1))  # Easter Monday 2024
True
>>> day_type(date(2024, 12, 25).toordinal())  # Christmas, a Wednesday
6
>>> local_midnight_us(date(2024, 3, 31).toordinal(), "Europe/Rome")  # 2024-03-30T23:00Z
1711839600000000
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

from dataflows.model import US_PER_HOUR

#: Italian national public holidays on fixed dates (month, day).
_IT_FIXED = (
    (1, 1),  # Capodanno
    (1, 6),  # Epifania
    (4, 25),  # Liberazione
    (5, 1),  # Festa del lavoro
    (6, 2),  # Festa della Repubblica
    (8, 15),  # Ferragosto
    (11, 1),  # Ognissanti
    (12, 8),  # Immacolata
    (12, 25),  # Natale
    (12, 26),  # Santo Stefano
)
SUNDAY = 6


def easter_sunday(year: int) -> date:
    """Western Easter (the anonymous Gregorian algorithm).

    >>> easter_sunday(2025)
    datetime.date(2025, 4, 20)
    """
    a, b, c = year % 19, year // 100, year % 100
    d, e = b // 4, b % 4
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = c // 4, c % 4
    l = (32 + 2 * e + 2 * i - h - k) % 7  # noqa: E741 (the algorithm's own name)
    m = (a + 11 * h + 22 * l) // 451
    month, day = divmod(h + l - 7 * m + 114, 31)
    return date(year, month, day + 1)


@lru_cache(maxsize=512)
def _holidays(year: int, extra: tuple[str, ...]) -> frozenset[date]:
    days = {date(year, m, d) for m, d in _IT_FIXED}
    days.add(easter_sunday(year) + timedelta(days=1))  # Pasquetta
    for text in extra:
        days.update(_extra_day(text, year))
    return frozenset(days)


def _extra_day(text: str, year: int) -> list[date]:
    """'MM-DD' (every year) or 'YYYY-MM-DD' (once) as the day(s) of ``year`` it names."""
    parts = text.split("-")
    try:
        if len(parts) == 2:
            return [date(year, int(parts[0]), int(parts[1]))]
        if len(parts) == 3:
            day = date(int(parts[0]), int(parts[1]), int(parts[2]))
            return [day] if day.year == year else []
    except ValueError:
        pass
    raise ValueError(f"a holiday must be 'MM-DD' or 'YYYY-MM-DD', got {text!r}")


def is_holiday(day: date, extra: tuple[str, ...] = ()) -> bool:
    """Whether ``day`` is a public holiday (Italian calendar plus ``extra``)."""
    return day in _holidays(day.year, extra)


def day_type(ordinal: int, extra: tuple[str, ...] = ()) -> int:
    """Monday=0 ... Sunday=6, holidays counted as Sundays."""
    day = date.fromordinal(ordinal)
    return SUNDAY if is_holiday(day, extra) else day.weekday()


@lru_cache(maxsize=1024)
def day_types(first: int, n: int, extra: tuple[str, ...] = ()) -> np.ndarray:
    """``day_type`` of the ``n`` local days from ``first``, as a read-only int8 array.

    Cached: every series of a network asks for the same days when it closes one.
    """
    out = np.array([day_type(first + i, extra) for i in range(n)], dtype=np.int8)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=1024)
def holiday_flags(first: int, n: int, extra: tuple[str, ...] = ()) -> np.ndarray:
    """``is_holiday`` of the ``n`` local days from ``first``, as a read-only bool array."""
    out = np.array([is_holiday(date.fromordinal(first + i), extra) for i in range(n)])
    out.flags.writeable = False
    return out


@lru_cache(maxsize=4096)
def _offset_h(zone: str, utc_hour: int) -> int:
    """The zone's UTC offset, in whole hours (rounded down), at the UTC hour ``utc_hour``."""
    offset = datetime.fromtimestamp(utc_hour * 3600, UTC).astimezone(ZoneInfo(zone)).utcoffset()
    assert offset is not None  # a ZoneInfo always has one
    return int(offset // timedelta(hours=1))


def local_hours(ts_us: np.ndarray, zone: str) -> np.ndarray:
    """The local hour of each UTC instant, as hours since 1970-01-01 00:00 local time.

    Offsets are looked up once per UTC hour the batch spans (a live batch: one or two), or
    per distinct hour when it spans more than ``_SPAN_LOOKUP_H`` (a replay chunk).

    >>> ts = np.array([0, 3_600_000_000, 7_200_000_000 - 1])
    >>> local_hours(ts, "Europe/Rome").tolist()  # UTC+1 in January 1970
    [1, 2, 2]
    """
    utc_hour = ts_us // US_PER_HOUR
    if utc_hour.size == 0:
        return utc_hour
    first, last = int(utc_hour.min()), int(utc_hour.max())
    if last - first < _SPAN_LOOKUP_H:
        span = np.array([_offset_h(zone, h) for h in range(first, last + 1)], dtype=np.int64)
        return utc_hour + span[utc_hour - first]
    distinct, inverse = np.unique(utc_hour, return_inverse=True)
    offsets = np.array([_offset_h(zone, int(h)) for h in distinct], dtype=np.int64)
    return utc_hour + offsets[inverse]


#: Up to this many hours a batch spans, its offsets are looked up hour by hour, which costs
#: less than finding its distinct hours (np.unique sorts).
_SPAN_LOOKUP_H = 256


#: ``date(1970, 1, 1).toordinal()``: local hour index // 24 + this is the local day ordinal.
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@lru_cache(maxsize=4096)
def local_midnight_us(ordinal: int, zone: str) -> int:
    """The UTC instant (µs) at which the local day ``ordinal`` starts."""
    start = datetime.combine(date.fromordinal(ordinal), time(), ZoneInfo(zone))
    return int(start.astimezone(UTC).timestamp()) * 1_000_000


@lru_cache(maxsize=256)
def target_slots(issue_ordinal: int, hours: int, zone: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``hours`` UTC hours from the local midnight of ``issue_ordinal``.

    Returns their instants (µs) and their local slots (local days after the issue day * 24 +
    local hour), read-only: cached, every series of a network issuing at the same midnight.
    """
    start = local_midnight_us(issue_ordinal, zone)
    ts = start + np.arange(hours, dtype=np.int64) * US_PER_HOUR
    slots = local_hours(ts, zone) - (issue_ordinal - EPOCH_ORDINAL) * 24
    ts.flags.writeable = False
    slots.flags.writeable = False
    return ts, slots
