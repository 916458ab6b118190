"""Hot tier: the latest state per node in Redis, for dashboards and alerts that need it now.

Keys (``p`` is the prefix, ``water:`` by default):

- ``{p}node:{id}:readings``: sorted set, score = event time in epoch seconds, member = compact
  JSON of the reading; trimmed to the last 48 h of event time of the node.
- ``{p}node:{id}:latest``: hash of the newest reading (measurements, quality, anomaly_score,
  flags, ts, ts_epoch); replaced only by a reading at least as new (checked in Redis by a
  Lua script, so concurrent or late writers cannot move it back in time).
- ``{p}nodes:last_seen``: sorted set, node id -> newest event time (``ZADD GT``).
- ``{p}anomalies:active``: hash, anomaly id -> JSON of the open event; removed when it ends.

Every key written gets a 48 h TTL. Only ``readings`` and ``anomalies`` frames are used; the
hot tier ignores the other tables.

Unit of parallelism: one client per Bytewax worker; workers own disjoint nodes when the flow is
keyed by node, and every command is safe to interleave anyway (ZADD/HSET of the same values,
``GT`` and the Lua check keep the newest).

Delivery guarantee: one non-transactional pipeline per ``TableRows``; every command is
idempotent (a reading is removed at its exact score before it is added again), so a batch
replayed after a failure or a Bytewax recovery leaves the same state: at-least-once delivery,
exactly-once effect. A crash mid-pipeline may leave part of a batch applied until the replay.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dataflows.model import MEASUREMENTS, US_PER_HOUR, US_PER_S
from dataflows.tables import KEYS, TableRows

DEFAULT_PREFIX = "water:"
TTL_S = 48 * 3600
WINDOW_US = 48 * US_PER_HOUR
TIMEOUT_S = 10
RETRIES = 3

#: Replace ``latest`` only with a reading at least as new, and always refresh the TTL.
#: KEYS[1] = hash; ARGV = ttl, ts_epoch, field, value, field, value, ...
LATEST_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], 'ts_epoch')
if (not cur) or tonumber(ARGV[2]) >= tonumber(cur) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"""

#: Put readings into a node's sorted set, each replacing any member at its exact score (a
#: corrected reading has new JSON at the same time). One call per node and batch: sending a
#: ZREMRANGEBYSCORE per reading cost ~30 µs of client-side packing each.
#: KEYS[1] = sorted set; ARGV = score, member, score, member, ...
ZPUT_SCRIPT = """
for i = 1, #ARGV, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i])
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""

#: A command: its name and arguments as Redis receives them. ``LATEST`` and ``ZPUT`` stand for
#: the scripts above.
Command = tuple[Any, ...]

_ISO = "%Y-%m-%dT%H:%M:%S%.6fZ"


# --------------------------------------------------------------------------------------------
# Pure row mapping (no Redis): tested in tests/unit/test_tier_rows.py


def score(ts_us: int) -> str:
    """Event time as the sorted-set score text: epoch seconds, shortest round-trip form.

    The same reading always yields the same text, so ``ZREMRANGEBYSCORE s s`` finds it.
    """
    return repr(ts_us / US_PER_S)


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """Drop nulls and non-finite floats: absent means not measured, and JSON has no NaN."""
    return {
        k: v
        for k, v in record.items()
        if v is not None and not (isinstance(v, float) and not math.isfinite(v))
    }


def compact_json(record: dict[str, Any]) -> str:
    """JSON without spaces, nulls or NaN, keys in the frame's column order."""
    return json.dumps(_clean(record), separators=(",", ":"), ensure_ascii=False)


def node_keys(prefix: str, node_id: str) -> tuple[str, str]:
    """The (readings zset, latest hash) keys of a node."""
    return f"{prefix}node:{node_id}:readings", f"{prefix}node:{node_id}:latest"


def member_json(schema: dict[str, Any], columns: list[str]) -> pl.Expr:
    """Vectorized :func:`compact_json` of ``columns``: same text, no per-row Python.

    Each present value is encoded by polars' JSON writer as a one-field object whose braces are
    cut off; absent (null, NaN, inf) values are skipped, as ``compact_json`` does.
    """
    parts = []
    for name in columns:
        col = pl.col(name)
        present = col.is_not_null()
        if schema[name] in (pl.Float64, pl.Float32):
            present = present & col.is_finite()
        pair = pl.struct(col).struct.json_encode().str.slice(1).str.strip_suffix("}")
        parts.append(pl.when(present).then(pair))
    inner = pl.concat_str(parts, separator=",", ignore_nulls=True)
    return pl.concat_str([pl.lit("{"), inner, pl.lit("}")])


