"""Quix Streams doing the 15-minute aggregates from the Kafka topic `waterflow publish` filled.

Written as Quix Streams' documentation writes windowed aggregations: an ``Application`` reads
the topic (JSON values, the reading's own timestamp as event time), and a
``tumbling_window(15 min, grace 6 h).reduce(...).final()`` folds count/sum/sum of squares/min/
max of every measurement per node (the message key); an ``apply`` turns each closed window into
count/mean/min/max/std. Changelog topics are off (state only in the local RocksDB), which makes
it faster than its durable default. It stops once it has processed ``N`` messages (windows
still open then are not emitted). No validation, no scoring, no writes.
Run as a child of bench/compare.py: `python bench/quix_windows.py BROKERS TOPIC N STATE_DIR`.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timedelta

from per_item_bytewax import Stats, add, summarize
from quixstreams import Application

from dataflows.model import MEASUREMENTS


def event_ms(value: dict, headers: object, timestamp: int, kind: object) -> int:
    ts = datetime.fromisoformat(value["timestamp"].replace("Z", "+00:00"))
    return int(ts.timestamp() * 1000)


def fold(acc: Stats, value: dict) -> Stats:
    for m in MEASUREMENTS:
        x = value.get(m)
        if x is None:
            continue
        add(acc, m, float(x))
    return acc


def main() -> int:
    brokers, topic_name, wanted, state_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seen = [0]
    windows = [0]
    first = [0.0]  # when the first message was processed: the consumer group's join is slow

    def processed(topic: str, partition: int, offset: int) -> None:
        seen[0] += 1
        if seen[0] == 1:
            first[0] = time.perf_counter()
        if seen[0] >= wanted:
            app.stop()

    app = Application(
        broker_address=brokers, consumer_group=f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", state_dir=state_dir, use_changelog_topics=False,
        on_message_processed=processed, loglevel="WARNING",
    )
    topic = app.topic(topic_name, value_deserializer="json", key_deserializer="str",
                      timestamp_extractor=event_ms)
    # Tansu's topic description has no retention.ms, which Quix reads to configure window state.
    topic.broker_config.extra_config.setdefault("retention.ms", "-1")
    sdf = app.dataframe(topic)
    sdf = (
        sdf.tumbling_window(timedelta(minutes=15), grace_ms=timedelta(hours=6))
        .reduce(fold, lambda value: fold({}, value))
        .final()
    )

    def emitted(window: dict) -> dict:
        windows[0] += 1
        return {"start": window["start"], "stats": summarize(window["value"])}

    sdf = sdf.apply(emitted)
    t0 = time.perf_counter()
    app.run()
    end = time.perf_counter()
    print(json.dumps({"readings": seen[0], "windows": windows[0], "work_s": end - t0,
                      "after_first_message_s": end - first[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
