"""Hot tier read latency and write rate on this machine (a benchmark, not a timed test).

Run: `.venv/bin/python bench/hot_latency.py` (Redis on 127.0.0.1:6379, or --url /
WATERFLOW_HOT_URL). It fills a hot tier of ``--nodes`` nodes with 48 h of 5-minute readings
through ``HotRedisWriter`` under a unique key prefix (deleted at the end, nothing else is
touched), then times, one request at a time on one connection, ``--reads`` of each:
- ``HGETALL {p}node:{id}:latest`` (the latest state of a random node);
- ``ZRANGEBYSCORE {p}node:{id}:readings`` over the node's last hour (12 readings).
It prints p50/p99/max per read in microseconds and the write rate in readings/s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid

import numpy as np
import redis

from connectors.hot_redis import HotRedisWriter
from dataflows.model import US_PER_HOUR, US_PER_S
from dataflows.tables import frame

STEP_US = 300 * US_PER_S  # 5-minute readings


def fill(url: str, prefix: str, nodes: int, end_us: int) -> float:
    """Write 48 h per node in 4 batches of 12 h, as a replay would; readings per second."""
    n_per_node = 48 * US_PER_HOUR // STEP_US
    rng = np.random.default_rng(1)
    writer = HotRedisWriter(url, prefix=prefix)
    writer.connect()
    total, elapsed = 0, 0.0
    try:
        for part in range(4):
            idx = np.arange(part * n_per_node // 4, (part + 1) * n_per_node // 4)
            ts = end_us - (n_per_node - 1 - idx) * STEP_US
            node_ids = [f"bench-{i:04d}" for i in range(nodes) for _ in idx]
            rows = frame(
                "readings",
                {
                    "node_id": node_ids,
                    "ts": np.tile(ts, nodes).tolist(),
                    "flow_rate": rng.normal(2.0, 0.3, len(node_ids)).tolist(),
                    "pressure": rng.normal(3.5, 0.1, len(node_ids)).tolist(),
                    "quality": [1.0] * len(node_ids),
                    "anomaly_score": rng.uniform(0, 0.2, len(node_ids)).tolist(),
                },
            )
            started = time.perf_counter()
            writer.write(rows)
            elapsed += time.perf_counter() - started
            total += len(node_ids)
        if writer.behind:
            raise SystemExit(f"Redis at {url} did not take the writes (see the log above)")
    finally:
        writer.close()
    return total / elapsed


def time_reads(call, reads: int) -> list[float]:
    """Microseconds per call, each one alone (round trip included)."""
    out = []
    for _ in range(reads):
        started = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - started) / 1000)
    return out


def summary(name: str, us: list[float]) -> str:
    q = statistics.quantiles(us, n=100)
    return f"{name:<44} p50 {q[49]:7.1f} µs   p99 {q[98]:7.1f} µs   max {max(us):8.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("WATERFLOW_HOT_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--reads", type=int, default=10_000)
    args = parser.parse_args()

    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    end_us = int(time.time()) * US_PER_S
    client = redis.from_url(args.url, socket_timeout=5)
    try:
        rate = fill(args.url, prefix, args.nodes, end_us)
        nodes = [f"bench-{i:04d}" for i in range(args.nodes)]
        pick = random.Random(2).choice
        hour_ago = (end_us - US_PER_HOUR) / US_PER_S
        for _ in range(200):  # warm the connection and the CPU caches
            client.hgetall(f"{prefix}node:{pick(nodes)}:latest")
        latest = time_reads(
            lambda: client.hgetall(f"{prefix}node:{pick(nodes)}:latest"), args.reads
        )
        window = time_reads(
            lambda: client.zrangebyscore(f"{prefix}node:{pick(nodes)}:readings", hour_ago, "+inf"),
            args.reads,
        )
        sample = client.zrangebyscore(f"{prefix}node:{nodes[0]}:readings", hour_ago, "+inf")
        n_keys = sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000))
        print(f"hot tier at {args.url}: {args.nodes} nodes, 48 h of 5-min readings, {n_keys} keys")
        print(f"write through HotRedisWriter: {rate:,.0f} readings/s")
        print(summary("HGETALL node:{id}:latest", latest))
        print(summary(f"ZRANGEBYSCORE last hour ({len(sample)} readings)", window))
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


if __name__ == "__main__":
    main()
