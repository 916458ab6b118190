"""The ``waterflow`` command: replay CSV exports, simulate a network, manage the warm tier."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from dataflows.cli_forecast import add_forecast_parser
from dataflows.cli_live import FORMATS, add_publish_parser, add_run_parser
from dataflows.settings import Settings, heartbeat_from_env, tz_from_env
from dataflows.topology import load_network

if TYPE_CHECKING:
    from connectors.metrics import MetricsServer
    from connectors.tiers import TierConfig


def _parse_now(text: str) -> int:
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError(f"--now needs a UTC offset, got {text!r}")
    return int(ts.timestamp() * 1_000_000)


def _redact(url: str) -> str:
    """A URL fit for a terminal: any password replaced by ***."""
    return re.sub(r"(//[^:/@]+:)[^@]+@", r"\1***@", url)


def _replay_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="run the pipeline over CSV exports",
        description="Replay CSV exports (files, or folders of *.csv) through the pipeline. "
        "With no tier URL, results go to embedded services under --out.",
    )
    p.add_argument("paths", nargs="+", help="CSV files, or folders whose *.csv files are read")
    p.add_argument("--out", type=Path, default=Path(".waterflow"), help="embedded tiers' folder")
    p.add_argument("--warm", help="PostgreSQL URL (default: WATERFLOW_WARM_URL or embedded)")
    p.add_argument("--hot", help="Redis URL (default: WATERFLOW_HOT_URL or embedded)")
    p.add_argument("--cold", help="file:///path for Parquet or bigquery://PROJECT/DATASET "
                   "(default: WATERFLOW_COLD_URL or --out)")
    p.add_argument("--hot-prefix", default=os.environ.get("WATERFLOW_HOT_PREFIX", "water:"),
                   help="key prefix in the hot tier (default water:)")
    p.add_argument("--network", type=Path, default=os.environ.get("WATERFLOW_NETWORK"),
                   help="network topology TOML (default: WATERFLOW_NETWORK, or none)")
    p.add_argument("--tz", default=tz_from_env(), help="zone of local times (default Europe/Rome)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    p.add_argument("--workers", type=int, default=1, help="Bytewax worker threads")
    p.add_argument("--chunk-rows", type=int, default=100_000, help="lines per batch read")
    p.add_argument("--lateness", type=int, default=6 * 3600,
                   help="seconds a KPI window stays open for late readings")
    p.add_argument("--now", type=_parse_now,
                   help="ISO time taken as 'now' for the future-timestamp check")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--keep-serving", action="store_true",
                   help="leave the embedded PostgreSQL and Redis running after the replay, "
                   "for inspection (by default they stop; their data stays under --out)")
    p.add_argument("--metrics-port", type=int, default=_env_port("WATERFLOW_METRICS_PORT"),
                   help="serve Prometheus /metrics and /healthz on 127.0.0.1:PORT during the "
                   "replay (default: WATERFLOW_METRICS_PORT, or no server)")
    p.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                   help="keep serving metrics this long after the replay ends, so Prometheus "
                   "scrapes the final values (default 0)")
    p.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from connectors.file_source import expand_paths
    from connectors.tiers import TierConfig, resolve_embedded

    paths, unreadable = _check_formats(expand_paths(args.paths), args.format)
    if unreadable:
        # Refused before anything is written: a run never stores half of a set of files.
        print("error: cannot tell the format of:\n  " + "\n  ".join(unreadable), file=sys.stderr)
        return 2
    if not paths:
        print(f"error: nothing to replay in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    started = time.time()
    run_id = f"{datetime.now().astimezone().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        run_id=run_id,
        tz=args.tz,
        network=load_network(args.network),
        chunk_rows=args.chunk_rows,
        allowed_lateness_s=args.lateness,
        now_us=args.now,
        started_us=int(started * 1_000_000),
        source_label=", ".join(p.name for p in paths)[:1000],
        ledger_interval_s=heartbeat_from_env(),
    )
    wanted = replace(
        TierConfig.from_env(args.out, warm=args.warm, hot=args.hot, cold=args.cold),
        hot_prefix=args.hot_prefix,
    )
    if wanted.warm_url is None and args.keep_serving:
        from connectors.embedded import start_postgres

        start_postgres(args.out, keep_running=True)  # resolve_embedded reuses this handle
    config = resolve_embedded(wanted)
    try:
        return _run_replay(args, paths, settings, config, stops=wanted.embedded)
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
    stops: bool,
) -> int:
    from bytewax.testing import cluster_main, run_main

    from connectors.file_source import FileSource, print_progress
    from connectors.run_report import finish_run, read_run_report, start_run
    from connectors.tier_sink import TierSink
    from connectors.warm_postgres import migrate
    from dataflows.pipeline import build_flow
    from dataflows.summary import format_summary

    assert config.warm_url is not None  # resolved by the caller
    run_id = settings.run_id
    started = settings.started_us / 1_000_000
    migrate(config.warm_url)
    start_run(config.warm_url, run_id, settings.source_label, settings.started_us,
              settings.ledger_interval_s)
    print(f"replaying {len(paths)} file(s) as run {run_id}", file=sys.stderr)
    source = FileSource(paths, settings, args.format, None if args.quiet else print_progress)
    flow = build_flow(source, TierSink(config), settings)
    metrics_server = _serve_metrics(args.metrics_port)
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
    where = [
        f"warm: {_redact(config.warm_url)} (schema water)",
        f"hot:  {_redact(config.hot_url or '')}",
        f"cold: {config.cold_url}",
    ]
    if stops and not args.keep_serving:
        where.append(
            f"(the embedded servers stop now; their data stays under {args.out}: "
            "replay with --keep-serving to query them)"
        )
    print(format_summary(report, elapsed, where))
    _linger(metrics_server, args.metrics_linger)
    balanced = report.rows_in == report.accepted + report.quarantined + report.duplicates
    return 0 if balanced else 3


def _env_port(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise SystemExit(f"error: {name} must be a port number, got {value!r}")
    return int(value)


def _serve_metrics(port: int | None) -> MetricsServer | None:
    if port is None:
        return None
    from connectors.metrics import serve

    try:
        server = serve(port)
    except OSError as exc:
        raise ValueError(str(exc)) from exc
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


def _db(args: argparse.Namespace) -> int:
    from connectors.tiers import TierConfig
    from connectors.warm_postgres import migrate

    warm_url = TierConfig.from_env(args.out, warm=args.warm).warm_url
    if warm_url is None:
        from connectors.embedded import start_postgres

        warm_url = start_postgres(args.out.resolve())
    applied = migrate(warm_url)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none, up to date'}")
    return 0


def _db_retention(args: argparse.Namespace) -> int:
    from connectors.tiers import TierConfig
    from connectors.warm_retention import RetentionPolicy, apply_retention

    if args.now is not None and args.now.tzinfo is None:
        raise ValueError(f"--now needs a UTC offset, got {args.now.isoformat()!r}")
    policy = RetentionPolicy(
        readings_weeks=args.readings_weeks,
        aggregates_months=args.aggregates_months,
        quarantine_months=args.quarantine_months,
        ahead_months=args.ahead_months,
    )
    warm_url = TierConfig.from_env(args.out, warm=args.warm).warm_url
    if warm_url is None:
        from connectors.embedded import start_postgres

        warm_url = start_postgres(args.out.resolve())
    try:
        actions = apply_retention(warm_url, policy, now=args.now, dry_run=args.dry_run)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # psycopg errors: name the database, not a traceback
        print(f"error: retention on {_redact(warm_url)} failed: {exc}", file=sys.stderr)
        return 1
    for action in actions:
        print(action.describe(args.dry_run))
    changed = [a for a in actions if a.kind != "delete" or a.rows]
    if not changed:
        print("nothing to do")
    return 0


def _parse_instant(text: str) -> int:
    """µs UTC of an ISO time with an offset, or of a date (its UTC midnight)."""
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from exc
    if ts.tzinfo is None:
        if len(text) != 10:  # a bare date is unambiguous; a bare local time is not
            raise argparse.ArgumentTypeError(f"needs a UTC offset (e.g. Z), got {text!r}")
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp() * 1_000_000)


def _backfill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backfill",
        help="rebuild the warm tier from the cold archive",
        description="Rebuild the warm tier (readings as archived; KPIs, anomalies and district "
        "balance recomputed by the pipeline's code) from the Parquet archive or BigQuery.",
    )
    p.add_argument("--from", dest="cold", required=True,
                   help="cold tier: file:///path (Parquet archive) or bigquery://PROJECT/DATASET")
    p.add_argument("--since", required=True, type=_parse_instant,
                   help="first instant, ISO with offset (or a date: its UTC midnight)")
    p.add_argument("--until", required=True, type=_parse_instant,
                   help="end instant, excluded, ISO with offset (or a date)")
    p.add_argument("--warm", help="PostgreSQL URL (default: WATERFLOW_WARM_URL or embedded)")
    p.add_argument("--out", type=Path, default=Path(".waterflow"), help="embedded tiers' folder")
    p.add_argument("--network", type=Path, default=os.environ.get("WATERFLOW_NETWORK"),
                   help="network topology TOML, as given to the replay (pressure band, "
                   "districts)")
    p.add_argument("--tz", default=tz_from_env(), help="zone of local days (default Europe/Rome)")
    p.add_argument("--lateness", type=int, default=6 * 3600,
                   help="seconds a KPI window stays open, as given to the replay")
    p.set_defaults(func=_backfill)


def _backfill(args: argparse.Namespace) -> int:
    from connectors.tiers import TierConfig, cold_reader
    from connectors.warm_postgres import WarmPostgresWriter, migrate
    from dataflows.backfill import backfill

    if args.until <= args.since:
        print("error: --until must be after --since", file=sys.stderr)
        return 2
    warm_url = TierConfig.from_env(args.out, warm=args.warm).warm_url
    if warm_url is None:
        from connectors.embedded import start_postgres

        warm_url = start_postgres(args.out.resolve())
    TierConfig(warm_url, None, args.cold, args.out)  # validates the cold URL's scheme
    settings = Settings(
        run_id="backfill",
        tz=args.tz,
        network=load_network(args.network),
        allowed_lateness_s=args.lateness,
    )
    migrate(warm_url)
    started = time.time()
    writer = WarmPostgresWriter(warm_url)
    writer.connect()
    try:
        report = backfill(cold_reader(args.cold, args.since, args.until), writer.write, settings)
    finally:
        writer.close()
    written = ", ".join(f"{t} {n}" for t, n in sorted(report.rows.items())) or "nothing"
    print(f"backfilled {report.days} day(s) from {args.cold} into {_redact(warm_url)} "
          f"in {time.time() - started:.1f} s: {written} (rows upserted)")
    if report.anomalies_skipped:
        print("warning: anomalies not rebuilt for nodes whose recomputed scores differ from the "
              f"archived ones: {', '.join(report.anomalies_skipped)}", file=sys.stderr)
    print("note: quarantine and ingest_runs are not in the cold tier and were not rebuilt",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``waterflow``."""
    parser = argparse.ArgumentParser(
        prog="waterflow",
        description="Replay CSV exports or run live from Kafka, publish files to Kafka, "
        "simulate a network, manage the storage tiers.",
    )
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
    mig.add_argument("--warm", help="PostgreSQL URL (default: WATERFLOW_WARM_URL or embedded)")
    mig.add_argument("--out", type=Path, default=Path(".waterflow"), help="embedded tiers' folder")
    mig.set_defaults(func=_db)
    ret = db_sub.add_parser(
        "retention",
        help="drop partitions past retention, create partitions ahead",
        description="Drop whole monthly partitions whose every row is older than the table's "
        "retention (a partition holding any newer row is kept), delete old quarantine rows, "
        "create the partitions of the coming months. Run it as the schema's owner.",
    )
    ret.add_argument("--warm", help="PostgreSQL URL (default: WATERFLOW_WARM_URL or embedded)")
    ret.add_argument("--out", type=Path, default=Path(".waterflow"), help="embedded tiers' folder")
    ret.add_argument("--readings-weeks", type=int, default=8,
                     help="weeks of raw readings to keep (default 8)")
    ret.add_argument("--aggregates-months", type=int, default=13,
                     help="months of kpi_15m and kpi_daily to keep (default 13)")
    ret.add_argument("--quarantine-months", type=int, default=13,
                     help="months of quarantined records to keep (default 13)")
    ret.add_argument("--ahead-months", type=int, default=2,
                     help="months after the current one to create partitions for (default 2)")
    ret.add_argument("--now", type=datetime.fromisoformat,
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

        return simulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
