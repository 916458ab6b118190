"""PostgreSQL restarting (cleanly and by crash) in the middle of a run: nothing lost or doubled.

The shared server on 5432 is never touched: this test runs a PostgreSQL of its own, with the
Debian binaries the build machines have (``/usr/lib/postgresql/<v>/bin``), in a temporary folder
on a free 127.0.0.1 port. As root, the server runs as the ``postgres`` user (PostgreSQL refuses
to run as root).
"""

from __future__ import annotations

import datetime as dt
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from connectors.warm_postgres import WarmPostgresWriter, migrate
from dataflows.model import US_PER_S
from dataflows.tables import frame

pytestmark = pytest.mark.integration

BATCHES = 30
ROWS = 5_000  # per batch: 150k readings, a few seconds of writing on the build machine
NODES = 200


class OwnPostgres:
    """A throwaway PostgreSQL cluster: initdb, start, stop (fast or immediate), remove."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.fail(
                "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install "
                "postgresql (deploy/local installs it)",
                pytrace=False,
            )
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="waterflow-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.data = self.root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.remove()


def batches() -> list:
    """150k readings of 2021 crossing month boundaries; flow values exact in binary (sums exact)."""
    out = []
    t0 = int(dt.datetime(2021, 1, 20, tzinfo=dt.UTC).timestamp() * US_PER_S)
    step = 300 * US_PER_S
    per_node = ROWS // NODES
    nodes = np.repeat(np.array([f"n{i:03d}" for i in range(NODES)]), per_node)
    for b in range(BATCHES):
        k = np.tile(np.arange(per_node), NODES) + b * per_node
        ts = t0 + k * step * 40  # 200 min apart: the 30 batches span January to May
        flow = ((k * 7 + np.repeat(np.arange(NODES), per_node)) % 1000) * 0.25
        out.append(frame("readings", {"node_id": nodes, "ts": ts, "flow_rate": flow}))
    return out


def totals(url: str) -> tuple[int, float, int]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        n, s, keys = conn.execute(
            "SELECT count(*), sum(flow_rate), count(DISTINCT (node_id, ts)) FROM water.readings"
        ).fetchone()
    return n, s, keys


def test_restarts_and_crashes_during_writes_lose_and_double_nothing(server, caplog):
    data = batches()
    expected_rows = sum(b.frame.height for b in data)
    expected_sum = float(sum(b.frame["flow_rate"].sum() for b in data))
    migrate(server.url)
    writer = WarmPostgresWriter(server.url, attempts=10, backoff_s=0.1)
    done = [0]
    errors: list[BaseException] = []

    def write_all() -> None:
        try:
            for rows in data:
                writer.write(rows)
                done[0] += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="connectors.warm_postgres")
    thread = threading.Thread(target=write_all)
    thread.start()
    # fast = clean shutdown (sessions killed), immediate = crash (recovery from WAL on start)
    restarts = [(3, "fast"), (9, "immediate"), (16, "fast"), (23, "immediate")]
    for after, mode in restarts:
        while done[0] < after and thread.is_alive():
            time.sleep(0.005)
        time.sleep(0.05)  # into the next batch's COPY or upsert, not between batches
        server.stop(mode)
        time.sleep(0.3)  # down for a moment: the writer's reconnects are refused meanwhile
        server.start()
    thread.join(timeout=300)
    writer.close()
    assert not thread.is_alive()
    assert errors == []
    retries = [r for r in caplog.records if "retry in" in r.getMessage()]
    assert len(retries) >= len(restarts), "the restarts did not hit the writer"

    assert totals(server.url) == (expected_rows, expected_sum, expected_rows)

    # and a clean rerun of every batch (a replay) changes nothing
    again = WarmPostgresWriter(server.url)
    try:
        for rows in data:
            again.write(rows)
    finally:
        again.close()
    assert totals(server.url) == (expected_rows, expected_sum, expected_rows)
