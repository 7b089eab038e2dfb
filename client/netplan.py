"""Plan the client's network configuration from a session (pure code).

The plan is a list of `ip`/`resolvectl` command lines to apply in order and
their inverses to undo in reverse order, so it is unit-tested without a network.

Full tunnel (a pushed route of 0.0.0.0/0): as OpenVPN's def1, the tunnel gets
0.0.0.0/1 and 128.0.0.0/1, which are more specific than the default route and
so win without deleting it; the gateway's own address keeps a /32 route through
the original path (the route `ip route get <gateway>` reports before we start),
so the UDP packets carrying the tunnel are never routed into the tunnel.
Split tunnel: just the pushed routes on the tunnel device, plus the same /32 to
the gateway when a pushed route covers the gateway's address.

DNS goes to systemd-resolved for the tunnel link only (`resolvectl`): the pushed
servers, the search domains, the split-DNS match domains as routing-only
domains (`~corp.example`), and whether the link is the default route for names
no link claims (full tunnel: yes, with `~.`; split tunnel with domains: no, so
only names under them reach the tunnel's servers; split tunnel with servers
and no domain: `~.`, every name, as before domains existed).

A live change (`plan_network_update`) is the difference between the plans for
the old and the new pushed network on the same TUN: routes added before any is
removed, DNS set anew only when it changed.
"""

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from pushgate_io.tun import TUN_QUEUE_PACKETS

from .auth import PushedNetwork

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


@dataclass(frozen=True)
class Route:
    """One route the plan owns: on the TUN, or the gateway's /32 on the underlay."""

    prefix: str
    dev: str
    via: str | None = None

    def add(self) -> tuple[str, ...]:
        command = ("ip", "route", "replace", self.prefix, "dev", self.dev)
        return (*command, "via", self.via) if self.via else command

    def delete(self) -> tuple[str, ...]:
        return ("ip", "route", "del", self.prefix, "dev", self.dev)


@dataclass(frozen=True)
class NetworkUpdate:
    """How to move a live tunnel from one pushed network to another.

    `add` (routes, then DNS) runs first and must succeed; `remove` (routes) after
    it, where a route already gone is no failure; `undo` replaces the undo steps
    of the configuration (what lives outside the TUN device)."""

    add: tuple[tuple[str, ...], ...]
    remove: tuple[tuple[str, ...], ...]
    undo: tuple[tuple[str, ...], ...]
    dns_applied: bool

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def is_full_tunnel(routes: Sequence[str]) -> bool:
    return any(ipaddress.ip_network(route, strict=False).prefixlen == 0 for route in routes)


def needs_gateway_route(routes: Sequence[str], gateway_ip: str) -> bool:
    """Would `routes` take the tunnel's own packets to the gateway into the tunnel?
    (A full tunnel, or a split route that covers the gateway's address.)"""
    gateway = ipaddress.ip_address(gateway_ip)
    networks = [ipaddress.ip_network(route, strict=False) for route in routes]
    return any(n.version == gateway.version and gateway in n for n in networks)


def plan_routes(
    *,
    tun_name: str,
    tunnel_address: str,
    routes: Sequence[str],
    gateway_ip: str,
    underlay: UnderlayRoute | None,
) -> list[Route]:
    """The routes for `routes`, in the order to add them (the gateway's /32 first).
    `underlay` is needed when needs_gateway_route."""
    interface = ipaddress.ip_interface(tunnel_address)
    networks = [ipaddress.ip_network(route, strict=False) for route in routes]
    planned: list[Route] = []
    if needs_gateway_route(routes, gateway_ip):
        if underlay is None:
            raise ValueError("these routes need the route to the gateway outside the tunnel")
        gateway = ipaddress.ip_address(gateway_ip)
        host = f"{gateway}/{gateway.max_prefixlen}"
        planned.append(Route(host, underlay.dev, underlay.via))
    if is_full_tunnel(routes):
        tunnel_routes = list(FULL_TUNNEL_HALVES)
        tunnel_routes += [str(n) for n in networks if n.prefixlen and n.version == 4]
    else:
        tunnel_routes = [str(network) for network in networks]
    for route in tunnel_routes:
        if ipaddress.ip_network(route) == interface.network:
            continue  # the kernel already routes the on-link tunnel network
        planned.append(Route(route, tun_name))
    return planned


