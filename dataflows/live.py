"""The live pipeline: the replay's very flow, with Kafka as its source, set up from the environment.

``python -m bytewax.run "dataflows.pipeline:build_from_env()"`` and ``waterflow run`` both build
it here. Only the source differs from a replay (``connectors.kafka.ReadingsSource`` instead of
the file source); the sink is the same tier sink, plus the dead-letter and anomaly topics.

Environment (DESIGN.md): ``WATERFLOW_KAFKA_BROKERS`` (required), ``WATERFLOW_KAFKA_TOPIC``
(default water.readings), ``WATERFLOW_KAFKA_*`` security settings, the tier URLs
``WATERFLOW_WARM_URL``/``HOT_URL``/``COLD_URL`` (embedded defaults under ``WATERFLOW_OUT``, default
.waterflow, when unset), ``WATERFLOW_NETWORK``, ``WATERFLOW_TZ``, ``WATERFLOW_LATENESS_S``,
``WATERFLOW_GATHER_MS`` (how long a node's readings are gathered before validation, default
200), ``WATERFLOW_RECOVERY_DIR`` and ``WATERFLOW_SNAPSHOT_S`` (recovery, ``waterflow run``),
``WATERFLOW_COLD_LOAD_S`` (a BigQuery cold tier is loaded from a spool under the out folder this
often, default 900), ``WATERFLOW_RUN_ID``, ``WATERFLOW_HEARTBEAT_S`` (the run's ingest_runs
row, default 10), ``WATERFLOW_KAFKA_TAIL`` (``false``: stop at the end of the topic),
``WATERFLOW_KAFKA_POLL_MAX`` (messages of one poll of a partition, default 5000).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bytewax.dataflow import Dataflow

from dataflows.settings import Settings, heartbeat_from_env, tz_from_env, with_input_limits
from dataflows.topology import load_network

if TYPE_CHECKING:
    from connectors.kafka import KafkaConfig
    from connectors.tiers import TierConfig

#: What a live node waits for more of its readings before validating them (ms), by default.
GATHER_MS = 200
#: Rows of one table gathered into one write (ms): latency vs fewer, larger transactions.
ROWS_GATHER_MS = 250
SNAPSHOT_S = 10
#: A BigQuery cold tier is loaded from a local spool this often (s): 192 jobs a day.
COLD_LOAD_S = 900
RUN_FILE = "waterflow-run"  # in the recovery folder: the run's id survives restarts


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def recovery_dir_from_env(env: Mapping[str, str]) -> Path | None:
    """``WATERFLOW_RECOVERY_DIR``, else Bytewax's own ``BYTEWAX_RECOVERY_DIRECTORY``."""
    value = env.get("WATERFLOW_RECOVERY_DIR") or env.get("BYTEWAX_RECOVERY_DIRECTORY")
    return Path(value) if value else None


def run_identity(recovery_dir: Path | None, given: str | None) -> tuple[str, int]:
    """The run's id and start (µs): kept in the recovery folder, so a resumed run stays one run.

    Several processes sharing the folder agree: the first one creates the file, the others
    read it.
    """
    now_us = time.time_ns() // 1000
    fresh = given or f"live-{datetime.now().astimezone():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    if recovery_dir is None:
        return fresh, now_us
    recovery_dir.mkdir(parents=True, exist_ok=True)
    path = recovery_dir / RUN_FILE
    try:
        with path.open("x") as f:
            f.write(f"{fresh} {now_us}\n")
        return fresh, now_us
    except FileExistsError:
        for _ in range(50):  # the creator may not have written the line yet
            text = path.read_text().split()
            if len(text) == 2:
                return text[0], int(text[1])
            time.sleep(0.01)
        raise RuntimeError(f"{path} is not a run identity file ('RUN_ID STARTED_US')") from None


