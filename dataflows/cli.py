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
from datetime import datetime
from pathlib import Path

from dataflows.settings import Settings, tz_from_env
from dataflows.topology import load_network

FORMATS = ("auto", "canonical", "wide", "hidroconta", "json")


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
    p.add_argument("--cold", help="file:///path for Parquet (default: WATERFLOW_COLD_URL or --out)")
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
    p.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from bytewax.testing import cluster_main, run_main

    from connectors.file_source import FileSource, expand_paths, print_progress
    from connectors.run_report import read_run_report
    from connectors.tier_sink import TierSink
    from connectors.tiers import TierConfig, resolve_embedded
    from connectors.warm_postgres import migrate
    from dataflows.pipeline import build_flow
    from dataflows.summary import format_summary

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
    )
    config = resolve_embedded(
        replace(
            TierConfig.from_env(args.out, warm=args.warm, hot=args.hot, cold=args.cold),
            hot_prefix=args.hot_prefix,
        )
    )
    assert config.warm_url is not None  # resolved above
    migrate(config.warm_url)
    print(f"replaying {len(paths)} file(s) as run {run_id}", file=sys.stderr)
    source = FileSource(paths, settings, args.format, None if args.quiet else print_progress)
    flow = build_flow(source, TierSink(config), settings)
    if args.workers > 1:
        cluster_main(flow, [], 0, worker_count_per_proc=args.workers)
    else:
        run_main(flow)
    elapsed = time.time() - started
    report = read_run_report(config.warm_url, run_id)
    if report is None:
        print(f"error: run {run_id} left no ingest_runs row", file=sys.stderr)
        return 1
    where = [
        f"warm: {_redact(config.warm_url)} (schema water)",
        f"hot:  {_redact(config.hot_url or '')}",
        f"cold: {config.cold_url}",
    ]
    print(format_summary(report, elapsed, where))
    balanced = report.rows_in == report.accepted + report.quarantined + report.duplicates
    return 0 if balanced else 3


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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``waterflow``."""
    parser = argparse.ArgumentParser(prog="waterflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _replay_parser(sub)
    sub.add_parser("simulate", help="write a synthetic network's readings and labels "
                   "(waterflow simulate --help)")
    db = sub.add_parser("db", help="manage the warm tier (PostgreSQL)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    mig = db_sub.add_parser("migrate", help="apply the numbered SQL migrations (idempotent)")
    mig.add_argument("--warm", help="PostgreSQL URL (default: WATERFLOW_WARM_URL or embedded)")
    mig.add_argument("--out", type=Path, default=Path(".waterflow"), help="embedded tiers' folder")
    mig.set_defaults(func=_db)
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
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