def plan_dns(tun_name: str, network: PushedNetwork) -> tuple[tuple[str, ...], ...]:
    """`resolvectl` commands giving the tunnel link the pushed DNS (none without a
    server: domains routed to a link without servers would only fail)."""
    if not network.dns_servers:
        return ()
    full = is_full_tunnel(network.routes)
    domains = [*network.search_domains, *(f"~{d.lstrip('~')}" for d in network.match_domains)]
    if full or not domains:
        domains.append("~.")
    return (
        ("resolvectl", "dns", tun_name, *network.dns_servers),
        ("resolvectl", "domain", tun_name, *domains),
        ("resolvectl", "default-route", tun_name, "yes" if "~." in domains else "no"),
    )


def dns_not_applied(network: PushedNetwork, have_resolvectl: bool) -> str | None:
    """What of the pushed DNS the plan leaves out, and why (for the log); None if all."""
    parts = [
        f"{what} {', '.join(values)}"
        for what, values in (
            ("DNS servers", network.dns_servers),
            ("search domains", network.search_domains),
            ("match domains", network.match_domains),
        )
        if values
    ]
    if not parts:
        return None
    if not have_resolvectl:
        return f"pushed {'; '.join(parts)} not applied: resolvectl is not available"
    if not network.dns_servers:
        return f"pushed {'; '.join(parts)} not applied: no DNS server was pushed for them"
    return None


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
    search_domains: Sequence[str] = (),
    match_domains: Sequence[str] = (),
) -> NetworkPlan:
    interface = ipaddress.ip_interface(tunnel_address)
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
    planned = plan_routes(
        tun_name=tun_name,
        tunnel_address=tunnel_address,
        routes=routes,
        gateway_ip=gateway_ip,
        underlay=underlay,
    )
    apply += [route.add() for route in planned]
    network = PushedNetwork(
        tuple(routes), tuple(dns_servers), tuple(search_domains), tuple(match_domains)
    )
    dns = plan_dns(tun_name, network) if have_resolvectl else ()
    apply += dns
    return NetworkPlan(tuple(apply), _undo(tun_name, planned, bool(dns)), bool(dns))


def _undo(tun_name: str, planned: list[Route], dns: bool) -> tuple[tuple[str, ...], ...]:
    # Routes and the address on the TUN device vanish with the device itself;
    # only what lives elsewhere needs undoing.
    undo = [route.delete() for route in planned if route.dev != tun_name]
    if dns:
        undo.append(("resolvectl", "revert", tun_name))
    return tuple(reversed(undo))


def plan_network_update(
    *,
    tun_name: str,
    tunnel_address: str,
    old: PushedNetwork,
    new: PushedNetwork,
    gateway_ip: str,
    underlay: UnderlayRoute | None,
    have_resolvectl: bool,
) -> NetworkUpdate:
    """From `old` to `new` on the live TUN: the routes only one of them has, and the
    DNS set anew if it differs (or reverted, when `new` has no DNS server).
    `underlay` (how the gateway is reached outside the tunnel) is needed when either
    is a full tunnel."""
    plans = {
        which: plan_routes(
            tun_name=tun_name,
            tunnel_address=tunnel_address,
            routes=network.routes,
            gateway_ip=gateway_ip,
            underlay=underlay,
        )
        for which, network in (("old", old), ("new", new))
    }
    old_routes, new_routes = plans["old"], plans["new"]
    add = [route.add() for route in new_routes if route not in old_routes]
    # the tunnel's routes go before the gateway's /32 that keeps them from looping
    remove = [route.delete() for route in reversed(old_routes) if route not in new_routes]
    old_dns = plan_dns(tun_name, old) if have_resolvectl else ()
    new_dns = plan_dns(tun_name, new) if have_resolvectl else ()
    if new_dns != old_dns:
        add += new_dns or [("resolvectl", "revert", tun_name)]
    return NetworkUpdate(
        tuple(add), tuple(remove), _undo(tun_name, new_routes, bool(new_dns)), bool(new_dns)
    )
