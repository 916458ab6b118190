"""The compute limit: pyarrow + numpy compute the 15-minute aggregates and a robust score.

No streaming engine, no validation, no writes: one pass over a CSV that the whole file fits in
memory for. Per node, 15-minute window and measurement: count, mean, min, max, std; per node and
scored measurement (flow_rate, pressure, level): a trailing rolling median/MAD z-score of each
reading against the node's previous ``ROLLING`` readings (no look-ahead), the kind of robust score
the dataflow's anomaly step computes (its baseline is seasonal, this one is simpler).

Run as a child of bench/compare.py: `python bench/compute_limit.py FILE` prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from numpy.lib.stride_tricks import sliding_window_view

from dataflows.model import MEASUREMENTS

WINDOW_US = 15 * 60 * 1_000_000
SCORED = ("flow_rate", "pressure", "level")
#: Readings in the trailing window of the robust score (an hour at 5-minute steps).
ROLLING = 12


def read(path: Path) -> pa.Table:
    return pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types={"timestamp": pa.timestamp("us", tz="UTC"), "node_id": pa.string()}
        ),
    )


def window_aggregates(table: pa.Table) -> int:
    """Per node, window and measurement count/mean/min/max/std; returns the (node, window) count."""
    ts = table["timestamp"].combine_chunks().cast(pa.int64()).to_numpy()
    node_codes = pc.dictionary_encode(table["node_id"]).combine_chunks().indices.to_numpy()
    window = ts // WINDOW_US
    key = node_codes.astype(np.int64) * (1 << 40) + (window - window.min())
    uniq, group = np.unique(key, return_inverse=True)
    groups = len(uniq)
    for m in MEASUREMENTS:
        if m not in table.column_names:
            continue
        x = table[m].combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
        ok = ~np.isnan(x)
        g, v = group[ok], x[ok]
        n = np.bincount(g, minlength=groups)
        s = np.bincount(g, weights=v, minlength=groups)
        s2 = np.bincount(g, weights=v * v, minlength=groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / n
            _std = np.sqrt(np.maximum(s2 / n - mean * mean, 0))
        lo = np.full(groups, np.inf)
        hi = np.full(groups, -np.inf)
        np.minimum.at(lo, g, v)
        np.maximum.at(hi, g, v)
    return groups


def robust_scores(table: pa.Table) -> int:
    """Rolling median/MAD z of every scored reading per node; returns how many have |z| > 4."""
    ts = table["timestamp"].combine_chunks().cast(pa.int64()).to_numpy()
    node_codes = pc.dictionary_encode(table["node_id"]).combine_chunks().indices.to_numpy()
    order = np.lexsort((ts, node_codes))
    flagged = 0
    for m in SCORED:
        if m not in table.column_names:
            continue
        x = table[m].combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)[order]
        nodes = node_codes[order]
        ok = ~np.isnan(x)
        x, nodes = x[ok], nodes[ok]
        if len(x) <= ROLLING:
            continue
        past = sliding_window_view(x, ROLLING)[:-1]  # row i: the ROLLING readings before x[i+W]
        med = np.median(past, axis=1)
        mad = np.median(np.abs(past - med[:, None]), axis=1)
        current = x[ROLLING:]
        same_node = nodes[ROLLING:] == nodes[:-ROLLING]  # the window does not reach another node
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (current - med) / (1.4826 * mad + 1e-9)
        flagged += int(np.count_nonzero(same_node & (np.abs(z) > 4)))
    return flagged


def main() -> int:
    path = Path(sys.argv[1])
    t0 = time.perf_counter()
    table = read(path)
    windows = window_aggregates(table)
    flagged = robust_scores(table)
    seconds = time.perf_counter() - t0
    print(json.dumps({"readings": table.num_rows, "windows": windows, "flagged": flagged,
                      "work_s": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
