"""Packing of ``NodeScorer``'s state for snapshots (``dataflows.anomaly``).

``NodeScorer.__getstate__`` writes, and ``__setstate__`` reads, a tuple: the state version,
the measurement set by index, the parameters that differ from the defaults, the rows of the
measurements reported, the slot tables compressed (``_pack_tables``), the day's pending sums
for the hours that have some (``_pack_pending``), small arrays as raw bytes (``_ROW_ARRAYS``)
and the rest as it is (``_PLAIN``). Lossless: a resumed scorer emits exactly what an
uninterrupted one does (``bench/state_size.py --digest``).
"""

from __future__ import annotations

import zlib

import numpy as np

from dataflows.anomaly_kernels import _DEV, _LOC, _NB, _P_N, _P_W, _P_X, SCORED, SCORED_QUALITY
from dataflows.packing import pack_counts, unpack_counts

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
