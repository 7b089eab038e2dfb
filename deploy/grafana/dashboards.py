"""Grafana dashboards for pushgate, generated from this file.

    python deploy/grafana/dashboards.py          # rewrite deploy/grafana/dashboards/*.json
    python deploy/grafana/dashboards.py --check  # exit 1 if the JSON files are stale

tests/test_deploy.py evaluates every panel's query against a live Prometheus
scraping a gateway with a connected client passing traffic, and asserts that
each one parses and returns data.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


def panel(title, targets, unit="short", kind="timeseries"):
    return {
        "title": title,
        "type": kind,
        "unit": unit,
        "targets": [{"expr": expr, "legendFormat": legend} for expr, legend in targets],
    }


DASHBOARDS = {
    "pushgate-overview": (
        "pushgate gateway overview",
        [
            panel(
                "Sessions by state", [("sum by (state) (pushgate_dataplane_sessions)", "{{state}}")]
            ),
            panel(
                "Throughput",
                [
                    (
                        'rate(pushgate_dataplane_bytes_total{direction="rx"}[1m]) * 8',
                        "from clients",
                    ),
                    ('rate(pushgate_dataplane_bytes_total{direction="tx"}[1m]) * 8', "to clients"),
                ],
                unit="bps",
            ),
            panel(
                "Packets",
                [
                    (
                        "sum by (direction) (rate(pushgate_dataplane_packets_total[1m]))",
                        "{{direction}}",
                    )
                ],
                unit="pps",
            ),
            panel(
                "Datagrams received and delivered",
                [
                    ("rate(pushgate_dataplane_datagrams_received_total[1m])", "received"),
                    ("rate(pushgate_dataplane_datagrams_delivered_total[1m])", "delivered"),
                ],
                unit="pps",
            ),
            panel(
                "Drops by reason",
                [
                    (
                        "sum by (direction, reason) (rate(pushgate_dataplane_drops_total[1m]))",
                        "{{direction}} {{reason}}",
                    )
                ],
                unit="pps",
            ),
            panel(
                "Kernel drops before the dataplane read them",
                [
                    (
                        "sum by (where) (rate(pushgate_dataplane_kernel_drops_total[1m]))",
                        "{{where}}",
                    )
                ],
                unit="pps",
            ),
            panel(
                "Receive loop lag (p50, p99)",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        "(rate(pushgate_dataplane_loop_lag_seconds_bucket[1m])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(pushgate_dataplane_loop_lag_seconds_bucket[1m])))",
                        "p99",
                    ),
                ],
                unit="s",
            ),
            panel(
                "Queue depth and high-water mark",
                [
                    ("pushgate_dataplane_queue_depth", "{{queue}} depth"),
                    ("pushgate_dataplane_queue_high_water", "{{queue}} high water"),
                    ("pushgate_dataplane_queue_capacity", "{{queue}} capacity"),
                ],
            ),
            panel(
                "Queue overflows",
                [("rate(pushgate_dataplane_queue_overflows_total[1m])", "{{queue}}")],
                unit="pps",
            ),
            panel("Stalled sessions", [("pushgate_dataplane_stalled_sessions", "stalled")]),
            panel(
                "Session feed connected",
                [("pushgate_dataplane_control_connected", "connected")],
                kind="stat",
            ),
            panel(
                "Session changes",
                [
                    ("rate(pushgate_dataplane_session_installs_total[5m])", "installs"),
                    ("rate(pushgate_dataplane_session_removals_total[5m])", "removals"),
                    ("rate(pushgate_dataplane_session_rekeys_total[5m])", "rekeys"),
                ],
                unit="ops",
            ),
            panel(
                "I/O errors",
                [("rate(pushgate_dataplane_io_errors_total[1m])", "{{kind}}")],
                unit="ops",
            ),
            panel(
                "ICMP too-big sent and MSS clamped",
                [
                    ("rate(pushgate_dataplane_icmp_too_big_sent_total[5m])", "ICMP too big"),
                    ("rate(pushgate_dataplane_mss_clamped_total[5m])", "MSS clamped"),
                ],
                unit="pps",
            ),
        ],
    ),
    "pushgate-auth": (
        "pushgate auth service",
        [
            panel(
                "Logins by result",
                [("sum by (result) (rate(pushgate_auth_logins_total[5m]))", "{{result}}")],
                unit="ops",
            ),
            panel("Active sessions", [("pushgate_auth_sessions_active", "sessions")]),
            panel(
                "Address pool usage",
                [
                    (
                        'sum(pushgate_auth_pool_addresses{state="used"}) / '
                        "sum(pushgate_auth_pool_addresses)",
                        "used",
                    )
                ],
                unit="percentunit",
            ),
            panel(
                "Login latency (p50, p99)",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        "(rate(pushgate_auth_login_duration_seconds_bucket[5m])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(pushgate_auth_login_duration_seconds_bucket[5m])))",
                        "p99",
                    ),
                ],
                unit="s",
            ),
            panel(
                "Dataplanes watching the session feed",
                [("pushgate_auth_feed_watchers", "watchers")],
                kind="stat",
            ),
            panel(
                "Rekeys, logouts, expiries",
                [
                    ("rate(pushgate_auth_rekeys_total[5m])", "rekeys"),
                    ("rate(pushgate_auth_logouts_total[5m])", "logouts"),
                    ("rate(pushgate_auth_sessions_expired_total[5m])", "expired"),
                ],
                unit="ops",
            ),
        ],
    ),
    "pushgate-resources": (
        "pushgate processes and host resources",
        [
            panel(
                "Host CPU busy",
                [
                    (
                        '1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[1m]))',
                        "{{instance}}",
                    )
                ],
                unit="percentunit",
            ),
            panel(
                "Host memory available",
                [("node_memory_MemAvailable_bytes", "{{instance}}")],
                unit="bytes",
            ),
            panel(
                "Host network",
                [
                    (
                        "sum by (instance) (rate(node_network_receive_bytes_total[1m])) * 8",
                        "receive",
                    ),
                    (
                        "sum by (instance) (rate(node_network_transmit_bytes_total[1m])) * 8",
                        "transmit",
                    ),
                ],
                unit="bps",
            ),
            panel(
                "CPU by service",
                [("rate(process_cpu_seconds_total[1m])", "{{job}}")],
                unit="percentunit",
            ),
            panel(
                "Resident memory by service",
                [("process_resident_memory_bytes", "{{job}}")],
                unit="bytes",
            ),
            panel(
                "Open file descriptors",
                [("process_open_fds", "{{job}}"), ("process_max_fds", "{{job}} limit")],
            ),
            panel("Targets up", [("up", "{{job}}")], kind="stat"),
        ],
    ),
}


def render(uid: str, title: str, panels: list[dict]) -> dict:
    rendered = []
    for index, spec in enumerate(panels):
        rendered.append(
            {
                "id": index + 1,
                "title": spec["title"],
                "type": spec["type"],
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
                "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + n), "datasource": DATASOURCE, **target}
                    for n, target in enumerate(spec["targets"])
                ],
            }
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["pushgate"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": rendered,
    }


def files() -> dict[Path, str]:
    return {
        OUT / f"{uid}.json": json.dumps(render(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


def main(argv: list[str]) -> int:
    stale = [
        path for path, text in files().items() if not path.exists() or path.read_text() != text
    ]
    if "--check" in argv:
        for path in stale:
            print(f"{path} is stale: run python deploy/grafana/dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for path, text in files().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
