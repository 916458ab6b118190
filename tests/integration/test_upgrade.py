"""Upgrade: a database written by the previous release keeps working with this one.

The previous release is the commit before ``UPGRADE_TO`` was added, checked out with
``git worktree`` and run with this venv's Python (``PYTHONPATH`` = its checkout): its own
``waterflow replay`` of the samples applies its migrations (all but ``UPGRADE_TO`` and later)
and writes its rows. Then this release migrates the database and replays the same samples again.
Needs the git history of the checkout (a full clone; a shallow one fails with a message).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import psycopg
import pytest

from connectors.warm_postgres import migrate, migration_files
from dataflows.cli import main
from dataflows.model import MEASUREMENTS
from dataflows.tables import KEYS
from grafana.queries import (
    SAMPLE_RANGE,
    SAMPLES,
    load_boards,
    reader_role,
    resolve_variables,
    run_target,
    targets,
)
from tests.integration.conftest import REDIS_URL, fresh_database, hot_prefixes
from tests.integration.warm_snapshot import assert_same_rows, snapshot

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
#: The migration the upgrade under test brings; the previous release is the commit before it.
#: When a release adds a migration, move this to it (the test then covers the newest upgrade).
UPGRADE_TO = "0007_water_quality"
#: The column ``UPGRADE_TO`` adds, NULL on the previous release's rows until a replay fills it.
ADDED_COLUMN = ("kpi_daily", "water_quality_compliance")
#: What identifies a row of each relation: the natural keys of the contract (dataflows/tables.py)
#: and of the rest. A relation missing here fails the duplicates test: add its key.
ROW_KEYS: dict[str, tuple[str, ...]] = {
    **KEYS,
    "forecast_selected": ("node_id", "issued_at", "target_ts", "model"),
    "run_status": ("run_id",),
    "schema_migrations": ("version",),
    "forecast_settings": ("only_row",),
    "kpi_district_15m": ("district", "window_start"),
    "kpi_district_hour": ("district", "hour"),
    "kpi_district_day": ("district", "day"),
}
#: Tables the migrations after ``UPGRADE_TO`` add (0009: the district rollups of kpi_15m, filled
#: from the previous release's rows by the migration).
ADDED_TABLES = {"kpi_district_15m", "kpi_district_hour", "kpi_district_day"}


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"git {' '.join(args)} failed: {done.stderr.strip()}", pytrace=False)
    return done.stdout.strip()


def previous_release() -> str:
    """The commit before the one that added ``UPGRADE_TO`` (the oldest, if added twice)."""
    path = f"connectors/migrations/{UPGRADE_TO}.sql"
    added = git("log", "--diff-filter=A", "--format=%H", "--", path).split()
    if not added:
        pytest.fail(f"no commit adds {path} in this checkout's history: the upgrade test "
                    "needs the git history (a full clone, not --depth 1)", pytrace=False)
    return git("rev-parse", "--verify", f"{added[-1]}^")


@pytest.fixture(scope="module")
def previous_checkout(tmp_path_factory) -> Iterator[Path]:
    """The previous release checked out beside the repository; removed afterwards."""
    commit = previous_release()
    path = tmp_path_factory.mktemp("previous") / "waterflow"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        assert not (path / "connectors" / "migrations" / f"{UPGRADE_TO}.sql").exists()
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))


def replay_args(url: str, prefix: str, work: Path) -> list[str]:
    """``waterflow replay`` of the samples; the same options for both releases."""
    return [
        "replay", str(SAMPLES), "--quiet", "--network", str(SAMPLES / "network.toml"),
        "--now", "2026-01-01T00:00:00+00:00", "--warm", url, "--hot", REDIS_URL,
        "--hot-prefix", prefix, "--cold", (work / "cold").as_uri(), "--out", str(work / "out"),
    ]


def run_previous(checkout: Path, args: list[str]) -> None:
    """The previous release's command line, on this venv's Python."""
    # Its own packages first; no coverage hook (pytest-cov before 7 followed subprocesses through
    # COV_CORE_*: the test run measures this release's code only).
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV_CORE")}
    env["PYTHONPATH"] = str(checkout)
    done = subprocess.run([sys.executable, "-m", "dataflows.cli", *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"previous release's replay failed:\n{done.stderr[-3000:]}"


def added_column_queries() -> set[str]:
    """The boards' queries that read the column ``UPGRADE_TO`` adds."""
    return {t.name for t in targets(load_boards())
            if ADDED_COLUMN[1] in t.target.get("rawSql", "")}


def board_rows(url: str) -> dict[str, int]:
    """Rows each SQL query of the Grafana boards returns, run as the reader role Grafana uses."""
    out: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        assert reader_role(conn) == "water_reader"
        conn.execute("SET statement_timeout = '60s'")
        for name, board in load_boards().items():
            variables, multi = resolve_variables(conn, board, SAMPLE_RANGE)
            for t in targets({name: board}):
                if "rawSql" in t.target:
                    _, _, rows, _ = run_target(conn, t, variables, multi, SAMPLE_RANGE)
                    out[t.name] = len(rows)
    return out


