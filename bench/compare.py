"""Side-by-side speed of this project against the compute limit, the storage limit and Bytewax.

Run: `make bench` or `.venv/bin/python bench/compare.py [--quick] [--nodes 10,1000,10000]
[--repeat 3]`. For each node count it simulates a network with `waterflow simulate` (cached
under --work) and cuts the CSV to the same number of readings (1 M, or 200 k with --quick), so
each size does the same work per reading with more or fewer readings per node. Then, --repeat
rounds, each contender runs once per round, in its own process (bench/measure.py):

- compute: pyarrow + numpy aggregates and rolling robust score (bench/compute_limit.py);
- storage: a bare COPY of the rows the replay stored, into a fresh migrated database
  (bench/storage_limit.py; rows dumped from the first replay's database);
- flow: this project's dataflow with no sinks (bench/flow_no_sinks.py);
- replay: `waterflow replay` into PostgreSQL, Redis and Parquet (fresh database, key prefix);
- embedded: `waterflow replay FILE --out DIR` with the embedded defaults (fresh folder);
- bytewax: a per-item Bytewax windowing flow (bench/per_item_bytewax.py).

It prints, per size, the medians of wall seconds, readings/s, CPU seconds per million readings
(the contender's process and the children it waited for; not the PostgreSQL or Redis servers)
and peak RSS, then the ratios the issue's targets are written in, and saves everything as JSON
in --work. Needs PostgreSQL and Redis on 127.0.0.1 (deploy/local/services.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from connectors.warm_postgres import migrate

sys.path.insert(0, str(Path(__file__).parent))
from kafka_topic import kafka_broker, publish  # noqa: E402
from measure import Run, measure  # noqa: E402
from storage_limit import dump  # noqa: E402

BENCH = Path(__file__).parent
PG = os.environ.get("WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STEP_S = 300
CONTENDERS = ("compute", "storage", "flow", "replay", "embedded", "bytewax", "quix", "kafka")


# --------------------------------------------------------------------------------------------
# Data


def dataset(work: Path, nodes: int, readings: int) -> tuple[Path, Path]:
    """A simulated network of ``nodes`` nodes cut to ``readings`` readings: (CSV, topology)."""
    districts = max(1, nodes // 10)
    per_district = nodes // districts
    days = max(1, math.ceil(readings * 1.03 / (districts * per_district * 86_400 / STEP_S)))
    sim = work / f"sim-{districts}x{per_district}-{days}d"
    if not (sim / "done").exists():
        subprocess.run(
            [sys.executable, "-m", "dataflows.cli", "simulate", "--out", str(sim),
             "--districts", str(districts), "--nodes-per-district", str(per_district),
             "--days", str(days), "--step", str(STEP_S), "--seed", "7"],
            check=True, stdout=subprocess.DEVNULL,
        )
        (sim / "done").touch()
    cut = sim / f"readings-{readings}.csv"
    if not cut.exists():
        with (sim / "readings.csv").open("rb") as src, cut.open("wb") as dst:
            for i, line in enumerate(src):
                if i > readings:
                    break
                dst.write(line)
    return cut, sim / "network.toml"


@contextmanager
def fresh_database(migrated: bool = False) -> Iterator[str]:
    db = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = PG.rsplit("/", 1)[0] + "/" + db
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def drop_prefix(prefix: str) -> None:
    r = redis.from_url(REDIS)
    keys = list(r.scan_iter(match=prefix + "*", count=10_000))
    for i in range(0, len(keys), 10_000):
        r.delete(*keys[i : i + 10_000])


# --------------------------------------------------------------------------------------------
# Contenders: each takes the size's Context and returns one measured Run


@dataclass
class Context:
    path: Path  # the readings CSV
    network: Path  # its topology
    scratch: Path  # a folder for this size's outputs
    readings: int
    brokers: str = ""  # a Kafka broker, when a Kafka contender runs
    topic: str = ""  # the topic holding the CSV's readings


def run_compute(ctx: Context) -> Run:
    return measure([sys.executable, str(BENCH / "compute_limit.py"), str(ctx.path)])


def run_flow(ctx: Context) -> Run:
    return measure(
        [sys.executable, str(BENCH / "flow_no_sinks.py"), str(ctx.path), str(ctx.network)])


def run_bytewax(ctx: Context) -> Run:
    return measure([sys.executable, str(BENCH / "per_item_bytewax.py"), str(ctx.path)])


def run_quix(ctx: Context) -> Run:
    state = ctx.scratch / f"quix-{uuid.uuid4().hex[:8]}"
    try:
        return measure([sys.executable, str(BENCH / "quix_windows.py"), ctx.brokers, ctx.topic,
                        str(ctx.readings), str(state)])
    finally:
        shutil.rmtree(state, ignore_errors=True)


def run_kafka(ctx: Context) -> Run:
    """``waterflow run --until-end`` from the topic into PostgreSQL, Redis and Parquet."""
    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    cold = ctx.scratch / f"cold-{uuid.uuid4().hex[:8]}"
    try:
        with fresh_database() as url:
            run = measure([
                sys.executable, "-m", "dataflows.cli", "run", "--until-end",
                "--brokers", ctx.brokers, "--topic", ctx.topic, "--network", str(ctx.network),
                "--warm", url, "--hot", REDIS, "--cold", cold.as_uri(),
                "--out", str(ctx.scratch / "out"),
            ], dict(os.environ, WATERFLOW_HOT_PREFIX=prefix))
            with psycopg.connect(url) as conn:
                (n,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
                (w,) = conn.execute("SELECT count(*) FROM water.kpi_15m").fetchone()
            run.report = {"readings": n, "windows": w}
        return run
    finally:
        drop_prefix(prefix)
        shutil.rmtree(cold, ignore_errors=True)


def run_replay(ctx: Context) -> Run:
    path, network, scratch = ctx.path, ctx.network, ctx.scratch
    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    cold = scratch / f"cold-{uuid.uuid4().hex[:8]}"
    try:
        with fresh_database() as url:
            env = dict(os.environ, WATERFLOW_HOT_PREFIX=prefix)
            run = measure([
                sys.executable, "-m", "dataflows.cli", "replay", str(path), "--quiet",
                "--network", str(network), "--warm", url, "--hot", REDIS,
                "--cold", cold.as_uri(), "--out", str(scratch / "out"),
            ], env)
            with psycopg.connect(url) as conn:
                (n,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
                (w,) = conn.execute("SELECT count(*) FROM water.kpi_15m").fetchone()
            run.report = {"readings": n, "windows": w}
            rows = scratch / "rows"
            if not (rows / "done").exists():
                dump(url, rows)
                (rows / "done").touch()
        return run
    finally:
        drop_prefix(prefix)
        shutil.rmtree(cold, ignore_errors=True)


def run_storage(ctx: Context) -> Run:
    rows = ctx.scratch / "rows"
    if not (rows / "done").exists():
        raise RuntimeError("the storage limit needs a replay's rows: run the replay first")
    with fresh_database(migrated=True) as url:
        return measure([sys.executable, str(BENCH / "storage_limit.py"), url, str(rows)])


def run_embedded(ctx: Context) -> Run:
    path, network = ctx.path, ctx.network
    out = ctx.scratch / f"embedded-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("WATERFLOW_WARM_URL", "WATERFLOW_HOT_URL", "WATERFLOW_COLD_URL")}
    try:
        return measure([sys.executable, "-m", "dataflows.cli", "replay", str(path), "--quiet",
                        "--network", str(network), "--out", str(out)], env)
    finally:
        shutil.rmtree(out, ignore_errors=True)


RUNNERS: dict[str, Callable[[Context], Run]] = {
    "compute": run_compute, "storage": run_storage, "flow": run_flow,
    "replay": run_replay, "embedded": run_embedded, "bytewax": run_bytewax,
    "quix": run_quix, "kafka": run_kafka,
}
#: Order within a round: the replay before the storage limit, which COPYs the replay's rows.
ORDER = ("compute", "flow", "bytewax", "replay", "storage", "embedded", "quix", "kafka")


# --------------------------------------------------------------------------------------------
# Report


def medians(runs: list[Run], readings: int) -> dict[str, float]:
    wall = statistics.median(r.wall_s for r in runs)
    cpu = statistics.median(r.cpu_s for r in runs)
    out = {
        "wall_s": wall,
        "readings_per_s": readings / wall,
        "cpu_s_per_m": cpu / readings * 1e6,
        "peak_rss_mb": statistics.median(r.peak_rss_mb for r in runs),
        "walls": [round(r.wall_s, 2) for r in runs],
    }
    server = [r.report["server_cpu_s"] for r in runs if "server_cpu_s" in r.report]
    if server:
        out["server_cpu_s_per_m"] = statistics.median(server) / readings * 1e6
    return out


def print_size(nodes: int, readings: int, result: dict[str, dict]) -> None:
    print(f"\n{nodes:,} nodes, {readings:,} readings (medians; walls of each round)")
    print(f"  {'contender':<10} {'wall s':>8} {'readings/s':>11} {'CPU s/M':>8} {'RSS MB':>7}"
          "  rounds")
    for name, m in result.items():
        extra = (f"  (+ PostgreSQL backend {m['server_cpu_s_per_m']:.1f} CPU s/M)"
                 if "server_cpu_s_per_m" in m else "")
        print(f"  {name:<10} {m['wall_s']:8.2f} {m['readings_per_s']:11,.0f} "
              f"{m['cpu_s_per_m']:8.2f} {m['peak_rss_mb']:7.0f}  {m['walls']}{extra}")


def ratios(result: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """The issue's ratios, each as (by wall time, by CPU time); speed ratios are inverted."""
    def cost(name: str) -> tuple[float, float]:
        return result[name]["wall_s"], result[name]["cpu_s_per_m"]

    def ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return a[0] / b[0], a[1] / b[1]

    have = result.keys()
    out = {}
    if {"flow", "compute"} <= have:
        out["flow / compute (target <= 4)"] = ratio(cost("flow"), cost("compute"))
    if {"replay", "compute", "storage"} <= have:
        c, s = cost("compute"), cost("storage")
        storage_cpu = s[1] + result["storage"].get("server_cpu_s_per_m", 0.0)
        out["replay / (compute + storage) (target <= 1.5)"] = ratio(
            cost("replay"), (c[0] + s[0], c[1] + storage_cpu))
    if {"embedded", "replay"} <= have:
        out["embedded / replay"] = ratio(cost("embedded"), cost("replay"))
    for other in ("bytewax", "quix"):
        if {"flow", other} <= have:
            out[f"{other} / flow, i.e. flow's speedup (target >= 5)"] = ratio(
                cost(other), cost("flow"))
        if {"replay", other} <= have:
            out[f"{other} / replay, i.e. replay's speedup"] = ratio(cost(other), cost("replay"))
    if {"kafka", "quix"} <= have:
        out["quix / kafka path, i.e. kafka path's speedup (target >= 5)"] = ratio(
            cost("quix"), cost("kafka"))
    return out


