"""Building blocks of anomaly scoring (``dataflows.anomaly``): constants, local time, kernels.

What the per-node scorer (``NodeScorer``) and its incident tracking share and what holds no
state: the scored measurements and their noise floors, the column layout of the scorer's
tables and sums, the zone's UTC offsets (cached per zone and UTC day), the squashing of a
robust z into a score and the run lengths of a mask. The design is in ``dataflows.anomaly``.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

from dataflows.model import US_PER_DAY, US_PER_HOUR, US_PER_S, Flag

#: Measurements scored by default: the hydraulic ones...
SCORED: tuple[str, ...] = ("flow_rate", "pressure", "level")
#: ...and those of a node whose role (network file) is ``quality``: the state holds tables per
#: scored measurement the node reports, so each node scores only its own kind.
SCORED_QUALITY: tuple[str, ...] = (
    "chlorine", "ph", "turbidity", "conductivity", "temperature", "redox"
)
#: Smallest scale per measurement (canonical units): below it, the noise is the sensor's
#: resolution, and a z-score against a near-zero spread would call every tick an anomaly.
ABS_FLOOR: dict[str, float] = {
    "flow_rate": 0.05, "pressure": 0.02, "level": 0.01,
    "chlorine": 0.02, "ph": 0.02, "turbidity": 0.05, "conductivity": 2.0, "temperature": 0.1,
    "redox": 2.0,
}
_DEFAULT_FLOOR = 0.01
#: Mean absolute deviation to standard deviation, for normal noise.
_MAD_TO_SD = 1.2533
# Flag masks as plain ints: an IntFlag operation costs a Python call per batch.
_NOT_LEARNED = int(Flag.STUCK | Flag.SPIKE | Flag.OUT_OF_ORDER)
_FLAGGED = int(Flag.STUCK | Flag.SPIKE)
# Columns of the per-slot tables: location, scale (mean absolute deviation), blocks seen.
_LOC, _DEV, _NB = 0, 1, 2
# Columns of the pending sums per hour-of-day: readings usable, total weight, weighted sum,
# weighted sum of squares, weighted absolute deviation from the weekly and the daily location.
_P_N, _P_W, _P_X, _P_XX, _P_DW, _P_DD = range(6)
# Columns of the pending global sums: the same, deviation from the global location last.
_G_N, _G_W, _G_X, _G_XX, _G_D = range(5)
# Planes of the terms ``_score_block`` sums: the pending columns, then the deviation from the
# global location; the global sums take theirs in the order of ``_G_*``.
_W_GD = 6
_GLOB_PLANES = np.array([_P_N, _P_W, _P_X, _P_XX, _W_GD])
# Daily slot of each hour-of-week slot: weekday hours 0-23, weekend hours 24-47.
_HOD_SLOT = np.arange(168) % 24 + 24 * (np.arange(168) // 24 >= 5)


@lru_cache(maxsize=16)
def _plane_bins(ka: int) -> np.ndarray:
    """``bincount`` bin of plane c, measurement p, hour 0: (c * ka + p) * 24, shape (6, 1, ka)."""
    out = (np.arange(6)[:, None, None] * ka + np.arange(ka)[None, None, :]) * 24
    out.setflags(write=False)
    return out


@lru_cache(maxsize=4096)
def _day_offsets_s(tz: str, utc_day: int) -> np.ndarray:
    """The zone's UTC offset (s) at each hour of one UTC day: two lookups unless it changes."""
    zone = ZoneInfo(tz)

    def at(hour: int) -> int:
        when = datetime.fromtimestamp((utc_day * 24 + hour) * 3600, tz=zone)
        return int(when.utcoffset().total_seconds())  # type: ignore[union-attr]

    first, last = at(0), at(23)
    if first == last:
        # Offsets change at most twice a year, never back and forth within a day.
        out = np.full(24, first, dtype=np.int64)
    else:
        out = np.array([at(h) for h in range(24)], dtype=np.int64)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=4096)
def _day_offset_us(tz: str, utc_day: int) -> int | None:
    """The zone's UTC offset (µs) throughout one UTC day, or None on a day it changes."""
    table = _day_offsets_s(tz, utc_day)
    return int(table[0]) * US_PER_S if table[0] == table[-1] else None


def _local_us(ts: np.ndarray, tz: str) -> np.ndarray:
    """Local wall-clock time (µs) of each timestamp: ``ts + utc_offsets_us(ts, tz)``.

    A batch within one or two UTC days of one offset (nearly every batch; a local day spans two
    UTC days outside UTC) adds a number, without the per-reading gather.
    """
    d0, d1 = int(ts.min()) // US_PER_DAY, int(ts.max()) // US_PER_DAY
    if d1 - d0 <= 1:
        off = _day_offset_us(tz, d0)
        if off is not None and (d1 == d0 or _day_offset_us(tz, d1) == off):
            return ts + off
    return ts + utc_offsets_us(ts, tz)


def utc_offsets_us(ts: np.ndarray, tz: str) -> np.ndarray:
    """The zone's UTC offset (µs) at each timestamp (µs UTC), DST included.

    Offsets change on hour boundaries in every zone in use today; they are looked up once per
    UTC day and zone (cached), so a batch costs a table gather, not a lookup per hour.

    >>> int(utc_offsets_us(np.array([0], dtype=np.int64), "Europe/Rome")[0]) // 3_600_000_000
    1
    """
    if ts.size == 0:
        return np.zeros(0, dtype=np.int64)
    hours = ts // US_PER_HOUR
    d0, d1 = int(hours.min()) // 24, int(hours.max()) // 24
    if d1 - d0 > 64:  # a batch spanning months (a backfill): only its days in use
        days = np.unique(hours // 24)
        table = np.concatenate([_day_offsets_s(tz, int(d)) for d in days])
        pos = np.searchsorted(days, hours // 24) * 24 + hours % 24
        return table[pos] * US_PER_S
    table = np.concatenate([_day_offsets_s(tz, d) for d in range(d0, d1 + 1)])
    return table[hours - d0 * 24] * US_PER_S


def squash(z: np.ndarray, z0: float, z_scale: float) -> np.ndarray:
    """Map |robust z| to a score in [0, 1]: 0 inside ``z0``, rising towards 1 beyond.

    >>> squash(np.array([0.0, 3.0, 6.0]), 3.0, 1.5).round(3).tolist()
    [0.0, 0.0, 0.865]
    """
    return 1.0 - np.exp(-np.maximum(0.0, np.abs(z) - z0) / z_scale)


def _runs(mask: np.ndarray, carry: int) -> np.ndarray:
    """Length of the run of True ending at each position, the first run extended by ``carry``."""
    idx = np.arange(mask.size)
    last_false = np.maximum.accumulate(np.where(mask, -1 - carry, idx))
    return np.where(mask, idx - last_false, 0)
