"""``waterflow run --config FILE``: a live run set up by the TOML file alone, logging JSON lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from connectors.kafka import KafkaConfig, ensure_topic
from connectors.kafka_publish import file_messages, publish
from dataflows.settings import Settings
from tests.integration.conftest import fresh_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "tests" / "data" / "canonical_example.csv"
#: A line librdkafka writes to stderr itself: %LEVEL|TIME|FACILITY|rdkafka#CLIENT| ...
LIBRDKAFKA = re.compile(r"%\d\|[\d.]+\|[A-Z]+\|rdkafka#")


def test_a_run_configured_by_its_file_logs_json_with_its_run_id(
    tmp_path, kafka_brokers, redis_url, redis_prefix
):
    topic = f"water.readings.test-{uuid.uuid4().hex[:10]}"
    config = KafkaConfig(brokers=(kafka_brokers,), topic=topic)
    assert ensure_topic(config, topic, 2)
    assert publish(file_messages([SAMPLE], Settings()), config).messages == 24
    run_id = f"cfg-{uuid.uuid4().hex[:8]}"
    with fresh_database("waterflow_cfg_live") as warm:
        path = tmp_path / "waterflow.toml"
        path.write_text(
            f'kafka_brokers = "{kafka_brokers}"\nkafka_topic = "{topic}"\n'
            f'kafka_tail = false\nwarm_url = "{warm}"\nhot_url = "{redis_url}"\n'
            f'hot_prefix = "{redis_prefix}"\ncold_url = "{(tmp_path / "cold").as_uri()}"\n'
            f'out = "{tmp_path / "out"}"\nrun_id = "{run_id}"\nlog_format = "json"\n'
            'tz = "Europe/Rome"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
        run = subprocess.run(
            [sys.executable, "-m", "dataflows.cli", "run", "--config", str(path)],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        with psycopg.connect(warm, connect_timeout=5) as conn:
            (rows,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
            runs = conn.execute("SELECT run_id FROM water.ingest_runs").fetchall()
    assert rows == 24
    assert runs == [(run_id,)]
    # stderr holds log records only, each one JSON object carrying the run's id; librdkafka's
    # own messages ("%4|...|CONFWARN|..." before) go through the same logging.
    lines = run.stderr.splitlines()
    assert not [line for line in lines if LIBRDKAFKA.match(line)]
    records = [json.loads(line) for line in lines]
    assert {r["run_id"] for r in records} == {run_id}
    (started,) = [r for r in records if r["logger"] == "dataflows.cli_live"]
    assert started["message"] == f"running {run_id} from {config.describe()}"
    assert started["level"] == "INFO"