def versions(frame: pl.DataFrame) -> list[str]:
    return frame["version"].to_list()


@pytest.fixture(scope="module")
def upgrade(previous_checkout, tmp_path_factory):
    """Previous release's replay; this release's migrate; its replay of the same files."""
    work = tmp_path_factory.mktemp("upgrade")
    with hot_prefixes(REDIS_URL, 1) as (prefix,), fresh_database("waterflow_upgrade") as url:
        args = replay_args(url, prefix, work)
        run_previous(previous_checkout, args)
        old = snapshot(url)
        applied, again = migrate(url), migrate(url)
        migrated = snapshot(url)
        boards = board_rows(url)
        assert main(args) == 0
        yield {"old": old, "applied": applied, "again": again, "migrated": migrated,
               "boards": boards, "new": snapshot(url), "boards_new": board_rows(url)}


def test_the_previous_release_wrote_its_schema_and_rows(upgrade):
    old = upgrade["old"]
    shipped = [v for v, _ in migration_files()]
    assert versions(old["schema_migrations"]) == shipped[: shipped.index(UPGRADE_TO)]
    table, column = ADDED_COLUMN
    assert column not in old[table].columns
    assert old["readings"].height > 20_000
    for name in ("kpi_15m", "kpi_daily", "anomalies", "district_balance", "forecasts",
                 "quarantine", "ingest_runs", "nodes"):
        assert old[name].height > 0, f"the previous release wrote no water.{name}"


def test_migrate_applies_each_new_migration_once(upgrade):
    old, migrated, new = upgrade["old"], upgrade["migrated"], upgrade["new"]
    shipped = [v for v, _ in migration_files()]
    assert upgrade["applied"] == shipped[shipped.index(UPGRADE_TO):]
    assert upgrade["again"] == []
    assert versions(migrated["schema_migrations"]) == shipped
    # The previous release's bookkeeping rows untouched (not applied again), applied_at included.
    assert_same_rows("schema_migrations", old["schema_migrations"],
                     migrated["schema_migrations"].head(old["schema_migrations"].height),
                     exact=True)
    # The replay's own migrate (every command runs it) found nothing to do.
    assert_same_rows("schema_migrations", migrated["schema_migrations"],
                     new["schema_migrations"], exact=True)


def test_old_rows_stay_and_the_dashboards_read_them(upgrade):
    old, migrated = upgrade["old"], upgrade["migrated"]
    assert set(migrated) == set(old) | ADDED_TABLES  # 0007 adds a column; 0009 tables
    for name in ADDED_TABLES:
        assert migrated[name].height > 0, f"water.{name}: nothing rolled up from the old rows"
    for name, before in old.items():
        if name == "schema_migrations":
            continue
        after = migrated[name]
        added = [c for c in after.columns if c not in before.columns]
        assert [(name, c) for c in added] in ([], [ADDED_COLUMN]), f"water.{name}: {added}"
        for c in added:
            assert after[c].null_count() == after.height, f"water.{name}.{c} set on old rows"
        assert_same_rows(name, before, after.drop(added), exact=True)
    # Every board query runs on the old rows and shows them, but those of the new column: it
    # is NULL on every old row, so they show nothing until this release writes it (below).
    boards = upgrade["boards"]
    assert len(boards) > 50
    new_column = added_column_queries()
    assert len(new_column) == 1 and new_column <= set(boards)
    empty = {name for name, n in boards.items() if n == 0}
    assert empty == new_column, "board queries without rows on the previous release's data"


def test_the_new_replay_over_old_rows_writes_no_duplicates(upgrade):
    migrated, new = upgrade["migrated"], upgrade["new"]
    for name, before in migrated.items():
        after = new[name]
        if name in ("ingest_runs", "run_status"):
            # Every run is recorded: the previous release's run and this one.
            assert after.height == before.height + 1
            assert set(before["run_id"]) < set(after["run_id"])
            assert set(after["status"]) == {"finished"}
            continue
        key = list(ROW_KEYS[name])
        assert after.height == before.height, f"water.{name}: {before.height} -> {after.height}"
        assert after.select(key).equals(before.select(key)), f"water.{name}: other keys"
    # The same readings, rewritten in place by the new run: the values read from the files
    # are equal; run_id is the new run's; quality, flags and anomaly_score are this release's
    # (it scores water-quality probes the previous one did not), so they may differ.
    old_readings, readings = migrated["readings"], new["readings"]
    assert readings["run_id"].n_unique() == 1
    assert readings["run_id"][0] not in set(old_readings["run_id"])
    read = ["node_id", "ts", *MEASUREMENTS, "source"]
    assert_same_rows("readings", old_readings.select(read), readings.select(read), exact=True)
    # This release fills the column it added, on the rows the previous one wrote, and the
    # board query that reads it shows them.
    table, column = ADDED_COLUMN
    filled = new[table].filter(pl.col(column).is_not_null())
    assert filled.height > 0 and filled[column].is_between(0, 1).all()
    empty = {name for name, n in upgrade["boards_new"].items() if n == 0}
    assert empty == set(), f"board queries without rows after the upgrade: {sorted(empty)}"

