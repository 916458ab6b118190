"""The utility's own public holidays: option, variable and file key to ``Settings.holidays``.

``--holiday`` (``waterflow replay``, ``run``, ``forecast backtest``), ``WATERFLOW_HOLIDAYS``
and the configuration file's ``holidays`` go through one check (``config_check.holidays``, the
forecast calendar's own parse); a replay's forecasts then take such a day as a Sunday. No
service is needed: nothing listens on 127.0.0.1:1, so a run whose settings are right stops at
its first probe (exit 1), and a bad setting stops it before (exit 2).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from connectors.file_source import FileSource
from connectors.formats import read_path
from dataflows import config_check as check
from dataflows import live
from dataflows.cli import build_parser, main
from dataflows.cli_live import _given
from dataflows.config_check import ConfigError, Setting
from dataflows.pipeline import build_flow
from dataflows.settings import Settings

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "tests" / "data" / "canonical_example.csv"
TZ = "Europe/Rome"
MESSAGE = "a holiday must be 'MM-DD' or 'YYYY-MM-DD', got {!r}"


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and the one line of stderr of ``waterflow argv``."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return code, err.rstrip("\n")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "waterflow.toml"
    path.write_text(text)
    return path


# -- the one check --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "days"), [
    ("08-16", ("08-16",)),
    ("08-16, 2026-06-29,", ("08-16", "2026-06-29")),  # spaces and an empty item left out
    ("2028-02-29", ("2028-02-29",)),  # a leap day with its year
    (",", ()),
])
def test_holidays_of_a_setting(value, days):
    assert check.holidays(Setting("WATERFLOW_HOLIDAYS", value)) == days
    assert check.holidays(Setting("WATERFLOW_HOLIDAYS", None)) == ()


@pytest.mark.parametrize(("value", "problem"), [
    ("13-45", MESSAGE.format("13-45")),
    ("abc", MESSAGE.format("abc")),
    ("2026-02-30", MESSAGE.format("2026-02-30")),
    ("08-16,2025-02-29", MESSAGE.format("2025-02-29")),  # the first bad one is named
    ("08/16", MESSAGE.format("08/16")),
    ("02-29", MESSAGE.format("02-29")
     + " (02-29 is not in every year: give it with its year, YYYY-02-29)"),
    ("9" * 20 + "-01-01", f"year out of range in {'9' * 20 + '-01-01'!r}"),
])
def test_a_bad_holiday_names_the_value_and_the_setting(value, problem):
    with pytest.raises(ConfigError) as caught:
        check.holidays(Setting("--holiday", value))
    assert str(caught.value) == f"--holiday: {problem}"
    assert caught.value.exit_code == check.USAGE


# -- where the value comes from --------------------------------------------------------------


def test_option_variable_and_file_key_reach_the_live_settings(tmp_path):
    base = {"WATERFLOW_KAFKA_BROKERS": "k:9092", "WATERFLOW_OUT": str(tmp_path)}
    assert live.options_from_env(base).settings.holidays == ()  # the default: none
    # the file: a TOML list of strings, or one string as the variable gives it
    for text in ('holidays = ["08-16", "2026-06-29"]\n', 'holidays = "08-16,2026-06-29"\n'):
        env = {**base, "WATERFLOW_CONFIG": str(write_config(tmp_path, text))}
        live.apply_config_file(environ=env)
        assert env["WATERFLOW_HOLIDAYS"] == "08-16,2026-06-29"
        assert live.options_from_env(env).settings.holidays == ("08-16", "2026-06-29")
    # the variable wins over the file
    env = {**base, "WATERFLOW_CONFIG": str(write_config(tmp_path, 'holidays = ["08-16"]\n')),
           "WATERFLOW_HOLIDAYS": "12-07"}
    live.apply_config_file(environ=env)
    assert live.options_from_env(env).settings.holidays == ("12-07",)
    # waterflow run's options win over both, as _run passes them on; repeated, in order
    args = build_parser().parse_args(["run", "--holiday", "03-19", "--holiday", "2026-10-04"])
    overrides = {name: value for name, (_, value) in _given(args).items()}
    settings = live.options_from_env(env, **overrides).settings
    assert settings.holidays == ("03-19", "2026-10-04")
    no_option = {name: value for name, (_, value) in
                 _given(build_parser().parse_args(["run"])).items()}
    assert live.options_from_env(env, **no_option).settings.holidays == ("12-07",)


@pytest.mark.parametrize("command", [["replay", "a.csv"], ["forecast", "backtest", "a.csv"]])
def test_replay_and_backtest_take_the_option_else_the_variable(monkeypatch, command):
    args = build_parser().parse_args([*command, "--holiday", "08-16", "--holiday", "12-07,"])
    assert check.holidays_given(args.holiday) == ("08-16", "12-07")
    monkeypatch.setenv("WATERFLOW_HOLIDAYS", "06-29")
    assert check.holidays_given(args.holiday) == ("08-16", "12-07")  # the option replaces it
    assert check.holidays_given(build_parser().parse_args(command).holiday) == ("06-29",)


# -- a bad value: one line, exit 2, before anything starts -----------------------------------


def test_replay_refuses_a_bad_option_or_variable_before_starting(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "replay", str(SAMPLE), "--holiday", "08-16", "--holiday",
                        "13-45", "--out", str(out))
    assert (code, err) == (2, f"error: --holiday: {MESSAGE.format('13-45')}")
    monkeypatch.setenv("WATERFLOW_HOLIDAYS", "abc")
    code, err = run_cli(capsys, "replay", str(SAMPLE), "--out", str(out))
    assert (code, err) == (2, f"error: WATERFLOW_HOLIDAYS: {MESSAGE.format('abc')}")
    assert not out.exists(), "refused before any tier was started"


def test_backtest_refuses_a_bad_holiday_before_reading_the_file(capsys, tmp_path):
    # the file is not there: the holiday is checked first
    code, err = run_cli(capsys, "forecast", "backtest", str(tmp_path / "none.csv"),
                        "--weeks", "2021-11-01", "--holiday", "2026-02-30")
    assert (code, err) == (2, f"error: --holiday: {MESSAGE.format('2026-02-30')}")


def test_run_refuses_a_bad_option_variable_or_file_key(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    brokers = ["--brokers", "127.0.0.1:1", "--out", str(out)]
    code, err = run_cli(capsys, "run", *brokers, "--holiday", "2026-02-30")
    assert (code, err) == (2, f"error: --holiday: {MESSAGE.format('2026-02-30')}")
    path = write_config(tmp_path, 'holidays = ["08-16", "13-45"]\n')
    code, err = run_cli(capsys, "run", *brokers, "--config", str(path))
    assert (code, err) == (2, f"error: {path}: holidays: {MESSAGE.format('13-45')}")
    # the option wins over the file: every setting is right, the broker is refused
    code, err = run_cli(capsys, "run", *brokers, "--config", str(path), "--holiday", "08-16")
    assert code == 1 and "no Kafka broker answered" in err
    path = write_config(tmp_path, "holidays = [816]\n")
    code, err = run_cli(capsys, "run", *brokers, "--config", str(path))
    assert (code, err) == (2, f"error: {path}: holidays: must be a list of strings, got [816]")
    monkeypatch.setenv("WATERFLOW_HOLIDAYS", "abc")
    code, err = run_cli(capsys, "run", *brokers)
    assert (code, err) == (2, f"error: WATERFLOW_HOLIDAYS: {MESSAGE.format('abc')}")
    assert not out.exists(), "refused before any tier was started"


def test_check_live_reports_it_before_probing_any_service():
    env = {"WATERFLOW_KAFKA_BROKERS": "127.0.0.1:1", "WATERFLOW_HOLIDAYS": "02-29"}
    with pytest.raises(ConfigError) as caught:
        live.check_live(environ=env)
    assert caught.value.setting == "WATERFLOW_HOLIDAYS"
    assert caught.value.problem.startswith(MESSAGE.format("02-29"))


def test_the_bytewax_entry_refuses_it_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    env.update(WATERFLOW_KAFKA_BROKERS="127.0.0.1:1", WATERFLOW_OUT=str(tmp_path / "out"),
               WATERFLOW_HOLIDAYS="08-16,13-45")
    run = subprocess.run([sys.executable, "-m", "bytewax.run",
                          "dataflows.pipeline:build_from_env()"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (
        2, f"error: WATERFLOW_HOLIDAYS: {MESSAGE.format('13-45')}\n"
    )
    assert not (tmp_path / "out").exists()


# -- a replay's forecasts take the day as a Sunday ---------------------------------------------

HOLIDAY = date(2024, 10, 2)  # a Wednesday, no Italian holiday
FIRST = date(2024, 9, 2)  # a Monday: four full weeks of history before the holiday


def _shape(hour: int) -> float:
    """The hourly demand shape: low at night, high in the afternoon (no flat line, no spike)."""
    return 1 + 0.3 * math.sin(2 * math.pi * (hour - 6) / 24)


def _level(day: date) -> float:
    return 8.0 if day.weekday() == 6 else 10.0  # Sundays: less water


def _write_readings(path: Path) -> None:
    """Hourly flow of one node, local time, 2024-09-02 .. 2024-10-03 (the holiday's next day)."""
    lines = ["node_id,timestamp,flow_rate"]
    zone = ZoneInfo(TZ)
    day = FIRST
    while day <= HOLIDAY + timedelta(days=1):
        for hour in range(24):
            ts = datetime(day.year, day.month, day.day, hour, tzinfo=zone)
            lines.append(f"m1,{ts.isoformat()},{_level(day) * _shape(hour):.6f}")
        day += timedelta(days=1)
    path.write_text("\n".join(lines) + "\n")


def _seasonal_issued_on_the_holiday(path: Path, settings: Settings) -> pl.DataFrame:
    """The seasonal forecast issued at the holiday's local midnight, its first 48 hours."""
    out: list = []
    run_main(build_flow(FileSource([path], settings), TestingSink(out), settings,
                        snapshots=False))
    return _holiday_rows(out)


def _holiday_rows(out: list) -> pl.DataFrame:
    forecasts = pl.concat([rows.frame for rows in out if rows.table == "forecasts"])
    issued = datetime(HOLIDAY.year, HOLIDAY.month, HOLIDAY.day, tzinfo=ZoneInfo(TZ))
    return (
        forecasts.filter((pl.col("issued_at") == issued.astimezone(UTC))
                         & (pl.col("model").cast(pl.String) == "seasonal"))
        .sort("target_ts")
        .head(48)
    )


def test_a_replay_forecasts_the_holiday_as_a_sunday(tmp_path):
    path = tmp_path / "meter.csv"
    _write_readings(path)
    now = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
    # the holiday as the variable gives it, through the one check
    holidays = check.holidays_given(None, {"WATERFLOW_HOLIDAYS": HOLIDAY.isoformat()})
    assert holidays == ("2024-10-02",)
    plain = _seasonal_issued_on_the_holiday(path, Settings(tz=TZ, now_us=now))
    local = _seasonal_issued_on_the_holiday(path, Settings(tz=TZ, now_us=now, holidays=holidays))
    assert plain.height == local.height == 48
    shape = [_shape(h) for h in range(24)]
    # without it, the Wednesday is forecast as the Wednesdays before (level 10); with it, as
    # the Sundays before (level 8); the Thursday after is a working day either way
    assert plain["yhat"].to_list()[:24] == pytest.approx([10.0 * s for s in shape], rel=1e-5)
    assert local["yhat"].to_list()[:24] == pytest.approx([8.0 * s for s in shape], rel=1e-5)
    assert local["yhat"].to_list()[24:] == pytest.approx([10.0 * s for s in shape], rel=1e-5)
    assert local["yhat"].to_list()[24:] == plain["yhat"].to_list()[24:]


def test_a_run_resumed_from_its_snapshots_takes_the_holidays_it_is_given(tmp_path):
    """A live run restarted with a holiday added: its resumed forecasters use it."""
    path = tmp_path / "meter.csv"
    _write_readings(path)
    lines = path.read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("m1,2024-09-30"))
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    before.write_text("".join(lines[:cut]))
    after.write_text(lines[0] + "".join(lines[cut:]))
    now = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
    plain = Settings(tz=TZ, now_us=now)
    items = [*read_path(before, plain), TestingSource.ABORT(), *read_path(after, plain)]
    (tmp_path / "recovery").mkdir()
    init_db_dir(tmp_path / "recovery", 1)
    config = RecoveryConfig(str(tmp_path / "recovery"))
    first: list = []
    flow = build_flow(TestingSource(items), TestingSink(first), plain)
    run_main(flow, epoch_interval=timedelta(0), recovery_config=config)
    assert not any(rows.table == "ingest_runs" for rows in first)  # it died at the abort
    second: list = []
    restarted = Settings(tz=TZ, now_us=now, holidays=(HOLIDAY.isoformat(),))
    flow = build_flow(TestingSource(items), TestingSink(second), restarted)
    run_main(flow, epoch_interval=timedelta(0), recovery_config=config)
    assert not _holiday_rows(first).height  # the holiday's forecast came after the restart
    yhat = _holiday_rows(second)["yhat"].to_list()
    assert yhat[:24] == pytest.approx([8.0 * _shape(h) for h in range(24)], rel=1e-5)
    assert yhat[24:] == pytest.approx([10.0 * _shape(h) for h in range(24)], rel=1e-5)
