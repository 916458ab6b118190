"""End-to-end latency and sustained throughput of the live pipeline, Kafka to every tier.

    .venv/bin/python bench/kafka_live.py [--rates 1000 5000] [--seconds 60] [--nodes 1000]
        [--sample-nodes 50] [--max] [--logs DIR] [--profile]

What it sets up (and removes at the end, also on an error or Ctrl-C):
- a Tansu broker of its own on a free port (``deploy/local/kafka.sh start``/``stop``);
- a database of its own on the machine's PostgreSQL (WATERFLOW_TEST_PG_URL, default
  postgresql://postgres@127.0.0.1:5432/postgres), dropped at the end;
- a key prefix of its own on Redis (WATERFLOW_TEST_REDIS_URL, default redis://127.0.0.1:6379/0),
  its keys deleted at the end; the Parquet cold tier in a temporary folder.

For each rate: a new topic of 4 partitions, and ``python -m dataflows.cli run`` (one process,
one worker, defaults for every latency knob; the ``ingest_runs`` heartbeat every second) reading
it. The run counts as up once a warm-up reading of every node is in ``water.readings``. Then
synthetic readings of ``--nodes`` nodes (``n0001``...; flow 0-50 L/s, pressure 2-5 bar; key =
node_id; event time = the wall-clock time of the produce call) are produced at the rate for
``--seconds`` s, round-robin over the nodes, in 5 ms ticks.

What it measures (the event time of a reading *is* its produce time):
- Redis latency: for ``--sample-nodes`` nodes, a thread reads ``{prefix}node:{id}:latest``
  ``ts_epoch`` (one pipelined HGET per node) every 20 ms; a produced reading is visible once the
  hash holds it or a newer one of the node (a node's readings are written in order, and the same
  pipeline puts older ones of the batch into the node's ``readings`` set).
- PostgreSQL latency: for the same nodes, a thread asks every 50 ms for their rows newer than
  the last one seen per node (primary-key lookups); each new row's first-seen time counts.
- Both are upper bounds by up to one poll interval (plus the query's round trip).
- Sustained readings/s: the slope of ``accepted`` in ``water.run_status`` between heartbeats
  (timed by the row's own ``updated_at``) over the steady part of the window (first 10% skipped).
- Backlog: produced minus rows of the run in ``water.readings`` when producing stops, and the
  seconds until every produced reading was accepted (drain). The flow "kept up" when it sustained
  at least 95% of the rate and drained within 5 s.

Where the time went, printed per round for the producing window: the machine's CPU use, the CPU
of the flow, this script, the broker, the database's PostgreSQL backends and Redis (from /proc);
how long the flow's threads were runnable but waiting for a CPU (schedstat); the flow's CPU per
accepted reading; and per tier the sink's writes/s and mean write time (the flow's own
``waterflow_sink_write_seconds``, served on a free ``--metrics-port``).

``--max`` adds a round producing as fast as the flow takes it (the broker kept at most
``--max-backlog`` readings ahead of ``accepted``), to find the highest sustained readings/s.
``--profile`` runs each flow under cProfile (``flow-RATE.prof`` beside the flow logs, kept with
``--logs DIR``). Knobs of the flow (``WATERFLOW_GATHER_MS``, ``WATERFLOW_KAFKA_POLL_MAX``...) pass
through from the environment.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages

from connectors.kafka import KafkaConfig, ensure_topic  # noqa: E402

PG_URL = os.environ.get("WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PARTITIONS = 4
TICK_S = 0.005  # the producer sends what is due every 5 ms
REDIS_POLL_S = 0.020
PG_POLL_S = 0.050
STATUS_POLL_S = 0.5
HEARTBEAT_S = "1"  # WATERFLOW_HEARTBEAT_S of the run: ingest_runs refreshed every second
SKIP_FRACTION = 0.1  # start of the window left out of the sustained rate
KEPT_UP_RATIO = 0.95
KEPT_UP_DRAIN_S = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    return time.time_ns() // 1000


def us_to_dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def dt_to_us(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# What the benchmark sets up: broker, database, key prefix, cold folder


@contextmanager
def kafka_broker() -> Iterator[tuple[str, int | None]]:
    """A Tansu broker on a free port: (host:port, its pid), stopped at the end."""
    port = free_port()
    env = {**os.environ, "WATERFLOW_KAFKA_PORT": str(port)}
    script = ROOT / "deploy" / "local" / "kafka.sh"
    with tempfile.NamedTemporaryFile("r", prefix="waterflow-bench-started-") as started:
        env["STARTED"] = started.name
        try:
            out = subprocess.run(
                ["bash", str(script), "start"], env=env, cwd=ROOT, check=True,
                capture_output=True, text=True, timeout=120,
            ).stdout.strip()
            pidfile = Path(env.get("WATERFLOW_KAFKA_HOME") or ROOT / ".services" / "kafka")
            pidfile = pidfile / f"port-{port}" / "broker.pid"
            pid = int(pidfile.read_text()) if pidfile.exists() else None
            yield out.splitlines()[-1], pid
        finally:
            if started.read().strip():  # only the broker this script started
                subprocess.run(["bash", str(script), "stop"], env=env, cwd=ROOT, check=False,
                               timeout=60)


@contextmanager
def warm_database() -> Iterator[str]:
    """A database of its own (the flow migrates it), dropped at the end."""
    name = f"waterflow_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def hot_prefix() -> Iterator[str]:
    """A Redis key prefix of its own, its keys deleted at the end."""
    prefix = f"water:bench-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        client = redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            client.delete(*keys[i : i + 10_000])
        client.close()


# --------------------------------------------------------------------------------------------
# The flow under test


@dataclass
class Flow:
    """A ``waterflow run`` process, its log and its metrics port."""

    proc: subprocess.Popen
    log: Path
    run_id: str
    metrics_port: int

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the flow exited ({self.proc.returncode}); its log ends:\n"
                               + self.log.read_text()[-3000:])

    def stop(self) -> str:
        """SIGINT (Bytewax stops on Ctrl-C), then SIGTERM, then SIGKILL; how it ended."""
        for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait_s)
                return f"stopped by {sig.name} (exit {self.proc.returncode})"
            except subprocess.TimeoutExpired:
                continue
        return f"exit {self.proc.returncode}"


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process used so far; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _waiting_s(pid: int) -> float:
    """Seconds the threads of a process were runnable but waiting for a CPU (schedstat)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1]) / 1e9
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # a thread that just ended, or a kernel without schedstats
    return total


