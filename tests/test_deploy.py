"""`make deploy-check`: the deploy stack validated with the real tools.

docker-compose validates the compose file (no engine needed), promtool checks
the Prometheus config and rules and runs the rules' unit tests, and a real
Prometheus (Debian's) scrapes a live gateway in namespaces, with a connected
client passing traffic, while every dashboard panel's query is evaluated
through Prometheus' HTTP API.
"""

import json
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from netlab import Lab, http_get, wait_for
from netlab.gateway import LAN_HOST, METRICS_PORT, GatewayLab

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_PORT = 9090


def run(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_compose_file_validates():
    run("docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q")


def test_health_checks_ask_the_auth_service_itself():
    """The compose health check is gRPC health on the client port (`pushgate-auth
    --check`, tested against a locked database and a wedged loop in
    test_auth_service.py), and systemd restarts an auth service whose self-check
    stops petting the watchdog."""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    auth = compose.split("\n  auth:\n", 1)[1].split("\n  dataplane:\n", 1)[0]
    assert '"pushgate-auth", "--config", "/var/lib/pushgate/pushgate.toml", "--check"' in auth
    unit = (DEPLOY / "systemd" / "pushgate-auth.service").read_text().splitlines()
    for setting in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "LimitNOFILE=65536"):
        assert setting in unit, setting


def alert_names() -> list[str]:
    """Every alert in the rules file (it holds alerts only)."""
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    return [
        line.split(":", 1)[1].strip()
        for line in rules.splitlines()
        if line.strip().startswith("- alert:")
    ]


def test_prometheus_config_and_rules_pass_promtool():
    run("promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    out = run("promtool", "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")).stdout
    assert f"SUCCESS: {len(alert_names())} rules found" in out


def test_every_alert_fires_in_the_rule_unit_tests():
    run("promtool", "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))
    tests = (DEPLOY / "prometheus" / "rules_test.yml").read_text()
    alerts = alert_names()
    assert "PushgateReceiveLoopStalled" in alerts and len(alerts) == len(set(alerts))
    for alert in alerts:
        assert f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in tests, alert


def test_dashboards_match_their_generator():
    run(sys.executable, str(DEPLOY / "grafana" / "dashboards.py"), "--check")


def dashboard_queries() -> list[tuple[str, str, str]]:
    queries = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                queries.append((dashboard["title"], panel["title"], target["expr"]))
    return queries


def query(ns: str, expr: str) -> dict:
    path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(http_get(ns, PROMETHEUS_PORT, path))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deploy")
    with Lab("pgdeploy") as lab:
        gateway = GatewayLab(lab, str(workdir))
        gateway.add_user("alice")
        gateway.start()
        gateway.connect(0, "alice")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{DEPLOY / 'prometheus' / 'rules.yml'}]\n"
            "scrape_configs:\n"
            "  - job_name: pushgate-auth\n"
            "    static_configs: [{targets: ['127.0.0.1:9101']}]\n"
            "  - job_name: pushgate-dataplane\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{METRICS_PORT}']}}]\n"
            "  - job_name: node\n"
            "    static_configs: [{targets: ['127.0.0.1:9100']}]\n"
        )
        with open(workdir / "node-exporter.log", "w") as log:
            lab.start(
                gateway.gw,
                ["prometheus-node-exporter", "--web.listen-address=127.0.0.1:9100"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with open(workdir / "prometheus.log", "w") as log:
            lab.start(
                gateway.gw,
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Traffic both ways and a roaming client while Prometheus scrapes.
        gateway.ping(0, LAN_HOST, count=10)
        gateway.signal_client(0, signal.SIGUSR1)  # a new source port
        gateway.ping(0, LAN_HOST, count=10)
        wait_for(lambda: _up_targets(gateway.gw) == 3, 30, what="all three targets scraped")
        time.sleep(3)
        yield gateway


def _up_targets(ns: str) -> int:
    try:
        result = query(ns, "sum(up)")
    except OSError:
        return 0
    values = result.get("data", {}).get("result", [])
    return int(float(values[0]["value"][1])) if values else 0


@pytest.mark.netns
@pytest.mark.parametrize(
    ("dashboard", "panel", "expr"),
    dashboard_queries(),
    ids=[f"{d}/{p}/{i}" for i, (d, p, _) in enumerate(dashboard_queries())],
)
def test_dashboard_query_returns_live_data(live, dashboard, panel, expr):
    result = query(live.gw, expr)
    assert result["status"] == "success", result
    assert result["data"]["result"], f"{dashboard} / {panel}: no data for {expr}"


@pytest.mark.netns
def test_rules_load_in_the_live_prometheus(live):
    rules = json.loads(http_get(live.gw, PROMETHEUS_PORT, "/api/v1/rules"))
    names = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert names == set(alert_names())
    firing = json.loads(http_get(live.gw, PROMETHEUS_PORT, "/api/v1/alerts"))
    assert firing["data"]["alerts"] == []  # a healthy gateway raises nothing
