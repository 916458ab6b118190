"""The alert path end to end: replay -> /metrics -> Prometheus -> Alertmanager -> webhook.

Real Prometheus and Alertmanager (Debian packages, started by deploy/local/prometheus.sh with
their own data folders and 127.0.0.1 ports), the real rule file with one change (the `for` of
PressureOutOfBand shortened from 5m to 2s, nothing else), the Alertmanager template rendered
with a loopback webhook and 0s/1s grouping. A replay of a small file whose last pressure is
below the service band, served with --metrics-port and --metrics-linger, must page the
on-call webhook; when the replay's metrics server goes away the alert must resolve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, WAIT_S, alert_stack, get, shortened_rules

pytestmark = pytest.mark.integration

LINGER_S = 15  # metrics served after the replay; the page comes within a few seconds of it


@pytest.fixture
def stack(tmp_path) -> Iterator[dict]:
    rules = shortened_rules({"PressureOutOfBand": {"for: 5m": "for: 2s"}})
    with alert_stack(tmp_path, rules) as running:
        yield running


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
            _, text = get(f"{metrics_url}/metrics")
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
        assert get(f"{metrics_url}/healthz")[0] == 503

        # The fault clears when the replay's metrics server goes away after --metrics-linger
        # (its series turn stale at Prometheus's next failed scrape).
        deadline = time.monotonic() + LINGER_S + WAIT_S
        while get(f"{metrics_url}/metrics")[0] != 0 and time.monotonic() < deadline:
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
