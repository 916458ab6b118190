"""Pickled state per node (issue 9: "state at most 20 KB per node").

Simulates a network (``waterflow simulate``: districts of 10 nodes, 5-minute steps), then
replays each node's readings through the flow's per-node objects exactly as the stateful steps
chain them (``dataflows.pipeline``): ``NodeValidator`` -> ``NodeScorer`` -> ``NodeWindows``, and
``NodeForecaster`` on the accepted readings, in batches of ``--batch-hours`` of arrival order.
After every batch each object is pickled as ``_PerNode.snapshot`` does, and the script prints,
per object kind and per node kind (the simulator's roles), the median and the maximum over
nodes of (a) the size after the last batch and (b) the largest size seen during the replay,
and the same for the sum over a node's four objects (its total state).

With ``--digest`` it also prints a SHA-256 of everything the objects emitted (accepted readings
with flags and quality, scores, anomaly events, KPI rows, forecast and accuracy rows) and of a
run resumed from pickled state every ``--resume-every`` batches: a change of state layout must
leave both digests unchanged.

    .venv/bin/python bench/state_size.py [--districts 10] [--days 14] [--batch-hours 1] [--digest]
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dataflows.anomaly import NodeScorer
from dataflows.forecast import NodeForecaster
from dataflows.kpi import NodeWindows
from dataflows.model import MEASUREMENTS, US_PER_HOUR, ReadingBatch
from dataflows.settings import Settings
from dataflows.simulate import simulate
from dataflows.tables import TableRows
from dataflows.topology import load_network
from dataflows.validation import NodeValidator

KINDS = ("validation", "anomaly", "kpi", "forecast")


def _load(path: Path) -> pl.DataFrame:
    df = pl.read_csv(path, schema_overrides={m: pl.Float64 for m in MEASUREMENTS})
    ts = pl.col("timestamp").str.to_datetime(time_zone="UTC", time_unit="us").dt.epoch("us")
    return df.with_row_index("line", offset=2).with_columns(ts.alias("ts"))


def _snap(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class _Digest:
    """SHA-256 over the arrays and rows the objects emit, in order."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def array(self, a: np.ndarray | None) -> None:
        if a is None:
            self.h.update(b"none")
            return
        a = np.ascontiguousarray(a)
        self.h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())

    def rows(self, t: TableRows | None) -> None:
        if t is None:
            self.h.update(b"none")
            return
        self.h.update(t.table.encode())
        self.h.update(t.frame.write_csv().encode())


def _node(node_id: str, rows: pl.DataFrame, settings: Settings, batch_hours: float,
          resume_every: int, digest: _Digest | None, spent: dict[str, float],
          ) -> tuple[dict[str, int], dict[str, int], dict[str, Any]]:
    """Replay one node; (size after the last batch, largest size) per kind, and the objects.

    ``spent`` gathers the seconds spent pickling, per kind, and the CPU seconds of each object's
    work (key "<kind> work").
    """
    ts = rows["ts"].to_numpy()
    values = np.column_stack([rows[m].to_numpy() for m in MEASUREMENTS]).astype(np.float64)
    line = rows["line"].to_numpy().astype(np.int64)
    key = np.maximum.accumulate(ts) // int(batch_hours * US_PER_HOUR)
    cuts = np.flatnonzero(np.diff(key)) + 1
    objs: dict[str, Any] = {
        "validation": NodeValidator(node_id, settings),
        "anomaly": NodeScorer(node_id, settings),
        "kpi": NodeWindows(node_id, settings),
        "forecast": NodeForecaster(node_id, settings.tz, settings.holidays),
    }
    biggest = dict.fromkeys(KINDS, 0)
    last = dict.fromkeys(KINDS, 0)
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, ts.size], strict=True)):
        batch = ReadingBatch(node_id, "sim", ts[a:b], values[a:b], line[a:b])
        t0 = time.process_time()
        acc = objs["validation"].validate(batch).accepted
        t1 = time.process_time()
        spent["validation work"] += t1 - t0
        if len(acc):
            scores, events = objs["anomaly"].score(acc)
            t2 = time.process_time()
            scored = ReadingBatch(acc.node_id, acc.source, acc.ts, acc.values, acc.line,
                                  acc.quality, acc.flags, scores)
            out = objs["kpi"].update(scored)
            t3 = time.process_time()
            fc = objs["forecast"].update(acc)
            spent["anomaly work"] += t2 - t1
            spent["kpi work"] += t3 - t2
            spent["forecast work"] += time.process_time() - t3
            if digest is not None:
                for arr in (acc.ts, acc.values, acc.flags, acc.quality, scores, out.late):
                    digest.array(arr)
                digest.h.update(repr(events).encode())
                for t in (out.kpi_15m, out.kpi_daily, fc.forecasts, fc.accuracy):
                    digest.rows(t)
        for k, obj in objs.items():
            t0 = time.perf_counter()
            blob = _snap(obj)
            spent[k] += time.perf_counter() - t0
            last[k] = len(blob)
            biggest[k] = max(biggest[k], len(blob))
            if resume_every and (i + 1) % resume_every == 0:
                objs[k] = pickle.loads(blob)  # noqa: S301 - our own bytes
        spent["snapshots"] += 1
    if digest is not None:
        digest.h.update(repr(objs["anomaly"].flush()).encode())
        fc = objs["forecast"].flush()
        digest.rows(fc.forecasts)
        digest.rows(fc.accuracy)
    return last, biggest, objs


