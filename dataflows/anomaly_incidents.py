"""Incidents of one node (``dataflows.anomaly``): hysteresis, kinds, flag and night-flow events.

The records of an incident being tracked (``_Incident``), of a night's verdict (``_Night``) and
of a SPIKE run awaiting its next reading (``_SpikeCand``), their deterministic id
(``anomaly_id``), and the tracking itself as a mixin of ``NodeScorer`` (``_IncidentTracking``):
opening, extending and closing a measurement's incident, telling its kind, the STUCK and SPIKE
events from validation's flags, the night-flow leak, and the event reported. The rules are in
the design notes of ``dataflows.anomaly`` ("Incidents with hysteresis").

The records live in the scorer's pickled state. ``dataflows.anomaly``, where they were
defined before this module was split off, exports them and sets their ``__module__`` to
itself: snapshots name them there, old and new alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from dataflows.anomaly_kernels import _DEFAULT_FLOOR, ABS_FLOOR, _runs
from dataflows.model import COL, MEASUREMENTS, US_PER_HOUR, US_PER_S, AnomalyEvent, Flag


def anomaly_id(node_id: str, measurement: str, started_at: int) -> str:
    """Deterministic id of an incident: the same data always yields the same id.

    >>> anomaly_id("n1", "flow_rate", 0) == anomaly_id("n1", "flow_rate", 0)
    True
    >>> len(anomaly_id("n1", "flow_rate", 0))
    32
    """
    key = f"{node_id}\x1f{measurement}\x1f{started_at}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


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


class _IncidentTracking:
    """The incident half of ``NodeScorer``: hysteresis, kinds, flag and night-flow events.

    A mixin: the state and the parameters it reads are ``NodeScorer``'s (declared below for
    the type checker); ``NodeScorer.score`` calls ``_track``, ``_apply_night``,
    ``_track_flags`` and ``_event``.
    """

    node_id: str
    z0: float
    open_score: float
    open_n: int
    instant_score: float
    close_score: float
    close_n: int
    burst_score: float
    burst_rel: float
    burst_jump: float
    spike_max_n: int
    spike_return: float
    open_: dict[str, _Incident]
    run_n_: dict[str, int]
    run_start_: dict[str, int]
    run_peak_: dict[str, _Incident]
    last_values_: np.ndarray
    last_burst_: tuple[int, int] | None
    spike_cand_: _SpikeCand | None

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
