"""Plan the Windows client's network configuration from a session (pure code).

The Windows twin of `netplan.py`: the same decisions, written as IP Helper API
steps instead of `ip` command lines, so the plan is unit-tested on any OS and
`client/iphlpapi.py` only carries each step out.

- The tunnel address goes on the WinTun adapter (by its LUID); Windows adds the
  on-link route of its prefix itself.
- Full tunnel (a pushed 0.0.0.0/0): 0.0.0.0/1 and 128.0.0.0/1 on the adapter, as
  on Linux, which beat the default route without deleting it.
- The gateway keeps a /32 route through the interface and next hop that reached
  it before we started (GetBestRoute2), whenever a tunnel route would cover it:
  the UDP packets carrying the tunnel never enter the tunnel.
- The adapter gets a low interface metric (so Windows prefers it, and its DNS
  servers, over the physical interfaces) and an MTU that fits inside the path:
  the underlay interface's MTU minus the tunnel overhead, never more than pushed.
- Pushed DNS servers are set on the adapter with SetInterfaceDnsSettings; the
  IPv4 ones only, as the tunnel carries IPv4 (an IPv6 server in the same call
  would make Windows refuse the whole list).

Every step is a plain record that serializes to a list of strings, so the undo
steps go into the status file and a later run undoes what a crashed one left.

A live change (`plan_windows_update`) is the difference between the route steps
for the old and the new pushed routes on the same adapter, as netplan.py's
`plan_network_update`: routes added before any is removed, the adapter's DNS
servers set anew only when they changed.
"""

import ipaddress
from dataclasses import dataclass

from push_protocol.constants import OVERHEAD_IPV4, OVERHEAD_IPV6

from .netplan import FULL_TUNNEL_HALVES

TUNNEL_INTERFACE_METRIC = 5  # lower than any automatic metric Windows assigns (>= 25 wired)
ON_LINK = "0.0.0.0"  # next hop of a route straight onto the interface
MIN_TUNNEL_MTU = 576  # IPv4's minimum datagram every host must accept


@dataclass(frozen=True)
class UnderlayPath:
    """How the gateway is reached before the tunnel exists (GetBestRoute2)."""

    luid: int
    next_hop: str  # ON_LINK when the gateway is on the local network
    mtu: int  # the NlMtu of that interface


@dataclass(frozen=True)
class Step:
    """One IP Helper operation. `kind` is address | route | interface | dns."""

    kind: str
    luid: int
    args: tuple[str, ...]

    def to_list(self) -> list[str]:
        return [self.kind, str(self.luid), *self.args]

    @classmethod
    def from_list(cls, items: list[str]) -> "Step":
        kind, luid, *args = items
        if kind not in ("address", "route", "interface", "dns"):
            raise ValueError(f"unknown network step {kind!r}")
        return cls(kind, int(luid), tuple(args))


def address(luid: int, interface: str) -> Step:
    return Step("address", luid, (interface,))


def route(luid: int, prefix: str, next_hop: str = ON_LINK) -> Step:
    return Step("route", luid, (prefix, next_hop))


def interface_settings(luid: int, mtu: int, metric: int) -> Step:
    return Step("interface", luid, (str(mtu), str(metric)))


def dns(luid: int, adapter_guid: str, servers: list[str]) -> Step:
    return Step("dns", luid, (adapter_guid, ",".join(servers)))


@dataclass(frozen=True)
class WindowsNetworkPlan:
    apply: tuple[Step, ...]
    undo: tuple[Step, ...]  # carried out in this order, each one reversed
    mtu: int


def tunnel_mtu(pushed_mtu: int, underlay: UnderlayPath, gateway_ip: str) -> int:
    overhead = OVERHEAD_IPV6 if ipaddress.ip_address(gateway_ip).version == 6 else OVERHEAD_IPV4
    mtu = min(pushed_mtu, underlay.mtu - overhead)
    if mtu < MIN_TUNNEL_MTU:
        raise ValueError(
            f"the path to the gateway has MTU {underlay.mtu}: too small for a tunnel "
            f"({overhead} bytes of overhead)"
        )
    return mtu


def _tunnel_routes(tunnel_address: str, routes: list[str]) -> list[str]:
    """The prefixes to route on the adapter for `routes` (IPv4 only: the tunnel
    carries IPv4; the on-link tunnel network comes with the address)."""
    interface = ipaddress.ip_interface(tunnel_address)
    networks = [ipaddress.ip_network(prefix, strict=False) for prefix in routes]
    if any(network.prefixlen == 0 for network in networks):
        tunnel_routes = list(FULL_TUNNEL_HALVES)
        tunnel_routes += [str(n) for n in networks if n.prefixlen and n.version == 4]
    else:
        tunnel_routes = [str(n) for n in networks if n.version == 4]
    return [r for r in tunnel_routes if ipaddress.ip_network(r) != interface.network]


def windows_needs_gateway_route(tunnel_address: str, routes: list[str], gateway_ip: str) -> bool:
    """Would the adapter's routes for `routes` capture the packets to the gateway?"""
    gateway = ipaddress.ip_address(gateway_ip)
    return any(gateway in ipaddress.ip_network(r) for r in _tunnel_routes(tunnel_address, routes))


