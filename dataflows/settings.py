"""Settings of one pipeline run: validated once, then passed to every step.

Also the few helpers every floor needs to read configuration safely: instants given as text
(:func:`parse_instant`), the limits read from the environment (:func:`with_input_limits`),
and the one way a URL is shown to a person (:func:`redact_url`, :func:`hide_secrets`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dataflows.topology import Network

#: Readings dated before this are implausible (a logger's clock reset to 1970, a year typed
#: as 0024): quarantined as ``too_old_timestamp`` rather than filed under a year of their own.
MIN_TIMESTAMP = "2000-01-01"
MIN_TS_US = 946_684_800_000_000  # MIN_TIMESTAMP as µs UTC
#: What a quarantine record keeps of a rejected line or value; the rest is cut, and said so.
QUARANTINE_RAW_BYTES = 4096
# A replay's chunk: the lines a reader turns into one chunk, which the flow cuts into one batch
# per node. The flow's cost is mostly per node batch, so a network of many nodes reads larger
# chunks (READINGS_PER_NODE_BATCH lines per node), within a memory bound.
CHUNK_ROWS = 100_000
CHUNK_ROWS_MAX = 1_000_000
READINGS_PER_NODE_BATCH = 200


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs to know that is not in the data.

    Durations are in seconds. ``now_us`` fixes "now" (µs UTC) for the future-timestamp check,
    so tests and replays of old files are repeatable; ``None`` means the wall clock.
    """

    run_id: str = "run"
    tz: str = "Europe/Rome"
    network: Network = field(default_factory=Network)
    chunk_rows: int = CHUNK_ROWS  # lines a reader turns into one chunk (replay_chunk_rows)
    allowed_lateness_s: int = 6 * 3600  # a window stays open this long behind the newest reading
    future_tolerance_s: int = 300  # clock skew tolerated before a timestamp is "in the future"
    gap_factor: float = 3.0  # a gap is an interval over gap_factor x the node's usual interval
    stuck_min_s: int = 6 * 3600  # a flat line at least this long is a stuck sensor
    spike_z: float = 8.0  # a jump over spike_z x the robust step scale is a spike
    now_us: int | None = None
    started_us: int = 0  # when the run started (µs UTC), for its ingest_runs row
    source_label: str = ""  # what the run read, for its ingest_runs row
    # Latency-aware batching. A node's batches are gathered until the next multiple of
    # node_gather_ms on the wall clock (less than node_gather_ms) before validation, so the
    # per-call cost of the node steps is paid per gathered batch, not per Kafka message, and
    # all nodes go on together; 0 passes each batch on at once (a replay's chunks are large).
    node_gather_ms: int = 0
    node_gather_max: int = 256  # ...or until this many batches of the node are waiting
    ledger_interval_s: float = 10.0  # the running ingest_runs row is refreshed this often
    # Public holidays besides the Italian ones ('MM-DD' every year, or 'YYYY-MM-DD'), for the
    # demand forecasts (dataflows/forecast_calendar.py): the town's patron saint, for example.
    # Given by --holiday, WATERFLOW_HOLIDAYS or the file's holidays, checked by
    # dataflows/config_check.py (holidays).
    holidays: tuple[str, ...] = ()
    # Plausible time: a reading before min_ts_us (µs UTC) is quarantined as too old.
    min_ts_us: int = MIN_TS_US
    quarantine_raw_bytes: int = QUARANTINE_RAW_BYTES  # raw text kept per quarantine record

    def __post_init__(self) -> None:
        check_zone(self.tz)  # fails early, naming the zone, if it does not exist
        if self.quarantine_raw_bytes < 64:
            raise ValueError(
                f"quarantine_raw_bytes must be >= 64, got {self.quarantine_raw_bytes}"
            )
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.node_gather_ms < 0:
            raise ValueError(f"node_gather_ms must be >= 0, got {self.node_gather_ms}")
        if self.allowed_lateness_s < 0:
            raise ValueError(f"allowed_lateness_s must be >= 0, got {self.allowed_lateness_s}")


def replay_chunk_rows(nodes: int) -> int:
    """Lines per replay chunk for a network of ``nodes`` nodes.

    About READINGS_PER_NODE_BATCH readings per node batch, between CHUNK_ROWS and
    CHUNK_ROWS_MAX lines.

    >>> replay_chunk_rows(0), replay_chunk_rows(2_000), replay_chunk_rows(10_000)
    (100000, 400000, 1000000)
    """
    return min(CHUNK_ROWS_MAX, max(CHUNK_ROWS, READINGS_PER_NODE_BATCH * nodes))


def check_zone(tz: str) -> str:
    """The zone name if the tz database knows it, else a ValueError that says what to give.

    >>> check_zone("Europe/Rome")
    'Europe/Rome'
    >>> check_zone("Mars/Olympus")
    Traceback (most recent call last):
    ...
    ValueError: unknown time zone 'Mars/Olympus' (give an IANA name such as Europe/Rome or UTC)
    """
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        # ValueError: a key that is no path at all (absolute, "..", empty).
        raise ValueError(
            f"unknown time zone {tz!r} (give an IANA name such as Europe/Rome or UTC)"
        ) from None
    return tz


