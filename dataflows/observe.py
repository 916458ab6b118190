"""What the pipeline tells Prometheus: counts, per-node state and open anomalies.

Called from ``op.inspect`` steps of the flow; only updates the metrics of
``connectors.metrics`` (serving them is the caller's business).
"""

from __future__ import annotations

import time

import numpy as np

from connectors import metrics
from dataflows.model import COL, US_PER_S, AnomalyEvent, Quarantined, ReadingBatch
from dataflows.rows import RunCounts


def record_counts(counts: RunCounts) -> None:
    """Readings by outcome and late readings."""
    for outcome, n in (
        ("accepted", counts.accepted),
        ("quarantined", counts.quarantined),
        ("duplicate", counts.duplicates),
    ):
        if n:
            metrics.READINGS.labels(outcome).inc(n)
    if counts.late:
        metrics.LATE.inc(counts.late)
    metrics.LAST_BATCH.set(time.time())


def record_quarantine(records: list[Quarantined]) -> None:
    """Quarantine records by reason."""
    for q in records:
        metrics.QUARANTINE.labels(q.reason).inc()


class NodeClocks:
    """The newest event time per node, so a late batch never moves a node's gauges back."""

    def __init__(self) -> None:
        self._newest: dict[str, float] = {}

    def record(self, batch: ReadingBatch) -> None:
        """The node's newest event time, pressure and anomaly score, and the event-time lag."""
        if len(batch) == 0:
            return
        newest = int(np.argmax(batch.ts))
        ts_s = float(batch.ts[newest]) / US_PER_S
        if ts_s <= self._newest.get(batch.node_id, float("-inf")):
            return
        self._newest[batch.node_id] = ts_s
        metrics.NODE_LAST_READING.labels(batch.node_id).set(ts_s)
        pressure = batch.values[newest, COL["pressure"]]
        if not np.isnan(pressure):
            metrics.NODE_PRESSURE.labels(batch.node_id).set(float(pressure))
        if batch.score is not None:
            metrics.NODE_ANOMALY_SCORE.labels(batch.node_id).set(float(batch.score[newest]))
        metrics.EVENT_TIME_LAG.set(max(0.0, time.time() - max(self._newest.values())))


class OpenAnomalies:
    """Keeps ``waterflow_active_anomalies`` equal to the number of open events per node and kind."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, str]] = {}

    def record(self, events: list[AnomalyEvent]) -> None:
        """Count events that opened, uncount those that closed."""
        for e in events:
            was_open = e.anomaly_id in self._open
            if e.ended_at is None and not was_open:
                self._open[e.anomaly_id] = (e.node_id, e.kind)
                metrics.ACTIVE_ANOMALIES.labels(e.node_id, e.kind).inc()
            elif e.ended_at is not None and was_open:
                node_id, kind = self._open.pop(e.anomaly_id)
                metrics.ACTIVE_ANOMALIES.labels(node_id, kind).dec()
