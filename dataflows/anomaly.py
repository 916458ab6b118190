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

*Modules.* This one holds ``NodeScorer``: scoring, the baseline and its learning, the state's
``__getstate__``/``__setstate__``. ``anomaly_incidents`` holds the incident records and their
tracking (a mixin of ``NodeScorer``), ``anomaly_state`` the packing of the state for
snapshots, ``anomaly_kernels`` the constants, local time and kernels both use. Every name they
held when they were one module is still importable from here.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

# The scorer's parts, and every name other modules and old snapshots find here (re-exported).
from dataflows.anomaly_incidents import (  # noqa: F401 - re-exported
    _Incident,
    _IncidentTracking,
    _Night,
    _SpikeCand,
    anomaly_id,
)
from dataflows.anomaly_kernels import (  # noqa: F401 - re-exported
    _DEFAULT_FLOOR,
    _DEV,
    _FLAGGED,
    _G_D,
    _G_N,
    _G_W,
    _G_X,
    _G_XX,
    _GLOB_PLANES,
    _HOD_SLOT,
    _LOC,
    _MAD_TO_SD,
    _NB,
    _NOT_LEARNED,
    _P_DD,
    _P_DW,
    _P_N,
    _P_W,
    _P_X,
    _P_XX,
    _W_GD,
    ABS_FLOOR,
    SCORED,
    SCORED_QUALITY,
    _day_offset_us,
    _day_offsets_s,
    _local_us,
    _plane_bins,
    _runs,
    squash,
    utc_offsets_us,
)
from dataflows.anomaly_state import (  # noqa: F401 - re-exported
    _KNOWN_SETS,
    _PLAIN,
    _ROW_ARRAYS,
    _STATE_VERSION,
    _pack_pending,
    _pack_tables,
    _unpack_pending,
    _unpack_tables,
)
from dataflows.model import COL, MEASUREMENTS, US_PER_HOUR, AnomalyEvent, ReadingBatch
from dataflows.packing import unpack_counts
from dataflows.settings import Settings

# Snapshots name the incident records (in ``open_``, ``run_peak_``, ``spike_cand_``) by
# module: here, where they were defined before the split, so old snapshots load and new ones
# stay what they were. ``__name__`` is the very string ``NodeScorer.__module__`` is: a pickle
# memoizes it once, and a snapshot is byte for byte what it was before the split. Only under
# this module's own name: a copy loaded under another (``bench/eval_anomaly.py --compare``)
# leaves the shared classes alone.
if __name__ == "dataflows.anomaly":
    for _cls in (_Incident, _Night, _SpikeCand):
        _cls.__module__ = __name__
    del _cls


class NodeScorer(_IncidentTracking):
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


#: The tuning parameters of ``NodeScorer`` and their defaults: a snapshot holds only the ones a
#: scorer was given other values for.
_PARAM_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(NodeScorer.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "measurements"
}
