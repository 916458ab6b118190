"""Hot tier: the latest state per node in Redis, for dashboards and alerts that need it now.

Keys (``p`` is the prefix, ``water:`` by default):

- ``{p}node:{id}:readings``: sorted set, score = event time in epoch seconds, member = compact
  JSON of the reading; trimmed to the last 48 h of event time of the node.
- ``{p}node:{id}:latest``: hash of the newest reading (measurements, quality, anomaly_score,
  flags, ts, ts_epoch); replaced only by a reading at least as new (checked in Redis by a
  Lua script, so concurrent or late writers cannot move it back in time).
- ``{p}nodes:last_seen``: sorted set, node id -> newest event time (``ZADD GT``).
- ``{p}anomalies:active``: hash, anomaly id -> JSON of the open event; removed when it ends.
- ``{p}hot:writer:{uuid}``: one marker per writer, to notice a Redis that lost its data.

Every key written gets a 48 h TTL. Only ``readings`` and ``anomalies`` frames are used; the
hot tier ignores the other tables.

Unit of parallelism: one client per Bytewax worker; workers own disjoint nodes when the flow is
keyed by node, and every command is safe to interleave anyway (ZADD/HSET of the same values,
``GT`` and the Lua check keep the newest).

Connection: ``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS (certificate
options as ``redis.from_url`` query parameters, e.g.
``?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem&ssl_certfile=...&ssl_keyfile=...``) or
``unix://``. Connect and socket timeouts are 1 s, without redis-py retries: a dead Redis costs
at most about a second per attempt. Passwords never appear in messages
(``dataflows.settings.redact_url``). Least privilege: ``deploy/local/redis-acl.sh`` grants a
user exactly the commands sent here (the scripts' included) on the prefix's keys; a command
added here must be added there (``tests/integration/test_redis_acl.py`` fails otherwise).

Delivery guarantee: while Redis answers, one non-transactional pipeline per ``TableRows``,
finished before ``write`` returns; every command is idempotent (a reading is removed at its
exact score before it is added again), so a batch replayed after a failure or a Bytewax
recovery leaves the same state: at-least-once delivery, exactly-once effect. A crash
mid-pipeline may leave part of a batch applied until the replay.

While Redis is down the hot tier is a cache that catches up: writes never raise for an outage
(so warm and cold go on), they are merged into a bounded in-memory :class:`HotBacklog` and
sent when Redis answers again, with exponential backoff between attempts. The backlog lives in
the process only: what it holds when the process ends, or what exceeds its budget (oldest
readings first), is not cached; at-most-once while down, for the cache only (warm and cold
keep every reading). Both are counted (``waterflow_sink_errors{tier="hot"}``,
``waterflow_hot_backlog_dropped_readings_total``). A Redis that comes back empty (restarted
without persistence) is noticed even without a failed write (the writer's marker key is gone);
the writer then sends again the newest ``latest``, last-seen time and open anomalies of every
node it wrote, which it keeps in memory (O(nodes)); readings windows refill from new data.
"""

from __future__ import annotations

import json
import logging
import math
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import redis
from prometheus_client import Counter, Gauge
from redis.backoff import NoBackoff
from redis.retry import Retry

from connectors import metrics
from dataflows.model import MEASUREMENTS, US_PER_HOUR, US_PER_S
from dataflows.settings import redact_url as _redact
from dataflows.tables import KEYS, TableRows

log = logging.getLogger(__name__)
#: Context of this module's log records (dataflows.logs shows it as fields).
LOG_CONTEXT = {"step": "write_tiers", "tier": "hot"}

DEFAULT_PREFIX = "water:"
TTL_S = 48 * 3600
WINDOW_US = 48 * US_PER_HOUR
TIMEOUT_S = 1.0
#: Readings kept for catch-up while Redis is down (about 300 bytes each in memory): 100 nodes'
#: 48 h at 5-minute readings fit many times; 10 000 nodes keep their newest ~1.7 h.
BACKLOG_READINGS = 200_000

