"""The local stack without Docker (deploy/local/stack.sh) started, used and stopped for real.

``stack.sh start`` with its folder in tmp_path, free loopback ports and a fresh database on the
machine's PostgreSQL; Redis on a free port, so the stack starts a Redis of its own. Every
service must report up, a second start must start nothing, the published samples must reach
PostgreSQL and Redis through the dataflow, and ``stop`` must end every process whose pid the
stack recorded.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.e2e.conftest import REPO, free_port, get
from tests.integration import live_helpers as live
from tests.integration.conftest import fresh_database

pytestmark = pytest.mark.integration

SCRIPT = REPO / "deploy" / "local" / "stack.sh"
SAMPLES = REPO / "dataflows" / "samples"
WAIT_S = 120  # upper bound of the wait for the samples to be read
SERVICES = ("kafka", "postgresql", "redis", "prometheus", "alertmanager", "waterflow")


def _stack(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True,
                          text=True, timeout=180)


def _status(env: dict[str, str]) -> dict[str, list[str]]:
    """``stack.sh status`` as {service: [state, owner, address...]}; it must exit 0."""
    done = _stack("status", env)
    assert done.returncode == 0, done.stdout + done.stderr
    return {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}


def _recorded_pids(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): int(p.read_text()) for p in folder.rglob("*.pid")}


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _metric(text: str, name: str, labels: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(rf"{name}(\{{|\s)", line) and labels in line)


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with fresh_database("waterflow_stack") as url:
        env = {
            **os.environ,
            "WATERFLOW_STACK_DIR": str(tmp_path / "stack"),
            "WATERFLOW_KAFKA_PORT": str(free_port()),
            "PROMETHEUS_PORT": str(free_port()),
            "ALERTMANAGER_PORT": str(free_port()),
            "WATERFLOW_METRICS_PORT": str(free_port()),
            "WATERFLOW_WARM_URL": url,
            "WATERFLOW_HOT_URL": f"redis://127.0.0.1:{free_port()}/0",
        }
        for name in ("WATERFLOW_STACK_ALERT_FOR", "WATERFLOW_STACK_PUBLISH_SPEED",
                     "WATERFLOW_HOT_PREFIX"):
            env.pop(name, None)
        try:
            yield env
        finally:
            _stack("stop", env)  # a failed test stops what it started too (idempotent)


def test_the_stack_starts_once_carries_the_samples_and_stops_what_it_started(stack_env, tmp_path):
    env, folder = stack_env, tmp_path / "stack"
    started = _stack("start", env)
    assert started.returncode == 0, started.stdout + started.stderr[-4000:]
    assert "start failed" not in started.stderr
    pids = _recorded_pids(folder)
    # Every service on a port of its own is started by the stack; PostgreSQL is the machine's.
    assert set(pids) == {"kafka/broker.pid", "redis.pid", "prometheus/prometheus.pid",
                         "prometheus/alertmanager.pid", "waterflow.pid", "publisher.pid"}

    status = _status(env)
    for name in SERVICES:
        assert status[name][0] == "up", (name, status[name])
    assert status["kafka"][1:3] == ["pid", str(pids["kafka/broker.pid"])]
    assert status["redis"][1:3] == ["pid", str(pids["redis.pid"])]
    assert status["waterflow"][1:3] == ["pid", str(pids["waterflow.pid"])]
    assert status["postgresql"][1] == "external"
    assert status["grafana"][0] == "n/a"

    # Start again: everything answers, nothing new is started, nothing is published twice.
    again = _stack("start", env)
    assert again.returncode == 0, again.stdout + again.stderr[-4000:]
    assert _recorded_pids(folder) == pids

    # The samples reach the warm tier: wait until the publisher is done and the dataflow has
    # read every message (its counters add up to what was published).
    metrics_url = f"http://127.0.0.1:{env['WATERFLOW_METRICS_PORT']}/metrics"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        published = re.search(r"^published ([\d,]+) messages",
                              (folder / "publisher.log").read_text(), re.M)
        text = get(metrics_url)[1]
        if published and _metric(text, "waterflow_readings_total") == int(
                published[1].replace(",", "")):
            break
        time.sleep(1)
    else:
        pytest.fail(f"the samples were not all read within {WAIT_S} s: "
                    f"{(folder / 'waterflow.log').read_text()[-4000:]}")
    accepted = _metric(text, "waterflow_readings_total", 'outcome="accepted"')
    # The simulated network's nodes and the ten district inflows of the BWDF excerpt.
    network = tomllib.loads((SAMPLES / "network.toml").read_text())
    nodes = set(network["nodes"]) | {f"dma-{i}" for i in range(1, 11)}
    deadline = time.monotonic() + WAIT_S
    while live.readings_count(env["WATERFLOW_WARM_URL"]) < accepted:
        assert time.monotonic() < deadline, "water.readings never held every accepted reading"
        time.sleep(1)
    with psycopg.connect(env["WATERFLOW_WARM_URL"]) as conn:
        rows, seen = conn.execute(
            "SELECT count(*), array_agg(DISTINCT node_id) FROM water.readings").fetchone()
    assert rows == accepted > 28_000
    assert set(seen) == nodes
    hot = redis.from_url(env["WATERFLOW_HOT_URL"])
    try:
        assert hot.exists("water:node:d1-inflow:latest", "water:node:dma-1:latest") == 2
    finally:
        hot.close()
    assert _status(env)["publisher"][0] == "done"

    stopped = _stack("stop", env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    still = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not still, f"still running after stop: {still}"
    assert not list(folder.rglob("*.pid"))
    down = _stack("status", env)
    assert down.returncode == 1
    assert [line.split()[1] for line in down.stdout.splitlines()
            if line.split()[0] in ("kafka", "redis", "waterflow", "prometheus")] == ["down"] * 4
