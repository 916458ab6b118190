"""The Kafka path on one process against two: does a second Bytewax process add throughput?

    .venv/bin/python bench/kafka_scaling.py [--nodes 1000] [--readings 200000] [--repeat 3]

One topic of 4 partitions is filled once with `waterflow publish` (a simulated network cut as in
bench/compare.py, cached under --work), on a Tansu broker of this script's own. Then, per round,
alternated: `waterflow run --until-end` as one process, and as two processes of one cluster
(`-i 0/1 -a host:port;host:port --run-id`), each into a fresh database, Redis key prefix and
Parquet folder. A run is timed from the start of its processes to the exit of the last one;
CPU is the sum of the processes' user + system time (`os.wait4`); every reading of the topic
must be in `water.readings` at the end. The figure of issue 9 is wall(one) / wall(two), target
>= 1.7; on a 2-core machine the broker and PostgreSQL share the cores, so it cannot reach 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import REDIS, dataset, drop_prefix, fresh_database  # noqa: E402
from kafka_topic import free_port, kafka_broker, publish  # noqa: E402


def run(processes: int, brokers: str, topic: str, network: Path, scratch: Path) -> dict:
    """``waterflow run --until-end`` as ``processes`` processes; wall, CPU, readings stored."""
    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    cold = scratch / f"cold-{uuid.uuid4().hex[:8]}"
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    try:
        with fresh_database() as url:
            base = [sys.executable, "-m", "dataflows.cli", "run", "--until-end",
                    "--brokers", brokers, "--topic", topic, "--network", str(network),
                    "--warm", url, "--hot", REDIS, "--cold", cold.as_uri(),
                    "--out", str(scratch / "out")]
            cluster = ["-a", addresses, "--run-id", f"scaling-{uuid.uuid4().hex[:8]}"]
            env = dict(os.environ, WATERFLOW_HOT_PREFIX=prefix, WATERFLOW_LOG_LEVEL="WARNING")
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(base + (["-i", str(i), *cluster] if processes > 1 else []),
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for i in range(processes)
            ]
            cpu = 0.0
            for proc in procs:
                _, status, usage = os.wait4(proc.pid, 0)
                cpu += usage.ru_utime + usage.ru_stime
                if os.waitstatus_to_exitcode(status) != 0:
                    assert proc.stderr is not None
                    raise RuntimeError(f"process exited {status}: {proc.stderr.read()[-3000:]!r}")
            wall = time.perf_counter() - t0
            with psycopg.connect(url) as conn:
                (stored,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
        return {"wall_s": wall, "cpu_s": cpu, "readings": stored}
    finally:
        drop_prefix(prefix)
        shutil.rmtree(cold, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/waterflow-bench"))
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--readings", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    path, network = dataset(args.work, args.nodes, args.readings)
    print(f"{args.readings:,} readings of {args.nodes} nodes; 2 CPUs; load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    with kafka_broker() as brokers, tempfile.TemporaryDirectory() as tmp:
        topic = f"bench-scaling-{uuid.uuid4().hex[:8]}"
        publish(path, brokers, topic)
        rounds: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.repeat):
            for processes in (1, 2):
                done = run(processes, brokers, topic, network, Path(tmp))
                rounds[processes].append(done)
                print(f"  round {r + 1}, {processes} process(es): {done['wall_s']:.1f} s wall, "
                      f"{done['cpu_s']:.1f} s CPU, {done['readings']:,} readings", flush=True)
    wall = {k: statistics.median(d["wall_s"] for d in v) for k, v in rounds.items()}
    cpu = {k: statistics.median(d["cpu_s"] for d in v) for k, v in rounds.items()}
    for k in (1, 2):
        print(f"{k} process(es): median {wall[k]:.1f} s wall "
              f"({args.readings / wall[k]:,.0f} readings/s), {cpu[k]:.1f} s CPU")
    print(f"two / one processes, throughput (target >= 1.7): {wall[1] / wall[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
