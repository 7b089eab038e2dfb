"""`pushgate-admin`: set up a gateway (init) and manage its users."""

import argparse
import datetime
import getpass
import ipaddress
import os
import sys
import time

import gateway_config

from .passwords import hash_password
from .pki import make_ca, make_server_cert
from .store import NoSuchUser, Store, UserExists

PASSWORD_ENV = "PUSHGATE_PASSWORD"

CONFIG_TEMPLATE = """\
# pushgate gateway config, written by `pushgate-admin init`. Paths are relative
# to this file. Both pushgate-auth and pushgate-dataplane read it.

[gateway]
tunnel_network = "{tunnel_network}"   # clients get addresses from here
gateway_address = "{gateway_address}"     # the dataplane TUN's address
mtu = 1420
keepalive_seconds = 10
cipher = "aes-256-gcm"                 # or "chacha20-poly1305"
control_socket = "run/control.sock"    # session feed, Unix socket, mode 0600

[auth]
listen = "{auth_listen}"               # client API, gRPC over TLS
tls_cert = "tls/server.crt"
tls_key = "tls/server.key"
ca_cert = "tls/ca.crt"                 # give this file to clients
database = "pushgate.db"
dataplane_endpoint = "{dataplane_endpoint}"   # UDP endpoint handed to clients
routes = [{routes}]                    # "0.0.0.0/0" = full tunnel
dns = [{dns}]
metrics_listen = "127.0.0.1:9101"
session_lifetime_seconds = 86400       # absolute; 0 = no limit
key_lifetime_seconds = 600             # clients rekey after this many seconds
key_expiry_seconds = 900               # keys not replaced by then end the session (max 900)
max_failures_before_delay = 5          # per user and per source address
failure_delay_seconds = 1.0            # doubles per further failure ...
max_failure_delay_seconds = 300.0      # ... up to this
max_sessions_per_user = 3              # a further login ends the user's oldest session
max_connections = 10000                # client API connections (at most the fd limit allows)
reflection = false                     # gRPC server reflection on the client API port

[dataplane]
listen = "{dataplane_listen}"
tun_name = "pg0"
stats_socket = "run/dataplane.sock"
metrics_listen = "127.0.0.1:9102"
"""


def _quoted(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def cmd_init(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.dir)
    config_path = os.path.join(directory, "pushgate.toml")
    if os.path.exists(config_path) and not args.force:
        print(f"pushgate-admin: {config_path} exists; use --force to replace it", file=sys.stderr)
        return 1
    network = ipaddress.ip_network(args.tunnel_network)
    gateway = args.gateway_address or str(next(network.hosts()))
    os.makedirs(os.path.join(directory, "tls"), mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(directory, "run"), mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_pem, ca_key_pem, ca_cert, ca_key = make_ca("pushgate gateway CA", now)
    names = args.server_name or ["localhost", "127.0.0.1"]
    cert_pem, key_pem = make_server_cert(names, ca_cert, ca_key, now)
    files = {
        "tls/ca.crt": (ca_pem, 0o644),
        "tls/ca.key": (ca_key_pem, 0o600),
        "tls/server.crt": (cert_pem, 0o644),
        "tls/server.key": (key_pem, 0o600),
    }
    for name, (data, mode) in files.items():
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)
    with open(config_path, "w") as handle:
        handle.write(
            CONFIG_TEMPLATE.format(
                tunnel_network=network,
                gateway_address=gateway,
                auth_listen=args.auth_listen,
                dataplane_endpoint=args.dataplane_endpoint,
                dataplane_listen=args.dataplane_listen,
                routes=_quoted(args.route or ["0.0.0.0/0"]),
                dns=_quoted(args.dns or []),
            )
        )
    gateway_config.load(config_path, auth=True)  # what we wrote must load
    print(
        f"gateway initialised in {directory}:\n"
        f"  config      {config_path}\n"
        f"  CA          {os.path.join(directory, 'tls/ca.crt')} (give this to clients)\n"
        f"  server cert for {', '.join(names)}\n"
        f"next: pushgate-admin user add NAME --config {config_path}"
    )
    return 0


def _store(args: argparse.Namespace) -> Store:
    cfg = gateway_config.load(args.config, auth=True)
    return Store(cfg.auth.database)


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


def cmd_user(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.action == "add":
            store.add_user(args.name, hash_password(_new_password(args)), time.time())
            print(f"user {args.name} added")
        elif args.action == "passwd":
            store.set_password(args.name, hash_password(_new_password(args)))
            print(f"password of {args.name} changed")
        elif args.action in ("disable", "enable"):
            store.set_disabled(args.name, args.action == "disable")
            print(f"user {args.name} {args.action}d")
        elif args.action == "remove":
            store.remove_user(args.name)
            print(f"user {args.name} removed")
        else:
            for user in store.list_users():
                state = "disabled" if user.disabled else "enabled"
                print(f"{user.name}\t{state}")
    finally:
        store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushgate-admin", description="gateway administration (init, users)"
    )
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
    init.add_argument("--gateway-address", help="default: the network's first host")
    init.add_argument("--route", action="append", help="pushed route (repeatable)")
    init.add_argument("--dns", action="append", help="pushed DNS server (repeatable)")
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_init)
    user = commands.add_parser("user", help="manage users")
    user.add_argument("action", choices=["add", "passwd", "disable", "enable", "remove", "list"])
    user.add_argument("name", nargs="?")
    user.add_argument("--config", required=True)
    user.add_argument("--password-file")
    user.set_defaults(func=cmd_user)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", "list") != "list" and not args.name:
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
    except (ValueError, OSError) as error:
        print(f"pushgate-admin: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