def plan_windows_routes(
    *,
    tunnel_luid: int,
    tunnel_address: str,
    routes: list[str],
    gateway_ip: str,
    underlay: UnderlayPath | None,
    other_endpoints: tuple[tuple[str, UnderlayPath], ...] = (),
) -> list[Step]:
    """The route steps for `routes`, in the order to add them (the gateway's /32
    first, then those of the other endpoints a move may need: a cluster's other
    gateways, each by its own underlay path). `underlay` is needed when
    windows_needs_gateway_route."""
    steps: list[Step] = []
    for address, path in ((gateway_ip, underlay), *other_endpoints):
        if not windows_needs_gateway_route(tunnel_address, routes, address):
            continue
        if path is None:
            raise ValueError("these routes need the route to the gateway outside the tunnel")
        host_address = ipaddress.ip_address(address)
        host = f"{host_address}/{host_address.max_prefixlen}"
        if route(path.luid, host, path.next_hop) not in steps:
            steps.append(route(path.luid, host, path.next_hop))
    steps += [route(tunnel_luid, prefix) for prefix in _tunnel_routes(tunnel_address, routes)]
    return steps


def adapter_dns_servers(dns_servers: list[str]) -> list[str]:
    """The pushed servers set on the adapter: IPv4 only (see the module's note)."""
    return [server for server in dns_servers if ipaddress.ip_address(server).version == 4]


def plan_windows_network(
    *,
    tunnel_luid: int,
    tunnel_guid: str,
    tunnel_address: str,
    mtu: int,
    routes: list[str],
    dns_servers: list[str],
    gateway_ip: str,
    underlay: UnderlayPath,
    other_endpoints: tuple[tuple[str, UnderlayPath], ...] = (),
) -> WindowsNetworkPlan:
    interface = ipaddress.ip_interface(tunnel_address)
    size = tunnel_mtu(mtu, underlay, gateway_ip)
    steps: list[Step] = [
        interface_settings(tunnel_luid, size, TUNNEL_INTERFACE_METRIC),
        address(tunnel_luid, str(interface)),
    ]
    steps += plan_windows_routes(
        tunnel_luid=tunnel_luid,
        tunnel_address=tunnel_address,
        routes=routes,
        gateway_ip=gateway_ip,
        underlay=underlay,
        other_endpoints=other_endpoints,
    )
    servers = adapter_dns_servers(dns_servers)
    if servers:
        steps.append(dns(tunnel_luid, tunnel_guid, servers))
    # The interface settings die with the adapter; the rest is undone (routes
    # and address too, in case the adapter outlives us), newest first.
    undo = tuple(step for step in reversed(steps) if step.kind != "interface")
    return WindowsNetworkPlan(tuple(steps), undo, size)


@dataclass(frozen=True)
class WindowsNetworkUpdate:
    """How to move a live tunnel from one pushed network to another.

    `add` (routes, the gateway's /32 first, then the adapter's DNS) runs first and
    must succeed; `remove` (routes, undone in this order: the tunnel's before the
    /32 that keeps them from looping) after it, where a route already gone is no
    failure. The undo record gains `recorded` and loses `dropped`."""

    add: tuple[Step, ...]
    remove: tuple[Step, ...]
    recorded: tuple[Step, ...]
    dropped: tuple[Step, ...]

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def plan_windows_update(
    *,
    tunnel_luid: int,
    tunnel_guid: str,
    tunnel_address: str,
    old_routes: list[str],
    old_dns: list[str],
    new_routes: list[str],
    new_dns: list[str],
    gateway_ip: str,
    underlay: UnderlayPath | None,
) -> WindowsNetworkUpdate:
    """From the old pushed routes and DNS servers to the new ones on the live
    adapter: the routes only one side has, and the adapter's DNS servers set anew
    when they differ (to none when none is pushed any more). `underlay` (how the
    gateway is reached outside the tunnel) is needed when either side needs the
    gateway's /32."""

    def routes_of(routes: list[str]) -> list[Step]:
        return plan_windows_routes(
            tunnel_luid=tunnel_luid,
            tunnel_address=tunnel_address,
            routes=routes,
            gateway_ip=gateway_ip,
            underlay=underlay,
        )

    old, new = routes_of(old_routes), routes_of(new_routes)
    add = [step for step in new if step not in old]
    remove = [step for step in reversed(old) if step not in new]
    recorded, dropped = list(add), list(remove)
    old_servers, new_servers = adapter_dns_servers(old_dns), adapter_dns_servers(new_dns)
    if new_servers != old_servers:
        add.append(dns(tunnel_luid, tunnel_guid, new_servers))  # [] sets none
        if new_servers:
            recorded.append(add[-1])
        if old_servers:
            dropped.append(dns(tunnel_luid, tunnel_guid, old_servers))
    return WindowsNetworkUpdate(tuple(add), tuple(remove), tuple(recorded), tuple(dropped))
