"""The WATERFLOW_KAFKA_* security settings reach every librdkafka client the flows create.

Consumers (Bytewax's KafkaSource inside ReadingsSource), producers (KafkaTopicsWriter,
publish) and admin clients (probe, topic creation) all start from ``KafkaConfig.client``; a
real librdkafka Producer is built from the resulting configuration, so a misspelt property or
a value librdkafka rejects fails here, without a broker.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer

from connectors.kafka import LIBRDKAFKA, SECURITY_ENV, KafkaConfig, ReadingsSource
from connectors.probe import probe_kafka
from dataflows.config_check import USAGE, ConfigError, Setting, reach_kafka, secrets_in_env
from dataflows.settings import Settings

ENV = {
    "WATERFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "WATERFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "WATERFLOW_KAFKA_SASL_USERNAME": "waterflow",
    "WATERFLOW_KAFKA_SASL_PASSWORD": "s3cret-sasl",
}
EXPECTED = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "waterflow",
    "sasl.password": "s3cret-sasl",
}


@pytest.fixture
def ca_file(tmp_path) -> Path:
    """A throwaway CA certificate (librdkafka loads ssl.ca.location when the client is built)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
         "-out", "ca.pem", "-days", "1", "-subj", "/CN=waterflow test CA"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return tmp_path / "ca.pem"


def test_every_security_variable_becomes_its_librdkafka_property(ca_file):
    env = {**ENV, "WATERFLOW_KAFKA_SSL_CA_LOCATION": str(ca_file),
           "WATERFLOW_KAFKA_SSL_KEY_PASSWORD": ""}  # empty: not set
    config = KafkaConfig.from_env("k1:9093,k2:9093", environ=env)
    assert config.client_config() == {
        "bootstrap.servers": "k1:9093,k2:9093", **EXPECTED, "ssl.ca.location": str(ca_file),
        "logger": LIBRDKAFKA}
    assert set(SECURITY_ENV.values()) >= set(EXPECTED) | {"ssl.ca.location"}
    # librdkafka itself takes them (an unknown property or value would raise here)
    Producer({**config.client_config(), "socket.connection.setup.timeout.ms": 1000}).flush(0)


def test_a_value_librdkafka_rejects_fails_when_the_client_is_built():
    config = KafkaConfig.from_env(
        "k1:9093", environ={**ENV, "WATERFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-1024"})
    with pytest.raises(KafkaException, match="SCRAM-SHA-1024"):
        Producer(config.client_config())
    # the configuration check says so in one line instead of a traceback
    cause = probe_kafka(config)
    assert cause is not None and cause.startswith("invalid client setting: ")
    assert "SCRAM-SHA-1024" in cause and "\n" not in cause
    # ...a value to fix (exit 2), not a broker that did not answer (exit 1)
    with pytest.raises(ConfigError) as refused:
        reach_kafka(Setting("--brokers", "k1:9093"), config)
    assert refused.value.exit_code == USAGE
    assert str(refused.value).startswith("--brokers k1:9093: invalid client setting: ")


def test_the_consumer_of_readings_gets_them():
    config = KafkaConfig.from_env("k1:9093", environ=ENV)
    source = ReadingsSource(config, Settings())
    consumer_config = source._kafka._add_config  # Bytewax merges it into every Consumer
    assert {k: consumer_config[k] for k in EXPECTED} == EXPECTED


def test_secrets_stay_out_of_messages():
    config = KafkaConfig.from_env(
        "k1:9093", environ={**ENV, "WATERFLOW_KAFKA_SSL_KEY_PASSWORD": "s3cret-key"})
    shown = config.describe()
    assert "s3cret" not in shown
    assert "sasl.password=***" in shown and "ssl.key.password=***" in shown
    assert "sasl.username=waterflow" in shown and "security.protocol=SASL_SSL" in shown
    env = {**ENV, "WATERFLOW_KAFKA_SSL_KEY_PASSWORD": "s3cret-key"}
    assert secrets_in_env(env) >= {"s3cret-sasl", "s3cret-key"}
