"""Arrays of the node objects' state packed losslessly for their snapshots.

Every node object is pickled in every snapshot, so a few bytes per value count: whole counts
held as floats go in the narrowest unsigned type that holds them, and int64 values (times,
window indices), or the steps between sorted ones, as multiples of their common divisor.
Used by validation, scoring and the KPI windows (``__getstate__``/``__setstate__``).
"""

from __future__ import annotations

import numpy as np


def pack_counts(counts: np.ndarray) -> tuple[str, bytes]:
    """Whole counts held as floats, in the narrowest unsigned type that holds them exactly.

    >>> pack_counts(np.array([0.0, 3.0]))[0]
    'u1'
    >>> pack_counts(np.array([0.5]))[0]
    '<f8'
    """
    if counts.size and counts.min() >= 0:
        top = counts.max()
        for dtype in ("u1", "u2"):
            if top <= np.iinfo(dtype).max:
                narrow = counts.astype(dtype)
                if np.array_equal(narrow, counts):
                    return dtype, narrow.tobytes()
                break
    return counts.dtype.str, counts.tobytes()


def unpack_counts(packed: tuple[str, bytes]) -> np.ndarray:
    """The counts ``pack_counts`` packed (read-only, in the narrow type)."""
    dtype, data = packed
    return np.frombuffer(data, dtype=dtype)


def pack_int64(a: np.ndarray, *, steps: bool = False) -> tuple[int, int, str, bytes]:
    """int64 values packed exactly: (first, unit, dtype, data).

    The values (or, with ``steps``, the steps between sorted ones) as multiples of their
    common divisor in the narrowest unsigned type, or when all alike as that value and their
    number (dtype "="); other arrays as they are (dtype "i8").

    >>> unpack_int64(pack_int64(np.array([300, 600, 900]) * 10**6)).tolist()
    [300000000, 600000000, 900000000]
    >>> pack_int64(np.array([7, 8, 9, 11]), steps=True)[2]
    'u1'
    >>> unpack_int64(pack_int64(np.array([7, 8, 9]), steps=True), steps=True).tolist()
    [7, 8, 9]
    >>> unpack_int64(pack_int64(np.array([0, 0]))).tolist()
    [0, 0]
    """
    a = np.asarray(a, dtype=np.int64)
    d = np.diff(a) if steps else a
    if d.size == 0 or d.min() < 0:
        return 0, 0, "i8", a.tobytes()
    first = int(a[0]) if steps else 0
    top = int(d.max())
    if top == int(d.min()):
        return first, top, "=", d.size.to_bytes(4, "little")
    unit = max(int(np.gcd.reduce(d)), 1)
    q = d // unit
    dtype = next(t for t in ("u1", "u2", "u4", "u8") if top // unit <= np.iinfo(t).max)
    return first, unit, dtype, q.astype(dtype).tobytes()


def unpack_int64(packed: tuple[int, int, str, bytes], *, steps: bool = False) -> np.ndarray:
    """The int64 array ``pack_int64`` packed (with the same ``steps``)."""
    first, unit, dtype, data = packed
    if dtype == "i8":
        return np.frombuffer(data, dtype=np.int64).copy()
    if dtype == "=":
        d = np.full(int.from_bytes(data, "little"), unit, dtype=np.int64)
    else:
        d = np.frombuffer(data, dtype=dtype).astype(np.int64) * unit
    if not steps:
        return d
    out = np.empty(d.size + 1, dtype=np.int64)
    out[0] = first
    np.cumsum(d, out=out[1:])
    out[1:] += first
    return out
