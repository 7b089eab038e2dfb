"""The gateway config file (TOML), read by pushgate-auth and pushgate-dataplane.

One file, three sections: [gateway] (shared), [auth], [dataplane]. Paths are
relative to the file's directory. Every error names the file, the line and the
key ("pushgate.toml:12: [auth] metric_listen: unknown key; did you mean
metrics_listen?"). A section's keys are its dataclass's fields, so a key the code
does not read is refused, never ignored. `pushgate-admin init` writes a complete
file (checked with `parse` before anything is written); docs are in the README.
"""

import contextlib
import dataclasses
import difflib
import ipaddress
import itertools
import json
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass

from push_protocol.aead import CipherSuite
from push_protocol.constants import (
    DEFAULT_KEEPALIVE_SECONDS,
    DEFAULT_TUNNEL_MTU,
    REJECT_AFTER_SECONDS,
    REKEY_AFTER_SECONDS,
)
from push_protocol.policy import merge_ports

# How long a freed tunnel address is kept from other users. Linux keeps a UDP flow's
# conntrack (NAT) entry 120 s after its last packet once both directions were seen
# (nf_conntrack_udp_timeout_stream), 30 s otherwise, ICMP 30 s: 180 s outlasts those with
# margin. TCP's established entries live 5 days, which no quarantine covers: the
# dataplane deletes an ended session's entries itself (dataplane/conntrack.py).
DEFAULT_ADDRESS_QUARANTINE_SECONDS = 180.0


