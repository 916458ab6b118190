"""The district balance's cost alone, and the flow's balance output, to compare two trees.

Three commands (run with ``PYTHONPATH=<tree>`` to measure or check another checkout: the
script imports ``dataflows`` from there, and prints which; only when run as a file, as below:
``python -m`` or ``-c`` from /work/main puts the current directory first):

``record FILE NETWORK OUT``
    Runs this project's flow (``dataflows.pipeline.build_flow``, no sinks but a collecting
    one) on a readings CSV and pickles every ``MeterWindows`` the district balance step was
    handed, per district, in the order it got them (``DistrictBalance.update`` wrapped).

``replay OUT [--repeat 3] [--cut-hours H]``
    Feeds the recorded windows to fresh ``DistrictBalance`` objects (``new_balance``) district
    after district, then flushes them all, as the flow does: prints the process CPU time of the
    updates and of the flushes (median of the repeats) and a SHA-256 of everything they emitted
    (rows column by column, events), in order. ``--cut-hours`` first cuts each district's
    windows in pieces of H hours, the meters interleaved in time order, as a live flow hands
    them over (a replay of weeks at once becomes a live flow's many small batches).

``flowhash FILE NETWORK``
    Runs the flow with a collecting sink and prints, per table, a SHA-256 of its rows sorted
    (and of the ``district_balance`` rows and district events in the order each district gave
    them: downstream upserts keep the last row of a key). ``ingest_runs``, ``nodes`` and
    ``quarantine`` carry the run's wall-clock times: their digests differ from run to run.

    .venv/bin/python bench/balance_cost.py record /tmp/waterflow-bench/sim-1000x10-1d/\
readings-200000.csv /tmp/waterflow-bench/sim-1000x10-1d/network.toml /tmp/balance-10k.pkl
    PYTHONPATH=/tmp/base .venv/bin/python bench/balance_cost.py replay /tmp/balance-10k.pkl
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main

import dataflows
from connectors.file_source import FileSource
from dataflows.balance import BalanceOutput, DistrictBalance, new_balance
from dataflows.pipeline import build_flow
from dataflows.settings import Settings, replay_chunk_rows
from dataflows.tables import TableRows
from dataflows.topology import load_network


class _Collect(DynamicSink[TableRows]):
    def __init__(self) -> None:
        self.items: list[TableRows] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CollectPart:
        return _CollectPart(self.items)


class _CollectPart(StatelessSinkPartition[TableRows]):
    def __init__(self, items: list[TableRows]) -> None:
        self._items = items

    def write_batch(self, items: list[TableRows]) -> None:
        self._items.extend(items)


def _settings(network: Path) -> Settings:
    topology = load_network(network)
    chunks = replay_chunk_rows(len(topology.nodes))  # what `waterflow replay` picks
    return Settings(run_id="bench", network=topology, chunk_rows=chunks)


def _run(path: Path, settings: Settings) -> list[TableRows]:
    sink = _Collect()
    run_main(build_flow(FileSource([path], settings), sink, settings, snapshots=False))
    return sink.items


def _frame_bytes(df: pl.DataFrame) -> bytes:
    out = io.BytesIO()
    schema = str(df.schema).encode()
    nested = [c for c, t in df.schema.items() if isinstance(t, pl.List)]
    if nested:  # CSV has no lists: their items as text
        df = df.with_columns(
            pl.col(c).list.eval(pl.element().cast(pl.Utf8)).list.join("|") for c in nested
        )
    df.write_csv(out)  # floats as their shortest exact text, nulls empty, NaN "NaN"
    return schema + out.getvalue()


def record(args: argparse.Namespace) -> None:
    settings = _settings(args.network)
    seen: dict[str, list[Any]] = defaultdict(list)
    update = DistrictBalance.update

    def recording(self: DistrictBalance, mw: Any) -> BalanceOutput:
        seen[self.district].append(mw)
        return update(self, mw)

    DistrictBalance.update = recording  # type: ignore[method-assign]
    _run(args.file, settings)
    with args.out.open("wb") as f:
        pickle.dump((str(args.network), dict(seen)), f, pickle.HIGHEST_PROTOCOL)
    n = sum(len(v) for v in seen.values())
    print(f"{len(seen)} districts, {n} updates -> {args.out}")


def _digest_out(h: Any, out: BalanceOutput) -> None:
    if out.rows is not None:
        h.update(_frame_bytes(out.rows.frame))
    for e in out.events:
        h.update(repr(e).encode())


def _cut(items: list[Any], hours: int) -> list[Any]:
    """Pieces of ``hours`` of each item's windows, in time order (then in the items' order)."""
    pieces = []
    for k, mw in enumerate(items):
        group = mw.window // (hours * 4)
        for g in np.unique(group).tolist():
            sel = group == g
            piece = type(mw)(mw.node_id, mw.role, mw.window[sel], mw.volume[sel],
                             mw.status[sel], mw.totalizer[sel], mw.pressure[sel])
            pieces.append((g, k, piece))
    pieces.sort(key=lambda p: p[:2])
    return [p[2] for p in pieces]


def load(path: Path, cut_hours: int | None) -> tuple[str, dict[str, list[Any]]]:
    with path.open("rb") as f:
        network, seen = pickle.load(f)  # noqa: S301  # nosec B301 (our own file)
    if cut_hours:
        seen = {d: _cut(items, cut_hours) for d, items in seen.items()}
    return network, seen


def replay(args: argparse.Namespace) -> None:
    network, seen = load(args.recorded, args.cut_hours)
    settings = _settings(Path(network))
    cpu_update, cpu_flush, digests = [], [], set()
    for _ in range(args.repeat):
        outs: list[BalanceOutput] = []
        balances = {d: new_balance(settings, d) for d in seen}
        t0 = time.process_time()
        for d, items in seen.items():
            b = balances[d]
            outs.extend(b.update(mw) for mw in items)
        t1 = time.process_time()
        outs.extend(b.flush() for b in balances.values())
        t2 = time.process_time()
        cpu_update.append(t1 - t0)
        cpu_flush.append(t2 - t1)
        h = hashlib.sha256()
        for out in outs:
            _digest_out(h, out)
        digests.add(h.hexdigest())
    n = sum(len(v) for v in seen.values())
    upd, fl = statistics.median(cpu_update), statistics.median(cpu_flush)
    print(f"dataflows from {Path(dataflows.__file__).parent.parent}")
    print(f"{len(seen)} districts, {n} updates: update CPU {upd:.3f} s "
          f"({upd / n * 1e6:.0f} us/call), flush CPU {fl:.3f} s "
          f"({fl / len(seen) * 1e3:.2f} ms/district), total {upd + fl:.3f} s "
          f"(median of {args.repeat}; updates {[round(x, 3) for x in cpu_update]}, "
          f"flushes {[round(x, 3) for x in cpu_flush]})")
    print("digest", *digests)


def flowhash(args: argparse.Namespace) -> None:
    settings = _settings(args.network)
    items = _run(args.file, settings)
    print(f"dataflows from {Path(dataflows.__file__).parent.parent}")
    by_table: dict[str, list[pl.DataFrame]] = defaultdict(list)
    for rows in items:
        by_table[rows.table].append(rows.frame)
    skip = {"ingest_runs", "nodes", "quarantine"}  # carry wall-clock times of the run
    for table in sorted(by_table):
        df = pl.concat(by_table[table], how="vertical_relaxed")
        cols = [c for c, t in df.schema.items() if not isinstance(t, (pl.List, pl.Object))]
        note = " (wall-clock columns: not compared)" if table in skip else ""
        ordered = df.sort(cols, nulls_last=True, maintain_order=True)
        digest = hashlib.sha256(_frame_bytes(ordered)).hexdigest()
        print(f"{table}: {df.height} rows sorted {digest}{note}")
    # In arrival order per district: the last row of a key is what the warm tier keeps.
    if "district_balance" in by_table:
        bal = pl.concat(by_table["district_balance"], how="vertical_relaxed")
        ordered = bal.with_row_index("i").sort("district", "i").drop("i")
        print("district_balance in order per district",
              hashlib.sha256(_frame_bytes(ordered)).hexdigest())
    ev = by_table.get("anomalies")
    if ev:
        df = pl.concat(ev, how="vertical_relaxed")
        districts = {s.district for s in settings.network.nodes.values() if s.district}
        mine = df.filter(pl.col("node_id").is_in(sorted(districts)))
        ordered = mine.with_row_index("i").sort("node_id", "i").drop("i")
        print(f"district events: {mine.height} in order per district",
              hashlib.sha256(_frame_bytes(ordered)).hexdigest())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("record")
    p.add_argument("file", type=Path)
    p.add_argument("network", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("replay")
    p.add_argument("recorded", type=Path)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cut-hours", type=int, default=None)
    p = sub.add_parser("flowhash")
    p.add_argument("file", type=Path)
    p.add_argument("network", type=Path)
    args = parser.parse_args()
    {"record": record, "replay": replay, "flowhash": flowhash}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
