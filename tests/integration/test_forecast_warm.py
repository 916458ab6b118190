"""Forecasts in the real PostgreSQL: a replay fills forecasts and their accuracy, and
forecast_selected chooses per node the model with the better accuracy within its window."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from dataflows.cli import main
from tests.integration.conftest import REDIS_URL, fresh_database

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).parents[2] / "dataflows" / "samples"


def test_replay_of_the_sample_fills_forecasts_and_accuracy(tmp_path, redis_prefix):
    with fresh_database("waterflow_forecast") as url:
        args = [
            "replay", str(SAMPLES / "simulated_2districts_7days.csv"), "--quiet",
            "--network", str(SAMPLES / "network.toml"),
            "--now", "2026-01-01T00:00:00+00:00", "--warm", url, "--hot", REDIS_URL,
            "--hot-prefix", redis_prefix,
            "--cold", (tmp_path / "cold").as_uri(), "--out", str(tmp_path / "out"),
        ]
        assert main(args) == 0
        with psycopg.connect(url) as conn:
            issues = conn.execute(
                "SELECT node_id, model, array_agg(DISTINCT issued_at ORDER BY issued_at),"
                " count(*) FROM water.forecasts WHERE node_id IN ('d1', 'd2', 'd1-inflow')"
                " GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
            accuracy = conn.execute(
                "SELECT model, horizon_h, count(DISTINCT period_start), max(n),"
                " bool_and(mae >= 0 AND mape >= 0)"
                " FROM water.forecast_accuracy WHERE node_id = 'd1' GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
            selected = conn.execute(
                "SELECT node_id, issued_at, count(DISTINCT model), count(*)"
                " FROM water.forecast_selected WHERE node_id IN ('d1', 'd2')"
                " GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
    # the week starts Monday 2024-11-04 00:00 local: each midnight after it issues, the last
    # one (2024-11-11) when the replay ends with the Sunday complete
    midnights = [datetime(2024, 11, 4, 23, tzinfo=UTC) + timedelta(days=d) for d in range(7)]
    for node in ("d1", "d1-inflow", "d2"):
        for model in ("ridge", "seasonal"):
            assert (node, model, midnights, 7 * 168) in issues
    # days 2024-11-05 .. 11-10 were forecast and then measured: the first band every day
    # (one issue), the second from the second day (up to two issues a day), the third from
    # the fourth (up to three issues in this week: 11-10 from 11-05, 11-06 and 11-07)
    assert accuracy == [
        ("ridge", 24, 6, 24, True), ("ridge", 72, 5, 48, True), ("ridge", 168, 3, 72, True),
        ("seasonal", 24, 6, 24, True), ("seasonal", 72, 5, 48, True),
        ("seasonal", 168, 3, 72, True),
    ]
    assert [(n, i) for n, i, _, _ in selected] == [(n, m) for n in ("d1", "d2") for m in midnights]
    assert all(models == 1 and rows == 168 for _, _, models, rows in selected)


ISSUE = datetime(2024, 3, 1, tzinfo=UTC)


def _selected(pg: psycopg.Connection, node: str) -> str:
    (model,) = pg.execute(
        "SELECT DISTINCT model FROM water.forecast_selected WHERE node_id = %s", (node,)
    ).fetchall()
    return model[0]


def test_forecast_selected_uses_the_recent_accuracy_within_the_configured_window(pg):
    node = f"sel-{uuid.uuid4().hex[:8]}"
    for model in ("alpha", "beta", "gamma"):
        for h in range(3):
            pg.execute(
                "INSERT INTO water.forecasts VALUES (%s, %s, %s, %s, 1, 0, 2)",
                (node, ISSUE, ISSUE + timedelta(hours=h), model),
            )

    def accuracy(model: str, days_before: int, mae: float, n: int) -> None:
        pg.execute(
            "INSERT INTO water.forecast_accuracy VALUES (%s, %s, 24, %s, %s, 0.1, %s)",
            (node, model, ISSUE - timedelta(days=days_before), mae, n),
        )

    # alpha was excellent 40 days ago and poor lately; beta is fair lately; gamma unmeasured
    accuracy("alpha", 40, 0.1, 1000)
    accuracy("alpha", 3, 1.0, 24)
    accuracy("beta", 2, 0.5, 24)
    # known only after the issue: must not count
    accuracy("gamma", 0, 0.0, 24)
    (window,) = pg.execute("SELECT selection_window FROM water.forecast_settings").fetchone()
    assert window == timedelta(days=28)
    assert _selected(pg, node) == "beta"  # within 28 days: alpha 1.0, beta 0.5
    try:
        pg.execute("UPDATE water.forecast_settings SET selection_window = interval '60 days'")
        # alpha: (0.1 * 1000 + 1.0 * 24) / 1024 = 0.12 < beta 0.5
        assert _selected(pg, node) == "alpha"
        pg.execute("UPDATE water.forecast_settings SET selection_window = interval '1 day'")
        # nothing measured in the last day: all tie, the first name wins
        assert _selected(pg, node) == "alpha"
    finally:
        pg.execute("UPDATE water.forecast_settings SET selection_window = interval '28 days'")
    rows = pg.execute(
        "SELECT count(*) FROM water.forecast_selected WHERE node_id = %s", (node,)
    ).fetchone()
    assert rows == (3,)
    with pytest.raises(psycopg.errors.CheckViolation):
        pg.execute("UPDATE water.forecast_settings SET selection_window = interval '0 days'")