# Hot-tier-only metrics; in the shared registry, named like the families of connectors.metrics.
_BACKLOG = Gauge(
    "waterflow_hot_backlog_readings",
    "Readings waiting in memory for Redis to come back (hot tier catch-up).",
    registry=metrics.REGISTRY,
)
_DROPPED = Counter(
    "waterflow_hot_backlog_dropped_readings",
    "Readings never cached in Redis: over the backlog budget, or still waiting at shutdown "
    "(warm and cold tiers keep them).",
    registry=metrics.REGISTRY,
)

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
#: KEYS[1] = sorted set; ARGV = score, member, score, member, ... or, one argument, those
#: joined by newlines (``_send``: redis-py packs each argument in Python, ~3 µs each, 1.2 s
#: for a 1000-node replay's 200 000 readings; members are compact JSON, never a raw newline).
ZPUT_SCRIPT = """
local args = ARGV
if #ARGV == 1 then
  args = {}
  local s, pos = ARGV[1], 1
  while true do
    local nl = string.find(s, '\\n', pos, true)
    if not nl then
      args[#args + 1] = string.sub(s, pos)
      break
    end
    args[#args + 1] = string.sub(s, pos, nl - 1)
    pos = nl + 1
  end
end
for i = 1, #args, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[1], args[i], args[i])
  redis.call('ZADD', KEYS[1], args[i], args[i + 1])
end
return #args / 2
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
    # ``kept`` is sorted by node: each node's rows are one run. Columns go to Python once,
    # not once per node (a polars group per node cost ~0.4 ms each, 0.4 s at 1000 nodes).
    nodes = kept.get_column("node_id")
    firsts = nodes.ne_missing(nodes.shift(1)).scatter(0, True).arg_true().to_list()
    ends = firsts[1:] + [kept.height]
    node_ids = nodes.gather(firsts).to_list()
    all_ts = kept.get_column("_ts_us").to_list()
    all_members = kept.get_column("_member").to_list()
    latest_rows = kept.select(fields)[[e - 1 for e in ends]].to_dicts()
    commands: list[Command] = []
    last_seen: list[str] = []
    for node_id, first, end, latest in zip(node_ids, firsts, ends, latest_rows, strict=True):
        zkey, hkey = node_keys(prefix, str(node_id))
        scores = [score(t) for t in all_ts[first:end]]
        zput: list[str] = []
        for s, member in zip(scores, all_members[first:end], strict=True):
            zput += [s, member]
        commands.append(("ZPUT", zkey, *zput))
        newest_us = all_ts[end - 1]
        cutoff = score(newest_us - WINDOW_US)
        commands.append(("ZREMRANGEBYSCORE", zkey, "-inf", f"({cutoff}"))
        commands.append(("EXPIRE", zkey, TTL_S))
        newest = scores[-1]
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
# The catch-up backlog (no Redis): tested in tests/unit/test_tier_rows.py


@dataclass
class HotBacklog:
    """Hot-tier commands not yet applied, merged into the state they would leave in Redis.

    Merging keeps the backlog proportional to what the hot tier holds (per node: the newest
    ``latest`` and the readings of its last 48 h; the newest last-seen time; the last word on
    each anomaly), not to the length of the outage. Only the readings can exceed the budget:
    then the oldest readings by event time go first (the newest state of every node, its
    last-seen time and the anomalies are always kept) and ``dropped`` counts them.

    >>> b = HotBacklog(max_readings=10)
    >>> b.add([("ZPUT", "z", "1.0", "a", "2.0", "b"), ("ZPUT", "z", "2.0", "c")])
    >>> b.readings, b.zsets["z"]
    (2, {'1.0': 'a', '2.0': 'c'})
    """

    max_readings: int
    #: zset key -> score text -> member (a newer member at the same score replaces, as ZPUT).
    zsets: dict[str, dict[str, str]] = field(default_factory=dict)
    #: zset key -> (cutoff as a float, the exclusive ``(cutoff`` text) of the 48 h trim.
    cutoffs: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: hash key -> (ts_epoch, the LATEST arguments after the key); newest wins, ties: last.
    latest: dict[str, tuple[float, tuple[Any, ...]]] = field(default_factory=dict)
    #: last-seen zset key -> node id -> newest score (ZADD GT).
    last_seen: dict[str, dict[str, float]] = field(default_factory=dict)
    #: hash key -> field -> value, or None for HDEL; the last command wins.
    hashes: dict[str, dict[str, str | None]] = field(default_factory=dict)
    #: key -> TTL of every key written.
    expire: dict[str, Any] = field(default_factory=dict)
    readings: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return (
            len(self.zsets)
            + len(self.latest)
            + len(self.last_seen)
            + len(self.hashes)
            + len(self.expire)
        )

    def add(self, commands: list[Command]) -> None:
        """Merge commands of :func:`hot_commands` (or of :meth:`pop_chunk`) into the backlog."""
        for cmd in commands:
            name, key = cmd[0], cmd[1]
            if name == "ZPUT":
                members = self.zsets.setdefault(key, {})
                before = len(members)
                for s, m in zip(cmd[2::2], cmd[3::2], strict=True):
                    members[s] = m
                self.readings += len(members) - before
                self._trim(key)
            elif name == "ZREMRANGEBYSCORE":
                text = cmd[3]
                cut = float(text.lstrip("("))
                if key not in self.cutoffs or cut > self.cutoffs[key][0]:
                    self.cutoffs[key] = (cut, text)
                self._trim(key)
            elif name == "LATEST":
                ts = float(cmd[3])
                if key not in self.latest or ts >= self.latest[key][0]:
                    self.latest[key] = (ts, tuple(cmd[2:]))
            elif name == "ZADD":  # ZADD key GT score member ...
                seen = self.last_seen.setdefault(key, {})
                for s, node in zip(cmd[3::2], cmd[4::2], strict=True):
                    seen[node] = max(float(s), seen.get(node, -math.inf))
            elif name in ("HSET", "HDEL"):
                self.hashes.setdefault(key, {})[cmd[2]] = cmd[3] if name == "HSET" else None
            elif name == "EXPIRE":
                self.expire[key] = cmd[2]
            else:
                raise ValueError(f"hot backlog: unexpected command {name!r} for key {key!r}")
        if self.readings > self.max_readings:
            self._shed()

    def _trim(self, key: str) -> None:
        """Forget readings of ``key`` that the 48 h trim would remove anyway."""
        members = self.zsets.get(key)
        if not members or key not in self.cutoffs:
            return
        cut = self.cutoffs[key][0]
        old = [s for s in members if float(s) < cut]
        for s in old:
            del members[s]
        self.readings -= len(old)

    def _shed(self) -> None:
        """Over budget: drop the oldest readings (event time) down to 90 % of the budget.

        Shedding a tenth at a time keeps the sort amortized over many batches.
        """
        target = int(self.max_readings * 0.9)
        every = sorted(((float(s), key, s) for key, members in self.zsets.items() for s in members))
        excess = len(every) - target
        for _, key, s in every[:excess]:
            del self.zsets[key][s]
        self.readings -= excess
        self.dropped += excess
        _DROPPED.inc(excess)

    def state_commands(self) -> list[Command]:
        """Commands restoring the small state (latest, last seen, open anomalies), kept as is.

        Empty hash entries (HDEL) are left out: there is nothing to restore for them.
        """
        out: list[Command] = [("LATEST", key, *args) for key, (_, args) in self.latest.items()]
        for key, seen in self.last_seen.items():
            flat: list[Any] = []
            for node, s in seen.items():
                flat += [repr(s), node]
            out += [("ZADD", key, "GT", *flat), ("EXPIRE", key, TTL_S)]
        for key, values in self.hashes.items():
            out += [("HSET", key, f, v) for f, v in values.items() if v is not None]
            out.append(("EXPIRE", key, TTL_S))
        return out

    def pop_chunk(self, max_items: int = 20_000) -> list[Command]:
        """Remove and return commands for up to about ``max_items`` readings and keys.

        Whole keys go together, so a chunk that fails can be given back with :meth:`add`.
        """
        out: list[Command] = []
        budget = max_items
        while self.zsets and budget > 0:
            key = next(iter(self.zsets))
            members = self.zsets.pop(key)
            self.readings -= len(members)
            budget -= len(members) + 1
            args: list[str] = []
            for s, m in members.items():
                args += [s, m]
            if args:
                out.append(("ZPUT", key, *args))
            if key in self.cutoffs:
                out.append(("ZREMRANGEBYSCORE", key, "-inf", self.cutoffs.pop(key)[1]))
            if key in self.expire:
                out.append(("EXPIRE", key, self.expire.pop(key)))
        for key in list(self.latest)[: max(budget, 0)]:
            out.append(("LATEST", key, *self.latest.pop(key)[1]))
            budget -= 1
        if budget > 0 and not self.zsets and not self.latest:
            # Last: last-seen and anomalies are small, and a node's last-seen time should not
            # be ahead of its ``latest`` hash in Redis.
            for key, seen in self.last_seen.items():
                flat: list[Any] = []
                for node, ts in seen.items():
                    flat += [repr(ts), node]
                out.append(("ZADD", key, "GT", *flat))
            for key, values in self.hashes.items():
                for f, v in values.items():
                    out.append(("HSET", key, f, v) if v is not None else ("HDEL", key, f))
            for key, ttl in self.expire.items():
                out.append(("EXPIRE", key, ttl))
            self.last_seen, self.hashes, self.expire = {}, {}, {}
        return out


# --------------------------------------------------------------------------------------------
# The writer

#: Errors that mean "Redis is not there right now" (down, restarting, unreachable, out of
#: memory, a read-only replica after a failover): the hot tier is a cache, the flow goes on.
#: Anything else (a script error, a wrong type) is a bug and raises.
_OUTAGE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    OSError,
)


#: Commands whose effect the writer keeps in memory, to restore after an outage.
_RESIDENT = frozenset({"LATEST", "ZADD", "HSET", "HDEL"})


@dataclass
class HotRedisWriter:
    """Applies :func:`hot_commands` of each ``TableRows``, and rides out Redis outages.

    While Redis answers, each batch is one pipeline, finished before ``write`` returns. When a
    write fails because Redis is unreachable, ``write`` does not raise: it counts the failure
    (``waterflow_sink_errors{tier="hot"}``), merges the batch into a :class:`HotBacklog` and
    waits ``backoff_base_s`` (doubling up to ``backoff_cap_s``, with jitter) before it tries
    Redis again. Until then each ``write`` only merges into the backlog (no network). The next
    attempt sends the backlog in chunks; once it is empty, writes go straight to Redis again.
    ``close`` tries a last flush whatever the backoff; what it cannot send is counted as
    dropped (``waterflow_hot_backlog_dropped_readings_total``).

    Redis may come back empty (a restart without persistence). The writer therefore keeps the
    newest ``latest`` hash, last-seen time and open anomalies of every node it has written
    (memory O(nodes), no readings) and sends them with each catch-up: a node silent since
    before the outage keeps its latest state and staleness index. Its 48 h readings window
    refills only as new readings arrive.

    Errors it raises (a wrong password or certificate at ``connect``, a script bug) are not
    counted here: ``TierSink`` counts what a writer raises, so each failure counts once.
    """

    url: str
    prefix: str = DEFAULT_PREFIX
    name: str = "hot"
    max_backlog_readings: int = BACKLOG_READINGS
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _client: redis.Redis | None = field(default=None, init=False, repr=False)
    _latest: Any = field(default=None, init=False, repr=False)
    _zput: Any = field(default=None, init=False, repr=False)
    _backlog: HotBacklog = field(init=False, repr=False)
    _resident: HotBacklog = field(init=False, repr=False)
    _down: bool = field(default=False, init=False, repr=False)
    _failures: int = field(default=0, init=False, repr=False)
    #: This writer's marker key (see ``_send``), and whether it was set once already.
    _marker: str = field(default="", init=False, repr=False)
    _marked: bool = field(default=False, init=False, repr=False)
    _retry_at: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._backlog = HotBacklog(self.max_backlog_readings)
        # Per node, what a restarted (emptied) Redis must get back even if the node stays
        # silent: latest, last seen, open anomalies. O(nodes + open anomalies), no readings.
        self._resident = HotBacklog(0)
        self._marker = f"{self.prefix}hot:writer:{uuid.uuid4().hex}"

    @property
    def behind(self) -> bool:
        """Whether writes are waiting in the backlog for Redis to come back."""
        return self._down

    @property
    def backlog(self) -> HotBacklog:
        """What is waiting for Redis (read-only use: metrics, tests)."""
        return self._backlog

    def connect(self) -> None:
        """Check the URL now, so a wrong password or certificate fails when the flow starts.

        Redis merely unreachable at start is an outage like any other: counted, retried.
        """
        try:
            self._connect().ping()
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            raise RuntimeError(
                f"hot tier: {_redact(self.url)} refused the credentials: {exc}"
            ) from exc
        except _OUTAGE as exc:
            if _is_tls_setup_error(exc):
                raise RuntimeError(
                    f"hot tier: TLS handshake with {_redact(self.url)} failed: {exc}"
                ) from exc
            self._failed(exc, "connecting")
        except redis.RedisError as exc:
            raise RuntimeError(f"hot tier: cannot use {_redact(self.url)}: {exc}") from exc

    def _connect(self) -> redis.Redis:
        if self._client is None:
            # No retries inside redis-py: they would block the flow while Redis is down; this
            # writer retries itself, with backoff, without blocking.
            self._client = redis.from_url(
                self.url,
                socket_timeout=TIMEOUT_S,
                socket_connect_timeout=TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
            self._latest = self._client.register_script(LATEST_SCRIPT)
            self._zput = self._client.register_script(ZPUT_SCRIPT)
        return self._client

    def write(self, rows: TableRows) -> None:
        """Apply the batch now, or keep it in the backlog while Redis is unreachable."""
        commands = hot_commands(rows, self.prefix)
        if not commands:
            return
        self._remember(commands)
        if self._down:
            self._backlog.add(commands)
            _BACKLOG.set(self._backlog.readings)
            if self.clock() >= self._retry_at:
                self._flush()
            return
        try:
            self._send(commands)
        except _OUTAGE as exc:
            self._backlog.add(commands)
            _BACKLOG.set(self._backlog.readings)
            self._failed(exc, f"writing {rows.frame.height} {rows.table} rows")

    def flush(self) -> bool:
        """Try to send the backlog now, whatever the backoff; whether it is empty afterwards."""
        if self._down:
            self._flush()
        return not self._down

    def _flush(self) -> None:
        while len(self._backlog):
            chunk = self._backlog.pop_chunk()
            try:
                self._send(chunk)
            except _OUTAGE as exc:
                self._backlog.add(chunk)  # whole keys: merged back as they were
                _BACKLOG.set(self._backlog.readings)
                self._failed(exc, "catching up")
                return
            except BaseException:
                self._backlog.add(chunk)
                raise
            _BACKLOG.set(self._backlog.readings)
        log.warning(
            "hot tier: %s answers again, caught up after %d failed attempts",
            _redact(self.url),
            self._failures, extra=LOG_CONTEXT,
        )
        self._down, self._failures = False, 0

    def _send(self, commands: list[Command]) -> None:
        """One pipeline, every reply awaited. Outage errors propagate; others are wrapped.

        The pipeline starts by setting this writer's marker key and reading its old value: if
        the marker is gone, Redis lost its data since our last write (a restart without
        persistence, a failover, a flush) although no write failed (redis-py reconnects a
        closed connection by itself), so the small state of every node is sent again.
        """
        client = self._connect()
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("SET", self._marker, "1", "EX", TTL_S, "GET")
        for cmd in commands:
            if cmd[0] == "LATEST":
                self._latest(keys=[cmd[1]], args=list(cmd[2:]), client=pipe)
            elif cmd[0] == "ZPUT":
                self._zput(keys=[cmd[1]], args=_zput_args(cmd), client=pipe)
            else:
                pipe.execute_command(*cmd)
        try:
            marker = pipe.execute()[0]
            if marker is None and self._marked:
                log.warning(
                    "hot tier: %s lost its data since the last write; restoring the latest "
                    "state of %d nodes",
                    _redact(self.url),
                    len(self._resident.latest), extra=LOG_CONTEXT,
                )
                self._marked = False  # once, even if the restore itself fails
                self._send(self._resident.state_commands())
            self._marked = True
        except _OUTAGE:
            raise
        except redis.RedisError as exc:
            raise RuntimeError(
                f"hot tier: {len(commands)} commands to {_redact(self.url)} failed: {exc}"
            ) from exc

    def _remember(self, commands: list[Command]) -> None:
        """Keep the small state up to date (newest wins, closed anomalies forgotten)."""
        self._resident.add([c for c in commands if c[0] in _RESIDENT])
        for values in self._resident.hashes.values():
            for f in [f for f, v in values.items() if v is None]:
                del values[f]

    def _failed(self, exc: BaseException, doing: str) -> None:
        """Count a failed attempt and schedule the next one (exponential backoff, jitter)."""
        metrics.SINK_ERRORS.labels(self.name).inc()
        self._failures += 1
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (self._failures - 1))
        # Jitter, so the workers of a cluster do not all reconnect in the same instant (timing
        # only, no secret: a non-cryptographic generator is right here).
        delay *= 0.5 + random.random() / 2  # nosec B311
        self._retry_at = self.clock() + delay
        if not self._down or self._failures in (2, 5) or self._failures % 20 == 0:
            log.warning(
                "hot tier: %s to %s failed (attempt %d, next in %.1f s, %d readings waiting): %s",
                doing,
                _redact(self.url),
                self._failures,
                delay,
                self._backlog.readings,
                exc, extra=LOG_CONTEXT,
            )
        if not self._down:
            # Redis may come back empty (restarted without persistence): resend the small
            # state of every node with the catch-up. Idempotent: LATEST and ZADD GT keep the
            # newest, HSET the same value.
            self._backlog.add(self._resident.state_commands())
        self._down = True

    def close(self) -> None:
        """Last flush attempt (whatever the backoff), then close the connection pool.

        What still cannot be sent is lost for the hot tier (warm and cold have it): counted in
        ``waterflow_hot_backlog_dropped_readings_total`` and logged.
        """
        try:
            if self._down:
                self._flush()
            if self._down:
                lost = self._backlog.readings
                _DROPPED.inc(lost)
                log.warning(
                    "hot tier: %s still unreachable at close: %d readings not cached",
                    _redact(self.url),
                    lost, extra=LOG_CONTEXT,
                )
                self._backlog = HotBacklog(self.max_backlog_readings)
                _BACKLOG.set(0)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None


def _zput_args(cmd: Command) -> list[Any]:
    """ZPUT's arguments: its pairs joined by newlines (one argument to pack).

    As they are if a member holds a newline, or for a single pair (two arguments either way).
    """
    pairs = cmd[2:]
    if len(pairs) > 2:
        joined = "\n".join(pairs)
        if joined.count("\n") == len(pairs) - 1:
            return [joined]
    return list(pairs)


def _is_tls_setup_error(exc: BaseException) -> bool:
    """Whether a connection error comes from a certificate check (a setup error, not an outage)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
