"""Plan the client's network configuration from a session (pure code).

The plan is a list of `ip`/`resolvectl` command lines to apply in order and
their inverses to undo in reverse order, so it is unit-tested without a network.

Full tunnel (a pushed route of 0.0.0.0/0): as OpenVPN's def1, the tunnel gets
0.0.0.0/1 and 128.0.0.0/1, which are more specific than the default route and
so win without deleting it; the gateway's own address keeps a /32 route through
the original path (the route `ip route get <gateway>` reports before we start),
so the UDP packets carrying the tunnel are never routed into the tunnel.
Split tunnel: just the pushed routes on the tunnel device.
"""

import ipaddress
from dataclasses import dataclass

from pushgate_io.tun import TUN_QUEUE_PACKETS

FULL_TUNNEL_HALVES = ("0.0.0.0/1", "128.0.0.0/1")


@dataclass(frozen=True)
class UnderlayRoute:
    """How the gateway is reached before the tunnel exists (`ip route get`)."""

    dev: str
    via: str | None = None


@dataclass(frozen=True)
class NetworkPlan:
    apply: tuple[tuple[str, ...], ...]
    undo: tuple[tuple[str, ...], ...]
    dns_applied: bool


def parse_route_get(entries: list[dict]) -> UnderlayRoute:
    """Read `ip -j route get ADDR` output."""
    if not entries or "dev" not in entries[0]:
        raise ValueError(f"no route to the gateway: {entries!r}")
    return UnderlayRoute(dev=entries[0]["dev"], via=entries[0].get("gateway"))


def plan_network(
    *,
    tun_name: str,
    tunnel_address: str,
    mtu: int,
    routes: list[str],
    dns_servers: list[str],
    gateway_ip: str,
    underlay: UnderlayRoute,
    have_resolvectl: bool,
) -> NetworkPlan:
    interface = ipaddress.ip_interface(tunnel_address)
    networks = [ipaddress.ip_network(route, strict=False) for route in routes]
    apply: list[tuple[str, ...]] = [
        # No IPv6 link-local address: its chatter would only be dropped as spoofed.
        ("ip", "link", "set", "dev", tun_name, "addrgenmode", "none"),
        ("ip", "address", "add", str(interface), "dev", tun_name),
        (
            "ip",
            "link",
            "set",
            "dev",
            tun_name,
            "mtu",
            str(mtu),
            "txqueuelen",
            str(TUN_QUEUE_PACKETS),
            "up",
        ),
    ]
    undo: list[tuple[str, ...]] = []
    full_tunnel = any(network.prefixlen == 0 for network in networks)
    if full_tunnel:
        gateway = ipaddress.ip_address(gateway_ip)
        host = f"{gateway}/{gateway.max_prefixlen}"
        exception = ("ip", "route", "replace", host, "dev", underlay.dev)
        if underlay.via:
            exception += ("via", underlay.via)
        apply.append(exception)
        undo.append(("ip", "route", "del", host, "dev", underlay.dev))
        tunnel_routes = list(FULL_TUNNEL_HALVES)
        tunnel_routes += [str(n) for n in networks if n.prefixlen and n.version == 4]
    else:
        tunnel_routes = [str(network) for network in networks]
    for route in tunnel_routes:
        if ipaddress.ip_network(route) == interface.network:
            continue  # the kernel already routes the on-link tunnel network
        apply.append(("ip", "route", "replace", route, "dev", tun_name))
    dns_applied = bool(dns_servers) and have_resolvectl
    if dns_applied:
        apply.append(("resolvectl", "dns", tun_name, *dns_servers))
        domain = "~." if full_tunnel else "~"
        apply.append(("resolvectl", "domain", tun_name, domain))
        undo.append(("resolvectl", "revert", tun_name))
    # Routes and the address on the TUN device vanish with the device itself;
    # only what lives elsewhere needs undoing.
    return NetworkPlan(tuple(apply), tuple(reversed(undo)), dns_applied)
