"""Prometheus metrics of the dataflows (DESIGN.md, "Metrics and alerts").

Names follow ``waterflow_<what>_<unit>``. Label cardinality is bounded: ``reason``, ``tier``,
``table``, ``kind`` and ``outcome`` take a handful of values each; ``node_id`` appears only on
the per-node gauges that per-node alerts need (NodeSilent, PressureOutOfBand, LeakSuspected),
one series per node of the network.

Metrics live in their own registry (not the process-global one), so tests and several flows
in one process do not see each other's counts; ``serve`` exposes it over HTTP with a health
endpoint, on loopback unless ``WATERFLOW_METRICS_ADDR`` says otherwise (a container sets
``0.0.0.0`` so that Prometheus and the probes reach it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

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
DISTRICT_ACTIVE_ANOMALIES = Gauge(
    "waterflow_district_active_anomalies",
    "Open anomaly events of a district's water balance (its night flow) per kind.",
    ["district", "kind"],
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
NODE_INFO = Gauge(
    "waterflow_node_info",
    "Always 1: the district of each node the flow has seen (from the file or the network "
    "topology). Alert rules join it on node_id to label node alerts with their district.",
    ["node_id", "district"],
    registry=REGISTRY,
)
PRESSURE_BAND_LOW = Gauge(
    "waterflow_pressure_band_low_bar",
    "Lower end of the service pressure band of the network file (PressureOutOfBand).",
    registry=REGISTRY,
)
PRESSURE_BAND_HIGH = Gauge(
    "waterflow_pressure_band_high_bar",
    "Upper end of the service pressure band of the network file (PressureOutOfBand).",
    registry=REGISTRY,
)
KAFKA_CONSUMER_LAG = Gauge(
    "waterflow_kafka_consumer_lag_messages",
    "Messages between the newest offset of a Kafka partition and the flow's position in it "
    "(ConsumerLagHigh). Set by the Kafka flow only; replays of files never set it.",
    ["topic", "partition"],
    registry=REGISTRY,
)


class _QuietHandler(WSGIRequestHandler):
    """No access log: a scrape every few seconds would drown the replay's own output."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not hold up the health check (or another scraper).
    daemon_threads = True


@dataclass
class MetricsServer:
    """``/metrics`` (the project registry) and ``/healthz`` on one port, in a daemon thread.

    ``/healthz`` answers 200 ``ok`` while ``running`` is true (the flow runs) and 503 after
    ``finished()``, so a lingering replay still serves metrics but no longer claims to work.
    """

    port: int
    addr: str
    running: bool = True
    _server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def finished(self) -> None:
        """The flow has ended: metrics stay served, health turns 503."""
        self.running = False

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _app(state: MetricsServer, registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            status = "200 OK" if state.running else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n" if state.running else b"finished\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    return app


#: The address the metrics server binds to, when set (default: loopback only).
ADDR_ENV = "WATERFLOW_METRICS_ADDR"
DEFAULT_ADDR = "127.0.0.1"


def bind_address(environ: Mapping[str, str] | None = None) -> str:
    """``WATERFLOW_METRICS_ADDR`` if set, else loopback.

    >>> bind_address({}), bind_address({"WATERFLOW_METRICS_ADDR": " 0.0.0.0 "})
    ('127.0.0.1', '0.0.0.0')
    """
    env = os.environ if environ is None else environ
    return env.get(ADDR_ENV, "").strip() or DEFAULT_ADDR


def serve(
    port: int, addr: str | None = None, registry: CollectorRegistry = REGISTRY
) -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on ``addr:port`` (port 0: any free port).

    ``addr`` defaults to :func:`bind_address`: loopback unless ``WATERFLOW_METRICS_ADDR`` is
    set, since exposing the metrics beyond the host is a deployment decision. Raises
    ``OSError`` naming the address when it cannot be bound (port taken, no such address).
    """
    if addr is None:
        addr = bind_address()
    state = MetricsServer(port=port, addr=addr)
    try:
        server = make_server(
            addr,
            port,
            _app(state, registry),
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        # strerror stays the cause alone, filename the address: callers word their own line.
        raise OSError(exc.errno, exc.strerror or str(exc), f"{addr}:{port}") from exc
    state.port = server.server_port
    state._server = server
    state._thread = threading.Thread(
        target=server.serve_forever, name=f"metrics-{state.port}", daemon=True
    )
    state._thread.start()
    return state
