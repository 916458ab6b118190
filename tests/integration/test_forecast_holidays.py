"""``waterflow replay --holiday`` (or ``WATERFLOW_HOLIDAYS``) into the real PostgreSQL: the
seasonal forecast of the utility's holiday, a Wednesday, is the Sundays' profile."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from dataflows.cli import main
from tests.integration.conftest import REDIS_URL, fresh_database
from tests.unit.test_config_holidays import HOLIDAY, TZ, _shape, _write_readings

pytestmark = pytest.mark.integration


def _holiday_forecast(tmp_path: Path, prefix: str, *options: str) -> list[float]:
    """The seasonal yhat of the holiday's 24 hours, issued at its local midnight."""
    tmp_path.mkdir()
    path = tmp_path / "meter.csv"
    _write_readings(path)
    issued = datetime(HOLIDAY.year, HOLIDAY.month, HOLIDAY.day, tzinfo=ZoneInfo(TZ))
    with fresh_database("waterflow_holiday") as url:
        args = ["replay", str(path), "--quiet", "--now", "2025-01-01T00:00:00+00:00",
                "--warm", url, "--hot", REDIS_URL, "--hot-prefix", prefix,
                "--cold", (tmp_path / "cold").as_uri(), "--out", str(tmp_path / "out"),
                *options]
        assert main(args) == 0
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT yhat FROM water.forecasts WHERE node_id = 'm1' AND model = 'seasonal'"
                " AND issued_at = %s ORDER BY target_ts LIMIT 24", (issued.astimezone(UTC),)
            ).fetchall()
    return [yhat for (yhat,) in rows]


def test_the_replay_s_holiday_is_forecast_as_a_sunday(tmp_path, redis_prefix, monkeypatch):
    weekday = [10.0 * _shape(h) for h in range(24)]
    sunday = [8.0 * _shape(h) for h in range(24)]
    plain = _holiday_forecast(tmp_path / "plain", redis_prefix)
    assert plain == pytest.approx(weekday, rel=1e-5)
    option = _holiday_forecast(tmp_path / "option", redis_prefix, "--holiday", "12-25",
                               "--holiday", HOLIDAY.isoformat())
    assert option == pytest.approx(sunday, rel=1e-5)
    # the variable, every year's form, when no option is given
    monkeypatch.setenv("WATERFLOW_HOLIDAYS", HOLIDAY.strftime("%m-%d"))
    variable = _holiday_forecast(tmp_path / "variable", redis_prefix)
    assert variable == option
    # an option replaces the variable
    replaced = _holiday_forecast(tmp_path / "replaced", redis_prefix, "--holiday", "08-16")
    assert replaced == plain
