"""Online anomaly scoring of one node: a seasonal robust baseline, scores, and incidents.

Design (DESIGN.md, "The pipeline" step 4 and "Performance design"):

*Honest and online.* Every reading is scored only with state learned from readings of earlier
local days: the baseline is frozen for the day a reading belongs to and updated once, when the
first reading of a later day arrives. Within a day the readings of the day are accumulated in
small running sums (``pending_``), so the result does not depend on how the stream is cut into
batches: the same readings give the same scores and events with one batch or a thousand.
Freezing the baseline for a day costs nothing in accuracy (a seasonal profile moves over days
and weeks, not minutes) and makes a batch one vectorized pass per local day.

*Seasonal robust baseline.* For each scored measurement (``flow_rate``, ``pressure``, ``level``)
the node keeps a location and a scale per local hour-of-week slot (168, in ``settings.tz``, so
demand follows the clock people live by, DST included), per hour-of-day slot of weekdays and of
weekends (48), and one global pair. Location is an exponentially weighted mean of each slot's
hourly block means; scale is an exponentially weighted mean absolute deviation of the readings
from the slot's location *as it stood before the block*, so it measures how far a fresh reading
lands from the forecast, not only the noise within the hour. A slot is used once it has seen
enough blocks; until then the scorer falls back from hour-of-week to hour-of-day to global, and
before the global estimate has seen a whole day the score is 0 (neutral warm-up). A weekly slot
seen once already gives the location (last week's same hour beats the daily profile), with the
daily scale until it is warm. Weekly slots learn slowly (few blocks each), so the daily scale
serves as a floor for their scale (``hod_scale_share``): a weekly slot with two lucky quiet
weeks must not turn an ordinary Tuesday into an alarm.

*Score.* The robust z-score ``z = (x - location) / scale`` is squashed into [0, 1] by
``1 - exp(-max(0, |z| - z0) / z_scale)``: 0 up to ``z0`` scales (the ordinary band), 0.5 near
``z0 + 0.7 z_scale``, near 1 far outside. A reading's score is the maximum over its measurements;
readings flagged STUCK or SPIKE by validation score at least ``open_score`` (the flag is a
verdict, not a guess), and while a night-flow leak is open every reading scores at least the
leak's level (below).

*No poisoning.* A reading that scored ``>= learn_score`` enters the baseline with the small weight
``slow_weight``, and so do the flow readings of a day that began with a leak open; readings
flagged STUCK, SPIKE or OUT_OF_ORDER, and readings older than the day being learned, do not enter
it at all. So a leak or a burst does not teach the baseline that it is normal, yet a level shift
that persists for days (a repair, a new customer) is slowly absorbed instead of alarming forever.
Warm-up counts the blocks a slot has seen whatever their weight, so a slot whose first blocks
looked anomalous still warms up.

*Incidents with hysteresis.* Per measurement an incident opens when the score stays
``>= open_score`` for ``open_n`` consecutive readings, or at once for a single reading
``>= instant_score``; it closes after ``close_n`` consecutive readings below ``close_score``.
The id hashes (node, measurement, start), so a replay upserts the same events; an open event is
reported again in every batch that changes it. Kinds:

- ``leak``: judged on *night flow*, where a leak is not hidden by demand. For each local night
  the minimum night flow (MNF: the lowest hourly mean of ``night_hours``, 01-04 local) is
  compared by a robust z with the node's earlier nights of the same day type (weekday, weekend;
  an EW location and an EW mean absolute deviation, clipped Huber-like so a leaky night cannot
  widen the spread it is judged by, and learned from leaky nights only with ``slow_weight``).
  A night with ``z >= leak_z`` and a rise of at least ``leak_rel`` of the usual MNF opens a
  leak at the end of the window (its start: the night's first reading, or the start of the flow
  rise already reported, whose event is then upserted into the leak); the first clean night
  (``z < leak_close_z``) closes it. This finds leaks of a few % on district inflow meters,
  where a reading's z never leaves the band. Nothing is judged during a burst. A River model
  was considered (``river.stats.RollingQuantile`` of nightly MNF, ``river.anomaly`` on 15-min
  aggregates) and not used: one value per night needs no sketch, a three-float EW is exact,
  pickles to a few bytes, can down-weight a leaky night (a rolling window cannot) and keeps the
  verdict a plain, explainable robust z.
- ``burst``: a flow rise that is abrupt (its first loud reading scores ``>= burst_score``, or
  the flow stepped by ``>= burst_jump`` usual 5-min steps among the ``onset_n`` readings up to
  it) and large for the pipe (``>= burst_rel`` of the overall level); a pressure fall at the
  same node that starts during a flow burst or within an hour of it (before or after: judged
  by the fall's start, so the kind does not depend on how batches are cut); and an abrupt
  pressure fall anywhere (a main break drops the
  pressure of its whole district within minutes, and the simulator labels those falls on every
  pressure logger of the district as ``burst``). The usual step is an EW mean of |step| per
  local day, per measurement, frozen for the day like the rest of the baseline.
- ``pressure_drop``: a gradual pressure fall; ``high``/``low``: other excursions. A small flow
  rise while a leak is open is the leak showing at night, and is not reported twice.
- ``spike``: validation's SPIKE flag marks any large step at once (it cannot look ahead), so a
  burst's first reading, the step back at its end and any level shift carry it too. A spike is
  *far off and back*: a run of at most ``spike_max_n`` flagged readings whose next value returns
  within ``spike_return`` of the excursion to the level before. The event waits for that next
  reading (across batches); an unconfirmed flag is a step, left to the measurement's own
  incident. A short scored excursion (at most ``spike_max_n`` loud readings) is a spike too.
- ``stuck``: validation's STUCK flag, one event per flagged run.

*Speed.* A batch is a few vectorized passes per local day (a 1-day batch crosses local
midnight once): the fallbacks between weekly, daily and global slots are resolved once per day
into a (measurement x hour-of-week) table (a cache, not pickled), so scoring is one gather; the
day's sums for all measurements are six ``bincount`` calls; only the measurements the node
reports are touched; incident tracking is skipped for a measurement with nothing open and
nothing loud; UTC offsets are cached per zone and UTC day (two zone lookups a day, 24 on a DST
day). Measured with ``bench/eval_anomaly.py --seeds 1 2 3 --compare 1598a02`` (seed 1, 240 k
readings in 1-day batches of 5-min data, CPU time, same data in one run, on a shared 2-core
machine under load): 4.8 us per reading for the previous scorer, 4.6 for this one (3.6 vs 4.6
in a quieter run). The per-batch fixed cost of numpy calls (about 60 per batch) now dominates;
the 3 us goal is not reached.

*Figures* (``bench/eval_anomaly.py --seeds 1 2 3``, tuned on seeds 101 102), previous scorer
-> this one: leak P 0.63 -> 0.70, R 0.33 -> 0.89, median delay 33 h -> 12 h; burst P 0.71 ->
0.76, R 0.33 -> 0.39; spike P 0.47 -> 0.93 (877 -> 446 events for 420 labels), R 0.99; stuck
1.0/1.0; point ROC-AUC 0.60 -> 0.86, PR-AUC 0.34 -> 0.74. Bursts detected by an event of any
kind fell 0.72 -> 0.49: the burst steps that validation flagged were counted as spikes before;
small district-wide pressure falls (0.25-0.5 bar) mostly stay below ``open_score``.

State per node is a few small tables (the slot tables, the day's sums, the step and night
baselines), pickled packed by ``NodeScorer.__getstate__`` for the measurements the node reports
only, the slot tables compressed: about 2.8 KB per measurement (5.6 KB for a meter of flow and
pressure, 9-12 KB for a water-quality probe reporting six; ``bench/state_size.py``). Nothing in
it grows with the length of the stream.
"""

from __future__ import annotations

