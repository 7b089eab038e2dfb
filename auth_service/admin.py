"""`pushgate-admin`: set up a gateway (init), renew its server certificate, manage users
and sessions.

User changes go through the running auth service's admin API ([auth] admin_socket)
when it runs, so they reach the dataplane at once and are audited with the
caller's uid; when it does not run, they are written to the database and take
effect when it starts (it ends the sessions of users disabled, removed or given
a new password meanwhile). Sessions are listed and kicked through the API only.
"""

import argparse
import datetime
import getpass
import ipaddress
import json
import os
import re
import socket
import sys
import time

import grpc
import segno
from cryptography import x509

from client import profile
from push_protocol.version import add_version_argument
from pushgate_api import admin_pb2, admin_pb2_grpc, control_pb2, control_pb2_grpc
from pushgate_io import gateway_config

from . import totp
from .access import AccessModel, group_listing, joining_problem
from .audit import AuditLog
from .passwords import hash_password
from .pki import load_ca, make_ca, make_server_cert, server_names, verification_problem
from .store import NoSuchUser, Store, UserExists
from .user_names import user_name_problem

PASSWORD_ENV = "PUSHGATE_PASSWORD"

CONFIG_TEMPLATE = """\
# pushgate gateway config, written by `pushgate-admin init`. Paths are relative
# to this file. Both pushgate-auth and pushgate-dataplane read it; it holds no
# secret (those are tls/ and the database, owner-only files of the auth service).

[gateway]
tunnel_network = {tunnel_network}   # clients get addresses from here
gateway_address = {gateway_address}     # the dataplane TUN's address
mtu = 1420
keepalive_seconds = 10
cipher = "aes-256-gcm"                 # or "chacha20-poly1305"
control_socket = {control_socket}    # session feed, Unix socket, mode 0600
{control_group}
[auth]
listen = {auth_listen}               # client API, gRPC over TLS
tls_cert = "tls/server.crt"
tls_key = "tls/server.key"
ca_cert = "tls/ca.crt"                 # give this file to clients
database = {database}
{database_url_file}dataplane_endpoint = {dataplane_endpoint}   # UDP endpoint handed to clients
routes = [{routes}]                    # "0.0.0.0/0" = full tunnel
dns = [{dns}]
metrics_listen = {auth_metrics_listen}
session_lifetime_seconds = 86400       # absolute; at most a week (0 = a week)
key_lifetime_seconds = 600             # clients rekey after this many seconds
key_expiry_seconds = 900               # keys not replaced by then end the session (max 900)
# Failed logins are throttled per (user, source), per source and per IPv4 /24
# (a source is an IPv4 address or an IPv6 /64). A correct password from a source
# that has not failed is never refused. Free failures per key, then delays:
max_failures_before_delay = 5          # per user from one source
max_source_failures_before_delay = 20  # per source, all user names together
max_network_failures_before_delay = 100   # per IPv4 /24; refuses only its sources that failed
failure_delay_seconds = 1.0            # doubles per further failure ...
max_failure_delay_seconds = 300.0      # ... up to this; a key quiet this long is forgotten
max_throttle_records = 100000          # memory bound (~0.5 KB each); oldest pushed out
spray_alert_sources = 10               # an account failing from this many sources in 15 min
                                       # counts in pushgate_auth_accounts_targeted
address_quarantine_seconds = 180       # a freed tunnel address goes to another user only
                                       # after this (outlasts UDP/ICMP conntrack timeouts);
                                       # a user gets their own previous address back
hash_workers = 2                       # threads hashing passwords (Argon2id) ...
max_pending_hashes = 64                # ... and logins waiting for one; more are refused
max_sessions_per_user = 3              # a further login ends the user's oldest session
max_connections = 10000                # client API connections (at most the fd limit allows)
reflection = false                     # gRPC server reflection on the client API port
admin_socket = {admin_socket}        # pushgate-admin's API, Unix socket, mode 0600
audit_log = "audit.log"                # JSON lines: logins, session ends, admin changes
                                       # ("-": stdout)
renewal_lifetime_seconds = 604800      # a login renews its session without the password or
                                       # the identity provider this long (0: never)

[dataplane]
listen = {dataplane_listen}
tun_name = "pg0"
stats_socket = {stats_socket}
metrics_listen = {dataplane_metrics_listen}
{dataplane_user}# Clients never reach this host's own addresses, link-local (169.254.0.0/16,
# fe80::/10), loopback, multicast or broadcast; nor these networks (management,
# containers' networks) ...
deny_networks = [{deny_networks}]
# ... except what this host offers them on purpose: "ping ADDRESS",
# "udp ADDRESS:PORT", "tcp ADDRESS:PORT" (e.g. a DNS server on this host)
offered_services = [{offered_services}]
# traffic and drops by user name on /metrics: one series per account (opt-in)
user_metrics = false

# Single sign-on with an OpenID Connect provider (README, "Single sign-on"):
# uncomment and fill in to offer `pushgate-client connect --sso`.
# [oidc]
# issuer = "https://idp.example.com/realms/main"   # discovery is read from here
# client_id = "pushgate"               # a public client: PKCE, loopback redirect
# public_client_secret = ""            # only where native-app "secrets" are public
# scopes = ["openid", "profile", "email"]
# username_claim = "preferred_username"   # the claim naming the pushgate user
# groups_claim = "groups"              # "" : ignore the provider's groups
# auto_provision = false               # create unknown users at their first sign-on
# http_timeout_seconds = 5

# Several gateways on one PostgreSQL (docs/scaling.md): clients move between them
# without a new login. Every gateway lists them all; each names itself.
# [cluster]
# gateway_id = "gw-a"                  # this one; PUSHGATE_GATEWAY_ID overrides it
# gateways = [                          # lower preference first (clients are told these)
#  {{ id = "gw-a", auth = "gw-a.example:8443", dataplane = "gw-a.example:51820", preference = 10}},
#  {{ id = "gw-b", auth = "gw-b.example:8443", dataplane = "gw-b.example:51820", preference = 20}},
# ]

"""


