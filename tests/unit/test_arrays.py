"""dataflows.arrays: numpy helpers shared by the domain modules."""

from __future__ import annotations

import numpy as np

from dataflows.arrays import nan_to_num


def test_nan_to_num_gives_numpys_values_to_the_bit():
    rng = np.random.default_rng(5)
    x = np.concatenate(([np.nan, np.inf, -np.inf, -0.0, 0.0], rng.normal(0, 1e6, 50)))
    rng.shuffle(x)
    assert nan_to_num(x).tobytes() == np.nan_to_num(x).tobytes()