def parse_instant(text: str) -> int:
    """µs UTC of an ISO time with a UTC offset, or of a date (its UTC midnight).

    A bare local time is refused: which zone it is in cannot be told from the text.

    >>> parse_instant("2000-01-01"), parse_instant("2000-01-01T01:00:00+01:00")
    (946684800000000, 946684800000000)
    >>> parse_instant("yesterday")
    Traceback (most recent call last):
    ...
    ValueError: not an ISO date or time: 'yesterday' (e.g. 2024-11-13 or 2024-11-13T06:00:00+01:00)
    """
    example = "(e.g. 2024-11-13 or 2024-11-13T06:00:00+01:00)"
    try:
        ts = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO date or time: {text!r} {example}") from None
    if ts.tzinfo is None:
        if len(text.strip()) != 10:  # a bare date is unambiguous; a bare local time is not
            raise ValueError(f"needs a UTC offset (e.g. Z or +01:00), got {text!r}")
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp() * 1_000_000)


def with_input_limits(settings: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """``settings`` with ``WATERFLOW_MIN_TIMESTAMP`` and ``WATERFLOW_QUARANTINE_RAW_BYTES`` applied.

    Unset variables keep the settings' values. Errors name the variable.

    >>> with_input_limits(Settings(), {"WATERFLOW_MIN_TIMESTAMP": "2020-01-01"}).min_ts_us
    1577836800000000
    """
    env = os.environ if environ is None else environ
    text = env.get("WATERFLOW_MIN_TIMESTAMP", "").strip()
    if text:
        try:
            settings = replace(settings, min_ts_us=parse_instant(text))
        except ValueError as exc:
            raise ValueError(f"WATERFLOW_MIN_TIMESTAMP: {exc}") from None
    text = env.get("WATERFLOW_QUARANTINE_RAW_BYTES", "").strip()
    if text:
        if not text.isdigit() or int(text) < 64:
            raise ValueError(
                f"WATERFLOW_QUARANTINE_RAW_BYTES: must be a whole number >= 64, got {text!r}"
            )
        settings = replace(settings, quarantine_raw_bytes=int(text))
    return settings


def redact_url(url: str) -> str:
    """The URL fit for a terminal or a log: its password, in any place, replaced by ***.

    The user name is kept (it tells which role is used); a ``password`` query parameter
    (libpq and redis-py take one) is hidden too. Text that is no URL comes back unchanged.

    >>> redact_url("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    >>> redact_url("postgresql://writer:s3cret@db/water?sslmode=require&password=x")
    'postgresql://writer:***@db/water?sslmode=require&password=***'
    >>> redact_url("mysql://u:p@h/x"), redact_url("127.0.0.1:9092")
    ('mysql://u:***@h/x', '127.0.0.1:9092')
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. an invalid port: hide everything between // and @
        return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)
    netloc = parts.netloc
    if password:  # an empty one (an embedded server's postgres:@) hides nothing
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if "password" in query.lower():
        query = "&".join(
            f"{k}=***" if k.lower() == "password" else f"{k}={v}"
            for k, v in parse_qsl(query, keep_blank_values=True)
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(urls: Iterable[str | None]) -> set[str]:
    """The passwords inside some URLs, as written and percent-decoded, for hide_secrets.

    >>> sorted(url_secrets(["redis://:p%40ss@h/0", None, "postgresql://h/x?password=q"]))
    ['p%40ss', 'p@ss', 'q']
    """
    found: set[str] = set()
    for url in urls:
        try:
            parts = urlsplit(url or "")
            words = [parts.password or ""]
        except ValueError:
            continue
        words += [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
        found.update(w for word in words for w in (word, unquote(word)) if w)
    return found


def hide_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every given secret replaced by *** (error messages of client libraries).

    >>> hide_secrets("auth failed for s3cret", {"s3cret", ""})
    'auth failed for ***'
    """
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def tz_from_env() -> str:
    """The network's time zone: ``WATERFLOW_TZ`` or Europe/Rome."""
    return os.environ.get("WATERFLOW_TZ", "Europe/Rome")


def heartbeat_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between a run's ``ingest_runs`` heartbeats: ``WATERFLOW_HEARTBEAT_S`` or 10."""
    text = (os.environ if environ is None else environ).get("WATERFLOW_HEARTBEAT_S", "").strip()
    try:
        value = float(text) if text else 10.0
    except ValueError:
        raise ValueError(
            f"WATERFLOW_HEARTBEAT_S must be a number of seconds, got {text!r}"
        ) from None
    if not value > 0:
        raise ValueError(f"WATERFLOW_HEARTBEAT_S must be > 0, got {text!r}")
    return value
