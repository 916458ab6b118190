"""Pure row mapping of the storage tiers: no PostgreSQL, Redis or files needed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import polars as pl
import pytest

from connectors import hot_redis, metrics
from connectors.cold_parquet import archive_root, part_name, partition_files
from connectors.hot_redis import (
    TTL_S,
    HotBacklog,
    HotRedisWriter,
    anomalies_commands,
    compact_json,
    hot_commands,
    readings_commands,
    score,
)
from connectors.tiers import TierConfig
from connectors.warm_postgres import (
    copy_payload,
    dedupe_on_key,
    key_ranges,
    migration_files,
    overlap_sql,
    upsert_sql,
)
from dataflows.model import US_PER_HOUR, US_PER_S
from dataflows.tables import SCHEMAS, frame

T0 = 1_700_000_000 * US_PER_S  # 2023-11-14T22:13:20Z


def readings(**cols):
    return frame("readings", cols)


# ---------------------------------------------------------------- warm


def test_copy_payload_nulls_empty_strings_arrays_and_timestamps():
    rows = readings(
        node_id=["a", 'b,"x', ""],
        ts=[T0, T0 + 1, 0],
        flow_rate=[1.1, None, 0.1 + 0.2],
        flags=[["LATE", 'ST"UCK', "back\\slash"], [], None],
        source=["s", "", None],
    )
    records = list(csv.reader(io.StringIO(copy_payload(rows.frame).decode())))
    cols = list(SCHEMAS["readings"])
    first, second, third = (dict(zip(cols, r, strict=True)) for r in records)
    assert first["ts"] == "2023-11-14 22:13:20.000000+00:00"
    assert first["flow_rate"] == "1.1"
    assert first["flags"] == '{"LATE","ST\\"UCK","back\\\\slash"}'
    assert second["node_id"] == 'b,"x'
    assert second["flags"] == "{}"
    assert second["ts"].endswith(".000001+00:00")
    assert third["flow_rate"] == "0.30000000000000004"  # shortest round-trip form
    assert third["ts"] == "1970-01-01 00:00:00.000000+00:00"
    # NULL is an empty unquoted field; '' must be quoted to stay an empty string.
    raw = copy_payload(rows.frame).decode().splitlines()
    assert ',"",' in raw[1]  # source '' of the second row
    assert raw[2].endswith(",,,")  # null flags/score/source/run_id


def test_dedupe_on_key_keeps_last():
    rows = readings(node_id=["a", "a", "b"], ts=[T0, T0, T0], flow_rate=[1.0, 2.0, 3.0])
    out = dedupe_on_key("readings", rows.frame)
    assert out.height == 2
    assert out.filter(pl.col("node_id") == "a")["flow_rate"].to_list() == [2.0]


def test_upsert_sql_uses_key_and_keeps_known_node_values():
    text = upsert_sql("nodes", list(SCHEMAS["nodes"]), "_stage_nodes").as_string(None)
    assert 'INSERT INTO "water"."nodes"' in text
    assert 'ON CONFLICT ("node_id") DO UPDATE SET' in text
    for col in ("district", "lat", "lon"):
        assert f'COALESCE(EXCLUDED."{col}", "t"."{col}")' in text
    assert '"source" = EXCLUDED."source"' in text
    runs = upsert_sql("ingest_runs", list(SCHEMAS["ingest_runs"]), "s").as_string(None)
    assert "COALESCE" not in runs and 'ON CONFLICT ("run_id")' in runs
    key = upsert_sql("readings", list(SCHEMAS["readings"]), "s").as_string(None)
    assert 'ON CONFLICT ("node_id", "ts")' in key


def test_key_ranges_per_first_key_column_up_to_the_first_text_column():
    import datetime as dt

    rows = readings(node_id=["b", "a", "b", "a"], ts=[T0 + 9, T0 + 5, T0, T0 + 7])
    types, args = key_ranges("readings", rows.frame)
    assert types == ["text", "timestamptz", "timestamptz"]
    utc = dt.UTC
    at = [dt.datetime.fromtimestamp((T0 + d) / US_PER_S, utc) for d in (0, 5, 7, 9)]
    assert args == [["a", "b"], [at[1], at[0]], [at[2], at[3]]]
    text = overlap_sql("readings", types).as_string(None)
    assert 'FROM unnest(%s::text[], %s::timestamptz[], %s::timestamptz[])' in text
    assert 'ROW(t."ts") >= ROW(b."lo0") AND ROW(t."ts") <= ROW(b."hi0")' in text

    # forecasts: the range stops before ``model`` (text: the server's collation would decide)
    f = frame("forecasts", {"node_id": ["n", "n"], "issued_at": [T0, T0],
                            "target_ts": [T0 + 2, T0 + 1], "model": ["z", "a"]})
    types, args = key_ranges("forecasts", f.frame)
    assert types == ["text"] + ["timestamptz"] * 4
    assert [len(a) for a in args] == [1] * 5 and args[2][0] < args[4][0]  # target_ts lo < hi
    # a text second column: the first column alone; a one-column key: its values
    b = frame("district_balance", {"district": ["d2", "d1", "d2"], "period": ["day"] * 3,
                                   "period_start": [T0, T0, T0]})
    assert key_ranges("district_balance", b.frame) == (["text"], [["d1", "d2"]])
    assert "= ANY(%s::text[])" in overlap_sql("district_balance", ["text"]).as_string(None)
    nodes = frame("nodes", {"node_id": ["x", "y", "x"]})
    assert key_ranges("nodes", nodes.frame) == (["text"], [["x", "y"]])
    # never checked: kpi_15m (always upserted), a naive timestamp key
    kpi = frame("kpi_15m", {"node_id": ["x"], "window_start": [T0]})
    assert key_ranges("kpi_15m", kpi.frame) is None
    naive = rows.frame.with_columns(pl.col("ts").dt.replace_time_zone(None))
    assert key_ranges("readings", naive) is None


def test_migrations_are_numbered_in_order():
    versions = [v for v, _ in migration_files()]
    assert versions == sorted(versions)
    assert versions[0] == "0001_initial"
    assert all(v[:4].isdigit() for v in versions)


# ---------------------------------------------------------------- hot


def test_readings_commands_latest_trim_and_ttl():
    hours = [0, 20, 60]  # the first one is more than 48 h older than the newest
    rows = readings(
        node_id=["n1"] * 3 + ["n2"],
        ts=[T0 + h * US_PER_HOUR for h in hours] + [T0],
        pressure=[1.0, 2.0, 3.5, None],
        quality=[1.0, 1.0, 0.5, 0.9],
        anomaly_score=[0.1, 0.2, 0.9, None],
        flags=[[], ["SPIKE"], ["STUCK", "LATE"], None],
    )
    cmds = readings_commands(rows.frame, "p:")
    zadds = [c for c in cmds if c[0] == "ZPUT" and c[1] == "p:node:n1:readings"]
    assert len(zadds) == 1
    members = zadds[0][2:]
    # only the readings within 48 h of the newest are sent
    assert list(members[0::2]) == [score(T0 + 20 * US_PER_HOUR), score(T0 + 60 * US_PER_HOUR)]
    newest = json.loads(members[-1])
    assert newest == {
        "ts": "2023-11-17T10:13:20.000000Z",
        "pressure": 3.5,
        "quality": 0.5,
        "flags": ["STUCK", "LATE"],
        "anomaly_score": 0.9,
    }
    trim = [c for c in cmds if c[0] == "ZREMRANGEBYSCORE" and c[2] == "-inf"]
    assert (
        "ZREMRANGEBYSCORE",
        "p:node:n1:readings",
        "-inf",
        f"({score(T0 + 12 * US_PER_HOUR)}",
    ) in trim
    latest = next(c for c in cmds if c[0] == "LATEST" and c[1] == "p:node:n1:latest")
    fields = dict(zip(latest[4::2], latest[5::2], strict=True))
    assert latest[2] == TTL_S and latest[3] == score(T0 + 60 * US_PER_HOUR)
    assert fields["pressure"] == "3.5" and fields["anomaly_score"] == "0.9"
    assert fields["quality"] == "0.5" and json.loads(fields["flags"]) == ["STUCK", "LATE"]
    assert fields["ts_epoch"] == latest[3]
    last_seen = next(c for c in cmds if c[1] == "p:nodes:last_seen" and c[0] == "ZADD")
    assert last_seen[2] == "GT"
    assert dict(zip(last_seen[4::2], last_seen[3::2], strict=True)) == {
        "n1": score(T0 + 60 * US_PER_HOUR),
        "n2": score(T0),
    }
    expiring = {c[1] for c in cmds if c[0] == "EXPIRE"} | {c[1] for c in cmds if c[0] == "LATEST"}
    written = {c[1] for c in cmds}
    assert written <= expiring


def test_corrected_reading_replaces_member_at_same_score():
    cmds = readings_commands(readings(node_id=["n"], ts=[T0], flow_rate=[1.0]).frame, "p:")
    # ZPUT replaces whatever member sits at the reading's exact score
    assert cmds[0][:3] == ("ZPUT", "p:node:n:readings", score(T0))
    assert score(T0 + 1) == "1700000000.000001"


def test_compact_json_drops_null_and_nan():
    assert compact_json({"a": 1.0, "b": None, "c": float("nan"), "d": "é"}) == '{"a":1.0,"d":"é"}'


def test_anomalies_commands_open_and_ended():
    rows = frame(
        "anomalies",
        {
            "anomaly_id": ["x", "y"],
            "node_id": ["n", "n"],
            "started_at": [T0, T0],
            "ended_at": [None, T0 + US_PER_HOUR],
            "peak_score": [0.97, 0.8],
            "kind": ["spike", "leak"],
            "measurement": ["pressure", "flow_rate"],
        },
    )
    cmds = anomalies_commands(rows.frame, "p:")
    assert cmds[0][:3] == ("HSET", "p:anomalies:active", "x")
    assert json.loads(cmds[0][3])["peak_score"] == 0.97
    assert cmds[1] == ("HDEL", "p:anomalies:active", "y")
    assert cmds[2] == ("EXPIRE", "p:anomalies:active", TTL_S)


def test_hot_ignores_other_tables():
    assert hot_commands(frame("kpi_15m", {"node_id": ["n"], "window_start": [T0]})) == []
    assert hot_commands(readings(node_id=[], ts=[])) == []


def _hot_batch(node, hours, **cols):
    ts = [T0 + h * US_PER_HOUR for h in hours]
    return hot_commands(readings(node_id=[node] * len(hours), ts=ts, **cols), "p:")


def test_backlog_merges_batches_into_the_state_redis_would_hold():
    b = HotBacklog(max_readings=1000)
    b.add(_hot_batch("n1", [0, 1, 2], flow_rate=[1.0, 2.0, 3.0]))
    b.add(_hot_batch("n1", [1, 3], flow_rate=[2.5, 4.0]))  # a correction at h1, a new h3
    b.add(_hot_batch("n1", [-1], flow_rate=[0.5]))  # late: kept in the window, not latest
    b.add(_hot_batch("n2", [0], pressure=[3.0]))
    assert b.readings == 6
    members = {float(s): json.loads(m) for s, m in b.zsets["p:node:n1:readings"].items()}
    assert members[(T0 + US_PER_HOUR) / US_PER_S]["flow_rate"] == 2.5
    ts, args = b.latest["p:node:n1:latest"]
    assert ts == (T0 + 3 * US_PER_HOUR) / US_PER_S and "4.0" in args
    assert b.last_seen["p:nodes:last_seen"]["n1"] == ts
    assert set(b.expire) >= {"p:node:n1:readings", "p:nodes:last_seen"}

    cmds = b.pop_chunk()
    assert len(b) == 0 and b.readings == 0
    names = [c[0] for c in cmds]
    # every key written gets its TTL again, and last-seen comes after the latest hashes
    assert names.count("ZPUT") == 2 and names.count("LATEST") == 2
    assert names.index("ZADD") > max(i for i, n in enumerate(names) if n == "LATEST")
    assert {c[1] for c in cmds if c[0] == "EXPIRE"} == {
        "p:node:n1:readings",
        "p:node:n2:readings",
        "p:nodes:last_seen",
    }
    b.add(cmds)  # given back after a failed send: the same state again
    assert b.readings == 6 and b.latest["p:node:n1:latest"][0] == ts


def test_backlog_keeps_48h_per_node_and_anomalies_last_word():
    b = HotBacklog(max_readings=1000)
    b.add(_hot_batch("n1", [0, 1]))
    b.add(_hot_batch("n1", [60]))
    assert list(b.zsets["p:node:n1:readings"]) == [score(T0 + 60 * US_PER_HOUR)]
    assert b.readings == 1
    base = {"node_id": ["n"], "started_at": [T0]}
    b.add(hot_commands(frame("anomalies", {"anomaly_id": ["a"], **base}), "p:"))
    ended = {"anomaly_id": ["a"], **base, "ended_at": [T0 + US_PER_HOUR]}
    b.add(hot_commands(frame("anomalies", ended), "p:"))
    assert b.hashes["p:anomalies:active"] == {"a": None}
    assert ("HDEL", "p:anomalies:active", "a") in b.pop_chunk()


def test_backlog_over_budget_drops_oldest_readings_keeps_every_latest():
    dropped = hot_redis._DROPPED._value.get()
    b = HotBacklog(max_readings=10)
    for node in ("a", "b", "c"):
        b.add(_hot_batch(node, [0, 1, 2, 3, 4, 5], flow_rate=[1.0] * 6))
    assert b.readings <= 10 and b.readings + b.dropped == 18
    assert hot_redis._DROPPED._value.get() == dropped + b.dropped
    left = sorted(float(s) for z in b.zsets.values() for s in z)
    assert left[0] >= (T0 + 2 * US_PER_HOUR) / US_PER_S  # the oldest went first
    assert set(b.latest) == {f"p:node:{n}:latest" for n in "abc"}


def test_backlog_chunks_hold_whole_keys():
    b = HotBacklog(max_readings=1000)
    for node in ("a", "b", "c"):
        b.add(_hot_batch(node, [0, 1, 2]))
    first = b.pop_chunk(max_items=3)
    assert [c[0] for c in first] == ["ZPUT", "ZREMRANGEBYSCORE", "EXPIRE"]
    assert len(first[0]) == 2 + 6 and b.readings == 6
    with pytest.raises(ValueError, match="unexpected command 'SET'"):
        b.add([("SET", "k", "v")])


def test_writer_backs_off_without_blocking_when_redis_is_down():
    now = [100.0]
    errors = metrics.SINK_ERRORS.labels("hot")
    before = errors._value.get()
    # Port 1 refuses at once: the writer must count, keep the batch, and not raise.
    w = HotRedisWriter("redis://127.0.0.1:1/0", prefix="p:", clock=lambda: now[0])
    w.connect()
    assert w.behind and errors._value.get() == before + 1
    first_retry = w._retry_at
    assert 100.25 <= first_retry <= 100.5  # base 0.5 s, jitter down to half
    w.write(readings(node_id=["n"], ts=[T0], flow_rate=[1.0]))
    assert errors._value.get() == before + 1  # in backoff: no attempt, only the backlog
    assert w.backlog.readings == 1
    now[0] = first_retry
    w.write(readings(node_id=["n"], ts=[T0 + US_PER_HOUR], flow_rate=[2.0]))
    assert errors._value.get() == before + 2 and w.backlog.readings == 2
    assert w._retry_at - now[0] >= 0.5  # the delay doubled (1 s, jitter down to half)
    dropped = hot_redis._DROPPED._value.get()
    w.close()  # a last attempt; what is still waiting is counted as not cached
    assert errors._value.get() == before + 3
    assert hot_redis._DROPPED._value.get() == dropped + 2


def test_hot_docstring_examples():
    import doctest

    assert doctest.testmod(hot_redis).failed == 0


# ---------------------------------------------------------------- cold


def test_partition_files_by_utc_date_and_names_in_write_order():
    # 23:30 UTC is already the next day in Rome: the folder follows UTC.
    late = 1_700_004_600 * US_PER_S - 2 * 3600 * US_PER_S + 1800 * US_PER_S
    rows = readings(
        node_id=["b", "a", "a", "a"],
        ts=[T0, T0, late + 24 * US_PER_HOUR, T0],
        flow_rate=[1.0, 2.0, 3.0, 4.0],
        source=["f.csv"] * 4,
        flags=[["LATE"], None, [], None],
    )
    files = partition_files(rows.frame)
    assert list(files) == ["readings/date=2023-11-14", "readings/date=2023-11-15"]
    first = files["readings/date=2023-11-14"]
    assert first["node_id"].to_list() == ["a", "b"]  # sorted for clustering
    assert first["flow_rate"].to_list() == [4.0, 1.0]  # (a, T0) twice: the last one
    # Names sort in write order: by sequence, then a merge right after the file it took it from.
    names = [part_name(10, 0, "ff"), part_name(10, 1, "00"), part_name(9, 9, "ff")]
    assert sorted(names) == [names[2], names[0], names[1]]
    assert part_name(1, 0, "ab") == "part-00000000000000000001-0-ab.parquet"
    with pytest.raises(ValueError, match="got 10"):
        part_name(1, 10, "ab")


def test_archive_root_urls(tmp_path: Path):
    assert archive_root(tmp_path.as_uri()) == tmp_path
    assert archive_root(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="BigQuery dataset"):
        archive_root("bigquery://proj/ds")
    with pytest.raises(ValueError, match="s3://"):
        archive_root("s3://bucket/x")


# ---------------------------------------------------------------- config


def test_tier_config_validates_and_env_is_overridden(tmp_path: Path):
    env = {
        "WATERFLOW_WARM_URL": "postgresql://u@h/db",
        "WATERFLOW_HOT_URL": "rediss://:pw@h:6380/0",
        "WATERFLOW_COLD_URL": "",
    }
    cfg = TierConfig.from_env(tmp_path, hot="redis://x", environ=env)
    assert cfg.warm_url == "postgresql://u@h/db"
    assert cfg.hot_url == "redis://x"
    assert cfg.cold_url is None and cfg.embedded
    with pytest.raises(ValueError, match="warm tier URL 'mysql://x'"):
        TierConfig("mysql://x", None, None, tmp_path)
    with pytest.raises(ValueError, match="hot tier"):
        TierConfig(None, "http://x", None, tmp_path)
    assert TierConfig(None, None, "bigquery://p/d", tmp_path).cold_url == "bigquery://p/d"


def test_member_json_matches_compact_json():
    rows = readings(
        node_id=["n", "n"],
        ts=[T0, T0 + 1],
        flow_rate=[0.1 + 0.2, float("nan")],
        pressure=[1e22, None],
        flags=[["LATE", 'q"'], None],
        source=['é\n"x', None],
    )
    members = [c for c in readings_commands(rows.frame, "p:") if c[0] == "ZPUT"][0][3::2]
    expected = [
        compact_json({k: v for k, v in r.items() if k != "node_id"})
        for r in rows.frame.with_columns(
            pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        ).to_dicts()
    ]
    assert list(members) == expected
