"""The WATERFLOW_KAFKA_* security settings take effect against the test's broker.

The broker the test command starts (Tansu 0.6.0) listens in plaintext without SASL. It cannot
stand in for a broker that requires SASL or TLS here: its ``--cert`` and ``--key`` options
exclude each other (no TLS listener can be configured), and with ``--authentication`` a SCRAM
user can only be created through an already authenticated connection, while its only storage
engines in this build are memory:// and s3:// (no way to seed a user out of band). What is
tested instead: the same plaintext broker answers a client without security settings, and
refuses one that WATERFLOW_KAFKA_SECURITY_PROTOCOL (SSL, or SASL_PLAINTEXT with a mechanism
and credentials) turns to TLS or SASL, in every client the flows build (the configuration
check's admin client, topic creation, the consumer's partition listing), with the password
never shown. tests/unit/test_kafka_security.py checks the consumer and producer
configurations and that librdkafka accepts them.
"""

from __future__ import annotations

import uuid

import pytest

from connectors.kafka import KafkaConfig, ReadingsSource, ensure_topic
from connectors.probe import probe_kafka
from dataflows.config_check import UNREACHABLE, ConfigError, Setting, kafka, reach_kafka
from dataflows.settings import Settings

pytestmark = pytest.mark.integration

SASL = {
    "WATERFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "WATERFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    "WATERFLOW_KAFKA_SASL_USERNAME": "waterflow",
    "WATERFLOW_KAFKA_SASL_PASSWORD": "s3cret-sasl",
}
TLS = {"WATERFLOW_KAFKA_SECURITY_PROTOCOL": "SSL"}


def test_without_security_settings_the_plaintext_broker_answers(kafka_brokers):
    assert probe_kafka(KafkaConfig.from_env(kafka_brokers, environ={})) is None


@pytest.mark.parametrize("env", [SASL, TLS], ids=["sasl", "tls"])
def test_security_settings_reach_every_client(kafka_brokers, env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # the check `waterflow run` makes first: one line, exit 1, no password
    with pytest.raises(ConfigError) as info:
        reach_kafka(Setting("--brokers", kafka_brokers),
                    kafka(Setting("--brokers", kafka_brokers)))
    assert info.value.exit_code == UNREACHABLE and "\n" not in str(info.value)
    assert "no Kafka broker answered" in str(info.value)
    config = KafkaConfig.from_env(kafka_brokers)
    assert config.client["security.protocol"] == env["WATERFLOW_KAFKA_SECURITY_PROTOCOL"]
    topic = f"waterflow-test-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match=f"cannot create topic '{topic}'") as created:
        ensure_topic(config, topic, 1, timeout_s=3)
    source = ReadingsSource(config, Settings(), list_timeout_s=3)
    with pytest.raises(RuntimeError, match="cannot list the partitions") as listed:
        source.list_parts()
    for message in (str(created.value), str(listed.value)):
        assert f"security.protocol={env['WATERFLOW_KAFKA_SECURITY_PROTOCOL']}" in message
        assert "s3cret" not in message