def bench_size(nodes: int, readings: int, args: argparse.Namespace, wanted: list[str],
               brokers: str) -> dict[str, dict]:
    """Medians of every wanted contender on the size's data; prints them and their ratios."""
    path, network = dataset(args.work, nodes, readings)
    scratch = args.work / f"scratch-{nodes}-{readings}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ctx = Context(path, network, scratch, readings, brokers)
    if brokers:
        ctx.topic = f"bench-{nodes}-{uuid.uuid4().hex[:8]}"
        published = publish(path, brokers, ctx.topic)
        print(f"  {nodes} nodes: published {readings:,} readings to {ctx.topic} in "
              f"{published:.1f} s", flush=True)
    runs: dict[str, list[Run]] = {c: [] for c in wanted}
    for i in range(args.repeat):
        for name in wanted:
            run = RUNNERS[name](ctx)
            runs[name].append(run)
            print(f"  {nodes} nodes round {i + 1} {name}: {run.wall_s:.2f} s wall, "
                  f"{run.cpu_s:.2f} s CPU, {run.peak_rss_mb:.0f} MB  {run.report}", flush=True)
    result = {name: medians(rs, readings) for name, rs in runs.items()}
    print_size(nodes, readings, result)
    for label, (by_wall, by_cpu) in ratios(result).items():
        print(f"  {label}: {by_wall:.2f} by wall time, {by_cpu:.2f} by CPU time")
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/waterflow-bench"))
    parser.add_argument("--nodes", default="10,1000,10000", help="comma-separated node counts")
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings per size")
    parser.add_argument("--quick", action="store_true", help="200 000 readings per size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help=f"comma-separated contenders among {', '.join(CONTENDERS)}")
    args = parser.parse_args()
    readings = 200_000 if args.quick else args.readings
    wanted = [c for c in ORDER if c in args.only.split(",")]
    if "storage" in wanted and "replay" not in wanted:
        wanted.insert(wanted.index("storage"), "replay")  # storage COPYs the replay's rows
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start")

    results: dict[int, dict[str, dict]] = {}
    with ExitStack() as stack:
        brokers = ""
        if {"quix", "kafka"} & set(wanted):
            brokers = stack.enter_context(kafka_broker())
        for nodes in [int(n) for n in args.nodes.split(",")]:
            results[nodes] = bench_size(nodes, readings, args, wanted, brokers)

    if len(results) > 1:
        lo, hi = min(results), max(results)
        print(f"\ncost per reading, {hi:,} nodes / {lo:,} nodes (CPU s per M; target within 20 %):")
        for name in wanted:
            a, b = results[lo][name]["cpu_s_per_m"], results[hi][name]["cpu_s_per_m"]
            print(f"  {name:<10} {a:8.2f} -> {b:8.2f}  ({b / a:.2f}x)")
    out = args.work / f"compare-{readings}.json"
    out.write_text(json.dumps({"readings": readings, "load_start": os.getloadavg(),
                               "results": results}, indent=1))
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
