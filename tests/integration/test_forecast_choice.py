"""Migration 0008: forecast_selected reads kept choices (water.forecast_choice, refreshed by
retention) and makes the others at read time; either way it picks what 0006 picked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from connectors.warm_postgres import migrate
from connectors.warm_retention import RetentionPolicy, apply_retention
from tests.integration.conftest import fresh_database

pytestmark = pytest.mark.integration

DAY0 = datetime(2025, 3, 1, 23, tzinfo=UTC)
SERIES = ("n1", "d1")


def _issue(conn: psycopg.Connection, series: str, issued: datetime) -> None:
    for model in ("ridge", "seasonal"):
        for h in range(3):
            conn.execute("INSERT INTO water.forecasts VALUES (%s, %s, %s, %s, %s, 0, 9)",
                         (series, issued, issued + timedelta(hours=h), model, h + 1.0))


def _accuracy(conn: psycopg.Connection, series: str, model: str, day: datetime,
              mae: float) -> None:
    conn.execute("INSERT INTO water.forecast_accuracy VALUES (%s, %s, 24, %s, %s, 0.1, 24)",
                 (series, model, day, mae))


def _choices(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT node_id, issued_at, model, count(*) FROM water.forecast_selected"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").fetchall()


def test_kept_and_read_time_choices_agree_and_new_issues_show_before_a_refresh():
    with fresh_database("waterflow_choice") as url:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            # ridge is better until day 1, seasonal from day 2 on: the choice changes by issue
            for s in SERIES:
                for d in range(4):
                    _issue(conn, s, DAY0 + timedelta(days=d))
                _accuracy(conn, s, "ridge", DAY0 - timedelta(hours=23), 0.3)
                _accuracy(conn, s, "seasonal", DAY0 - timedelta(hours=23), 0.5)
                _accuracy(conn, s, "seasonal", DAY0 + timedelta(days=1, hours=1), 0.0)
            read_time = _choices(conn)
            assert [(n, i - DAY0, m) for n, i, m, _ in read_time if n == "n1"] == [
                ("n1", timedelta(0), "ridge"), ("n1", timedelta(days=1), "ridge"),
                ("n1", timedelta(days=2), "seasonal"), ("n1", timedelta(days=3), "seasonal")]
            assert {c for *_, c in read_time} == {3}
            assert conn.execute("SELECT count(*) FROM water.forecast_choice").fetchone() == (0,)

            assert conn.execute("SELECT water.refresh_forecast_choice()").fetchone() == (8,)
            assert _choices(conn) == read_time

            # issued after the refresh: chosen at read time, with the accuracy known then
            _issue(conn, "n1", DAY0 + timedelta(days=4))
            _accuracy(conn, "n1", "ridge", DAY0 + timedelta(days=3, hours=1), 0.0)
            _accuracy(conn, "n1", "seasonal", DAY0 + timedelta(days=3, hours=1), 2.0)
            new = [r for r in _choices(conn) if r[1] == DAY0 + timedelta(days=4)]
            assert new == [("n1", DAY0 + timedelta(days=4), "ridge", 3)]

            # another window: the kept choices (made with 28 days) are not used
            conn.execute("UPDATE water.forecast_settings SET selection_window = '1 day'")
            try:
                one_day = {(n, i): m for n, i, m, _ in _choices(conn)}
                # day 1's issue sees no accuracy in its last day: a tie, the first name wins
                assert one_day[("n1", DAY0 + timedelta(days=1))] == "ridge"
                assert one_day[("n1", DAY0 + timedelta(days=2))] == "seasonal"
                assert one_day[("n1", DAY0 + timedelta(days=3))] == "ridge"
            finally:
                conn.execute("UPDATE water.forecast_settings SET selection_window = '28 days'")


def test_retention_refreshes_the_kept_choices_and_the_reader_can_read_them():
    with fresh_database("waterflow_choice") as url:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            _issue(conn, "n1", DAY0)
            apply_retention(url, RetentionPolicy(), now=DAY0, dry_run=True)
            assert conn.execute("SELECT count(*) FROM water.forecast_choice").fetchone() == (0,)
            apply_retention(url, RetentionPolicy(), now=DAY0)
            assert conn.execute(
                "SELECT node_id, issued_at, model FROM water.forecast_choice").fetchall() == [
                    ("n1", DAY0, "ridge")]
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'water_reader'").fetchone():
                conn.execute("SET ROLE water_reader")
                assert conn.execute(
                    "SELECT count(*) FROM water.forecast_selected").fetchone() == (3,)