def _sink_writes(port: int) -> dict[str, tuple[float, float]]:
    """(writes, seconds) per tier so far, from the flow's ``waterflow_sink_write_seconds``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        if family.name == "waterflow_sink_write_seconds":
            for sample in family.samples:
                tier = sample.labels.get("tier", "?")
                if sample.name.endswith("_count"):
                    out[tier][0] = sample.value
                elif sample.name.endswith("_sum"):
                    out[tier][1] = sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass
class Usage:
    """Where the time went at one moment: CPU of the machine and of named processes, the flow's
    waits for a CPU and its sink writes. Two of them, subtracted, describe a window."""

    at: float
    machine: tuple[int, int]  # (busy, idle) ticks of all CPUs, /proc/stat
    cpu: dict[str, float]  # process label -> CPU s
    flow_waiting_s: float
    writes: dict[str, tuple[float, float]]

    @staticmethod
    def now(flow: Flow, others: dict[str, list[int]]) -> Usage:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        cpu = {}
        for label, pids in {"flow": [flow.proc.pid], **others}.items():
            cpu[label] = sum(c for c in map(_cpu_s, pids) if c is not None)
        return Usage(time.monotonic(), (sum(ticks[:8]) - idle, idle), cpu,
                     _waiting_s(flow.proc.pid), _sink_writes(flow.metrics_port))

    def since(self, before: Usage) -> str:
        wall = self.at - before.at
        busy = self.machine[0] - before.machine[0]
        total = busy + self.machine[1] - before.machine[1]
        cores = os.cpu_count() or 1
        lines = [f"machine CPU {100 * busy / max(1, total):.0f}% busy (of {cores} cores); "
                 + ", ".join(f"{k} {100 * (self.cpu[k] - before.cpu.get(k, 0)) / wall:.0f}%"
                             for k in self.cpu)
                 + f" of one core; flow runnable but waiting for a CPU "
                 f"{100 * (self.flow_waiting_s - before.flow_waiting_s) / wall:.0f}% (sum over "
                 "its threads)"]
        writes = []
        for tier, (count, seconds) in sorted(self.writes.items()):
            n = count - before.writes.get(tier, (0.0, 0.0))[0]
            took = seconds - before.writes.get(tier, (0.0, 0.0))[1]
            if n:
                writes.append(f"{tier} {n / wall:.1f}/s x {1000 * took / n:.0f} ms "
                              f"(busy {100 * took / wall:.0f}%)")
        lines.append("sink writes: " + ", ".join(writes))
        return "\n      ".join(lines)


def start_flow(brokers: str, topic: str, warm: str, cold: Path, prefix: str, log: Path,
               profile: Path | None = None) -> Flow:
    run_id = f"bench-{uuid.uuid4().hex[:10]}"
    metrics_port = free_port()
    python = [sys.executable]
    if profile is not None:
        python += ["-m", "cProfile", "-o", str(profile)]
    cmd = [
        *python, "-m", "dataflows.cli", "run", "--brokers", brokers, "--topic", topic,
        "--warm", warm, "--cold", cold.as_uri(), "--run-id", run_id,
        "--metrics-port", str(metrics_port),
    ]
    env = dict(os.environ)
    env.update(WATERFLOW_HOT_URL=REDIS_URL, WATERFLOW_HOT_PREFIX=prefix,
               WATERFLOW_HEARTBEAT_S=HEARTBEAT_S)
    env.pop("WATERFLOW_METRICS_PORT", None)
    with log.open("ab") as out:
        # A session of its own: a Ctrl-C in the terminal reaches this script, which stops it.
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out,
                                start_new_session=True)
    return Flow(proc, log, run_id, metrics_port)


def backends(conn: psycopg.Connection) -> list[int]:
    """The PostgreSQL server processes serving this database (the flow's and the pollers')."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    ).fetchall()
    return [r[0] for r in rows]


