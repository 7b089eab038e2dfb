"""`pushgate-client`: connect to a pushgate gateway, show status, disconnect."""

import argparse
import asyncio
import getpass
import os
import sys
import time

from push_protocol.version import add_version_argument
from pushgate_io import logs
from pushgate_io.event_loop import loop_factory

from . import profile
from .auth import ClientError, PasswordLogin
from .connection import Connection, ConnectOptions
from .host import ClientHost, current_host
from .sso import SsoOptions
from .status import UntrustedStatusFile, format_status, read_status, status_path

PASSWORD_ENV = "PUSHGATE_PASSWORD"
OTP_CODE_ENV = "PUSHGATE_OTP_CODE"


def _ask_code() -> str:
    """Asks the person at the terminal for the one-time code (on the controlling
    terminal: standard output may be a log)."""
    return getpass.getpass("one-time code from your authenticator app: ").strip()


def _credentials(args: argparse.Namespace) -> PasswordLogin | SsoOptions:
    if args.sso:
        return SsoOptions(
            open_browser=not args.no_browser,
            redirect_port=args.sso_port,
            announce=lambda text: print(text, file=sys.stderr, flush=True),
        )
    return PasswordLogin(
        args.user,
        _password(args),
        otp_code=os.environ.get(OTP_CODE_ENV, ""),
        ask_code=_ask_code if sys.stdin.isatty() else None,
    )


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        with open(args.password_file) as handle:
            return handle.readline().rstrip("\n")
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise ClientError(
            f"no password: use --password-file, set {PASSWORD_ENV}, or run in a terminal",
            retryable=False,
        )
    return getpass.getpass(f"password for {args.user}: ")


def _read_trusted(path: str):
    """The status file, or ClientError when it is not root's (see client/status.py)."""
    try:
        return read_status(path)
    except UntrustedStatusFile as error:
        raise ClientError(f"refusing the status file: {error}", retryable=False) from None


def _cleanup_stale(host: ClientHost, path: str) -> dict[str, str]:
    """Undo what a crashed client left behind (its TUN vanished with it); its kill
    switch stays (a new `connect` replaces it, `disconnect` removes it). Returns the
    addresses it had resolved (the kill switch blocks lookups until a tunnel is up)."""
    try:
        stale = _read_trusted(path)
    except (OSError, ValueError, TypeError):
        return {}
    if host.process_alive(stale.pid):
        raise ClientError(
            f"a client (pid {stale.pid}) already runs on {stale.tun_name}", retryable=False
        )
    host.unconfigure(stale.undo)
    os.unlink(path)
    if not isinstance(stale.resolved, dict):
        return {}
    return {k: v for k, v in stale.resolved.items() if isinstance(k, str) and isinstance(v, str)}


async def _connect(host: ClientHost, options: ConnectOptions) -> None:
    connection = Connection(options, host=host)
    host.install_stop_handlers(asyncio.get_running_loop(), connection)
    await connection.run()


def _status_path(host: ClientHost, args: argparse.Namespace) -> str:
    return status_path(args.tun, args.status_dir or host.status_dir)


def _apply_profile(args: argparse.Namespace) -> None:
    """Fill --server, --ca (the profile file itself: it holds the CA), --user and
    --server-name from --profile; options given on the command line win."""
    if args.profile:
        try:
            loaded = profile.read(args.profile)
        except profile.ProfileError as error:
            raise ClientError(str(error), retryable=False) from None
        args.server = args.server or loaded.server
        args.ca = args.ca or args.profile
        args.user = args.user or loaded.user or None
        args.server_name = args.server_name or loaded.server_name
        args.sso = args.sso or loaded.login == "sso"
    needed = ("server", "ca") if args.sso else ("server", "ca", "user")
    missing = [f"--{name}" for name in needed if not getattr(args, name)]
    if missing:
        raise ClientError(f"connect needs --profile FILE, or {', '.join(missing)}", retryable=False)


def cmd_connect(args: argparse.Namespace) -> int:
    _apply_profile(args)
    host = current_host()
    host.check_privileges()  # before asking for a password
    path = _status_path(host, args)
    known = _cleanup_stale(host, path)
    _set_lockdown(host, args)
    options = ConnectOptions(
        server=args.server,
        ca_path=args.ca,
        credentials=_credentials(args),
        tun_name=args.tun,
        server_name=args.server_name,
        status_path=path,
        dead_after_seconds=args.dead_after,
        known_addresses=known,
    )
    with asyncio.Runner(loop_factory=loop_factory(host.loop_factory)) as runner:
        runner.run(_connect(host, options))
    return 0


