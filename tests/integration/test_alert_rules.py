"""Alert rules and Alertmanager configuration, checked by the real promtool and amtool.

The tools come from the Debian packages that deploy/local/install-debs.sh installs (make test
runs it); a missing tool fails the test with what to install, it is never skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
PROM = REPO / "prometheus"
RULES = PROM / "rules" / "waterflow.yml"
ALERTS = (
    "NodeSilent",
    "PressureOutOfBand",
    "LeakSuspected",
    "AnomalyDetected",
    "PipelineStalled",
    "SinkFailing",
    "QuarantineRateHigh",
    "ConsumerLagHigh",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run deploy/local/install-debs.sh", pytrace=False)
    return path


def _run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if ok:
        assert res.returncode == 0, f"{args} failed:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def am_config(tmp_path_factory) -> Path:
    """prometheus/alertmanager.yml rendered with its defaults, as deploy/local renders it."""
    out = tmp_path_factory.mktemp("am") / "alertmanager.yml"
    _run("bash", REPO / "deploy/local/prometheus.sh", "render-alertmanager", out)
    return out


def test_promtool_checks_the_config_and_the_rules():
    res = _run(_tool("promtool"), "check", "config", PROM / "prometheus.yml")
    # The rules glob picks up rules/ only: the unit tests in tests/ are no rule files.
    assert "1 rule files found" in res.stdout
    _run(_tool("promtool"), "check", "rules", *sorted((PROM / "rules").glob("*.yml")))


def test_promtool_unit_tests_pass():
    _run(_tool("promtool"), "test", "rules", *sorted((PROM / "tests").glob("*.yml")))


def test_every_alert_is_there_with_severity_annotations_runbook_and_a_unit_test():
    text = RULES.read_text()
    blocks = re.split(r"\n\s+- (?=alert:|record:)", text)[1:]
    found = {}
    for block in blocks:
        m = re.match(r"alert: (\w+)", block)
        if m:
            found[m.group(1)] = block
    assert sorted(found) == sorted(ALERTS)
    tests = "\n".join(p.read_text() for p in (PROM / "tests").glob("*.yml"))
    for name, block in found.items():
        assert re.search(r"severity: (page|ticket|info)\n", block), name
        for key in ("summary", "description", "runbook_url"):
            assert f"{key}:" in block, f"{name} has no {key}"
        url = re.search(r"runbook_url: (\S+)", block).group(1)
        assert url.endswith(f"prometheus/runbooks/{name}.md"), url
        runbook = (PROM / "runbooks" / f"{name}.md").read_text()
        assert "amtool" in runbook and "silence add" in runbook, f"{name}.md: how to silence"
        assert f"alertname: {name}" in tests, f"no promtool test for {name}"


def test_a_broken_rule_fails_promtool(tmp_path):
    # The checks above would pass vacuously if promtool ignored what it reads.
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.read_text().replace("> 1800", "> > 1800", 1))
    assert _run(_tool("promtool"), "check", "rules", bad, ok=False).returncode != 0


def test_amtool_checks_the_rendered_config(am_config):
    res = _run(_tool("amtool"), "check-config", am_config)
    assert "2 inhibit rules" in res.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=page", "alertname=NodeSilent", "district=d1"], "oncall"),
        (["severity=page", "alertname=PipelineStalled"], "oncall"),
        (["severity=ticket", "alertname=QuarantineRateHigh"], "tickets"),
        (["severity=info", "alertname=AnomalyDetected"], "blackhole"),
        (["alertname=SomethingElse"], "tickets"),
    ],
)
def test_routes(am_config, labels, receiver):
    _run(
        _tool("amtool"), "config", "routes", "test", f"--config.file={am_config}",
        f"--verify.receivers={receiver}", *labels,
    )


def test_pages_go_to_the_configured_receiver(tmp_path):
    out = tmp_path / "am.yml"
    env_run = subprocess.run(
        ["bash", str(REPO / "deploy/local/prometheus.sh"), "render-alertmanager", str(out)],
        env={"PATH": "/usr/bin:/bin", "WATERFLOW_ONCALL_RECEIVER": "oncall-pagerduty",
             "WATERFLOW_ONCALL_WEBHOOK_URL": "https://hooks.example.org/page"},
        capture_output=True, text=True, timeout=30,
    )
    assert env_run.returncode == 0, env_run.stderr
    assert "https://hooks.example.org/page" in out.read_text()
    _run(_tool("amtool"), "check-config", out)
    _run(
        _tool("amtool"), "config", "routes", "test", f"--config.file={out}",
        "--verify.receivers=oncall-pagerduty", "severity=page", "alertname=LeakSuspected",
    )


def test_node_alerts_group_by_district_and_alertname(am_config):
    text = am_config.read_text()
    assert "group_by: [district, alertname]" in text
    # The inhibition names scope=node; every node alert must carry it.
    assert 'target_matchers: [scope="node"]' in text
    rules = RULES.read_text()
    for name in ("NodeSilent", "PressureOutOfBand", "LeakSuspected", "AnomalyDetected"):
        block = rules.split(f"alert: {name}", 1)[1].split("- alert:", 1)[0]
        assert "scope: node" in block and "group_left (district)" in block, name
