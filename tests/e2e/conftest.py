"""Real Prometheus and Alertmanager on loopback, with a webhook receiver, for the e2e tests.

Prometheus and Alertmanager are the Debian packages, started by deploy/local/prometheus.sh with
their own data folders and free 127.0.0.1 ports; the Alertmanager template is rendered with a
loopback webhook and 0s/1s grouping. A test passes the rule file it wants (the real one with
some ``for:`` durations shortened, nothing else) and the port its flow serves /metrics on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "deploy" / "local" / "prometheus.sh"
RULES = REPO / "prometheus" / "rules" / "waterflow.yml"
WAIT_S = 60  # upper bound of every wait for an alert


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shortened_rules(changes: dict[str, dict[str, str]]) -> str:
    """The real rule file with, per alert, some of its own text replaced (each exactly once).

    ``{"PressureOutOfBand": {"for: 5m": "for: 2s"}}`` changes only that alert's ``for``.
    """
    text = RULES.read_text()
    for alert, edits in changes.items():
        head = re.search(rf"- alert: {alert}\n", text)
        assert head, f"alert {alert} not in {RULES}"
        tail = text.find("- alert:", head.end())
        body = text[head.end(): tail if tail >= 0 else len(text)]
        for old, new in edits.items():
            assert body.count(old) == 1, f"{old!r} not once in {alert}"
            body = body.replace(old, new)
        text = text[: head.end()] + body + (text[tail:] if tail >= 0 else "")
    return text


class Webhook:
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

    def wait_for(self, status: str, alertname: str,
                 timeout_s: float = WAIT_S) -> tuple[float, str, dict, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, path, msg in list(self.received):
                for alert in msg["alerts"]:
                    if alert["status"] == status and alert["labels"]["alertname"] == alertname:
                        return at, path, msg, alert
            time.sleep(0.1)
        pytest.fail(f"no {status} {alertname} within {timeout_s} s; got {self.received}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


@contextmanager
def alert_stack(tmp_path: Path, rules: str) -> Iterator[dict]:
    """Prometheus + Alertmanager + webhook on free loopback ports; stopped by their pids."""
    for tool in ("prometheus", "prometheus-alertmanager", "envsubst"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} not found: run deploy/local/install-debs.sh", pytrace=False)
    hook = Webhook()
    ports = {"prom": free_port(), "am": free_port(), "metrics": free_port()}
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