def readings_commands(frame: pl.DataFrame, prefix: str = DEFAULT_PREFIX) -> list[Command]:
    """Redis commands for a ``readings`` frame.

    Only readings within 48 h of the newest reading of their node in this frame are sent: older
    ones would be trimmed at once, and a replay of a year would otherwise push a year of JSON.
    """
    if frame.height == 0:
        return []
    frame = frame.unique(subset=list(KEYS["readings"]), keep="last", maintain_order=True)
    ts_us = pl.col("ts").dt.epoch("us")
    kept = (
        frame.with_columns(_ts_us=ts_us)
        .filter(pl.col("_ts_us") >= pl.col("_ts_us").max().over("node_id") - WINDOW_US)
        .sort("node_id", "_ts_us", maintain_order=True)
        .with_columns(pl.col("ts").dt.strftime(_ISO))
    )
    fields = [c for c in frame.columns if c != "node_id"]
    kept = kept.with_columns(_member=member_json(dict(kept.schema), fields))
    commands: list[Command] = []
    last_seen: list[str] = []
    for (node_id,), group in kept.group_by("node_id", maintain_order=True):
        zkey, hkey = node_keys(prefix, str(node_id))
        scores = [score(t) for t in group["_ts_us"].to_list()]
        zput: list[str] = []
        for s, member in zip(scores, group["_member"].to_list(), strict=True):
            zput += [s, member]
        commands.append(("ZPUT", zkey, *zput))
        newest_us = int(group["_ts_us"][-1])
        cutoff = score(newest_us - WINDOW_US)
        commands.append(("ZREMRANGEBYSCORE", zkey, "-inf", f"({cutoff}"))
        commands.append(("EXPIRE", zkey, TTL_S))
        newest = scores[-1]
        latest = group.select(fields).row(-1, named=True)
        commands.append(("LATEST", hkey, TTL_S, newest, "ts_epoch", newest, *latest_fields(latest)))
        last_seen += [newest, str(node_id)]
    commands.append(("ZADD", f"{prefix}nodes:last_seen", "GT", *last_seen))
    commands.append(("EXPIRE", f"{prefix}nodes:last_seen", TTL_S))
    return commands


def latest_fields(record: dict[str, Any]) -> list[str]:
    """Field/value pairs of the ``latest`` hash for one reading (absent values left out)."""
    rec = _clean(record)
    out: list[str] = []
    for name in ("ts", *MEASUREMENTS, "quality", "anomaly_score", "source", "run_id"):
        if name in rec:
            value = rec[name]
            out += [name, repr(value) if isinstance(value, float) else str(value)]
    out += ["flags", json.dumps(rec.get("flags") or [], separators=(",", ":"))]
    return out


def anomalies_commands(frame: pl.DataFrame, prefix: str = DEFAULT_PREFIX) -> list[Command]:
    """Redis commands for an ``anomalies`` frame: open events set, ended ones removed."""
    if frame.height == 0:
        return []
    frame = frame.unique(subset=list(KEYS["anomalies"]), keep="last", maintain_order=True)
    key = f"{prefix}anomalies:active"
    text = frame.with_columns(pl.col("started_at", "ended_at").dt.strftime(_ISO))
    commands: list[Command] = []
    for rec in text.to_dicts():
        if rec["ended_at"] is None:
            commands.append(("HSET", key, rec["anomaly_id"], compact_json(rec)))
        else:
            commands.append(("HDEL", key, rec["anomaly_id"]))
    commands.append(("EXPIRE", key, TTL_S))
    return commands


def hot_commands(rows: TableRows, prefix: str = DEFAULT_PREFIX) -> list[Command]:
    """Redis commands for any ``TableRows`` (none for tables the hot tier does not keep)."""
    if rows.table == "readings":
        return readings_commands(rows.frame, prefix)
    if rows.table == "anomalies":
        return anomalies_commands(rows.frame, prefix)
    return []


# --------------------------------------------------------------------------------------------
# The writer


@dataclass
class HotRedisWriter:
    """Applies :func:`hot_commands` of each ``TableRows`` in one pipeline."""

    url: str
    prefix: str = DEFAULT_PREFIX
    name: str = "hot"
    _client: redis.Redis | None = field(default=None, init=False, repr=False)
    _latest: Any = field(default=None, init=False, repr=False)
    _zput: Any = field(default=None, init=False, repr=False)

    def connect(self) -> None:
        """Connect now, so a wrong URL fails when the flow starts, not at its first batch."""
        try:
            self._connect().ping()
        except redis.RedisError as exc:
            raise RuntimeError(f"hot tier: cannot reach {_redact(self.url)}: {exc}") from exc

    def _connect(self) -> redis.Redis:
        if self._client is None:
            # redis-py retries the whole pipeline on connection errors: safe, it is idempotent.
            self._client = redis.from_url(
                self.url,
                socket_timeout=TIMEOUT_S,
                socket_connect_timeout=TIMEOUT_S,
                retry=Retry(ExponentialBackoff(cap=4.0, base=0.25), RETRIES),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            )
            self._latest = self._client.register_script(LATEST_SCRIPT)
            self._zput = self._client.register_script(ZPUT_SCRIPT)
        return self._client

    def write(self, rows: TableRows) -> None:
        """Send the batch's commands in one pipeline and wait for every reply."""
        commands = hot_commands(rows, self.prefix)
        if not commands:
            return
        client = self._connect()
        pipe = client.pipeline(transaction=False)
        for cmd in commands:
            if cmd[0] == "LATEST":
                self._latest(keys=[cmd[1]], args=list(cmd[2:]), client=pipe)
            elif cmd[0] == "ZPUT":
                self._zput(keys=[cmd[1]], args=list(cmd[2:]), client=pipe)
            else:
                pipe.execute_command(*cmd)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise RuntimeError(
                f"hot tier: writing {rows.frame.height} {rows.table} rows "
                f"({len(commands)} commands) to {_redact(self.url)} failed: {exc}"
            ) from exc

    def close(self) -> None:
        """Close the connection pool (every pipeline was executed before ``write`` returned)."""
        if self._client is not None:
            self._client.close()
            self._client = None


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
