"""`make demo`: the whole gateway on this host, in network namespaces.

    client ns  198.18.1.2 --underlay-- 198.18.1.1  gateway ns  198.18.2.1 --lan-- 198.18.2.2  lan ns
               pgc0 198.19.0.x   (tunnel)         pg0 198.19.0.1, NAT to the lan

The gateway namespace runs pushgate-auth and pushgate-dataplane; the client
namespace runs pushgate-client (full tunnel); the lan host is reached through
the tunnel and the gateway's NAT. Prints a summary and removes everything.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import Lab, metrics, wait_for
from .transfer import expected_sha256

GATEWAY_UNDERLAY = "198.18.1.1"
CLIENT_UNDERLAY = "198.18.1.2"
GATEWAY_LAN = "198.18.2.1"
LAN_HOST = "198.18.2.2"
TRANSFER_BYTES = 50 * 1024 * 1024
TRANSFER_SEED = 2026
AUTH_PORT = 7443
DATAPLANE_PORT = 51820
METRICS_PORT = 9102


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="pushgate-demo-")
    try:
        with Lab("pgdemo") as lab:
            return _run(lab, workdir)
    finally:
        if not os.environ.get("PUSHGATE_DEMO_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def _run(lab: Lab, workdir: str) -> int:
    _say("creating namespaces: gateway, client, lan host (198.18.0.0/15 only)")
    gateway, client, lan = lab.namespace("gw"), lab.namespace("client"), lab.namespace("lan")
    _, _gw_underlay_dev = lab.link(
        client, f"{CLIENT_UNDERLAY}/24", gateway, f"{GATEWAY_UNDERLAY}/24"
    )
    gw_lan_dev, _ = lab.link(gateway, f"{GATEWAY_LAN}/24", lan, f"{LAN_HOST}/24")

    _say("initialising the gateway: CA, server certificate, config, user 'demo'")
    config = os.path.join(workdir, "pushgate.toml")
    lab_run(
        [
            _bin("pushgate-admin"),
            "init",
            "--dir",
            workdir,
            "--server-name",
            GATEWAY_UNDERLAY,
            "--auth-listen",
            f"{GATEWAY_UNDERLAY}:{AUTH_PORT}",
            "--dataplane-endpoint",
            f"{GATEWAY_UNDERLAY}:{DATAPLANE_PORT}",
        ]
    )
    password_file = os.path.join(workdir, "demo.password")
    with open(password_file, "w") as handle:
        handle.write("correct horse battery staple\n")
    lab_run(
        [
            _bin("pushgate-admin"),
            "user",
            "add",
            "demo",
            "--config",
            config,
            "--password-file",
            password_file,
        ]
    )

    _say("starting pushgate-auth and pushgate-dataplane in the gateway namespace")
    logs = {
        name: open(os.path.join(workdir, f"{name}.log"), "w")
        for name in ("auth", "dataplane", "client")
    }
    lab.start(
        gateway,
        [_bin("pushgate-auth"), "--config", config],
        stdout=logs["auth"],
        stderr=subprocess.STDOUT,
    )
    lab.start(
        gateway,
        [
            _bin("pushgate-dataplane"),
            "--config",
            config,
            "--metrics-listen",
            f"127.0.0.1:{METRICS_PORT}",
        ],
        stdout=logs["dataplane"],
        stderr=subprocess.STDOUT,
    )
    lab.exec(
        gateway,
        [_bin("pushgate-dataplane"), "--config", config, "--nat", gw_lan_dev],
    )

    _say("connecting the client (full tunnel)")
    status_dir = os.path.join(workdir, "client-run")
    client_cmd = [_bin("pushgate-client"), "--status-dir", status_dir]
    lab.start(
        client,
        [
            *client_cmd,
            "connect",
            "--server",
            f"{GATEWAY_UNDERLAY}:{AUTH_PORT}",
            "--ca",
            os.path.join(workdir, "tls", "ca.crt"),
            "--user",
            "demo",
            "--password-file",
            password_file,
        ],
        stdout=logs["client"],
        stderr=subprocess.STDOUT,
    )
    wait_for(
        lambda: (
            "state:          up" in lab.exec(client, [*client_cmd, "status"], check=False).stdout
        ),
        timeout=30,
        what="the client to come up",
    )

    _say(f"ping the lan host {LAN_HOST} through the tunnel")
    ping = lab.exec(client, ["ping", "-c", "10", "-i", "0.2", LAN_HOST])
    rtt = ping.stdout.strip().splitlines()[-1]
    print("    " + ping.stdout.strip().splitlines()[-2])
    print("    " + rtt)

    _say(f"TCP transfer of {TRANSFER_BYTES >> 20} MiB from the lan host, with SHA-256")
    lab.start(
        lan,
        [
            sys.executable,
            "-m",
            "netlab.transfer",
            "serve-tcp",
            "5001",
            str(TRANSFER_BYTES),
            str(TRANSFER_SEED),
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    fetched = lab.exec(
        client,
        [sys.executable, "-m", "netlab.transfer", "fetch-tcp", LAN_HOST, "5001"],
        timeout=300,
    ).stdout.split()
    size, digest, seconds = int(fetched[0]), fetched[1], float(fetched[2])
    expected = expected_sha256(TRANSFER_BYTES, TRANSFER_SEED)
    ok = size == TRANSFER_BYTES and digest == expected
    print(
        f"    {size} bytes in {seconds:.2f} s = {size * 8 / seconds / 1e6:.0f} Mbit/s, "
        f"sha256 {'matches' if ok else 'MISMATCH'} ({digest[:16]}...)"
    )

    _say("client status")
    print(_indent(lab.exec(client, [*client_cmd, "status"]).stdout))
    _say("dataplane metrics")
    text = lab.exec(
        gateway,
        [
            sys.executable,
            "-c",
            "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{METRICS_PORT}/metrics').read().decode())",
        ],
    ).stdout
    print(_indent(_summarise(metrics.parse(text))))

    _say("disconnecting and cleaning up")
    lab.exec(client, [*client_cmd, "disconnect"])
    return 0 if ok else 1


def _summarise(samples) -> str:
    lines = []
    for name in (
        "pushgate_dataplane_datagrams_received_total",
        "pushgate_dataplane_packets_total",
        "pushgate_dataplane_bytes_total",
    ):
        for (sample, labels), value in sorted(samples.items(), key=str):
            if sample == name:
                label = ",".join(f"{k}={v}" for k, v in sorted(labels))
                lines.append(f"{name}{{{label}}} {value:.0f}")
    drops = {
        dict(labels).get("reason"): value
        for (sample, labels), value in samples.items()
        if sample == "pushgate_dataplane_drops_total" and value
    }
    lines.append(
        "drops by reason: " + (", ".join(f"{k}={v:.0f}" for k, v in drops.items()) or "none")
    )
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines())


def lab_run(argv) -> None:
    subprocess.run(argv, check=True)


if __name__ == "__main__":
    sys.exit(main())
