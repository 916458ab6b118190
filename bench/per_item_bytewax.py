"""A straightforward per-item Bytewax flow: the 15-minute aggregates, one item per reading.

Written the way the Bytewax documentation's windowing examples are: a ``CSVSource`` yields one
dict per line, a ``map`` parses it, ``key_on`` keys it by node, and ``fold_window`` over a
``TumblingWindower`` with an ``EventClock`` folds count/sum/sum of squares/min/max of every
measurement; a ``map`` turns each closed window into count/mean/min/max/std. Lateness is the
replay's default (6 h). No validation, no scoring, no writes: less work than this project's flow.
Run as a child of bench/compare.py: `python bench/per_item_bytewax.py FILE`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.files import CSVSource
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, TumblingWindower
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main

from dataflows.model import MEASUREMENTS


@dataclass
class Reading:
    node_id: str
    ts: datetime
    values: dict[str, float]


def parse(row: dict[str, str]) -> Reading:
    ts = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))
    values = {m: float(row[m]) for m in MEASUREMENTS if row.get(m)}
    return Reading(row["node_id"], ts, values)


Stats = dict[str, list[float]]  # measurement -> [count, sum, sum of squares, min, max]


def add(acc: Stats, m: str, x: float) -> None:
    """Take one value of measurement ``m`` into the window's statistics."""
    s = acc.get(m)
    if s is None:
        acc[m] = [1.0, x, x * x, x, x]
    else:
        s[0] += 1
        s[1] += x
        s[2] += x * x
        s[3] = min(s[3], x)
        s[4] = max(s[4], x)


def fold(acc: Stats, reading: Reading) -> Stats:
    for m, x in reading.values.items():
        add(acc, m, x)
    return acc


def merge(a: Stats, b: Stats) -> Stats:
    for m, s in b.items():
        t = a.get(m)
        if t is None:
            a[m] = s
        else:
            a[m] = [t[0] + s[0], t[1] + s[1], t[2] + s[2], min(t[3], s[3]), max(t[4], s[4])]
    return a


def summarize(stats: Stats) -> dict[str, tuple[float, float, float, float, float]]:
    out = {}
    for m, (n, s, s2, lo, hi) in stats.items():
        mean = s / n
        out[m] = (n, mean, lo, hi, math.sqrt(max(s2 / n - mean * mean, 0.0)))
    return out


class CountSink(DynamicSink):
    def __init__(self) -> None:
        self.count = 0

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition:
        sink = self

        class _Part(StatelessSinkPartition):
            def write_batch(self, items: list) -> None:
                sink.count += len(items)

        return _Part()


def build(path: Path, sink: CountSink, counter: list[int]) -> Dataflow:
    flow = Dataflow("per_item_windows")
    rows = op.input("read_csv", flow, CSVSource(path))
    readings = op.map("parse", rows, parse)

    def count(r: Reading) -> Reading:
        counter[0] += 1
        return r

    keyed = op.key_on("by_node", op.map("count", readings, count), lambda r: r.node_id)
    clock = EventClock(lambda r: r.ts, wait_for_system_duration=timedelta(hours=6))
    windower = TumblingWindower(length=timedelta(minutes=15),
                                align_to=datetime(2024, 1, 1, tzinfo=UTC))
    windows = win.fold_window("stats_15m", keyed, clock, windower, dict, fold, merge)
    stats = op.map_value("summarize", windows.down, lambda w: (w[0], summarize(w[1])))
    op.output("drop", stats, sink)
    return flow


def main() -> int:
    path = Path(sys.argv[1])
    sink, counter = CountSink(), [0]
    t0 = time.perf_counter()
    run_main(build(path, sink, counter))
    seconds = time.perf_counter() - t0
    print(json.dumps({"readings": counter[0], "windows": sink.count, "work_s": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