class ConfigError(Exception):
    """The config file is missing, unreadable or wrong; the message names the file,
    the line and the key. `key` ("[auth] routes") and `problem` (the message without
    the place) let a caller that wrote the value name its own source instead, as
    `pushgate-admin init` names its flags."""

    def __init__(self, message: str, *, key: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.key = key
        self.problem = problem if problem is not None else message


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
    renewal_lifetime_seconds: float = 7 * 86400  # renewal tokens (Renew); 0: none issued
    # A file (mode 0600) holding a postgresql:// URL: users, sessions and the address pool
    # then live in PostgreSQL, shared by every gateway's auth service; None: `database`
    database_url_file: str | None = None


@dataclass(frozen=True)
class OfferedService:
    """A service of the gateway host that clients may reach through the tunnel."""

    protocol: str  # "tcp", "udp" or "ping" (ICMP/ICMPv6 echo request)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int | None  # None for ping

    @classmethod
    def parse(cls, text: str) -> "OfferedService":
        """From "ping ADDRESS", "tcp ADDRESS:PORT" or "udp ADDRESS:PORT" ([v6]:PORT);
        ValueError says what is wrong with `text`."""
        protocol, _, where = text.strip().partition(" ")
        where = where.strip()
        try:
            if protocol == "ping":
                return cls(protocol, ipaddress.ip_address(where), None)
            if protocol in ("tcp", "udp"):
                host, port = host_port(where)
                if not where.rpartition(":")[0]:
                    raise ValueError("an address is required")
                return cls(protocol, ipaddress.ip_address(host), port)
        except ValueError as error:
            raise ValueError(f"{text!r}: {error}") from None
        raise ValueError(
            f'{text!r}: expected "ping ADDRESS", "tcp ADDRESS:PORT" or "udp ADDRESS:PORT"'
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
    # Opt-in: traffic and drops by user name on /metrics (one series per account, not per
    # session; README, "The dataplane").
    user_metrics: bool = False


@dataclass(frozen=True)
class AccessRule:
    """One `allow` entry of a group: "PREFIX [PROTOCOL [PORTS]]"."""

    destination: ipaddress.IPv4Network
    protocol: int  # IP protocol number; 0 = any
    ports: tuple[tuple[int, int], ...]  # inclusive ranges, sorted and merged; () = every port

    def covers(self, other: "AccessRule") -> bool:
        """Whether every packet `other` allows, this rule allows too."""
        if not other.destination.subnet_of(self.destination):
            return False
        if self.protocol and self.protocol != other.protocol:
            return False
        if not self.ports:
            return True
        if not other.ports:
            return False
        return all(
            any(first <= low and high <= last for first, last in self.ports)
            for low, high in other.ports
        )


@dataclass(frozen=True)
class Group:
    """A [groups.NAME] table: what its members may reach, and what their clients set up."""

    name: str
    allow: tuple[AccessRule, ...]
    routes: tuple[ipaddress.IPv4Network, ...] | None  # None: derived from `allow`
    dns_servers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    search_domains: tuple[str, ...]
    match_domains: tuple[str, ...]


@dataclass(frozen=True)
class OidcSection:
    """Single sign-on with an OpenID Connect provider (README, "Single sign-on")."""

    issuer: str  # the provider's issuer URL; discovery is read from it
    client_id: str  # a public client (no secret): the pushgate client uses PKCE
    # Handed to every client with BeginSso: only for providers whose native-app clients
    # have a "secret" that is public by design. Never a confidential client's secret.
    public_client_secret: str
    scopes: tuple[str, ...]
    username_claim: str  # the claim that names the pushgate user
    groups_claim: str  # "" : groups are not taken from the provider
    auto_provision: bool  # create an unknown user at their first single sign-on
    http_timeout_seconds: float


@dataclass(frozen=True)
class ClusterGateway:
    """One gateway of a cluster, as clients are told of it (auth_pb2.Gateway)."""

    id: str
    auth: tuple[str, int]  # its pushgate-auth, as clients reach it
    dataplane: tuple[str, int]  # its pushgate-dataplane, as clients reach it
    preference: int  # lower is preferred; ties keep the listed order


@dataclass(frozen=True)
class ClusterSection:
    """Several gateways on one PostgreSQL (docs/scaling.md): clients fail over
    between them, each with its own wire keys (docs/protocol.md)."""

    gateway_id: str  # this gateway; PUSHGATE_GATEWAY_ID overrides it
    # sorted by preference, ties in listed order; clients are told this gateway's
    # dataplane as its entry says ([auth] dataplane_endpoint is then not used)
    gateways: tuple[ClusterGateway, ...]

    @property
    def this(self) -> ClusterGateway:
        return next(g for g in self.gateways if g.id == self.gateway_id)


@dataclass(frozen=True)
class GatewayConfig:
    path: str
    gateway: GatewaySection
    auth: AuthSection
    dataplane: DataplaneSection
    # The [groups.*] tables (read with the [auth] section), in file order; None if the
    # file has none: every user then reaches [auth] routes (the compatibility mode).
    groups: tuple[Group, ...] | None = None
    oidc: OidcSection | None = None  # no [oidc] table: no single sign-on
    cluster: ClusterSection | None = None  # no [cluster] table: a lone gateway


SECTIONS = {
    "gateway": GatewaySection,
    "auth": AuthSection,
    "dataplane": DataplaneSection,
    "oidc": OidcSection,
    "cluster": ClusterSection,
}

# A tunnel network must leave this many addresses for clients (its hosts but the
# gateway's): fewer is almost surely a mistyped prefix (/30 for /24), and with one
# address a second user is refused while the first is logged in.
MIN_CLIENT_ADDRESSES = 2


def _keys(section: str) -> list[str]:
    """The keys a section may hold: its dataclass's fields (one list for code and check)."""
    return [field.name for field in dataclasses.fields(SECTIONS[section])]


def host_port(value: str) -> tuple[str, int]:
    """("HOST", PORT) from "HOST:PORT" or "[v6]:PORT" (no host: 0.0.0.0); ValueError if not."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class ListenError(Exception):
    """A configured address cannot be listened on (in use, not this host's, privileged):
    one line for the operator, exit status 2, no traceback."""


@contextlib.contextmanager
def listening(key: str, endpoint: tuple[str, int], what: str):
    """Binding `endpoint` inside: an OSError becomes a ListenError naming `key`."""
    try:
        yield
    except OSError as error:
        host, port = endpoint
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = (error.strerror or str(error)).lower()
        raise ListenError(f"cannot listen on {where} for {what} ({key}): {reason}") from None


def parse_host_port(value: str, key: str) -> tuple[str, int]:
    """`host_port` for a value from elsewhere (a flag): the error names `key`."""
    try:
        return host_port(value)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}", key=key, problem=str(error)) from None


# -- where things are in the text ---------------------------------------------------
# tomllib keeps no positions, and no maintained TOML library exposes them (tomlkit's
# items carry none), so the lines are found by scanning the text, which tomllib has
# already accepted: only statement starts are read, never the inside of a string, an
# array or an inline table, so a value that looks like `key = 1` is not taken for one.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def definition_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (1-based) where each table and key of a valid TOML document is first
    named, by its path: {("auth",): 12, ("auth", "listen"): 13, ...}."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    i, line = 0, 1
    while i < len(text):
        char = text[i]
        if char == "\n":
            line += 1
            i += 1
        elif char in " \t\r":
            i += 1
        elif char == "#":
            i = _line_end(text, i)
        elif char == "[":
            array = text.startswith("[[", i)
            table, i = _key_path(text, i + (2 if array else 1))
            i = text.index("]", i) + (2 if array else 1)
            _record(lines, table, line)
        else:
            path, i = _key_path(text, i)
            _record(lines, table + path, line)
            i, line = _skip_value(text, text.index("=", i) + 1, line)
    return lines


def _record(lines: dict, path: tuple[str, ...], line: int) -> None:
    for end in range(1, len(path) + 1):
        lines.setdefault(path[:end], line)


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _key_path(text: str, i: int) -> tuple[tuple[str, ...], int]:
    """A dotted key (bare, "basic" or 'literal' parts) starting at or after `i`."""
    parts = []
    while True:
        while text[i] in " \t":
            i += 1
        if text[i] in "\"'":
            end = _string_end(text, i)
            parts.append(tomllib.loads(f"k = {text[i:end]}")["k"])  # its escapes decoded
            i = end
        else:
            match = _BARE_KEY.match(text, i)
            parts.append(match.group())
            i = match.end()
        while text[i] in " \t":
            i += 1
        if text[i] != ".":
            return tuple(parts), i
        i += 1


def _string_end(text: str, i: int) -> int:
    """The index just past the string that starts at `i` (any of TOML's four kinds)."""
    quote = text[i]
    delimiter = quote * 3 if text.startswith(quote * 3, i) else quote
    j = i + len(delimiter)
    while True:
        if quote == '"' and text[j] == "\\":
            j += 2
        elif text.startswith(delimiter, j):
            j += len(delimiter)
            if len(delimiter) == 3:  # a multi-line string may end in one or two more quotes
                for _ in range(2):
                    if j < len(text) and text[j] == quote:
                        j += 1
            return j
        else:
            j += 1


def _skip_value(text: str, i: int, line: int) -> tuple[int, int]:
    """Past a value (arrays may span lines) to the end of its line; newlines counted."""
    depth = 0
    while i < len(text):
        char = text[i]
        if char == "\n":
            if depth == 0:
                return i, line
            line += 1
            i += 1
        elif char in "\"'":
            end = _string_end(text, i)
            line += text.count("\n", i, end)
            i = end
        elif char == "#":
            i = _line_end(text, i)
        else:
            depth += (char in "[{") - (char in "]}")
            i += 1
    return i, line


class _Source:
    """The file's path and where its tables and keys are, for errors that name both."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = definition_lines(text)
        self.text_lines = text.splitlines()

    def item_line(self, path: tuple[str, ...], item: str, nth: int = 0) -> int | None:
        """The line of the list element `item` of the key at `path` (the `nth` line
        after the first at or after the key's that holds it as a string), else the
        key's."""
        start = self.lines.get(path)
        if start is None:
            return None
        quoted = (json_quoted(item), f"'{item}'")
        for number in range(start, len(self.text_lines) + 1):
            if any(q in self.text_lines[number - 1] for q in quoted):
                if not nth:
                    return number
                nth -= 1
        return start

    def where(self, *path: str) -> str:
        line = self.lines.get(path) or self.lines.get(path[:1])
        return f"{self.path}:{line}" if line else self.path

    def error(self, section: str, key: str | None, problem: str) -> ConfigError:
        place = f"[{section}] {key}" if key else f"[{section}]"
        where = self.where(section, key) if key else self.where(section)
        return ConfigError(f"{where}: {place}: {problem}", key=place, problem=problem)


def json_quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _suggestion(word: str, choices: list[str], form: str) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {form.format(match[0])}?" if match else ""


def _check_names(table: dict, source: _Source) -> None:
    """Every section and key is one the code reads: a typo is refused, not ignored."""
    unknown = []  # (line, section, key or None)
    for name, value in table.items():
        if name == GROUPS:  # its tables and keys are checked as they are read (_groups)
            continue
        if name not in SECTIONS:
            unknown.append((source.lines.get((name,), 0), name, None))
        elif isinstance(value, dict):
            known = _keys(name)
            for key in value:
                if key not in known:
                    unknown.append((source.lines.get((name, key), 0), name, key))
    if not unknown:
        return
    _, name, key = min(unknown, key=lambda entry: entry[0])
    if key is None:
        owners = [section for section in SECTIONS if name in _keys(section)]
        if not isinstance(table[name], dict):  # a key above every section header
            place, problem = name, "a key outside every [section]"
            if owners:
                problem += f"; it belongs under [{owners[0]}]"
        else:
            place, problem = (
                f"[{name}]",
                "unknown section"
                + (
                    _suggestion(name, list(SECTIONS), "[{}]")
                    or _suggestion(name, [GROUPS], "[{}.NAME]")
                    or "; the sections are " + ", ".join(f"[{section}]" for section in SECTIONS)
                ),
            )
        raise ConfigError(f"{source.where(name)}: {place}: {problem}", key=place, problem=problem)
    hint = _suggestion(key, _keys(name), "{}")
    if not hint:
        owners = [section for section in SECTIONS if key in _keys(section)]
        hint = f"; it belongs in [{owners[0]}]" if owners else ""
    raise source.error(name, key, f"unknown key{hint}")


# -- reading sections -------------------------------------------------------------


class _Section:
    def __init__(self, source: _Source, table: dict, name: str, base: str) -> None:
        value = table.get(name, {})
        if not isinstance(value, dict):
            raise source.error(name, None, "must be a table")
        self.source, self.values, self.name, self.base = source, value, name, base
        self.source_table = table

    def error(self, key: str, problem: str) -> ConfigError:
        return self.source.error(self.name, key, problem)

    def get(self, key: str, kind: type, default=None):
        value = self.values.get(key, default)
        if value is None:
            raise ConfigError(
                f"{self.source.where(self.name)}: [{self.name}] {key} is required",
                key=f"[{self.name}] {key}",
                problem="is required",
            )
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(key, f"expected {kind.__name__}, got {value!r}")
        return value

    def optional(self, key: str, kind: type):
        return None if key not in self.values else self.get(key, kind)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"{value} is out of range {low}..{high}")
        return value

    def path(self, key: str, default: str | None = None) -> str:
        return os.path.join(self.base, self.get(key, str, default))

    def endpoint(self, key: str, default: str | None = None) -> tuple[str, int]:
        try:
            return host_port(self.get(key, str, default))
        except ValueError as error:
            raise self.error(key, str(error)) from None

    def strings(self, key: str, default: list[str]) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if not all(isinstance(item, str) for item in value):
            raise self.error(key, "expected a list of strings")
        return tuple(value)

    def each(self, key: str, default: list[str], parse) -> tuple:
        """`parse` applied to each string of a list; its ValueError names the entry."""
        try:
            return tuple(parse(item) for item in self.strings(key, default))
        except ValueError as error:
            raise self.error(key, str(error)) from None


def _checked(parse):
    """`parse` as a check: the text itself is kept."""

    def check(text: str) -> str:
        parse(text)
        return text

    return check


def _tunnel_network(section: _Section) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(section.get("tunnel_network", str))
    except ValueError as error:
        raise section.error("tunnel_network", str(error)) from None
    if network.version != 4:
        raise section.error(
            "tunnel_network",
            f"{network} is IPv6; tunnel networks are IPv4 only for now "
            "(the client and the dataplane tunnel IPv4 only)",
        )
    hosts = network.num_addresses - (2 if network.prefixlen <= 30 else 0)
    if hosts - 1 < MIN_CLIENT_ADDRESSES:
        raise section.error(
            "tunnel_network",
            f"{network} leaves {max(hosts - 1, 0)} address(es) for clients (its hosts but "
            f"the gateway's); at least {MIN_CLIENT_ADDRESSES} are needed: use a /29 or larger",
        )
    return network


def _gateway_address(section: _Section, network: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    try:
        gateway = ipaddress.ip_address(section.get("gateway_address", str))
    except ValueError as error:
        raise section.error("gateway_address", str(error)) from None
    if gateway not in network:
        raise section.error("gateway_address", f"{gateway} is not in {network}")
    special = {network.network_address: "network", network.broadcast_address: "broadcast"}
    if gateway in special and network.prefixlen <= 30:  # /31: both are hosts (RFC 3021)
        raise section.error(
            "gateway_address",
            f"{gateway} is the {special[gateway]} address of {network}; use a host address "
            f"such as {next(network.hosts())}",
        )
    return gateway


def _gateway(section: _Section) -> GatewaySection:
    network = _tunnel_network(section)
    gateway = _gateway_address(section, network)
    cipher_name = section.get("cipher", str, CipherSuite.AES_256_GCM.value)
    try:
        cipher = CipherSuite(cipher_name)
    except ValueError:
        choices = ", ".join(c.value for c in CipherSuite)
        raise section.error("cipher", f"{cipher_name!r} is not one of {choices}") from None
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
    routes = section.each("routes", ["0.0.0.0/0"], _checked(ipaddress.ip_network))
    dns = section.each("dns", [], _checked(ipaddress.ip_address))
    section.endpoint("listen", "0.0.0.0:7443")  # checked; gRPC takes the text itself
    key_expiry = float(
        section.number("key_expiry_seconds", REJECT_AFTER_SECONDS, 2, REJECT_AFTER_SECONDS)
    )
    key_lifetime = float(section.number("key_lifetime_seconds", REKEY_AFTER_SECONDS, 1, 86400))
    if key_lifetime >= key_expiry:
        raise section.error(
            "key_lifetime_seconds",
            f"{key_lifetime:g} must be below key_expiry_seconds ({key_expiry:g}): clients "
            "must rekey before keys expire",
        )
    return AuthSection(
        listen=section.get("listen", str, "0.0.0.0:7443"),
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
        renewal_lifetime_seconds=float(
            section.number("renewal_lifetime_seconds", 7 * 86400, 0, 365 * 86400)
        ),
        database_url_file=(
            section.path("database_url_file") if "database_url_file" in section.values else None
        ),
    )


def database_location(auth: AuthSection) -> str:
    """Where the auth service's store is: the PostgreSQL URL `database_url_file` holds
    (a secret: the file must not be readable by others nor writable by anyone but its
    owner; its group may read it, as Kubernetes' fsGroup needs), else the SQLite file
    `database`. ConfigError says what is wrong, never the URL's password."""
    if auth.database_url_file is None:
        return auth.database
    where = f"[auth] database_url_file {auth.database_url_file}"
    try:
        with open(auth.database_url_file, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            url = file.read().strip()
    except OSError as error:
        raise ConfigError(
            f"{where}: {error.strerror}", key="[auth] database_url_file", problem=error.strerror
        ) from None
    if mode & 0o027:
        problem = (
            f"is open to others or writable by its group (mode {mode & 0o777:o}); chmod 600 it"
        )
        raise ConfigError(f"{where}: {problem}", key="[auth] database_url_file", problem=problem)
    if not url.startswith(("postgresql://", "postgres://")):
        problem = "must hold one postgresql:// URL"
        raise ConfigError(f"{where}: {problem}", key="[auth] database_url_file", problem=problem)
    return url


def _oidc(section: _Section) -> OidcSection | None:
    if "oidc" not in section.source_table:
        return None
    issuer = section.get("issuer", str)
    parsed = urllib.parse.urlsplit(issuer)
    local = parsed.hostname in ("127.0.0.1", "::1", "localhost")
    if parsed.scheme != "https" and not (parsed.scheme == "http" and local):
        raise section.error("issuer", f"{issuer!r} must be an https:// URL")
    scopes = section.strings("scopes", ["openid", "profile", "email"])
    if "openid" not in scopes:
        raise section.error("scopes", 'must include "openid"')
    return OidcSection(
        issuer=issuer,
        client_id=section.get("client_id", str),
        public_client_secret=section.get("public_client_secret", str, ""),
        scopes=scopes,
        username_claim=section.get("username_claim", str, "preferred_username"),
        groups_claim=section.get("groups_claim", str, "groups"),
        auto_provision=section.get("auto_provision", bool, False),
        http_timeout_seconds=float(section.number("http_timeout_seconds", 5, 0.1, 60)),
    )


_GATEWAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
GATEWAY_ID_ENVIRONMENT = "PUSHGATE_GATEWAY_ID"  # one config for every host (Kubernetes)
_CLUSTER_GATEWAY_KEYS = ("id", "auth", "dataplane", "preference")


def _cluster(section: _Section) -> ClusterSection | None:
    if "cluster" not in section.source_table:
        return None
    entries = section.get("gateways", list)
    if not entries:
        raise section.error("gateways", "must list at least one gateway")
    gateways = []
    for number, entry in enumerate(entries, start=1):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            raise section.error(
                "gateways", f"{where}: expected a table {{id, auth, dataplane, preference}}"
            )
        if unknown := sorted(set(entry) - set(_CLUSTER_GATEWAY_KEYS)):
            raise section.error("gateways", f"{where}: unknown key {unknown[0]!r}")
        for key in ("id", "auth", "dataplane"):
            if not isinstance(entry.get(key), str):
                raise section.error("gateways", f"{where}: {key} is required (a string)")
        gateway_id = entry["id"]
        if not _GATEWAY_ID.fullmatch(gateway_id):
            raise section.error(
                "gateways", f"{where}: id {gateway_id!r} must be 1-63 letters, digits, . _ -"
            )
        if any(g.id == gateway_id for g in gateways):
            raise section.error("gateways", f"{where}: id {gateway_id!r} is listed twice")
        preference = entry.get("preference", 100)
        if isinstance(preference, bool) or not isinstance(preference, int):
            raise section.error("gateways", f"{where}: preference must be an integer")
        if not 0 <= preference <= 65535:
            raise section.error("gateways", f"{where}: preference {preference} is out of 0..65535")
        try:
            auth_endpoint, dataplane = host_port(entry["auth"]), host_port(entry["dataplane"])
        except ValueError as error:
            raise section.error("gateways", f"{where}: {error}") from None
        gateways.append(ClusterGateway(gateway_id, auth_endpoint, dataplane, preference))
    gateways.sort(key=lambda g: g.preference)  # stable: ties keep the listed order
    gateway_id = os.environ.get(GATEWAY_ID_ENVIRONMENT) or section.get("gateway_id", str)
    ids = [g.id for g in gateways]
    if gateway_id not in ids:
        raise section.error(
            "gateway_id", f"{gateway_id!r} is not among the gateways ({', '.join(ids)})"
        )
    return ClusterSection(gateway_id, tuple(gateways))


def _dataplane(section: _Section, gateway: GatewaySection) -> DataplaneSection:
    tun_name = section.get("tun_name", str, "pg0")
    if not 0 < len(tun_name) < 16:
        raise section.error("tun_name", f"{tun_name!r} must be 1-15 characters")
    return DataplaneSection(
        listen=section.endpoint("listen", "0.0.0.0:51820"),
        tun_name=tun_name,
        stats_socket=section.path("stats_socket", "run/dataplane.sock"),
        metrics_listen=section.endpoint("metrics_listen", "127.0.0.1:9102"),
        user=section.optional("user", str),
        deny_networks=section.each("deny_networks", [], ipaddress.ip_network),
        offered_services=section.each(
            "offered_services", [f"ping {gateway.gateway_address}"], OfferedService.parse
        ),
        user_metrics=section.get("user_metrics", bool, False),
    )


# -- [groups.NAME]: access policy (README, "Groups and access rules") ---------------

GROUPS = "groups"
GROUP_KEYS = ("allow", "routes", "dns_servers", "search_domains", "match_domains")
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PROTOCOLS = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}
PORT_PROTOCOLS = (6, 17)  # ports are only checked for these
_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


def group_name_problem(name: str) -> str | None:
    if _GROUP_NAME.fullmatch(name):
        return None
    return "a group name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def protocol_name(number: int) -> str:
    return _PROTOCOL_NAMES.get(number, str(number))


def rule_text(rule: AccessRule) -> str:
    """The rule as it is written in the config ("198.18.3.0/24 tcp 22,8000-8999")."""
    parts = [str(rule.destination)]
    if rule.protocol or rule.ports:
        parts.append(protocol_name(rule.protocol))
    if rule.ports:
        parts.append(",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in rule.ports))
    return " ".join(parts)


def _prefix(text: str) -> ipaddress.IPv4Network:
    """An IPv4 prefix (a bare address is a /32); ValueError says what is wrong."""
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a prefix (e.g. 198.18.2.0/24)") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None
    if network.version != 4:
        raise ValueError(f"{text!r} is IPv6; the tunnel carries IPv4 only")
    return network


def _ports(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a port or a range FIRST-LAST")
        first, last = int(low), int(high) if dash else int(low)
        if not 0 < first <= 65535 or not 0 < last <= 65535:
            raise ValueError(f"port {part.strip()} is out of range 1..65535")
        if first > last:
            raise ValueError(
                f"port range {part.strip()} is backwards; did you mean {last}-{first}?"
            )
        ranges.append((first, last))
    ordered = sorted(ranges)
    for (_, last), (first, _) in itertools.pairwise(ordered):
        if first <= last:
            raise ValueError(f"port ranges overlap in {text!r}")
    return merge_ports(ranges)


def parse_rule(text: str) -> AccessRule:
    """A rule from "PREFIX [PROTOCOL [PORTS]]"; ValueError says what is wrong."""
    words = text.split()
    if not 1 <= len(words) <= 3:
        raise ValueError('expected "PREFIX [PROTOCOL [PORTS]]", e.g. "198.18.3.0/24 tcp 22,443"')
    destination = _prefix(words[0])
    protocol = 0
    if len(words) > 1:
        name = words[1].lower()
        if name in PROTOCOLS:
            protocol = PROTOCOLS[name]
        elif name.isdigit() and 0 < int(name) <= 255:
            protocol = int(name)
        else:
            raise ValueError(
                f"unknown protocol {words[1]!r}: use tcp, udp, icmp, any or a number 1..255"
            )
    ports: tuple[tuple[int, int], ...] = ()
    if len(words) > 2:
        if protocol not in PORT_PROTOCOLS:
            raise ValueError(f"ports apply to tcp and udp only, not {words[1]}")
        ports = _ports(words[2])
    return AccessRule(destination, protocol, ports)


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _domain(text: str) -> str:
    name = text.removesuffix(".").lower()
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in name.split(".")):
        raise ValueError(f"{text!r} is not a domain name")
    return name


class _GroupSection(_Section):
    """One [groups.NAME] table; errors name it and, for a list element, its own line."""

    def __init__(self, source: _Source, name: str, value: dict) -> None:
        self.source, self.values, self.name, self.base = source, value, f"{GROUPS}.{name}", ""
        self.group = name

    def error(self, key: str, problem: str, item: str | None = None, nth: int = 0) -> ConfigError:
        path = (GROUPS, self.group, key)
        line = self.source.item_line(path, item, nth) if item is not None else None
        line = line or self.source.lines.get(path) or self.source.lines.get(path[:2])
        place = f"[{self.name}] {key}"
        where = f"{self.source.path}:{line}" if line else self.source.path
        return ConfigError(f"{where}: {place}: {problem}", key=place, problem=problem)

    def items(self, key: str, parse) -> tuple | None:
        """`parse` applied to each string of the list at `key` (None if absent)."""
        if key not in self.values:
            return None
        parsed = []
        for item in self.strings(key, []):
            try:
                parsed.append(parse(item))
            except ValueError as error:
                raise self.error(key, f"{item!r}: {error}", item) from None
        return tuple(parsed)


def _check_rules(section: _GroupSection, texts: tuple[str, ...], rules: tuple, context) -> None:
    """Refuse rules that cannot do what they say: ones another rule of the group already
    allows (a duplicate or a narrower one), and ones the dataplane refuses anyway."""
    gateway, offered, denied = context
    by_prefix: dict[ipaddress.IPv4Network, list[int]] = {}
    for index, rule in enumerate(rules):
        by_prefix.setdefault(rule.destination, []).append(index)
    for index, rule in enumerate(rules):
        text = texts[index]
        # a rule covering this one has a prefix containing this rule's
        for length in range(rule.destination.prefixlen, -1, -1):
            for other in by_prefix.get(rule.destination.supernet(new_prefix=length), ()):
                if other == index or not rules[other].covers(rule):
                    continue
                if rules[other] == rule and other > index:
                    continue  # the later duplicate is the one refused
                what = "repeats" if rules[other] == rule else "is already allowed by"
                line = section.source.item_line((GROUPS, section.group, "allow"), texts[other])
                nth = texts[:index].count(text)  # its line: the nth of equal texts
                raise section.error(
                    "allow",
                    f"{text!r} {what} {texts[other]!r} (line {line}); remove one",
                    text,
                    nth,
                )
        if rule.destination.prefixlen == 32 and rule.destination.network_address == gateway:
            allowed = offered.get(gateway, ())
            if not rule_allows_only(rule, allowed):
                services = ", ".join(allowed) or "nothing"
                raise section.error(
                    "allow",
                    f"{text!r}: {gateway} is the gateway's own address; clients reach it only "
                    f"for [dataplane] offered_services ({services}): allow those alone",
                    text,
                )
        for network in denied:
            if rule.destination.version == network.version and rule.destination.subnet_of(network):
                raise section.error(
                    "allow",
                    f"{text!r} is inside [dataplane] deny_networks {network}: never reachable",
                    text,
                )


def rule_allows_only(rule: AccessRule, services: tuple[str, ...]) -> bool:
    """Whether every (protocol, port) `rule` allows is one of `services` ("ping",
    "tcp PORT", "udp PORT") on its address."""
    if rule.protocol == 1:
        return "ping" in services
    if rule.protocol in PORT_PROTOCOLS and rule.ports:
        name = protocol_name(rule.protocol)
        return all(
            f"{name} {port}" in services
            for first, last in rule.ports
            for port in range(first, last + 1)
        )
    return False


def _groups(
    source: _Source, table: dict, gateway: GatewaySection, dataplane: DataplaneSection
) -> tuple[Group, ...] | None:
    if GROUPS not in table:
        return None
    value = table[GROUPS]
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source.where(GROUPS)}: [{GROUPS}]: must be tables [groups.NAME]",
            key=f"[{GROUPS}]",
            problem="must be tables [groups.NAME]",
        )
    offered: dict = {}
    for service in dataplane.offered_services:
        offered.setdefault(service.address, ())
        text = service.protocol if service.port is None else f"{service.protocol} {service.port}"
        offered[service.address] += (text,)
    context = (gateway.gateway_address, offered, dataplane.deny_networks)
    groups = []
    for name, body in value.items():
        where = source.where(GROUPS, name)
        if not isinstance(body, dict):
            problem = "must be a table: [groups.NAME] with allow = [...]"
            raise ConfigError(
                f"{where}: [groups] {name}: {problem}", key=f"[groups] {name}", problem=problem
            )
        if problem := group_name_problem(name):
            raise ConfigError(
                f"{where}: [groups.{name}]: {problem}", key=f"[groups.{name}]", problem=problem
            )
        section = _GroupSection(source, name, body)
        for key in body:
            if key not in GROUP_KEYS:
                hint = _suggestion(key, list(GROUP_KEYS), "{}")
                raise section.error(
                    key, f"unknown key{hint or '; a group has ' + ', '.join(GROUP_KEYS)}"
                )
        texts = section.strings("allow", []) if "allow" in body else ()
        rules = section.items("allow", parse_rule) or ()
        _check_rules(section, texts, rules, context)
        groups.append(
            Group(
                name=name,
                allow=rules,
                routes=section.items("routes", _prefix),
                dns_servers=section.items("dns_servers", ipaddress.ip_address) or (),
                search_domains=section.items("search_domains", _domain) or (),
                match_domains=section.items("match_domains", _domain) or (),
            )
        )
    return tuple(groups)


def parse(text: str, path: str, *, auth: bool = False) -> GatewayConfig:
    """Check the config `text` as if read from `path` (relative paths in it are relative
    to `path`'s directory); the [auth] section's values are checked only if `auth`."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    source = _Source(path, text)
    _check_names(table, source)
    base = os.path.dirname(os.path.abspath(path))
    gateway = _gateway(_Section(source, table, "gateway", base))
    dataplane = _dataplane(_Section(source, table, "dataplane", base), gateway)
    return GatewayConfig(
        path=os.path.abspath(path),
        gateway=gateway,
        auth=_auth(_Section(source, table, "auth", base)) if auth else None,
        dataplane=dataplane,
        groups=_groups(source, table, gateway, dataplane) if auth else None,
        oidc=_oidc(_Section(source, table, "oidc", base)) if auth else None,
        cluster=_cluster(_Section(source, table, "cluster", base)) if auth else None,
    )


def load(path: str, *, auth: bool = False) -> GatewayConfig:
    """Read and check the file; the [auth] section's values are checked only if `auth`."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 ({error.reason})") from None
    return parse(text, path, auth=auth)
