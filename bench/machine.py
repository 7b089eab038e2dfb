"""The machine a benchmark ran on, printed beside its tables: figures from different
machines differ by more than most changes do (docs/performance.md), so a ratio is
only ever read against the same machine's.

    python bench/machine.py            # header + Python's per-operation baseline,
                                       # saved to bench/results/machine-last.txt
    python bench/machine.py --header   # the one-line header
    from bench.machine import header   # the one-line header, for a table

The baseline is the team's ../shared/bench/python-limits.py (one Python thread's
cost per operation: UDP send/receive, TUN read/write, AES-GCM, a minimal
TUN -> seal -> UDP loop), run for one second per test.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ROOT.parent / "shared" / "bench" / "python-limits.py"
RESULTS = ROOT / "bench" / "results" / "machine-last.txt"
# python-limits figures worth a line: (test, what it says)
BASELINE = (
    ("loop_tun_aes_udp", "minimal TUN read -> AES-GCM seal -> UDP send loop"),
    ("aes256gcm_enc_1400", "AES-256-GCM seal, 1400 B"),
    ("udp_send", "UDP send(), 1400 B"),
    ("udp_gro_recv", "UDP GRO receive, per segment"),
    ("tun_write", "TUN write(), 1400 B"),
    ("tun_read", "TUN read(), 1400 B"),
)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def header() -> str:
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def baseline(seconds: float = 1.0) -> list[str]:
    """Python's per-operation costs here, one line each (python-limits.py)."""
    if not LIMITS.exists():
        return [f"(no baseline: {LIMITS} is missing)"]
    done = subprocess.run(
        [sys.executable, str(LIMITS), "-t", str(seconds), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        return [f"(no baseline: python-limits.py failed: {done.stderr.strip()[-200:]})"]
    figures = json.loads(done.stdout)
    return [
        f"  {figures[test]['us']:7.3f} us  {what}"
        for test, what in BASELINE
        if test in figures and "us" in figures[test]
    ]


def main() -> int:
    if sys.argv[1:] == ["--header"]:  # the Makefile, before each table
        print(header())
        return 0
    lines = [header(), "per-operation baseline (../shared/bench/python-limits.py):"]
    lines += baseline()
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
