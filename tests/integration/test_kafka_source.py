"""The Kafka source alone, against the Tansu broker: what a poll turns messages into."""

from __future__ import annotations

import time
import uuid

import pytest

from connectors.kafka import KafkaConfig, ReadingsSource, ensure_topic
from dataflows.settings import Settings

pytestmark = pytest.mark.integration


def test_a_huge_dead_letter_keeps_only_the_configured_share_of_its_text(kafka_brokers):
    from confluent_kafka import Producer

    topic = f"water.readings.test-{uuid.uuid4().hex[:10]}"
    config = KafkaConfig(brokers=(kafka_brokers,), topic=topic)
    assert ensure_topic(config, topic, 1)
    producer = Producer(config.client_config())
    producer.produce(topic, key=b"n1", value=b"{not json " + b"x" * 100_000)
    producer.produce(topic, key=b"n1", value=b'{"node_id": "n1", "timestamp": '
                     b'"2024-03-05T10:00:00+00:00", "pressure": 3.1}')
    assert producer.flush(30) == 0
    source = ReadingsSource(config, Settings(quarantine_raw_bytes=200), tail=False)
    part = source.build_part("read", source.list_parts()[0], None)
    chunks, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunks += part.next_batch()
        except StopIteration:
            break
    part.close()
    quarantined = [q for c in chunks for q in c.quarantined]
    assert [q.reason for q in quarantined] == ["parse_error"]
    raw = quarantined[0].raw
    assert raw.startswith("{not json xxx") and "[cut:" in raw
    assert len(raw.encode()) < 300
    assert sum(len(b) for c in chunks for b in c.batches) == 1
