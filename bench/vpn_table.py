"""Print pushgate beside wireguard-go and OpenVPN from netns-tunnels.sh RESULT lines.

    python bench/vpn_table.py RESULTS.txt [PREVIOUS.txt]

Medians over the runs in the file; ratios are pushgate / peer from the same
run (higher is better, except RTT and CPU per Gbit/s where lower is better).
With a previous results file, pushgate's change against it is shown too.
"""

import statistics
import sys

COLUMNS = [  # (field, heading, format)
    ("tcp_gbps", "TCP 1 stream Gbit/s", "{:.2f}"),
    ("tcp4_gbps", "TCP 4 streams Gbit/s", "{:.2f}"),
    ("udp64_kpps", "UDP 64 B kpps", "{:.1f}"),
    ("rtt_ms", "RTT idle ms", "{:.2f}"),
    ("rtt_load_ms", "RTT load ms", "{:.2f}"),
    ("cpu_per_gbps", "CPU %/Gbit/s", "{:.0f}"),
]
LOWER_IS_BETTER = {"rtt_ms", "rtt_load_ms", "cpu_per_gbps"}


def medians(path: str) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, str]]] = {}
    with open(path) as handle:
        for line in handle:
            if not line.startswith("RESULT "):
                continue
            fields = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
            if fields.get("status") == "failed":
                continue
            runs.setdefault(fields["scenario"], []).append(fields)
    table = {}
    for scenario, rows in runs.items():
        values = {}
        for field, _, _ in COLUMNS:
            numbers = []
            for row in rows:
                try:
                    if field == "cpu_per_gbps":
                        numbers.append(float(row["tcp_tun_cpu"]) / float(row["tcp_gbps"]))
                    else:
                        numbers.append(float(row[field]))
                except (KeyError, ValueError, ZeroDivisionError):
                    pass
            if numbers:
                values[field] = statistics.median(numbers)
        values["runs"] = len(rows)
        table[scenario] = values
    return table


def main(argv: list[str]) -> int:
    table = medians(argv[0])
    previous = medians(argv[1]) if len(argv) > 1 else {}
    width = max(len(s) for s in [*table, "pushgate/wireguard-go", "pushgate/previous"]) + 2
    print("scenario".ljust(width) + "".join(h.rjust(22) for _, h, _ in COLUMNS) + "  runs")
    for scenario, values in table.items():
        cells = [fmt.format(values[f]) if f in values else "-" for f, _, fmt in COLUMNS]
        print(
            scenario.ljust(width) + "".join(c.rjust(22) for c in cells) + f"  {values['runs']:>4}"
        )
    ours = table.get("pushgate")
    if ours:
        # pushgate-python: the same pushgate on its pure-Python hot path
        for peer in ("wireguard-go", "openvpn", "pushgate-python"):
            if peer not in table:
                continue
            cells = []
            for field, _, _ in COLUMNS:
                if field in ours and table[peer].get(field):
                    cells.append(f"{ours[field] / table[peer][field]:.2f}x")
                else:
                    cells.append("-")
            print(f"pushgate/{peer}".ljust(width) + "".join(c.rjust(22) for c in cells))
        if "pushgate" in previous:
            before = previous["pushgate"]
            cells = [
                f"{ours[f] / before[f]:.2f}x" if f in ours and before.get(f) else "-"
                for f, _, _ in COLUMNS
            ]
            print("pushgate/previous".ljust(width) + "".join(c.rjust(22) for c in cells))
        print("(ratios: higher is better except " + ", ".join(sorted(LOWER_IS_BETTER)) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
