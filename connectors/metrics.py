"""Prometheus metrics of the dataflows (DESIGN.md, "Metrics and alerts").

Names follow ``waterflow_<what>_<unit>``. Label cardinality is bounded: ``reason``, ``tier``,
``table``, ``kind`` and ``outcome`` take a handful of values each; ``node_id`` appears only on
the per-node gauges that per-node alerts need (NodeSilent, PressureOutOfBand, LeakSuspected),
one series per node of the network.

Metrics live in their own registry (not the process-global one), so tests and several flows
in one process do not see each other's counts; ``serve`` exposes it over HTTP with a health
endpoint.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

READINGS = Counter(
    "waterflow_readings",
    "Readings by outcome: accepted, quarantined (whole reading) or duplicate (dropped).",
    ["outcome"],
    registry=REGISTRY,
)
QUARANTINE = Counter(
    "waterflow_quarantine_records",
    "Quarantine records by reason code (whole readings and single values).",
    ["reason"],
    registry=REGISTRY,
)
LATE = Counter(
    "waterflow_late_readings",
    "Accepted readings that arrived after their KPI window closed (kept as raw readings).",
    registry=REGISTRY,
)
NODE_LAST_READING = Gauge(
    "waterflow_node_last_reading_timestamp_seconds",
    "Event time of the newest accepted reading of each node.",
    ["node_id"],
    registry=REGISTRY,
)
NODE_PRESSURE = Gauge(
    "waterflow_node_pressure_bar",
    "Newest pressure of each node that measures pressure.",
    ["node_id"],
    registry=REGISTRY,
)
NODE_ANOMALY_SCORE = Gauge(
    "waterflow_node_anomaly_score",
    "Newest anomaly score (0..1) of each node.",
    ["node_id"],
    registry=REGISTRY,
)
ACTIVE_ANOMALIES = Gauge(
    "waterflow_active_anomalies",
    "Open anomaly events per node and kind.",
    ["node_id", "kind"],
    registry=REGISTRY,
)
SINK_ROWS = Counter(
    "waterflow_sink_rows",
    "Rows written per tier and table.",
    ["tier", "table"],
    registry=REGISTRY,
)
SINK_ERRORS = Counter(
    "waterflow_sink_errors",
    "Failed writes per tier (each failed attempt counts).",
    ["tier"],
    registry=REGISTRY,
)
SINK_WRITE_SECONDS = Histogram(
    "waterflow_sink_write_seconds",
    "Time to write one batch of rows to a tier.",
    ["tier"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
    registry=REGISTRY,
)
EVENT_TIME_LAG = Gauge(
    "waterflow_event_time_lag_seconds",
    "Wall clock minus the newest event time seen, over all nodes.",
    registry=REGISTRY,
)
LAST_BATCH = Gauge(
    "waterflow_last_batch_timestamp_seconds",
    "Wall-clock time the pipeline last processed a batch (PipelineStalled watches it).",
    registry=REGISTRY,
)