@dataclass(frozen=True)
class LiveOptions:
    """Everything the live flow needs, validated."""

    kafka: KafkaConfig
    tiers: TierConfig
    settings: Settings
    recovery_dir: Path | None
    snapshot_s: int
    tail: bool
    poll_max: int = 5000  # messages of one poll of a partition


def options_from_env(environ: Mapping[str, str] | None = None, **overrides: object) -> LiveOptions:
    """Options from the environment; ``overrides`` (the CLI's options) win."""
    from connectors.kafka import KafkaConfig
    from connectors.tiers import TierConfig

    env = dict(os.environ if environ is None else environ)
    for name, value in overrides.items():
        if value is not None:
            env[name] = str(value)
    kafka = KafkaConfig.from_env(environ=env)
    out = Path(env.get("WATERFLOW_OUT") or ".waterflow")
    tiers = replace(
        TierConfig.from_env(out, environ=env),
        hot_prefix=env.get("WATERFLOW_HOT_PREFIX") or "water:",
        stream=kafka,
        cold_load_every_s=_int(env, "WATERFLOW_COLD_LOAD_S", COLD_LOAD_S),
    )
    recovery = recovery_dir_from_env(env)
    run_id, started_us = run_identity(recovery, env.get("WATERFLOW_RUN_ID") or None)
    network_file = env.get("WATERFLOW_NETWORK")
    settings = with_input_limits(Settings(
        run_id=run_id,
        tz=env.get("WATERFLOW_TZ") or tz_from_env(),
        network=load_network(Path(network_file) if network_file else None),
        allowed_lateness_s=_int(env, "WATERFLOW_LATENESS_S", 6 * 3600),
        node_gather_ms=_int(env, "WATERFLOW_GATHER_MS", GATHER_MS),
        rows_gather_ms=_int(env, "WATERFLOW_ROWS_GATHER_MS", ROWS_GATHER_MS),
        ledger_interval_s=heartbeat_from_env(env),
        started_us=started_us,
        source_label=f"kafka:{kafka.topic}",
    ), env)
    snapshot_s = _int(env, "WATERFLOW_SNAPSHOT_S", SNAPSHOT_S)
    if snapshot_s < 1:
        raise ValueError(f"WATERFLOW_SNAPSHOT_S must be >= 1 (whole seconds), got {snapshot_s}")
    return LiveOptions(
        kafka=kafka,
        tiers=tiers,
        settings=settings,
        recovery_dir=recovery,
        snapshot_s=snapshot_s,
        tail=_flag(env, "WATERFLOW_KAFKA_TAIL", True),
        poll_max=_int(env, "WATERFLOW_KAFKA_POLL_MAX", 5000),
    )


def build_live_flow(options: LiveOptions, stop: threading.Event | None = None) -> Dataflow:
    """The pipeline from the Kafka topic to every tier; setting ``stop`` ends it gracefully."""
    from connectors.kafka import ReadingsSource
    from connectors.tier_sink import TierSink
    from connectors.tiers import resolve_embedded
    from dataflows.pipeline import build_flow

    source = ReadingsSource(
        options.kafka, options.settings, tail=options.tail, batch_size=options.poll_max,
        stop=stop,
    )
    return build_flow(source, TierSink(resolve_embedded(options.tiers)), options.settings)


def build_from_env() -> Dataflow:
    """The live flow for ``python -m bytewax.run``, metrics served if a port is configured.

    With several processes on one host, process ``i`` serves on ``WATERFLOW_METRICS_PORT + i``
    (``BYTEWAX_PROCESS_ID``), so they do not fight over one port.
    """
    options = options_from_env()
    port = os.environ.get("WATERFLOW_METRICS_PORT", "").strip()
    if port:
        from connectors.metrics import serve

        serve(_int(os.environ, "WATERFLOW_METRICS_PORT", 0) + _process_id())
    return build_live_flow(options)


def _process_id() -> int:
    return _int(os.environ, "BYTEWAX_PROCESS_ID", 0)
