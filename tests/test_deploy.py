"""`make deploy-check`: the deploy stack validated with the real tools.

docker-compose validates the compose file (no engine needed), promtool checks
the Prometheus config and rules and runs the rules' unit tests, and a real
Prometheus (Debian's) scrapes a live gateway in namespaces, with a connected
client passing traffic, while every dashboard panel's query is evaluated
through Prometheus' HTTP API; its alerts go to a real Alertmanager (Debian's
prometheus-alertmanager, with deploy/alertmanager/alertmanager.yml), which
delivers them to a webhook receiver the test runs, firing and resolved.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from dataplane import tun_steering
from netlab import Lab, directories_opened, http_get, metrics, wait_for
from netlab.gateway import LAN_HOST, METRICS_PORT, GatewayLab
from netlab.webhook import notifications

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
WEBHOOK_PORT = 9095
AUTH_METRICS_PORT = 9101


def run(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_compose_file_validates():
    assert set(compose_services(**REQUIRED_SETTINGS)) == {
        "auth",
        "dataplane",
        "prometheus",
        "alertmanager",
        "node-exporter",
        "grafana",
    }


def test_health_checks_ask_the_auth_service_itself():
    """The auth image's health check is gRPC health on the client port (`pushgate-auth
    --check`, tested against a locked database and a wedged loop in
    test_auth_service.py), and systemd restarts an auth service whose self-check
    stops petting the watchdog."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    auth = dockerfile.split(" AS auth\n", 1)[1].split("\nFROM ", 1)[0]
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


def test_alerts_reach_alertmanager_from_a_pinned_image_with_a_valid_config():
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    run("amtool", "check-config", str(config))
    services = compose_services(**REQUIRED_SETTINGS)
    image = services["alertmanager"]["image"]
    assert re.fullmatch(r"prom/alertmanager:v\d+\.\d+\.\d+", image), image
    assert any(config.name in str(volume) for volume in services["alertmanager"]["volumes"])
    from ruamel.yaml import YAML

    prometheus = YAML(typ="safe").load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [alertmanager] = prometheus["alerting"]["alertmanagers"]
    assert alertmanager["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert "send_resolved: true" in config.read_text()


def alert_annotations() -> dict[str, dict[str, str]]:
    """Each alert's annotations in the rules file."""
    from ruamel.yaml import YAML

    rules = YAML(typ="safe").load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return {
        rule["alert"]: rule["annotations"] for group in rules["groups"] for rule in group["rules"]
    }


def test_every_alert_says_what_it_means_and_links_its_runbook():
    """docs/operations.md has a section per alert (its heading is the alert's name,
    so the anchor is the name in lower case) and runbook_url points at it."""
    operations = (DEPLOY.parent / "docs" / "operations.md").read_text()
    headings = {line[4:].strip() for line in operations.splitlines() if line.startswith("### ")}
    annotations = alert_annotations()
    assert set(annotations) == set(alert_names())
    for alert, notes in annotations.items():
        assert len(notes.get("description", "")) > 40, alert
        assert notes.get("runbook_url") == f"docs/operations.md#{alert.lower()}", alert
        assert alert in headings, f"docs/operations.md has no '### {alert}'"


def test_every_alert_fires_in_the_rule_unit_tests():
    run("promtool", "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))
    tests = (DEPLOY / "prometheus" / "rules_test.yml").read_text()
    alerts = alert_names()
    assert "PushgateReceiveLoopStalled" in alerts and len(alerts) == len(set(alerts))
    for alert in alerts:
        assert f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in tests, alert


def test_dashboards_match_their_generator():
    run(sys.executable, str(DEPLOY / "grafana" / "dashboards.py"), "--check")


def dashboards() -> list[dict]:
    return [
        json.loads(path.read_text())
        for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    ]


def dashboard_queries() -> list[tuple[str, str, str]]:
    return [
        (dashboard["title"], panel["title"], target["expr"])
        for dashboard in dashboards()
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])  # rows have none
    ]


def evaluable(expr: str) -> str:
    """A panel's query as Grafana sends it with every instance picked and a 15 s
    scrape interval ($__rate_interval: four of them)."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_dashboards_are_portable_and_right_for_several_gateways():
    """Imported anywhere: the datasource is a variable; every query is limited to the
    picked instances and uses $__rate_interval (a fixed [1m] is empty at a 60 s
    scrape); panels are grouped in rows and say what they show; no query groups by a
    label that grows with clients."""
    for dashboard in dashboards():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
        panels = dashboard["panels"]
        assert panels[0]["type"] == "row"
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert len(panel["description"]) > 20, panel["title"]
            for target in panel["targets"]:
                expr = target["expr"]
                assert 'instance=~"$instance"' in expr, (panel["title"], expr)
                assert not re.search(r"\[\d+[smh]\]", expr), (panel["title"], expr)
                if "rate(" in expr:
                    assert "[$__rate_interval]" in expr, (panel["title"], expr)
                assert not re.search(r"\b(session|source|endpoint|address)\b", expr), expr
                if re.search(r"\buser\b", expr):  # the opt-in per-account families only
                    assert expr.startswith("topk(10, ") and "_user_" in expr, expr


def query(ns: str, expr: str) -> dict:
    path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(http_get(ns, PROMETHEUS_PORT, path))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deploy")
    with Lab("pgdeploy") as lab:
        gateway = GatewayLab(lab, str(workdir))
        # the opt-in per-user families, for the dashboards' "Users" row
        text = Path(gateway.config).read_text()
        Path(gateway.config).write_text(text.replace("user_metrics = false", "user_metrics = true"))
        gateway.add_user("alice")
        gateway.start()
        gateway.connect(0, "alice")
        # The rules as shipped, but PushgateDataplaneDown's `for: 1m` waits 5 s here:
        # promtool holds the durations (rules_test.yml); this holds the delivery path.
        rules = workdir / "rules.yml"
        shipped = (DEPLOY / "prometheus" / "rules.yml").read_text()
        rules.write_text(
            shipped.replace(
                'alert: PushgateDataplaneDown\n        expr: up{job="pushgate-dataplane"} == 0\n'
                "        for: 1m\n",
                'alert: PushgateDataplaneDown\n        expr: up{job="pushgate-dataplane"} == 0\n'
                "        for: 5s\n",
            )
        )
        assert rules.read_text() != shipped
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules}]\n"
            "alerting:\n"
            "  alertmanagers:\n"
            f"    - static_configs: [{{targets: ['127.0.0.1:{ALERTMANAGER_PORT}']}}]\n"
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
        gateway.alerts = start_alert_delivery(lab, gateway.gw, workdir)
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


def start_alert_delivery(lab: Lab, ns: str, workdir: Path) -> Path:
    """Debian's Alertmanager with the stack's configuration, its receiver's URL set to
    a webhook receiver run here and its waits shortened from minutes to a second
    (the routing, grouping and inhibition are the file's); returns the file the
    receiver writes each notification to."""
    shipped = (DEPLOY / "alertmanager" / "alertmanager.yml").read_text()
    url = re.search(r"- url: (\S+)", shipped).group(1)
    config = shipped.replace(url, f"http://127.0.0.1:{WEBHOOK_PORT}/pushgate")
    for wait in ("group_wait", "group_interval"):
        config = re.sub(rf"{wait}: \S+", f"{wait}: 1s", config)
    (workdir / "alertmanager.yml").write_text(config)
    received = workdir / "alerts.jsonl"
    with open(workdir / "webhook.log", "w") as log:
        lab.start(
            ns,
            [
                *(sys.executable, "-m", "netlab.webhook"),
                *("--listen", f"127.0.0.1:{WEBHOOK_PORT}", "--out", str(received)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=DEPLOY.parent,
        )
    with open(workdir / "alertmanager.log", "w") as log:
        lab.start(
            ns,
            [
                "prometheus-alertmanager",
                f"--config.file={workdir / 'alertmanager.yml'}",
                f"--storage.path={workdir / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{ALERTMANAGER_PORT}",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for(lambda: _answers(ns, ALERTMANAGER_PORT, "/-/ready"), 30, what="Alertmanager")
    return received


def _answers(ns: str, port: int, path: str) -> bool:
    try:
        http_get(ns, port, path)
    except OSError:
        return False
    return True


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
    result = query(live.gw, evaluable(expr))
    assert result["status"] == "success", result
    assert result["data"]["result"], f"{dashboard} / {panel}: no data for {expr}"


@pytest.mark.netns
def test_rules_load_in_the_live_prometheus(live):
    rules = json.loads(http_get(live.gw, PROMETHEUS_PORT, "/api/v1/rules"))
    names = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert names == set(alert_names())
    firing = json.loads(http_get(live.gw, PROMETHEUS_PORT, "/api/v1/alerts"))
    assert firing["data"]["alerts"] == []  # a healthy gateway raises nothing


@pytest.mark.netns
@pytest.mark.parametrize("port", [AUTH_METRICS_PORT, METRICS_PORT], ids=["auth", "dataplane"])
def test_live_metrics_pass_promtool_check_metrics(live, port):
    """Both endpoints as Prometheus' own linter reads them: names, units, suffixes,
    help texts; and no `_created` series (prometheus_client's default, turned off)."""
    text = http_get(live.gw, port, "/metrics").decode()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    assert "_created" not in text
    assert "process_cpu_seconds_total" in text and "pushgate_build_info" in text


@pytest.mark.netns
def test_both_services_export_process_metrics_and_one_direction_vocabulary(live):
    jobs = query(live.gw, "count by (job) (process_resident_memory_bytes)")["data"]["result"]
    assert {sample["metric"]["job"] for sample in jobs} >= {"pushgate-auth", "pushgate-dataplane"}
    directions = query(live.gw, 'count by (direction) ({direction!=""})')["data"]["result"]
    assert {sample["metric"]["direction"] for sample in directions} == {"inbound", "outbound"}
    left = query(live.gw, "pushgate_auth_server_certificate_not_after_timestamp_seconds - time()")
    days = float(left["data"]["result"][0]["value"][1]) / 86400
    assert 800 < days <= 825  # `init`'s server certificate (auth_service/pki.py SERVER_DAYS)


def delivered(received: Path, alertname: str, status: str) -> list[dict]:
    """The alerts named `alertname` with `status` in the webhook's notifications."""
    return [
        alert
        for notification in notifications(received)
        for alert in notification["alerts"]
        if alert["labels"]["alertname"] == alertname and alert["status"] == status
    ]


@pytest.mark.netns
def test_a_stopped_dataplane_is_alerted_to_the_webhook_and_resolved(live):
    """The whole path: the dataplane stops, Prometheus' PushgateDataplaneDown (its
    `for` shortened to 5 s in this Prometheus) fires, Alertmanager delivers it to the
    webhook; the dataplane comes back and the resolution is delivered too. (Runs
    last: it stops the dataplane of the module's gateway.)"""
    assert delivered(live.alerts, "PushgateDataplaneDown", "firing") == []
    live.lab.stop(live.dataplane)
    firing = wait_for(
        lambda: delivered(live.alerts, "PushgateDataplaneDown", "firing"),
        150,
        interval=1,
        what="PushgateDataplaneDown at the webhook",
    )
    alert = firing[0]
    assert alert["labels"]["instance"] == f"127.0.0.1:{METRICS_PORT}"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook_url"] == "docs/operations.md#pushgatedataplanedown"
    # the inhibition: nothing else about this instance went out with it
    others = [
        a
        for n in notifications(live.alerts)
        for a in n["alerts"]
        if a["labels"]["alertname"] != "PushgateDataplaneDown"
    ]
    assert others == []
    live.start_dataplane()
    resolved = wait_for(
        lambda: delivered(live.alerts, "PushgateDataplaneDown", "resolved"),
        60,
        interval=1,
        what="the resolution at the webhook",
    )
    assert resolved[0]["fingerprint"] == alert["fingerprint"]


# -- the image, without a container engine: its build context, wheel and entry point --

ROOT = DEPLOY.parent
IMAGE_UID = 10001  # the images' user `pushgate` (deploy/Dockerfile)
TUNNEL_NETWORK = "198.19.30.0/24"
GATEWAY_TUNNEL = "198.19.30.1"
IMG_GATEWAY = "198.18.30.1"
IMG_CLIENT = "198.18.30.2"


def compose_services(**environment: str) -> dict:
    """The compose file's services as `docker-compose config` resolves them with
    `environment` (the operator's settings)."""
    from ruamel.yaml import YAML

    resolved = subprocess.run(
        ["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], **environment},
        check=True,
    ).stdout
    return YAML(typ="safe").load(resolved)["services"]


REQUIRED_SETTINGS = {
    "PUSHGATE_SERVER_NAME": IMG_GATEWAY,
    "PUSHGATE_PUBLIC_ENDPOINT": f"{IMG_GATEWAY}:51820",
    "PUSHGATE_TUNNEL_NETWORK": TUNNEL_NETWORK,
}


def build_context() -> list[str]:
    """The files `docker build` sends for deploy/Dockerfile: the tree less what
    .dockerignore excludes, by the Docker SDK's implementation of Docker's rules."""
    from docker.utils.build import exclude_paths

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    paths = exclude_paths(str(ROOT), patterns, dockerfile="deploy/Dockerfile")
    return sorted(path for path in paths if (ROOT / path).is_file())


def test_the_build_context_is_the_tree_less_local_and_generated_files():
    files = build_context()
    tops = {path.split("/")[0] for path in files}
    assert {"pyproject.toml", "README.md", "protos", "deploy"} <= tops
    for excluded in (".git", ".venv", "tests", "build", "dist", "netlab"):
        assert excluded not in tops, excluded
    assert not [path for path in files if "__pycache__" in path or "_pb2" in path]
    assert "deploy/entrypoint.sh" in files and "deploy/build-wheel.sh" in files


def test_required_compose_settings_fail_fast_with_their_message():
    result = subprocess.run(
        ["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode != 0
    assert "the DNS name or address clients use for the auth service" in result.stderr


def test_compose_stack_waits_on_health_rotates_logs_and_puts_node_exporter_on_the_host():
    services = compose_services(**REQUIRED_SETTINGS)
    assert services["dataplane"]["depends_on"] == {"auth": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert services["node-exporter"]["network_mode"] == "host"
    for name, service in services.items():
        assert service["logging"]["options"]["max-size"], name
    auth = services["auth"]["environment"]
    assert auth["PUSHGATE_TUNNEL_NETWORK"] == TUNNEL_NETWORK
    assert "PUSHGATE_ADMIN_PASSWORD" not in auth  # no default account, no password
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for target in ("auth", "dataplane"):  # each image says how healthy it is
        stage = dockerfile.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "\nHEALTHCHECK " in stage, target
    assert '"pushgate-auth", "--config", "/var/lib/pushgate/pushgate.toml", "--check"' in dockerfile
    for label in ("title", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{label}=" in dockerfile


def test_the_image_workflow_builds_both_targets_with_docker():
    workflow = ROOT / ".github" / "workflows" / "image.yml"
    checker = Path(sys.executable).parent / "check-jsonschema"
    run(str(checker), "--builtin-schema", "vendor.github-workflows", str(workflow))
    text = workflow.read_text()
    assert 'docker build -f deploy/Dockerfile --target "$target"' in text
    assert "for target in auth dataplane; do" in text


# -- the systemd units' sandbox ---------------------------------------------------------

UNITS = ("pushgate-auth", "pushgate-dataplane", "pushgate-nat")


def exposure(unit: str) -> tuple[float, str]:
    """`systemd-analyze security --offline=true`'s overall exposure of a shipped unit
    (0 safest .. 10) and its rating word (Debian's systemd, which `make` installs)."""
    out = run(
        "systemd-analyze", "security", "--offline=true", str(DEPLOY / "systemd" / unit)
    ).stdout
    [line] = [line for line in out.splitlines() if "Overall exposure level" in line]
    level, rating = line.split(":")[1].split()[:2]
    return float(level), rating


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_are_sandboxed(unit):
    # the bar is 4.0 for auth and dataplane and "not UNSAFE" for the NAT step
    # (root with CAP_NET_ADMIN); each is kept at 4.0 or better
    level, rating = exposure(f"{unit}.service")
    assert level <= 4.0 and rating != "UNSAFE", (level, rating)


def unit_settings(name: str) -> dict[str, list[str]]:
    """A shipped unit's settings, a repeated key's values joined."""
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values.setdefault(key, []).extend(value.split())
    return values


def syscall_group(name: str) -> set[str]:
    """The system calls of a systemd syscall filter group (its subgroups expanded)."""
    out = run("systemd-analyze", "syscall-filter", name).stdout
    members = [line.strip() for line in out.splitlines()[1:] if line.startswith(" ")]
    calls = set()
    for member in members:
        if member.startswith("@"):
            calls |= syscall_group(member)
        elif member and not member.startswith("#"):
            calls.add(member)
    return calls


def allowed_syscalls(unit: str) -> set[str]:
    """What the unit's SystemCallFilter= (an allow list, here) lets through."""
    allowed = set()
    for entry in unit_settings(unit)["SystemCallFilter"]:
        assert not entry.startswith("~"), "an allow list is expected"
        allowed |= syscall_group(entry) if entry.startswith("@") else {entry}
    return allowed


def traced_socket_families(trace: Path) -> set[str]:
    """Address families of the sockets in an `strace -f -o` file."""
    return set(re.findall(r"\bsocket\((AF_[A-Z0-9]+),", trace.read_text()))


def traced_syscalls(trace: Path) -> set[str]:
    """System calls in an `strace -f -o` file (every thread and child)."""
    calls = set()
    for line in trace.read_text().splitlines():
        match = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
        if match:
            calls.add(match.group(1))
    return calls


def setpriv(uid: int, bounding: list[str], ambient: list[str] = ()) -> list[str]:
    """A command prefix: run as `uid` (its own group, no other) with the bounding set
    `bounding` and the ambient (and inheritable) set `ambient` (capability names
    without CAP_, lower case), as systemd or Docker would start it."""
    caps = ",".join(f"+{cap}" for cap in ambient) or "-all"
    return [
        *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
        f"--bounding-set=-all{''.join(f',+{cap}' for cap in bounding)}",
        f"--inh-caps={caps}",
        *([f"--ambient-caps={caps}"] if ambient else []),
    ]


def with_open_tun(argv: list[str]) -> list[str]:
    """`argv` in a mount namespace of its own where /dev/net/tun is a node of mode
    0666, as on a Debian host (udev's default; this machine's is 0600) and in a
    container given the host's device (a tmpfs over /dev/net there, so nothing of
    the host's changes)."""
    return [
        *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
        "mount -t tmpfs -o mode=0755 pushgate-test /dev/net"
        ' && mknod -m 0666 /dev/net/tun c 10 200 && exec "$@"',
        "sh",
        *argv,
    ]


@pytest.fixture
def installed(image_build, tmp_path):
    """The module's build, and a fresh working directory for one test."""
    return SimpleNamespace(**{**vars(image_build), "work": tmp_path})


@pytest.fixture(scope="module")
def image_build(tmp_path_factory):
    """The wheel built from exactly the build context, installed into a fresh
    virtualenv per image, as in the images' /opt/pushgate (the dataplane's with its
    file capabilities on its interpreter copy)."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for path in build_context():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, context / path)
    run(
        "env",
        f"PYTHON={sys.executable}",
        "sh",
        str(context / "deploy/build-wheel.sh"),
        str(work / "wheels"),
    )
    [wheel] = (work / "wheels").glob("pushgate-*.whl")
    venvs = {image: work / image for image in ("plain", "dataplane")}  # auth's, dataplane's

    def install(venv: Path) -> None:
        run("/usr/bin/python3", "-m", "venv", "--copies", str(venv))
        subprocess.run(
            [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
            check=True,
            capture_output=True,
            timeout=600,
        )

    with ThreadPoolExecutor() as pool:  # the two installs at once: they wait on files
        list(pool.map(install, venvs.values()))
    for python in venvs["dataplane"].glob("bin/python*"):
        run("setcap", "cap_net_admin,cap_bpf+ep", str(python))
    return SimpleNamespace(context=context, venvs=venvs, build=work)


@contextlib.contextmanager
def opened(installed: SimpleNamespace):
    """The build and the test's directory readable for the services' user."""
    with directories_opened(str(installed.build)), directories_opened(str(installed.work)):
        yield


VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.netns  # the image build sets file capabilities; namespaces
def test_every_command_of_the_wheel_says_its_version(installed):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"pushgate-auth", "pushgate-admin", "pushgate-dataplane", "pushgate-nat"} <= set(scripts)
    for name in scripts:
        out = run(str(installed.venvs["plain"] / "bin" / name), "--version").stdout
        assert out == f"{name} {VERSION} (hot path: compiled)\n"  # the wheel built it


def unit_capabilities(name: str) -> tuple[list[str], list[str]]:
    """(bounding set, ambient set) a shipped systemd unit grants, as setpriv names them."""
    values = unit_settings(name)

    def names(key: str) -> list[str]:
        return [cap.removeprefix("CAP_").lower() for cap in values.get(key, [])]

    return names("CapabilityBoundingSet"), names("AmbientCapabilities")


class Gateway:
    """The auth service and the dataplane from the wheel's virtualenvs, as the
    shipped deployments start them, in namespaces: `gw` (its interface eth0, as a
    container's) and a client namespace."""

    def __init__(self, lab: Lab, installed: SimpleNamespace) -> None:
        self.lab, self.installed, self.work = lab, installed, installed.work
        self.state = self.work / "state"  # the volumes: /var/lib/pushgate
        self.state.mkdir()
        os.chown(self.state, IMAGE_UID, IMAGE_UID)
        self.config = str(self.state / "pushgate.toml")
        self.gw, self.client_ns = lab.namespace("gw"), lab.namespace("c0")
        dev, _ = lab.link(self.gw, f"{IMG_GATEWAY}/24", self.client_ns, f"{IMG_CLIENT}/24")
        lab.exec(self.gw, ["ip", "link", "set", "dev", dev, "down"])
        lab.exec(self.gw, ["ip", "link", "set", "dev", dev, "name", "eth0"])
        lab.exec(self.gw, ["ip", "link", "set", "dev", "eth0", "up"])
        self.processes = {}

    def env(self, venv: str, **extra: str) -> dict[str, str]:
        path = f"{self.installed.venvs[venv]}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return {"PATH": path, "PUSHGATE_DIR": str(self.state), "HOME": "/", **extra}

    def tool(self, name: str) -> str:
        return str(self.installed.venvs["plain"] / "bin" / name)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.work / f"{name}.log", "w") as log:
            self.processes[name] = self.lab.start(
                self.gw, argv, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text()

    def running(self, name: str) -> None:
        assert self.processes[name].poll() is None, self.log(name)

    def wait_healthy(self) -> None:
        """The auth image's HEALTHCHECK, on which the dataplane's start waits."""
        check = [*setpriv(IMAGE_UID, []), self.tool("pushgate-auth"), "--config", self.config]

        def healthy() -> bool:
            self.running("auth")
            result = self.lab.exec(self.gw, [*check, "--check"], check=False, env=self.env("plain"))
            return result.returncode == 0

        wait_for(healthy, 60, what="the auth service's health check")

    def add_user(self, name: str) -> None:
        """As the auth service's user, with the command its first start prints."""
        self.password = self.work / "password"
        self.password.write_text("correct horse battery staple\n")
        add = [*setpriv(IMAGE_UID, []), self.tool("pushgate-admin"), "user", "add", name]
        add += ["--config", self.config, "--password-file", str(self.password)]
        self.lab.exec(self.gw, add, env=self.env("plain"))

    def dataplane_metrics(self) -> dict:
        def scrape():
            self.running("dataplane")
            try:
                return metrics.parse(http_get(self.gw, 9102, "/metrics").decode())
            except OSError:
                return None

        return wait_for(scrape, 30, what="the dataplane's /metrics")

    def assert_dataplane_holds_no_capability(self) -> None:
        """Once serving, every thread of the dataplane holds no capability (but the
        bounding set, which it may not change without CAP_SETPCAP) and no_new_privs."""
        pids = self.lab.exec(self.gw, ["ip", "netns", "pids", self.gw]).stdout.split()
        found = []
        for pid in pids:
            with contextlib.suppress(FileNotFoundError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if argv[0].endswith("python3") and argv[1].endswith("/pushgate-dataplane"):
                    found.append(pid)
        [pid] = found
        for task in Path(f"/proc/{pid}/task").iterdir():
            status = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
            )
            for held in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(status[held], 16) == 0, (status["Name"], held, status[held])
            assert status["NoNewPrivs"] == "1"
            assert status["Uid"].split()[0] == str(IMAGE_UID)

    def connect_and_ping(self, user: str) -> None:
        """A client (the wheel's) logs in and pings the gateway through the tunnel."""
        client = [self.tool("pushgate-client"), "--tun", "pgimg0"]
        client += ["--status-dir", str(self.work / "client")]
        connect = [*client, "connect", "--server", f"{IMG_GATEWAY}:7443", "--user", user]
        connect += ["--ca", str(self.state / "tls/ca.crt"), "--password-file", str(self.password)]
        with open(self.work / "client.log", "w") as log:
            self.lab.start(self.client_ns, connect, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            out = self.lab.exec(self.client_ns, [*client, "status"], check=False).stdout
            return ["state", "up"] in [line.replace(":", " ").split() for line in out.splitlines()]

        wait_for(up, 30, what="the client to come up")
        ping = ["ping", "-c", "3", "-i", "0.2", "-W", "2", GATEWAY_TUNNEL]
        result = self.lab.exec(self.client_ns, ping, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.netns  # the image build sets file capabilities; namespaces
def test_the_wheel_from_the_build_context_runs_the_compose_stack_through_the_entrypoint(
    installed,
):
    """As docker-compose.yml runs the images: both services as the images' user
    with the compose file's environment, through the entry point; the dataplane
    with the compose file's capabilities as its bounding set and the image's file
    capabilities on its interpreter, nothing else."""
    routes = f"{TUNNEL_NETWORK} 198.18.40.0/24"  # a split tunnel, passed through
    services = compose_services(**REQUIRED_SETTINGS, PUSHGATE_ROUTES=routes)
    entrypoint = ["sh", str(installed.context / "deploy/entrypoint.sh")]
    with Lab("pgimg") as lab, opened(installed):
        gateway = Gateway(lab, installed)
        auth_env = gateway.env("plain", **services["auth"]["environment"])
        gateway.start("auth", [*setpriv(IMAGE_UID, []), *entrypoint, "auth"], auth_env)
        gateway.wait_healthy()
        first_start = gateway.log("auth")
        assert "pushgate-admin user add NAME" in first_start
        users = [*setpriv(IMAGE_UID, []), gateway.tool("pushgate-admin"), "user", "list"]
        listed = lab.exec(gateway.gw, [*users, "--config", gateway.config], env=auth_env)
        assert listed.stdout.strip() == ""  # no account until the operator adds one
        text = Path(gateway.config).read_text()
        for line in (
            f'tunnel_network = "{TUNNEL_NETWORK}"',
            f'routes = ["{TUNNEL_NETWORK}", "198.18.40.0/24"]',
            'database = "db/pushgate.db"',
            'metrics_listen = "0.0.0.0:9101"',
            'metrics_listen = "0.0.0.0:9102"',
            f'dataplane_endpoint = "{IMG_GATEWAY}:51820"',
        ):
            assert line in text, line
        gateway.add_user("alice")
        caps = [cap.lower() for cap in services["dataplane"]["cap_add"]]
        dataplane = with_open_tun([*setpriv(IMAGE_UID, caps), *entrypoint, "dataplane"])
        env = gateway.env("dataplane", **services["dataplane"]["environment"])
        gateway.start("dataplane", dataplane, env)
        samples = gateway.dataplane_metrics()
        assert metrics.total(samples, "pushgate_dataplane_kernel_filter") == 1
        assert metrics.total(samples, "pushgate_dataplane_tun_queues") == tun_steering.QUEUES
        auth_samples = metrics.parse(http_get(gateway.gw, 9101, "/metrics").decode())
        for scraped in (samples, auth_samples):  # which pushgate each service is
            assert metrics.total(scraped, "pushgate_build_info", version=VERSION) == 1
        nat = lab.exec(gateway.gw, ["nft", "list", "table", "ip", "pushgate_nat"]).stdout
        assert f'ip saddr {TUNNEL_NETWORK} oifname "eth0" masquerade' in nat
        gateway.connect_and_ping("alice")
        gateway.assert_dataplane_holds_no_capability()


@pytest.mark.netns  # the image build sets file capabilities; namespaces
def test_the_units_capabilities_and_syscall_filters_suffice_for_the_services(installed):
    """As the systemd units run the host install (the wheel in a virtualenv): the
    dataplane as an unprivileged user holding exactly what its unit grants
    (ambient and bounding sets) loads the kernel filter and passes traffic;
    pushgate-nat with its unit's bounding set. Every system call the three make
    here (strace) is one their unit's SystemCallFilter= allows, and every socket
    one of its RestrictAddressFamilies=. (Not run: a real
    systemd, which this machine does not boot.)"""
    bounding, ambient = unit_capabilities("pushgate-dataplane.service")
    assert ambient, "the unit grants the dataplane no capability"
    nat_bounding, _ = unit_capabilities("pushgate-nat.service")
    traces = {name: installed.work / f"{name}.strace" for name in ("auth", "dataplane", "nat")}
    for name in ("auth", "dataplane"):  # written by strace as the services' user
        traces[name].touch()
        os.chown(traces[name], IMAGE_UID, IMAGE_UID)

    def traced(name: str) -> list[str]:
        return ["strace", "-f", "-qq", "-o", str(traces[name]), "--"]

    with Lab("pgunit") as lab, opened(installed):
        gateway = Gateway(lab, installed)
        admin = [*setpriv(IMAGE_UID, []), gateway.tool("pushgate-admin"), "init"]
        admin += ["--dir", str(gateway.state), "--server-name", IMG_GATEWAY]
        admin += ["--dataplane-endpoint", f"{IMG_GATEWAY}:51820"]
        admin += ["--tunnel-network", TUNNEL_NETWORK]
        runtime = installed.work / "runtime"  # RuntimeDirectory=pushgate, as systemd makes it
        runtime.mkdir()
        os.chown(runtime, IMAGE_UID, IMAGE_UID)
        os.chmod(runtime, 0o1770)
        admin += ["--run-dir", str(runtime)]
        result = lab.exec(gateway.gw, admin, env=gateway.env("plain"), check=False)
        assert result.returncode == 0, result.stderr
        auth = [*setpriv(IMAGE_UID, []), *traced("auth"), gateway.tool("pushgate-auth")]
        gateway.start("auth", [*auth, "--config", gateway.config], gateway.env("plain"))
        gateway.wait_healthy()
        gateway.add_user("alice")
        nat = ["setpriv", f"--bounding-set=-all{''.join(f',+{c}' for c in nat_bounding)}"]
        nat += [*traced("nat"), gateway.tool("pushgate-nat"), "--config", gateway.config, "eth0"]
        lab.exec(gateway.gw, nat, env=gateway.env("plain"))
        dataplane = [*setpriv(IMAGE_UID, bounding, ambient), *traced("dataplane")]
        dataplane += [gateway.tool("pushgate-dataplane"), "--config", gateway.config]
        gateway.start("dataplane", with_open_tun(dataplane), gateway.env("plain"))
        samples = gateway.dataplane_metrics()
        assert metrics.total(samples, "pushgate_dataplane_kernel_filter") == 1
        assert metrics.total(samples, "pushgate_dataplane_tun_queues") == tun_steering.QUEUES
        assert "dropped and counted in the kernel (eBPF filter)" in gateway.log("dataplane")
        gateway.connect_and_ping("alice")
        gateway.assert_dataplane_holds_no_capability()
    for name, trace in traces.items():
        made = traced_syscalls(trace) - {"execve"}  # (strace's own start of the service)
        assert made, name
        assert name != "dataplane" or "bpf" in made  # the trace covers the filter's loading
        refused = made - allowed_syscalls(f"pushgate-{name}.service")
        assert not refused, f"pushgate-{name} makes system calls its unit refuses: {refused}"
        families = set(unit_settings(f"pushgate-{name}.service")["RestrictAddressFamilies"])
        assert traced_socket_families(trace) <= families, name
