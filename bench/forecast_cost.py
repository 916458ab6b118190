"""Cost of the demand forecasts: time per closed series-day and state size per series.

Feeds ``NodeForecaster`` one year of 5-minute flow for a few nodes (one batch per day, as a
live flow would deliver many small ones), and prints the time per closed day (which issues
two models' 168-hour forecasts and scores the pending ones) and the pickled state per node.

    .venv/bin/python bench/forecast_cost.py [--nodes 5] [--days 365]
"""

from __future__ import annotations

import argparse
import pickle
import time
from datetime import date

import numpy as np

from dataflows.forecast import NodeForecaster
from dataflows.forecast_calendar import local_midnight_us
from dataflows.model import COL, US_PER_MIN, ReadingBatch, empty_values

TZ = "Europe/Rome"


def day_batch(node: str, day: int, rng: np.random.Generator) -> ReadingBatch:
    start = local_midnight_us(day, TZ)
    t = np.arange(288)
    flow = 10 + 5 * np.sin((t / 12 - 6) / 24 * 2 * np.pi) + rng.normal(0, 0.5, 288)
    values = empty_values(288)
    values[:, COL["flow_rate"]] = flow
    ts = start + t.astype(np.int64) * 5 * US_PER_MIN
    return ReadingBatch(node, "bench", ts, values, t, np.ones(288), np.zeros(288, np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    first = date(2024, 1, 1).toordinal()
    batches = [
        [day_batch(f"n{i}", first + d, rng) for d in range(args.days)] for i in range(args.nodes)
    ]
    started = time.perf_counter()
    nodes = []
    issued = 0
    for node_batches in batches:
        node = NodeForecaster(node_batches[0].node_id, TZ)
        for batch in node_batches:
            out = node.update(batch)
            issued += out.forecasts.frame.height if out.forecasts is not None else 0
        nodes.append(node)
    elapsed = time.perf_counter() - started
    closes = args.nodes * (args.days - 1)
    sizes = [len(pickle.dumps(n)) for n in nodes]
    print(f"{closes} series-days closed in {elapsed:.1f} s: {elapsed / closes * 1e3:.2f} ms each "
          f"(readings to hours, close, score, learn, issue {issued // closes} rows)")
    print(f"pickled state per node: {max(sizes) / 1024:.1f} KB")


if __name__ == "__main__":
    main()