def redis_pid() -> int:
    client = redis.from_url(REDIS_URL)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def accepted_now(conn: psycopg.Connection, run_id: str) -> int:
    """The run's ``accepted`` as of its last heartbeat (at most about a second old)."""
    row = conn.execute(
        "SELECT accepted FROM water.run_status WHERE run_id = %s", (run_id,)
    ).fetchone()
    return int(row[0]) if row else 0


def stored_count(conn: psycopg.Connection, run_id: str) -> int:
    try:
        return conn.execute(
            "SELECT count(*) FROM water.readings WHERE run_id = %s", (run_id,)
        ).fetchone()[0]
    except psycopg.errors.UndefinedTable:  # not migrated yet
        return 0


# --------------------------------------------------------------------------------------------
# Producing


class Readings:
    """Synthetic, plausible readings: a steady flow per node with a slow wave and noise."""

    def __init__(self, nodes: int, seed: int = 1) -> None:
        width = max(4, len(str(nodes)))
        self.ids = [f"n{i:0{width}d}" for i in range(1, nodes + 1)]
        rng = random.Random(seed)
        self._flow = [rng.uniform(2.0, 40.0) for _ in self.ids]
        self._pressure = [rng.uniform(2.8, 4.2) for _ in self.ids]
        self._last = [0] * nodes
        self._rng = rng

    def message(self, i: int) -> tuple[str, int, bytes]:
        """Node ``i``'s next reading, stamped now: (node_id, event time µs, JSON value)."""
        ts = max(now_us(), self._last[i] + 1)  # strictly increasing per node
        self._last[i] = ts
        gauss = self._rng.gauss
        flow = min(50.0, max(0.0, self._flow[i] * (1 + 0.03 * gauss(0, 1))))
        pressure = min(5.0, max(2.0, self._pressure[i] + 0.02 * gauss(0, 1)))
        stamp = us_to_dt(ts).isoformat(timespec="microseconds")
        value = (f'{{"node_id":"{self.ids[i]}","timestamp":"{stamp}",'
                 f'"flow_rate":{flow:.3f},"pressure":{pressure:.3f}}}')
        return self.ids[i], ts, value.encode()


