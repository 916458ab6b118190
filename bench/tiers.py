"""Rows/s of ``readings`` into each storage tier on this machine (a benchmark, not a test).

    .venv/bin/python bench/tiers.py [--rows 200000] [--batch 50000] [--repeat 3]
        [--tiers warm,hot,parquet,bigquery]

Writes the same --rows readings (200 nodes, 5-minute steps, flags and scores set) in batches
of --batch rows through each tier's writer, --repeat times into a fresh target each time, and
prints the median rows/s per tier:

- warm: ``WarmPostgresWriter`` into a database of its own on WATERFLOW_TEST_PG_URL (default
  postgresql://postgres@127.0.0.1:5432/postgres), dropped at the end;
- hot: ``HotRedisWriter`` under a key prefix of its own on WATERFLOW_TEST_REDIS_URL (default
  redis://127.0.0.1:6379/0), deleted after each run;
- parquet: ``ColdParquetWriter`` into a temporary folder;
- bigquery: ``ColdBigQueryWriter`` (Parquet load + MERGE per batch) into the local-bigquery
  emulator at WATERFLOW_BIGQUERY_ENDPOINT, or one this script starts (and stops) with
  deploy/local/bigquery-emulator.sh; a dataset of its own per run, deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from dataflows.model import US_PER_S
from dataflows.tables import TableRows, frame

ROOT = Path(__file__).resolve().parents[1]
NODES = 200
PG_URL = os.environ.get("WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def readings(n: int) -> TableRows:
    """``n`` readings of ``NODES`` nodes at 5-minute steps from 2024-01-01, like a flow meter."""
    per_node = n // NODES
    rng = np.random.default_rng(1)
    k = np.tile(np.arange(per_node), NODES)
    t0 = int(dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp() * US_PER_S)
    m = len(k)
    flags = np.where(rng.random(m) < 0.01, "STUCK", None)
    return frame(
        "readings",
        {
            "node_id": np.repeat([f"bench-{i:04d}" for i in range(NODES)], per_node),
            "ts": (t0 + k * 300 * US_PER_S).astype("datetime64[us]"),
            "flow_rate": rng.normal(10, 2, m),
            "pressure": rng.normal(3.5, 0.2, m),
            "total_flow": np.cumsum(rng.random(m)),
            "quality": np.ones(m),
            "flags": [[f] if f else [] for f in flags],
            "anomaly_score": rng.random(m),
            "source": ["bench.csv"] * m,
            "run_id": ["bench"] * m,
        },
    )


def batches(rows: TableRows, size: int) -> list[TableRows]:
    """Batches in time order across nodes, as a replay or a live flow writes them."""
    f = rows.frame.sort("ts", "node_id")
    return [TableRows("readings", f.slice(i, size)) for i in range(0, f.height, size)]


# One context manager per tier: yields a connected writer, cleans up afterwards.


@contextmanager
def warm_writer() -> Iterator[object]:
    import psycopg
    from psycopg import sql

    from connectors.warm_postgres import WarmPostgresWriter, migrate

    name = f"waterflow_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))
        migrate(url)
        writer = WarmPostgresWriter(url)
        writer.connect()
        try:
            yield writer
        finally:
            writer.close()
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def hot_writer() -> Iterator[object]:
    import redis

    from connectors.hot_redis import HotRedisWriter

    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    writer = HotRedisWriter(REDIS_URL, prefix=prefix)
    writer.connect()
    try:
        yield writer
    finally:
        writer.close()
        client = redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            client.delete(*keys[i : i + 10_000])
        client.close()


@contextmanager
def parquet_writer() -> Iterator[object]:
    from connectors.cold_parquet import ColdParquetWriter

    with tempfile.TemporaryDirectory(prefix="waterflow-bench-") as d:
        writer = ColdParquetWriter(Path(d))
        yield writer
        writer.close()


@contextmanager
def bigquery_writer() -> Iterator[object]:
    from connectors.cold_bigquery import BigQueryTarget, ColdBigQueryWriter, make_client

    dataset = f"waterflow_bench_{uuid.uuid4().hex[:10]}"
    writer = ColdBigQueryWriter(BigQueryTarget("local", dataset))
    writer.connect()
    try:
        yield writer
    finally:
        writer.close()
        client = make_client(BigQueryTarget("local", dataset))
        client.delete_dataset(dataset, delete_contents=True, not_found_ok=True, timeout=60)
        client.close()


@contextmanager
def emulator() -> Iterator[None]:
    """WATERFLOW_BIGQUERY_ENDPOINT, or an emulator started (and stopped) here."""
    if os.environ.get("WATERFLOW_BIGQUERY_ENDPOINT"):
        yield
        return
    script = ROOT / "deploy" / "local" / "bigquery-emulator.sh"
    env = {**os.environ, "WATERFLOW_BQ_PORT": "9150", "WATERFLOW_BQ_GRPC_PORT": "9160"}
    with tempfile.NamedTemporaryFile("r") as started:
        env["STARTED"] = started.name
        endpoint = subprocess.run(
            ["bash", str(script), "start"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        os.environ["WATERFLOW_BIGQUERY_ENDPOINT"] = endpoint
        try:
            yield
        finally:
            del os.environ["WATERFLOW_BIGQUERY_ENDPOINT"]
            if started.read().strip():  # only if this script started it
                subprocess.run(["bash", str(script), "stop"], env=env, check=False)


TIERS: dict[str, Callable[[], object]] = {
    "warm": warm_writer,
    "hot": hot_writer,
    "parquet": parquet_writer,
    "bigquery": bigquery_writer,
}


def run(tier: str, parts: list[TableRows], repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` runs writing ``parts`` into a fresh target."""
    times = []
    for _ in range(repeat):
        with TIERS[tier]() as writer:  # type: ignore[attr-defined]
            started = time.perf_counter()
            for part in parts:
                writer.write(part)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiers", default=",".join(TIERS))
    args = p.parse_args()
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = set(tiers) - set(TIERS)
    if unknown:
        p.error(f"unknown tier(s) {sorted(unknown)}; choose from {', '.join(TIERS)}")
    rows = readings(args.rows)
    parts = batches(rows, args.batch)
    print(f"{rows.frame.height:,} readings rows in {len(parts)} batches of <= {args.batch:,}, "
          f"median of {args.repeat} runs")
    results = []
    for tier in tiers:
        if tier == "bigquery":
            with emulator():
                times = run(tier, parts, args.repeat)
        else:
            times = run(tier, parts, args.repeat)
        med = statistics.median(times)
        results.append((tier, med, rows.frame.height / med, min(times), max(times)))
    print(f"{'tier':<10} {'median s':>9} {'rows/s':>11} {'min s':>7} {'max s':>7}")
    for tier, med, rate, lo, hi in results:
        print(f"{tier:<10} {med:9.2f} {rate:11,.0f} {lo:7.2f} {hi:7.2f}")



if __name__ == "__main__":
    main()
