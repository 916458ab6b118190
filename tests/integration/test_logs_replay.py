"""A real replay's log records, as JSON lines, carry its run id; the summary stays as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import fresh_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "tests" / "data" / "canonical_example.csv"


def test_a_replay_logs_json_lines_with_its_run_id(tmp_path, redis_url, redis_prefix):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    with fresh_database("waterflow_logs") as warm:
        run = subprocess.run(
            [sys.executable, "-m", "dataflows.cli", "--log-format", "json", "replay",
             str(SAMPLE), "--quiet", "--warm", warm, "--hot", redis_url,
             "--hot-prefix", redis_prefix, "--cold", (tmp_path / "cold").as_uri(),
             "--out", str(tmp_path / "out"), "--now", "2026-01-01T00:00:00+00:00"],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    # diagnostics printed for the person at the terminal, then the records of the loggers
    (started,) = [line for line in lines if line.startswith("replaying ")]
    run_id = started.rsplit(" ", 1)[1]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    migrations = [r for r in records if r["logger"] == "connectors.warm_postgres"
                  and str(r["message"]).startswith("applied migration ")]
    assert len(migrations) >= 3  # a fresh database: every migration is applied by this run
    assert {r["run_id"] for r in records} == {run_id}
    assert {r["level"] for r in migrations} == {"INFO"}
    # the summary is output, on stdout, as it was
    assert f"run {run_id}" in run.stdout
