"""Kafka: the live source of readings, and the dead-letter and anomaly topics.

``ReadingsSource`` is Bytewax's own ``KafkaSource`` (``bytewax.connectors.kafka``) with each
poll's messages parsed into one ``ParsedChunk``, so the flow after it is the very flow a replay
of files runs. Messages are JSON values (FORMATS.md section 4); what cannot become a reading is a
whole-reading quarantine record whose ``source`` is ``topic/partition`` and whose ``line`` is
the offset, so a dead letter can always be found again on the topic.

Unit of parallelism: the Kafka partition (Bytewax shares partitions among all workers of all
processes). Delivery guarantee: a partition's snapshot is the offset after the last message it
emitted, kept only in Bytewax's recovery store (no consumer group): on resume the messages
since the last snapshot are read again (at-least-once), made exactly-once in effect by the
idempotent tiers. Without recovery a restart reads the topic from the beginning.

``KafkaTopicsWriter`` is a tier like the others: ``quarantine`` rows go to ``water.quarantine``
(value = the raw record, headers = reason, source, offset and the quarantine id) and
``anomalies`` rows to ``water.anomalies`` (key = node_id, value = the event as JSON). Delivery
there is at-least-once: a consumer deduplicates on the ``id`` header / ``anomaly_id`` (the same
deterministic ids as the warm tier's keys).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import REGISTRY as BYTEWAX_REGISTRY

from connectors import metrics
from connectors.formats._common import LocalTime
from connectors.formats.jsonmsg import parse_json_values
from dataflows.model import ParsedChunk
from dataflows.settings import Settings
from dataflows.tables import TableRows

READINGS_TOPIC = "water.readings"
QUARANTINE_TOPIC = "water.quarantine"
ANOMALIES_TOPIC = "water.anomalies"
#: Seconds to wait for the brokers' metadata when a flow starts.
LIST_TIMEOUT_S = 30.0
#: Where the Kafka clients' own messages go (KafkaConfig.client_config).
LIBRDKAFKA = logging.getLogger("librdkafka")

#: ``WATERFLOW_KAFKA_<NAME>`` -> librdkafka property, for brokers that need SASL or TLS.
#: (Property names, not passwords: the values come from the environment at run time.)
SECURITY_ENV = {
    "SECURITY_PROTOCOL": "security.protocol",
    "SASL_MECHANISM": "sasl.mechanism",
    "SASL_USERNAME": "sasl.username",
    "SASL_PASSWORD": "sasl.password",  # nosec B105
    "SSL_CA_LOCATION": "ssl.ca.location",
    "SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "SSL_KEY_LOCATION": "ssl.key.location",
    "SSL_KEY_PASSWORD": "ssl.key.password",  # nosec B105
}
_SECRET_PROPERTIES = {"sasl.password", "ssl.key.password"}


@dataclass(frozen=True)
class KafkaConfig:
    """Where the broker is and how to talk to it; ``client`` holds librdkafka properties."""

    brokers: tuple[str, ...]
    topic: str = READINGS_TOPIC
    quarantine_topic: str = QUARANTINE_TOPIC
    anomalies_topic: str = ANOMALIES_TOPIC
    client: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.brokers or not all(b.strip() for b in self.brokers):
            raise ValueError(
                f"Kafka brokers must be host:port[,host:port...], got {','.join(self.brokers)!r}"
            )

    @staticmethod
    def from_env(
        brokers: str | None = None,
        topic: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KafkaConfig:
        """Arguments first, then the ``WATERFLOW_KAFKA_*`` variables.

        ``BROKERS``, ``TOPIC``, ``QUARANTINE_TOPIC``, ``ANOMALIES_TOPIC`` and the security
        settings of ``SECURITY_ENV``.
        """
        env = os.environ if environ is None else environ
        listed = brokers or env.get("WATERFLOW_KAFKA_BROKERS", "")
        if not listed.strip():
            raise ValueError("no Kafka broker: set WATERFLOW_KAFKA_BROKERS (host:port,...)")
        client = {
            prop: env[f"WATERFLOW_KAFKA_{name}"]
            for name, prop in SECURITY_ENV.items()
            if env.get(f"WATERFLOW_KAFKA_{name}")
        }
        return KafkaConfig(
            brokers=tuple(b.strip() for b in listed.split(",")),
            topic=topic or env.get("WATERFLOW_KAFKA_TOPIC") or READINGS_TOPIC,
            quarantine_topic=env.get("WATERFLOW_KAFKA_QUARANTINE_TOPIC") or QUARANTINE_TOPIC,
            anomalies_topic=env.get("WATERFLOW_KAFKA_ANOMALIES_TOPIC") or ANOMALIES_TOPIC,
            client=client,
        )

    def client_config(self) -> dict[str, Any]:
        """Librdkafka properties shared by consumers, producers and the admin client.

        With them a Python logger: librdkafka's own messages (``%4|...|CONFWARN|...``) become
        log records like the rest (JSON lines), instead of lines written straight to stderr.
        """
        return {"bootstrap.servers": ",".join(self.brokers), **self.client, "logger": LIBRDKAFKA}

    def describe(self) -> str:
        """The brokers and security settings, with no secret in them (for logs)."""
        shown = {k: ("***" if k in _SECRET_PROPERTIES else v) for k, v in self.client.items()}
        extra = "".join(f" {k}={v}" for k, v in sorted(shown.items()))
        return f"{','.join(self.brokers)} topic {self.topic}{extra}"


class _ReadingsPartition(StatefulSourcePartition[ParsedChunk, int | None]):
    def __init__(
        self,
        inner: StatefulSourcePartition,
        for_part: str,
        settings: Settings,
        step_id: str,
        stop: threading.Event | None,
    ) -> None:
        self._inner = inner
        self._stop = stop
        idx, topic = for_part.split("-", 1)
        self._source = f"{topic}/{idx}"
        self._lag_labels = {"step_id": step_id, "topic": topic, "partition": idx}
        self._lag = metrics.KAFKA_CONSUMER_LAG.labels(topic, idx)
        self._local = LocalTime(settings.tz)
        self._seen: set[str] = set()
        self._raw_max = settings.quarantine_raw_bytes

    def next_batch(self) -> list[ParsedChunk]:
        if self._stop is not None and self._stop.is_set():
            raise StopIteration  # a graceful stop: the flow drains as at the end of a topic
        messages = list(self._inner.next_batch())  # StopIteration at the end (tail=False)
        self._record_lag()
        if not messages:
            return []
        texts = [_text(m) for m in messages]
        offsets = np.fromiter((m.msg.offset if _is_error(m) else m.offset for m in messages),
                              dtype=np.int64, count=len(messages))
        return [parse_json_values(texts, offsets, self._source, self._local, self._seen,
                                  self._raw_max)]

    def _record_lag(self) -> None:
        # librdkafka's statistics know the partition's end offset (Tansu's ListOffsets answer
        # does not); Bytewax's own partition turns them into this gauge every second.
        lag = BYTEWAX_REGISTRY.get_sample_value("bytewax_kafka_consumer_lag", self._lag_labels)
        if lag is not None:
            self._lag.set(max(lag, 0.0))

    def snapshot(self) -> int | None:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


def _is_error(message: Any) -> bool:
    return not isinstance(message, KafkaSourceMessage)


def _text(message: Any) -> str:
    # A consumer error on one message (raise_on_errors=False) becomes a parse error on it.
    value = None if _is_error(message) else message.value
    if value is None:
        return ""  # a tombstone or an error: quarantined as parse_error, with its offset
    return value.decode("utf-8", errors="replace")


class ReadingsSource(FixedPartitionedSource[ParsedChunk, int | None]):
    """Readings from a Kafka topic, one ``ParsedChunk`` per poll of a partition.

    ``tail=False`` stops at the end of every partition (a replay through Kafka); the default
    waits for new messages for ever. ``batch_size`` bounds the messages of one poll. Once
    ``stop`` is set every partition ends at its next poll, as at the end of the topic: the
    flow drains and returns, and each partition's snapshot is the offset it would have read
    next, so a run resumed from the recovery folder goes on from there. ``list_parts``
    gives up after ``list_timeout_s`` when no broker answers.
    """

    def __init__(
        self,
        config: KafkaConfig,
        settings: Settings,
        tail: bool = True,
        batch_size: int = 5000,
        fetch_wait_ms: int = 10,
        stop: threading.Event | None = None,
        list_timeout_s: float = LIST_TIMEOUT_S,
    ) -> None:
        self.config = config
        self._list_timeout_s = list_timeout_s
        self._settings = settings
        self._stop = stop
        # Short fetch waits: a poll returns what is there instead of waiting to fill up.
        client: dict[str, Any] = {
            **config.client, "fetch.wait.max.ms": str(fetch_wait_ms), "logger": LIBRDKAFKA
        }
        self._kafka = KafkaSource(
            list(config.brokers),
            [config.topic],
            tail=tail,
            add_config=client,
            batch_size=batch_size,
            raise_on_errors=True,
        )

    def list_parts(self) -> list[str]:
        from confluent_kafka.admin import AdminClient

        try:
            # Bytewax asks for the metadata without a timeout: a broker that does not answer
            # (down, or refusing our TLS/SASL settings) would hang the start for ever. Ask
            # once with a deadline first, the same question (auto-creation stays the broker's).
            AdminClient(self.config.client_config()).list_topics(
                self.config.topic, timeout=self._list_timeout_s
            )
            return self._kafka.list_parts()
        except Exception as exc:  # librdkafka's KafkaException: name the broker and topic
            raise RuntimeError(
                f"cannot list the partitions of {self.config.describe()}: {exc}"
            ) from exc

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _ReadingsPartition:
        inner = self._kafka.build_part(step_id, for_part, resume_state)
        return _ReadingsPartition(inner, for_part, self._settings, step_id, self._stop)


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot serialize {type(value).__name__}")


@dataclass
class KafkaTopicsWriter:
    """A tier writing dead letters and anomaly events to their topics (other tables ignored)."""

    config: KafkaConfig
    name: str = "stream"
    flush_timeout_s: float = 30.0
    _producer: Any = None
    _failures: list[str] = field(default_factory=list)

    def connect(self) -> None:
        """Create the producer (idempotent: no duplicates from its own retries) and the topics.

        Topics that do not exist yet are created with one partition: dead letters and events
        are few, and one partition keeps them in order.
        """
        from confluent_kafka import Producer

        for topic in (self.config.quarantine_topic, self.config.anomalies_topic):
            ensure_topic(self.config, topic, 1)

        self._producer = Producer(
            {**self.config.client_config(), "enable.idempotence": "true", "linger.ms": "5"}
        )

    def write(self, rows: TableRows) -> None:
        """Produce the rows of ``quarantine`` or ``anomalies``; return once all are acked."""
        if rows.table == "quarantine":
            self._produce_quarantine(rows.frame)
        elif rows.table == "anomalies":
            self._produce_anomalies(rows.frame)
        else:
            return
        self._flush()

    def _produce_quarantine(self, frame: pl.DataFrame) -> None:
        for row in frame.iter_rows(named=True):
            headers = [
                ("id", row["id"]),
                ("reason", row["reason"]),
                ("source", row["source"] or ""),
                ("offset", str(row["line"])),
                ("run_id", row["run_id"]),
            ]
            self._produce(
                self.config.quarantine_topic,
                row["node_id"],
                (row["raw"] or "").encode("utf-8"),
                [(k, v.encode("utf-8")) for k, v in headers],
            )

    def _produce_anomalies(self, frame: pl.DataFrame) -> None:
        for row in frame.iter_rows(named=True):
            value = json.dumps(row, default=_json_default).encode("utf-8")
            self._produce(self.config.anomalies_topic, row["node_id"], value, [])

    def _produce(self, topic: str, key: str | None, value: bytes, headers: list) -> None:
        assert self._producer is not None, "connect() first"
        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=self._delivered
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)

    def _delivered(self, err: object, _msg: object) -> None:
        if err is not None:
            self._failures.append(str(err))

    def _flush(self) -> None:
        left = self._producer.flush(self.flush_timeout_s)
        failures, self._failures = self._failures, []
        if left or failures:
            raise RuntimeError(
                f"stream tier: {left} message(s) to {self.config.describe()} not delivered "
                f"within {self.flush_timeout_s:g} s, {len(failures)} failed"
                + (f" (first: {failures[0]})" if failures else "")
            )

    def close(self) -> None:
        """Deliver what is queued, then drop the producer."""
        if self._producer is not None:
            self._flush()
            self._producer = None


def ensure_topic(
    config: KafkaConfig, topic: str, partitions: int, timeout_s: float = 30.0
) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists; True if created."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(config.client_config())
    try:
        if topic in admin.list_topics(timeout=timeout_s).topics:
            return False
        futures = admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=timeout_s)
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        if exc.args and getattr(exc.args[0], "code", lambda: None)() == (
            KafkaError.TOPIC_ALREADY_EXISTS
        ):
            return False  # another worker created it meanwhile
        raise RuntimeError(f"cannot create topic {topic!r} on {config.describe()}: {exc}") from exc
    return True
