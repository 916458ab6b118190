"""Replay speed against a plain numpy/pyarrow script computing the same 15-minute aggregates.

Run: `.venv/bin/python bench/replay_vs_numpy.py` (bench/compare.py, `make bench`, measures more
contenders). It simulates a network of at least a million readings (cached under --work),
then, in one run on this machine and
``--repeat`` times each:
- baseline: pyarrow reads the CSV and numpy computes per-node 15-minute count/mean/min/max/std
  of every measurement (no validation, no scoring, no writes);
- waterflow: ``waterflow replay`` of the same file into the real PostgreSQL and Redis on
  127.0.0.1 (a fresh database and key prefix each time) and a Parquet archive.
It prints the medians and their ratio. Needs PostgreSQL and Redis (deploy/local/services.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main

from connectors.file_source import FileSource
from dataflows.pipeline import build_flow
from dataflows.settings import Settings
from dataflows.simulate import simulate
from dataflows.topology import load_network

sys.path.insert(0, str(Path(__file__).parent))
from compute_limit import read, window_aggregates  # noqa: E402

PG = os.environ.get("WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def baseline(path: Path) -> tuple[float, int]:
    """Seconds for pyarrow + numpy to compute the per-node 15-minute aggregates; window count."""
    t0 = time.perf_counter()
    groups = window_aggregates(read(path))
    return time.perf_counter() - t0, groups


class _CountingSink(DynamicSink):
    """Counts the rows the flow produces and drops them: the dataflow's own cost, no I/O."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def build(self, step_id, worker_index, worker_count):
        sink = self

        class _Part(StatelessSinkPartition):
            def write_batch(self, items):
                for item in items:
                    sink.rows[item.table] = sink.rows.get(item.table, 0) + item.frame.height

        return _Part()


def flow_only(path: Path, network: Path) -> tuple[float, dict[str, int]]:
    """Seconds for the whole dataflow (parse, validate, score, windows, row frames), no sinks."""
    settings = Settings(run_id="bench", network=load_network(network))
    sink = _CountingSink()
    t0 = time.perf_counter()
    run_main(build_flow(FileSource([path], settings), sink, settings, snapshots=False))
    return time.perf_counter() - t0, sink.rows


def replay(path: Path, work: Path, network: Path) -> tuple[float, int, int]:
    """Seconds for ``waterflow replay`` into PostgreSQL, Redis and Parquet; readings, windows."""
    db = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = PG.rsplit("/", 1)[0] + "/" + db
    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    try:
        env = dict(os.environ, WATERFLOW_HOT_PREFIX=prefix)
        cmd = [
            sys.executable, "-m", "dataflows.cli", "replay", str(path), "--quiet",
            "--network", str(network), "--warm", url, "--hot", REDIS,
            "--cold", (work / f"cold-{db}").as_uri(), "--out", str(work / "out"),
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        with psycopg.connect(url) as conn:
            (readings,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
            (windows,) = conn.execute("SELECT count(*) FROM water.kpi_15m").fetchone()
        return elapsed, readings, windows
    finally:
        r = redis.from_url(REDIS)
        keys = list(r.scan_iter(match=prefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            r.delete(*keys[i : i + 10_000])
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/waterflow-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--days", type=int, default=42)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sim_dir = args.work / f"sim-{args.days}d"
    if not (sim_dir / "done").exists():
        result = simulate(sim_dir, districts=10, nodes_per_district=9, days=args.days, seed=7)
        (sim_dir / "done").write_text(str(result.n_readings))
    path = next(p for p in sim_dir.glob("*.csv") if "label" not in p.name)
    network = next(sim_dir.glob("*.toml"))
    rows = sum(1 for _ in path.open("rb")) - 1
    print(f"input: {path} ({rows:,} lines, {path.stat().st_size / 1e6:.0f} MB)")

    base_times, flow_times, replay_times = [], [], []
    for i in range(args.repeat):
        bt, groups = baseline(path)
        ft, produced = flow_only(path, network)
        rt, readings, windows = replay(path, args.work, network)
        base_times.append(bt)
        flow_times.append(ft)
        replay_times.append(rt)
        print(f"  round {i + 1}: baseline {bt:.2f} s ({groups:,} windows), "
              f"dataflow alone {ft:.2f} s ({produced.get('kpi_15m', 0):,} window rows), "
              f"replay {rt:.2f} s ({readings:,} readings, {windows:,} windows stored)")
    b, f = statistics.median(base_times), statistics.median(flow_times)
    r = statistics.median(replay_times)
    print(f"baseline numpy/pyarrow: median {b:.2f} s = {rows / b:,.0f} readings/s")
    print(f"dataflow alone (parse, validate, score, KPIs, row frames; no sink): median {f:.2f} s"
          f" = {rows / f:,.0f} readings/s, {f / b:.1f}x the baseline")
    print(f"waterflow replay -> PostgreSQL + Redis + Parquet: median {r:.2f} s = "
          f"{rows / r:,.0f} readings/s")
    print(f"replay / baseline time ratio: {r / b:.1f}x (replay speed = {b / r:.1%} of baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