def make_producer(brokers: str):  # -> confluent_kafka.Producer
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": brokers, "linger.ms": 5, "enable.idempotence": True})


def send(producer, topic: str, key: str, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.01)


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Samples:
    """Produce times of the sampled nodes' readings, and the latencies seen per tier."""

    nodes: dict[str, int]  # node id -> its index in Readings.ids
    redis_pending: dict[str, collections.deque] = field(default_factory=dict)
    redis_lat: list[float] = field(default_factory=list)
    pg_lat: list[float] = field(default_factory=list)
    produced: int = 0  # sampled readings produced
    pg_last: dict[str, int] = field(default_factory=dict)  # newest ts produced per node

    def __post_init__(self) -> None:
        self.redis_pending = {n: collections.deque() for n in self.nodes}

    def produced_one(self, node: str, ts: int) -> None:
        self.redis_pending[node].append(ts)
        self.pg_last[node] = ts
        self.produced += 1


class Poller(threading.Thread):
    """Calls ``poll`` every ``interval`` s until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                self.poll()
                self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.close()

    def poll(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def halt(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        if self.error is not None:
            raise RuntimeError(f"{type(self).__name__} failed: {self.error}") from self.error


class RedisPoller(Poller):
    """Visibility of the sampled nodes' readings in ``{prefix}node:{id}:latest``."""

    def __init__(self, samples: Samples, prefix: str) -> None:
        super().__init__(REDIS_POLL_S)
        self.samples = samples
        self.nodes = list(samples.nodes)
        self.keys = [f"{prefix}node:{n}:latest" for n in self.nodes]
        self.client = redis.from_url(REDIS_URL, socket_timeout=5)

    def poll(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.hget(key, "ts_epoch")
        answers = pipe.execute()
        seen = time.time()
        for node, value in zip(self.nodes, answers, strict=True):
            if value is None:
                continue
            newest = round(float(value) * 1e6)
            pending = self.samples.redis_pending[node]
            while pending and pending[0] <= newest:
                self.samples.redis_lat.append(seen - pending.popleft() / 1e6)

    def pending(self) -> int:
        return sum(len(q) for q in self.samples.redis_pending.values())

    def close(self) -> None:
        self.client.close()


class PgPoller(Poller):
    """Visibility of the sampled nodes' rows in ``water.readings`` (cursor per node)."""

    QUERY = (
        "SELECT r.node_id, r.ts FROM unnest(%s::text[], %s::timestamptz[]) AS c(node_id, after)"
        " JOIN water.readings AS r ON r.node_id = c.node_id AND r.ts > c.after"
    )

    def __init__(self, samples: Samples, warm: str, after_us: int) -> None:
        super().__init__(PG_POLL_S)
        self.samples = samples
        self.nodes = list(samples.nodes)
        self.after = {n: after_us for n in self.nodes}
        self.conn = psycopg.connect(warm, autocommit=True)

    def poll(self) -> None:
        rows = self.conn.execute(
            self.QUERY, (self.nodes, [us_to_dt(self.after[n]) for n in self.nodes])
        ).fetchall()
        seen = time.time()
        for node, ts in rows:
            us = dt_to_us(ts)
            self.samples.pg_lat.append(seen - us / 1e6)
            self.after[node] = max(self.after[node], us)

    def caught_up(self) -> bool:
        return all(self.after[n] >= self.samples.pg_last.get(n, 0) for n in self.nodes)

    def close(self) -> None:
        self.conn.close()


class StatusPoller(Poller):
    """The run's ``accepted`` count and the time its row was written (``updated_at``)."""

    def __init__(self, warm: str, run_id: str) -> None:
        super().__init__(STATUS_POLL_S)
        self.run_id = run_id
        self.conn = psycopg.connect(warm, autocommit=True)
        self.points: list[tuple[float, int]] = []  # (updated_at epoch s, accepted), distinct

    def poll(self) -> None:
        row = self.conn.execute(
            "SELECT updated_at, accepted FROM water.run_status WHERE run_id = %s", (self.run_id,)
        ).fetchone()
        if row is not None and row[0] is not None:
            point = (row[0].timestamp(), int(row[1]))
            if not self.points or point[0] > self.points[-1][0]:
                self.points.append(point)

    def accepted(self) -> int:
        return self.points[-1][1] if self.points else 0

    def rate(self, start: float, end: float) -> float | None:
        """Accepted per second between the first and last heartbeat within [start, end]."""
        inside = [p for p in self.points if start <= p[0] <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def reached(self, count: int) -> float | None:
        """When ``accepted`` first reached ``count`` (epoch s), if it did."""
        return next((t for t, n in self.points if n >= count), None)

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------------------------
# One round


@dataclass
class Result:
    rate: str
    produced: int
    produce_rate: float
    sustained: float | None
    redis: list[float]
    pg: list[float]
    sampled: int
    backlog: int
    drain_s: float | None
    kept_up: str


def wait_until_up(flow: Flow, conn: psycopg.Connection, producer, topic: str,
                  readings: Readings, timeout_s: float = 180) -> int:
    """Produce one reading per node; return once all are in PostgreSQL (the run is up)."""
    for i in range(len(readings.ids)):
        node, _ts, value = readings.message(i)
        send(producer, topic, node, value)
    producer.flush(30)
    deadline = time.monotonic() + timeout_s
    while stored_count(conn, flow.run_id) < len(readings.ids):
        flow.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the flow stored no warm-up reading in {timeout_s:.0f} s; "
                               f"see {flow.log}")
        time.sleep(0.2)
    return len(readings.ids)



def send_next(producer, topic: str, readings: Readings, samples: Samples, i: int) -> int:
    """Send reading ``i`` (noting its produce time if its node is sampled); the next index."""
    node, ts, value = readings.message(i)
    send(producer, topic, node, value)
    if node in samples.nodes:
        samples.produced_one(node, ts)
    return (i + 1) % len(readings.ids)

def produce_steady(producer, topic: str, readings: Readings, samples: Samples, rate: float,
                   seconds: float, flow: Flow) -> int:
    """``rate`` readings/s for ``seconds`` s, round-robin over the nodes, in ticks."""
    sent, i = 0, 0
    started = time.monotonic()
    end = started + seconds
    next_check = started + 1.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - started) * rate)
        while sent < due:
            i = send_next(producer, topic, readings, samples, i)
            sent += 1
        producer.poll(0)
        if now >= next_check:
            flow.check_alive()
            next_check = now + 1.0
        time.sleep(max(0.0, min(TICK_S, end - time.monotonic())))
    producer.flush(30)
    return sent


