"""``waterflow run`` (the pipeline from Kafka) and ``waterflow publish`` (files to Kafka)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from dataflows import config_check as check
from dataflows.config_check import ConfigError, add_holiday_option, count_arg, pick
from dataflows.logs import set_run_id, setup_logging
from dataflows.settings import MIN_TIMESTAMP, Settings, url_secrets

FORMATS = ("auto", "canonical", "wide", "hidroconta", "json")
log = logging.getLogger(__name__)


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    """``waterflow run``: options override the WATERFLOW_* environment (dataflows.live)."""
    p = sub.add_parser(
        "run",
        help="run the pipeline live from Kafka",
        description="Run the pipeline from the Kafka topic water.readings into every tier, "
        "around the clock (or to the end of the topic with --until-end). Every option "
        "overrides its WATERFLOW_* environment variable. Several processes: start each with "
        "the same -a list and its own -i; they split the topic's partitions.",
    )
    p.add_argument("--config", type=Path, help="TOML file of settings, keys named like the "
                   "variables (gather_ms = 200 for WATERFLOW_GATHER_MS); a variable that is set "
                   "wins over it (default: WATERFLOW_CONFIG, or none)")
    p.add_argument("--brokers", help="Kafka brokers, host:port[,host:port...] (default: "
                   "WATERFLOW_KAFKA_BROKERS; required one way or the other)")
    p.add_argument("--topic", help="input topic (default: WATERFLOW_KAFKA_TOPIC or "
                   "water.readings)")
    p.add_argument("--warm", help="warm tier, PostgreSQL: postgresql://USER[:PASSWORD]@HOST:PORT/"
                   "DATABASE (default: WATERFLOW_WARM_URL, else an embedded PostgreSQL under "
                   "--out)")
    p.add_argument("--hot", help="hot tier, Redis: redis://[:PASSWORD@]HOST:PORT/DB, rediss:// "
                   "or unix:///SOCKET (default: WATERFLOW_HOT_URL, else an embedded Redis under "
                   "--out)")
    p.add_argument("--cold", help="cold tier: file:///PATH or a folder (Parquet archive), or "
                   "bigquery://PROJECT/DATASET (default: WATERFLOW_COLD_URL, else OUT/cold)")
    p.add_argument("--out", type=Path, help="folder of the embedded services for the tiers "
                   "given no URL (default: WATERFLOW_OUT or .waterflow)")
    p.add_argument("--network", type=Path, help="network topology TOML: districts, roles, "
                   "ranges (default: WATERFLOW_NETWORK, or none)")
    p.add_argument("--tz", help="zone of local days (default: WATERFLOW_TZ or Europe/Rome)")
    add_holiday_option(p)
    p.add_argument("--lateness", type=count_arg(0), help="seconds a KPI window stays open for "
                   "late readings (default: WATERFLOW_LATENESS_S or 21600)")
    p.add_argument("--gather-ms", type=count_arg(0), help="milliseconds a node's readings are "
                   "gathered before validation: latency against per-call cost (default: "
                   "WATERFLOW_GATHER_MS or 200)")
    p.add_argument("--min-timestamp", help="readings dated before this ISO date or time are "
                   "quarantined as too_old_timestamp (default: WATERFLOW_MIN_TIMESTAMP or "
                   f"{MIN_TIMESTAMP})")
    p.add_argument("--recovery-dir", type=Path, help="Bytewax recovery folder: a killed run "
                   "resumes from its last snapshot (default: WATERFLOW_RECOVERY_DIR, or none: "
                   "a restart re-reads the topic from the start)")
    p.add_argument("--snapshot-s", type=count_arg(1), help="seconds between recovery snapshots "
                   "(default: WATERFLOW_SNAPSHOT_S or 10)")
    p.add_argument("--recovery-partitions", type=count_arg(1), default=4,
                   help="partitions of a new recovery folder (default 4)")
    p.add_argument("-w", "--workers", type=count_arg(1), default=1, help="worker threads per "
                   "process; the results do not depend on it (default 1)")
    p.add_argument("-i", "--process-id", type=count_arg(0), help="this process's index in -a "
                   "(default: a single process)")
    p.add_argument("-a", "--addresses", help="host:port;host:port of every process, this one "
                   "included (default: a single process)")
    p.add_argument("--until-end", action="store_true",
                   help="stop at the end of every partition, a replay through Kafka (default: "
                   "run until stopped)")
    p.add_argument("--run-id", help="the run's id in ingest_runs (default: kept in the "
                   "recovery folder, else new)")
    p.add_argument("--metrics-port", help="serve /metrics on 127.0.0.1:PORT+i "
                   "(default: WATERFLOW_METRICS_PORT, or no server)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.run import cli_main

    from connectors.run_report import finish_run, start_run
    from connectors.tiers import resolve_embedded
    from connectors.warm_postgres import migrate
    from connectors.warm_schedule import RetentionSchedule, every_from_env
    from dataflows.live import apply_config_file, build_live_flow, check_live, options_from_env

    if (args.process_id is None) != (args.addresses is None):
        print("error: -i/--process-id and -a/--addresses go together", file=sys.stderr)
        return 2
    if apply_config_file(args.config) is not None:
        # The file may set the log format and level, and hold passwords to keep out of logs.
        setup_logging(args.log_level, args.log_format,
                      secrets=url_secrets([args.warm, args.hot, args.cold]))
    given = _given(args)
    # Every setting is checked up front, then the services given by URL, before anything is
    # created (recovery folder, run row).
    check_live(given)
    overrides: dict[str, object] = {name: value for name, (_, value) in given.items()}
    overrides["WATERFLOW_KAFKA_TAIL"] = "false" if args.until_end else None
    options = options_from_env(None, **overrides)
    set_run_id(options.settings.run_id)
    if args.addresses and options.recovery_dir is None and not args.run_id:
        # Each process would make up a run id of its own; the recovery folder or --run-id
        # gives them one.
        print("error: several processes need --run-id or a shared --recovery-dir",
              file=sys.stderr)
        return 2
    recovery = None
    if options.recovery_dir is not None:
        if not any(options.recovery_dir.glob("part-*.sqlite3")):
            options.recovery_dir.mkdir(parents=True, exist_ok=True)
            init_db_dir(options.recovery_dir, args.recovery_partitions)
        # Snapshots older than one interval are not needed: nothing backs the folder up.
        recovery = RecoveryConfig(str(options.recovery_dir), timedelta(0))
    port = check.port(pick("--metrics-port", args.metrics_port, "WATERFLOW_METRICS_PORT"))
    server = (
        check.serve_metrics("--metrics-port", port + (args.process_id or 0))
        if port is not None else None
    )
    # Embedded tiers are started once, here, so the run's row can be written before the flow.
    options = replace(options, tiers=resolve_embedded(options.tiers))
    warm_url = options.tiers.warm_url
    assert warm_url is not None  # resolved above
    migrate(warm_url)
    settings = options.settings
    start_run(warm_url, settings.run_id, settings.source_label, settings.started_us,
              settings.ledger_interval_s)
    # Retention and partitions ahead, from process 0 only (WATERFLOW_RETENTION_EVERY_H).
    every = every_from_env()
    housekeeping = (
        RetentionSchedule(warm_url, every).start()
        if every is not None and (args.process_id or 0) == 0 else None
    )
    stop = threading.Event()
    flow = build_live_flow(options, stop)
    log.info("running %s from %s", options.settings.run_id, options.kafka.describe())
    _stop_on_signals(stop, resumable=recovery is not None)
    try:
        cli_main(
            flow,
            workers_per_process=args.workers,
            process_id=args.process_id,
            addresses=args.addresses.split(";") if args.addresses else None,
            epoch_interval=timedelta(seconds=options.snapshot_s),
            recovery_config=recovery,
        )
    finally:
        if housekeeping is not None:
            housekeeping.stop()
        if server is not None:
            server.finished()
            server.stop()
    if stop.is_set():
        # Not finished: its row reads as interrupted once its heartbeats stop.
        log.info("stopped %s: every tier holds what was read", options.settings.run_id)
    elif args.until_end and (args.process_id or 0) == 0:
        # The topic was read to its end and every tier committed: the run is finished.
        finish_run(warm_url, options.settings.run_id)
    return 0


def _given(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """The variables ``waterflow run``'s options override: variable -> (option, value)."""
    return {
        "WATERFLOW_KAFKA_BROKERS": ("--brokers", args.brokers),
        "WATERFLOW_KAFKA_TOPIC": ("--topic", args.topic),
        "WATERFLOW_WARM_URL": ("--warm", args.warm),
        "WATERFLOW_HOT_URL": ("--hot", args.hot),
        "WATERFLOW_COLD_URL": ("--cold", args.cold),
        "WATERFLOW_OUT": ("--out", args.out),
        "WATERFLOW_NETWORK": ("--network", args.network),
        "WATERFLOW_TZ": ("--tz", args.tz),
        check.HOLIDAYS_ENV: ("--holiday", check.holiday_option(args.holiday)),
        "WATERFLOW_LATENESS_S": ("--lateness", args.lateness),
        "WATERFLOW_GATHER_MS": ("--gather-ms", args.gather_ms),
        "WATERFLOW_RECOVERY_DIR": ("--recovery-dir", args.recovery_dir),
        "WATERFLOW_SNAPSHOT_S": ("--snapshot-s", args.snapshot_s),
        "WATERFLOW_RUN_ID": ("--run-id", args.run_id),
        "WATERFLOW_MIN_TIMESTAMP": ("--min-timestamp", args.min_timestamp),
        "WATERFLOW_METRICS_PORT": ("--metrics-port", args.metrics_port),
    }


