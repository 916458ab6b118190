"""Redis dying (or missing) in the middle of a replay: the flow goes on, the hot tier catches up.

A redis-server of the test's own, on a free port, is killed (SIGKILL, nothing kept) or not yet
started while ``waterflow replay`` of the 7-day sample runs in small chunks; the warm tier
(a database of the test's own on the shared PostgreSQL) and the Parquet archive must hold every
accepted reading, the failures must be counted, and once Redis is back the hot tier's latest
state of every node must be the newest reading PostgreSQL holds for it.

The kill and the restart are driven from inside the hot writer (after its n-th batch), so the
test does not depend on how fast the replay happens to run on this machine.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import polars as pl
import psycopg
import pytest
import redis
from psycopg import sql

from connectors import metrics
from connectors.hot_redis import TTL_S, HotRedisWriter
from dataflows.cli import main
from tests.integration.conftest import PG_ADMIN_URL, url_with
from tests.integration.test_hot_connect import RedisServer

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).parents[2] / "dataflows" / "samples" / "simulated_2districts_7days.csv"
MEASURED = ("flow_rate", "pressure")
KINDS = ("readings", "latest")


@pytest.fixture
def warm(tmp_path):
    name = f"waterflow_hot_outage_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield url_with(PG_ADMIN_URL, dbname=name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    yield s
    s.kill()


def _drive(monkeypatch, server: RedisServer, down_at: int, up_at: int | None) -> dict[str, object]:
    """Kill Redis before the hot writer's batch ``down_at``, restart it before ``up_at``.

    ``up_at=None``: Redis comes back only when the writer closes (its last flush catches up).
    """
    real_write, real_close = HotRedisWriter.write, HotRedisWriter.close
    seen: dict[str, object] = {"batches": 0, "caught_up_during_run": False, "was_behind": False}

    def write(self, rows):
        if rows.table != "readings":
            return real_write(self, rows)
        n = seen["batches"] = int(seen["batches"]) + 1  # type: ignore[arg-type]
        self.backoff_base_s = 0.0  # retry at the very next batch: the sample replays fast
        if n == down_at:
            server.kill()
        if n == up_at:
            server.start()  # a new, empty Redis on the same port
        real_write(self, rows)
        if self.behind:
            seen["was_behind"] = True
        elif seen["was_behind"]:
            seen["caught_up_during_run"] = True

    def close(self):
        if up_at is None and server.proc is None:
            server.start()
        seen["behind_at_close"] = self.behind
        real_close(self)

    monkeypatch.setattr(HotRedisWriter, "close", close)
    monkeypatch.setattr(HotRedisWriter, "write", write)
    return seen


@pytest.mark.parametrize(
    ("start_first", "down_at", "up_at"),
    # 16 batches of ~10 h of the 7 days: the last 48 h are batches 12-16.
    [(True, 11, 15), (False, 0, 14), (True, 12, None)],
    ids=["killed_mid_run", "down_at_start", "back_at_close"],
)
def test_replay_survives_redis_outage_and_catches_up(
    monkeypatch, tmp_path, warm, server, start_first, down_at, up_at
):
    if start_first:
        server.start()
    prefix = f"water:outage-{uuid.uuid4().hex[:8]}:"
    url = f"redis://127.0.0.1:{server.port}/0"
    errors = metrics.SINK_ERRORS.labels("hot")
    errors_before = errors._value.get()
    seen = _drive(monkeypatch, server, down_at, up_at)

    args = [
        "replay", str(SAMPLE), "--quiet", "--chunk-rows", "1500",
        "--now", "2026-01-01T00:00:00+00:00",
        "--warm", warm, "--hot", url, "--hot-prefix", prefix,
        "--cold", (tmp_path / "cold").as_uri(), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(args) == 0
    assert seen["batches"] == 16
    assert errors._value.get() > errors_before
    if up_at is None:
        assert seen["behind_at_close"] and not seen["caught_up_during_run"]
    else:
        assert seen["caught_up_during_run"], "the writer should catch up before the run ends"

    with psycopg.connect(warm) as conn:
        (accepted,) = conn.execute("SELECT accepted FROM water.ingest_runs").fetchone()
        (stored,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
        newest = conn.execute(
            "SELECT DISTINCT ON (node_id) node_id, extract(epoch FROM ts)::float8, "
            + ", ".join(MEASURED)
            + " FROM water.readings ORDER BY node_id, ts DESC"
        ).fetchall()
        open_anomalies = {
            a
            for (a,) in conn.execute(
                "SELECT anomaly_id FROM water.anomalies WHERE ended_at IS NULL"
            )
        }
        # what each node's 48 h window must hold: its readings since its newest minus 48 h
        window_rows = dict(
            conn.execute(
                "SELECT r.node_id, count(*) FROM water.readings r JOIN "
                "(SELECT node_id, max(ts) AS m FROM water.readings GROUP BY node_id) n "
                "ON n.node_id = r.node_id AND r.ts >= n.m - interval '48 hours' "
                "GROUP BY r.node_id"
            ).fetchall()
        )
    assert stored == accepted > 20_000
    cold = pl.read_parquet(tmp_path / "cold" / "readings" / "**" / "*.parquet")
    assert cold.height == accepted

    r = redis.from_url(url, decode_responses=True)
    try:
        for node, ts, *values in newest:
            latest = r.hgetall(f"{prefix}node:{node}:latest")
            assert float(latest["ts_epoch"]) == ts, node
            for name, value in zip(MEASURED, values, strict=True):
                assert (float(latest[name]) if name in latest else None) == value, (node, name)
            assert r.zscore(f"{prefix}nodes:last_seen", node) == ts
            # the outage's batches (those of the last 48 h) came from the backlog
            assert r.zcard(f"{prefix}node:{node}:readings") == window_rows[node], node
        # open anomalies come back too, even those opened before Redis lost everything
        assert set(r.hkeys(f"{prefix}anomalies:active")) == open_anomalies
        keys = set(r.scan_iter(match=f"{prefix}*", count=1000))
        markers = {k for k in keys if k.startswith(f"{prefix}hot:writer:")}
        assert len(markers) == 1  # the writer's own (how it notices a Redis that lost data)
        expected = {f"{prefix}node:{node}:{kind}" for node, *_ in newest for kind in KINDS}
        expected.add(f"{prefix}nodes:last_seen")
        if open_anomalies:
            expected.add(f"{prefix}anomalies:active")
        assert keys - markers == expected
        for key in keys:  # every key expires (48 h)
            assert 0 < r.ttl(key) <= TTL_S, key
    finally:
        r.close()


def test_restart_restores_silent_nodes_latest_and_open_anomalies(server):
    from dataflows.model import US_PER_HOUR, US_PER_S
    from dataflows.tables import frame

    t0 = 1_700_000_000 * US_PER_S
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    w = HotRedisWriter(url, backoff_base_s=0.0)
    w.connect()
    both = {"node_id": ["quiet", "busy"], "ts": [t0, t0], "pressure": [3.1, 3.2]}
    w.write(frame("readings", both))
    w.write(frame("anomalies", {"anomaly_id": ["a1"], "node_id": ["quiet"], "started_at": [t0]}))
    server.kill()
    server.start()  # back empty: nothing of "quiet" is left in Redis
    busy = {"node_id": ["busy"], "ts": [t0 + US_PER_HOUR], "pressure": [3.3]}
    # redis-py reconnects the closed connection by itself: no failure, but the writer's
    # marker key is gone, so it sends the latest state of every node again
    w.write(frame("readings", busy))
    assert not w.behind
    r = redis.from_url(url, decode_responses=True)
    try:
        assert r.hget("water:node:quiet:latest", "pressure") == "3.1"
        assert r.zscore("water:nodes:last_seen", "quiet") == t0 / US_PER_S
        assert r.hkeys("water:anomalies:active") == ["a1"]
        assert r.hget("water:node:busy:latest", "pressure") == "3.3"
        for key in r.scan_iter(match="water:*"):
            assert 0 < r.ttl(key) <= TTL_S, key
    finally:
        r.close()
        w.close()


def test_hung_redis_costs_about_a_second_per_attempt(server):
    import os
    import signal
    import time

    from dataflows.model import US_PER_S
    from dataflows.tables import frame

    server.start()
    w = HotRedisWriter(f"redis://127.0.0.1:{server.port}/0", backoff_base_s=60.0)
    w.connect()
    rows = frame("readings", {"node_id": ["n"], "ts": [1_700_000_000 * US_PER_S], "level": [2.0]})
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing: a hung host
    try:
        started = time.monotonic()
        w.write(rows)  # times out after the 1 s socket timeout, does not raise
        first = time.monotonic() - started
        errors = metrics.SINK_ERRORS.labels("hot")._value.get()
        started = time.monotonic()
        for _ in range(100):
            w.write(rows)  # in backoff: only the backlog, no network (no 1 s timeout each)
        rest = time.monotonic() - started
        assert metrics.SINK_ERRORS.labels("hot")._value.get() == errors
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    # ~5 ms a write is the row mapping (polars), the same as when Redis answers
    assert w.behind and 0.9 < first < 2.0 and rest < 5.0, (first, rest)
    assert w.flush() and not w.behind  # Redis answers again: caught up
    w.close()
