"""Fixtures for tests against the real services the test command starts.

PostgreSQL and Redis are never optional here: when a test needs one that does not answer, the
test fails with a message saying what to start (nothing is skipped silently). Each session
creates its own database and each test its own Redis key prefix, and removes them afterwards.

Override the addresses with WATERFLOW_TEST_PG_URL (an admin connection, default
postgresql://postgres@127.0.0.1:5432/postgres) and WATERFLOW_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import sql

PG_ADMIN_URL = os.environ.get(
    "WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def url_with(url: str, *, dbname: str | None = None, user: str | None = None) -> str:
    """A postgresql:// URL with another database or user (the tiers take URLs only)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rsplit('@', 1)[-1]}"
    path = f"/{dbname}" if dbname is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


@contextmanager
def fresh_database(prefix: str = "waterflow_test") -> Iterator[str]:
    """A new, uniquely named, empty database (no migration applied); dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield url_with(PG_ADMIN_URL, dbname=name)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def bigquery_count(url: str) -> int:
    """Rows of ``raw_readings`` in the dataset of a ``bigquery://`` URL."""
    from connectors.cold_bigquery import make_client, parse_url

    target = parse_url(url)
    client = make_client(target)
    try:
        rows = client.query(f"SELECT count(*) AS n FROM `{target.table_id}`").result(timeout=60)
        return next(iter(rows))["n"]
    finally:
        client.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, uniquely named database on the real PostgreSQL; dropped at the end."""
    try:
        psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}\n"
            "Start it (make test does), e.g. "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            pytrace=False,
        )
    with fresh_database("waterflow_test") as url:
        yield url


@pytest.fixture(scope="session")
def migrated(pg_url: str) -> tuple[str, list[str]]:
    """The session database with every migration applied, and what the first run applied."""
    from connectors.warm_postgres import migrate

    return pg_url, migrate(pg_url)


@pytest.fixture
def warm_url(migrated: tuple[str, list[str]]) -> str:
    return migrated[0]


@pytest.fixture
def pg(warm_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the session database, for assertions."""
    with psycopg.connect(warm_url, autocommit=True, connect_timeout=5) as conn:
        yield conn


@pytest.fixture
def conninfo_as(warm_url: str):
    """The session database, connecting as another role (trust auth on the build machines)."""

    def as_role(user: str) -> str:
        return url_with(warm_url, user=user)

    return as_role


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis, checked once."""
    client = redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL}: {exc}\n"
            "Start it (make test does), e.g. redis-server --daemonize yes --bind 127.0.0.1 "
            '--port 6379 --save "" --appendonly no',
            pytrace=False,
        )
    finally:
        client.close()
    return REDIS_URL


@contextmanager
def hot_prefixes(redis_url: str, count: int) -> Iterator[list[str]]:
    """Key prefixes of this test alone; their keys are deleted afterwards."""
    prefixes = [f"water:test-{uuid.uuid4().hex[:12]}:" for _ in range(count)]
    try:
        yield prefixes
    finally:
        client = redis.from_url(redis_url)
        try:
            for prefix in prefixes:
                keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
                if keys:
                    client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    with hot_prefixes(redis_url, 1) as (prefix,):
        yield prefix


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A client for assertions, decoding replies to str."""
    client = redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


BIGQUERY_ENDPOINT = os.environ.get("WATERFLOW_TEST_BIGQUERY_ENDPOINT", "")


@pytest.fixture(scope="session")
def bigquery_endpoint() -> Iterator[str]:
    """The local-bigquery emulator the test command started; the cold tier is pointed at it."""
    if not BIGQUERY_ENDPOINT:
        pytest.fail(
            "WATERFLOW_TEST_BIGQUERY_ENDPOINT is not set: start the BigQuery emulator with "
            "`bash deploy/local/bigquery-emulator.sh start` and export the endpoint it prints "
            "(make test / deploy/local/run-tests.sh do both)",
            pytrace=False,
        )
    from google.api_core.exceptions import GoogleAPIError

    from connectors.cold_bigquery import ENDPOINT_ENV, BigQueryTarget, make_client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENDPOINT_ENV, BIGQUERY_ENDPOINT)
        client = make_client(BigQueryTarget("local", "x"))
        try:
            list(client.list_datasets(timeout=10))
        except (GoogleAPIError, OSError) as exc:
            pytest.fail(
                f"the BigQuery emulator does not answer at {BIGQUERY_ENDPOINT}: {exc}",
                pytrace=False,
            )
        finally:
            client.close()
        yield BIGQUERY_ENDPOINT


@pytest.fixture
def bigquery_url(bigquery_endpoint: str) -> Iterator[str]:
    """``bigquery://local/<unique dataset>``; the dataset is deleted afterwards."""
    from connectors.cold_bigquery import BigQueryTarget, make_client

    dataset = f"waterflow_test_{uuid.uuid4().hex[:12]}"
    yield f"bigquery://local/{dataset}"
    client = make_client(BigQueryTarget("local", dataset))
    try:
        client.delete_dataset(dataset, delete_contents=True, not_found_ok=True, timeout=30)
    finally:
        client.close()


KAFKA_BROKERS = os.environ.get("WATERFLOW_TEST_KAFKA_BROKERS", "")


@pytest.fixture(scope="session")
def kafka_brokers() -> str:
    """The Kafka-protocol broker (Tansu) the test command started; tests use topics of their own."""
    if not KAFKA_BROKERS:
        pytest.fail(
            "WATERFLOW_TEST_KAFKA_BROKERS is not set: start a broker with "
            "`bash deploy/local/kafka.sh start` and export the host:port it prints "
            "(make test / deploy/local/run-tests.sh do both)",
            pytrace=False,
        )
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": KAFKA_BROKERS}).list_topics(timeout=10)
    except Exception as exc:  # librdkafka's KafkaException
        pytest.fail(f"the Kafka broker does not answer at {KAFKA_BROKERS}: {exc}", pytrace=False)
    return KAFKA_BROKERS
