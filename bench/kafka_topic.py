"""A Tansu broker for the Kafka contenders, and a topic filled with `waterflow publish`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local" / "kafka.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def kafka_broker() -> Iterator[str]:
    """A broker on a free port (deploy/local/kafka.sh): host:port; stopped at the end."""
    env = {**os.environ, "WATERFLOW_KAFKA_PORT": str(free_port())}
    with tempfile.NamedTemporaryFile("r", prefix="waterflow-bench-started-") as started:
        env["STARTED"] = started.name
        try:
            out = subprocess.run(["bash", str(SCRIPT), "start"], env=env, cwd=ROOT, check=True,
                                 capture_output=True, text=True, timeout=180).stdout
            yield out.strip().splitlines()[-1]
        finally:
            if started.read().strip():  # only a broker this process started
                subprocess.run(["bash", str(SCRIPT), "stop"], env=env, cwd=ROOT, check=False,
                               timeout=60)


def publish(path: Path, brokers: str, topic: str) -> float:
    """Publish the CSV's readings to a new topic (4 partitions, key node_id); seconds taken."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dataflows.cli", "publish", str(path),
                    "--brokers", brokers, "--topic", topic],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0
