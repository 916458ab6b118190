"""Totalizer against integrated flow: a meter's volume counter checked against its flow rate.

A meter that reports both ``flow_rate`` (L/s) and ``total_flow`` (m3, cumulative) measures the
same water twice. Over the last ``HORIZON_S`` the totalizer's increments and the flow
integrated over time (trapezoids between successive readings) must agree within ``REL_TOL`` of
the volume, or ``ABS_TOL_M3`` for small volumes (totalizer resolution, sampling of the flow).
A reading where they do not gets ``Flag.TOTALIZER_MISMATCH``: one of the two is wrong (a stuck
register, a flow sensor drifting, a wrong pulse factor), and the balance should not trust it.

Only readings carrying both values take part. An interval with a totalizer reset or a gap
(``broken``), or that ends at a reading whose flow is not trusted (``suspect``: a spike, a flat
line) adds to neither sum: a single spike would otherwise move an hour's volume by a fifth.
The comparison at a reading uses only earlier readings, and its reference point (the newest
checkpoint at least ``HORIZON_S`` old) is chosen from the series itself: the first reading of
every ``CHECKPOINT_S`` bucket of time, so the outcome does not depend on how the input was cut
into batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HORIZON_S = 3600
REL_TOL = 0.10
ABS_TOL_M3 = 0.5
#: Checkpoints: the first reading of each bucket of this length (state: a dozen of them).
CHECKPOINT_S = HORIZON_S // 8
_US = 1_000_000


class TotalizerCheck:
    """The state of one meter: its last pair of values, running sums and recent checkpoints."""

    __slots__ = (
        "last_t", "last_flow", "last_total", "last_suspect", "sum_total", "sum_flow", "marks"
    )

    def __init__(self) -> None:
        self.last_t: int | None = None
        self.last_flow = np.nan
        self.last_total = np.nan
        self.last_suspect = False
        # Running volumes (m3) since the first pair, over the unbroken intervals only.
        self.sum_total = 0.0
        self.sum_flow = 0.0
        # Checkpoints: rows of (t in µs, sum_total, sum_flow), ascending t.
        self.marks = np.zeros((0, 3))

    def __getstate__(self) -> tuple[object, ...]:
        # A tuple in slot order, the checkpoints as raw bytes: a dict of the slots' names and
        # a pickled array cost about 300 bytes besides the data. Lossless.
        return (
            self.last_t, float(self.last_flow), float(self.last_total), self.last_suspect,
            self.sum_total, self.sum_flow, self.marks.tobytes(),
        )

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):  # a snapshot of the release before packing
            for name, value in state.items():
                setattr(self, name, value)
            return
        (self.last_t, self.last_flow, self.last_total, self.last_suspect, self.sum_total,
         self.sum_flow, marks) = state
        self.marks = np.frombuffer(marks).reshape(-1, 3).copy()

    def mismatch(
        self,
        t: np.ndarray,
        flow: np.ndarray,
        total: np.ndarray,
        broken: np.ndarray,
        suspect: np.ndarray,
    ) -> np.ndarray:
        """Per reading of the in-order series (``t`` ascending): True where they disagree.

        ``flow``/``total`` are NaN where the reading lacks the value; ``broken`` marks readings
        after a gap or a reset, ``suspect`` readings whose flow is flagged: an interval ending at
        either kind, or starting at a suspect one, counts in neither sum.
        """
        out = np.zeros(t.size, dtype=bool)
        pair = np.flatnonzero(np.isfinite(flow) & np.isfinite(total))
        if pair.size == 0:
            return out
        t, flow, total = t[pair], flow[pair], total[pair]
        broken, suspect = broken[pair], suspect[pair]
        prev_t = np.concatenate(([self.last_t if self.last_t is not None else -1], t[:-1]))
        prev_flow = np.concatenate(([self.last_flow], flow[:-1]))
        prev_total = np.concatenate(([self.last_total], total[:-1]))
        prev_suspect = np.concatenate(([self.last_suspect], suspect[:-1]))
        counted = (prev_t >= 0) & ~broken & ~suspect & ~prev_suspect & (total >= prev_total)
        d_total = np.where(counted, total - prev_total, 0.0)
        seconds = (t - prev_t) / _US
        d_flow = np.where(counted, (flow + prev_flow) / 2 * seconds / 1000.0, 0.0)
        sum_total = self.sum_total + np.cumsum(d_total)
        sum_flow = self.sum_flow + np.cumsum(d_flow)

        width = CHECKPOINT_S * _US
        bucket = t // width
        before = -1 if self.last_t is None else self.last_t // width
        prev_bucket = np.concatenate(([before], bucket[:-1]))
        new = bucket != prev_bucket
        marks = np.concatenate(
            (self.marks, np.column_stack((t[new], sum_total[new], sum_flow[new])))
        )
        # The reference of each reading: the newest checkpoint at least HORIZON_S before it.
        ref = np.searchsorted(marks[:, 0], t - HORIZON_S * _US, side="right") - 1
        has_ref = ref >= 0
        r = np.maximum(ref, 0)
        v_total = sum_total - marks[r, 1]
        v_flow = sum_flow - marks[r, 2]
        limit = np.maximum(REL_TOL * np.maximum(np.abs(v_total), np.abs(v_flow)), ABS_TOL_M3)
        out[pair] = has_ref & (np.abs(v_total - v_flow) > limit)

        self.last_t, self.last_flow, self.last_total = int(t[-1]), flow[-1], total[-1]
        self.last_suspect = bool(suspect[-1])
        self.sum_total, self.sum_flow = float(sum_total[-1]), float(sum_flow[-1])
        # Keep the checkpoints a later reading may still need: from the newest one that is at
        # least a horizon old (as of the newest reading) on.
        keep = np.searchsorted(marks[:, 0], t[-1] - HORIZON_S * _US, side="right") - 1
        self.marks = marks[max(keep, 0):].copy()
        return out
