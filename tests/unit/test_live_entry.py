"""``python -m bytewax.run "dataflows.pipeline:build_from_env()"`` with a bad setting.

As the operator sees it, in a subprocess: one line on stderr naming the setting, no traceback,
no password, a non-zero exit (2: a value that cannot work; 1: a service that does not answer).
No service is needed: nothing listens on 127.0.0.1:1, so the kernel refuses at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "Pa55-w0rd"
ENTRY = "dataflows.pipeline:build_from_env()"


def live_entry(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The Bytewax entry run with only ``env`` as WATERFLOW_* settings, in a scratch folder."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "bytewax.run", ENTRY],
        env={**clean, "WATERFLOW_OUT": str(tmp_path / "out"), **env},
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )


@pytest.mark.parametrize(("env", "code", "line"), [
    ({"WATERFLOW_KAFKA_BROKERS": "127.0.0.1:1", "WATERFLOW_TZ": "Mars/Olympus"}, 2,
     "error: WATERFLOW_TZ: unknown time zone 'Mars/Olympus' (give an IANA name such as "
     "Europe/Rome or UTC)"),
    ({}, 2, "error: WATERFLOW_KAFKA_BROKERS: no Kafka broker: set it to host:port[,host:port...]"),
    ({"WATERFLOW_KAFKA_BROKERS": "127.0.0.1:1", "WATERFLOW_GATHER_MS": "-5"}, 2,
     "error: WATERFLOW_GATHER_MS: must be a whole number >= 0, got '-5'"),
    ({"WATERFLOW_KAFKA_BROKERS": "127.0.0.1:1",
      "WATERFLOW_WARM_URL": f"mysql://writer:{SECRET}@db/water"}, 2,
     "error: WATERFLOW_WARM_URL: expected postgresql://USER@HOST:PORT/DATABASE, got "
     "mysql://writer:***@db/water"),
])
def test_a_bad_value_is_one_line_and_exit_2(tmp_path, env, code, line):
    run = live_entry(tmp_path, **env)
    assert (run.returncode, run.stderr) == (code, line + "\n")
    assert run.stdout == ""
    assert not (tmp_path / "out").exists()  # refused before anything was started


def test_an_unreachable_postgresql_is_one_line_and_exit_1(tmp_path):
    run = live_entry(tmp_path, WATERFLOW_KAFKA_BROKERS="127.0.0.1:1",
                     WATERFLOW_WARM_URL=f"postgresql://writer:{SECRET}@127.0.0.1:1/water")
    assert run.returncode == 1
    assert run.stderr.startswith("error: WATERFLOW_WARM_URL postgresql://writer:***@127.0.0.1:1/"
                                 "water: cannot connect: ")
    assert run.stderr.count("\n") == 1 and SECRET not in run.stderr
    assert "Traceback" not in run.stderr


def test_a_bad_configuration_file_is_one_line_naming_its_key(tmp_path):
    config = tmp_path / "waterflow.toml"
    config.write_text('kafka_brokers = "127.0.0.1:1"\ntz = "Mars/Olympus"\n')
    run = live_entry(tmp_path, WATERFLOW_CONFIG=str(config))
    assert run.returncode == 2
    assert run.stderr == (f"error: {config}: tz: unknown time zone 'Mars/Olympus' (give an "
                          "IANA name such as Europe/Rome or UTC)\n")
    # the environment wins over the file: with a good zone, the broker is what is refused
    run = live_entry(tmp_path, WATERFLOW_CONFIG=str(config), WATERFLOW_TZ="UTC")
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: {config}: kafka_brokers 127.0.0.1:1: no Kafka broker "
                                 "answered within")
    assert run.stderr.count("\n") == 1
