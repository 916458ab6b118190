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
verdict, not a guess).

*No poisoning.* A reading that scored ``>= learn_score`` enters the baseline with the small weight
``slow_weight``; readings flagged STUCK, SPIKE or OUT_OF_ORDER, and readings older than the day
being learned, do not enter it at all. So a leak or a burst does not teach the baseline that it
is normal, yet a level shift that persists for days (a repair, a new customer) is slowly
absorbed instead of alarming forever. Warm-up counts the blocks a slot has seen whatever their
weight, so a slot whose first blocks looked anomalous still warms up.

*Incidents with hysteresis.* Per measurement an incident opens when the score stays
``>= open_score`` for ``open_n`` consecutive readings, or at once for a single reading
``>= instant_score``; it closes after ``close_n`` consecutive readings below ``close_score``.
A flow rise that has lasted ``leak_min_s`` is a leak, and a leak closes only after a quiet
stretch of ``leak_close_s`` (a leak shows at night, when demand is low, and hides under the day's
demand: it is fixed when a night passes clean, not when the morning peak arrives). Kinds:
``burst`` (sudden large flow rise, and a pressure drop at the same time), ``leak``, ``high``,
``low``, ``pressure_drop``, ``spike`` (an excursion of at most ``spike_max_n`` readings, or
validation's SPIKE flag), ``stuck`` (validation's STUCK flag). The id hashes (node,
measurement, start), so a replay upserts the same events; an open event is reported again in
every batch that changes it.

State per node is a few float32 tables (about 8 KB pickled for three measurements), well under
the 20 KB budget; nothing in it grows with the length of the stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
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
from dataflows.settings import Settings
from dataflows.tables import TableRows, frame

#: Measurements scored by default.
SCORED: tuple[str, ...] = ("flow_rate", "pressure", "level")
#: Smallest scale per measurement (canonical units): below it, the noise is the sensor's
#: resolution, and a z-score against a near-zero spread would call every tick an anomaly.
ABS_FLOOR: dict[str, float] = {"flow_rate": 0.05, "pressure": 0.02, "level": 0.01}
_DEFAULT_FLOOR = 0.01
#: Mean absolute deviation to standard deviation, for normal noise.
_MAD_TO_SD = 1.2533
_NOT_LEARNED = Flag.STUCK | Flag.SPIKE | Flag.OUT_OF_ORDER
# Columns of the per-slot tables: location, scale (mean absolute deviation), blocks seen.
_LOC, _DEV, _NB = 0, 1, 2
# Columns of the pending sums per hour-of-day: readings usable, total weight, weighted sum,
# weighted sum of squares, weighted absolute deviation from the weekly and the daily location.
_P_N, _P_W, _P_X, _P_XX, _P_DW, _P_DD = range(6)
# Columns of the pending global sums: the same, deviation from the global location last.
_G_N, _G_W, _G_X, _G_XX, _G_D = range(5)


