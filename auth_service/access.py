"""Who may reach what: each user's AccessPolicy and NetworkConfig from the config's
groups and the user's memberships. Pure: no I/O, no clock.

A user's policy is the union of the rules of their groups (and of the group `all`,
if declared), plus the services the gateway offers on purpose ([dataplane]
offered_services: the dataplane still refuses the gateway's other ports). Rules are
put in a canonical order, duplicates dropped and port ranges of one destination and
protocol merged, so equal rule sets have equal digests (the dataplane compiles one
policy per digest). Without any [groups.*] table (the compatibility mode) every user
reaches the [auth] routes, any protocol, but not the tunnel network (no
client-to-client), as before groups existed.
"""

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pushgate_api import admin_pb2, auth_pb2, control_pb2
from pushgate_io.gateway_config import AccessRule, GatewayConfig, Group, merge_ports

ALL = "all"  # a declared group of this name applies to every user


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def canonical(rules: Iterable[AccessRule]) -> tuple[AccessRule, ...]:
    """`rules` sorted (destination, protocol), duplicates dropped, port ranges of one
    destination and protocol merged (a rule without ports allows every port)."""
    ports: dict[tuple, list | None] = {}
    for rule in rules:
        key = (rule.destination, rule.protocol)
        if key in ports and ports[key] is None:
            continue
        if not rule.ports:
            ports[key] = None
        else:
            ports.setdefault(key, []).extend(rule.ports)
    return tuple(
        AccessRule(destination, protocol, () if found is None else merge_ports(found))
        for (destination, protocol), found in sorted(
            ports.items(),
            key=lambda item: (item[0][0].network_address, item[0][0].prefixlen, item[0][1]),
        )
    )


def policy_message(rules: tuple[AccessRule, ...]) -> control_pb2.AccessPolicy:
    """The AccessPolicy of canonical `rules`; its digest names the rule list."""
    allow = [
        control_pb2.AccessRule(
            destination=str(rule.destination),
            protocol=rule.protocol,
            ports=[control_pb2.PortRange(first=a, last=b) for a, b in rule.ports],
        )
        for rule in rules
    ]
    lines = (
        f"{r.destination} {r.protocol} {','.join(f'{a}-{b}' for a, b in r.ports)}" for r in rules
    )
    return control_pb2.AccessPolicy(allow=allow, digest=_digest(lines))


def network_message(
    routes: Iterable[str],
    dns_servers: Iterable[str],
    search_domains: Iterable[str] = (),
    match_domains: Iterable[str] = (),
) -> auth_pb2.NetworkConfig:
    fields = [list(routes), list(dns_servers), list(search_domains), list(match_domains)]
    digest = _digest(" ".join(field) for field in fields)
    return auth_pb2.NetworkConfig(
        routes=fields[0],
        dns_servers=fields[1],
        search_domains=fields[2],
        match_domains=fields[3],
        digest=digest,
    )


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class AccessModel:
    """What the config says about access; `policy` and `network` per set of groups."""

    groups: dict[str, Group] | None  # None: the compatibility mode (no [groups.*])
    offered: tuple[AccessRule, ...]  # every user's: the gateway's offered services
    tunnel_network: ipaddress.IPv4Network
    compat_rules: tuple[AccessRule, ...]  # the compatibility mode's rules
    routes: tuple[str, ...]  # [auth] routes (the compatibility mode's)
    dns: tuple[str, ...]  # [auth] dns: every user's

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> "AccessModel":
        gateway = cfg.gateway
        offered = []
        for service in cfg.dataplane.offered_services:
            destination = ipaddress.ip_network(service.address)
            if service.port is None:
                offered.append(AccessRule(destination, 1, ()))
            else:
                number = 6 if service.protocol == "tcp" else 17
                offered.append(AccessRule(destination, number, ((service.port, service.port),)))
        compat = []
        for text in cfg.auth.routes:
            network = ipaddress.ip_network(text)
            if network.version != gateway.tunnel_network.version:
                continue  # the tunnel carries IPv4 only
            compat += [AccessRule(n, 0, ()) for n in _without(network, gateway.tunnel_network)]
        return cls(
            groups=None if cfg.groups is None else {g.name: g for g in cfg.groups},
            offered=tuple(r for r in offered if r.destination.version == 4),
            tunnel_network=gateway.tunnel_network,
            compat_rules=tuple(compat),
            routes=tuple(cfg.auth.routes),
            dns=tuple(cfg.auth.dns),
        )

    @property
    def compatibility(self) -> bool:
        return self.groups is None

    def declared(self, name: str) -> bool:
        return self.groups is not None and name in self.groups

    def effective(self, member_of: Iterable[str]) -> list[Group]:
        """The declared groups that apply to a member of `member_of` (and `all`), in the
        config file's order; undeclared names are ignored."""
        if self.groups is None:
            return []
        names = {*member_of, ALL}
        return [group for name, group in self.groups.items() if name in names]

    def policy(self, member_of: Iterable[str]) -> control_pb2.AccessPolicy:
        if self.groups is None:
            rules = [*self.compat_rules, *self.offered]
        else:
            rules = [rule for group in self.effective(member_of) for rule in group.allow]
            rules += self.offered
        return policy_message(canonical(rules))

    def network(self, member_of: Iterable[str]) -> auth_pb2.NetworkConfig:
        if self.groups is None:
            return network_message(self.routes, self.dns)
        groups = self.effective(member_of)
        routes = []
        for group in groups:
            if group.routes is not None:
                routes += group.routes
            else:  # derived: the tunnel network itself is on the client's link already
                routes += [
                    rule.destination
                    for rule in group.allow
                    if not rule.destination.subnet_of(self.tunnel_network)
                ]
        return network_message(
            [str(n) for n in ipaddress.collapse_addresses(routes)],
            _unique([*self.dns, *(str(a) for g in groups for a in g.dns_servers)]),
            _unique(d for g in groups for d in g.search_domains),
            _unique(d for g in groups for d in g.match_domains),
        )


def _without(network, excluded) -> list:
    """`network` less `excluded` (as prefixes)."""
    if network.version != excluded.version or not network.overlaps(excluded):
        return [network]
    if network.subnet_of(excluded):
        return []
    return sorted(network.address_exclude(excluded))


# -- membership: what the admin API and pushgate-admin check and list -----------------


def joining_problem(model: AccessModel, group: str) -> str | None:
    """Why users cannot join `group`, or None."""
    if model.groups is None:
        return (
            f"no group {group!r}: the config declares no [groups.*] (every user reaches "
            "[auth] routes); declare [groups.NAME] tables first"
        )
    if group not in model.groups:
        declared = ", ".join(model.groups) or "none"
        return f"no group {group!r} in the config (declared: {declared})"
    if group == ALL:
        return f"group {ALL!r} applies to every user: it takes no members"
    return None


def group_listing(
    model: AccessModel, memberships: dict[str, dict[str, list[str]]], group: str = ""
) -> list[admin_pb2.GroupInfo]:
    """Declared groups and groups with members (or `group` alone), by name."""
    declared = model.groups or {}
    names = sorted({*declared, *memberships})
    if group:
        names = [name for name in names if name == group]
    return [
        admin_pb2.GroupInfo(
            name=name,
            declared=name in declared,
            rules=len(declared[name].allow) if name in declared else 0,
            members=[
                admin_pb2.GroupMember(username=user, sources=sources)
                for user, sources in sorted(memberships.get(name, {}).items())
            ],
        )
        for name in names
    ]
