"""Publish files of any supported format to ``water.readings`` as canonical JSON messages.

For live demos, load tests and replays through Kafka (``waterflow publish``). Each accepted
reading of the file becomes one message: key = node_id, value = the JSON object of FORMATS.md
section 4 (``timestamp`` ISO-8601 UTC with offset, only the measured fields). A line the reader
rejected whole is published as its raw text, so the live flow dead-letters it too; a single
value a reader removed from a reading (a bad cell of a wide report) is left out of the message.

Pacing: ``rate`` messages per second, or ``speed`` times the event-time pace of the file (x60:
an hour of readings a minute), or as fast as the broker takes them. Readings are published in
file order, so per node (one key, one partition) they arrive in the order the file has them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from connectors.formats import detect_format, read_path
from connectors.kafka import KafkaConfig
from dataflows.model import MEASUREMENTS, ParsedChunk
from dataflows.settings import Settings

_EPOCH = np.datetime64(0, "us")
_EPOCH_DT = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Message:
    """One message to publish, with its event time (µs UTC; None for a rejected line)."""

    key: str | None
    event_us: int | None
    value: bytes


def chunk_messages(chunk: ParsedChunk) -> Iterator[Message]:
    """The messages of one chunk, in the chunk's line order."""
    out: list[tuple[int, Message]] = []
    for batch in chunk.batches:
        stamps = np.datetime_as_string(_EPOCH + batch.ts.astype("timedelta64[us]"), unit="us")
        for i in range(len(batch)):
            obj: dict[str, object] = {"node_id": batch.node_id, "timestamp": f"{stamps[i]}Z"}
            row = batch.values[i]
            for j, name in enumerate(MEASUREMENTS):
                if not math.isnan(row[j]):
                    obj[name] = float(row[j])
            value = json.dumps(obj, separators=(",", ":")).encode()
            out.append((int(batch.line[i]), Message(batch.node_id, int(batch.ts[i]), value)))
    for q in chunk.quarantined:
        if q.whole_reading:
            out.append((q.line, Message(q.node_id, q.ts, q.raw.encode("utf-8", "replace"))))
    out.sort(key=lambda lm: lm[0])  # the file's order (stable for lines of equal number)
    return (m for _, m in out)


def json_line_messages(path: Path) -> Iterator[Message]:
    """A JSON-lines file as it is: each non-blank line is one message, byte for byte.

    A capture of Kafka traffic goes back on the topic unchanged, so the live flow sees the very
    values (and dead-letters the very lines) a replay of the file does. The key is the line's
    ``node_id`` when it has one.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f):
            line = raw.rstrip(b"\r\n")
            if number == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM is not part of the value
            if line.strip():
                yield Message(*_key_and_time(line), value=line)


def _key_and_time(line: bytes) -> tuple[str | None, int | None]:
    try:
        obj = json.loads(line)
        node, stamp = obj.get("node_id"), datetime.fromisoformat(obj["timestamp"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, None
    key = node if isinstance(node, str) else None
    if stamp.tzinfo is None:
        return key, None
    return key, (stamp - _EPOCH_DT) // timedelta(microseconds=1)


def file_messages(
    paths: Iterable[Path], settings: Settings, fmt: str = "auto"
) -> Iterator[Message]:
    """Every message of the files, file after file (JSON lines as they are, see above)."""
    for path in paths:
        if fmt == "json" or (fmt == "auto" and detect_format(path, _head(path)) == "json"):
            yield from json_line_messages(path)
            continue
        for chunk in read_path(path, settings, fmt):
            yield from chunk_messages(chunk)


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(64 * 1024)


@dataclass
class Pacer:
    """Sleeps so messages go out at ``rate`` per second or ``speed`` x their event-time pace."""

    rate: float | None = None
    speed: float | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    _start: float | None = field(default=None, init=False)
    _first_event: int | None = field(default=None, init=False)
    _sent: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rate is not None and self.speed is not None:
            raise ValueError("give a rate or a speed, not both")
        for name, v in (("rate", self.rate), ("speed", self.speed)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")

    def wait(self, event_us: int | None) -> None:
        """Before sending the next message."""
        now = self.clock()
        if self._start is None:
            self._start = now
        due = self._start
        if self.rate is not None:
            due += self._sent / self.rate
        elif self.speed is not None and event_us is not None:
            if self._first_event is None:
                self._first_event = event_us
            due += (event_us - self._first_event) / 1e6 / self.speed
        self._sent += 1
        if due > now:
            self.sleep(due - now)


@dataclass
class PublishReport:
    """What a publish sent."""

    messages: int = 0
    rejected_lines: int = 0
    seconds: float = 0.0


def publish(
    messages: Iterable[Message],
    config: KafkaConfig,
    pacer: Pacer | None = None,
    produce_timeout_s: float = 60.0,
) -> PublishReport:
    """Send the messages to ``config.topic``; return once the broker acknowledged all."""
    from confluent_kafka import KafkaException, Producer

    failures: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer(
        {**config.client_config(), "enable.idempotence": "true", "linger.ms": "5"}
    )
    report = PublishReport()
    started = time.monotonic()
    for m in messages:
        if pacer is not None:
            pacer.wait(m.event_us)
        while True:
            try:
                producer.produce(config.topic, key=m.key, value=m.value, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
            except KafkaException as exc:
                raise RuntimeError(f"publishing to {config.describe()} failed: {exc}") from exc
        producer.poll(0)
        report.messages += 1
        report.rejected_lines += m.event_us is None
    left = producer.flush(produce_timeout_s)
    if left or failures:
        raise RuntimeError(
            f"publishing to {config.describe()}: {left} message(s) unsent after "
            f"{produce_timeout_s:g} s, {len(failures)} failed"
            + (f" (first: {failures[0]})" if failures else "")
        )
    report.seconds = time.monotonic() - started
    return report
