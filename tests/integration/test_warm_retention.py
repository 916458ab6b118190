"""`waterflow db retention` against the real PostgreSQL, in a database of the test's own."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import psycopg
import pytest

from connectors.warm_postgres import WarmPostgresWriter, migrate
from connectors.warm_retention import RetentionPolicy, add_months, apply_retention, parse_bound
from dataflows.cli import main
from dataflows.model import US_PER_S
from dataflows.tables import frame
from tests.integration.conftest import fresh_database
from tests.integration.warm_db import partitions, rows_per_partition

pytestmark = pytest.mark.integration

UTC = dt.UTC
NOW = "2021-06-15T12:00:00+00:00"  # readings cutoff (8 weeks): 2021-04-20 12:00 UTC


def us(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=UTC).timestamp() * US_PER_S)


@pytest.fixture
def db() -> Iterator[str]:
    """Readings Jan-Jun 2021, 15-min KPIs for Apr 2020 and May 2021, quarantine 2020 and 2021,
    a forecast issue of Jan 2020 and one of Jun 2021 (two hours, two models each)."""
    with fresh_database("waterflow_ret") as url:
        migrate(url)
        w = WarmPostgresWriter(url)
        try:
            ts = [us(2021, m, d, 6) for m in range(1, 7) for d in (1, 10)]
            # the April partition straddles the cutoff: 2 rows before it, 1 after
            ts += [us(2021, 4, 20, 13)]
            w.write(frame("readings", {"node_id": ["r"] * len(ts), "ts": ts}))
            w.write(
                frame(
                    "kpi_15m",
                    {"node_id": ["k", "k"], "window_start": [us(2020, 4, 3), us(2021, 5, 1)]},
                )
            )
            w.write(
                frame(
                    "quarantine",
                    {
                        "id": ["old", "new", "unknown"],
                        "reason": ["parse"] * 3,
                        "received_at": [us(2020, 1, 1), us(2021, 6, 1), None],
                    },
                )
            )
            issues, hour = [us(2020, 1, 1), us(2021, 6, 1)], 3600 * US_PER_S
            w.write(
                frame(
                    "forecasts",
                    {
                        "node_id": ["f"] * 8,
                        "issued_at": [i for i in issues for _ in range(4)],
                        "target_ts": [i + h * hour for i in issues for h in (0, 0, 1, 1)],
                        "model": ["a", "b"] * 4,
                        "yhat": [1.0] * 8,
                    },
                )
            )
        finally:
            w.close()
        yield url


def test_dry_run_prints_the_plan_and_changes_nothing(db, capsys):
    with psycopg.connect(db, autocommit=True) as conn:
        before = {t: rows_per_partition(conn, t) for t in ("readings", "kpi_15m", "kpi_daily")}
    assert main(["db", "retention", "--warm", db, "--now", NOW, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "water.readings: would drop partition readings_p202101"
        " [2021-01-01 00:00:00+00, 2021-02-01 00:00:00+00), 2 row(s)",
        "water.readings: would drop partition readings_p202102"
        " [2021-02-01 00:00:00+00, 2021-03-01 00:00:00+00), 2 row(s)",
        "water.readings: would drop partition readings_p202103"
        " [2021-03-01 00:00:00+00, 2021-04-01 00:00:00+00), 2 row(s)",
        "water.kpi_15m: would drop partition kpi_15m_p202004"
        " [2020-04-01 00:00:00+00, 2020-05-01 00:00:00+00), 1 row(s)",
        "water.quarantine: would delete 1 row(s) received before 2020-05-15 12:00:00+00",
        "water.forecasts: would delete 4 row(s) issued before 2020-05-15 12:00:00+00",
        "water.readings: would create partition readings_p202107"
        " [2021-07-01 00:00:00+00, 2021-08-01 00:00:00+00)",
        "water.readings: would create partition readings_p202108"
        " [2021-08-01 00:00:00+00, 2021-09-01 00:00:00+00)",
        "water.kpi_15m: would create partition kpi_15m_p202106"
        " [2021-06-01 00:00:00+00, 2021-07-01 00:00:00+00)",
        "water.kpi_15m: would create partition kpi_15m_p202107"
        " [2021-07-01 00:00:00+00, 2021-08-01 00:00:00+00)",
        "water.kpi_15m: would create partition kpi_15m_p202108"
        " [2021-08-01 00:00:00+00, 2021-09-01 00:00:00+00)",
        "water.kpi_daily: would create partition kpi_daily_p202106"
        " [2021-06-01 00:00:00+00, 2021-07-01 00:00:00+00)",
        "water.kpi_daily: would create partition kpi_daily_p202107"
        " [2021-07-01 00:00:00+00, 2021-08-01 00:00:00+00)",
        "water.kpi_daily: would create partition kpi_daily_p202108"
        " [2021-08-01 00:00:00+00, 2021-09-01 00:00:00+00)",
    ]
    with psycopg.connect(db, autocommit=True) as conn:
        assert {t: rows_per_partition(conn, t) for t in before} == before
        assert conn.execute("SELECT count(*) FROM water.quarantine").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM water.forecasts").fetchone() == (8,)
        assert "readings_p202107" not in partitions(conn, "readings")


def test_retention_drops_whole_old_partitions_only_and_creates_ahead(db, capsys):
    cutoff = dt.datetime(2021, 4, 20, 12, tzinfo=UTC)
    with psycopg.connect(db, autocommit=True) as conn:
        (newer_before,) = conn.execute(
            "SELECT count(*) FROM water.readings WHERE ts >= %s", (cutoff,)
        ).fetchone()
    assert main(["db", "retention", "--warm", db, "--now", NOW]) == 0
    out = capsys.readouterr().out
    assert "water.readings: dropped partition readings_p202101" in out
    assert "water.kpi_15m: dropped partition kpi_15m_p202004" in out
    assert "water.quarantine: deleted 1 row(s) received before 2020-05-15 12:00:00+00" in out
    assert "water.forecasts: deleted 4 row(s) issued before 2020-05-15 12:00:00+00" in out
    assert "water.readings: created partition readings_p202108" in out
    with psycopg.connect(db, autocommit=True) as conn:
        # April holds rows on both sides of the cutoff: kept whole, with its older rows too
        assert rows_per_partition(conn, "readings") == {
            "readings_p202104": 3,
            "readings_p202105": 2,
            "readings_p202106": 2,
        }
        assert sorted(partitions(conn, "readings")) == [
            "readings_p202104",
            "readings_p202105",
            "readings_p202106",
            "readings_p202107",
            "readings_p202108",
        ]
        (newer_after,) = conn.execute(
            "SELECT count(*) FROM water.readings WHERE ts >= %s", (cutoff,)
        ).fetchone()
        assert newer_after == newer_before == 5
        (oldest,) = conn.execute("SELECT min(ts) FROM water.readings").fetchone()
        assert oldest == dt.datetime(2021, 4, 1, 6, tzinfo=UTC)
        assert rows_per_partition(conn, "kpi_15m") == {"kpi_15m_p202105": 1}
        # a NULL received_at is never "older than" anything: kept
        ids = [r[0] for r in conn.execute("SELECT id FROM water.quarantine ORDER BY id")]
        assert ids == ["new", "unknown"]
        # the old forecast issue went whole, the newer one stayed whole
        kept = conn.execute(
            "SELECT DISTINCT issued_at, count(*) OVER () FROM water.forecasts"
        ).fetchall()
        assert kept == [(dt.datetime(2021, 6, 1, tzinfo=UTC), 4)]
        # the dropped tables are gone, not merely detached
        assert conn.execute("SELECT to_regclass('water.readings_p202101')").fetchone() == (None,)

    # a second run the same day has nothing left to do
    assert main(["db", "retention", "--warm", db, "--now", NOW]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "water.quarantine: deleted 0 row(s) received before 2020-05-15 12:00:00+00",
        "water.forecasts: deleted 0 row(s) issued before 2020-05-15 12:00:00+00",
        "nothing to do",
    ]


def test_writer_keeps_working_after_retention_dropped_its_months(db):
    w = WarmPostgresWriter(db, backoff_s=0.05)
    try:
        w.write(frame("readings", {"node_id": ["w"], "ts": [us(2021, 1, 5)]}))  # cached: Jan
        apply_retention(db, RetentionPolicy(), now=dt.datetime(2021, 6, 15, 12, tzinfo=UTC))
        # a replay of January history after retention: the month comes back
        w.write(frame("readings", {"node_id": ["w"], "ts": [us(2021, 1, 6)]}))
    finally:
        w.close()
    with psycopg.connect(db, autocommit=True) as conn:
        assert rows_per_partition(conn, "readings")["readings_p202101"] == 1


def test_policy_sizes_and_partition_boundary():
    """A partition whose upper bound equals the cutoff is dropped; one past it is kept."""
    from connectors.warm_retention import Partition, plan_drops

    cutoff = dt.datetime(2021, 3, 1, tzinfo=UTC)
    parts = [
        Partition("p1", *parse_bound("FOR VALUES FROM ('2021-01-01') TO ('2021-02-01')")),
        Partition("p2", *parse_bound("FOR VALUES FROM ('2021-02-01') TO ('2021-03-01')")),
        Partition("p3", *parse_bound("FOR VALUES FROM ('2021-03-01') TO ('2021-04-01')")),
        Partition("d", *parse_bound("DEFAULT")),
    ]
    assert [p.name for p in plan_drops(parts, cutoff)] == ["p1", "p2"]
    now = dt.datetime(2024, 3, 31, 10, tzinfo=UTC)
    cut = RetentionPolicy(readings_weeks=2, aggregates_months=13).cutoffs(now)
    assert cut["readings"] == dt.datetime(2024, 3, 17, 10, tzinfo=UTC)
    assert cut["kpi_daily"] == dt.datetime(2023, 2, 28, 10, tzinfo=UTC)
    assert add_months(now, 11) == dt.datetime(2025, 2, 28, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="readings_weeks must be at least 1, got 0"):
        RetentionPolicy(readings_weeks=0)


def test_retention_needs_the_partitioning_migration(capsys):
    with fresh_database("waterflow_ret") as url:
        assert main(["db", "retention", "--warm", url, "--dry-run"]) == 1
    assert "migration 0003_partitions is not applied" in capsys.readouterr().err


def _two_turns(schedule) -> None:
    """Let a started schedule take two turns (at most 30 s), then stop it."""
    try:
        deadline = time.monotonic() + 30
        while schedule.turns < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        schedule.stop()


def test_the_live_schedule_applies_retention_every_period(db):
    from connectors.warm_schedule import RetentionSchedule, every_from_env

    now = dt.datetime.fromisoformat(NOW)
    schedule = RetentionSchedule(db, dt.timedelta(seconds=0.2), clock=lambda: now).start()
    _two_turns(schedule)
    assert schedule.turns >= 2
    # The first turn dropped what the CLI drops; later turns find nothing left to drop.
    assert schedule.last is not None
    assert [a for a in schedule.last if a.kind == "drop"] == []
    with psycopg.connect(db, autocommit=True) as conn:
        assert "readings_p202101" not in partitions(conn, "readings")
        assert "readings_p202108" in partitions(conn, "readings")
    assert every_from_env({}) == dt.timedelta(hours=24)
    assert every_from_env({"WATERFLOW_RETENTION_EVERY_H": "0"}) is None
    assert every_from_env({"WATERFLOW_RETENTION_EVERY_H": "0.5"}) == dt.timedelta(minutes=30)
    with pytest.raises(ValueError, match="WATERFLOW_RETENTION_EVERY_H"):
        every_from_env({"WATERFLOW_RETENTION_EVERY_H": "daily"})


def test_a_failing_turn_is_logged_and_does_not_stop_the_schedule(caplog):
    from connectors.warm_schedule import RetentionSchedule

    bad = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"
    schedule = RetentionSchedule(bad, dt.timedelta(seconds=0.1)).start()
    _two_turns(schedule)
    assert schedule.turns >= 2 and schedule.last is None
    assert "warm retention failed" in caplog.text
