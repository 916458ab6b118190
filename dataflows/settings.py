"""Settings of one pipeline run: validated once, then passed to every step."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from dataflows.topology import Network


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs to know that is not in the data.

    Durations are in seconds. ``now_us`` fixes "now" (µs UTC) for the future-timestamp check,
    so tests and replays of old files are repeatable; ``None`` means the wall clock.
    """

    run_id: str = "run"
    tz: str = "Europe/Rome"
    network: Network = field(default_factory=Network)
    chunk_rows: int = 100_000  # lines a reader turns into one chunk
    allowed_lateness_s: int = 6 * 3600  # a window stays open this long behind the newest reading
    future_tolerance_s: int = 300  # clock skew tolerated before a timestamp is "in the future"
    gap_factor: float = 3.0  # a gap is an interval over gap_factor x the node's usual interval
    stuck_min_s: int = 6 * 3600  # a flat line at least this long is a stuck sensor
    spike_z: float = 8.0  # a jump over spike_z x the robust step scale is a spike
    now_us: int | None = None
    started_us: int = 0  # when the run started (µs UTC), for its ingest_runs row
    source_label: str = ""  # what the run read, for its ingest_runs row
    # Latency-aware batching. A node's batches are gathered up to node_gather_ms before
    # validation, so the per-call cost of the node steps is paid per gathered batch, not per
    # Kafka message; 0 passes each batch on at once (a replay's batches are large already).
    node_gather_ms: int = 0
    node_gather_max: int = 256  # ...or until this many batches of the node are waiting
    rows_gather_ms: int = 500  # rows of one table are gathered this long into one write
    ledger_interval_s: float = 10.0  # the running ingest_runs row is refreshed this often
    # Public holidays besides the Italian ones ('MM-DD' every year, or 'YYYY-MM-DD'), for the
    # demand forecasts (dataflows/forecast_calendar.py): the town's patron saint, for example.
    holidays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ZoneInfo(self.tz)  # fails early, naming the zone, if it does not exist
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.node_gather_ms < 0 or self.rows_gather_ms < 0:
            raise ValueError(
                f"gather times must be >= 0 ms, got {self.node_gather_ms}, {self.rows_gather_ms}"
            )
        if self.allowed_lateness_s < 0:
            raise ValueError(f"allowed_lateness_s must be >= 0, got {self.allowed_lateness_s}")


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
