"""What the pipeline tells Prometheus: counts, per-node state and open anomalies.

Called from ``op.inspect`` steps of the flow; only updates the metrics of
``connectors.metrics`` (serving them is the caller's business).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from prometheus_client import Gauge

from connectors import metrics
from dataflows.model import COL, US_PER_S, AnomalyEvent, NodeInfo, Quarantined, ReadingBatch
from dataflows.rows import RunCounts
from dataflows.topology import Network

#: ``district`` label of nodes no file or topology places in a district. Not empty: an empty
#: label is no label in Prometheus, and Alertmanager would group such nodes with no district.
NO_DISTRICT = "unknown"


def record_network(network: Network) -> None:
    """The service pressure band, so PressureOutOfBand uses the same band as the KPIs."""
    lo, hi = network.pressure_band
    metrics.PRESSURE_BAND_LOW.set(lo)
    metrics.PRESSURE_BAND_HIGH.set(hi)


class NodeDistricts:
    """Keeps one ``waterflow_node_info`` series per node.

    A node seen again with another district loses its old series: two series for one node
    would make the alert rules' ``group_left`` join fail (many-to-many) for that node.
    """

    def __init__(self, network: Network) -> None:
        self._network = network
        self._district: dict[str, str] = {}

    def record(self, nodes: list[NodeInfo]) -> None:
        """Nodes a chunk introduced, completed from the topology."""
        for seen in nodes:
            node = self._network.node_info(seen)
            district = node.district or NO_DISTRICT
            old = self._district.get(node.node_id)
            if old == district:
                continue
            if old is not None:
                metrics.NODE_INFO.remove(node.node_id, old)
            self._district[node.node_id] = district
            metrics.NODE_INFO.labels(node.node_id, district).set(1)


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
        self._newest_of_all = float("-inf")  # kept as it grows: max() over every node was O(n)

    def record(self, batch: ReadingBatch) -> None:
        """The node's newest event time, pressure and anomaly score, and the event-time lag."""
        if len(batch) == 0:
            return
        newest = int(np.argmax(batch.ts))
        ts_s = float(batch.ts[newest]) / US_PER_S
        if ts_s <= self._newest.get(batch.node_id, float("-inf")):
            return
        self._newest[batch.node_id] = ts_s
        self._newest_of_all = max(self._newest_of_all, ts_s)
        metrics.NODE_LAST_READING.labels(batch.node_id).set(ts_s)
        pressure = batch.values[newest, COL["pressure"]]
        if not np.isnan(pressure):
            metrics.NODE_PRESSURE.labels(batch.node_id).set(float(pressure))
        if batch.score is not None:
            metrics.NODE_ANOMALY_SCORE.labels(batch.node_id).set(float(batch.score[newest]))
        metrics.EVENT_TIME_LAG.set(max(0.0, time.time() - self._newest_of_all))


class OpenAnomalies:
    """Keeps ``waterflow_active_anomalies`` equal to the number of open events per node and kind.

    One per process (``OPEN_ANOMALIES``), like the gauge it drives: a second flow in the same
    process (a test, a replay of the same files) that reports an event already open must not
    count it twice. Workers are threads of one process, hence the lock.
    """

    def __init__(self, gauge: Gauge = metrics.ACTIVE_ANOMALIES) -> None:
        self._gauge = gauge  # labelled (node or district, kind)
        self._open: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def record(self, events: list[AnomalyEvent]) -> None:
        """Count events that opened, uncount those that closed."""
        with self._lock:
            self._record(events)

    def _record(self, events: list[AnomalyEvent]) -> None:
        for e in events:
            was_open = e.anomaly_id in self._open
            if e.ended_at is None and not was_open:
                self._open[e.anomaly_id] = (e.node_id, e.kind)
                self._gauge.labels(e.node_id, e.kind).inc()
            elif e.ended_at is not None and was_open:
                node_id, kind = self._open.pop(e.anomaly_id)
                self._gauge.labels(node_id, kind).dec()


OPEN_ANOMALIES = OpenAnomalies()
#: District events (the balance's night flow: node_id is the district), on a gauge of their
#: own so alerts label them with their district rather than as an unknown node.
OPEN_DISTRICT_ANOMALIES = OpenAnomalies(metrics.DISTRICT_ACTIVE_ANOMALIES)
