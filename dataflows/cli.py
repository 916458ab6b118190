"""The ``waterflow`` command: replay CSV exports, simulate a network, manage the warm tier."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from dataflows import config_check as check
from dataflows.cli_forecast import add_forecast_parser
from dataflows.cli_live import FORMATS, add_publish_parser, add_run_parser
from dataflows.config_check import (
    ConfigError,
    Setting,
    add_holiday_option,
    count_arg,
    instant_arg,
    pick,
)
from dataflows.logs import set_run_id, setup_logging
from dataflows.settings import (
    MIN_TIMESTAMP,
    Settings,
    heartbeat_from_env,
    hide_secrets,
    redact_url,
    replay_chunk_rows,
    url_secrets,
    with_input_limits,
)

if TYPE_CHECKING:
    from connectors.metrics import MetricsServer
    from connectors.tiers import TierConfig


def _aware_time(text: str) -> datetime:
    """An argparse type: an ISO time with a UTC offset, as an aware datetime."""
    return datetime.fromtimestamp(instant_arg(text) / 1_000_000, UTC)


def _add_tier_options(p: argparse.ArgumentParser, hot: bool = True, cold: bool = True) -> None:
    p.add_argument("--warm", help="warm tier, PostgreSQL: postgresql://USER[:PASSWORD]@HOST:PORT/"
                   "DATABASE (default: WATERFLOW_WARM_URL, else an embedded PostgreSQL under "
                   "--out)")
    if hot:
        p.add_argument("--hot", help="hot tier, Redis: redis://[:PASSWORD@]HOST:PORT/DB, "
                       "rediss:// for TLS, or unix:///SOCKET (default: WATERFLOW_HOT_URL, else "
                       "an embedded Redis under --out)")
    if cold:
        p.add_argument("--cold", help="cold tier: file:///PATH or a folder for a Parquet "
                       "archive, or bigquery://PROJECT/DATASET (default: WATERFLOW_COLD_URL, "
                       "else OUT/cold)")
    p.add_argument("--out", type=Path, default=Path(".waterflow"),
                   help="folder of the embedded services used for the tiers given no URL "
                   "(default .waterflow)")


def _replay_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="run the pipeline over CSV exports",
        description="Replay CSV exports (files, or folders of *.csv) through the pipeline. "
        "With no tier URL, results go to embedded services under --out.",
    )
    p.add_argument("paths", nargs="+", help="CSV files, or folders whose *.csv files are read")
    _add_tier_options(p)
    p.add_argument("--hot-prefix", help="key prefix in the hot tier (default: "
                   "WATERFLOW_HOT_PREFIX or water:)")
    p.add_argument("--network", type=Path, help="network topology TOML: districts, roles, "
                   "ranges (default: WATERFLOW_NETWORK, or none: every node on its own)")
    p.add_argument("--tz", help="zone of local times in the files (default: WATERFLOW_TZ or "
                   "Europe/Rome)")
    add_holiday_option(p)
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default "
                   "auto: told from each file's name and first lines)")
    p.add_argument("--workers", type=count_arg(1), default=1, help="Bytewax worker threads; "
                   "the results do not depend on it (default 1)")
    p.add_argument("--chunk-rows", type=count_arg(1), help="lines read into one batch: "
                   "memory against per-batch cost (default: 200 per node of the --network "
                   "topology, from 100000 to 1000000)")
    p.add_argument("--lateness", type=count_arg(0), default=6 * 3600,
                   help="seconds a KPI window stays open for readings that arrive late "
                   "(default 21600, 6 h)")
    p.add_argument("--now", type=instant_arg,
                   help="ISO time with offset taken as 'now' by the future-timestamp check, "
                   "for repeatable replays (default: the clock)")
    p.add_argument("--min-timestamp", help="readings dated before this ISO date or time are "
                   "quarantined as too_old_timestamp (default: WATERFLOW_MIN_TIMESTAMP or "
                   f"{MIN_TIMESTAMP})")
    p.add_argument("--quiet", action="store_true", help="no progress lines (default: progress "
                   "on stderr)")
    p.add_argument("--keep-serving", action="store_true",
                   help="leave the embedded PostgreSQL running after the replay, for "
                   "inspection (default: the embedded servers stop; their data stays under "
                   "--out)")
    p.add_argument("--metrics-port", help="serve Prometheus /metrics and /healthz on "
                   "127.0.0.1:PORT during the replay (default: WATERFLOW_METRICS_PORT, or no "
                   "server)")
    p.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                   help="keep serving metrics this long after the replay ends, so Prometheus "
                   "scrapes the final values (default 0)")
    p.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from connectors.file_source import expand_paths
    from connectors.tiers import resolve_embedded

    # Every setting is checked before anything starts: one line naming the first bad one.
    warm = pick("--warm", args.warm, "WATERFLOW_WARM_URL")
    hot = pick("--hot", args.hot, "WATERFLOW_HOT_URL")
    cold = pick("--cold", args.cold, "WATERFLOW_COLD_URL")
    wanted = check.tiers(
        args.out, warm, hot, cold,
        hot_prefix=pick("--hot-prefix", args.hot_prefix, "WATERFLOW_HOT_PREFIX").value
        or "water:",
    )
    tz = check.zone(pick("--tz", args.tz, "WATERFLOW_TZ"))
    network = check.network(pick("--network", args.network, "WATERFLOW_NETWORK"))
    holidays = check.holidays_given(args.holiday)
    metrics_port = check.port(pick("--metrics-port", args.metrics_port, "WATERFLOW_METRICS_PORT"))
    min_ts_us = check.instant(Setting("--min-timestamp", args.min_timestamp))
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise ConfigError("paths", f"no such file or folder: {', '.join(missing)}")
    paths, unreadable = _check_formats(expand_paths(args.paths), args.format)
    if unreadable:
        # Refused before anything is written: a run never stores half of a set of files.
        print("error: cannot tell the format of:\n  " + "\n  ".join(unreadable), file=sys.stderr)
        return 2
    if not paths:
        print(f"error: nothing to replay in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    check.reach_tiers(wanted, warm, hot, cold)
    started = time.time()
    run_id = f"{datetime.now().astimezone().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    set_run_id(run_id)
    settings = Settings(
        run_id=run_id,
        tz=tz,
        network=network,
        holidays=holidays,
        chunk_rows=args.chunk_rows or replay_chunk_rows(len(network.nodes)),
        allowed_lateness_s=args.lateness,
        now_us=args.now,
        started_us=int(started * 1_000_000),
        source_label=", ".join(p.name for p in paths)[:1000],
        ledger_interval_s=heartbeat_from_env(),
    )
    try:
        settings = with_input_limits(settings)
    except ValueError as exc:
        setting, _, problem = str(exc).partition(": ")
        raise ConfigError(setting, problem) from None
    if min_ts_us is not None:
        settings = replace(settings, min_ts_us=min_ts_us)
    if wanted.warm_url is None and args.keep_serving:
        from connectors.embedded import start_postgres

        start_postgres(args.out, keep_running=True)  # resolve_embedded reuses this handle
    config = resolve_embedded(wanted)
    try:
        return _run_replay(args, paths, settings, config, wanted, metrics_port)
    finally:
        if wanted.embedded and not args.keep_serving:
            # The data stays under --out; a later replay (or --keep-serving) starts them again.
            from connectors.embedded import stop_embedded

            stop_embedded(args.out)


def _run_replay(
    args: argparse.Namespace,
    paths: list[Path],
    settings: Settings,
    config: TierConfig,
    wanted: TierConfig,
    metrics_port: int | None,
) -> int:
    from bytewax.testing import cluster_main, run_main

    from connectors.file_source import FileSource, print_progress
    from connectors.run_report import finish_run, read_run_report, start_run
    from connectors.tier_sink import TierSink
    from connectors.warm_postgres import migrate
    from dataflows.pipeline import build_flow
    from dataflows.summary import format_summary, tier_lines

    assert config.warm_url is not None  # resolved by the caller
    run_id = settings.run_id
    started = settings.started_us / 1_000_000
    migrate(config.warm_url)
    start_run(config.warm_url, run_id, settings.source_label, settings.started_us,
              settings.ledger_interval_s)
    print(f"replaying {len(paths)} file(s) as run {run_id}", file=sys.stderr)
    source = FileSource(paths, settings, args.format, None if args.quiet else print_progress)
    # A replay keeps no recovery snapshots, so it computes the next batch while the tiers write
    # this one (connectors.tier_sink); the flow returns only once every write is done.
    flow = build_flow(source, TierSink(config, overlap=True), settings, snapshots=False)
    metrics_server = _serve_metrics(metrics_port)
    try:
        if args.workers > 1:
            cluster_main(flow, [], 0, worker_count_per_proc=args.workers)
        else:
            run_main(flow)
    finally:
        if metrics_server is not None:
            metrics_server.finished()
    elapsed = time.time() - started
    # The flow has returned: every tier committed every write, so now the run is finished.
    finish_run(config.warm_url, run_id)
    report = read_run_report(config.warm_url, run_id)
    if report is None:
        print(f"error: run {run_id} left no ingest_runs row", file=sys.stderr)
        return 1
    where = tier_lines(config, wanted, args.out, keep_serving=args.keep_serving)
    print(format_summary(report, elapsed, where))
    _linger(metrics_server, args.metrics_linger)
    balanced = report.rows_in == report.accepted + report.quarantined + report.duplicates
    return 0 if balanced else 3


def _serve_metrics(port: int | None) -> MetricsServer | None:
    if port is None:
        return None
    server = check.serve_metrics("--metrics-port", port)
    print(f"metrics on http://{server.addr}:{server.port}/metrics", file=sys.stderr)
    return server


def _linger(server: MetricsServer | None, seconds: float) -> None:
    """Keep the metrics served a while (a replay driving alerts), then release the port."""
    if server is None:
        return
    if seconds > 0:
        print(f"serving metrics for {seconds:g} s more", file=sys.stderr, flush=True)
        time.sleep(seconds)
    server.stop()


def _check_formats(paths: list[Path], fmt: str) -> tuple[list[Path], list[str]]:
    """The files to read, and those whose format cannot be told (with the reason).

    An empty file holds no reading: it is skipped with a note rather than failing the run.
    """
    from connectors.formats import detect_format

    readable, bad = [], []
    for path in paths:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
        if not head.strip():
            print(f"note: {path} is empty, skipped", file=sys.stderr)
            continue
        readable.append(path)
        if fmt == "auto":
            try:
                detect_format(path, head)
            except ValueError as exc:
                bad.append(str(exc))
    return readable, bad


def _warm_url(args: argparse.Namespace) -> str:
    """The checked and reachable warm URL of ``--warm``/WATERFLOW_WARM_URL, else the embedded."""
    warm = pick("--warm", args.warm, "WATERFLOW_WARM_URL")
    warm_url = check.tier_url("warm", warm)
    if warm_url is None:
        from connectors.embedded import start_postgres

        return start_postgres(args.out.resolve())
    check.reach_warm(warm, warm_url)
    return warm_url


def _db(args: argparse.Namespace) -> int:
    from connectors.warm_postgres import migrate

    applied = migrate(_warm_url(args))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none, up to date'}")
    return 0


def _db_retention(args: argparse.Namespace) -> int:
    from connectors.warm_retention import RetentionPolicy, apply_retention

    policy = RetentionPolicy(
        readings_weeks=args.readings_weeks,
        aggregates_months=args.aggregates_months,
        quarantine_months=args.quarantine_months,
        ahead_months=args.ahead_months,
    )
    warm_url = _warm_url(args)
    try:
        actions = apply_retention(warm_url, policy, now=args.now, dry_run=args.dry_run)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # psycopg errors: name the database, not a traceback
        print(f"error: retention on {redact_url(warm_url)} failed: {exc}", file=sys.stderr)
        return 1
    for action in actions:
        print(action.describe(args.dry_run))
    changed = [a for a in actions if a.kind != "delete" or a.rows]
    if not changed:
        print("nothing to do")
    return 0


def _backfill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backfill",
        help="rebuild the warm tier from the cold archive",
        description="Rebuild the warm tier (readings as archived; KPIs, anomalies and district "
        "balance recomputed by the pipeline's code) from the Parquet archive or BigQuery.",
    )
    p.add_argument("--from", dest="cold", required=True,
                   help="cold tier to read: file:///PATH or a folder (Parquet archive), or "
                   "bigquery://PROJECT/DATASET (required)")
    p.add_argument("--since", type=instant_arg,
                   help="first instant, ISO with offset, or a date (its UTC midnight) "
                   "(default: the archive's first reading)")
    p.add_argument("--until", type=instant_arg,
                   help="end instant, excluded, ISO with offset or a date (default: after the "
                   "archive's last reading)")
    _add_tier_options(p, hot=False, cold=False)
    p.add_argument("--network", type=Path, help="network topology TOML, as given to the replay: "
                   "ranges, districts (default: WATERFLOW_NETWORK, or none)")
    p.add_argument("--tz", help="zone of local days, as given to the replay (default: "
                   "WATERFLOW_TZ or Europe/Rome)")
    p.add_argument("--lateness", type=count_arg(0), default=6 * 3600,
                   help="seconds a KPI window stays open, as given to the replay (default "
                   "21600, 6 h)")
    p.set_defaults(func=_backfill)


def _backfill(args: argparse.Namespace) -> int:
    from connectors.tiers import cold_reader
    from connectors.warm_postgres import WarmPostgresWriter, migrate
    from dataflows.backfill import ARCHIVE_END_US, ARCHIVE_START_US, backfill

    since = ARCHIVE_START_US if args.since is None else args.since
    until = ARCHIVE_END_US if args.until is None else args.until
    if until <= since:
        raise ConfigError("--until", "must be after --since")
    source = Setting("--from", args.cold)
    check.tier_url("cold", source)
    check.archive_exists(source)
    settings = Settings(
        run_id="backfill",
        tz=check.zone(pick("--tz", args.tz, "WATERFLOW_TZ")),
        network=check.network(pick("--network", args.network, "WATERFLOW_NETWORK")),
        allowed_lateness_s=args.lateness,
    )
    warm_url = _warm_url(args)
    migrate(warm_url)
    started = time.time()
    writer = WarmPostgresWriter(warm_url)
    writer.connect()
    try:
        report = backfill(cold_reader(args.cold, since, until), writer.write, settings)
    finally:
        writer.close()
    written = ", ".join(f"{t} {n}" for t, n in sorted(report.rows.items())) or "nothing"
    print(f"backfilled {report.days} day(s) from {redact_url(args.cold)} into "
          f"{redact_url(warm_url)} in {time.time() - started:.1f} s: {written} (rows upserted)")
    if report.anomalies_skipped:
        print("warning: anomalies not rebuilt for nodes whose recomputed scores differ from the "
              f"archived ones: {', '.join(report.anomalies_skipped)}", file=sys.stderr)
    print("note: quarantine and ingest_runs are not in the cold tier and were not rebuilt",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``waterflow``."""
    parser = check.OneLineParser(
        prog="waterflow",
        description="Replay CSV exports or run live from Kafka, publish files to Kafka, "
        "simulate a network, manage the storage tiers.",
    )
    parser.add_argument("--log-format", help="logs on stderr: json (one object a line), text, "
                        "or auto: text on a terminal, else json (default: WATERFLOW_LOG_FORMAT "
                        "or auto)")
    parser.add_argument("--log-level", help="least severe log records shown: DEBUG, INFO, "
                        "WARNING, ERROR (default: WATERFLOW_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    _replay_parser(sub)
    add_run_parser(sub)
    add_publish_parser(sub)
    _backfill_parser(sub)
    add_forecast_parser(sub)
    sub.add_parser("simulate", help="write a synthetic network's readings and labels "
                   "(waterflow simulate --help)")
    db = sub.add_parser("db", help="manage the warm tier (PostgreSQL)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    mig = db_sub.add_parser("migrate", help="apply the numbered SQL migrations (idempotent)")
    _add_tier_options(mig, hot=False, cold=False)
    mig.set_defaults(func=_db)
    ret = db_sub.add_parser(
        "retention",
        help="drop partitions past retention, create partitions ahead",
        description="Drop whole monthly partitions whose every row is older than the table's "
        "retention (a partition holding any newer row is kept), delete old quarantine rows, "
        "create the partitions of the coming months. Run it as the schema's owner.",
    )
    _add_tier_options(ret, hot=False, cold=False)
    ret.add_argument("--readings-weeks", type=int, default=8,
                     help="weeks of raw readings to keep (default 8)")
    ret.add_argument("--aggregates-months", type=int, default=13,
                     help="months of kpi_15m and kpi_daily to keep (default 13)")
    ret.add_argument("--quarantine-months", type=int, default=13,
                     help="months of quarantined records to keep (default 13)")
    ret.add_argument("--ahead-months", type=int, default=2,
                     help="months after the current one to create partitions for (default 2)")
    ret.add_argument("--now", type=_aware_time,
                     help="ISO time with offset taken as 'now' (default: the clock)")
    ret.add_argument("--dry-run", action="store_true",
                     help="print what would be done, change nothing")
    ret.set_defaults(func=_db_retention)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    # platformdirs (under pgserver) warns when XDG_RUNTIME_DIR is unset, as in CI: noise here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        # The simulator owns its options; hand them over untouched.
        from dataflows.simulate import main as simulate_main

        try:
            setup_logging()
        except ConfigError as exc:
            _error(str(exc), argparse.Namespace())
            return exc.exit_code
        return simulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        setup_logging(args.log_level, args.log_format, secrets=url_secrets(
            getattr(args, name, None) for name in ("warm", "hot", "cold")))
        return int(args.func(args))
    except ConfigError as exc:
        _error(str(exc), args)
        return exc.exit_code
    except (FileNotFoundError, ValueError) as exc:
        _error(str(exc), args)
        return check.USAGE
    except RuntimeError as exc:
        _error(str(exc), args)
        return check.UNREACHABLE


def _error(message: str, args: argparse.Namespace) -> None:
    """One line on stderr, with no secret of the command line or the environment in it."""
    secrets = check.secrets_in_env() | url_secrets(
        getattr(args, name, None) for name in ("warm", "hot", "cold")
    )
    print(f"error: {hide_secrets(' '.join(message.split()), secrets)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