import hashlib
import inspect
import zlib
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from dataflows.model import (
    COL,
    MEASUREMENTS,
    US_PER_DAY,
    US_PER_HOUR,
    US_PER_S,
    AnomalyEvent,
    Flag,
    ReadingBatch,
)
from dataflows.packing import pack_counts, unpack_counts
from dataflows.settings import Settings

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
# Daily slot of each hour-of-week slot: weekday hours 0-23, weekend hours 24-47.
_HOD_SLOT = np.arange(168) % 24 + 24 * (np.arange(168) // 24 >= 5)
_GLOB_PLANES = np.array([_P_N, _P_W, _P_X, _P_XX, _W_GD])


@lru_cache(maxsize=16)
def _plane_bins(ka: int) -> np.ndarray:
    """``bincount`` bin of plane c, measurement p, hour 0: (c * ka + p) * 24, shape (6, 1, ka)."""
    out = (np.arange(6)[:, None, None] * ka + np.arange(ka)[None, None, :]) * 24
    out.setflags(write=False)
    return out


def anomaly_id(node_id: str, measurement: str, started_at: int) -> str:
    """Deterministic id of an incident: the same data always yields the same id.

    >>> anomaly_id("n1", "flow_rate", 0) == anomaly_id("n1", "flow_rate", 0)
    True
    >>> len(anomaly_id("n1", "flow_rate", 0))
    32
    """
    key = f"{node_id}\x1f{measurement}\x1f{started_at}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


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

    A batch of one UTC day with one offset (nearly every batch) adds a number, without the
    per-reading gather.
    """
    d0 = int(ts.min()) // US_PER_DAY
    if d0 == int(ts.max()) // US_PER_DAY:
        off = _day_offset_us(tz, d0)
        if off is not None:
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


@dataclass(slots=True)
class _Incident:
    """An incident being tracked on one measurement (mutable; lives in the scorer's state)."""

    measurement: str
    started_at: int
    last_hi_at: int  # last reading at or above the close threshold
    peak_score: float = 0.0
    peak_at: int = 0
    observed: float = float("nan")
    expected_lo: float = float("nan")
    expected_hi: float = float("nan")
    z_peak: float = 0.0  # signed z at the peak: its sign is the direction
    rel_peak: float = 0.0  # (observed - location) / |location| at the peak
    first_score: float = 0.0  # score of the reading that started the run
    n_hi: int = 0  # readings at or above the open threshold
    kind: str = "high"
    flagged: bool = False  # not from this measurement's scores: a flag or the night flow
    onset_up: float = 0.0  # largest step up (in usual steps) just before and at the start
    onset_down: float = 0.0  # the same, down
    in_leak: bool = False  # opened while a night-flow leak was open (see ``_visible``)

    def take_peak(self, score: float, at: int, x: float, lo: float, hi: float, z: float,
                  rel: float) -> None:
        """Record a reading as the new peak when it beats the current one."""
        if score > self.peak_score:
            self.peak_score, self.peak_at, self.observed = score, at, x
            self.expected_lo, self.expected_hi, self.z_peak, self.rel_peak = lo, hi, z, rel


@dataclass(slots=True)
class _Night:
    """The verdict on one night's minimum night flow."""

    start: int  # first reading of the night window
    mnf: float
    z: float
    lo: float
    hi: float
    leaky: bool
    clean: bool
    level: float  # score of the night's evidence, a floor for the leak's readings
    warm: bool
    leak_open: bool = False  # set when applied: a leak is open after this night


@dataclass(slots=True)
class _SpikeCand:
    """A run of SPIKE-flagged readings waiting for the reading after it."""

    started_at: int
    ended_at: int
    column: int
    ref: float  # the value before the run
    far: float  # the value of the run farthest from ref
    n: int
    peak_score: float


class NodeScorer:
    """Online anomaly scoring of one node; lives in a Bytewax stateful_map.

    Must pickle, and keeps < 20 KB of state per node. ``score`` gives a score in [0, 1] for every
    reading of a batch and the incidents the batch opened, changed or closed.

    >>> import numpy as np
    >>> from dataflows.model import ReadingBatch, empty_values, US_PER_HOUR
    >>> ts = np.arange(0, 3 * 24, dtype=np.int64) * US_PER_HOUR
    >>> values = empty_values(ts.size)
    >>> values[:, 0] = 10.0 + np.sin(np.arange(ts.size) / 3.0)
    >>> batch = ReadingBatch("n1", "doc", ts, values, np.zeros(ts.size, dtype=np.int64))
    >>> scores, events = NodeScorer("n1", Settings(tz="UTC")).score(batch)
    >>> float(scores[:24].max()), events
    (0.0, [])
    """

    def __init__(
        self,
        node_id: str,
        settings: Settings,
        *,
        measurements: tuple[str, ...] | None = None,
        z0: float = 3.0,
        z_scale: float = 1.5,
        open_score: float = 0.8,
        open_n: int = 3,
        instant_score: float = 0.97,
        close_score: float = 0.4,
        close_n: int = 6,
        learn_score: float = 0.5,
        slow_weight: float = 0.1,
        alpha_how: float = 0.25,
        alpha_hod: float = 1.0 / 7.0,
        alpha_glob: float = 1.0 / 7.0,
        warm_how: float = 2.0,
        warm_hod: float = 3.0,
        warm_glob: float = 1.0,
        hod_scale_share: float = 0.5,
        rel_floor: float = 0.02,
        burst_score: float = 0.9,
        burst_rel: float = 0.3,
        burst_jump: float = 6.0,
        onset_n: int = 12,
        spike_max_n: int = 2,
        spike_return: float = 0.5,
        night_hours: tuple[int, int] = (1, 4),
        night_min_n: int = 3,
        night_warm: float = 3.0,
        alpha_night: float = 1.0 / 7.0,
        night_rel_floor: float = 0.01,
        leak_z: float = 4.5,
        leak_rel: float = 0.02,
        leak_close_z: float = 1.5,
    ) -> None:
        self.node_id = node_id
        self.tz = settings.tz  # only the zone: the whole Settings (network) would bloat state
        if measurements is None:
            spec = settings.network.nodes.get(node_id)
            measurements = SCORED_QUALITY if spec and spec.role == "quality" else SCORED
        self.measurements = measurements
        self.z0 = z0
        self.z_scale = z_scale
        self.open_score = open_score
        self.open_n = open_n
        self.instant_score = instant_score
        self.close_score = close_score
        self.close_n = close_n
        self.learn_score = learn_score
        self.slow_weight = slow_weight
        self.alpha_how = alpha_how
        self.alpha_hod = alpha_hod
        self.alpha_glob = alpha_glob
        self.warm_how = warm_how
        self.warm_hod = warm_hod
        self.warm_glob = warm_glob
        self.hod_scale_share = hod_scale_share
        self.rel_floor = rel_floor
        self.burst_score = burst_score
        self.burst_rel = burst_rel
        self.burst_jump = burst_jump
        self.onset_n = onset_n
        self.spike_max_n = spike_max_n
        self.spike_return = spike_return
        self.night_hours = night_hours
        self.night_min_n = night_min_n
        self.night_warm = night_warm
        self.alpha_night = alpha_night
        self.night_rel_floor = night_rel_floor
        self.leak_z = leak_z
        self.leak_rel = leak_rel
        self.leak_close_z = leak_close_z
        self._cols = np.array([COL[m] for m in measurements], dtype=np.intp)
        self._floor = np.array([ABS_FLOOR.get(m, _DEFAULT_FLOOR) for m in measurements])
        self._flow_j = measurements.index("flow_rate") if "flow_rate" in measurements else None

        k = len(measurements)
        self.how_ = np.zeros((k, 168, 3), dtype=np.float32)
        self.hod_ = np.zeros((k, 48, 3), dtype=np.float32)  # weekday hours, then weekend hours
        self.glob_ = np.zeros((k, 3), dtype=np.float64)
        self.pending_ = np.zeros((k, 24, 6), dtype=np.float64)
        self.pending_glob_ = np.zeros((k, 5), dtype=np.float64)
        self.pending_day_: int | None = None  # local day (days since epoch) being accumulated
        # Steps: usual |step| per measurement (EW mean, -, days seen), the day's sums, the last
        # value, and the last onset_n - 1 normalised steps (for an incident's onset).
        self.step_ = np.zeros((k, 3), dtype=np.float64)
        self.step_sum_ = np.zeros((k, 2), dtype=np.float64)
        self.last_x_ = np.full(k, np.nan)
        self.jump_tail_ = np.zeros((k, max(onset_n - 1, 0)), dtype=np.float64)
        # Night flow: this night's hourly sums (sum, count), its first reading, whether it was
        # judged, and the nights' baseline per day type (weekday, weekend: loc, dev, nights).
        nh = night_hours[1] - night_hours[0]
        self.night_ = np.zeros((nh, 2), dtype=np.float64)
        self.night_start_: int | None = None
        self.night_done_ = False
        self.nbase_ = np.zeros((2, 3), dtype=np.float64)
        self.day_leak_ = False  # the pending day began after an anomalous night
        self.night_anom_ = False  # the nights say leak (hysteresis: leaky ... until clean)
        self.leak_level_prev_ = 0.0  # score floor of the open night-flow leak (0: none)
        self.spike_cand_: _SpikeCand | None = None  # a SPIKE run awaiting the next reading
        self._eff: np.ndarray | None = None  # the day's resolved slot table (``_effective``)
        # The day's usual step: warm, scale per measurement (``_steps``; a cache, not pickled).
        self._step_scale: tuple[np.ndarray, np.ndarray] | None = None
        # The slot tables packed for a snapshot, by the rows packed (``_pack_tables``): they
        # change once a day (``_commit``), snapshots come every batch. Not pickled.
        self._tables: tuple[bytes, tuple[str, bytes]] | None = None
        self.pending_dow_ = 0
        # Incident tracking per measurement, then one slot each for the flag-driven kinds.
        self.open_: dict[str, _Incident] = {}
        self.run_n_: dict[str, int] = dict.fromkeys(measurements, 0)
        self.run_start_: dict[str, int] = {}
        self.run_peak_: dict[str, _Incident] = {}
        self.last_values_ = np.full(len(MEASUREMENTS), np.nan)  # for telling what is stuck
        self.last_burst_: tuple[int, int] | None = None  # (start, end) of the latest flow burst

    # ------------------------------------------------------------------ public API

    def score(self, batch: ReadingBatch) -> tuple[np.ndarray, list[AnomalyEvent]]:
        """Score every reading of ``batch`` (aligned to it) and report the incidents it changed.

        Events are the current state of each incident the batch opened, updated or closed
        (``ended_at`` None while open).
        """
        n = len(batch)
        if n == 0:
            return np.zeros(0), []
        # A batch holds 1-20 readings: the cost is the count of numpy calls, not their size, so
        # the common case (no flags, one local day, every reading with every measurement) takes
        # the shortest path; each shortcut gives the same numbers as the general one.
        ts = batch.ts.astype(np.int64, copy=False)
        flags = batch.flags.astype(np.int64, copy=False) if batch.flags is not None else None
        k = len(self.measurements)
        x = batch.values[:, self._cols].astype(np.float64, copy=False)
        finite = np.isfinite(x)
        # Only the measurements this node reports cost anything: a flow meter is one column.
        act = np.nonzero(np.logical_or.reduce(finite, axis=0))[0]
        act_l = act.tolist()
        ka = len(act_l)
        # The same columns as a slice when they are adjacent (a view, not a copy, everywhere).
        ix = slice(act_l[0], act_l[-1] + 1) if ka and act_l[-1] - act_l[0] + 1 == ka else act
        xa, fa = x[:, ix], finite[:, ix]
        local_h = _local_us(ts, self.tz) // US_PER_HOUR
        day = local_h // 24
        hod = local_h % 24
        how = (day + 3) % 7 * 24 + hod  # hour of week from Monday 00:00 (day 0 was a Thursday)
        # A reading is learned with the day it belongs to; a reading of an earlier day than the
        # one being accumulated arrived too late to be learned, and is scored with today's state.
        start_day = day[0] if self.pending_day_ is None else self.pending_day_
        seg_day = np.maximum.accumulate(np.maximum(day, start_day))
        learnable = day == seg_day
        flagged: np.ndarray | None = None  # STUCK or SPIKE; None: no reading is
        if flags is not None and np.logical_or.reduce(flags != 0):
            learnable &= (flags & _NOT_LEARNED) == 0
            flagged = (flags & _FLAGGED) != 0
            if not np.logical_or.reduce(flagged):
                flagged = None

        # Steps between consecutive values of each measurement (carried across batches), in
        # units of the measurement's usual step: how abruptly an incident began.
        all_fin = bool(np.logical_and.reduce(fa, axis=None))  # no value missing
        raw = self._raw_steps(xa, fa, act, ix, all_fin)
        jump = np.zeros(raw.shape)

        zs = np.zeros((2, n, k))  # z, then score, per reading and measurement
        # Per reading and measurement: location, scale, weekly and daily location, global
        # location (``_effective``); NaN where not scored.
        ev = np.empty((n, k, 5))
        ev.fill(np.nan)
        verdicts: list[tuple[int, _Night]] = []
        fj = self._flow_j
        if seg_day[0] == seg_day[-1]:  # seg_day never decreases: one day
            edges = [0, n]
        else:
            edges = [0, *(np.nonzero(np.diff(seg_day))[0] + 1).tolist(), n]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            d = int(seg_day[lo])
            if self.pending_day_ is not None and d != self.pending_day_:
                v = self._judge_night()
                if v is not None:
                    verdicts.append((lo, v))
                self._commit()
            if self.pending_day_ != d:
                self.pending_day_ = d
                self.pending_dow_ = int((d + 3) % 7)
                self.night_done_ = False
                # Fixed for the whole day from the nights judged so far (not from the incidents,
                # which are tracked after this loop), so batch cuts cannot change what is learned.
                self.day_leak_ = self.night_anom_
            sl = slice(lo, hi)
            if ka:
                self._score_block(xa[sl], fa[sl], how[sl], act, ix, learnable[sl], hod[sl],
                                  zs[:, sl], ev[sl])
            if (fj is not None and not self.night_done_ and fj in act_l
                    and np.maximum.reduce(hod[sl]) >= self.night_hours[0]):
                # The night is judged at its first reading past the window (or at the next day).
                # Readings all before the window neither add to it nor end it: skipped above.
                hs = hod[sl]
                past = np.nonzero(hs >= self.night_hours[1])[0]
                use = learnable[sl] & finite[sl, fj] & (hs >= self.night_hours[0]) & (
                    hs < self.night_hours[1])
                upto = hi if past.size == 0 else lo + int(past[0])
                self._night_sums(x[lo:upto, fj], hod[lo:upto], use[: upto - lo], ts[lo:upto])
                if past.size:
                    v = self._judge_night()
                    if v is not None:
                        verdicts.append((upto, v))
            if ka:
                self._steps(raw, jump, learnable, sl, ix)

        z, scores_m = zs[0], zs[1]
        scores = np.maximum.reduce(scores_m, axis=1) if k else np.zeros(n)
        if flagged is not None:
            scores = np.where(flagged, np.maximum(scores, self.open_score), scores)
        changed: dict[tuple[str, int], _Incident] = {}
        tracked = set(act_l) | ({fj} if verdicts and fj is not None else set())
        for j in sorted(tracked):
            m = self.measurements[j]
            # Flagged readings are handled by the flag incidents below; for the measurement's
            # own incident they count as quiet, so a stuck stretch cannot fake a level shift.
            s = scores_m[:, j] if flagged is None else np.where(flagged, 0.0, scores_m[:, j])
            # The steps of the measurement's values (none if it has none in the batch).
            if j not in act_l:
                jump_j = np.zeros(0)
            else:
                p = act_l.index(j)
                jump_j = jump[:, p] if all_fin else jump[fa[:, p], p]
            if (m not in self.open_ and self.run_n_[m] == 0 and not (j == fj and verdicts)
                    and not np.logical_or.reduce(s >= self.open_score)):
                # Nothing open, nothing loud (the common case): no onset is needed, only the
                # last steps for the next batch's.
                self._keep_jump_tail(jump_j, j)
                continue
            onset = self._onset(jump_j, finite[:, j], j)
            lo_j, sig_j = ev[:, j, 0], ev[:, j, 1]
            # Size relative to the measurement's overall level (a burst is large for the pipe,
            # not just for the hour), for telling a burst from a leak.
            rel = (x[:, j] - lo_j) / np.maximum(np.abs(ev[:, j, 4]), self._floor[j])
            cols = (s, ts, x[:, j], lo_j - self.z0 * sig_j, lo_j + self.z0 * sig_j, z[:, j], rel,
                    onset)
            a = 0
            for at, v in verdicts if j == fj else []:
                self._track(m, *(c[a:at] for c in cols), changed=changed)
                self._apply_night(v, ts, at, changed)
                a = at
            self._track(m, *(c[a:] for c in cols), changed=changed)
        leak = self.open_.get("~leak")
        if verdicts or leak is not None:
            floor = np.zeros(n)
            a = 0
            lvl = self.leak_level_prev_
            for at, v in verdicts:
                floor[a:at] = lvl
                lvl = v.level if v.leak_open else 0.0
                a = at
            floor[a:] = lvl
            self.leak_level_prev_ = lvl
            # While a night-flow leak is open every reading of the node is part of it.
            scores = np.maximum(scores, floor)
        if flagged is not None or "~stuck" in self.open_ or self.spike_cand_ is not None:
            self._track_flags(flags if flags is not None else np.zeros(n, dtype=np.int64), ts,
                              batch.values, scores, changed)
        values = batch.values
        seen = np.isfinite(values)
        anyc = np.logical_or.reduce(seen, axis=0)
        if np.logical_and.reduce(anyc == seen[-1]):  # the last reading has every value seen
            np.copyto(self.last_values_, values[-1], where=seen[-1])
        elif np.logical_or.reduce(anyc):
            last = n - 1 - seen[::-1].argmax(axis=0)
            self.last_values_[anyc] = values[last[anyc], np.nonzero(anyc)[0]]
        out = [self._event(i) for i in changed.values() if self._visible(i)]
        return np.clip(scores, 0.0, 1.0), out

    def flush(self) -> list[AnomalyEvent]:
        """At the end of input: the incidents still open, as they stand (``ended_at`` None)."""
        return [self._event(i) for i in self.open_.values() if self._visible(i)]

    # ------------------------------------------------------------------ baseline

    def _effective(self) -> np.ndarray:
        """Per hour-of-week slot and measurement: location, scale, weekly, daily, global location.

        The state is frozen for a day, so the slot fallbacks are resolved once per day into
        this small table (a cache, rebuilt after each commit and never pickled), and scoring a
        batch is one gather of its hours from it.
        """
        if self._eff is not None:
            return self._eff
        k = len(self.measurements)
        eff = np.empty((168, k, 5))
        eff[..., 2] = self.how_[..., _LOC].T
        eff[..., 3] = self.hod_[:, _HOD_SLOT, _LOC].T
        if not np.logical_or.reduce(self.glob_[:, _NB] >= self.warm_glob):
            # Before the global estimate is warm: NaN location, and the score is 0 (neutral).
            # A new node's state, until its first day is learned: nothing else to resolve.
            eff[..., 0] = eff[..., 1] = eff[..., 4] = np.nan
            self._eff = eff
            return eff
        w = self.how_.astype(np.float64)  # (k, 168, 3)
        h = self.hod_[:, _HOD_SLOT].astype(np.float64)  # (k, 168, 3)
        g = self.glob_[:, None, :]
        how_ok = w[..., _NB] >= self.warm_how
        hod_ok = h[..., _NB] >= self.warm_hod
        glob_ok = g[..., _NB] >= self.warm_glob
        # A weekly slot seen once already knows this hour's level better than the daily profile,
        # but not yet its spread: the daily (or global) scale stands in until it is warm.
        how_seen = (w[..., _NB] >= 1) & (hod_ok | glob_ok)
        fallback_loc = np.where(hod_ok, h[..., _LOC], g[..., _LOC])
        fallback_dev = np.where(hod_ok, h[..., _DEV], g[..., _DEV])
        loc = np.where(how_seen, w[..., _LOC], fallback_loc)
        dev = np.where(
            how_ok,
            np.maximum(w[..., _DEV], self.hod_scale_share * h[..., _DEV]),
            np.where(how_seen, np.maximum(w[..., _DEV], fallback_dev), fallback_dev),
        )
        floor = np.maximum(self._floor[:, None], self.rel_floor * np.abs(g[..., _LOC]))
        sig = np.maximum(_MAD_TO_SD * dev, floor)
        # Before the global estimate is warm: NaN location, and the score is 0 (neutral).
        eff[..., 0] = np.where(glob_ok, loc, np.nan).T
        eff[..., 1] = np.where(glob_ok, sig, np.nan).T
        eff[..., 4] = np.where(glob_ok, g[..., _LOC], np.nan).T
        self._eff = eff
        return eff

    def __getstate__(self) -> tuple[object, ...]:
        """The state, packed (lossless): what the snapshot of every node costs.

        Only the parameters that differ from the defaults; nothing derived (``_eff``, a cache
        of the tables, is rebuilt on demand); the per-measurement tables only for the
        measurements the node has reported (a flow meter: one of three), compressed
        (``_pack_tables``, once per day); the day's pending sums only for the hours that have
        some; small arrays as raw bytes (a pickled array costs about 130 bytes besides its
        data).
        """
        params = {
            name: getattr(self, name)
            for name, default in _PARAM_DEFAULTS.items()
            if getattr(self, name) != default
        }
        # The measurements reported so far. Every per-measurement array is written only for
        # the measurements of a batch with a finite value (``act`` in ``score``), which
        # ``_raw_steps`` records in ``last_x_`` first: the other rows are as ``__init__``
        # made them, and ``__setstate__`` makes them so again.
        rows = np.flatnonzero(np.isfinite(self.last_x_))
        rows_b = rows.astype(np.uint8).tobytes()
        if self._tables is None or self._tables[0] != rows_b:
            self._tables = (rows_b, _pack_tables(self.how_[rows], self.hod_[rows]))
        pending = self.pending_[rows]
        hours = (pending != 0).any(axis=2) | np.signbit(pending).any(axis=2)
        small = np.concatenate(
            [getattr(self, name)[rows].ravel() for name in _ROW_ARRAYS]
            + [self.night_.ravel(), self.nbase_.ravel(), self.last_values_]
        )
        return (
            _STATE_VERSION,
            self.node_id,
            self.tz,
            _KNOWN_SETS.index(self.measurements)
            if self.measurements in _KNOWN_SETS
            else self.measurements,
            params,
            rows_b,
            self._tables[1],
            np.packbits(hours).tobytes(),
            _pack_pending(pending[hours]),
            small.tobytes(),
            tuple(getattr(self, name) for name in _PLAIN),
        )

    def __setstate__(self, state: Any) -> None:
        self._tables = None
        self._step_scale = None
        if isinstance(state, dict):  # a snapshot of the release before packing
            self.__dict__.update(state)
            self._eff = None  # its layout may be an older one: rebuilt on demand
            return
        if state[0] == 2:  # the tables as raw bytes and counts
            (_, node_id, tz, measurements, params, rows_b, how_b, how_nb, hod_b, hod_nb,
             hours_b, pending_b, small_b, plain) = state
        else:
            (_, node_id, tz, measurements, params, rows_b, tables, hours_b, pending_b, small_b,
             plain) = state
        if isinstance(measurements, int):
            measurements = _KNOWN_SETS[measurements]
        assert isinstance(params, dict) and isinstance(measurements, tuple)
        self.node_id, self.tz, self.measurements = node_id, tz, measurements
        for name, default in _PARAM_DEFAULTS.items():
            setattr(self, name, params.get(name, default))
        self._cols = np.array([COL[m] for m in measurements], dtype=np.intp)
        self._floor = np.array([ABS_FLOOR.get(m, _DEFAULT_FLOOR) for m in measurements])
        self._flow_j = measurements.index("flow_rate") if "flow_rate" in measurements else None
        self._eff = None
        k, nh = len(measurements), self.night_hours[1] - self.night_hours[0]
        rows = np.frombuffer(rows_b, dtype=np.uint8).astype(np.intp)
        ka = rows.size
        self.how_ = np.zeros((k, 168, 3), dtype=np.float32)
        self.hod_ = np.zeros((k, 48, 3), dtype=np.float32)
        if state[0] == 2:
            self.how_[rows, :, :_NB] = np.frombuffer(how_b, np.float32).reshape(ka, 168, _NB)
            self.how_[rows, :, _NB] = unpack_counts(how_nb).reshape(ka, 168)
            self.hod_[rows, :, :_NB] = np.frombuffer(hod_b, np.float32).reshape(ka, 48, _NB)
            self.hod_[rows, :, _NB] = unpack_counts(hod_nb).reshape(ka, 48)
        else:
            self.how_[rows], self.hod_[rows] = _unpack_tables(tables, ka)
        hours = np.unpackbits(np.frombuffer(hours_b, np.uint8), count=ka * 24)
        pending = np.zeros((ka, 24, 6))
        pending[hours.reshape(ka, 24).astype(bool)] = _unpack_pending(pending_b)
        self.pending_ = np.zeros((k, 24, 6))
        self.pending_[rows] = pending
        small = np.frombuffer(small_b)
        at = 0
        for name, width in zip(_ROW_ARRAYS, (3, 5, 3, 2, 1, max(self.onset_n - 1, 0)),
                               strict=True):
            full = np.full((k, width), np.nan) if name == "last_x_" else np.zeros((k, width))
            full[rows] = small[at : at + ka * width].reshape(ka, width)
            setattr(self, name, full if name != "last_x_" else full[:, 0].copy())
            at += ka * width
        for name, shape in (("night_", (nh, 2)), ("nbase_", (2, 3)),
                            ("last_values_", (len(MEASUREMENTS),))):
            size = int(np.prod(shape))
            setattr(self, name, small[at : at + size].reshape(shape).copy())
            at += size
        assert isinstance(plain, tuple)
        for name, value in zip(_PLAIN, plain, strict=True):
            setattr(self, name, value)

    def _score_block(self, xa: np.ndarray, fin: np.ndarray, how: np.ndarray, act: np.ndarray,
                     ix: np.ndarray | slice, learnable: np.ndarray, hod: np.ndarray,
                     zs_out: np.ndarray, ev_out: np.ndarray) -> None:
        """Score one day's readings of the measurements ``act``, then add them to its sums.

        ``xa`` and ``fin`` hold the values of ``act`` and where they are finite; ``ix`` selects
        the same rows of the state (``act`` or an equal slice). Scores come
        from the state frozen at the start of the day; outputs are written into the views
        ``zs_out`` (z, score) and ``ev_out`` (the day's table at each reading). One gather from
        the day's table serves scoring and learning.
        """
        e = self._effective()[how][:, ix]  # (n, ka, 5)
        loc, sig = e[..., 0], e[..., 1]
        ok = fin & np.isfinite(loc)
        z = np.where(ok, (xa - loc) / sig, 0.0)
        score = squash(z, self.z0, self.z_scale)
        if not (self.z0 >= 0.0 and self.z_scale > 0.0):  # else a z of 0 scores exactly 0.0
            score = np.where(ok, score, 0.0)
        zs_out[0][:, ix] = z
        zs_out[1][:, ix] = score
        ev_out[:, ix] = e

        # Learning: anomalous readings enter with a small weight, flagged ones not at all.
        use = learnable[:, None] & fin
        if not np.logical_or.reduce(use, axis=None):
            return
        wt = np.where(score >= self.learn_score, self.slow_weight, 1.0)
        if self.day_leak_ and self._flow_j is not None:
            wt[:, act == self._flow_j] = self.slow_weight  # a leaking day teaches little
        ka = act.size
        # The seven sums' terms as planes of one array (``_PLANES``): the hourly sums are one
        # ``bincount`` (it adds in reading order, per bin, as one per plane did), the global
        # ones one ``sum`` (equal, bit for bit, to a sum per plane).
        w = np.empty((7, xa.shape[0], ka))
        w[_P_N] = use
        w[_P_W] = np.where(use, wt, 0.0)
        xs = np.where(use, xa, 0.0)
        np.multiply(w[_P_W], xs, out=w[_P_X])
        np.multiply(w[_P_X], xs, out=w[_P_XX])
        # Cold slots have location 0 here: their deviation is replaced by the spread at commit.
        # The weekly and the daily location (``e[..., 2:4]``) in one go, then the global one.
        for planes, ref in ((w[_P_DW : _P_DD + 1], e[..., 2:4].transpose(2, 0, 1)),
                            (w[_W_GD], self.glob_[ix, _LOC][None, :])):
            np.subtract(xs, ref, out=planes)
            np.abs(planes, out=planes)
            planes *= w[_P_W]
        sums = np.bincount((_plane_bins(ka) + hod[None, :, None]).ravel(),
                           weights=w[:6].ravel(), minlength=6 * ka * 24)
        hourly = sums.reshape(6, ka, 24).transpose(1, 2, 0)
        self.pending_[ix] += hourly
        self.pending_glob_[ix] += np.add.reduce(w[_GLOB_PLANES], axis=1).T

    def _raw_steps(self, xa: np.ndarray, fa: np.ndarray, act: np.ndarray,
                   ix: np.ndarray | slice, all_fin: bool) -> np.ndarray:
        """Step of each value from the measurement's previous value (0 where none or missing).

        ``xa`` and ``fa`` are the values of the columns ``act`` and where they are finite
        (everywhere: ``all_fin``); ``ix`` selects the same rows of the state.
        """
        # Column-major, as ``values[:, cols]`` is: ``_steps`` sums these columns, and a sum's
        # rounding depends on the memory order (a contiguous column is summed pairwise).
        if all_fin:  # every reading has every measurement: one subtraction
            raw = np.empty(xa.shape, order="F")
            np.subtract(xa[1:], xa[:-1], out=raw[1:])
            np.subtract(xa[0], self.last_x_[ix], out=raw[0])
            np.copyto(raw[0], 0.0, where=np.isnan(raw[0]))  # no earlier value: no step
            self.last_x_[ix] = xa[-1]
            return raw
        raw = np.zeros(xa.shape, order="F")
        for p, j in enumerate(act.tolist()):
            idx = np.nonzero(fa[:, p])[0]
            vals = xa[idx, p]
            prev = np.concatenate(([self.last_x_[j]], vals[:-1]))
            d = vals - prev
            if d.size and np.isnan(d[0]):
                d[0] = 0.0  # no earlier value: no step
            raw[idx, p] = d
            self.last_x_[j] = vals[-1]
        return raw

    def _steps(self, raw: np.ndarray, jump: np.ndarray, learnable: np.ndarray, sl: slice,
               ix: np.ndarray | slice) -> None:
        """Steps of one day in units of the usual step (frozen for the day); learn the day's.

        ``raw`` and ``jump`` hold the measurements ``ix`` selects. Flagged readings are not
        learnable.
        """
        if self._step_scale is None:
            self._step_scale = (self.step_[:, 2] >= 1,
                                np.maximum(_MAD_TO_SD * self.step_[:, 0], self._floor))
        warm, scale = self._step_scale
        r = raw[sl]
        jump[sl] = np.where(warm[ix][None, :], r / scale[ix][None, :], 0.0)
        use = learnable[sl][:, None] & (r != 0.0)
        self.step_sum_[ix, 0] += np.add.reduce(np.where(use, np.abs(r), 0.0), axis=0)
        self.step_sum_[ix, 1] += np.add.reduce(use, axis=0)

    def _keep_jump_tail(self, jump: np.ndarray, j: int) -> None:
        """Keep the last ``onset_n - 1`` steps, as ``_onset`` does, when no onset is needed.

        ``jump`` holds the steps of the measurement's finite values in the batch.
        """
        w1 = self.onset_n - 1
        if jump.size == 0 or w1 <= 0:
            return
        if jump.size >= w1:
            self.jump_tail_[j] = jump[jump.size - w1 :]
        else:
            self.jump_tail_[j] = np.concatenate((self.jump_tail_[j, jump.size :], jump))

    def _onset(self, jump: np.ndarray, finite: np.ndarray, j: int) -> np.ndarray:
        """Largest step up and down among the last ``onset_n`` values, at each reading.

        ``jump`` holds the steps of the finite values only (``finite``, the batch's mask).
        """
        out = np.zeros((finite.size, 2))
        idx = np.nonzero(finite)[0]
        if idx.size == 0:
            return out
        w = self.onset_n
        ext = np.concatenate((self.jump_tail_[j], jump))
        up = ext[w - 1 :].copy()
        for s in range(1, w):
            up = np.maximum(up, ext[w - 1 - s : ext.size - s])
        dn = -ext[w - 1 :]
        for s in range(1, w):
            dn = np.maximum(dn, -ext[w - 1 - s : ext.size - s])
        self.jump_tail_[j] = ext[ext.size - (w - 1) :]
        out[idx, 0], out[idx, 1] = up, dn
        return out

    def _night_sums(self, x: np.ndarray, hod: np.ndarray, use: np.ndarray,
                    ts: np.ndarray) -> None:
        """Add the flow readings of the night window to the night's hourly sums."""
        if not use.any():
            return
        b = hod[use] - self.night_hours[0]
        if self.night_start_ is None:
            self.night_start_ = int(ts[use][0])
        nb = self.night_hours[1] - self.night_hours[0]
        self.night_[:, 0] += np.bincount(b, weights=x[use], minlength=nb)
        self.night_[:, 1] += np.bincount(b, minlength=nb)

    def _judge_night(self) -> _Night | None:
        """Judge the night just completed against the node's recent nights, and learn it.

        Minimum night flow (MNF) = the lowest hourly mean flow of the night window, compared by
        a robust z with an exponentially weighted location and mean absolute deviation of
        earlier nights of the same day type (weekday or weekend). A leaky night teaches the
        night baseline only with ``slow_weight``.
        """
        if self.night_done_:
            return None
        self.night_done_ = True
        sums = self.night_.copy()
        start = self.night_start_
        self.night_[:] = 0.0
        self.night_start_ = None
        full = sums[:, 1] >= self.night_min_n
        if full.sum() < 2 or start is None:
            return None
        mnf = float((sums[full, 0] / sums[full, 1]).min())
        b = self.nbase_[1 if self.pending_dow_ >= 5 else 0]
        if b[_NB] < 1:
            b[:] = (mnf, 0.0, 1.0)
            return None
        sig = max(_MAD_TO_SD * b[_DEV], self.night_rel_floor * abs(b[_LOC]), ABS_FLOOR["flow_rate"])
        zn = (mnf - b[_LOC]) / sig
        warm = b[_NB] >= self.night_warm
        leaky = bool(warm and zn >= self.leak_z and mnf - b[_LOC] >= self.leak_rel * abs(b[_LOC]))
        clean = bool(zn < self.leak_close_z)
        v = _Night(start, mnf, float(zn), float(b[_LOC] - self.z0 * sig),
                   float(b[_LOC] + self.z0 * sig), leaky, clean,
                   float(1.0 - np.exp(-max(zn, 0.0) / self.leak_z)), warm)
        self.night_anom_ = leaky or (self.night_anom_ and not (clean and warm))
        rate = max(self.alpha_night, 1.0 / (b[_NB] + 1.0))
        if zn >= self.leak_close_z:
            rate *= self.slow_weight
        # Huber-like: a leaky night must not widen the spread it is judged against.
        dev = min(abs(mnf - b[_LOC]), self.leak_close_z * sig)
        b[_LOC] += rate * (mnf - b[_LOC])
        b[_DEV] += rate * (dev - b[_DEV])
        b[_NB] += 1.0
        return v

    def _apply_night(self, v: _Night, ts: np.ndarray, at: int,
                     changed: dict[tuple[str, int], _Incident]) -> None:
        """Open, extend or close the night-flow leak after a night's verdict."""
        at_ts = int(ts[min(at, ts.size - 1)])
        leak = self.open_.get("~leak")
        if leak is not None:
            if v.clean and v.warm:
                del self.open_["~leak"]
                v.leak_open = False
            else:
                leak.take_peak(v.level, at_ts, v.mnf, v.lo, v.hi, v.z, 0.0)
                leak.last_hi_at = at_ts
                v.leak_open = True
            changed[("~leak", leak.started_at)] = leak
            return
        if not v.leaky:
            return
        cur = self.open_.get("flow_rate")
        recent = self.last_burst_ is not None and self.last_burst_[1] >= v.start - US_PER_HOUR
        if (cur is not None and cur.kind == "burst") or recent:
            return  # a burst is (or was, this night) under way: the next night tells
        start = v.start
        if cur is not None and cur.z_peak > 0:
            # The flow rise already reported is this leak: same start, hence the same id, so
            # the reported event is upserted into the leak instead of left open beside it.
            start = cur.started_at
            del self.open_["flow_rate"]
            self.run_n_["flow_rate"] = 0
            changed.pop(("flow_rate", cur.started_at), None)
        inc = _Incident("flow_rate", start, at_ts, kind="leak", flagged=True)
        inc.take_peak(v.level, at_ts, v.mnf, v.lo, v.hi, v.z, 0.0)
        self.open_["~leak"] = inc
        changed[("~leak", start)] = inc
        v.leak_open = True

    @staticmethod
    def _visible(inc: _Incident) -> bool:
        """A small flow rise that began during a night-flow leak is the leak itself.

        Not reported twice; a burst is reported whenever it happens.
        """
        return not (inc.in_leak and inc.measurement == "flow_rate" and inc.kind == "high")

    def _commit(self) -> None:
        """Fold the finished day's sums into the baseline (the day's readings are all in)."""
        p = self.pending_
        jj, slots = np.nonzero(p[..., _P_W] > 0)
        if jj.size:
            pw = p[jj, slots]
            mean = pw[:, _P_X] / pw[:, _P_W]
            spread = np.sqrt(np.maximum(pw[:, _P_XX] / pw[:, _P_W] - mean**2, 0.0))
            share = pw[:, _P_W] / pw[:, _P_N]
            day_type = 24 if self.pending_dow_ >= 5 else 0
            # Tables seen as (measurement x slot, 3) views: one flat index per (j, slot).
            self._fold(self.hod_.reshape(-1, 3), jj * 48 + day_type + slots, mean,
                       pw[:, _P_DD] / pw[:, _P_W], spread, share, self.alpha_hod)
            self._fold(self.how_.reshape(-1, 3), jj * 168 + self.pending_dow_ * 24 + slots, mean,
                       pw[:, _P_DW] / pw[:, _P_W], spread, share, self.alpha_how)
        gp = self.pending_glob_
        jg = np.nonzero(gp[:, _G_W] > 0)[0]
        if jg.size:
            g = gp[jg]
            mean_g = g[:, _G_X] / g[:, _G_W]
            spread_g = np.sqrt(np.maximum(g[:, _G_XX] / g[:, _G_W] - mean_g**2, 0.0))
            self._fold(self.glob_, jg, mean_g, g[:, _G_D] / g[:, _G_W], spread_g,
                       g[:, _G_W] / g[:, _G_N], self.alpha_glob)
        js = np.nonzero(self.step_sum_[:, 1] > 0)[0]
        if js.size:
            day_step = self.step_sum_[js, 0] / self.step_sum_[js, 1]
            st = self.step_[js]
            rate = np.maximum(self.alpha_hod, 1.0 / (st[:, 2] + 1.0))
            self.step_[js, 0] = np.where(st[:, 2] < 1, day_step,
                                         st[:, 0] + rate * (day_step - st[:, 0]))
            self.step_[js, 2] += 1.0
        self.step_sum_[:] = 0.0
        self.pending_[:] = 0.0
        self.pending_glob_[:] = 0.0
        self._eff = None
        self._step_scale = None
        self._tables = None

    @staticmethod
    def _fold(table: np.ndarray, idx: np.ndarray, mean: np.ndarray, dev: np.ndarray,
              spread: np.ndarray, share: np.ndarray, alpha: float) -> None:
        """EW update of slots with one block each; a cold slot starts from the block itself."""
        nb = table[idx, _NB].astype(np.float64)
        cold = nb <= 0
        # Plain averaging while a slot has few blocks (fast warm-up), EW afterwards; a block made
        # mostly of anomalous readings moves the slot only by its (small) weight share.
        rate = np.maximum(alpha, 1.0 / (nb + 1.0)) * share
        old_loc = table[idx, _LOC].astype(np.float64)
        old_dev = table[idx, _DEV].astype(np.float64)
        # A cold slot has no prior location to measure deviation from: the block's own spread
        # (as a mean absolute deviation) stands in.
        dev = np.where(cold, spread / _MAD_TO_SD, dev)
        table[idx, _LOC] = np.where(cold, mean, old_loc + rate * (mean - old_loc))
        table[idx, _DEV] = np.where(cold, dev, old_dev + rate * (dev - old_dev))
        # Blocks seen, whatever their weight: a slot whose blocks were all anomalous must still
        # warm up, or a recurring pattern it has not learned would keep it cold for ever.
        table[idx, _NB] = nb + 1.0

    # ------------------------------------------------------------------ incidents

    def _track(self, m: str, s: np.ndarray, ts: np.ndarray, x: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, z: np.ndarray, rel: np.ndarray, onset: np.ndarray, *,
               changed: dict[tuple[str, int], _Incident]) -> None:
        """Open, extend and close the incidents of measurement ``m`` (hysteresis)."""
        n = s.size
        i = 0
        while i < n:
            inc = self.open_.get(m)
            if inc is None:
                seg = s[i:]
                hot = seg >= self.open_score
                run = _runs(hot, self.run_n_[m])
                trig = (run >= self.open_n) | (seg >= self.instant_score)
                if not trig.any():
                    self._carry_hi_run(m, run, i, s, ts, x, lo, hi, z, rel, onset)
                    return
                t = i + int(np.argmax(trig))
                first = t - int(run[t - i]) + 1
                if first >= i:
                    started = int(ts[first])
                    inc = _Incident(m, started, int(ts[t]), first_score=float(s[first]),
                                    onset_up=float(onset[first, 0]),
                                    onset_down=float(onset[first, 1]))
                else:  # the run began in an earlier batch
                    cand = self.run_peak_[m]
                    inc = replace(cand)
                    inc.started_at = self.run_start_[m]
                    first = i
                for r in range(first, t + 1):
                    inc.take_peak(float(s[r]), int(ts[r]), float(x[r]), float(lo[r]),
                                  float(hi[r]), float(z[r]), float(rel[r]))
                inc.n_hi += int((s[max(first, i) : t + 1] >= self.open_score).sum())
                inc.last_hi_at = int(ts[t])
                # Decided when it opens, in time order: the same whatever the batch cuts.
                inc.in_leak = "~leak" in self.open_
                self.open_[m] = inc
                self.run_n_[m] = 0
                self.run_peak_.pop(m, None)
                self._classify(inc)
                changed[(m, inc.started_at)] = inc
                i = t + 1
            else:
                seg = s[i:]
                quiet = seg < self.close_score
                run = _runs(quiet, self.run_n_[m])
                trig = run >= self.close_n
                t = i + int(np.argmax(trig)) if trig.any() else n - 1
                self._extend(inc, i, t + 1, s, ts, x, lo, hi, z, rel)
                self._classify(inc)
                changed[(m, inc.started_at)] = inc
                if trig.any():
                    self._classify(inc, closing=True)
                    self._close(m, inc)
                    i = t + 1
                else:
                    self.run_n_[m] = int(run[-1])
                    self._classify(inc)
                    return

    def _extend(self, inc: _Incident, a: int, b: int, s: np.ndarray, ts: np.ndarray,
                x: np.ndarray, lo: np.ndarray, hi: np.ndarray, z: np.ndarray,
                rel: np.ndarray) -> None:
        """Take readings ``a:b`` into an open incident: peak, loud count, last loud reading."""
        if b <= a:
            return
        sk = s[a:b]
        r = a + int(np.argmax(sk))
        inc.take_peak(float(s[r]), int(ts[r]), float(x[r]), float(lo[r]), float(hi[r]),
                      float(z[r]), float(rel[r]))
        inc.n_hi += int((sk >= self.open_score).sum())
        loud = np.nonzero(sk >= self.close_score)[0]
        if loud.size:
            inc.last_hi_at = max(inc.last_hi_at, int(ts[a + loud[-1]]))

    def _carry_hi_run(self, m: str, run: np.ndarray, i: int, s: np.ndarray, ts: np.ndarray,
                      x: np.ndarray, lo: np.ndarray, hi: np.ndarray, z: np.ndarray,
                      rel: np.ndarray, onset: np.ndarray) -> None:
        """Remember a run of high scores still too short to open, across batches."""
        last = int(run[-1]) if run.size else 0
        if last == 0:
            self.run_n_[m] = 0
            self.run_peak_.pop(m, None)
            return
        n = s.size
        first = n - last
        if first >= i:
            self.run_start_[m] = int(ts[first])
            cand = _Incident(m, int(ts[first]), int(ts[-1]), first_score=float(s[first]),
                             onset_up=float(onset[first, 0]),
                             onset_down=float(onset[first, 1]))
        else:
            cand = self.run_peak_[m]
            first = i
        for r in range(first, n):
            cand.take_peak(float(s[r]), int(ts[r]), float(x[r]), float(lo[r]), float(hi[r]),
                           float(z[r]), float(rel[r]))
        cand.n_hi += int((s[first:] >= self.open_score).sum())
        self.run_peak_[m] = cand
        self.run_n_[m] = last

    def _close(self, m: str, inc: _Incident) -> None:
        del self.open_[m]
        self.run_n_[m] = 0
        if inc.kind == "burst" and m == "flow_rate":
            self.last_burst_ = (inc.started_at, inc.last_hi_at)

    def _classify(self, inc: _Incident, *, closing: bool = False) -> None:
        """The kind of a measurement incident, from what is known of it so far."""
        if inc.flagged:
            return
        up = inc.z_peak > 0
        duration = inc.last_hi_at - inc.started_at
        if closing and inc.n_hi <= self.spike_max_n and duration <= 15 * 60 * US_PER_S:
            inc.kind = "spike"
        elif inc.measurement == "flow_rate":
            # Abrupt: the first loud reading is far out, or the flow stepped up sharply just
            # before it (a large step is often flagged SPIKE and so not part of the run).
            # During a night-flow leak every night scores high from its first reading: only a
            # step says burst then.
            abrupt = inc.onset_up >= self.burst_jump or (
                inc.first_score >= self.burst_score and not inc.in_leak
            )
            if up and (inc.kind == "burst" or (abrupt and inc.rel_peak >= self.burst_rel)):
                inc.kind = "burst"  # a burst stays a burst while it lasts
            else:
                # A leak is judged on night flow (``_judge_night``), not on a reading's rise.
                inc.kind = "high" if up else "low"
        elif inc.measurement == "pressure":
            if up:
                inc.kind = "high"
            else:
                # Near a flow burst: started from an hour before it to an hour after it. The
                # open flow incident counts only within that window too: in a large batch it
                # may have started after this fall ended (the flow block is scored first).
                flow = self.open_.get("flow_rate")
                burst_near = (
                    flow is not None and flow.kind == "burst"
                    and inc.started_at >= flow.started_at - US_PER_HOUR
                ) or (
                    self.last_burst_ is not None
                    and self.last_burst_[0] - US_PER_HOUR
                    <= inc.started_at
                    <= self.last_burst_[1] + US_PER_HOUR
                )
                # A main break drops pressure within minutes, everywhere in its district: a
                # drop that starts with a step is a burst even where no flow is metered.
                abrupt = inc.first_score >= self.burst_score or inc.onset_down >= self.burst_jump
                burst = burst_near or abrupt or inc.kind == "burst"
                inc.kind = "burst" if burst else "pressure_drop"
        else:
            inc.kind = "high" if up else "low"

    def _track_flags(self, flags: np.ndarray, ts: np.ndarray, values: np.ndarray,
                     scores: np.ndarray, changed: dict[tuple[str, int], _Incident]) -> None:
        """Incidents from validation's STUCK flags (one per run) and confirmed SPIKE runs."""
        key = "~stuck"
        on = (flags & int(Flag.STUCK)) != 0
        inc = self.open_.get(key)
        if inc is not None or on.any():
            # Boundaries of flagged runs: each start opens, each end closes.
            edges = np.diff(np.r_[1 if inc is not None else 0, on.astype(np.int8), 0])
            starts = np.nonzero(edges == 1)[0]
            ends = np.nonzero(edges == -1)[0]  # one past the last flagged reading of a run
            if inc is not None:
                starts = np.r_[-1, starts]
            for a_, b_ in zip(starts.tolist(), ends.tolist(), strict=True):
                a, b = int(a_), int(b_)
                if a >= 0:
                    c = self._flag_column("stuck", values, a, b)
                    inc = _Incident(MEASUREMENTS[c], int(ts[a]), int(ts[a]), kind="stuck",
                                    flagged=True)
                    self.open_[key] = inc
                assert inc is not None
                lo_i = max(a, 0)
                if b > lo_i:
                    r = lo_i + int(np.argmax(scores[lo_i:b]))
                    inc.take_peak(float(scores[r]), int(ts[r]),
                                  float(values[r, COL[inc.measurement]]),
                                  float("nan"), float("nan"), 0.0, 0.0)
                    inc.last_hi_at = int(ts[b - 1])
                    inc.n_hi += b - lo_i
                changed[(key, inc.started_at)] = inc
                if b < on.size:  # the run ended inside the batch
                    del self.open_[key]
                inc = None
        self._track_spikes(flags, ts, values, scores, changed)

    def _track_spikes(self, flags: np.ndarray, ts: np.ndarray, values: np.ndarray,
                      scores: np.ndarray, changed: dict[tuple[str, int], _Incident]) -> None:
        """Spike events: SPIKE-flagged runs that the next reading confirms.

        Validation flags a large step at once (it cannot look ahead), so the first reading of a
        burst, the step back after it and any level shift are flagged too. A spike is a reading
        *far off and back*: a run of at most ``spike_max_n`` flagged readings is a spike when
        the next value of its measurement returns within ``spike_return`` of the excursion to
        the level before it. Otherwise it was a step, and the measurement's own incident (if
        any) tells what it was. The verdict waits for that next reading, across batches.
        """
        on = (flags & int(Flag.SPIKE)) != 0
        cand = self.spike_cand_
        if cand is None and not on.any():
            return
        edges = np.diff(np.r_[0, on.astype(np.int8), 0])
        runs = list(zip(np.nonzero(edges == 1)[0].tolist(),
                        np.nonzero(edges == -1)[0].tolist(), strict=True))
        if cand is not None and not (runs and runs[0][0] == 0):
            runs.insert(0, (0, 0))  # only the pending run to judge, with the first readings
        for a, b in runs:
            if a == 0 and cand is not None:
                c = cand.column
                if b > 0:  # the pending run goes on in this batch
                    seg = values[:b, c]
                    dist = np.abs(seg - cand.ref)
                    if np.isfinite(dist).any():
                        far_i = int(np.nanargmax(dist))
                        if not dist[far_i] <= abs(cand.far - cand.ref):
                            cand.far = float(seg[far_i])
                    cand.n += b
                    cand.ended_at = int(ts[b - 1])
                    cand.peak_score = max(cand.peak_score, float(scores[:b].max()))
            else:
                c = self._flag_column("spike", values, a, b)
                ref = float(values[a - 1, c]) if a > 0 else float(self.last_values_[c])
                seg = values[a:b, c]
                if np.isfinite(seg).any():
                    far = float(seg[int(np.nanargmax(np.abs(seg - ref)))]) if np.isfinite(ref) \
                        else float(seg[np.isfinite(seg)][0])
                else:
                    far = float("nan")
                cand = _SpikeCand(int(ts[a]), int(ts[b - 1]), c, ref, far, b - a,
                                  float(scores[a:b].max()))
            after = np.nonzero(np.isfinite(values[b:, cand.column]))[0]
            if after.size == 0:
                self.spike_cand_ = cand
                return
            nxt = float(values[b + int(after[0]), cand.column])
            if cand.n <= self.spike_max_n and abs(nxt - cand.ref) <= self.spike_return * abs(
                cand.far - cand.ref
            ):
                inc = _Incident(MEASUREMENTS[cand.column], cand.started_at, cand.ended_at,
                                kind="spike", flagged=True)
                inc.peak_score, inc.peak_at = cand.peak_score, cand.started_at
                inc.observed = cand.far
                changed[("~spike", cand.started_at)] = inc
            cand = None
        self.spike_cand_ = None

    def _flag_column(self, kind: str, values: np.ndarray, a: int, b: int) -> int:
        """Column a flag is about: the flat one (stuck) or the one that jumped most (spike).

        Validation flags a reading, not a value; the column is recovered from the values
        themselves, comparing with the reading before (kept across batches).
        """
        prev = values[a - 1] if a > 0 else self.last_values_
        cur = values[a:b]
        candidates = np.array([c != COL["total_flow"] for c in range(len(MEASUREMENTS))])
        if kind == "stuck":
            seq = np.vstack([prev[None, :], cur])
            flat = candidates & np.all(np.isfinite(seq[1:]) & (np.diff(seq, axis=0) == 0), axis=0)
            if flat.any():
                return int(np.argmax(flat))
        floor = np.array([ABS_FLOOR.get(m, _DEFAULT_FLOOR) for m in MEASUREMENTS])
        jump = np.abs(cur[0] - prev) / np.maximum(np.abs(prev), floor)
        jump = np.where(candidates & np.isfinite(jump), jump, -1.0)
        if jump.max() < 0:
            present = np.nonzero(candidates & np.isfinite(cur[0]))[0]
            return int(present[0]) if present.size else COL["flow_rate"]
        return int(np.argmax(jump))

    def _event(self, inc: _Incident) -> AnomalyEvent:
        closed = self.open_.get(
            inc.measurement if not inc.flagged else f"~{inc.kind}"
        ) is not inc
        return AnomalyEvent(
            anomaly_id=anomaly_id(self.node_id, inc.measurement, inc.started_at),
            node_id=self.node_id,
            measurement=inc.measurement,
            kind=inc.kind,
            started_at=inc.started_at,
            ended_at=inc.last_hi_at if closed else None,
            peak_score=round(float(inc.peak_score), 6),
            expected_lo=float(inc.expected_lo),
            expected_hi=float(inc.expected_hi),
            observed=float(inc.observed),
        )


#: The tuning parameters of ``NodeScorer`` and their defaults: a snapshot holds only the ones a
#: scorer was given other values for.
_PARAM_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(NodeScorer.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "measurements"
}
#: Measurement sets a snapshot names by their index.
_KNOWN_SETS = (SCORED, SCORED_QUALITY)
#: Version of the packed state (``NodeScorer.__getstate__``); a dict is the unpacked one.
#: 3 compresses the slot tables (``_pack_tables``).
_STATE_VERSION = 3
#: Per-measurement arrays of NodeScorer pickled as raw float64, in this order (``rows`` only).
_ROW_ARRAYS = ("glob_", "pending_glob_", "step_", "step_sum_", "last_x_", "jump_tail_")
#: The rest of NodeScorer's learned state, pickled as it is.
_PLAIN = (
    "pending_day_", "night_start_", "night_done_", "day_leak_", "night_anom_",
    "leak_level_prev_", "spike_cand_", "pending_dow_", "open_", "run_n_", "run_start_",
    "run_peak_", "last_burst_",
)


def _pack_tables(how: np.ndarray, hod: np.ndarray) -> tuple[str, bytes]:
    """The slot tables of the rows reported, compressed exactly: (counts' dtype, zlib bytes).

    The locations, then the scales, each as four planes of the float32 bytes (a plane of
    sign and exponent bytes is nearly constant), then the blocks-seen counts in the narrowest
    type (a few distinct values): 3.9 KB of a meter of flow and pressure in about 2.7 KB.
    """
    planes = [t[..., c].ravel() for c in (_LOC, _DEV) for t in (how, hod)]
    floats = np.concatenate(planes).astype(np.float32)
    dtype, counts = pack_counts(np.concatenate([how[..., _NB].ravel(), hod[..., _NB].ravel()]))
    shuffled = floats.view(np.uint8).reshape(-1, 4).T.tobytes()
    return dtype, zlib.compress(shuffled + counts, 9)


def _unpack_tables(packed: tuple[str, bytes], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, 168, 3) and (rows, 48, 3) tables ``_pack_tables`` packed."""
    dtype, data = packed
    raw = zlib.decompress(data)
    n = rows * (168 + 48)
    floats = np.frombuffer(raw[: 8 * n], np.uint8).reshape(4, -1).T.copy().view(np.float32).ravel()
    counts = np.frombuffer(raw[8 * n :], dtype=dtype)
    how = np.empty((rows, 168, 3), np.float32)
    hod = np.empty((rows, 48, 3), np.float32)
    at = 0
    for c in (_LOC, _DEV):
        for t in (how, hod):
            size = t[..., c].size
            t[..., c] = floats[at : at + size].reshape(t.shape[:2])
            at += size
    how[..., _NB] = counts[: rows * 168].reshape(rows, 168)
    hod[..., _NB] = counts[rows * 168 :].reshape(rows, 48)
    return how, hod


def _pack_pending(sums: np.ndarray) -> tuple[tuple[str, bytes], bytes, bytes, bytes]:
    """Rows of pending sums, packed exactly.

    The readings counted in the narrowest type, the total weight only where it is not that
    count (some reading learned with ``slow_weight``), the other sums as raw bytes.
    """
    n, w = sums[:, _P_N], sums[:, _P_W]
    same = w == n
    return (pack_counts(n), np.packbits(same).tobytes(), w[~same].tobytes(),
            sums[:, _P_X:].tobytes())


def _unpack_pending(packed: tuple[tuple[str, bytes], bytes, bytes, bytes]) -> np.ndarray:
    counts, same_b, w_b, rest_b = packed
    n = unpack_counts(counts)
    same = np.unpackbits(np.frombuffer(same_b, np.uint8), count=n.size).astype(bool)
    out = np.empty((n.size, 6))
    out[:, _P_N] = n
    out[same, _P_W] = n[same]
    out[~same, _P_W] = np.frombuffer(w_b)
    out[:, _P_X:] = np.frombuffer(rest_b).reshape(n.size, 6 - _P_X)
    return out
