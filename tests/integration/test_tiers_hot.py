"""Hot tier against the real Redis: latest, 48 h window, last seen, active anomalies, TTLs."""

from __future__ import annotations

import json

import pytest

from connectors.hot_redis import TTL_S, HotRedisWriter
from dataflows.model import US_PER_HOUR, US_PER_S
from dataflows.tables import frame

pytestmark = pytest.mark.integration

T0 = 1_700_000_000 * US_PER_S


@pytest.fixture
def writer(redis_url, redis_prefix):
    w = HotRedisWriter(redis_url, prefix=redis_prefix)
    w.connect()
    yield w
    w.close()


def readings(node, hours, **cols):
    return frame(
        "readings",
        {"node_id": [node] * len(hours), "ts": [T0 + h * US_PER_HOUR for h in hours], **cols},
    )


def test_readings_window_latest_last_seen_and_ttl(writer, rdb, redis_prefix):
    p = redis_prefix
    writer.write(
        readings(
            "n1",
            [0, 1, 2],
            pressure=[3.0, 3.1, 3.2],
            quality=[1.0, 0.8, 0.7],
            anomaly_score=[0.1, 0.2, 0.3],
            flags=[[], ["SPIKE"], ["STUCK", "LATE"]],
        )
    )
    assert rdb.zcard(f"{p}node:n1:readings") == 3
    member, score = rdb.zrange(f"{p}node:n1:readings", -1, -1, withscores=True)[0]
    assert score == (T0 + 2 * US_PER_HOUR) / US_PER_S
    assert json.loads(member)["flags"] == ["STUCK", "LATE"]
    latest = rdb.hgetall(f"{p}node:n1:latest")
    assert latest["pressure"] == "3.2" and latest["quality"] == "0.7"
    assert latest["anomaly_score"] == "0.3" and latest["ts"] == "2023-11-15T00:13:20.000000Z"
    assert json.loads(latest["flags"]) == ["STUCK", "LATE"]
    assert rdb.zscore(f"{p}nodes:last_seen", "n1") == score

    # an older batch (late data) is kept in the window but does not replace latest/last_seen
    writer.write(readings("n1", [-1], pressure=[9.9]))
    assert rdb.zcard(f"{p}node:n1:readings") == 4
    assert rdb.hget(f"{p}node:n1:latest", "pressure") == "3.2"
    assert rdb.zscore(f"{p}nodes:last_seen", "n1") == score

    # 50 h later: everything older than 48 h before the newest reading is trimmed
    writer.write(readings("n1", [52], pressure=[4.0]))
    scores = [s for _, s in rdb.zrange(f"{p}node:n1:readings", 0, -1, withscores=True)]
    assert scores == [(T0 + h * US_PER_HOUR) / US_PER_S for h in (52,)]
    assert rdb.hget(f"{p}node:n1:latest", "pressure") == "4.0"
    # fields of the previous latest reading that the new one lacks are gone
    assert "quality" not in rdb.hgetall(f"{p}node:n1:latest")

    keys = list(rdb.scan_iter(match=f"{p}*"))
    assert sorted(keys) == sorted(
        [f"{p}node:n1:readings", f"{p}node:n1:latest", f"{p}nodes:last_seen", writer._marker]
    )
    for key in keys:
        assert 0 < rdb.ttl(key) <= TTL_S, key


def test_rewrite_is_idempotent_and_corrections_replace(writer, rdb, redis_prefix):
    key = f"{redis_prefix}node:n2:readings"
    rows = readings("n2", [0, 1], flow_rate=[1.0, 2.0])
    writer.write(rows)
    before = rdb.zrange(key, 0, -1, withscores=True)
    writer.write(rows)
    assert rdb.zrange(key, 0, -1, withscores=True) == before
    writer.write(readings("n2", [1], flow_rate=[2.5]))
    after = rdb.zrange(key, 0, -1, withscores=True)
    assert len(after) == 2 and json.loads(after[-1][0])["flow_rate"] == 2.5
    assert rdb.hget(f"{redis_prefix}node:n2:latest", "flow_rate") == "2.5"


def test_active_anomalies_open_and_close(writer, rdb, redis_prefix):
    key = f"{redis_prefix}anomalies:active"
    base = {"node_id": ["n1", "n1"], "started_at": [T0, T0], "kind": ["leak", "spike"]}
    writer.write(frame("anomalies", {"anomaly_id": ["a1", "a2"], **base}))
    assert set(rdb.hkeys(key)) == {"a1", "a2"}
    assert json.loads(rdb.hget(key, "a1"))["kind"] == "leak"
    assert 0 < rdb.ttl(key) <= TTL_S
    writer.write(
        frame(
            "anomalies",
            {
                "anomaly_id": ["a1"],
                **{k: v[:1] for k, v in base.items()},
                "ended_at": [T0 + US_PER_HOUR],
            },
        )
    )
    assert rdb.hkeys(key) == ["a2"]


def test_other_tables_leave_no_keys(writer, rdb, redis_prefix):
    writer.write(frame("kpi_15m", {"node_id": ["n"], "window_start": [T0], "n": [1]}))
    writer.write(frame("nodes", {"node_id": ["n"], "name": ["N"]}))
    assert list(rdb.scan_iter(match=f"{redis_prefix}*")) == []


def test_unreachable_redis_is_counted_not_raised(caplog):
    # The hot tier is a cache: an outage must not stop the flow (more in test_hot_outage.py).
    from connectors import metrics

    errors = metrics.SINK_ERRORS.labels("hot")
    before = errors._value.get()
    w = HotRedisWriter("redis://:secret@127.0.0.1:1/0")
    w.write(readings("n", [0], flow_rate=[1.0]))
    assert errors._value.get() == before + 1 and w.behind and w.backlog.readings == 1
    assert "redis://:***@127.0.0.1:1/0" in caplog.text and "secret" not in caplog.text
    w.close()


def test_zput_joined_or_pairwise_stores_the_same(writer, rdb, redis_prefix):
    # Many pairs go to the script as one newline-joined argument; a member holding a newline
    # (never one of ours: compact JSON) or a single pair goes as pairs. Same result either way.
    key = f"{redis_prefix}node:z:readings"
    writer._send([("ZPUT", key, "1.0", '{"a":1}', "2.5", '{"a":"é,\\"x\\""}', "3.0", "{}")])
    assert rdb.zrange(key, 0, -1, withscores=True) == [
        ('{"a":1}', 1.0), ('{"a":"é,\\"x\\""}', 2.5), ("{}", 3.0)]
    writer._send([("ZPUT", key, "2.5", "new", "4.0", "line\nbreak")])  # pairwise
    writer._send([("ZPUT", key, "1.0", "single")])
    assert rdb.zrange(key, 0, -1, withscores=True) == [
        ("single", 1.0), ("new", 2.5), ("{}", 3.0), ("line\nbreak", 4.0)]
    writer._send([("ZPUT", key, "3.0", "joined", "5.0", "again")])  # joined: replaces at 3.0
    assert rdb.zrangebyscore(key, 3.0, 5.0) == ["joined", "line\nbreak", "again"]