def _table(title: str, sizes: dict[tuple[str, str], list[int]]) -> None:
    roles = sorted({r for _, r in sizes})
    print(f"\n{title} (KB: median / max over nodes)")
    print(f"{'kind':<12}" + "".join(f"{r:>16}" for r in [*roles, "all nodes"]))
    for kind in (*KINDS, "total"):
        cells = []
        for role in [*roles, None]:
            v = [x for (k, r), xs in sizes.items() if k == kind and role in (None, r) for x in xs]
            cells.append(f"{statistics.median(v) / 1024:6.1f} / {max(v) / 1024:5.1f}")
        print(f"{kind:<12}" + "".join(f"{c:>16}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--districts", type=int, default=10)
    p.add_argument("--nodes-per-district", type=int, default=10)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-hours", type=float, default=1.0)
    p.add_argument("--digest", action="store_true", help="print digests of the outputs")
    p.add_argument("--resume-every", type=int, default=5,
                   help="with --digest, a second run resumes from pickles every N batches")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = simulate(Path(tmp), districts=args.districts,
                       nodes_per_district=args.nodes_per_district, days=args.days,
                       seed=args.seed)
        readings = _load(res.readings_path)
        network = load_network(res.network_path)
        roles = {n: spec.role or "?" for n, spec in network.nodes.items()}
    settings = Settings(network=network)
    final: dict[tuple[str, str], list[int]] = defaultdict(list)
    peak: dict[tuple[str, str], list[int]] = defaultdict(list)
    spent: dict[str, float] = defaultdict(float)
    runs = [(0, _Digest()), (args.resume_every, _Digest())] if args.digest else [(0, None)]
    for resume_every, digest in runs:
        for (node_id,), rows in readings.group_by(["node_id"], maintain_order=True):
            last, biggest, _ = _node(str(node_id), rows, settings, args.batch_hours,
                                     resume_every, digest, spent)
            if resume_every:
                continue
            role = roles.get(str(node_id), "?")
            for k in KINDS:
                final[(k, role)].append(last[k])
                peak[(k, role)].append(biggest[k])
            final[("total", role)].append(sum(last.values()))
            peak[("total", role)].append(sum(biggest.values()))
    print(f"{readings.height} readings of {readings['node_id'].n_unique()} nodes, {args.days} "
          f"days, batches of {args.batch_hours} h, seed {args.seed}")
    _table("after the last batch", final)
    _table("largest during the replay", peak)
    print("\nmean pickling time per snapshot (µs): " + ", ".join(
        f"{k} {spent[k] / spent['snapshots'] * 1e6:.0f}" for k in KINDS))
    # CPU of the objects' own work (validate, score, update), over every run (with --digest the
    # resumed one too): what a change of the per-batch code moves.
    print("mean CPU per batch (µs): " + ", ".join(
        f"{k} {spent[k + ' work'] / spent['snapshots'] * 1e6:.0f}" for k in KINDS))
    for resume_every, digest in runs:
        if digest is not None:
            how = f"resumed from pickles every {resume_every} batches" if resume_every else "plain"
            print(f"digest ({how}): {digest.h.hexdigest()}")


if __name__ == "__main__":
    main()