def _set_lockdown(host: ClientHost, args: argparse.Namespace) -> None:
    """--lockdown/--no-lockdown (default: on for a full tunnel) and --allow-lan."""
    if hasattr(host, "lockdown"):
        host.lockdown = args.lockdown
        host.allow_lan = args.allow_lan
    elif args.lockdown:
        raise ClientError("this system's client has no kill switch", retryable=False)


def _release(host: ClientHost, tun_name: str) -> None:
    release = getattr(host, "release", None)
    if release is not None:
        host.stop_requested = True
        release(tun_name)  # the kill switch, also a crashed client's


def cmd_status(args: argparse.Namespace) -> int:
    host = current_host()
    path = _status_path(host, args)
    while True:
        try:
            status = _read_trusted(path)
        except FileNotFoundError:
            print(f"not connected (no client on {args.tun})")
            return 1
        if not host.process_alive(status.pid):
            status.state = f"{status.state} (client pid {status.pid} is gone)"
        print(format_status(status, time.time()), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


def cmd_disconnect(args: argparse.Namespace) -> int:
    host = current_host()
    host.check_privileges()  # stopping a client and undoing routes need them too
    path = _status_path(host, args)
    try:
        status = _read_trusted(path)
    except FileNotFoundError:
        _release(host, args.tun)
        print(f"not connected (no client on {args.tun})")
        return 1
    if not host.process_alive(status.pid):
        _cleanup_stale(host, path)
        _release(host, args.tun)
        print("cleaned up after a client that had exited")
        return 0
    graceful = host.request_stop(status.pid)
    deadline = time.time() + 10
    while host.process_alive(status.pid) and time.time() < deadline:
        time.sleep(0.1)
    if host.process_alive(status.pid):
        print(f"client pid {status.pid} did not exit", file=sys.stderr)
        return 1
    if not graceful:
        _cleanup_stale(host, path)  # it was ended without undoing its routes
    _release(host, args.tun)  # done by the client already, unless it could not
    print("disconnected")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushgate-client", description="the pushgate VPN client")
    add_version_argument(parser)
    parser.add_argument(
        "--tun", default="pgc0", help="TUN device (WinTun adapter) name (default pgc0)"
    )
    parser.add_argument(
        "--status-dir",
        help="where the status file lives (/run/pushgate, %%ProgramData%%\\pushgate)",
    )
    logs.add_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    connect = commands.add_parser(
        "connect", help="log in and bring the tunnel up (SIGUSR1: new UDP port, SIGUSR2: rekey)"
    )
    connect.add_argument(
        "--profile",
        help="a profile from `pushgate-admin user profile` (server, TLS name, CA, user)",
    )
    connect.add_argument("--server", help="auth service host:port")
    connect.add_argument("--ca", help="the gateway's CA certificate (PEM)")
    connect.add_argument("--user")
    connect.add_argument(
        "--password-file", help=f"read the password from here (or set {PASSWORD_ENV})"
    )
    connect.add_argument("--server-name", help="TLS name to verify, if not the --server host")
    connect.add_argument(
        "--sso",
        action="store_true",
        help="single sign-on: sign in at the gateway's identity provider in a browser",
    )
    connect.add_argument(
        "--sso-port",
        type=int,
        default=0,
        help="--sso: 127.0.0.1 port for the provider's redirect (default: any free one)",
    )
    connect.add_argument(
        "--no-browser", action="store_true", help="--sso: only print the URL to open"
    )
    connect.add_argument("--dead-after", type=float, help="seconds of silence = server lost")
    connect.add_argument(
        "--lockdown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="kill switch: nothing but the gateway leaves outside the tunnel, across"
        " reconnects, re-logins and a crash, until `disconnect` (default: on for a full"
        " tunnel; --no-lockdown: off)",
    )
    connect.add_argument(
        "--allow-lan",
        action="store_true",
        help="with the kill switch: the local network (private, link-local and local"
        " multicast ranges) stays reachable, except DNS",
    )
    connect.set_defaults(func=cmd_connect)
    status = commands.add_parser("status", help="show the running client's state")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every N s")
    status.set_defaults(func=cmd_status)
    disconnect = commands.add_parser("disconnect", help="stop the running client")
    disconnect.set_defaults(func=cmd_disconnect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("pushgate-client", args)
    try:
        return args.func(args)
    except ClientError as error:
        print(f"pushgate-client: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