def _stop_on_signals(stop: threading.Event, resumable: bool) -> None:
    """SIGINT or SIGTERM (Ctrl-C, a service manager) stops the run gracefully.

    The source's partitions end at their next poll and the flow drains as at the end of the
    topic, so the tiers hold everything read; a second signal interrupts at once (Python's
    default handling: Bytewax's own shutdown, nothing lost with recovery on).
    """
    after = ("; restart with the same --recovery-dir to go on" if resumable
             else "; without --recovery-dir a restart reads the topic from the start")

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("%s: stopping after the messages read so far%s (signal again to stop at "
                    "once)", signal.Signals(signum).name, after)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


def add_publish_parser(sub: argparse._SubParsersAction) -> None:
    """``waterflow publish``."""
    p = sub.add_parser(
        "publish",
        help="publish files to Kafka as canonical messages",
        description="Publish readings of files in any supported format to a Kafka topic as "
        "canonical JSON messages (key = node_id), for live demos, load tests and replays "
        "through Kafka. Lines the reader rejects are published as they are, so the live flow "
        "dead-letters them too.",
    )
    p.add_argument("paths", nargs="+", help="files, or folders whose *.csv files are read")
    p.add_argument("--brokers", help="Kafka brokers, host:port[,host:port...] (default: "
                   "WATERFLOW_KAFKA_BROKERS; required one way or the other)")
    p.add_argument("--topic", help="topic (default: WATERFLOW_KAFKA_TOPIC or water.readings)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, metavar="N", help="messages per second (default: "
                      "as fast as the broker takes them)")
    pace.add_argument("--speed", type=float, metavar="X",
                      help="times the event-time pace of the file, 60: an hour a minute "
                      "(default: as fast as the broker takes them)")
    p.add_argument("--partitions", type=count_arg(1), default=4,
                   help="partitions of the topic if it must be created (default 4)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default "
                   "auto: told from each file's name and first lines)")
    p.add_argument("--tz", help="zone of local times in the files (default: WATERFLOW_TZ or "
                   "Europe/Rome)")
    p.set_defaults(func=_publish)


def _publish(args: argparse.Namespace) -> int:
    from connectors.file_source import expand_paths
    from connectors.kafka import ensure_topic
    from connectors.kafka_publish import Pacer, file_messages, publish

    tz = check.zone(pick("--tz", args.tz, "WATERFLOW_TZ"))
    brokers = pick("--brokers", args.brokers, "WATERFLOW_KAFKA_BROKERS")
    config = check.kafka(brokers, args.topic)
    missing = [p for p in args.paths if not Path(p).exists()]
    paths = expand_paths(args.paths)
    if missing or not paths:
        raise ConfigError("paths", f"no such file: {', '.join(missing or args.paths)}")
    check.reach_kafka(brokers, config)
    if ensure_topic(config, config.topic, args.partitions):
        print(f"created topic {config.topic} ({args.partitions} partitions)", file=sys.stderr)
    pacer = Pacer(rate=args.rate, speed=args.speed)
    settings = Settings(tz=tz)
    report = publish(file_messages(paths, settings, args.format), config, pacer)
    rate = report.messages / report.seconds if report.seconds > 0 else 0.0
    print(f"published {report.messages:,} messages ({report.rejected_lines:,} rejected lines as "
          f"they were) to {config.describe()} in {report.seconds:.1f} s ({rate:,.0f}/s)")
    return 0
