"""Arrays of the node objects' state packed losslessly for their snapshots.

Every node object is pickled in every snapshot, so a few bytes per value count: whole counts
held as floats go in the narrowest unsigned type that holds them, and int64 values (times,
window indices), or the steps between sorted ones, as multiples of their common divisor.
Used by validation, scoring and the KPI windows (``__getstate__``/``__setstate__``).
"""

from __future__ import annotations

import zlib
from typing import Any

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


#: Readings per hour tried, in order, as the common count of ``pack_means`` (5, 1, 15, 10
#: minutes, 30 s; an hour with another count is stored as it is).
MEAN_COUNTS = (12, 60, 4, 6, 120, 2, 1)


def _means(whole: np.ndarray, count: int, unit: float) -> np.ndarray:
    """float32 of ``whole * unit / count``: how ``pack_means`` encodes and decodes alike."""
    return (whole * unit / count).astype(np.float32)


def pack_means(a: np.ndarray, unit: float) -> tuple[object, ...] | None:
    """float32 means of a few whole multiples of ``unit``, packed exactly; None if they are not.

    Hourly means of readings with a fixed resolution (3 decimals: ``unit`` 1e-3) are, but
    for a few hours, ``k * unit / n`` with the same count ``n`` of readings: each is kept as
    the whole ``k``, written as the zigzag step from the value before it (pass the hours of
    a day grid by column, so that a step is from the same hour a day before), in byte planes
    compressed with zlib: about 2 bytes a value for the hourly flow of a household meter
    (entropy, not a fixed width) instead of 4 bytes of float32. A value that no ``k`` gives
    back bit for bit is kept as it is, with its position. NaN are a bitmap (compressed with
    the planes: gaps are rare). Returns None when most values are not such means.

    >>> a = np.array([1.0, 2.5 / 12, np.nan, 0.1], np.float32)
    >>> packed = pack_means(a, 1e-3)
    >>> packed[2], np.array_equal(unpack_means(packed), a, equal_nan=True)
    (12, True)
    >>> pack_means(np.array([np.pi, np.e], np.float32), 1e-3) is None
    True
    """
    flat = np.ascontiguousarray(a, dtype=np.float32).ravel()
    nan = np.isnan(flat)
    canonical = np.array(np.nan, dtype=np.float32).view(np.uint32)
    if nan.any() and not (flat[nan].view(np.uint32) == canonical).all():
        return None
    known = flat[~nan]
    if known.size == 0:
        return None
    wide = known.astype(np.float64)
    for count in MEAN_COUNTS:
        whole = np.rint(wide * (count / unit)) + 0.0  # -0.0 as 0.0, as the decoder's ints
        big = ~(np.abs(whole) < 2**30)  # (and inf) left as they are
        whole[big] = 0.0
        # bit for bit: -0.0 is not 0.0
        ok = ~big & (_means(whole, count, unit).view(np.uint32) == known.view(np.uint32))
        if 2 * ok.sum() < known.size:
            continue
        step: np.ndarray = np.diff(whole.astype(np.int64), prepend=0)
        zigzag = ((step << 1) ^ (step >> 63)).astype("<u4")  # 0, -1, 1, -2 ... as 0, 1, 2 ...
        width = max(1, (int(zigzag.max()).bit_length() + 7) // 8)
        planes = zigzag.view(np.uint8).reshape(-1, 4)[:, :width].T.tobytes()
        odd = np.flatnonzero(~ok)
        data = zlib.compress(np.packbits(nan).tobytes() + planes, 9)
        return ("means", flat.size, count, unit, width, data, odd.astype("<u4").tobytes(),
                known[odd].tobytes())
    return None


def unpack_means(packed: tuple[object, ...]) -> np.ndarray:
    """The flat float32 array ``pack_means`` packed."""
    _, size, count, unit, width, data, odd_b, odd_v = packed
    assert isinstance(size, int) and isinstance(count, int) and isinstance(width, int)
    assert isinstance(unit, float) and isinstance(data, bytes)
    assert isinstance(odd_b, bytes) and isinstance(odd_v, bytes)
    raw_b = np.frombuffer(zlib.decompress(data), np.uint8)
    nan = np.unpackbits(raw_b[: (size + 7) // 8], count=size).astype(bool)
    planes = raw_b[(size + 7) // 8 :].reshape(width, -1)
    raw = np.zeros((planes.shape[1], 4), np.uint8)
    raw[:, :width] = planes.T
    zigzag = raw.view("<u4").ravel().astype(np.int64)
    whole = np.cumsum((zigzag >> 1) ^ -(zigzag & 1))
    known = _means(whole.astype(np.float64), count, unit)
    known[np.frombuffer(odd_b, "<u4")] = np.frombuffer(odd_v, np.float32)
    out = np.full(size, np.nan, np.float32)
    out[~nan] = known
    return out


def pack_decimals(a: np.ndarray, scale: int = 1000) -> tuple[object, ...]:
    """float64 values packed exactly: as whole ``1 / scale`` steps if every one is such a step.

    Readings with 3 decimals (and their minima and maxima) are the doubles nearest
    ``k / 1000``: they are kept as the whole ``k`` above the smallest, in the narrowest
    unsigned type, NaN as a bitmap; other arrays as their bytes.

    >>> a = np.array([[5.284, np.nan], [229449.108, -0.5]])
    >>> packed = pack_decimals(a)
    >>> packed[0], np.array_equal(unpack_decimals(packed).reshape(2, 2), a, equal_nan=True)
    ('dec', True)
    >>> pack_decimals(np.array([0.1 + 0.2]))[0], pack_decimals(np.array([-0.0]))[0]
    ('raw', 'raw')
    """
    flat = np.ascontiguousarray(a, dtype=np.float64).ravel()
    nan = np.isnan(flat)
    known = flat[~nan] if nan.any() else flat
    # (inf and values too large for whole steps fail the first test)
    if known.size and max(-known.min(), known.max()) < 2**52 / scale:
        k = np.rint(known * scale).astype(np.int64)
        # decoded as unpack_decimals does, and compared bit for bit (so -0.0 is not taken
        # for 0.0, nor a NaN with a payload for NaN)
        exact = np.array_equal((k / scale).view(np.int64), known.view(np.int64))
        if exact and (known.size == flat.size or _canonical_nan(flat[nan])):
            low = int(k.min())
            k -= low
            top = int(k.max())
            dtype = next(t for t in ("u1", "u2", "u4", "u8") if top <= np.iinfo(t).max)
            return ("dec", flat.size, scale, np.packbits(nan).tobytes(), low, dtype,
                    k.astype(dtype).tobytes())
    return ("raw", flat.tobytes())


def _canonical_nan(nan: np.ndarray) -> bool:
    return bool((nan.view(np.int64) == np.array(np.nan).view(np.int64)).all())


def unpack_decimals(packed: tuple[Any, ...]) -> np.ndarray:
    """The flat float64 array ``pack_decimals`` packed."""
    if packed[0] == "raw":
        return np.frombuffer(packed[1]).copy()
    _, size, scale, nan_b, low, dtype, whole = packed
    nan = np.unpackbits(np.frombuffer(nan_b, np.uint8), count=size).astype(bool)
    out = np.full(size, np.nan)
    out[~nan] = (np.frombuffer(whole, dtype=dtype).astype(np.int64) + low) / scale
    return out
