"""No ``waterflow`` command prints a password it was given, whatever goes wrong.

Every command that takes a URL (or a Kafka SASL password) runs as its own process with one
distinctive password in every secret place, against ports where nothing listens and against
the real local services made to refuse: PostgreSQL asked for a database that does not exist
(trust authentication takes any password, so the refusal is the database), Redis given a user
that does not exist (WRONGPASS; a bare password is accepted by a Redis without one) or a
database number out of range, a broker spoken to with SASL it does not offer. The password must
appear nowhere in stdout or stderr, and each refusal is one line naming the setting.

Two whole runs then go through with the password in the warm tier's URL (trust takes it) and a
hot tier that never answers: their output, their ``/metrics`` (label values included) and the
run's rows in ``water.ingest_runs`` must not hold it either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import PG_ADMIN_URL, REDIS_URL, fresh_database
from tests.integration.live_helpers import free_ports, publish_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "dataflows" / "samples" / "simulated_2districts_7days.csv"
SECRET = "S3cretPW-xyz"
_pg, _redis = urlsplit(PG_ADMIN_URL), urlsplit(REDIS_URL)
PG_HOST = f"{_pg.hostname}:{_pg.port or 5432}"
REDIS_HOST = f"{_redis.hostname}:{_redis.port or 6379}"

#: Nothing listens on port 1: refused by the kernel at once.
REFUSED_PG = f"postgresql://writer:{SECRET}@127.0.0.1:1/water"
REFUSED_REDIS = f"redis://:{SECRET}@127.0.0.1:1/0"
#: The real PostgreSQL, a database that is not there.
NO_DATABASE = (f"postgresql://{_pg.username or 'postgres'}:{SECRET}@{PG_HOST}"
               f"/no_such_db_{uuid.uuid4().hex[:8]}")
#: The real Redis: a user it does not know, a database number it does not have.
WRONG_USER = f"redis://nobody:{SECRET}@{REDIS_HOST}/0"
NO_REDIS_DB = f"redis://:{SECRET}@{REDIS_HOST}/999"
SASL = {
    "WATERFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "WATERFLOW_KAFKA_SASL_MECHANISM": "PLAIN",
    "WATERFLOW_KAFKA_SASL_USERNAME": "writer",
    "WATERFLOW_KAFKA_SASL_PASSWORD": SECRET,
}


def shown(url: str) -> str:
    """The URL as the messages show it: the password as ***."""
    return url.replace(SECRET, "***")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any WATERFLOW_* setting (nor a Rust backtrace), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WATERFLOW_") and k != "RUST_BACKTRACE"}
    env.update(extra)
    return env


def waterflow(*argv: str, env: dict[str, str], cwd: Path,
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dataflows.cli", *argv], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=timeout,
    )


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


# (command line, extra environment, exit code, the one line starts with, and contains).
# {brokers} is the test broker; {archive} a Parquet archive.
REFUSALS = [
    # replay: every tier URL, given as an option or a variable
    ("replay-warm-refused", ["replay", str(SAMPLE), "--warm", REFUSED_PG], {}, 1,
     f"error: --warm {shown(REFUSED_PG)}: cannot connect", "refused"),
    ("replay-warm-no-database", ["replay", str(SAMPLE), "--warm", NO_DATABASE], {}, 1,
     f"error: --warm {shown(NO_DATABASE)}: cannot connect", "does not exist"),
    ("replay-warm-env", ["replay", str(SAMPLE)], {"WATERFLOW_WARM_URL": NO_DATABASE}, 1,
     f"error: WATERFLOW_WARM_URL {shown(NO_DATABASE)}: cannot connect", "does not exist"),
    ("replay-hot-wrong-user", ["replay", str(SAMPLE), "--hot", WRONG_USER], {}, 1,
     f"error: --hot {shown(WRONG_USER)}: refused", "invalid username-password pair"),
    ("replay-hot-env-no-db", ["replay", str(SAMPLE)], {"WATERFLOW_HOT_URL": NO_REDIS_DB}, 1,
     f"error: WATERFLOW_HOT_URL {shown(NO_REDIS_DB)}: refused", "DB index is out of range"),
    ("replay-cold-userinfo", ["replay", str(SAMPLE), "--cold", f"bigquery://u:{SECRET}@p/d"], {},
     2, "error: --cold: cold tier 'bigquery://u:***@p/d'", "not a BigQuery project id"),
    # run: tiers behind an answering broker, then SASL against one that offers none
    ("run-warm-refused", ["run", "--brokers", "{brokers}", "--warm", REFUSED_PG], {}, 1,
     f"error: --warm {shown(REFUSED_PG)}: cannot connect", "refused"),
    ("run-warm-no-database", ["run", "--brokers", "{brokers}", "--warm", NO_DATABASE,
                              "--hot", REFUSED_REDIS], {}, 1,
     f"error: --warm {shown(NO_DATABASE)}: cannot connect", "does not exist"),
    ("run-hot-wrong-user", ["run", "--brokers", "{brokers}", "--hot", WRONG_USER], {}, 1,
     f"error: --hot {shown(WRONG_USER)}: refused", "invalid username-password pair"),
    ("run-sasl", ["run", "--brokers", "{brokers}"], SASL, 1,
     "error: --brokers {brokers}: no Kafka broker answered", "within"),
    ("run-sasl-refused", ["run", "--brokers", "127.0.0.1:1"], SASL, 1,
     "error: --brokers 127.0.0.1:1: no Kafka broker answered", "within"),
    # publish: SASL only (it takes no tier)
    ("publish-sasl", ["publish", "--brokers", "{brokers}", str(SAMPLE)], SASL, 1,
     "error: --brokers {brokers}: no Kafka broker answered", "within"),
    ("publish-sasl-refused", ["publish", "--brokers", "127.0.0.1:1", str(SAMPLE)], SASL, 1,
     "error: --brokers 127.0.0.1:1: no Kafka broker answered", "within"),
    # backfill: the warm tier it rebuilds, the archive it reads
    ("backfill-warm-refused", ["backfill", "--from", "{archive}", "--warm", REFUSED_PG], {}, 1,
     f"error: --warm {shown(REFUSED_PG)}: cannot connect", "refused"),
    ("backfill-warm-no-database", ["backfill", "--from", "{archive}", "--warm", NO_DATABASE], {}, 1,
     f"error: --warm {shown(NO_DATABASE)}: cannot connect", "does not exist"),
    ("backfill-from-userinfo", ["backfill", "--from", f"bigquery://u:{SECRET}@p/d",
                                "--warm", NO_DATABASE], {}, 2,
     "error: --from: cold tier 'bigquery://u:***@p/d'", "not a BigQuery project id"),
    # db migrate / retention
    ("migrate-refused", ["db", "migrate", "--warm", REFUSED_PG], {}, 1,
     f"error: --warm {shown(REFUSED_PG)}: cannot connect", "refused"),
    ("migrate-env-no-database", ["db", "migrate"], {"WATERFLOW_WARM_URL": NO_DATABASE}, 1,
     f"error: WATERFLOW_WARM_URL {shown(NO_DATABASE)}: cannot connect", "does not exist"),
    ("retention-refused", ["db", "retention", "--warm", REFUSED_PG], {}, 1,
     f"error: --warm {shown(REFUSED_PG)}: cannot connect", "refused"),
    ("retention-no-database", ["db", "retention", "--warm", NO_DATABASE, "--dry-run"], {}, 1,
     f"error: --warm {shown(NO_DATABASE)}: cannot connect", "does not exist"),
]


@pytest.mark.parametrize(("argv", "env", "code", "starts", "contains"),
                         [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_a_refusal_is_one_line_without_the_password(
    request, tmp_path, argv, env, code, starts, contains
):
    (tmp_path / "archive" / "readings").mkdir(parents=True)  # an (empty) Parquet archive
    fill = {"archive": str(tmp_path / "archive"), "brokers": ""}
    if "{brokers}" in argv or "{brokers}" in starts:  # the broker only for the cases using it
        fill["brokers"] = request.getfixturevalue("kafka_brokers")
    argv = [a.format(**fill) for a in argv]
    if argv[0] in ("replay", "backfill", "db"):
        argv += ["--out", str(tmp_path / "out")]  # no embedded service is started: refused first
    run = waterflow(*argv, env=clean_env(**env), cwd=tmp_path)
    assert_no_secret(run.stdout, run.stderr)
    assert (run.returncode, run.stdout) == (code, ""), run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(starts.format(**fill)), run.stderr
    assert contains in run.stderr
    assert not (tmp_path / "out").exists(), "refused before any embedded service started"


def replay_with_key(tmp_path: Path, key: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A replay into BigQuery with ``key`` as the service account (no emulator endpoint)."""
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    with fresh_database("waterflow_secrets") as warm:
        return waterflow(
            "replay", str(SAMPLE), "--quiet", "--warm", warm, "--hot", REFUSED_REDIS,
            "--cold", "bigquery://p/d", "--out", str(tmp_path / "out"),
            env=clean_env(GOOGLE_APPLICATION_CREDENTIALS=str(path)), cwd=tmp_path,
        )


