"""The gateway config file (TOML), read by pushgate-auth and pushgate-dataplane.

One file, three sections: [gateway] (shared), [auth], [dataplane]. Paths are
relative to the file's directory. Every error names the section and key.
`pushgate-admin init` writes a complete file; docs are in the README.
"""

import ipaddress
import os
import tomllib
from dataclasses import dataclass

from push_protocol.aead import CipherSuite
from push_protocol.constants import (
    DEFAULT_KEEPALIVE_SECONDS,
    DEFAULT_TUNNEL_MTU,
    REJECT_AFTER_SECONDS,
    REKEY_AFTER_SECONDS,
)

# How long a freed tunnel address is kept from other users. Linux keeps a UDP flow's
# conntrack (NAT) entry 120 s after its last packet once both directions were seen
# (nf_conntrack_udp_timeout_stream), 30 s otherwise, ICMP 30 s: 180 s outlasts those with
# margin. TCP's established entries live 5 days, which no quarantine covers: the
# dataplane deletes an ended session's entries itself (dataplane/conntrack.py).
DEFAULT_ADDRESS_QUARANTINE_SECONDS = 180.0


class ConfigError(Exception):
    """The config file is missing, unreadable or wrong; the message names the key."""


@dataclass(frozen=True)
class GatewaySection:
    tunnel_network: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    mtu: int
    keepalive_seconds: float
    cipher: CipherSuite
    control_socket: str
    control_group: str | None  # may use the session feed socket besides its owner


@dataclass(frozen=True)
class AuthSection:
    listen: str
    tls_cert: str
    tls_key: str
    ca_cert: str
    database: str
    dataplane_endpoint: tuple[str, int]
    routes: tuple[str, ...]
    dns: tuple[str, ...]
    metrics_listen: tuple[str, int]
    session_lifetime_seconds: float
    key_lifetime_seconds: float  # clients rekey after this (pushed at login)
    key_expiry_seconds: float  # keys not replaced by then end their session
    max_failures_before_delay: int  # per (user, source)
    max_source_failures_before_delay: int  # per source, all user names together
    max_network_failures_before_delay: int  # per IPv4 /24, for sources that failed
    failure_delay_seconds: float
    max_failure_delay_seconds: float
    max_throttle_records: int
    spray_alert_sources: int
    hash_workers: int
    max_pending_hashes: int
    address_quarantine_seconds: float  # a freed address goes to another user after this
    max_sessions_per_user: int  # a login beyond it ends the user's oldest session
    max_connections: int  # client API connections; also bounded by the fd limit
    reflection: bool  # gRPC server reflection on the client API port
    admin_socket: str  # the admin API (pushgate-admin), Unix socket, mode 0600
    audit_log: str | None  # JSON lines of logins, session ends, admin changes; None: stdout


@dataclass(frozen=True)
class OfferedService:
    """A service of the gateway host that clients may reach through the tunnel."""

    protocol: str  # "tcp", "udp" or "ping" (ICMP/ICMPv6 echo request)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int | None  # None for ping

    @classmethod
    def parse(cls, text: str, key: str) -> "OfferedService":
        """From "ping ADDRESS", "tcp ADDRESS:PORT" or "udp ADDRESS:PORT" ([v6]:PORT)."""
        protocol, _, where = text.strip().partition(" ")
        where = where.strip()
        try:
            if protocol == "ping":
                return cls(protocol, ipaddress.ip_address(where), None)
            if protocol in ("tcp", "udp"):
                host, port = parse_host_port(where, key)
                if not where.rpartition(":")[0]:
                    raise ValueError("an address is required")
                return cls(protocol, ipaddress.ip_address(host), port)
        except ValueError as error:
            raise ConfigError(f"{key}: {text!r}: {error}") from None
        raise ConfigError(
            f'{key}: {text!r}: expected "ping ADDRESS", "tcp ADDRESS:PORT" or "udp ADDRESS:PORT"'
        )


