"""Wrong settings end in one line naming the setting and the cause, never a password.

No service is needed: a refused port is refused by the local kernel (nothing listens on
127.0.0.1:1), and every other check looks at values only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from connectors import probe
from connectors.kafka import KafkaConfig
from connectors.tiers import TierConfig
from dataflows import config_check as check
from dataflows.cli import main
from dataflows.config_check import ConfigError, Setting, pick
from dataflows.settings import hide_secrets, redact_url, url_secrets
from dataflows.summary import tier_lines

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "dataflows" / "samples" / "simulated_2districts_7days.csv"
SECRET = "Pa55-w0rd"
REFUSED_PG = f"postgresql://writer:{SECRET}@127.0.0.1:1/water"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("WATERFLOW_"):
            monkeypatch.delenv(name)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``waterflow argv`` (argparse's exit included)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and SECRET not in err
    for part in parts:
        assert part in err, (part, err)


# -- redaction -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://app:s3cret@cache:6380/0?ssl_cert_reqs=required",
     "rediss://app:***@cache:6380/0?ssl_cert_reqs=required"),
    ("postgresql://writer:s3cret@db:5432/water", "postgresql://writer:***@db:5432/water"),
    ("postgresql://db/water?password=s3cret&sslmode=require",
     "postgresql://db/water?password=***&sslmode=require"),
    ("mysql://u:s3cret@h/x", "mysql://u:***@h/x"),
    ("postgresql://u:s3cret@h:notaport/x", "postgresql://u:***@h:notaport/x"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("file:///srv/archive", "file:///srv/archive"),
])
def test_redact_url_hides_the_password_wherever_it_is(url, shown):
    assert redact_url(url) == shown


def test_hide_secrets_covers_encoded_passwords():
    secrets = url_secrets(["redis://:p%40ss@h/0", "postgresql://u:x@h/db", None])
    assert secrets == {"p%40ss", "p@ss", "x"}
    assert hide_secrets("AUTH p@ss failed for u:x", secrets) == "AUTH *** failed for u:***"


# -- values, named by where they came from ----------------------------------------------------


def test_pick_names_the_option_or_the_variable():
    env = {"WATERFLOW_WARM_URL": "postgresql://h/x"}
    assert pick("--warm", None, "WATERFLOW_WARM_URL", env) == Setting(
        "WATERFLOW_WARM_URL", "postgresql://h/x")
    assert pick("--warm", "postgresql://o/y", "WATERFLOW_WARM_URL", env).name == "--warm"
    assert pick("--warm", None, "WATERFLOW_WARM_URL", {}) == Setting("--warm", None)


@pytest.mark.parametrize(("kind", "url", "expected"), [
    ("warm", "redis://h/0", "expected postgresql://"),
    ("hot", "http://h", "expected redis://"),
    ("cold", "s3://bucket/x", "expected file:///PATH"),
    ("cold", "bigquery://p", "dataset '' must be letters, digits and underscores"),
])
def test_tier_url_refuses_a_wrong_scheme(kind, url, expected):
    with pytest.raises(ConfigError) as err:
        check.tier_url(kind, Setting(f"--{kind}", url))
    assert err.value.exit_code == 2 and err.value.setting == f"--{kind}"
    assert expected in str(err.value)


def test_a_cold_url_error_does_not_echo_its_password():
    with pytest.raises(ConfigError) as err:
        check.tier_url("cold", Setting("--cold", f"bigquery://u:{SECRET}@proj/"))
    assert SECRET not in str(err.value) and "not a BigQuery project id" in str(err.value)


def test_cold_folder_that_is_a_file_is_refused(tmp_path):
    a_file = tmp_path / "archive"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check.tier_url("cold", Setting("--cold", a_file.as_uri()))
    assert check.tier_url("cold", Setting("--cold", str(tmp_path / "new"))) == str(
        tmp_path / "new")


def test_numbers_ports_instants_and_networks(tmp_path):
    assert check.whole_number(Setting("WATERFLOW_LATENESS_S", None), 21600) == 21600
    assert check.whole_number(Setting("WATERFLOW_LATENESS_S", "60"), 0) == 60
    with pytest.raises(ConfigError, match="WATERFLOW_SNAPSHOT_S: must be a whole number >= 1"):
        check.whole_number(Setting("WATERFLOW_SNAPSHOT_S", "0"), 10, minimum=1)
    assert check.port(Setting("--metrics-port", "9108")) == 9108
    with pytest.raises(ConfigError, match="port number"):
        check.port(Setting("WATERFLOW_METRICS_PORT", "99999"))
    assert check.instant(Setting("--min-timestamp", "2000-01-01")) == 946_684_800_000_000
    with pytest.raises(ConfigError, match="needs a UTC offset"):
        check.instant(Setting("--min-timestamp", "2000-01-01T00:00"))
    with pytest.raises(ConfigError, match=f"no network file at {tmp_path / 'n.toml'}"):
        check.network(Setting("--network", str(tmp_path / "n.toml")))
    bad = tmp_path / "bad.toml"
    bad.write_text("[districts\n")
    with pytest.raises(ConfigError) as err:
        check.network(Setting("WATERFLOW_NETWORK", str(bad)))
    assert err.value.setting == "WATERFLOW_NETWORK"


def test_brokers_must_be_host_and_port():
    assert check.kafka(Setting("--brokers", "a:9092,b:9093")).brokers == ("a:9092", "b:9093")
    with pytest.raises(ConfigError, match="expected host:port"):
        check.kafka(Setting("WATERFLOW_KAFKA_BROKERS", "a:9092,localhost"))
    with pytest.raises(ConfigError, match="no Kafka broker"):
        check.kafka(Setting("--brokers", None))


# -- services ---------------------------------------------------------------------------------


def test_a_refused_warm_port_is_exit_1_without_the_password():
    with pytest.raises(ConfigError) as err:
        check.reach_warm(Setting("--warm", REFUSED_PG), REFUSED_PG)
    assert err.value.exit_code == 1
    text = str(err.value)
    assert text.startswith("--warm postgresql://writer:***@127.0.0.1:1/water: cannot connect:")
    assert "refused" in text and SECRET not in text and "\n" not in text


def test_a_silent_hot_tier_is_a_warning_not_an_error(capsys):
    url = f"redis://:{SECRET}@127.0.0.1:1/0"
    check.reach_hot(Setting("WATERFLOW_HOT_URL", url), url)
    err = capsys.readouterr().err
    assert_one_line(err, "warning: WATERFLOW_HOT_URL redis://:***@127.0.0.1:1/0: not answering",
                    "catches up")


def test_no_answering_broker_is_exit_1(monkeypatch):
    monkeypatch.setattr(probe, "PROBE_TIMEOUT_S", 0.5)
    with pytest.raises(ConfigError) as err:
        check.reach_kafka(Setting("--brokers", "127.0.0.1:1"),
                          KafkaConfig(brokers=("127.0.0.1:1",)))
    assert err.value.exit_code == 1
    assert str(err.value).startswith("--brokers 127.0.0.1:1: no Kafka broker answered within "
                                     "0.5 s")


# -- the command line, as a user meets it ----------------------------------------------------


@pytest.mark.parametrize(("argv", "code", "parts"), [
    (["replay", str(SAMPLE), "--tz", "Mars/Olympus"], 2,
     ["error: --tz: unknown time zone 'Mars/Olympus'"]),
    (["replay", str(SAMPLE), "--now", "yesterday"], 2,
     ["argument --now: not an ISO date or time: 'yesterday'"]),
    (["replay", str(SAMPLE), "--warm", f"mysql://u:{SECRET}@h/x"], 2,
     ["error: --warm: expected postgresql://", "mysql://u:***@h/x"]),
    (["replay", str(SAMPLE), "--warm", REFUSED_PG, "--quiet"], 1,
     ["error: --warm postgresql://writer:***@127.0.0.1:1/water: cannot connect"]),
    (["replay", str(SAMPLE), "--workers", "0"], 2, ["argument --workers: must be >= 1, got 0"]),
    (["replay", str(SAMPLE), "--min-timestamp", "1970"], 2,
     ["error: --min-timestamp: not an ISO date or time: '1970'"]),
    (["replay", "/no/such/file.csv"], 2, ["error: paths: no such file or folder"]),
    (["backfill", "--from", "file:///no/such/archive"], 2,
     ["error: --from file:///no/such/archive: no archive of readings at"]),
    (["backfill", "--from", "/tmp", "--since", "2024-02-01", "--until", "2024-01-01"], 2,
     ["error: --until: must be after --since"]),
    (["run", "--brokers", "127.0.0.1:1", "--tz", "Mars/Olympus"], 2, ["error: --tz: unknown"]),
    (["run"], 2, ["error: --brokers: no Kafka broker"]),
    (["run", "--brokers", "k:9092", "--lateness", "soon"], 2,
     ["argument --lateness: expected a whole number, got 'soon'"]),
    (["db", "migrate", "--warm", REFUSED_PG], 1, ["cannot connect"]),
    (["db", "retention", "--now", "yesterday"], 2, ["argument --now: not an ISO date"]),
])
def test_wrong_settings_end_in_one_line(capsys, tmp_path, argv, code, parts):
    got, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "out")]
                                       if argv[0] == "replay" else []))
    assert got == code, err
    assert_one_line(err, *parts)
    assert not (tmp_path / "out").exists(), "refused before anything was started"


@pytest.mark.parametrize(("env", "parts"), [
    ({"WATERFLOW_TZ": "Mars/Olympus"}, ["error: WATERFLOW_TZ: unknown time zone"]),
    ({"WATERFLOW_WARM_URL": f"mysql://u:{SECRET}@h/x"}, ["error: WATERFLOW_WARM_URL: expected"]),
    ({"WATERFLOW_HOT_URL": "http://cache"}, ["error: WATERFLOW_HOT_URL: expected redis://"]),
    ({"WATERFLOW_METRICS_PORT": "nine"}, ["error: WATERFLOW_METRICS_PORT: must be a port"]),
    ({"WATERFLOW_MIN_TIMESTAMP": "long ago"}, ["error: WATERFLOW_MIN_TIMESTAMP: not an ISO"]),
    ({"WATERFLOW_QUARANTINE_RAW_BYTES": "10"},
     ["error: WATERFLOW_QUARANTINE_RAW_BYTES: must be a whole number >= 64"]),
    ({"WATERFLOW_NETWORK": "/no/network.toml"}, ["error: WATERFLOW_NETWORK: no network file"]),
])
def test_the_environment_goes_through_the_same_checks(capsys, monkeypatch, tmp_path, env, parts):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got, err = run_cli(capsys, "replay", str(SAMPLE), "--out", str(tmp_path / "out"))
    assert got == 2
    assert_one_line(err, *parts)


def test_run_checks_its_environment_too(capsys, monkeypatch):
    monkeypatch.setenv("WATERFLOW_KAFKA_BROKERS", "k:9092")
    monkeypatch.setenv("WATERFLOW_SNAPSHOT_S", "0")
    got, err = run_cli(capsys, "run")
    assert got == 2
    assert_one_line(err, "error: WATERFLOW_SNAPSHOT_S: must be a whole number >= 1, got '0'")


def test_the_console_script_prints_one_line_and_no_secret(tmp_path):
    """As a subprocess: what the terminal shows, password in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    env["WATERFLOW_WARM_URL"] = REFUSED_PG
    env["WATERFLOW_HOT_URL"] = f"redis://:{SECRET}@127.0.0.1:1/0"
    run = subprocess.run(
        [sys.executable, "-m", "dataflows.cli", "replay", str(SAMPLE), "--quiet", "--out",
         str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    # the warm tier is probed first: its refusal is the one line
    assert run.stderr.startswith("error: WATERFLOW_WARM_URL postgresql://writer:***@127.0.0.1:1/"
                                 "water: cannot connect:")
    assert run.stderr.count("\n") == 1 and SECRET not in run.stderr


def test_every_option_says_its_default_and_meaning():
    import argparse

    from dataflows.cli import build_parser
    from dataflows.simulate import build_parser as simulate_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = []
    for p in [*parsers(build_parser()), simulate_parser()]:
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction | argparse._StoreTrueAction):
                continue  # a flag is off unless given
            text = p._get_formatter()._expand_help(action) if action.help else ""
            if len(text) < 15 or not ("default" in text or action.required):
                missing.append(f"{p.prog} {action.option_strings[-1]}: {text!r}")
    assert missing == []


def test_summary_names_where_the_data_stays_not_a_dead_socket(tmp_path):
    wanted = TierConfig(None, None, None, tmp_path)
    used = TierConfig(
        "postgresql://postgres:@/postgres?host=/tmp/x", "unix:///tmp/tmpab12/redis.socket",
        (tmp_path / "cold").as_uri(), tmp_path,
    )
    lines = tier_lines(used, wanted, tmp_path, keep_serving=False)
    assert lines == [
        f"warm: embedded PostgreSQL, stopped; data in {tmp_path / 'pg'} (schema water): "
        "replay with --keep-serving to query it",
        f"hot:  embedded Redis, stopped at the end of the replay; data saved in "
        f"{tmp_path / 'redis.db'}",
        f"cold: {(tmp_path / 'cold').as_uri()} (Parquet archive)",
    ]
    given = TierConfig(REFUSED_PG, f"redis://:{SECRET}@cache:6379/0", "bigquery://p/d", tmp_path)
    lines = tier_lines(given, given, tmp_path, keep_serving=False)
    assert lines == [
        "warm: postgresql://writer:***@127.0.0.1:1/water (schema water)",
        "hot:  redis://:***@cache:6379/0",
        "cold: bigquery://p/d",
    ]


def test_live_settings_take_the_input_limits_from_the_environment(tmp_path):
    from dataflows.live import options_from_env

    env = {"WATERFLOW_KAFKA_BROKERS": "k:9092", "WATERFLOW_OUT": str(tmp_path),
           "WATERFLOW_MIN_TIMESTAMP": "2010-01-01T00:00:00Z",
           "WATERFLOW_QUARANTINE_RAW_BYTES": "512"}
    settings = options_from_env(env).settings
    assert settings.min_ts_us == 1_262_304_000_000_000
    assert settings.quarantine_raw_bytes == 512
    defaults = options_from_env({"WATERFLOW_KAFKA_BROKERS": "k:9092"}).settings
    assert (defaults.min_ts_us, defaults.quarantine_raw_bytes) == (946_684_800_000_000, 4096)
