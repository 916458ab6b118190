"""Where the /metrics server binds: loopback by default, WATERFLOW_METRICS_ADDR when set."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from connectors import metrics
from dataflows.config_check import UNREACHABLE, ConfigError, serve_metrics


def _bound(server: metrics.MetricsServer) -> str:
    return server._server.socket.getsockname()[0]


def _health(host: str, port: int) -> int:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as r:
        return r.status


def test_loopback_by_default(monkeypatch):
    monkeypatch.delenv(metrics.ADDR_ENV, raising=False)
    server = metrics.serve(0)
    try:
        assert server.addr == _bound(server) == "127.0.0.1"
        assert _health("127.0.0.1", server.port) == 200
    finally:
        server.stop()


def test_the_address_from_the_environment(monkeypatch):
    # 127.0.0.2 is loopback too (127/8), so the test needs no network, yet tells it apart
    monkeypatch.setenv(metrics.ADDR_ENV, "127.0.0.2")
    server = metrics.serve(0)
    try:
        assert server.addr == _bound(server) == "127.0.0.2"
        assert _health("127.0.0.2", server.port) == 200
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", server.port))  # not on 127.0.0.1 any more
    finally:
        server.stop()


def test_every_interface_for_containers(monkeypatch):
    monkeypatch.setenv(metrics.ADDR_ENV, "0.0.0.0")
    server = metrics.serve(0)
    try:
        assert _bound(server) == "0.0.0.0"
        assert _health("127.0.0.1", server.port) == _health("127.0.0.2", server.port) == 200
    finally:
        server.stop()


def test_an_explicit_address_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(metrics.ADDR_ENV, "0.0.0.0")
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        assert _bound(server) == "127.0.0.1"
    finally:
        server.stop()


def test_an_address_that_cannot_be_bound_names_it_and_the_cause(monkeypatch):
    monkeypatch.setenv(metrics.ADDR_ENV, "no-such-host.invalid")
    with pytest.raises(OSError) as raised:
        metrics.serve(0)
    # the cause alone in strerror (the command line words its own one-line error with it)
    assert raised.value.filename == "no-such-host.invalid:0"
    assert raised.value.strerror and "no-such-host" not in raised.value.strerror
    assert "no-such-host.invalid:0" in str(raised.value)


def test_a_taken_port_is_one_line_naming_the_setting_and_the_address(monkeypatch):
    monkeypatch.delenv(metrics.ADDR_ENV, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            serve_metrics("--metrics-port", port)
    assert str(raised.value).startswith(f"--metrics-port: cannot serve on 127.0.0.1:{port}: ")
    assert "\n" not in str(raised.value) and raised.value.exit_code == UNREACHABLE