def test_bad_bigquery_credentials_are_not_printed(tmp_path):
    """A service-account key whose every field is the secret: the run fails, the key is not shown.

    The client loads the key itself and cannot use it.
    """
    run = replay_with_key(tmp_path, {
        "type": "service_account", "project_id": "p", "private_key_id": SECRET,
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n",
        "client_email": f"{SECRET}@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    assert_no_secret(run.stdout, run.stderr)
    assert run.returncode != 0, run.stdout


def test_bad_bigquery_credentials_are_one_line_naming_the_setting(tmp_path):
    run = replay_with_key(tmp_path, {
        "type": "service_account", "project_id": "p", "private_key": "not a key",
        "client_email": "x@p.example", "token_uri": "https://oauth2.googleapis.com/token",
    })
    lines = [line for line in run.stderr.splitlines() if not line.startswith("warning: --hot")]
    assert len(lines) == 1 and lines[0].startswith("error: --cold bigquery://p/d"), run.stderr


# -- whole runs: output, /metrics and the warm tier's rows ---------------------------------------


def with_password(url: str) -> str:
    """``url`` (a trust-auth PostgreSQL URL) with SECRET as the password: still accepted."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{parts.username or 'postgres'}:{SECRET}@{host}").geturl()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def label_values(text: str) -> set[str]:
    return {value for family in text_string_to_metric_families(text)
            for sample in family.samples for value in sample.labels.values()}


def readings_total(text: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text)
               if family.name == "waterflow_readings" for s in family.samples
               if s.name == "waterflow_readings_total")


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while True:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, f"ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s:g} s"
        time.sleep(0.1)


def try_scrape(port: int) -> str | None:
    try:
        return scrape(port)
    except OSError:
        return None


def assert_no_secret_in_runs(warm: str) -> None:
    with psycopg.connect(warm, connect_timeout=5) as conn:
        rows = conn.execute("SELECT * FROM water.ingest_runs").fetchall()
    assert rows
    assert_no_secret(repr(rows))


def test_a_replay_shows_no_password_in_output_metrics_or_tables(tmp_path):
    """Warm URL with the password (trust takes it), a hot tier that never answers, /metrics."""
    (port,) = free_ports(1)
    log, out = tmp_path / "stderr.log", tmp_path / "stdout.log"
    with fresh_database("waterflow_secrets") as db:
        warm = with_password(db)
        cmd = [sys.executable, "-m", "dataflows.cli", "replay", str(SAMPLE), "--quiet",
               "--warm", warm, "--hot", REFUSED_REDIS, "--cold", str(tmp_path / "cold"),
               "--out", str(tmp_path / "out"), "--metrics-port", str(port),
               "--metrics-linger", "300"]
        with log.open("w") as err, out.open("w") as std:
            proc = subprocess.Popen(cmd, env=clean_env(), cwd=tmp_path, stdout=std, stderr=err)
        try:
            # Lingering: the summary is printed, every metric has its final value.
            wait_for(lambda: "serving metrics for" in log.read_text(), "linger", proc, log)
            text = scrape(port)
        finally:
            proc.terminate()  # only ours, by its handle; the linger is a plain sleep
            proc.wait(timeout=30)
        assert_no_secret(out.read_text(), log.read_text(), text)
        assert not any(SECRET in v for v in label_values(text))
        assert readings_total(text) == 23_991  # the scrape saw the whole run
        assert 'waterflow_sink_errors_total{tier="hot"}' in text  # the refused tier was counted
        assert f"warm: {shown(warm)} (schema water)" in out.read_text()
        assert f"hot:  {shown(REFUSED_REDIS)}" in out.read_text()
        assert log.read_text().startswith(f"warning: --hot {shown(REFUSED_REDIS)}: not answering")
        assert_no_secret_in_runs(db)


def test_a_live_run_shows_no_password_in_output_metrics_or_tables(tmp_path, kafka_brokers):
    """``waterflow run`` from a topic with the same settings, stopped by SIGTERM once it is done."""
    topic = publish_file(_as_jsonl(tmp_path), kafka_brokers, partitions=1)
    (port,) = free_ports(1)
    log = tmp_path / "run.log"
    with fresh_database("waterflow_secrets") as db:
        warm = with_password(db)
        cmd = [sys.executable, "-m", "dataflows.cli", "run", "--brokers", kafka_brokers,
               "--topic", topic, "--warm", warm, "--hot", REFUSED_REDIS,
               "--cold", str(tmp_path / "cold"), "--out", str(tmp_path / "out"),
               "--metrics-port", str(port)]
        with log.open("w") as both:
            proc = subprocess.Popen(cmd, env=clean_env(), cwd=tmp_path, stdout=both,
                                    stderr=both)
        try:
            text = wait_for(lambda: (t := try_scrape(port)) and readings_total(t) >= 23_991 and t,
                            "every reading counted", proc, log)
            proc.send_signal(signal.SIGTERM)  # a graceful stop (cli_live)
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        assert_no_secret(log.read_text(), text)
        assert not any(SECRET in v for v in label_values(text))
        assert f"--hot {shown(REFUSED_REDIS)}: not answering" in log.read_text()
        assert_no_secret_in_runs(db)


def _as_jsonl(folder: Path) -> Path:
    """The sample's readings as the canonical JSON lines ``waterflow publish`` sends."""
    from connectors.kafka_publish import file_messages
    from dataflows.settings import Settings

    path = folder / "sample.jsonl"
    with path.open("wb") as f:
        for message in file_messages([SAMPLE], Settings()):
            f.write(message.value + b"\n")
    return path
