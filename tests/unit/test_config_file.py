"""The live run's optional TOML file: the variables' keys, under the environment, checked.

No service is needed: a refused port is refused by the local kernel (nothing listens on
127.0.0.1:1), so a run whose settings are all right stops at its first probe (exit 1).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from connectors.kafka import ANOMALIES_TOPIC, QUARANTINE_TOPIC, READINGS_TOPIC
from connectors.warm_schedule import DEFAULT_EVERY
from dataflows import config_check as check
from dataflows import live
from dataflows.cli import main
from dataflows.config_check import ConfigError, Setting
from dataflows.settings import MIN_TIMESTAMP, QUARANTINE_RAW_BYTES, Settings

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "deploy" / "waterflow.example.toml"
SECRET = "Pa55-w0rd"
REFUSED_PG = f"postgresql://writer:{SECRET}@127.0.0.1:1/water"


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "waterflow.toml"
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``waterflow argv``."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and SECRET not in err
    return err.rstrip("\n")


# -- the example file ---------------------------------------------------------------------------


def test_the_example_lists_every_key_with_the_code_s_defaults():
    text = EXAMPLE.read_text()
    listed = re.findall(r"^#? ?([a-z_]+) = ", text, re.MULTILINE)
    assert sorted(listed) == sorted(live.CONFIG_KEYS)
    # every commented key, uncommented, is valid too
    commented = "\n".join(re.findall(r"^# ([a-z_]+ = .*)$", text, re.MULTILINE))
    values = live.read_config_file(Setting("--config", str(EXAMPLE)))
    assert values == {
        "WATERFLOW_KAFKA_TOPIC": READINGS_TOPIC,
        "WATERFLOW_KAFKA_QUARANTINE_TOPIC": QUARANTINE_TOPIC,
        "WATERFLOW_KAFKA_ANOMALIES_TOPIC": ANOMALIES_TOPIC,
        "WATERFLOW_KAFKA_TAIL": "true",
        "WATERFLOW_KAFKA_POLL_MAX": "5000",
        "WATERFLOW_OUT": ".waterflow",
        "WATERFLOW_HOT_PREFIX": "water:",
        "WATERFLOW_COLD_LOAD_S": str(live.COLD_LOAD_S),
        "WATERFLOW_RETENTION_EVERY_H": str(DEFAULT_EVERY.total_seconds() / 3600),
        "WATERFLOW_TZ": Settings().tz,
        "WATERFLOW_LATENESS_S": str(Settings().allowed_lateness_s),
        "WATERFLOW_GATHER_MS": str(live.GATHER_MS),
        "WATERFLOW_MIN_TIMESTAMP": MIN_TIMESTAMP,
        "WATERFLOW_QUARANTINE_RAW_BYTES": str(QUARANTINE_RAW_BYTES),
        "WATERFLOW_SNAPSHOT_S": str(live.SNAPSHOT_S),
        "WATERFLOW_HEARTBEAT_S": "10.0",
        "WATERFLOW_LOG_FORMAT": "auto",
        "WATERFLOW_LOG_LEVEL": "INFO",
    }
    uncommented = tomllib.loads(commented)
    assert len(uncommented) == len(live.CONFIG_KEYS) - len(values)
    assert all(type(v) is live.CONFIG_KEYS[k] for k, v in uncommented.items())


def test_the_example_s_values_give_the_default_options(tmp_path):
    env = {"WATERFLOW_KAFKA_BROKERS": "k:9092", "WATERFLOW_OUT": str(tmp_path),
           "WATERFLOW_CONFIG": str(EXAMPLE)}
    live.apply_config_file(environ=env)
    from_file = live.options_from_env(env)
    plain = live.options_from_env({"WATERFLOW_KAFKA_BROKERS": "k:9092",
                                   "WATERFLOW_OUT": str(tmp_path)})
    assert from_file.kafka == plain.kafka and from_file.tiers == plain.tiers
    assert (from_file.snapshot_s, from_file.tail, from_file.poll_max) == (10, True, 5000)
    ignore = {"run_id", "started_us"}
    fields = [f for f in Settings.__dataclass_fields__ if f not in ignore]
    assert [getattr(from_file.settings, f) for f in fields] == [
        getattr(plain.settings, f) for f in fields
    ]


# -- precedence ---------------------------------------------------------------------------------


def test_file_values_reach_the_options_and_the_environment_wins(tmp_path):
    path = write(tmp_path, f'kafka_brokers = "k1:9092,k2:9092"\ngather_ms = 120\n'
                           f'tz = "UTC"\nkafka_tail = false\nout = "{tmp_path}"\n'
                           'heartbeat_s = 3\n')
    env = {"WATERFLOW_CONFIG": str(path), "WATERFLOW_GATHER_MS": "50", "WATERFLOW_TZ": " "}
    assert live.apply_config_file(environ=env) == path
    options = live.options_from_env(env)
    assert options.kafka.brokers == ("k1:9092", "k2:9092")
    assert options.settings.node_gather_ms == 50  # the variable wins
    assert options.settings.tz == "UTC"  # a blank variable is no value: the file's counts
    assert options.tail is False
    assert options.settings.ledger_interval_s == 3.0
    # the command line's options win over both
    assert live.options_from_env(env, WATERFLOW_GATHER_MS=7).settings.node_gather_ms == 7


def test_without_a_file_nothing_changes():
    env = {"WATERFLOW_TZ": "UTC"}
    assert live.apply_config_file(environ=env) is None
    assert env == {"WATERFLOW_TZ": "UTC"}


def test_run_names_a_bad_value_by_its_key_and_the_command_line_wins(capsys, tmp_path):
    path = write(tmp_path, 'kafka_brokers = "127.0.0.1:1"\ntz = "Mars/Olympus"\n')
    code, err = run_cli(capsys, "run", "--config", str(path))
    assert code == 2
    assert one_line(err) == (f"error: {path}: tz: unknown time zone 'Mars/Olympus' (give an "
                             "IANA name such as Europe/Rome or UTC)")
    # --tz wins over the file: every setting is right, the broker is the first thing refused
    code, err = run_cli(capsys, "run", "--config", str(path), "--tz", "UTC")
    assert code == 1
    assert one_line(err).startswith(f"error: {path}: kafka_brokers 127.0.0.1:1: no Kafka broker "
                                    "answered")


def test_the_environment_wins_over_the_file_in_a_run(capsys, monkeypatch, tmp_path):
    path = write(tmp_path, 'kafka_brokers = "127.0.0.1:1"\nsnapshot_s = 0\n')
    monkeypatch.setenv("WATERFLOW_CONFIG", str(path))
    code, err = run_cli(capsys, "run")
    assert (code, one_line(err)) == (
        2, f"error: {path}: snapshot_s: must be a whole number >= 1, got '0'"
    )
    monkeypatch.setenv("WATERFLOW_SNAPSHOT_S", "5")
    code, err = run_cli(capsys, "run")
    assert code == 1 and "no Kafka broker answered" in one_line(err)


def test_a_password_from_the_file_stays_out_of_the_message(capsys, tmp_path):
    path = write(tmp_path, f'kafka_brokers = "127.0.0.1:1"\nwarm_url = "{REFUSED_PG}"\n'
                           f'out = "{tmp_path / "out"}"\n')
    code, err = run_cli(capsys, "run", "--config", str(path))
    assert code == 1
    assert one_line(err).startswith(
        f"error: {path}: warm_url postgresql://writer:***@127.0.0.1:1/water: cannot connect"
    )
    assert not (tmp_path / "out").exists()


# -- a file that cannot work: one line, exit 2 ---------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    ("gathr_ms = 200\n", "{path}: unknown key 'gathr_ms' (did you mean gather_ms?)"),
    ("[kafka]\nbrokers = 'k:9092'\n", "{path}: unknown key 'kafka' (did you mean kafka_tail?)"),
    ("zzz = 1\n", "{path}: unknown key 'zzz' (see deploy/waterflow.example.toml)"),
    ('gather_ms = "200"\n', "{path}: gather_ms: must be a whole number, got '200'"),
    ("gather_ms = 2.5\n", "{path}: gather_ms: must be a whole number, got 2.5"),
    ("snapshot_s = true\n", "{path}: snapshot_s: must be a whole number, got True"),
    ("tz = 1\n", "{path}: tz: must be a string, got 1"),
    ('kafka_tail = "no"\n', "{path}: kafka_tail: must be true or false, got 'no'"),
    ('heartbeat_s = "10"\n', "{path}: heartbeat_s: must be a number, got '10'"),
    ("gather_ms = \n", "--config {path}: not valid TOML: Invalid value (at line 1, column 13)"),
])
def test_a_wrong_file_is_one_line_naming_the_key(capsys, tmp_path, text, problem):
    path = write(tmp_path, text)
    code, err = run_cli(capsys, "run", "--config", str(path), "--brokers", "127.0.0.1:1")
    assert code == 2
    assert one_line(err) == "error: " + problem.format(path=path)


def test_an_unreadable_file_is_named(capsys, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.toml"
    code, err = run_cli(capsys, "run", "--config", str(missing))
    assert (code, one_line(err)) == (
        2, f"error: --config: cannot read {missing}: No such file or directory"
    )
    monkeypatch.setenv("WATERFLOW_CONFIG", str(tmp_path))
    code, err = run_cli(capsys, "run")
    assert (code, one_line(err)) == (2, f"error: WATERFLOW_CONFIG: cannot read {tmp_path}: "
                                        "Is a directory")


def test_read_config_file_raises_config_errors(tmp_path):
    with pytest.raises(ConfigError) as caught:
        live.read_config_file(Setting("WATERFLOW_CONFIG", str(write(tmp_path, "out = []\n"))))
    assert caught.value.setting == f"{tmp_path / 'waterflow.toml'}: out"
    assert caught.value.exit_code == check.USAGE
