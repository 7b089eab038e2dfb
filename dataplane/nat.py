"""`pushgate-nat`: forwarding and nftables masquerade for the tunnel network, one shot.

NAT needs CAP_NET_ADMIN; the running dataplane holds no capability
(dataplane/privileges.py), so this is its own short-lived command, run before
or beside it (systemd's pushgate-nat.service, the container's entry point).
"""

import argparse
import subprocess
import sys

from push_protocol.version import add_version_argument
from pushgate_io import gateway_config

from .privileges import hand_capabilities_to_children

TABLE = "pushgate_nat"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def ruleset(tunnel_network: str, out_interface: str) -> str:
    return (
        f"table ip {TABLE} {{\n"
        f"  chain postrouting {{\n"
        f"    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {tunnel_network} oifname "{out_interface}" masquerade\n'
        f"  }}\n}}\n"
    )


def remove() -> int:
    subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True)
    print(f"removed nftables table ip {TABLE}")
    return 0


def add(cfg: gateway_config.GatewayConfig, out_interface: str) -> int:
    """Masquerade the tunnel network out of `out_interface` and forward."""
    with open(IP_FORWARD) as handle:
        enabled = handle.read().strip() == "1"
    if not enabled:  # (a container gets it from its runtime and may not write it)
        with open(IP_FORWARD, "w") as handle:
            handle.write("1\n")
    rules = ruleset(str(cfg.gateway.tunnel_network), out_interface)
    subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True)
    result = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"pushgate-nat: nft failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"forwarding on; {cfg.gateway.tunnel_network} masqueraded out of {out_interface}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-nat",
        description="enable forwarding and masquerade the tunnel network out of OUT_IF, then exit",
    )
    add_version_argument(parser)
    parser.add_argument("--config", required=True, help="gateway config (TOML)")
    parser.add_argument("out_interface", nargs="?", metavar="OUT_IF")
    parser.add_argument("--remove", action="store_true", help="remove the NAT table instead")
    args = parser.parse_args(argv)
    hand_capabilities_to_children()  # nft needs CAP_NET_ADMIN
    if args.remove:
        return remove()
    if not args.out_interface:
        parser.error("OUT_IF is required (or --remove)")
    try:
        cfg = gateway_config.load(args.config)
    except gateway_config.ConfigError as error:
        print(f"pushgate-nat: {error}", file=sys.stderr)
        return 2
    return add(cfg, args.out_interface)


if __name__ == "__main__":
    sys.exit(main())
