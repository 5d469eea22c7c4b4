"""The alert rules, the dashboard and the runbook's checklist speak of metrics that
exist, and every alert's PromQL does what it says (promtool, from Debian's
``prometheus`` package: a missing promtool fails these tests, as .ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agents import metrics
from tests.api.factories import completed, dead_lettered, waiting_for_approval
from tools import breakers

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "agents-runtime.json"
RUNBOOK = ROOT / "RUNBOOK.md"
METRIC = re.compile(r"\b((?:agents|django_http)_[a-z_]+)\b")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: apt-get install prometheus (as .ci/run does)"
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_alert_rules_and_the_prometheus_config_are_valid(tmp_path):
    assert "SUCCESS: 16 rules found" in promtool("check", "rules", "alerts.yml")
    # The web job reads its bearer token from a file beside the config (compose's secret
    # metrics_token); promtool wants it to exist, so the folder is checked in a copy.
    for config in PROMETHEUS.glob("*.yml"):
        shutil.copy(config, tmp_path)
    (tmp_path / "metrics_token").write_text("a-stand-in-token\n")
    promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def test_prometheus_sends_the_metrics_token_compose_gives_the_app():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (web,) = [job for job in config["scrape_configs"] if job["job_name"] == "agents-web"]
    assert web["authorization"] == {"type": "Bearer", "credentials_file": "metrics_token"}
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert (
        "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in (prometheus["volumes"])
    )
    assert {"source": "metrics_token", "target": "/etc/prometheus/metrics_token"} in (
        prometheus["secrets"]
    )
    assert compose["secrets"]["metrics_token"] == {"environment": "AGENTS_METRICS_TOKEN"}
    app_env = compose["services"]["web"]["environment"]
    assert app_env["AGENTS_METRICS_TOKEN"].startswith("${AGENTS_METRICS_TOKEN:?")


def test_every_alert_fires_in_its_unit_test_as_expected():
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def test_every_alert_has_a_case_where_it_fires():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    cases = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    firing = {
        case["alertname"]
        for test in cases["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == firing


def _alert_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def _runbook_monitoring() -> str:
    text = RUNBOOK.read_text()
    start = text.index("## Monitoring checklist")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


@pytest.mark.django_db(transaction=True)
def test_alerts_dashboard_and_runbook_name_only_metrics_the_runtime_exposes(client, user):
    completed(user)
    dead_lettered(user)
    waiting_for_approval(user)
    metrics.step_started(agent="scripted", queued_seconds=0.01)
    # A breaker in use (this run's Redis key prefix holds none yet).
    breakers.force_close("monitoring-check", actor="test")
    client.get("/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200
    exposed = {
        sample.name
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }
    sources = {
        "docker/prometheus/alerts.yml": "\n".join(_alert_expressions()),
        "docker/grafana/dashboards/agents-runtime.json": "\n".join(_dashboard_expressions()),
        "RUNBOOK.md (Monitoring checklist)": _runbook_monitoring(),
    }
    for where, text in sources.items():
        named = set(METRIC.findall(text))
        assert named, f"{where} names no metric"
        assert named <= exposed, f"{where} names metrics /metrics lacks: {named - exposed}"


def test_the_dashboard_is_grafana_json_with_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "agents-runtime"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