def _toml_string(value: str) -> str:
    """`value` as a TOML basic string: JSON's escapes are TOML's, so no value given to
    `init` can end its string and add a line of its own."""
    return json.dumps(value, ensure_ascii=False)


def _quoted(items: list[str]) -> str:
    return ", ".join(_toml_string(item) for item in items)


def _offered(gateway: str, dns: list[str]) -> list[str]:
    """Ping to the gateway's tunnel address, and DNS if a pushed server is that address."""
    offered = [f"ping {gateway}"]
    if gateway in dns or _same_address(gateway, dns):
        where = f"[{gateway}]:53" if ":" in gateway else f"{gateway}:53"
        offered += [f"udp {where}", f"tcp {where}"]
    return offered


def _same_address(address: str, others: list[str]) -> bool:
    try:
        return ipaddress.ip_address(address) in {ipaddress.ip_address(item) for item in others}
    except ValueError:  # not addresses: the config check names the flag
        return False


# The flag each config value `init` writes comes from, so its errors name the flag.
INIT_FLAGS = {
    "[gateway] tunnel_network": "--tunnel-network",
    "[gateway] gateway_address": "--gateway-address",
    "[gateway] control_group": "--control-group",
    "[auth] listen": "--auth-listen",
    "[auth] dataplane_endpoint": "--dataplane-endpoint",
    "[auth] routes": "--route",
    "[auth] dns": "--dns",
    "[auth] database": "--database",
    "[auth] database_url_file": "--database-url-file",
    "[auth] metrics_listen": "--auth-metrics-listen",
    "[gateway] control_socket": "--run-dir",
    "[dataplane] stats_socket": "--run-dir",
    "[auth] admin_socket": "--run-dir",
    "[dataplane] metrics_listen": "--dataplane-metrics-listen",
    "[dataplane] listen": "--dataplane-listen",
    "[dataplane] user": "--dataplane-user",
    "[dataplane] deny_networks": "--deny-network",
    "[dataplane] offered_services": "--offer",
}
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class InitRefused(Exception):
    """A value given to `init` is wrong; nothing has been written."""


def _server_name_problem(name: str) -> str | None:
    """Why `name` cannot be in the server certificate: an IP address or a DNS name."""
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return f"{name!r} is neither an IP address nor a DNS name"
    return None


