"""Warm tier write speed: readings/s into PostgreSQL through WarmPostgresWriter (not a test).

    .venv/bin/python bench/warm_write.py [--rows 1000000] [--batch 100000]
        [--url postgresql://postgres@127.0.0.1:5432/postgres]

Creates a database of its own on the server of --url (dropped at the end) and, for
synchronous_commit on and off, writes --rows readings (500 nodes, 5-minute steps, spread over
months so partitions are created on the way) in batches of --batch rows, then writes them again
(a replay: every row already there, unchanged), then writes them in small batches of 1000 rows
(the Kafka case, where one commit per batch dominates).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import uuid

import numpy as np
import psycopg
from psycopg import sql

from connectors.warm_postgres import WarmPostgresWriter, migrate
from dataflows.model import US_PER_S
from dataflows.tables import TableRows, frame

NODES = 500


def readings(n: int, offset_steps: int = 0) -> TableRows:
    """``n`` readings of ``NODES`` nodes at 5-minute steps, every measurement of a flow meter."""
    per_node = n // NODES
    rng = np.random.default_rng(1)
    k = np.tile(np.arange(per_node), NODES) + offset_steps
    t0 = int(dt.datetime(2021, 1, 1, tzinfo=dt.UTC).timestamp() * US_PER_S)
    m = len(k)
    return frame(
        "readings",
        {
            "node_id": np.repeat(np.array([f"node-{i:04d}" for i in range(NODES)]), per_node),
            "ts": t0 + k * 300 * US_PER_S,
            "flow_rate": rng.gamma(2.0, 3.0, m),
            "pressure": rng.normal(3.5, 0.2, m),
            "temperature": rng.normal(14, 1, m),
            "total_flow": np.cumsum(rng.gamma(2.0, 1.0, m)),
            "quality": np.ones(m),
            "flags": [[] for _ in range(m)],
            "anomaly_score": rng.random(m),
            "source": ["bench.csv"] * m,
            "run_id": ["bench"] * m,
        },
    )


def split(rows: TableRows, size: int) -> list[TableRows]:
    """Batches in time order, as a replay emits them: each batch holds every node."""
    f = rows.frame.sort("ts")
    return [TableRows("readings", f.slice(i, size)) for i in range(0, f.height, size)]


def timed(writer: WarmPostgresWriter, parts: list[TableRows]) -> float:
    start = time.perf_counter()
    for p in parts:
        writer.write(p)
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print rows/s per case."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--small-rows", type=int, default=100_000, help="rows for the 1000-row case")
    args = ap.parse_args()
    data = readings(args.rows)
    small = split(readings(args.small_rows, offset_steps=10**6), 1000)
    big = split(data, args.batch)
    print(f"{data.frame.height} readings, batches of {args.batch}; {len(small)} batches of 1000")
    with psycopg.connect(args.url, autocommit=True) as admin:
        for sync in (True, False):
            name = f"waterflow_bench_{uuid.uuid4().hex[:8]}"
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            try:
                url = psycopg.conninfo.make_conninfo(args.url, dbname=name)
                migrate(url)
                w = WarmPostgresWriter(url, synchronous_commit=sync)
                first = timed(w, big)
                again = timed(w, big)
                few = timed(w, small)
                w.close()
                label = "on " if sync else "off"
                n = data.frame.height
                print(
                    f"synchronous_commit {label}: insert {n / first:>9,.0f} rows/s"
                    f" ({first:.1f} s), replay (unchanged) {n / again:>9,.0f} rows/s"
                    f" ({again:.1f} s), 1000-row batches {args.small_rows / few:>9,.0f} rows/s"
                )
            finally:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


if __name__ == "__main__":
    main()
