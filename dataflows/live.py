"""The live pipeline: the replay's very flow, with Kafka as its source, set up from the environment.

``python -m bytewax.run "dataflows.pipeline:build_from_env()"`` and ``waterflow run`` both build
it here. Only the source differs from a replay (``connectors.kafka.ReadingsSource`` instead of
the file source); the sink is the same tier sink, plus the dead-letter and anomaly topics.

Environment (DESIGN.md): ``WATERFLOW_KAFKA_BROKERS`` (required), ``WATERFLOW_KAFKA_TOPIC``
(default water.readings), ``WATERFLOW_KAFKA_*`` security settings, the tier URLs
``WATERFLOW_WARM_URL``/``HOT_URL``/``COLD_URL`` (embedded defaults under ``WATERFLOW_OUT``, default
.waterflow, when unset), ``WATERFLOW_NETWORK``, ``WATERFLOW_TZ``, ``WATERFLOW_HOLIDAYS`` (the
utility's own public holidays for the forecasts, comma-separated 'MM-DD' or 'YYYY-MM-DD'),
``WATERFLOW_LATENESS_S``,
``WATERFLOW_GATHER_MS`` (a node's readings wait for the next tick of this many ms before
validation, default 200), ``WATERFLOW_RECOVERY_DIR`` and ``WATERFLOW_SNAPSHOT_S`` (recovery,
``waterflow run``), ``WATERFLOW_COLD_LOAD_S`` (a BigQuery cold tier is loaded from a spool under
the out folder this often, default 900), ``WATERFLOW_RUN_ID``, ``WATERFLOW_HEARTBEAT_S`` (the
run's ingest_runs row, default 10), ``WATERFLOW_KAFKA_TAIL`` (``false``: stop at the end of the
topic), ``WATERFLOW_KAFKA_POLL_MAX`` (messages of one poll of a partition, default 5000).

The same settings may come from a TOML file named by ``WATERFLOW_CONFIG`` (or ``waterflow run
--config``): its keys are the variables' names in lower case without ``WATERFLOW_``
(``kafka_brokers = "..."``, ``gather_ms = 200``, ``holidays = ["08-16"]``; every key:
``deploy/waterflow.example.toml``).
A variable that is set wins over the file; a command-line option wins over both.
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from bytewax.dataflow import Dataflow

from dataflows import config_check as check
from dataflows.config_check import ConfigError, Setting, pick
from dataflows.logs import set_run_id, setup_logging
from dataflows.settings import (
    Settings,
    heartbeat_from_env,
    hide_secrets,
    tz_from_env,
    with_input_limits,
)
from dataflows.topology import load_network

if TYPE_CHECKING:
    from connectors.kafka import KafkaConfig
    from connectors.tiers import TierConfig

#: What a live node waits for more of its readings before validating them (ms), by default.
GATHER_MS = 200
SNAPSHOT_S = 10
#: A BigQuery cold tier is loaded from a local spool this often (s): 192 jobs a day.
COLD_LOAD_S = 900
RUN_FILE = "waterflow-run"  # in the recovery folder: the run's id survives restarts

#: The keys of a configuration file and the TOML type of each: key ``gather_ms`` sets
#: ``WATERFLOW_GATHER_MS``. deploy/waterflow.example.toml lists them with their defaults.
CONFIG_KEYS: dict[str, type] = {
    "kafka_brokers": str,
    "kafka_topic": str,
    "kafka_quarantine_topic": str,
    "kafka_anomalies_topic": str,
    "kafka_security_protocol": str,
    "kafka_sasl_mechanism": str,
    "kafka_sasl_username": str,
    "kafka_sasl_password": str,
    "kafka_ssl_ca_location": str,
    "kafka_ssl_certificate_location": str,
    "kafka_ssl_key_location": str,
    "kafka_ssl_key_password": str,
    "kafka_tail": bool,
    "kafka_poll_max": int,
    "warm_url": str,
    "hot_url": str,
    "cold_url": str,
    "out": str,
    "hot_prefix": str,
    "bigquery_endpoint": str,
    "cold_load_s": int,
    "network": str,
    "tz": str,
    "holidays": list,  # of strings, or one comma-separated string as in the variable
    "lateness_s": int,
    "gather_ms": int,
    "min_timestamp": str,
    "quarantine_raw_bytes": int,
    "recovery_dir": str,
    "snapshot_s": int,
    "run_id": str,
    "heartbeat_s": float,
    "retention_every_h": float,
    "metrics_port": int,
    "metrics_addr": str,
    "log_format": str,
    "log_level": str,
}
_KINDS = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    list: "a list of strings",
}


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


def read_config_file(setting: Setting) -> dict[str, str]:
    """The settings of the TOML file ``setting`` names, as ``WATERFLOW_*`` variables.

    An unreadable file, an unknown key or a value of the wrong type is a ConfigError naming
    the file and the key.
    """
    assert setting.value is not None
    path = Path(setting.value)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(setting.name, f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(setting.shown, f"not valid TOML: {exc}") from None
    found: dict[str, str] = {}
    for key, value in data.items():
        kind = CONFIG_KEYS.get(key)
        if kind is None:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else "see deploy/waterflow.example.toml"
            raise ConfigError(str(path), f"unknown key {key!r} ({hint})")
        fits = type(value) is kind or (kind is float and type(value) is int)
        if kind is list:  # strings, or one string comma-separated as in the variable
            fits = type(value) is str or (fits and all(type(v) is str for v in value))
        if not fits:
            raise ConfigError(f"{path}: {key}", f"must be {_KINDS[kind]}, got {value!r}")
        if type(value) is list:
            text = ",".join(value)
        else:
            text = str(value).lower() if kind is bool else str(value)
        found[f"WATERFLOW_{key.upper()}"] = text
    return found


def apply_config_file(
    given: str | Path | None = None, environ: MutableMapping[str, str] | None = None
) -> Path | None:
    """Set the variables of the configuration file that the environment leaves unset.

    The file is ``given`` (``--config``), else ``WATERFLOW_CONFIG``; with neither, nothing
    happens. Returns the file read. Messages about a value from the file name its key.
    """
    env = os.environ if environ is None else environ
    for name, (_, value) in check.file_settings().items():
        if env.get(name) == value:  # set by an earlier call in this process, not by the user
            del env[name]
    setting = pick("--config", given, "WATERFLOW_CONFIG", env)
    origins: dict[str, tuple[str, str]] = {}
    if setting.value is not None:
        for name, value in read_config_file(setting).items():
            if not env.get(name, "").strip():  # a variable that is set wins over the file
                env[name] = value
                origins[name] = (f"{setting.value}: {name.removeprefix('WATERFLOW_').lower()}",
                                 value)
    check.note_file_settings(origins)
    return None if setting.value is None else Path(setting.value)


def check_live(
    given: Mapping[str, tuple[str, object]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Check every setting of the live run up front, then the services given by URL.

    ``given`` maps a variable to the command-line option that may override it and the
    option's value (None: not given). Raises ConfigError naming the first bad setting as the
    user gave it: option, variable, or key of the configuration file.
    """
    env = os.environ if environ is None else environ
    options = given or {}

    def setting(name: str) -> Setting:
        option, value = options.get(name, (name, None))
        return pick(option, value, name, env)

    brokers = setting("WATERFLOW_KAFKA_BROKERS")
    if brokers.value is None and "WATERFLOW_KAFKA_BROKERS" not in options:
        raise ConfigError(brokers.name, "no Kafka broker: set it to host:port[,host:port...]")
    kafka = check.kafka(brokers, setting("WATERFLOW_KAFKA_TOPIC").value)
    warm = setting("WATERFLOW_WARM_URL")
    hot = setting("WATERFLOW_HOT_URL")
    out = setting("WATERFLOW_OUT").value or ".waterflow"
    cold = setting("WATERFLOW_COLD_URL")
    tiers = check.tiers(Path(out), warm, hot, cold,
                        setting("WATERFLOW_HOT_PREFIX").value or "water:")
    check.zone(setting("WATERFLOW_TZ"))
    check.holidays(setting(check.HOLIDAYS_ENV))
    check.network(setting("WATERFLOW_NETWORK"))
    check.instant(setting("WATERFLOW_MIN_TIMESTAMP"))
    for name, minimum in (
        ("WATERFLOW_LATENESS_S", 0),
        ("WATERFLOW_GATHER_MS", 0),
        ("WATERFLOW_SNAPSHOT_S", 1),
        ("WATERFLOW_COLD_LOAD_S", 1),
        ("WATERFLOW_KAFKA_POLL_MAX", 1),
        ("WATERFLOW_QUARANTINE_RAW_BYTES", 64),
    ):
        check.whole_number(setting(name), 0, minimum)
    check.port(setting("WATERFLOW_METRICS_PORT"))
    check.reach_tiers(tiers, warm, hot, cold)
    check.reach_kafka(brokers, kafka)


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
        holidays=check.holidays_given(None, env),
        allowed_lateness_s=_int(env, "WATERFLOW_LATENESS_S", 6 * 3600),
        node_gather_ms=_int(env, "WATERFLOW_GATHER_MS", GATHER_MS),
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

    Configured as ``waterflow run`` is: the configuration file of ``WATERFLOW_CONFIG`` under
    the environment, logs set up, every setting checked and the services probed first; a bad
    one ends the process with one line on stderr (exit 2, or 1 for a service not answering),
    no traceback. With several processes on one host, process ``i`` serves on
    ``WATERFLOW_METRICS_PORT + i`` (``BYTEWAX_PROCESS_ID``), so they do not fight over one port.
    """
    try:
        apply_config_file()
        setup_logging()
        check_live()
        options = options_from_env()
    except ConfigError as exc:
        _fail(str(exc), exc.exit_code)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc), check.USAGE)
    except RuntimeError as exc:
        _fail(str(exc), check.UNREACHABLE)
    set_run_id(options.settings.run_id)
    port = os.environ.get("WATERFLOW_METRICS_PORT", "").strip()
    if port:
        try:
            own_port = _int(os.environ, "WATERFLOW_METRICS_PORT", 0) + _process_id()
            check.serve_metrics("WATERFLOW_METRICS_PORT", own_port)
        except ConfigError as exc:
            _fail(str(exc), exc.exit_code)
    return build_live_flow(options)


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr, no secret of the environment in it, and exit."""
    text = hide_secrets(" ".join(message.split()), check.secrets_in_env())
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(code)


def _process_id() -> int:
    return _int(os.environ, "BYTEWAX_PROCESS_ID", 0)