@dataclass(frozen=True)
class DataplaneSection:
    listen: tuple[str, int]
    tun_name: str
    stats_socket: str
    metrics_listen: tuple[str, int]
    user: str | None  # started as root, the dataplane becomes this user after set-up
    # Clients never reach the gateway host's own addresses, link-local, loopback,
    # multicast or broadcast (dataplane/destinations.py); these networks neither ...
    deny_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # ... except these services, offered on purpose (default: ping the gateway address).
    offered_services: tuple[OfferedService, ...]


@dataclass(frozen=True)
class GatewayConfig:
    path: str
    gateway: GatewaySection
    auth: AuthSection
    dataplane: DataplaneSection


def parse_host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Section:
    def __init__(self, table: dict, name: str, base: str) -> None:
        value = table.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.values, self.name, self.base = value, name, base

    def get(self, key: str, kind: type, default=None):
        value = self.values.get(key, default)
        if value is None:
            raise ConfigError(f"[{self.name}] {key} is required")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"[{self.name}] {key}: expected {kind.__name__}, got {value!r}")
        return value

    def optional(self, key: str, kind: type):
        return None if key not in self.values else self.get(key, kind)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"[{self.name}] {key}: expected a number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"[{self.name}] {key}: {value} is out of range {low}..{high}")
        return value

    def path(self, key: str, default: str | None = None) -> str:
        return os.path.join(self.base, self.get(key, str, default))

    def endpoint(self, key: str, default: str | None = None) -> tuple[str, int]:
        return parse_host_port(self.get(key, str, default), f"[{self.name}] {key}")

    def strings(self, key: str, default: list[str]) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"[{self.name}] {key}: expected a list of strings")
        return tuple(value)


def _gateway(section: _Section) -> GatewaySection:
    try:
        network = ipaddress.ip_network(section.get("tunnel_network", str))
    except ValueError as error:
        raise ConfigError(f"[gateway] tunnel_network: {error}") from None
    try:
        gateway = ipaddress.ip_address(section.get("gateway_address", str))
    except ValueError as error:
        raise ConfigError(f"[gateway] gateway_address: {error}") from None
    if gateway not in network:
        raise ConfigError(f"[gateway] gateway_address {gateway} is not in {network}")
    cipher_name = section.get("cipher", str, CipherSuite.AES_256_GCM.value)
    try:
        cipher = CipherSuite(cipher_name)
    except ValueError:
        choices = ", ".join(c.value for c in CipherSuite)
        raise ConfigError(f"[gateway] cipher: {cipher_name!r} is not one of {choices}") from None
    return GatewaySection(
        tunnel_network=network,
        gateway_address=gateway,
        mtu=int(section.number("mtu", DEFAULT_TUNNEL_MTU, 576, 65535 - 80)),
        keepalive_seconds=float(
            section.number("keepalive_seconds", DEFAULT_KEEPALIVE_SECONDS, 1, 3600)
        ),
        cipher=cipher,
        control_socket=section.path("control_socket", "run/control.sock"),
        control_group=section.optional("control_group", str),
    )


