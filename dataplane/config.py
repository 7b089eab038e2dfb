"""The dataplane's part of the gateway config file (TOML): [gateway] and [dataplane]."""

import ipaddress
import os
import tomllib
from dataclasses import dataclass

from push_protocol.aead import CipherSuite
from push_protocol.constants import DEFAULT_KEEPALIVE_SECONDS, DEFAULT_TUNNEL_MTU


class ConfigError(Exception):
    """The config file is missing, unreadable or wrong; the message names the key."""


@dataclass(frozen=True)
class DataplaneConfig:
    tunnel_network: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    mtu: int
    keepalive_seconds: float
    cipher: CipherSuite
    control_socket: str
    listen: tuple[str, int]
    tun_name: str
    stats_socket: str
    metrics_listen: tuple[str, int]


def parse_host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _get(table: dict, section: str, key: str, kind: type, default=None):
    value = table.get(section, {}).get(key, default)
    if value is None:
        raise ConfigError(f"[{section}] {key} is required")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"[{section}] {key}: expected {kind.__name__}, got {value!r}")
    return value


def load(path: str) -> DataplaneConfig:
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(path))

    def relative(value: str) -> str:
        return os.path.join(base, value)

    try:
        network = ipaddress.ip_network(_get(table, "gateway", "tunnel_network", str))
    except ValueError as error:
        raise ConfigError(f"[gateway] tunnel_network: {error}") from None
    try:
        gateway = ipaddress.ip_address(_get(table, "gateway", "gateway_address", str))
    except ValueError as error:
        raise ConfigError(f"[gateway] gateway_address: {error}") from None
    if gateway not in network:
        raise ConfigError(f"[gateway] gateway_address {gateway} is not in {network}")
    mtu = _get(table, "gateway", "mtu", int, DEFAULT_TUNNEL_MTU)
    if not 576 <= mtu <= 65535 - 80:
        raise ConfigError(f"[gateway] mtu: {mtu} is out of range 576..65455")
    keepalive = _get(table, "gateway", "keepalive_seconds", int, int(DEFAULT_KEEPALIVE_SECONDS))
    cipher_name = _get(table, "gateway", "cipher", str, CipherSuite.AES_256_GCM.value)
    try:
        cipher = CipherSuite(cipher_name)
    except ValueError:
        choices = ", ".join(c.value for c in CipherSuite)
        raise ConfigError(f"[gateway] cipher: {cipher_name!r} is not one of {choices}") from None
    tun_name = _get(table, "dataplane", "tun_name", str, "pg0")
    if not 0 < len(tun_name) < 16:
        raise ConfigError(f"[dataplane] tun_name: {tun_name!r} must be 1-15 characters")
    return DataplaneConfig(
        tunnel_network=network,
        gateway_address=gateway,
        mtu=mtu,
        keepalive_seconds=float(keepalive),
        cipher=cipher,
        control_socket=relative(_get(table, "gateway", "control_socket", str)),
        listen=parse_host_port(
            _get(table, "dataplane", "listen", str, "0.0.0.0:51820"), "[dataplane] listen"
        ),
        tun_name=tun_name,
        stats_socket=relative(_get(table, "dataplane", "stats_socket", str, "run/dataplane.sock")),
        metrics_listen=parse_host_port(
            _get(table, "dataplane", "metrics_listen", str, "127.0.0.1:9102"),
            "[dataplane] metrics_listen",
        ),
    )
