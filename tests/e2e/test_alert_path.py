"""The alert path end to end: replay -> /metrics -> Prometheus -> Alertmanager -> webhook.

Real Prometheus and Alertmanager (Debian packages, started by deploy/local/prometheus.sh with
their own data folders and 127.0.0.1 ports), the real rule file with one change (the `for` of
PressureOutOfBand shortened from 5m to 2s, nothing else), the Alertmanager template rendered
with a loopback webhook and 0s/1s grouping. A replay of a small file whose last pressure is
below the service band, served with --metrics-port and --metrics-linger, must page the
on-call webhook; when the replay's metrics server goes away the alert must resolve.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "deploy" / "local" / "prometheus.sh"
WAIT_S = 60  # upper bound of every wait below
LINGER_S = 15  # metrics served after the replay; the page comes within a few seconds of it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Webhook:
    """Alertmanager's webhook receiver on loopback: keeps every notification it gets."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append((time.monotonic(), self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, status: str, alertname: str) -> tuple[float, str, dict, dict]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for at, path, msg in list(self.received):
                for alert in msg["alerts"]:
                    if alert["status"] == status and alert["labels"]["alertname"] == alertname:
                        return at, path, msg, alert
            time.sleep(0.1)
        pytest.fail(f"no {status} {alertname} within {WAIT_S} s; got {self.received}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


@pytest.fixture
def stack(tmp_path) -> Iterator[dict]:
    """Prometheus + Alertmanager + webhook on free loopback ports; stopped by their pids."""
    for tool in ("prometheus", "prometheus-alertmanager", "envsubst"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} not found: run deploy/local/install-debs.sh", pytrace=False)
    hook = _Webhook()
    ports = {"prom": _free_port(), "am": _free_port(), "metrics": _free_port()}
    rules = (REPO / "prometheus" / "rules" / "waterflow.yml").read_text()
    # Shorten only PressureOutOfBand's `for` (the first `for:` after its name).
    rules, n = re.subn(r"(alert: PressureOutOfBand\n(?:.*\n)*?\s+for:) 5m", r"\1 2s", rules)
    assert n == 1, "PressureOutOfBand's for: 5m not found in the rules"
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{tmp_path}/rules.yml"]
alerting:
  alertmanagers:
    - static_configs: [{{targets: ["127.0.0.1:{ports['am']}"]}}]
scrape_configs:
  - job_name: waterflow
    static_configs: [{{targets: ["127.0.0.1:{ports['metrics']}"]}}]
"""
    )
    env = {
        **os.environ,
        "PROMETHEUS_PORT": str(ports["prom"]),
        "ALERTMANAGER_PORT": str(ports["am"]),
        "PROMETHEUS_CONFIG": str(tmp_path / "prometheus.yml"),
        "WATERFLOW_ONCALL_WEBHOOK_URL": f"http://127.0.0.1:{hook.port}/oncall",
        "WATERFLOW_TICKET_WEBHOOK_URL": f"http://127.0.0.1:{hook.port}/tickets",
        "WATERFLOW_AM_GROUP_WAIT": "0s",
        "WATERFLOW_AM_GROUP_INTERVAL": "1s",
        "WATERFLOW_AM_REPEAT_INTERVAL": "1h",
    }
    run_dir = tmp_path / "stack"
    try:
        started = subprocess.run(
            ["bash", str(SCRIPT), "start", str(run_dir)], env=env, capture_output=True,
            text=True, timeout=WAIT_S,
        )
        assert started.returncode == 0, f"prometheus.sh start failed:\n{started.stderr}"
        yield {"ports": ports, "hook": hook, "dir": tmp_path}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(run_dir)], timeout=WAIT_S)
        hook.close()


def _fault_file(path: Path) -> None:
    """Twelve hourly readings of one node; the last pressure is 0.6 bar, under 1.5."""
    t0 = datetime(2024, 11, 13, tzinfo=UTC)
    lines = ["node_id,timestamp,flow_rate,pressure"]
    for i in range(12):
        pressure = 0.6 if i == 11 else 3.9
        ts = (t0 + timedelta(hours=i)).isoformat()
        lines.append(f"e2e-low,{ts},{10 + i * 0.1:.2f},{pressure:.2f}")
    path.write_text("\n".join(lines) + "\n")


def test_a_pressure_fault_pages_the_oncall_webhook_and_resolves(stack, tmp_path):
    ports, hook = stack["ports"], stack["hook"]
    data = tmp_path / "fault.csv"
    _fault_file(data)
    network = tmp_path / "network.toml"
    network.write_text(
        '[defaults]\npressure_band = [1.5, 7.0]\n[districts.d9]\nname = "E2E"\n'
        '[nodes."e2e-low"]\ndistrict = "d9"\n'
    )
    metrics_url = f"http://127.0.0.1:{ports['metrics']}"
    replay = subprocess.Popen(
        [sys.executable, "-m", "dataflows.cli", "replay", str(data), "--quiet",
         "--out", str(tmp_path / "out"), "--network", str(network),
         "--now", "2025-01-01T00:00:00+00:00",
         "--metrics-port", str(ports["metrics"]), "--metrics-linger", str(LINGER_S)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # The fault is visible once the replay's /metrics shows the low pressure.
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            _, text = _get(f"{metrics_url}/metrics")
            if 'waterflow_node_pressure_bar{node_id="e2e-low"} 0.6' in text:
                break
            assert replay.poll() is None, replay.communicate()[0]
            time.sleep(0.1)
        else:
            pytest.fail(f"the replay never exposed the low pressure at {metrics_url}")
        fault_at = time.monotonic()
        assert 'waterflow_node_info{district="d9",node_id="e2e-low"} 1.0' in text

        paged_at, path, msg, alert = hook.wait_for("firing", "PressureOutOfBand")
        assert path == "/oncall" and msg["receiver"] == "oncall"
        assert alert["labels"]["severity"] == "page"
        assert alert["labels"]["node_id"] == "e2e-low"
        assert alert["labels"]["district"] == "d9"
        assert msg["groupLabels"] == {"alertname": "PressureOutOfBand", "district": "d9"}
        assert alert["annotations"]["runbook_url"].endswith("runbooks/PressureOutOfBand.md")
        # Still lingering: metrics served, but the flow is over.
        assert _get(f"{metrics_url}/healthz")[0] == 503

        # The fault clears when the replay's metrics server goes away after --metrics-linger
        # (its series turn stale at Prometheus's next failed scrape).
        deadline = time.monotonic() + LINGER_S + WAIT_S
        while _get(f"{metrics_url}/metrics")[0] != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped_at = time.monotonic()
        resolved_at, path, _, alert = hook.wait_for("resolved", "PressureOutOfBand")
        out, _ = replay.communicate(timeout=WAIT_S)
        assert replay.returncode == 0, out
        assert path == "/oncall" and alert["labels"]["node_id"] == "e2e-low"
        print(
            f"\nfault visible -> page: {paged_at - fault_at:.1f} s; "
            f"metrics gone -> resolve: {resolved_at - stopped_at:.1f} s"
        )
    finally:
        if replay.poll() is None:
            replay.terminate()  # only the replay this test started, by its pid
            replay.wait(timeout=10)
        _stop_embedded_postgres(tmp_path / "out" / "pg")


def _stop_embedded_postgres(data_dir: Path) -> None:
    """The replay's embedded PostgreSQL (pgserver) outlives the replay: stop it by its pid."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_file.exists():
        time.sleep(0.1)
