"""Small numpy helpers the domain modules share (no I/O, nothing of ours imported)."""

from __future__ import annotations

import numpy as np

_FLOAT_MAX = float(np.finfo(np.float64).max)


def nan_to_num(x: np.ndarray) -> np.ndarray:
    """``np.nan_to_num`` of a float64 array (NaN 0, infinities the largest finite values).

    The same values as numpy's, in three ufunc calls instead of its ~12 µs of Python (the KPI
    windows call it every batch, the district balance every time it writes rows).

    >>> nan_to_num(np.array([np.nan, -np.inf, np.inf, -0.0, 1.5])).tolist()
    [0.0, -1.7976931348623157e+308, 1.7976931348623157e+308, -0.0, 1.5]
    """
    out = np.where(np.isnan(x), 0.0, x)
    return np.minimum(np.maximum(out, -_FLOAT_MAX, out=out), _FLOAT_MAX, out=out)
