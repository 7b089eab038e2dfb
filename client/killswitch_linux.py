"""The Linux kill switch: an nftables `inet` table of our own (pure builder + nft runner).

`build_ruleset` turns a `FirewallPolicy` into an nft script (pure, unit-tested);
`install` loads it in one transaction (the old table, if any, is replaced
atomically: no instant without rules), `remove` deletes it. The table is a kernel
object: it outlives the client process (a crash, `kill -9`), reconnects and
re-logins; only `pushgate-client disconnect` (or an explicit stop of the client:
SIGINT, SIGTERM) removes it.

Two strengths, one table `inet pushgate_<tun>`:
- *kill switch* (`lockdown`): out of every interface but loopback and the TUN only
  the gateway's endpoints (address, protocol, port: the auth service over TCP, the
  dataplane over UDP), DHCP/DHCPv6 and IPv6 neighbour discovery (link-local, hop
  limit 255), and, opt-in, the LAN (private, link-local and local multicast ranges:
  never a public prefix, so a hostile LAN that announces one on-link, the "LocalNet"
  attack, gets nothing); the same for forwarded packets (containers, VMs); in,
  only answers (conntrack) and the same link-local helpers.
- *full tunnel without the kill switch* (`--no-lockdown`): IPv6 (which the tunnel
  does not carry yet) and DNS (port 53) never leave outside the tunnel; the rest is
  left to the routes.
In both, DNS to port 53 is dropped outside the tunnel and loopback (also towards the
LAN), so a pushed resolver that could not be applied fails closed instead of
falling back to the LAN's (OpenVPN's `block-outside-dns`).

A `drop` in any nftables base chain is final whatever other tables (firewalld,
Docker) accept, so nothing else on the host can open a hole in it.
"""

import ipaddress
import logging
import re
import subprocess
from dataclasses import dataclass

from .host import LAN_PREFIXES

log = logging.getLogger("pushgate.client")

TABLE_PREFIX = "pushgate_"
# Linux interface names (IFNAMSIZ - 1), and only characters safe in an nft string.
_TUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True, order=True)
class Endpoint:
    """One of the gateway's endpoints on the underlay."""

    address: str
    port: int
    protocol: str  # tcp | udp

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.address)  # ValueError for anything else
        if self.protocol not in PROTOCOLS or not 0 < self.port < 65536:
            raise ValueError(f"not an endpoint: {self!r}")


@dataclass(frozen=True)
class FirewallPolicy:
    tun_name: str
    endpoints: tuple[Endpoint, ...] = ()
    lockdown: bool = False  # the kill switch
    block_ipv6: bool = False  # IPv6 outside the tunnel (a full tunnel, IPv4 only)
    block_outside_dns: bool = False  # port 53 outside the tunnel and loopback
    allow_lan: bool = False  # with the kill switch: the LAN_PREFIXES stay reachable

    @property
    def empty(self) -> bool:
        """Nothing to enforce: no table at all."""
        return not (self.lockdown or self.block_ipv6 or self.block_outside_dns)


def table_name(tun_name: str) -> str:
    if not _TUN_NAME.fullmatch(tun_name):
        raise ValueError(f"not a TUN name: {tun_name!r}")
    return TABLE_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", tun_name)


def _endpoint_rule(endpoint: Endpoint) -> str:
    family = "ip" if ipaddress.ip_address(endpoint.address).version == 4 else "ip6"
    return f"{family} daddr {endpoint.address} {endpoint.protocol} dport {endpoint.port} accept"


def _prefix_set(version: int) -> str:
    prefixes = [p for p in LAN_PREFIXES if ipaddress.ip_network(p).version == version]
    return "{ " + ", ".join(prefixes) + " }"


# What a host needs on the link itself to keep its address and reach its router:
# DHCP and DHCPv6, and IPv6 neighbour/router discovery (hop limit 255: never routed).
_LINK_OUT = (
    "udp sport 68 udp dport 67 accept",
    "udp sport 546 udp dport 547 accept",
    "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }"
    " ip6 hoplimit 255 accept",
    "icmpv6 type { mld-listener-report, mld2-listener-report } accept",
)
_LINK_IN = (
    "udp sport 67 udp dport 68 accept",
    "udp sport 547 udp dport 546 accept",
    "icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }"
    " ip6 hoplimit 255 accept",
)
_DNS_DROP = ("udp dport 53 counter drop", "tcp dport 53 counter drop")


