"""The storage limit: a bare COPY of the rows a replay stored into the same tables.

bench/compare.py dumps ``water.readings`` and ``water.kpi_15m`` of a replay's database as CSV
(:func:`dump`) and runs this module as a child against a fresh, migrated database:
`python bench/storage_limit.py URL DUMP_DIR`. It creates the months' partitions with
``water.ensure_partitions`` (as the replay's writer does) and COPYs both files in one
transaction: no staging table, no upsert. It prints one JSON line, including the CPU seconds
of the PostgreSQL backend that did the work (read from /proc: the server's share, which the
child's own rusage does not see).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psycopg

#: Table -> its partition column.
TABLES = {"readings": "ts", "kpi_15m": "window_start"}
CHUNK = 1 << 20


def dump(url: str, out: Path) -> None:
    """Write each table's rows as ``TABLE.csv`` and its time range as ``TABLE.range``."""
    out.mkdir(parents=True, exist_ok=True)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for table, col in TABLES.items():
            lo, hi = cur.execute(f"SELECT min({col}), max({col}) FROM water.{table}").fetchone()
            (out / f"{table}.range").write_text(f"{lo.isoformat()}\n{hi.isoformat()}\n")
            with (out / f"{table}.csv").open("wb") as f, cur.copy(
                f"COPY (SELECT * FROM water.{table}) TO STDOUT (FORMAT csv)"
            ) as copy:
                for data in copy:
                    f.write(data)


def backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    url, src = sys.argv[1], Path(sys.argv[2])
    t0 = time.perf_counter()
    rows = {}
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        (backend,) = cur.execute("SELECT pg_backend_pid()").fetchone()
        cpu0 = backend_cpu_s(backend)
        for table in TABLES:
            lo, hi = (src / f"{table}.range").read_text().split()
            cur.execute("SELECT water.ensure_partitions(%s::regclass, %s, %s)",
                        (f"water.{table}", lo, hi))
            with (src / f"{table}.csv").open("rb") as f, cur.copy(
                f"COPY water.{table} FROM STDIN (FORMAT csv)"
            ) as copy:
                while data := f.read(CHUNK):
                    copy.write(data)
            rows[table] = cur.rowcount
        conn.commit()
        server_cpu = backend_cpu_s(backend) - cpu0
    seconds = time.perf_counter() - t0
    print(json.dumps({"readings": rows["readings"], "windows": rows["kpi_15m"],
                      "server_cpu_s": server_cpu, "work_s": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