def _auth(section: _Section) -> AuthSection:
    routes = section.strings("routes", ["0.0.0.0/0"])
    for route in routes:
        try:
            ipaddress.ip_network(route)
        except ValueError as error:
            raise ConfigError(f"[auth] routes: {error}") from None
    dns = section.strings("dns", [])
    for server in dns:
        try:
            ipaddress.ip_address(server)
        except ValueError as error:
            raise ConfigError(f"[auth] dns: {error}") from None
    listen = section.get("listen", str, "0.0.0.0:7443")
    parse_host_port(listen, "[auth] listen")
    key_expiry = float(
        section.number("key_expiry_seconds", REJECT_AFTER_SECONDS, 2, REJECT_AFTER_SECONDS)
    )
    key_lifetime = float(section.number("key_lifetime_seconds", REKEY_AFTER_SECONDS, 1, 86400))
    if key_lifetime >= key_expiry:
        raise ConfigError(
            f"[auth] key_lifetime_seconds ({key_lifetime:g}) must be below "
            f"key_expiry_seconds ({key_expiry:g}): clients must rekey before keys expire"
        )
    return AuthSection(
        listen=listen,
        tls_cert=section.path("tls_cert", "tls/server.crt"),
        tls_key=section.path("tls_key", "tls/server.key"),
        ca_cert=section.path("ca_cert", "tls/ca.crt"),
        database=section.path("database", "pushgate.db"),
        dataplane_endpoint=section.endpoint("dataplane_endpoint"),
        routes=routes,
        dns=dns,
        metrics_listen=section.endpoint("metrics_listen", "127.0.0.1:9101"),
        session_lifetime_seconds=float(
            section.number("session_lifetime_seconds", 86400, 0, 10 * 365 * 86400)
        ),
        key_lifetime_seconds=key_lifetime,
        key_expiry_seconds=key_expiry,
        max_failures_before_delay=int(section.number("max_failures_before_delay", 5, 1, 1000)),
        max_source_failures_before_delay=int(
            section.number("max_source_failures_before_delay", 20, 1, 100000)
        ),
        max_network_failures_before_delay=int(
            section.number("max_network_failures_before_delay", 100, 1, 1000000)
        ),
        failure_delay_seconds=float(section.number("failure_delay_seconds", 1.0, 0.01, 3600)),
        max_failure_delay_seconds=float(
            section.number("max_failure_delay_seconds", 300.0, 0.01, 86400)
        ),
        max_throttle_records=int(section.number("max_throttle_records", 100000, 100, 10**8)),
        spray_alert_sources=int(section.number("spray_alert_sources", 10, 2, 1000)),
        hash_workers=int(section.number("hash_workers", 2, 1, 64)),
        max_pending_hashes=int(section.number("max_pending_hashes", 64, 1, 100000)),
        address_quarantine_seconds=float(
            section.number(
                "address_quarantine_seconds", DEFAULT_ADDRESS_QUARANTINE_SECONDS, 0, 86400
            )
        ),
        max_sessions_per_user=int(section.number("max_sessions_per_user", 3, 1, 100000)),
        max_connections=int(section.number("max_connections", 10000, 16, 1000000)),
        reflection=section.get("reflection", bool, False),
        admin_socket=section.path("admin_socket", "run/admin.sock"),
        audit_log=(
            None
            if section.get("audit_log", str, "audit.log") == "-"
            else section.path("audit_log", "audit.log")
        ),
    )


def _dataplane(section: _Section, gateway: GatewaySection) -> DataplaneSection:
    tun_name = section.get("tun_name", str, "pg0")
    if not 0 < len(tun_name) < 16:
        raise ConfigError(f"[dataplane] tun_name: {tun_name!r} must be 1-15 characters")
    deny_networks = []
    for network in section.strings("deny_networks", []):
        try:
            deny_networks.append(ipaddress.ip_network(network))
        except ValueError as error:
            raise ConfigError(f"[dataplane] deny_networks: {error}") from None
    key = "[dataplane] offered_services"
    offered = section.strings("offered_services", [f"ping {gateway.gateway_address}"])
    return DataplaneSection(
        listen=section.endpoint("listen", "0.0.0.0:51820"),
        tun_name=tun_name,
        stats_socket=section.path("stats_socket", "run/dataplane.sock"),
        metrics_listen=section.endpoint("metrics_listen", "127.0.0.1:9102"),
        user=section.optional("user", str),
        deny_networks=tuple(deny_networks),
        offered_services=tuple(OfferedService.parse(text, key) for text in offered),
    )


def load(path: str, *, auth: bool = False) -> GatewayConfig:
    """Read and check the file; the [auth] section is checked only if `auth`."""
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(path))
    gateway = _gateway(_Section(table, "gateway", base))
    return GatewayConfig(
        path=os.path.abspath(path),
        gateway=gateway,
        auth=_auth(_Section(table, "auth", base)) if auth else None,
        dataplane=_dataplane(_Section(table, "dataplane", base), gateway),
    )