def _init_config(args: argparse.Namespace, config_path: str) -> str:
    """The config `init` writes, checked as pushgate-auth will read it: a wrong value
    is refused, naming its flag, before anything is written."""
    for name in args.server_name or []:
        if problem := _server_name_problem(name):
            raise InitRefused(f"--server-name: {problem}")
    if args.ca_key_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.ca_key_out))):
        raise InitRefused(f"--ca-key-out: no directory for {args.ca_key_out}")
    gateway = args.gateway_address
    if gateway is None:
        try:
            gateway = str(next(ipaddress.ip_network(args.tunnel_network).hosts()))
        except (ValueError, StopIteration):
            gateway = ""  # the config check refuses the network first
    text = CONFIG_TEMPLATE.format(
        tunnel_network=_toml_string(args.tunnel_network),
        gateway_address=_toml_string(gateway),
        auth_listen=_toml_string(args.auth_listen),
        dataplane_endpoint=_toml_string(args.dataplane_endpoint),
        dataplane_listen=_toml_string(args.dataplane_listen),
        database=_toml_string(args.database),
        database_url_file=(
            f"database_url_file = {_toml_string(args.database_url_file)}  # PostgreSQL instead\n"
            if args.database_url_file
            else ""
        ),
        control_socket=_toml_string(f"{args.run_dir}/control.sock"),
        stats_socket=_toml_string(f"{args.run_dir}/dataplane.sock"),
        admin_socket=_toml_string(f"{args.run_dir}/admin.sock"),
        auth_metrics_listen=_toml_string(args.auth_metrics_listen),
        dataplane_metrics_listen=_toml_string(args.dataplane_metrics_listen),
        routes=_quoted(args.route or ["0.0.0.0/0"]),
        dns=_quoted(args.dns or []),
        control_group=(
            f"control_group = {_toml_string(args.control_group)}  # members may use the sockets\n"
            if args.control_group
            else ""
        ),
        dataplane_user=(
            f"user = {_toml_string(args.dataplane_user)}  # started as root, it becomes this user\n"
            if args.dataplane_user
            else ""
        ),
        deny_networks=_quoted(args.deny_network or []),
        offered_services=_quoted(_offered(gateway, args.dns or []) + (args.offer or [])),
    )
    try:
        gateway_config.parse(text, config_path, auth=True)
    except gateway_config.ConfigError as error:
        if error.key in INIT_FLAGS:
            raise InitRefused(f"{INIT_FLAGS[error.key]}: {error.problem}") from None
        raise InitRefused(f"the config it would write is wrong: {error}") from None
    return text


