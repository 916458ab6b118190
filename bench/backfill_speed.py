"""Speed of ``waterflow backfill`` against ``waterflow replay`` per reading (issue 9).

    .venv/bin/python bench/backfill_speed.py [--work DIR] [--districts 10]
        [--nodes-per-district 10] [--days 14] [--step 300] [--repeat 1]
        [--profile FILE] [--no-profile] [--before DIR]

Simulates a network with ``waterflow simulate`` (cached under --work), then per round:

- replay: ``waterflow replay`` of the simulated CSV into a fresh PostgreSQL database
  (``bench_backfill_<random>``), Redis under a key prefix of its own (deleted afterwards) and a
  Parquet cold archive in --work;
- backfill: ``waterflow backfill --from <that archive>`` into a second fresh database.

With ``--before DIR`` (a checkout of an earlier revision, e.g. ``git archive REV | tar -x -C
DIR``), each round also times that revision's backfill into a third fresh database, right after
this one's, so both see the same machine load.

Each command runs as its own process (bench/measure.py: wall time, CPU seconds of the process
and the children it waited for, not the PostgreSQL or Redis servers). The rows of every table
the backfill rebuilds are counted in both databases, so a faster backfill that writes less
shows. Prints readings/s and CPU s per million readings for both and the backfill/replay ratio
of readings/s, and saves a cProfile of one more backfill (top 25 by cumulative time) to
--profile (default WORK/backfill_profile.txt). Every database it creates is dropped at the end.
Needs PostgreSQL and Redis on 127.0.0.1 (WATERFLOW_TEST_PG_URL, WATERFLOW_TEST_REDIS_URL).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from measure import Run, measure  # noqa: E402

PG = os.environ.get("WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Tables the backfill rebuilds (quarantine and ingest_runs are not in the cold tier).
TABLES = ("readings", "kpi_15m", "kpi_daily", "anomalies", "district_balance", "nodes")
CLI = [sys.executable, "-m", "dataflows.cli"]


def simulate(work: Path, districts: int, per_district: int, days: int, step: int) -> Path:
    """The simulated network's folder (readings.csv, network.toml), made once per size."""
    sim = work / (f"sim-{districts}x{per_district}-{days}d" + ("" if step == 300 else f"-{step}s"))
    if not (sim / "done").exists():
        subprocess.run(
            [*CLI, "simulate", "--out", str(sim), "--districts", str(districts),
             "--nodes-per-district", str(per_district), "--days", str(days),
             "--step", str(step)],
            check=True, stdout=subprocess.DEVNULL,
        )
        (sim / "done").touch()
    return sim


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new empty database ``bench_backfill_<random>``, dropped on exit."""
    name = f"bench_backfill_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PG.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def drop_prefix(prefix: str) -> None:
    r = redis.from_url(REDIS)
    keys = list(r.scan_iter(match=prefix + "*", count=10_000))
    for i in range(0, len(keys), 10_000):
        r.delete(*keys[i : i + 10_000])


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(
                sql.SQL("SELECT count(*) FROM water.{}").format(sql.Identifier(t))
            ).fetchone()[0]
            for t in TABLES
        }


def replay(sim: Path, url: str, cold: Path, work: Path) -> Run:
    prefix = f"water:bench-backfill-{uuid.uuid4().hex[:8]}:"
    try:
        return measure([
            *CLI, "replay", str(sim / "readings.csv"), "--quiet",
            "--network", str(sim / "network.toml"), "--warm", url, "--hot", REDIS,
            "--hot-prefix", prefix, "--cold", cold.as_uri(), "--out", str(work / "out"),
        ])
    finally:
        drop_prefix(prefix)


def backfill_cmd(sim: Path, url: str, cold: Path) -> list[str]:
    return ["backfill", "--from", cold.as_uri(), "--warm", url,
            "--network", str(sim / "network.toml")]


def profile(sim: Path, cold: Path, out: Path) -> None:
    """cProfile of one backfill into a fresh database; top 25 by cumulative time to ``out``."""
    with tempfile.TemporaryDirectory() as tmp, fresh_database() as url:
        stats_file = Path(tmp) / "backfill.prof"
        subprocess.run(
            [sys.executable, "-m", "cProfile", "-o", str(stats_file), "-m", "dataflows.cli",
             *backfill_cmd(sim, url, cold)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        text = io.StringIO()
        pstats.Stats(str(stats_file), stream=text).sort_stats("cumulative").print_stats(25)
        out.write_text(text.getvalue())


def figures(name: str, runs: list[Run], readings: int) -> dict[str, float]:
    wall = statistics.median(r.wall_s for r in runs)
    cpu = statistics.median(r.cpu_s for r in runs)
    out = {
        "wall_s": round(wall, 2),
        "readings_per_s": round(readings / wall),
        "cpu_s_per_m": round(cpu / readings * 1e6, 1),
        "peak_rss_mb": round(max(r.peak_rss_mb for r in runs)),
    }
    print(f"{name:9s} {out['wall_s']:8.2f} s  {out['readings_per_s']:9d} readings/s  "
          f"{out['cpu_s_per_m']:7.1f} CPU s/M readings  {out['peak_rss_mb']:5d} MB peak")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_backfill")
    p.add_argument("--districts", type=int, default=10)
    p.add_argument("--nodes-per-district", type=int, default=10)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--step", type=int, default=300, help="seconds between readings")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--profile", type=Path,
                   help="cProfile output (default WORK/backfill_profile.txt)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--before", type=Path,
                   help="source tree of an earlier revision whose backfill is timed too")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sim = simulate(args.work, args.districts, args.nodes_per_district, args.days, args.step)
    replays: list[Run] = []
    backfills: list[Run] = []
    befores: list[Run] = []
    rows: dict[str, dict[str, int]] = {}
    cold = args.work / f"cold-{uuid.uuid4().hex[:8]}"
    try:
        for i in range(args.repeat):
            shutil.rmtree(cold, ignore_errors=True)
            with fresh_database() as replayed:
                replays.append(replay(sim, replayed, cold, args.work))
                rows["replay"] = counts(replayed)
            with fresh_database() as rebuilt:
                backfills.append(measure([*CLI, *backfill_cmd(sim, rebuilt, cold)]))
                rows["backfill"] = counts(rebuilt)
            if args.before:
                with fresh_database() as rebuilt:
                    env = dict(os.environ, PYTHONPATH=str(args.before))
                    # -P: the tree on PYTHONPATH, not this one (the working directory), first.
                    befores.append(measure(
                        [sys.executable, "-P", "-m", "dataflows.cli",
                         *backfill_cmd(sim, rebuilt, cold)], env))
                    rows["before"] = counts(rebuilt)
            print(f"round {i + 1}: replay {replays[-1].wall_s:.2f} s, "
                  f"backfill {backfills[-1].wall_s:.2f} s", file=sys.stderr)
        readings = rows["replay"]["readings"]
        print(f"{readings} readings ({args.districts}x{args.nodes_per_district} nodes, "
              f"{args.days} days, every {args.step} s), median of {args.repeat}")
        result = {
            "readings": readings,
            "rows": rows,
            "replay": figures("replay", replays, readings),
            "backfill": figures("backfill", backfills, readings),
        }
        if befores:
            result["before"] = figures("before", befores, readings)
            speedup = result["backfill"]["readings_per_s"] / result["before"]["readings_per_s"]
            result["backfill_over_before"] = round(speedup, 2)
            print(f"backfill/before readings/s: {speedup:.2f}")
        ratio = result["backfill"]["readings_per_s"] / result["replay"]["readings_per_s"]
        result["backfill_over_replay"] = round(ratio, 2)
        print(f"backfill/replay readings/s: {ratio:.2f}")
        for t in TABLES:
            seen = {k: v[t] for k, v in rows.items()}
            same = "" if len(set(seen.values())) == 1 else "  DIFFERS"
            print(f"  {t:17s} " + "  ".join(f"{k} {n:8d}" for k, n in seen.items()) + same)
        if not args.no_profile:
            out = args.profile or args.work / "backfill_profile.txt"
            profile(sim, cold, out)
            print(f"cProfile of a backfill (top 25 by cumulative): {out}")
        (args.work / "backfill_speed.json").write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(cold, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
