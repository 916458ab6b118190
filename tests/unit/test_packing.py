"""The state packers give back exactly what they packed, bit for bit, whatever the values."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.packing import pack_decimals, pack_means, unpack_decimals, unpack_means


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("count", [12, 11, 60, 4])
def test_hourly_means_of_3_decimal_readings_round_trip_bit_for_bit(count: int) -> None:
    rng = np.random.default_rng(count)
    readings = np.round(rng.uniform(0, 80, (56 * 24, count)), 3)
    readings[rng.random(readings.shape) < 0.02] = np.nan  # some hours miss a reading
    micro = np.rint(readings / 1e-6)  # as NodeForecaster sums them
    n = np.sum(~np.isnan(micro), axis=1)
    with np.errstate(all="ignore"):
        means = (np.nansum(micro, axis=1) / n * 1e-6).astype(np.float32)
    means[rng.random(means.size) < 0.05] = np.nan  # unknown hours
    grid = means.reshape(-1, 24)
    packed = pack_means(grid.T, 1e-3)
    assert packed is not None
    back = unpack_means(packed).reshape(24, -1).T
    np.testing.assert_array_equal(_bits(back), _bits(grid))
    assert len(packed[5]) < 0.8 * grid.nbytes  # type: ignore[arg-type]


def test_means_that_are_not_of_whole_steps_are_left_to_the_caller() -> None:
    rng = np.random.default_rng(1)
    assert pack_means(rng.normal(size=500).astype(np.float32), 1e-3) is None
    assert pack_means(np.full(3, np.nan, np.float32), 1e-3) is None
    odd_nan = np.array([1.0, np.nan], np.float32)
    odd_nan.view(np.uint32)[1] |= 1  # a NaN with a payload
    assert pack_means(odd_nan, 1e-3) is None


def test_a_few_odd_values_among_means_are_kept_as_they_are() -> None:
    a = np.array([1.5, 2.25, np.pi, -3.125, 0.0, -0.0, 1e30], np.float32)
    packed = pack_means(a, 1e-3)
    assert packed is not None
    np.testing.assert_array_equal(_bits(unpack_means(packed)), _bits(a))


def test_decimals_round_trip_bit_for_bit_or_stay_raw() -> None:
    rng = np.random.default_rng(3)
    readings = np.round(rng.uniform(-5, 900_000, (2, 25, 3)), 3)
    readings[rng.random(readings.shape) < 0.1] = np.nan
    packed = pack_decimals(readings)
    assert packed[0] == "dec"
    back = unpack_decimals(packed).reshape(readings.shape)
    np.testing.assert_array_equal(_bits(back), _bits(readings))
    for odd in ([0.1 + 0.2], [-0.0, 1.0], [np.inf], [1e300], [], [np.nan]):
        a = np.array(odd, dtype=np.float64)
        packed = pack_decimals(a)
        np.testing.assert_array_equal(_bits(unpack_decimals(packed)), _bits(a))
    assert pack_decimals(np.array([0.1 + 0.2]))[0] == "raw"
    assert pack_decimals(np.array([-0.0]))[0] == "raw"