def cmd_init(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.dir)
    config_path = os.path.join(directory, "pushgate.toml")
    if os.path.exists(config_path) and not args.force:
        print(f"pushgate-admin: {config_path} exists; use --force to replace it", file=sys.stderr)
        return 1
    try:
        config_text = _init_config(args, config_path)
    except InitRefused as error:
        print(f"pushgate-admin init: {error} (nothing written)", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(directory, "tls"), mode=0o700, exist_ok=True)
    if not os.path.isabs(args.run_dir):  # (an absolute one is systemd's RuntimeDirectory=)
        os.makedirs(os.path.join(directory, args.run_dir), mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    names = args.server_name or ["localhost", "127.0.0.1"]
    ca_pem, ca_key_pem, ca_cert, ca_key = make_ca("pushgate gateway CA", now, names)
    cert_pem, key_pem = make_server_cert(names, ca_cert, ca_key, now)
    ca_key_path = os.path.abspath(args.ca_key_out or os.path.join(directory, "tls/ca.key"))
    files = {
        "tls/ca.crt": (ca_pem, 0o644),
        ca_key_path: (ca_key_pem, 0o600),
        "tls/server.crt": (cert_pem, 0o644),
        "tls/server.key": (key_pem, 0o600),
    }
    for name, (data, mode) in files.items():
        _write(os.path.join(directory, name), data, mode)
    # Readable by the dataplane's user whatever the umask: it holds no secret.
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(config_text)
    print(
        f"gateway initialised in {directory}:\n"
        f"  config      {config_path}\n"
        f"  CA          {os.path.join(directory, 'tls/ca.crt')} (give this to clients)\n"
        f"  server cert for {', '.join(names)}\n"
        f"  CA key      {ca_key_path} (needed only to renew the server certificate: "
        "keep it offline)\n"
        f"next: pushgate-admin user add NAME --config {config_path}"
    )
    return 0


def _write(path: str, data: bytes, mode: int) -> None:
    """Replace `path` at once (a reader sees the old file or the new one), with `mode`."""
    partial = f"{path}.new"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(partial, mode)
    os.replace(partial, path)


def cmd_cert_renew(args: argparse.Namespace) -> int:
    """A new server key and certificate from the existing CA: clients keep their ca.crt."""
    cfg = gateway_config.load(args.config, auth=True)
    ca_key_path = args.ca_key or os.path.join(os.path.dirname(cfg.auth.ca_cert), "ca.key")
    with open(cfg.auth.ca_cert, "rb") as cert_file, open(ca_key_path, "rb") as key_file:
        ca_cert, ca_key = load_ca(cert_file.read(), key_file.read())
    with open(cfg.auth.tls_cert, "rb") as handle:
        current = x509.load_pem_x509_certificate(handle.read())
    names = args.server_name or server_names(current)
    now = datetime.datetime.now(datetime.UTC)
    cert_pem, key_pem = make_server_cert(names, ca_cert, ca_key, now)
    new_cert = x509.load_pem_x509_certificate(cert_pem)
    for name in names:  # outside the CA's constraints, clients would refuse it
        problem = verification_problem(new_cert, ca_cert, name, now)
        if problem:
            raise ValueError(f"the CA cannot vouch for {name}: {problem}")
    _write(cfg.auth.tls_key, key_pem, 0o600)
    _write(cfg.auth.tls_cert, cert_pem, 0o644)
    print(
        f"server certificate renewed for {', '.join(names)}, valid until "
        f"{new_cert.not_valid_after_utc:%Y-%m-%d}: {cfg.auth.tls_cert}\n"
        "clients keep their ca.crt; restart pushgate-auth to serve it "
        "(sessions survive the restart)"
    )
    return 0


def _new_password(args: argparse.Namespace) -> str:
    if args.password_file:
        with open(args.password_file) as handle:
            password = handle.readline().rstrip("\n")
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    elif sys.stdin.isatty():
        password = getpass.getpass(f"new password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the passwords differ")
    else:
        raise ValueError(
            f"no password: use --password-file, set {PASSWORD_ENV}, or run in a terminal"
        )
    if not password:
        raise ValueError("the password is empty")
    return password


class ServiceDown(Exception):
    """The auth service does not run (nothing listens on its admin socket)."""


def admin_channel(path: str) -> grpc.Channel:
    """A channel to the running auth service's admin API; ServiceDown if it does not
    run. Permission problems are errors, not a reason to edit the database instead."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ServiceDown(path) from None
    except PermissionError:
        raise PermissionError(f"permission denied on the admin socket {path}") from None
    finally:
        probe.close()
    return grpc.insecure_channel(f"unix:{path}")


def _api_error(error: grpc.RpcError, path: str) -> Exception:
    if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS):
        return LookupError(error.details())
    if error.code() is grpc.StatusCode.UNAVAILABLE:  # the peer check closed the connection
        return PermissionError(f"the auth service refused us on {path}: {error.details()}")
    return ValueError(error.details() or error.code().name)


def via_running_service(cfg: gateway_config.GatewayConfig, call) -> str | None:
    """`call(channel)` against the running auth service's admin API (which makes the
    change and tells live sessions), what it says; None if the service is not running:
    the caller then changes the database itself."""
    try:
        channel = admin_channel(cfg.auth.admin_socket)
    except ServiceDown:
        return None
    with channel:
        try:
            return call(channel)
        except grpc.RpcError as error:
            raise _api_error(error, cfg.auth.admin_socket) from None


def _ended(response) -> str:
    count = len(response.ended_session_ids)
    return f"; {count} live session{'s' if count != 1 else ''} ended" if count else ""


def _user_via_api(args: argparse.Namespace, channel: grpc.Channel) -> str:
    stub = admin_pb2_grpc.AdminStub(channel)
    if args.action == "add":
        request = admin_pb2.AddUserRequest(
            username=args.name,
            password_hash=hash_password(_new_password(args)),
            groups=args.group or [],
        )
        stub.AddUser(request, timeout=30)
        return f"user {args.name} added" + _joined(args.group)
    if args.action == "passwd":
        request = admin_pb2.SetPasswordRequest(
            username=args.name, password_hash=hash_password(_new_password(args))
        )
        return f"password of {args.name} changed" + _ended(stub.SetPassword(request, timeout=30))
    if args.action in ("disable", "enable"):
        request = admin_pb2.SetUserDisabledRequest(
            username=args.name, disabled=args.action == "disable"
        )
        return f"user {args.name} {args.action}d" + _ended(
            stub.SetUserDisabled(request, timeout=30)
        )
    response = stub.RemoveUser(admin_pb2.RemoveUserRequest(username=args.name), timeout=30)
    return f"user {args.name} removed" + _ended(response)


def _joined(groups: list[str] | None) -> str:
    return f" to group(s) {', '.join(groups)}" if groups else ""


def _user_offline(args: argparse.Namespace, store: Store) -> str:
    later = " (the auth service is not running: its sessions end when it starts)"
    if args.action == "add":
        password_hash = hash_password(_new_password(args))
        with store.transaction():
            store.add_user(args.name, password_hash, time.time())
            for group in args.group or []:
                store.add_members(group, [args.name])
        return f"user {args.name} added" + _joined(args.group)
    if args.action == "passwd":
        store.set_password(args.name, hash_password(_new_password(args)), time.time())
        return f"password of {args.name} changed" + later
    if args.action in ("disable", "enable"):
        store.set_disabled(args.name, args.action == "disable")
        return f"user {args.name} {args.action}d" + (later if args.action == "disable" else "")
    store.remove_user(args.name)
    return f"user {args.name} removed" + later


def cmd_user_totp(args: argparse.Namespace) -> int:
    """`user totp enroll NAME`: a new TOTP secret for NAME, printed as an otpauth URI
    (and a QR code on a terminal) for their authenticator app; `user totp remove NAME`."""
    what, name = args.name, args.totp_user
    if what not in ("enroll", "remove") or not name:
        print("pushgate-admin: user totp enroll|remove NAME", file=sys.stderr)
        return 2
    cfg = gateway_config.load(args.config, auth=True)
    secret = totp.new_secret() if what == "enroll" else None

    def change(channel: grpc.Channel) -> str:
        stub = admin_pb2_grpc.AdminStub(channel)
        if secret is not None:
            stub.EnrollTotp(admin_pb2.EnrollTotpRequest(username=name, secret=secret), timeout=30)
        else:
            stub.RemoveTotp(admin_pb2.RemoveTotpRequest(username=name), timeout=30)
        return ""

    if via_running_service(cfg, change) is None:
        store = Store(gateway_config.database_location(cfg.auth))
        try:
            store.set_totp(name, secret)
        finally:
            store.close()
        if cfg.auth.audit_log is not None:
            audit = AuditLog.open(cfg.auth.audit_log)
            try:
                audit.admin(f"user_totp_{what}", os.getuid(), user=name, offline=True)
            finally:
                audit.close()
    if secret is None:
        print(f"one-time codes of {name} removed: the password alone logs in")
        return 0
    uri = totp.provisioning_uri(secret, name)
    print(f"one-time codes enrolled for {name}; add this to their authenticator app:")
    print(uri)
    if sys.stdout.isatty():
        segno.make(uri, error="m").terminal(out=sys.stdout, compact=True)
    return 0


def client_profile(
    cfg: gateway_config.GatewayConfig, user: str, server: str | None, login: str = "password"
) -> str:
    """The profile file for `user` (client/profile.py): the auth service's address
    (`server`, or the server certificate's first name and the listen port), the TLS
    name to check if that address is not one the certificate names, and the CA."""
    with open(cfg.auth.tls_cert, "rb") as handle:
        names = server_names(x509.load_pem_x509_certificate(handle.read()))
    with open(cfg.auth.ca_cert) as handle:
        ca_pem = handle.read()
    if server is None:
        _, port = gateway_config.parse_host_port(cfg.auth.listen, "[auth] listen")
        host = names[0]
        server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    host, _ = gateway_config.parse_host_port(server, "--server")
    server_name = None if host in names else names[0]
    return profile.Profile(
        server=server, user=user, ca_pem=ca_pem, server_name=server_name, login=login
    ).to_toml()


CHANGES = ("add", "passwd", "disable", "enable", "remove")


def _audit_offline(cfg: gateway_config.GatewayConfig, args: argparse.Namespace) -> None:
    """What the auth service would have recorded, had it run (to a file only: a
    stdout audit log belongs to the service's output, not to ours)."""
    if cfg.auth.audit_log is not None:
        audit = AuditLog.open(cfg.auth.audit_log)
        try:
            audit.admin(f"user_{args.action}", os.getuid(), user=args.name, offline=True)
        finally:
            audit.close()


def cmd_user(args: argparse.Namespace) -> int:
    if args.action == "totp":
        return cmd_user_totp(args)
    if args.action == "profile":
        cfg = gateway_config.load(args.config, auth=True)
        store = Store(gateway_config.database_location(cfg.auth))
        try:
            if store.get_user(args.name) is None:
                raise NoSuchUser(args.name)
        finally:
            store.close()
        sys.stdout.write(
            client_profile(cfg, args.name, args.server, "sso" if args.sso else "password")
        )
        return 0
    if args.action == "add" and (problem := user_name_problem(args.name)):
        print(
            f"pushgate-admin: user {args.name!r}: {problem} (Login refuses others)", file=sys.stderr
        )
        return 2
    cfg = gateway_config.load(args.config, auth=True)
    if args.group and args.action != "add":
        raise ValueError("--group is for user add (then: group add GROUP USER...)")
    for group in args.group or []:  # checked here too: the service may not run
        if problem := joining_problem(AccessModel.from_config(cfg), group):
            raise ValueError(problem)
    if args.action in CHANGES:
        said = via_running_service(cfg, lambda channel: _user_via_api(args, channel))
        if said is not None:
            print(said)
            return 0
    store = Store(gateway_config.database_location(cfg.auth))
    try:
        if args.action in CHANGES:
            print(_user_offline(args, store))
            _audit_offline(cfg, args)
        else:
            for user in store.list_users():
                state = "disabled" if user.disabled else "enabled"
                print(f"{user.name}\t{state}")
    finally:
        store.close()
    return 0


def _group_via_api(args: argparse.Namespace, channel: grpc.Channel) -> str:
    stub = admin_pb2_grpc.AdminStub(channel)
    if args.action == "list":
        response = stub.ListGroups(admin_pb2.ListGroupsRequest(group=args.group or ""), timeout=30)
        return format_groups(args, list(response.groups), response.compatibility_mode)
    request = admin_pb2.GroupMembersRequest(group=args.group, usernames=args.users)
    if args.action == "add":
        response = stub.AddGroupMembers(request, timeout=30)
    else:
        response = stub.RemoveGroupMembers(request, timeout=30)
    return _members_changed(args, list(response.changed)) + _updated(response.updated_session_ids)


def _members_changed(args: argparse.Namespace, changed: list[str]) -> str:
    if not changed:
        return f"group {args.group}: no change"
    verb = "added to" if args.action == "add" else "removed from"
    return f"{', '.join(changed)} {verb} group {args.group}"


def _updated(session_ids) -> str:
    count = len(session_ids)
    return f"; {count} live session{'s' if count != 1 else ''} got the new access" if count else ""


def _group_offline(args: argparse.Namespace, cfg, store: Store) -> str:
    model = AccessModel.from_config(cfg)
    if args.action == "list":
        memberships = store.memberships(args.group or None)
        groups = group_listing(model, memberships, args.group or "")
        return format_groups(args, groups, model.compatibility)
    # (members of a group the config no longer declares may be removed)
    adding = args.action == "add" or not store.memberships(args.group)
    if adding and (problem := joining_problem(model, args.group)):
        raise ValueError(problem)
    with store.transaction():
        if args.action == "add":
            changed = store.add_members(args.group, args.users)
        else:
            changed = store.remove_members(args.group, args.users)
    if cfg.auth.audit_log is not None:
        audit = AuditLog.open(cfg.auth.audit_log)
        try:
            audit.admin(
                f"group_{args.action}", os.getuid(), group=args.group, users=changed, offline=True
            )
        finally:
            audit.close()
    return _members_changed(args, changed) + (
        " (the auth service is not running: live sessions get it when it starts)" if changed else ""
    )


def format_groups(args: argparse.Namespace, groups: list, compatibility: bool) -> str:
    if args.group and not groups:
        raise LookupError(f"no group {args.group!r}")
    rows = [
        {
            "group": g.name,
            "declared": g.declared,
            "rules": g.rules,
            "members": [{"user": m.username, "sources": list(m.sources)} for m in g.members],
        }
        for g in groups
    ]
    if args.json:
        return json.dumps(rows[0] if args.group else rows, indent=2)
    if compatibility and not rows:
        return "no groups: the config declares no [groups.*] (every user reaches [auth] routes)"
    lines = []
    for row in rows:
        note = "" if row["declared"] else " (not in the config: its members get nothing from it)"
        members = ", ".join(
            m["user"] + ("" if m["sources"] == ["admin"] else f" ({'+'.join(m['sources'])})")
            for m in row["members"]
        )
        lines.append(f"{row['group']}\t{row['rules']} rules\t{members or '-'}{note}")
    return "\n".join(lines)


def cmd_group(args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.users:
            raise ValueError("group list takes at most one GROUP")
    elif not args.group or not args.users:
        raise ValueError(f"group {args.action} needs GROUP and at least one USER")
    cfg = gateway_config.load(args.config, auth=True)
    said = via_running_service(cfg, lambda channel: _group_via_api(args, channel))
    if said is not None:
        print(said)
        return 0
    store = Store(gateway_config.database_location(cfg.auth))
    try:
        print(_group_offline(args, cfg, store))
    finally:
        store.close()
    return 0


def _dataplane_stats(path: str) -> tuple[dict[int, control_pb2.SessionStats], str | None]:
    """Per-session statistics from the dataplane's stats socket, or why there are none."""
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = control_pb2_grpc.DataplaneStatsStub(channel)
            response = stub.ListSessionStats(control_pb2.ListSessionStatsRequest(), timeout=5)
    except grpc.RpcError as error:
        return {}, f"dataplane statistics unavailable ({path}: {error.code().name})"
    return {stats.session_id: stats for stats in response.sessions}, None


def session_rows(sessions, stats: dict, now: float) -> list[dict]:
    """One dict per session: the auth service's record joined with the dataplane's
    statistics (None where the dataplane does not know the session)."""
    rows = []
    for s in sessions:
        d = stats.get(s.session_id)
        last = max(d.last_received_unix_ms, d.last_sent_unix_ms) if d else 0
        rows.append(
            {
                "session": f"{s.session_id:#010x}",
                "user": s.username,
                "tunnel_address": s.tunnel_address,
                "endpoint": (d.endpoint or None) if d else None,
                "client_version": s.client_version,
                "login_source": s.login_source,
                "login_time": datetime.datetime.fromtimestamp(
                    s.created_at_unix_ms / 1000, datetime.UTC
                ).isoformat(timespec="seconds"),
                "expires_time": datetime.datetime.fromtimestamp(
                    s.expires_at_unix_ms / 1000, datetime.UTC
                ).isoformat(timespec="seconds"),
                "last_received_age_seconds": (
                    round(now - d.last_received_unix_ms / 1000, 1)
                    if d and d.last_received_unix_ms
                    else None
                ),
                "last_packet_age_seconds": round(now - last / 1000, 1) if last else None,
                "rx_packets": d.rx_packets if d else None,
                "rx_bytes": d.rx_bytes if d else None,
                "tx_packets": d.tx_packets if d else None,
                "tx_bytes": d.tx_bytes if d else None,
                "drops": dict(d.drops) if d else None,
                "last_drop_reason": (d.last_drop_reason or None) if d else None,
                "key_epoch": s.key_epoch,
                "dataplane_state": d.state if d else None,
            }
        )
    return rows


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def format_session_table(rows: list[dict]) -> str:
    header = ("SESSION", "USER", "ADDRESS", "ENDPOINT", "CLIENT", "LOGIN (UTC)", "LAST PKT")
    header += ("RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES", "DROPS", "EPOCH")
    lines = [header]
    for r in rows:
        drops = r["drops"]
        lines.append(
            (
                r["session"],
                r["user"],
                r["tunnel_address"],
                _or_dash(r["endpoint"]),
                r["client_version"] or "-",
                r["login_time"].replace("+00:00", ""),
                "-" if r["last_packet_age_seconds"] is None else f"{r['last_packet_age_seconds']}s",
                _or_dash(r["rx_packets"]),
                _or_dash(r["rx_bytes"]),
                _or_dash(r["tx_packets"]),
                _or_dash(r["tx_bytes"]),
                "-" if drops is None else str(sum(drops.values())),
                str(r["key_epoch"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_session(row: dict) -> str:
    lines = []
    for key, value in row.items():
        if key == "drops" and value:
            value = ", ".join(f"{reason}={count}" for reason, count in sorted(value.items()))
        lines.append(f"{key + ':':27} {_or_dash(value if value != {} else 'none')}")
    return "\n".join(lines)


def _session_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"not a session id: {text!r} (e.g. 0x1a2b3c4d)") from None
    if not 0 < value < 2**32:
        raise ValueError(f"not a session id: {text!r} (1..0xffffffff)")
    return value


def cmd_session(args: argparse.Namespace) -> int:
    cfg = gateway_config.load(args.config, auth=True)
    path = cfg.auth.admin_socket
    try:
        channel = admin_channel(path)
    except ServiceDown:
        raise ServiceDown(
            f"the auth service is not running (nothing on {path}): no live sessions"
        ) from None
    with channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            if args.action == "kick":
                if (args.target is None) == (args.user is None):
                    raise ValueError("kick needs a session id or --user NAME (one of them)")
                if args.user is not None:
                    request = admin_pb2.KickSessionsRequest(username=args.user)
                else:
                    request = admin_pb2.KickSessionsRequest(session_id=_session_id(args.target))
                response = stub.KickSessions(request, timeout=30)
                ended = ", ".join(f"{i:#010x}" for i in response.ended_session_ids)
                print(f"ended {len(response.ended_session_ids)} session(s): {ended}")
                return 0
            request = admin_pb2.ListSessionsRequest(username=args.user or "")
            if args.action == "show":
                if args.target is None:
                    raise ValueError("show needs a session id")
                request.session_id = _session_id(args.target)
            sessions = stub.ListSessions(request, timeout=30).sessions
        except grpc.RpcError as error:
            raise _api_error(error, path) from None
    stats, problem = _dataplane_stats(cfg.dataplane.stats_socket)
    rows = session_rows(sessions, stats, time.time())
    if args.action == "show" and not rows:
        raise LookupError(f"no live session {args.target}")
    if args.json:
        print(json.dumps(rows[0] if args.action == "show" else rows, indent=2))
    elif args.action == "show":
        print(format_session(rows[0]))
    else:
        print(format_session_table(rows) if rows else "no live sessions")
    if problem:
        print(f"pushgate-admin: {problem}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushgate-admin",
        description="gateway administration (init, cert, users, groups, sessions)",
    )
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create a CA, a server certificate and a config")
    init.add_argument("--dir", required=True, help="directory for the gateway's files")
    init.add_argument(
        "--server-name",
        action="append",
        help="DNS name or IP clients use for the auth service (repeatable)",
    )
    init.add_argument("--auth-listen", default="0.0.0.0:7443")
    init.add_argument(
        "--dataplane-endpoint",
        default="127.0.0.1:51820",
        help="HOST:PORT clients send push packets to",
    )
    init.add_argument("--dataplane-listen", default="0.0.0.0:51820")
    init.add_argument("--tunnel-network", default="198.19.0.0/24")
    init.add_argument("--database", default="pushgate.db", help="user database, relative to DIR")
    init.add_argument(
        "--database-url-file",
        help="a file (mode 0600) holding a postgresql:// URL: users and sessions live there, "
        "shared with other gateways, instead of in --database",
    )
    init.add_argument(
        "--run-dir",
        default="run",
        help="directory of the two services' sockets, relative to DIR or absolute "
        "(/run/pushgate under systemd)",
    )
    init.add_argument(
        "--auth-metrics-listen",
        default="127.0.0.1:9101",
        help="HOST:PORT of the auth service's /metrics",
    )
    init.add_argument(
        "--dataplane-metrics-listen",
        default="127.0.0.1:9102",
        help="HOST:PORT of the dataplane's /metrics",
    )
    init.add_argument("--gateway-address", help="default: the network's first host")
    init.add_argument("--route", action="append", help="pushed route (repeatable)")
    init.add_argument("--dns", action="append", help="pushed DNS server (repeatable)")
    init.add_argument(
        "--control-group",
        help="group that may use the session feed socket too (dataplane as another user)",
    )
    init.add_argument(
        "--dataplane-user", help="user the dataplane becomes after set-up when started as root"
    )
    init.add_argument(
        "--deny-network",
        action="append",
        help="a network clients may not reach, e.g. a management network (repeatable)",
    )
    init.add_argument(
        "--offer",
        action="append",
        metavar="SERVICE",
        help='a service of this host clients may reach: "ping ADDRESS", "tcp ADDRESS:PORT" '
        'or "udp ADDRESS:PORT" (repeatable; ping to the gateway address is always offered)',
    )
    init.add_argument(
        "--ca-key-out",
        metavar="PATH",
        help="write the CA's private key here instead of DIR/tls/ca.key (e.g. removable "
        "media kept offline: only `cert renew` needs it)",
    )
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_init)
    cert = commands.add_parser("cert", help="the server certificate")
    cert.add_argument("action", choices=["renew"])
    cert.add_argument("--config", required=True)
    cert.add_argument(
        "--ca-key", metavar="PATH", help="the CA's private key (default: tls/ca.key beside ca.crt)"
    )
    cert.add_argument(
        "--server-name",
        action="append",
        help="names for the new certificate (default: those of the current one)",
    )
    cert.set_defaults(func=cmd_cert_renew)
    user = commands.add_parser("user", help="manage users")
    user.add_argument(
        "action",
        choices=["add", "passwd", "disable", "enable", "remove", "list", "profile", "totp"],
    )
    user.add_argument("name", nargs="?", help="the user; for totp: enroll or remove")
    user.add_argument("totp_user", nargs="?", metavar="NAME", help="totp: the user")
    user.add_argument("--config", required=True)
    user.add_argument("--password-file")
    user.add_argument(
        "--group",
        action="append",
        metavar="GROUP",
        help="add: the new user joins this group of the config (repeatable)",
    )
    user.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="profile: the auth service's address for clients (default: the server "
        "certificate's first name and [auth] listen's port)",
    )
    user.add_argument(
        "--sso",
        action="store_true",
        help="profile: the client signs in by single sign-on ([oidc]), not with a password",
    )
    user.set_defaults(func=cmd_user)
    group = commands.add_parser(
        "group",
        help="group membership (the groups and their rules are the config's [groups.NAME])",
    )
    group.add_argument("action", choices=["add", "remove", "list"])
    group.add_argument("group", nargs="?", metavar="GROUP")
    group.add_argument("users", nargs="*", metavar="USER")
    group.add_argument("--config", required=True)
    group.add_argument("--json", action="store_true", help="list: machine-readable output")
    group.set_defaults(func=cmd_group)
    session = commands.add_parser(
        "session", help="live sessions: list, show one, kick (needs the running auth service)"
    )
    session.add_argument("action", choices=["list", "show", "kick"])
    session.add_argument("target", nargs="?", metavar="SESSION_ID", help="e.g. 0x1a2b3c4d")
    session.add_argument("--user", help="list: only this user's; kick: every session of theirs")
    session.add_argument("--config", required=True)
    session.add_argument("--json", action="store_true", help="machine-readable output")
    session.set_defaults(func=cmd_session)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "user" and args.action != "list" and not args.name:
        print("pushgate-admin: user NAME is required", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except gateway_config.ConfigError as error:
        print(f"pushgate-admin: {error}", file=sys.stderr)
    except UserExists as error:
        print(f"pushgate-admin: user {error} already exists", file=sys.stderr)
    except NoSuchUser as error:
        print(f"pushgate-admin: no such user {error}", file=sys.stderr)
    except (ValueError, OSError, LookupError, ServiceDown) as error:
        print(f"pushgate-admin: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