def produce_max(producer, topic: str, readings: Readings, samples: Samples, seconds: float,
                flow: Flow, status: StatusPoller, warmup: int, max_backlog: int) -> int:
    """As fast as possible, at most ``max_backlog`` readings ahead of ``accepted``."""
    sent, i = 0, 0
    end = time.monotonic() + seconds
    next_check = time.monotonic() + 1.0
    while time.monotonic() < end:
        if sent + warmup - status.accepted() > max_backlog:
            producer.poll(0.01)
            continue
        for _ in range(500):
            i = send_next(producer, topic, readings, samples, i)
            sent += 1
        producer.poll(0)
        if time.monotonic() >= next_check:
            flow.check_alive()
            next_check = time.monotonic() + 1.0
    producer.flush(30)
    return sent


def run_round(rate: float | None, args: argparse.Namespace, brokers: str,
              broker_pid: int | None, warm: str, prefix: str, tmp: Path, logs: Path) -> Result:
    """One rate (``None``: as fast as possible) against a fresh topic and a fresh run."""
    label = "max" if rate is None else f"{rate:g}"
    topic = f"water.readings.bench-{uuid.uuid4().hex[:8]}"
    config = KafkaConfig(brokers=(brokers,), topic=topic)
    ensure_topic(config, topic, PARTITIONS)
    readings = Readings(args.nodes)
    step = max(1, args.nodes // args.sample_nodes)
    samples = Samples({readings.ids[k]: k for k in range(0, args.nodes, step)})
    cold = tmp / f"cold-{label}"
    profile = logs / f"flow-{label}.prof" if args.profile else None
    flow = start_flow(brokers, topic, warm, cold, prefix, logs / f"flow-{label}.log", profile)
    producer = make_producer(brokers)
    pollers: list[Poller] = []
    conn = psycopg.connect(warm, autocommit=True)
    try:
        t0 = time.monotonic()
        warmup = wait_until_up(flow, conn, producer, topic, readings)
        print(f"  [{label}] flow {flow.run_id} up after {time.monotonic() - t0:.1f} s; "
              f"producing for {args.seconds:g} s", flush=True)
        start_us = now_us()
        status = StatusPoller(warm, flow.run_id)
        redis_poller = RedisPoller(samples, prefix)
        pg_poller = PgPoller(samples, warm, start_us)
        pollers = [status, redis_poller, pg_poller]
        for p in pollers:
            p.start()
        others = {"bench": [os.getpid()], "broker": [broker_pid] if broker_pid else [],
                  "PostgreSQL (this db)": backends(conn), "Redis (shared)": [redis_pid()]}
        before, accepted_before = Usage.now(flow, others), accepted_now(conn, flow.run_id)
        started = time.time()
        if rate is None:
            sent = produce_max(producer, topic, readings, samples, args.seconds, flow, status,
                               warmup, args.max_backlog)
        else:
            sent = produce_steady(producer, topic, readings, samples, rate, args.seconds, flow)
        ended = time.time()
        usage = Usage.now(flow, others)
        took = accepted_now(conn, flow.run_id) - accepted_before
        per = (f"; flow CPU per accepted reading "
               f"{1e6 * (usage.cpu['flow'] - before.cpu['flow']) / took:.0f} µs" if took else "")
        print(f"  [{label}] while producing: {usage.since(before)}{per}", flush=True)
        backlog = sent + warmup - stored_count(conn, flow.run_id)
        total = sent + warmup
        drain_deadline = time.monotonic() + (120 if rate is None else 30)
        while time.monotonic() < drain_deadline:
            flow.check_alive()
            if (status.accepted() >= total and redis_poller.pending() == 0
                    and pg_poller.caught_up()):
                break
            time.sleep(0.1)
        for p in pollers:
            p.halt()
        reached = status.reached(total)
        drain_s = None if reached is None else max(0.0, reached - ended)
        skip = SKIP_FRACTION * (ended - started)
        sustained = status.rate(started + skip, ended)
        target = sent / (ended - started)
        kept = (sustained is not None and sustained >= KEPT_UP_RATIO * target
                and drain_s is not None and drain_s <= KEPT_UP_DRAIN_S)
        if rate is None:
            kept_up = "n/a"
        else:
            kept_up = "yes" if kept else "NO"
        return Result(label, sent, target, sustained, samples.redis_lat, samples.pg_lat,
                      samples.produced, backlog, drain_s, kept_up)
    finally:
        for p in pollers:
            p.stopping.set()
        conn.close()
        print(f"  [{label}] flow {flow.stop()}", flush=True)


# --------------------------------------------------------------------------------------------
# Report


def quantiles_ms(values: list[float]) -> str:
    if not values:
        return f"{'-':>6} {'-':>6} {'-':>6}"
    a = np.asarray(values) * 1000
    return f"{np.percentile(a, 50):6.0f} {np.percentile(a, 99):6.0f} {a.max():6.0f}"


def print_table(results: list[Result]) -> None:
    head = (f"{'rate/s':>7} {'produced':>9} {'sust. r/s':>9} | {'Redis ms p50':>12} {'p99':>6} "
            f"{'max':>6} | {'PG ms p50':>9} {'p99':>6} {'max':>6} | {'backlog':>7} "
            f"{'drain s':>7} {'kept up':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        sustained = f"{r.sustained:9,.0f}" if r.sustained is not None else f"{'?':>9}"
        drain = f"{r.drain_s:7.1f}" if r.drain_s is not None else f"{'>limit':>7}"
        rate = r.rate if r.rate != "max" else f"max({r.produce_rate:,.0f})"
        print(f"{rate:>7} {r.produced:9,d} {sustained} | {quantiles_ms(r.redis):>19} | "
              f"{quantiles_ms(r.pg):>16} | {r.backlog:7,d} {drain} {r.kept_up:>7}")
    for r in results:
        print(f"  {r.rate}: latency samples {len(r.redis):,} Redis / {len(r.pg):,} PostgreSQL "
              f"of {r.sampled:,} sampled readings produced")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[1000, 5000],
                   help="readings per second, one round each (default 1000 5000)")
    p.add_argument("--seconds", type=float, default=60, help="producing time per round")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--sample-nodes", type=int, default=50,
                   help="nodes whose readings are timed in Redis and PostgreSQL (default 50)")
    p.add_argument("--max", action="store_true",
                   help="also a round producing as fast as the flow takes it")
    p.add_argument("--max-backlog", type=int, default=100_000,
                   help="--max: readings the broker may hold ahead of the flow")
    p.add_argument("--profile", action="store_true",
                   help="run each flow under cProfile; FLOW-RATE.prof beside the logs (--logs)")
    p.add_argument("--logs", type=Path,
                   help="keep the flows' logs in this folder (default: deleted at the end)")
    args = p.parse_args()
    if args.nodes < 1 or args.sample_nodes < 1 or args.seconds <= 0:
        p.error("--nodes, --sample-nodes and --seconds must be positive")
    rounds: list[float | None] = [*args.rates, *([None] if args.max else [])]

    # SIGTERM cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    sampled = len(range(0, args.nodes, max(1, args.nodes // args.sample_nodes)))
    print(f"live pipeline benchmark: {args.nodes} nodes, {args.seconds:g} s per round, "
          f"topic of {PARTITIONS} partitions, one flow process (1 worker), "
          f"{os.cpu_count()} CPUs")
    print(f"latency: every reading of {sampled} sampled nodes "
          f"({sampled / args.nodes:.0%} of readings); Redis latest hash polled every "
          f"{REDIS_POLL_S * 1000:.0f} ms, PostgreSQL every {PG_POLL_S * 1000:.0f} ms "
          "(figures are upper bounds by up to one interval)", flush=True)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="waterflow-bench-live-") as d,
        kafka_broker() as (brokers, broker_pid),
        warm_database() as warm,
        hot_prefix() as prefix,
    ):
        print(f"broker {brokers}, PostgreSQL {warm}, Redis {REDIS_URL} prefix {prefix}, "
              f"cold {d}", flush=True)
        logs = args.logs or Path(d)
        logs.mkdir(parents=True, exist_ok=True)
        for rate in rounds:
            results.append(run_round(rate, args, brokers, broker_pid, warm, prefix, Path(d),
                                     logs))
    print()
    print_table(results)
    print(f"sust. r/s: accepted/s from water.run_status heartbeats over the window (first "
          f"{SKIP_FRACTION:.0%} skipped); backlog: produced - stored when producing stopped; "
          f"drain: s until all were accepted; kept up: >= {KEPT_UP_RATIO:.0%} of the rate "
          f"sustained and drained within {KEPT_UP_DRAIN_S:g} s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