def anomaly_id(node_id: str, measurement: str, started_at: int) -> str:
    """Deterministic id of an incident: the same data always yields the same id.

    >>> anomaly_id("n1", "flow_rate", 0) == anomaly_id("n1", "flow_rate", 0)
    True
    >>> len(anomaly_id("n1", "flow_rate", 0))
    32
    """
    key = f"{node_id}\x1f{measurement}\x1f{started_at}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def utc_offsets_us(ts: np.ndarray, tz: str) -> np.ndarray:
    """The zone's UTC offset (µs) at each timestamp (µs UTC), DST included.

    One zone lookup per distinct UTC hour of the batch, not per reading: offsets change on
    hour boundaries in every zone in use today.

    >>> int(utc_offsets_us(np.array([0], dtype=np.int64), "Europe/Rome")[0]) // 3_600_000_000
    1
    """
    if ts.size == 0:
        return np.zeros(0, dtype=np.int64)
    zone = ZoneInfo(tz)
    hours, inverse = np.unique(ts // US_PER_HOUR, return_inverse=True)
    offsets = np.array(
        [
            int(datetime.fromtimestamp(int(h) * 3600, tz=zone).utcoffset().total_seconds())  # type: ignore[union-attr]
            for h in hours
        ],
        dtype=np.int64,
    )
    return offsets[inverse] * US_PER_S


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
    flagged: bool = False  # opened from a validation flag (stuck, spike)
    quiet_since: int | None = None  # start of the current run below the close threshold

    def take_peak(self, score: float, at: int, x: float, lo: float, hi: float, z: float,
                  rel: float) -> None:
        """Record a reading as the new peak when it beats the current one."""
        if score > self.peak_score:
            self.peak_score, self.peak_at, self.observed = score, at, x
            self.expected_lo, self.expected_hi, self.z_peak, self.rel_peak = lo, hi, z, rel


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
        measurements: tuple[str, ...] = SCORED,
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
        leak_min_s: int = 2 * 3600,
        leak_close_s: int = 24 * 3600,
        spike_max_n: int = 2,
    ) -> None:
        self.node_id = node_id
        self.tz = settings.tz  # only the zone: the whole Settings (network) would bloat state
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
        self.leak_min_s = leak_min_s
        self.leak_close_s = leak_close_s
        self.spike_max_n = spike_max_n

        k = len(measurements)
        self.how_ = np.zeros((k, 168, 3), dtype=np.float32)
        self.hod_ = np.zeros((k, 48, 3), dtype=np.float32)  # weekday hours, then weekend hours
        self.glob_ = np.zeros((k, 3), dtype=np.float64)
        self.pending_ = np.zeros((k, 24, 6), dtype=np.float64)
        self.pending_glob_ = np.zeros((k, 5), dtype=np.float64)
        self.pending_day_: int | None = None  # local day (days since epoch) being accumulated
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
        ts = batch.ts.astype(np.int64, copy=False)
        flags = (
            batch.flags.astype(np.int64, copy=False)
            if batch.flags is not None
            else np.zeros(n, dtype=np.int64)
        )
        x = batch.values[:, [COL[m] for m in self.measurements]].astype(np.float64)
        local = ts + utc_offsets_us(ts, self.tz)
        day = local // US_PER_DAY
        hod = ((local // US_PER_HOUR) % 24).astype(np.intp)
        # Hour-of-day slots by day type: weekend mornings differ from weekday ones everywhere.
        hod_slot = hod + 24 * (((day + 3) % 7) >= 5)
        # Hour of week from Monday 00:00; 1970-01-01 (local day 0) was a Thursday.
        how = (((day + 3) % 7) * 24 + hod).astype(np.intp)
        # A reading is learned with the day it belongs to; a reading of an earlier day than the
        # one being accumulated arrived too late to be learned, and is scored with today's state.
        start_day = day[0] if self.pending_day_ is None else self.pending_day_
        seg_day = np.maximum.accumulate(np.maximum(day, start_day))
        learnable = (day == seg_day) & ((flags & int(_NOT_LEARNED)) == 0)

        z = np.zeros_like(x)
        scores_m = np.zeros_like(x)
        loc = np.full_like(x, np.nan)
        sig = np.full_like(x, np.nan)
        gloc = np.full_like(x, np.nan)
        bounds = np.flatnonzero(np.diff(seg_day)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, n], strict=True):
            d = int(seg_day[lo])
            if self.pending_day_ is not None and d != self.pending_day_:
                self._commit()
            if self.pending_day_ != d:
                self.pending_day_ = d
                self.pending_dow_ = (d + 3) % 7
            sl = slice(lo, hi)
            z[sl], scores_m[sl], loc[sl], sig[sl], gloc[sl] = self._score_block(
                x[sl], how[sl], hod_slot[sl]
            )
            self._accumulate(x[sl], hod[sl], hod_slot[sl], how[sl], scores_m[sl], learnable[sl])

        flagged = (flags & int(Flag.STUCK | Flag.SPIKE)) != 0
        scores = scores_m.max(axis=1) if scores_m.shape[1] else np.zeros(n)
        scores = np.where(flagged, np.maximum(scores, self.open_score), scores)
        changed: dict[tuple[str, int], _Incident] = {}
        band = (loc - self.z0 * sig, loc + self.z0 * sig)
        for j, m in enumerate(self.measurements):
            # Flagged readings are handled by the flag incidents below; for the measurement's
            # own incident they count as quiet, so a stuck stretch cannot fake a level shift.
            s = np.where(flagged, 0.0, scores_m[:, j])
            # Size relative to the measurement's overall level (a burst is large for the pipe,
            # not just for the hour), for telling a burst from a leak.
            rel = (x[:, j] - loc[:, j]) / np.maximum(
                np.abs(gloc[:, j]), ABS_FLOOR.get(m, _DEFAULT_FLOOR)
            )
            self._track(m, s, ts, x[:, j], band[0][:, j], band[1][:, j], z[:, j], rel, changed)
        self._track_flags(flags, ts, batch.values, scores, changed)
        values = batch.values
        for c in range(values.shape[1]):
            seen = np.flatnonzero(np.isfinite(values[:, c]))
            if seen.size:
                self.last_values_[c] = values[seen[-1], c]
        return np.clip(scores, 0.0, 1.0), [self._event(i) for i in changed.values()]

    def flush(self) -> list[AnomalyEvent]:
        """At the end of input: the incidents still open, as they stand (``ended_at`` None)."""
        return [self._event(i) for i in self.open_.values()]

    # ------------------------------------------------------------------ baseline

    def _score_block(
        self, x: np.ndarray, how: np.ndarray, hod: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Robust z, score, location, scale and global location of one day's readings.

        Everything comes from the state frozen at the start of the day.
        """
        k = len(self.measurements)
        rows = np.arange(k)[None, :]
        w = self.how_[rows, how[:, None]].astype(np.float64)  # (n, k, 3)
        h = self.hod_[rows, hod[:, None]].astype(np.float64)
        g = self.glob_[None, :, :]
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
        floor = np.maximum(
            np.array([ABS_FLOOR.get(m, _DEFAULT_FLOOR) for m in self.measurements])[None, :],
            self.rel_floor * np.abs(g[..., _LOC]),
        )
        sig = np.maximum(_MAD_TO_SD * dev, floor)
        z = (x - loc) / sig
        ok = glob_ok & np.isfinite(x)
        z = np.where(ok, z, 0.0)
        score = np.where(ok, squash(z, self.z0, self.z_scale), 0.0)
        gloc = np.broadcast_to(np.where(glob_ok, g[..., _LOC], np.nan), x.shape)
        return z, score, np.where(glob_ok, loc, np.nan), np.where(glob_ok, sig, np.nan), gloc

    def _accumulate(self, x: np.ndarray, hod: np.ndarray, hod_slot: np.ndarray,
                    how: np.ndarray, score: np.ndarray, learnable: np.ndarray) -> None:
        """Add readings of the pending day to the day's running sums."""
        for j in range(len(self.measurements)):
            xj = x[:, j]
            use = learnable & np.isfinite(xj)
            if not use.any():
                continue
            xs, hs, ws, ds = xj[use], hod[use], how[use], hod_slot[use]
            wt = np.where(score[use, j] >= self.learn_score, self.slow_weight, 1.0)
            dw = np.abs(xs - self.how_[j, ws, _LOC])
            dd = np.abs(xs - self.hod_[j, ds, _LOC])
            p = self.pending_[j]
            for col, vals in ((_P_N, None), (_P_W, wt), (_P_X, wt * xs), (_P_XX, wt * xs * xs),
                              (_P_DW, wt * dw), (_P_DD, wt * dd)):
                p[:, col] += np.bincount(hs, weights=vals, minlength=24)
            gp = self.pending_glob_[j]
            gp[_G_N] += xs.size
            gp[_G_W] += wt.sum()
            gp[_G_X] += (wt * xs).sum()
            gp[_G_XX] += (wt * xs * xs).sum()
            gp[_G_D] += (wt * np.abs(xs - self.glob_[j, _LOC])).sum()

    def _commit(self) -> None:
        """Fold the finished day's sums into the baseline (the day's readings are all in)."""
        for j in range(len(self.measurements)):
            p = self.pending_[j]
            has = p[:, _P_W] > 0
            if has.any():
                slots = np.flatnonzero(has)
                pw = p[slots]
                mean = pw[:, _P_X] / pw[:, _P_W]
                spread = np.sqrt(np.maximum(pw[:, _P_XX] / pw[:, _P_W] - mean**2, 0.0))
                share = pw[:, _P_W] / pw[:, _P_N]
                day_type = 24 if self.pending_dow_ >= 5 else 0
                self._fold(self.hod_[j], day_type + slots, mean, pw[:, _P_DD] / pw[:, _P_W],
                           spread, share, self.alpha_hod)
                self._fold(self.how_[j], self.pending_dow_ * 24 + slots, mean,
                           pw[:, _P_DW] / pw[:, _P_W], spread, share, self.alpha_how)
            gp = self.pending_glob_[j]
            if gp[_G_W] > 0:
                mean_g = gp[_G_X] / gp[_G_W]
                spread_g = np.sqrt(max(gp[_G_XX] / gp[_G_W] - mean_g**2, 0.0))
                self._fold(self.glob_[j][None, :], np.array([0]), np.array([mean_g]),
                           np.array([gp[_G_D] / gp[_G_W]]), np.array([spread_g]),
                           np.array([gp[_G_W] / gp[_G_N]]), self.alpha_glob)
        self.pending_[:] = 0.0
        self.pending_glob_[:] = 0.0

    @staticmethod
    def _fold(table: np.ndarray, slots: np.ndarray, mean: np.ndarray, dev: np.ndarray,
              spread: np.ndarray, share: np.ndarray, alpha: float) -> None:
        """EW update of slots with one block each; a cold slot starts from the block itself."""
        nb = table[slots, _NB].astype(np.float64)
        cold = nb <= 0
        # Plain averaging while a slot has few blocks (fast warm-up), EW afterwards; a block made
        # mostly of anomalous readings moves the slot only by its (small) weight share.
        rate = np.maximum(alpha, 1.0 / (nb + 1.0)) * share
        old_loc = table[slots, _LOC].astype(np.float64)
        old_dev = table[slots, _DEV].astype(np.float64)
        # A cold slot has no prior location to measure deviation from: the block's own spread
        # (as a mean absolute deviation) stands in.
        dev = np.where(cold, spread / _MAD_TO_SD, dev)
        table[slots, _LOC] = np.where(cold, mean, old_loc + rate * (mean - old_loc))
        table[slots, _DEV] = np.where(cold, dev, old_dev + rate * (dev - old_dev))
        # Blocks seen, whatever their weight: a slot whose blocks were all anomalous must still
        # warm up, or a recurring pattern it has not learned would keep it cold for ever.
        table[slots, _NB] = nb + 1.0

    # ------------------------------------------------------------------ incidents

    def _track(self, m: str, s: np.ndarray, ts: np.ndarray, x: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, z: np.ndarray, rel: np.ndarray,
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
                    self._carry_hi_run(m, run, i, s, ts, x, lo, hi, z, rel)
                    return
                t = i + int(np.argmax(trig))
                first = t - int(run[t - i]) + 1
                if first >= i:
                    started = int(ts[first])
                    inc = _Incident(m, started, int(ts[t]), first_score=float(s[first]))
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
                # The start time of the quiet run at each position, for the time-based close.
                idx = np.arange(seg.size)
                run_first = idx - run + 1
                carried = run_first < 0
                q_start = np.where(
                    carried, inc.quiet_since if inc.quiet_since is not None else 0,
                    ts[i + np.clip(run_first, 0, seg.size - 1)],
                )
                trig = run >= self.close_n
                t = i + int(np.argmax(trig)) if trig.any() else n - 1
                self._extend(inc, i, t + 1, s, ts, x, lo, hi, z, rel)
                self._classify(inc)
                if trig.any() and inc.kind == "leak":
                    # A leak hides under the day's demand: it ends only after a long quiet span.
                    trig &= (ts[i:] - q_start) >= self.leak_close_s * US_PER_S
                    t2 = i + int(np.argmax(trig)) if trig.any() else n - 1
                    self._extend(inc, t + 1, t2 + 1, s, ts, x, lo, hi, z, rel)
                    t = t2
                changed[(m, inc.started_at)] = inc
                if trig.any():
                    self._classify(inc, closing=True)
                    self._close(m, inc)
                    i = t + 1
                else:
                    self.run_n_[m] = int(run[-1])
                    inc.quiet_since = int(q_start[-1]) if run[-1] > 0 else None
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
        loud = np.flatnonzero(sk >= self.close_score)
        if loud.size:
            inc.last_hi_at = max(inc.last_hi_at, int(ts[a + loud[-1]]))

    def _carry_hi_run(self, m: str, run: np.ndarray, i: int, s: np.ndarray, ts: np.ndarray,
                      x: np.ndarray, lo: np.ndarray, hi: np.ndarray, z: np.ndarray,
                      rel: np.ndarray) -> None:
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
            cand = _Incident(m, int(ts[first]), int(ts[-1]), first_score=float(s[first]))
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
        inc.quiet_since = None
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
            abrupt = inc.first_score >= self.burst_score
            if up and inc.kind == "burst":
                pass  # a burst stays a burst while it lasts
            elif up and abrupt and inc.rel_peak >= self.burst_rel:
                inc.kind = "burst"
            elif up and duration >= self.leak_min_s * US_PER_S:
                inc.kind = "leak"
            else:
                inc.kind = "high" if up else "low"
        elif inc.measurement == "pressure":
            if up:
                inc.kind = "high"
            else:
                flow = self.open_.get("flow_rate")
                burst_near = (flow is not None and flow.kind == "burst") or (
                    self.last_burst_ is not None
                    and self.last_burst_[0] - US_PER_HOUR
                    <= inc.started_at
                    <= self.last_burst_[1] + US_PER_HOUR
                )
                # A main break drops pressure within minutes, everywhere in its district: an
                # abrupt drop is a burst even where no flow is metered.
                abrupt = inc.first_score >= self.burst_score
                burst = burst_near or abrupt or inc.kind == "burst"
                inc.kind = "burst" if burst else "pressure_drop"
        else:
            inc.kind = "high" if up else "low"

    def _track_flags(self, flags: np.ndarray, ts: np.ndarray, values: np.ndarray,
                     scores: np.ndarray, changed: dict[tuple[str, int], _Incident]) -> None:
        """Incidents from validation's STUCK and SPIKE flags: one per run of flagged readings."""
        for kind, bit in (("stuck", Flag.STUCK), ("spike", Flag.SPIKE)):
            key = f"~{kind}"
            on = (flags & int(bit)) != 0
            inc = self.open_.get(key)
            if inc is None and not on.any():
                continue
            # Boundaries of flagged runs: each start opens, each end closes.
            edges = np.diff(np.r_[1 if inc is not None else 0, on.astype(np.int8), 0])
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)  # one past the last flagged reading of a run
            if inc is not None:
                starts = np.r_[-1, starts]
            for a_, b_ in zip(starts, ends, strict=True):
                a, b = int(a_), int(b_)
                if a >= 0:
                    c = self._flag_column(kind, values, a, b)
                    inc = _Incident(MEASUREMENTS[c], int(ts[a]), int(ts[a]), kind=kind,
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
            present = np.flatnonzero(candidates & np.isfinite(cur[0]))
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


def events_rows(events: list[AnomalyEvent]) -> TableRows:
    """Rows of the ``anomalies`` table; for an id reported several times, the last state wins.

    >>> ev = AnomalyEvent("a", "n1", "flow_rate", "leak", 0, None, 0.9, 1.0, 2.0, 3.0)
    >>> events_rows([ev, replace(ev, ended_at=60_000_000)]).frame.height
    1
    """
    last = {e.anomaly_id: e for e in events}
    rows = list(last.values())
    return frame(
        "anomalies",
        {
            "anomaly_id": [e.anomaly_id for e in rows],
            "node_id": [e.node_id for e in rows],
            "started_at": [e.started_at for e in rows],
            "ended_at": [e.ended_at for e in rows],
            "peak_score": [e.peak_score for e in rows],
            "kind": [e.kind for e in rows],
            "measurement": [e.measurement for e in rows],
            "expected_lo": [e.expected_lo for e in rows],
            "expected_hi": [e.expected_hi for e in rows],
            "observed": [e.observed for e in rows],
        },
    )

