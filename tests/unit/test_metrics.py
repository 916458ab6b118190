"""connectors.metrics.serve and the observe helpers behind the alert rules' labels."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from connectors import metrics
from dataflows import observe
from dataflows.model import NodeInfo
from dataflows.topology import Network, NodeSpec


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_exposes_metrics_and_health_then_releases_the_port():
    server = metrics.serve(0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/healthz") == (200, "ok\n")
        status, text = _get(f"{base}/metrics")
        assert status == 200
        for family in ("waterflow_readings_total", "waterflow_node_info",
                       "waterflow_kafka_consumer_lag_messages",
                       "waterflow_last_batch_timestamp_seconds"):
            assert f"# TYPE {family.removesuffix('_total')}" in text
        server.finished()
        assert _get(f"{base}/healthz") == (503, "finished\n")
        assert _get(f"{base}/metrics")[0] == 200  # still served while lingering
    finally:
        server.stop()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):  # nobody listens now
        s.connect(("127.0.0.1", server.port))


def test_serve_names_the_address_when_the_port_is_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            metrics.serve(port)


def test_node_info_keeps_one_series_per_node():
    def info(node, district):
        return metrics.REGISTRY.get_sample_value(
            "waterflow_node_info", {"node_id": node, "district": district}
        )

    network = Network(nodes={"m1": NodeSpec("m1", district="north")})
    districts = observe.NodeDistricts(network)
    districts.record([NodeInfo("m1", "m1"), NodeInfo("m2", "m2")])
    assert info("m1", "north") == 1 and info("m2", observe.NO_DISTRICT) == 1
    # The same node seen with a district later: the old series goes (one per node, or the
    # rules' group_left join would fail for it).
    districts.record([NodeInfo("m2", "m2", district="south")])
    assert info("m2", observe.NO_DISTRICT) is None and info("m2", "south") == 1


def test_pressure_band_comes_from_the_network():
    observe.record_network(Network(pressure_band=(2.0, 6.5)))
    assert metrics.REGISTRY.get_sample_value("waterflow_pressure_band_low_bar") == 2.0
    assert metrics.REGISTRY.get_sample_value("waterflow_pressure_band_high_bar") == 6.5


def test_metrics_port_from_the_environment(monkeypatch, capsys):
    from dataflows.config_check import ConfigError, pick, port

    monkeypatch.setenv("WATERFLOW_METRICS_PORT", "9108")
    assert port(pick("--metrics-port", None, "WATERFLOW_METRICS_PORT")) == 9108
    monkeypatch.setenv("WATERFLOW_METRICS_PORT", "")
    assert port(pick("--metrics-port", None, "WATERFLOW_METRICS_PORT")) is None
    monkeypatch.setenv("WATERFLOW_METRICS_PORT", "nine")
    with pytest.raises(ConfigError, match="WATERFLOW_METRICS_PORT: must be a port number"):
        port(pick("--metrics-port", None, "WATERFLOW_METRICS_PORT"))
