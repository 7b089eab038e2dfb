"""Grafana dashboards for pushgate, generated from this file.

    python deploy/grafana/dashboards.py          # rewrite deploy/grafana/dashboards/*.json
    python deploy/grafana/dashboards.py --check  # exit 1 if the JSON files are stale

tests/test_deploy.py evaluates every panel's query against a live Prometheus
scraping a gateway with a connected client passing traffic (with `$instance` as
"all" and `$__rate_interval` as Grafana makes it for a 15 s scrape, 1m), and
asserts that each one parses and returns data. Every query is aggregated so that it
stays right with several gateways: sums for totals, `by (instance)` where one
gateway's figure matters (queues, errors), never a per-session label; by user only in
the opt-in per-account families (`user_metrics`), with topk.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
# Portable: the datasource is a variable (any Prometheus, whatever its uid), and
# every query is limited to the instances picked in the `instance` variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'  # noqa: E741 (every selector's instance filter)
R = "[$__rate_interval]"  # Grafana's window: at least 4 scrape intervals, never empty


def panel(title, description, targets, unit="short", kind="timeseries"):
    return {
        "title": title,
        "description": description,
        "type": kind,
        "unit": unit,
        "targets": [{"expr": expr, "legendFormat": legend} for expr, legend in targets],
    }


def row(title):
    return {"row": title}


def quantiles(metric, by=""):
    """p50 and p99 of a histogram over the selected instances."""
    return [
        (
            f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{{{I}}}{R})))",
            f"{{{{instance}}}} p{round(q * 100)}" if by else f"p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


DP = "pushgate_dataplane_"
DASHBOARDS = {
    "pushgate-overview": (
        "pushgate gateway overview",
        f"{DP}sessions",
        [
            row("Traffic"),
            panel(
                "Sessions by state",
                "Sessions the dataplanes hold, by lifecycle state, summed over the selected "
                "gateways.",
                [(f"sum by (state) ({DP}sessions{{{I}}})", "{{state}}")],
            ),
            panel(
                "Throughput",
                "Inner bytes through the tunnels, in bits/s: inbound from clients, outbound "
                "to clients, summed over the selected gateways.",
                [
                    (
                        f"sum by (direction) (rate({DP}bytes_total{{{I}}}{R})) * 8",
                        "{{direction}}",
                    ),
                ],
                unit="bps",
            ),
            panel(
                "Packets",
                "Tunnel packets per second by direction (inbound: authenticated from "
                "clients; outbound: sealed and sent to clients).",
                [(f"sum by (direction) (rate({DP}packets_total{{{I}}}{R}))", "{{direction}}")],
                unit="pps",
            ),
            panel(
                "Datagrams received and delivered",
                "Every datagram received on the push port is delivered or dropped under one "
                "reason: the gap between the two lines is the drops below.",
                [
                    (f"sum(rate({DP}datagrams_received_total{{{I}}}{R}))", "received"),
                    (f"sum(rate({DP}datagrams_delivered_total{{{I}}}{R}))", "delivered"),
                ],
                unit="pps",
            ),
            row("Loss"),
            panel(
                "Drops by reason",
                "Packets the dataplanes dropped, by direction and reason (README, 'The "
                "dataplane'; runbooks in docs/operations.md).",
                [
                    (
                        f"sum by (direction, reason) (rate({DP}drops_total{{{I}}}{R}))",
                        "{{direction}} {{reason}}",
                    )
                ],
                unit="pps",
            ),
            panel(
                "Kernel drops before the dataplane read them",
                "Push datagrams over the UDP receive buffer and packets over the TUN's "
                "queue, per gateway: traffic arrived faster than the dataplane read it.",
                [
                    (
                        f"sum by (instance, where) (rate({DP}kernel_drops_total{{{I}}}{R}))",
                        "{{instance}} {{where}}",
                    )
                ],
                unit="pps",
            ),
            panel(
                "Queue depth and high-water mark",
                "The bounded queues of each gateway (receive, TUN write, UDP send; packets),"
                " beside their capacity.",
                [
                    (
                        f"max by (instance, queue) ({DP}queue_depth{{{I}}})",
                        "{{instance}} {{queue}} depth",
                    ),
                    (
                        f"max by (instance, queue) ({DP}queue_high_water{{{I}}})",
                        "{{instance}} {{queue}} high water",
                    ),
                    (f"max by (queue) ({DP}queue_capacity{{{I}}})", "{{queue}} capacity"),
                ],
            ),
            panel(
                "Queue overflows",
                "Packets refused by a full queue (queue_full drops), per gateway and queue.",
                [
                    (
                        f"sum by (instance, queue) (rate({DP}queue_overflows_total{{{I}}}{R}))",
                        "{{instance}} {{queue}}",
                    )
                ],
                unit="pps",
            ),
            panel(
                "I/O errors",
                "Failed socket and TUN calls, per gateway and kind.",
                [
                    (
                        f"sum by (instance, kind) (rate({DP}io_errors_total{{{I}}}{R}))",
                        "{{instance}} {{kind}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "ICMP too-big sent and MSS clamped",
                "Inner packets over the tunnel MTU answered with ICMP, and TCP SYNs whose "
                "MSS was lowered to fit.",
                [
                    (f"sum(rate({DP}icmp_too_big_sent_total{{{I}}}{R}))", "ICMP too big"),
                    (f"sum(rate({DP}mss_clamped_total{{{I}}}{R}))", "MSS clamped"),
                ],
                unit="pps",
            ),
            row("Health"),
            panel(
                "Receive loop lag (p50, p99)",
                "How late each gateway's receive loop runs its 100 ms timer; the alert "
                "PushgateReceiveLoopStalled fires when p99 stays over 250 ms.",
                quantiles(f"{DP}loop_lag_seconds", by=", instance"),
                unit="s",
            ),
            panel(
                "Stalled sessions",
                "Sessions passing traffic one way only for longer than their keepalive, per "
                "gateway.",
                [(f"max by (instance) ({DP}stalled_sessions{{{I}}})", "{{instance}}")],
            ),
            panel(
                "Session feed connected",
                "Gateways whose dataplane watches the auth service's session feed, of those "
                "selected.",
                [(f"sum({DP}control_connected{{{I}}})", "connected")],
                kind="stat",
            ),
            panel(
                "Kernel socket filter attached",
                "Gateways whose eBPF socket filter drops noise in the kernel, of those selected.",
                [(f"sum({DP}kernel_filter{{{I}}})", "attached")],
                kind="stat",
            ),
            panel(
                "Session changes",
                "Sessions installed, removed and rekeyed per second, over the selected gateways.",
                [
                    (f"sum(rate({DP}session_installs_total{{{I}}}{R}))", "installs"),
                    (f"sum(rate({DP}session_removals_total{{{I}}}{R}))", "removals"),
                    (f"sum(rate({DP}session_rekeys_total{{{I}}}{R}))", "rekeys"),
                ],
                unit="ops",
            ),
            row("Users (opt-in: [dataplane] user_metrics = true)"),
            panel(
                "Top users by traffic",
                "The ten accounts moving the most bits/s through the selected gateways, "
                "both directions. Empty unless the dataplanes run with [dataplane] "
                "user_metrics = true (one series per account, never per session).",
                [
                    (
                        f"topk(10, sum by (user) (rate({DP}user_bytes_total{{{I}}}{R}))) * 8",
                        "{{user}}",
                    )
                ],
                unit="bps",
            ),
            panel(
                "Top users by drops",
                "The ten accounts whose sessions' packets are dropped most (any reason; "
                "pushgate-admin session show says which). Opt-in as above.",
                [
                    (
                        f"topk(10, sum by (user) (rate({DP}user_drops_total{{{I}}}{R})))",
                        "{{user}}",
                    )
                ],
                unit="pps",
            ),
        ],
    ),
    "pushgate-auth": (
        "pushgate auth service",
        "pushgate_auth_sessions_active",
        [
            row("Logins"),
            panel(
                "Logins by result",
                "Login attempts per second by result, over the selected auth services.",
                [
                    (
                        f"sum by (result) (rate(pushgate_auth_logins_total{{{I}}}{R}))",
                        "{{result}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Login latency (p50, p99)",
                "Time to answer a login (Argon2id dominates).",
                quantiles("pushgate_auth_login_duration_seconds"),
                unit="s",
            ),
            panel(
                "Rekeys, logouts, expiries",
                "Session events per second over the selected auth services.",
                [
                    (f"sum(rate(pushgate_auth_rekeys_total{{{I}}}{R}))", "rekeys"),
                    (f"sum(rate(pushgate_auth_logouts_total{{{I}}}{R}))", "logouts"),
                    (f"sum(rate(pushgate_auth_sessions_expired_total{{{I}}}{R}))", "expired"),
                ],
                unit="ops",
            ),
            row("Capacity"),
            panel(
                "Active sessions",
                "Live sessions per auth service.",
                [(f"sum by (instance) (pushgate_auth_sessions_active{{{I}}})", "{{instance}}")],
            ),
            panel(
                "Address pool usage",
                "Share of each auth service's tunnel addresses held by sessions; logins are "
                "refused at 100%.",
                [
                    (
                        f'sum by (instance) (pushgate_auth_pool_addresses{{state="used", {I}}}) / '
                        f"sum by (instance) (pushgate_auth_pool_addresses{{{I}}})",
                        "{{instance}}",
                    )
                ],
                unit="percentunit",
            ),
            panel(
                "Dataplanes watching the session feed",
                "Session feed watchers, summed over the selected auth services.",
                [(f"sum(pushgate_auth_feed_watchers{{{I}}})", "watchers")],
                kind="stat",
            ),
            panel(
                "Server certificate expires in",
                "Time left on the TLS certificate each auth service serves; the alert "
                "PushgateServerCertificateExpiring fires under 30 days.",
                [
                    (
                        "min by (instance) (pushgate_auth_server_certificate_"
                        f"not_after_timestamp_seconds{{{I}}}) - time()",
                        "{{instance}}",
                    )
                ],
                unit="s",
                kind="stat",
            ),
        ],
    ),
    "pushgate-resources": (
        "pushgate processes and host resources",
        "up",
        [
            row("Hosts"),
            panel(
                "Host CPU busy",
                "Share of each host's CPU time not idle (node-exporter).",
                [
                    (
                        "1 - avg by (instance) "
                        f'(rate(node_cpu_seconds_total{{mode="idle", {I}}}{R}))',
                        "{{instance}}",
                    )
                ],
                unit="percentunit",
            ),
            panel(
                "Host memory available",
                "Memory available to new processes on each host.",
                [(f"node_memory_MemAvailable_bytes{{{I}}}", "{{instance}}")],
                unit="bytes",
            ),
            panel(
                "Host network",
                "Each host's interfaces, all together, in bits/s.",
                [
                    (
                        f"sum by (instance) (rate(node_network_receive_bytes_total{{{I}}}{R})) * 8",
                        "{{instance}} receive",
                    ),
                    (
                        "sum by (instance) "
                        f"(rate(node_network_transmit_bytes_total{{{I}}}{R})) * 8",
                        "{{instance}} transmit",
                    ),
                ],
                unit="bps",
            ),
            row("Services"),
            panel(
                "CPU by service",
                "CPU seconds per second of each pushgate process (1 = one core).",
                [
                    (
                        "sum by (job, instance) "
                        f'(rate(process_cpu_seconds_total{{job=~"pushgate-.*", {I}}}{R}))',
                        "{{job}} {{instance}}",
                    )
                ],
                unit="percentunit",
            ),
            panel(
                "Resident memory by service",
                "Resident memory of each pushgate process.",
                [
                    (
                        f'process_resident_memory_bytes{{job=~"pushgate-.*", {I}}}',
                        "{{job}} {{instance}}",
                    )
                ],
                unit="bytes",
            ),
            panel(
                "Open file descriptors",
                "Descriptors each pushgate process holds, beside its limit (the auth "
                "service's connections each take one).",
                [
                    (f'process_open_fds{{job=~"pushgate-.*", {I}}}', "{{job}} {{instance}}"),
                    (
                        f'process_max_fds{{job=~"pushgate-.*", {I}}}',
                        "{{job}} {{instance}} limit",
                    ),
                ],
            ),
            panel(
                "Targets up",
                "Scrape targets answering, by job.",
                [(f"sum by (job) (up{{{I}}})", "{{job}}")],
                kind="stat",
            ),
        ],
    ),
}


def variables(instance_metric: str) -> dict:
    """The datasource to use and the instances to show (all by default)."""
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            },
            {
                "name": "instance",
                "label": "Instance",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {
                    "query": f"label_values({instance_metric}, instance)",
                    "refId": "instance",
                },
                "definition": f"label_values({instance_metric}, instance)",
                "refresh": 2,
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "sort": 1,
                "hide": 0,
            },
        ]
    }


def render(uid: str, title: str, instance_metric: str, panels: list[dict]) -> dict:
    rendered, y, column = [], 0, 0
    for spec in panels:
        if "row" in spec:
            y += 8 if column else 0
            column = 0
            rendered.append(
                {
                    "id": len(rendered) + 1,
                    "type": "row",
                    "title": spec["row"],
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            continue
        rendered.append(
            {
                "id": len(rendered) + 1,
                "title": spec["title"],
                "description": spec["description"],
                "type": spec["type"],
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": column * 12, "y": y},
                "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + n), "datasource": DATASOURCE, **target}
                    for n, target in enumerate(spec["targets"])
                ],
            }
        )
        column = 1 - column
        y += 8 if column == 0 else 0
    return {
        "uid": uid,
        "title": title,
        "tags": ["pushgate"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": variables(instance_metric),
        "panels": rendered,
    }


def files() -> dict[Path, str]:
    return {
        OUT / f"{uid}.json": json.dumps(render(uid, title, metric, panels), indent=2) + "\n"
        for uid, (title, metric, panels) in DASHBOARDS.items()
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