def _output_rules(policy: FirewallPolicy, tun: str) -> list[str]:
    rules = [
        'oifname "lo" accept',
        f'oifname "{tun}" accept',
        *(_endpoint_rule(e) for e in sorted(policy.endpoints)),
    ]
    if policy.lockdown or policy.block_ipv6:
        rules += _LINK_OUT  # before the IPv6 drop: the link keeps working
    if policy.lockdown or policy.block_outside_dns:
        rules += _DNS_DROP  # before the LAN: never the LAN's resolver
    if policy.lockdown:
        if policy.allow_lan:
            rules += [f"ip daddr {_prefix_set(4)} accept", f"ip6 daddr {_prefix_set(6)} accept"]
            rules.append("ip daddr 255.255.255.255 accept")
        rules.append("counter drop")
    elif policy.block_ipv6:
        rules.append("meta nfproto ipv6 counter drop")
    return rules


def _input_rules(policy: FirewallPolicy, tun: str) -> list[str]:
    rules = [
        'iifname "lo" accept',
        f'iifname "{tun}" accept',
        "ct state established,related accept",
        *_LINK_IN,
    ]
    if policy.allow_lan:
        rules += [f"ip saddr {_prefix_set(4)} accept", f"ip6 saddr {_prefix_set(6)} accept"]
    rules.append("counter drop")
    return rules


def _forward_rules(policy: FirewallPolicy, tun: str) -> list[str]:
    rules = [f'oifname "{tun}" accept', f'iifname "{tun}" ct state established,related accept']
    if policy.allow_lan:
        rules += [
            *_DNS_DROP,
            f"ip daddr {_prefix_set(4)} accept",
            f"ip6 daddr {_prefix_set(6)} accept",
            f"ip saddr {_prefix_set(4)} ct state established,related accept",
            f"ip6 saddr {_prefix_set(6)} ct state established,related accept",
        ]
    rules.append("counter drop")
    return rules


def _chain(name: str, hook: str, rules: list[str]) -> list[str]:
    return [
        f"\tchain {name} {{",
        f"\t\ttype filter hook {hook} priority filter; policy accept;",
        *(f"\t\t{rule}" for rule in rules),
        "\t}",
    ]


def build_ruleset(policy: FirewallPolicy) -> str:
    """The nft script that replaces the table of `policy.tun_name` with `policy`
    (one transaction: `nft -f` applies all of it or nothing)."""
    table = table_name(policy.tun_name)
    tun = policy.tun_name
    lines = [
        f"table inet {table}",  # so that the delete below never fails
        f"delete table inet {table}",
        f"table inet {table} {{",
        *_chain("output", "output", _output_rules(policy, tun)),
    ]
    if policy.lockdown:
        lines += _chain("input", "input", _input_rules(policy, tun))
        lines += _chain("forward", "forward", _forward_rules(policy, tun))
    lines.append("}")
    return "\n".join(lines) + "\n"


def describe(policy: FirewallPolicy) -> str:
    endpoints = ", ".join(f"{e.protocol} {e.address}:{e.port}" for e in sorted(policy.endpoints))
    return (
        f"kill switch {'on' if policy.lockdown else 'off'}"
        f"{' (LAN allowed)' if policy.lockdown and policy.allow_lan else ''},"
        f" IPv6 outside the tunnel {'blocked' if policy.lockdown or policy.block_ipv6 else 'open'},"
        f" DNS outside the tunnel"
        f" {'blocked' if policy.lockdown or policy.block_outside_dns else 'open'};"
        f" gateway endpoints: {endpoints or 'none yet'}"
    )


# -- the runner: nft -----------------------------------------------------------------


class NftError(OSError):
    pass


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["nft", *args], input=script, capture_output=True, text=True)
    except FileNotFoundError:  # no nftables: nothing is there, and nothing can be
        return subprocess.CompletedProcess(["nft", *args], 127, "", "nft is not installed")


def install(policy: FirewallPolicy) -> None:
    """Load `policy` (replacing the table in one transaction); an empty policy removes it."""
    if policy.empty:
        remove(policy.tun_name)
        return
    result = _nft("-f", "-", script=build_ruleset(policy))
    if result.returncode != 0:
        raise NftError(f"nft: {result.stderr.strip()}")


def installed(tun_name: str) -> bool:
    return _nft("list", "table", "inet", table_name(tun_name)).returncode == 0


def remove(tun_name: str) -> bool:
    """Delete the table of `tun_name`; False if there was none."""
    if not installed(tun_name):
        return False
    result = _nft("delete", "table", "inet", table_name(tun_name))
    if result.returncode != 0:
        raise NftError(f"nft: {result.stderr.strip()}")
    return True
