"""Logs: JSON lines a collector can parse, readable text on a terminal, never a password."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dataflows import logs
from dataflows.cli import main
from dataflows.config_check import ConfigError, Setting
from dataflows.logs import log_format, set_run_id, setup_logging

ROOT = Path(__file__).parents[2]
SECRET = "Pa55-w0rd"
log = logging.getLogger("connectors.example")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No WATERFLOW_* variable of the caller; the root logger as it was, afterwards."""
    for name in list(os.environ):
        if name.startswith("WATERFLOW_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    set_run_id(None)


def json_lines(err: str) -> list[dict[str, object]]:
    """Every line of stderr as a JSON object (fails on a line that is not one)."""
    return [json.loads(line) for line in err.splitlines()]


def test_json_lines_carry_the_run_node_and_step(capsys):
    assert setup_logging("INFO", "json", environ={}) == "json"
    set_run_id("live-r1")
    log.info("gathered %d readings", 12, extra={"node_id": "PCR-4", "step": "validate"})
    log.warning("hot tier down")
    first, second = json_lines(capsys.readouterr().err)
    assert {k: first[k] for k in ("level", "logger", "message", "run_id", "node_id", "step")} == {
        "level": "INFO", "logger": "connectors.example", "message": "gathered 12 readings",
        "run_id": "live-r1", "node_id": "PCR-4", "step": "validate",
    }
    ts = datetime.fromisoformat(str(first["ts"]))
    assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert str(first["ts"]).endswith("Z")
    # context only where it applies
    assert second["run_id"] == "live-r1" and "node_id" not in second and "step" not in second
    assert "exception" not in second


def test_a_record_may_name_its_own_run_and_extra_fields(capsys):
    setup_logging("INFO", "json", environ={})
    set_run_id("live-r1")
    log.info("backfill day", extra={"run_id": "backfill", "table": "kpi_daily", "rows": 96})
    (line,) = json_lines(capsys.readouterr().err)
    assert (line["run_id"], line["table"], line["rows"]) == ("backfill", "kpi_daily", 96)


def test_the_run_id_reaches_records_of_threads_started_by_others(capsys):
    """Bytewax runs the flow in its own threads: the run's id is process-wide."""
    setup_logging("INFO", "json", environ={})
    set_run_id("live-r2")
    worker = threading.Thread(target=lambda: log.info("from a worker"))
    worker.start()
    worker.join()
    (line,) = json_lines(capsys.readouterr().err)
    assert (line["message"], line["run_id"]) == ("from a worker", "live-r2")


def test_a_traceback_lands_in_one_json_object(capsys):
    setup_logging("INFO", "json", environ={})
    try:
        {}["missing"]  # noqa: B018
    except KeyError:
        log.exception("cold tier: loading the spool failed")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["level"] == "ERROR" and line["message"] == "cold tier: loading the spool failed"
    exception = str(line["exception"])
    assert exception.startswith("Traceback (most recent call last):")
    assert exception.rstrip().endswith("KeyError: 'missing'")


@pytest.mark.parametrize(("level", "shown"), [
    ("DEBUG", ["DEBUG", "INFO", "WARNING", "ERROR"]),
    ("info", ["INFO", "WARNING", "ERROR"]),
    ("WARNING", ["WARNING", "ERROR"]),
    ("ERROR", ["ERROR"]),
])
def test_the_level_filters_records(capsys, level, shown):
    setup_logging(level, "json", environ={})
    for name in ("debug", "info", "warning", "error"):
        getattr(log, name)("a %s record", name)
    assert [line["level"] for line in json_lines(capsys.readouterr().err)] == shown


def test_the_environment_sets_level_and_format_and_options_win(capsys):
    env = {"WATERFLOW_LOG_LEVEL": "ERROR", "WATERFLOW_LOG_FORMAT": "text"}
    assert setup_logging(environ=env) == "text"
    log.warning("hidden")
    log.error("shown")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ERROR connectors.example shown" in err
    assert setup_logging("WARNING", "json", environ=env) == "json"
    log.warning("now shown")
    assert json_lines(capsys.readouterr().err)[0]["message"] == "now shown"


def test_text_is_one_readable_line_with_its_context(capsys):
    setup_logging("INFO", "text", environ={})
    set_run_id("live-r3")
    log.warning("retry in %.1fs", 0.5, extra={"node_id": "N1"})
    err = capsys.readouterr().err
    assert err.endswith(" WARNING connectors.example [run_id=live-r3 node_id=N1] retry in 0.5s\n")
    ts = datetime.strptime(err[:24], "%Y-%m-%d %H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert ts.year >= 2024


def test_auto_is_text_on_a_terminal_and_json_otherwise(tmp_path):
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            assert log_format(Setting("--log-format", None), tty) == "text"
            assert log_format(Setting("WATERFLOW_LOG_FORMAT", "json"), tty) == "json"
    finally:
        os.close(primary)
        os.close(secondary)
    with (tmp_path / "file").open("w") as not_tty:
        assert log_format(Setting("--log-format", "auto"), not_tty) == "json"
        assert log_format(Setting("--log-format", "TEXT"), not_tty) == "text"


def test_no_password_reaches_a_log(capsys):
    env = {"WATERFLOW_KAFKA_SASL_PASSWORD": SECRET}
    setup_logging("INFO", "json", environ=env, secrets=["cli-secret"])
    log.warning("warm tier postgresql://writer:%s@db/water failed", SECRET)
    log.warning("broker said: bad credentials %s and cli-secret", SECRET)
    try:
        raise RuntimeError(f"auth failed for redis://:{SECRET}@cache:6379/0")
    except RuntimeError:
        log.exception("hot tier")
    err = capsys.readouterr().err
    assert SECRET not in err and "cli-secret" not in err
    lines = json_lines(err)
    assert lines[0]["message"] == "warm tier postgresql://writer:***@db/water failed"
    assert lines[1]["message"] == "broker said: bad credentials *** and ***"
    assert "redis://:***@cache:6379/0" in str(lines[2]["exception"])


@pytest.mark.parametrize(("setting", "value", "expected"), [
    ("WATERFLOW_LOG_LEVEL", "loud",
     "WATERFLOW_LOG_LEVEL: expected one of DEBUG, INFO, WARNING, ERROR, got 'loud'"),
    ("WATERFLOW_LOG_FORMAT", "xml",
     "WATERFLOW_LOG_FORMAT: expected one of auto, json, text, got 'xml'"),
])
def test_a_wrong_level_or_format_is_a_config_error(setting, value, expected):
    with pytest.raises(ConfigError) as caught:
        setup_logging(environ={setting: value})
    assert str(caught.value) == expected and caught.value.exit_code == 2


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--log-level", "loud", "db", "migrate"], {},
     "error: --log-level: expected one of DEBUG, INFO, WARNING, ERROR, got 'loud'\n"),
    (["db", "migrate"], {"WATERFLOW_LOG_FORMAT": "xml"},
     "error: WATERFLOW_LOG_FORMAT: expected one of auto, json, text, got 'xml'\n"),
    (["simulate", "--help"], {"WATERFLOW_LOG_LEVEL": "chatty"},
     "error: WATERFLOW_LOG_LEVEL: expected one of DEBUG, INFO, WARNING, ERROR, got 'chatty'\n"),
])
def test_the_command_refuses_them_in_one_line_before_anything_starts(
    capsys, monkeypatch, tmp_path, argv, env, expected
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    extra = ["--out", str(out)] if "migrate" in argv else []
    assert main([*argv, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err == expected and captured.out == ""
    assert not out.exists()  # no embedded PostgreSQL was started


def test_the_live_entry_refuses_a_wrong_log_level_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    env.update(WATERFLOW_LOG_LEVEL="loud", WATERFLOW_KAFKA_BROKERS="127.0.0.1:1")
    run = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflows.pipeline:build_from_env()"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr == ("error: WATERFLOW_LOG_LEVEL: expected one of DEBUG, INFO, WARNING, "
                          "ERROR, got 'loud'\n")


def test_setup_replaces_its_own_handler_and_leaves_others(capsys):
    root = logging.getLogger()
    before = [h for h in root.handlers if not isinstance(h, logs._StderrHandler)]
    setup_logging("INFO", "json", environ={})
    setup_logging("INFO", "text", environ={})
    ours = [h for h in root.handlers if isinstance(h, logs._StderrHandler)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, logs.TextFormatter)
    assert [h for h in root.handlers if h not in ours] == before
    log.info("once")
    assert capsys.readouterr().err.count("once") == 1


def test_a_connector_s_records_name_their_step(capsys):
    """The retention turn of a live run, failing on a closed port: its record says the step."""
    from connectors.warm_schedule import RetentionSchedule

    setup_logging("INFO", "json", environ={})
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        schedule = RetentionSchedule(f"postgresql://x@127.0.0.1:{port}/db", timedelta(hours=1))
        schedule._turn()
    (record,) = [r for r in json_lines(capsys.readouterr().err) if r["logger"].endswith("schedule")]
    assert record["level"] == "WARNING" and record["step"] == "retention"
    assert record["message"].startswith("warm retention failed")
