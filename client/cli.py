"""`pushgate-client`: connect to a pushgate gateway, show status, disconnect."""

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
import time

from .auth import ClientError
from .connection import Connection, ConnectOptions, run_commands
from .status import DEFAULT_STATUS_DIR, format_status, read_status, status_path

PASSWORD_ENV = "PUSHGATE_PASSWORD"


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


def _cleanup_stale(path: str) -> None:
    """Undo what a crashed client left behind (its TUN vanished with it)."""
    try:
        stale = read_status(path)
    except (OSError, ValueError, TypeError):
        return
    if _alive(stale.pid):
        raise ClientError(
            f"a client (pid {stale.pid}) already runs on {stale.tun_name}", retryable=False
        )
    run_commands([tuple(command) for command in stale.undo], check=False)
    os.unlink(path)


def _alive(pid: int) -> bool:
    """True while `pid` runs (an exited child its parent has not reaped yet is not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


async def _connect(options: ConnectOptions) -> None:
    connection = Connection(options)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, connection.stop)
    loop.add_signal_handler(signal.SIGUSR1, connection.request_rebind)
    loop.add_signal_handler(signal.SIGUSR2, connection.request_rekey)
    await connection.run()


def cmd_connect(args: argparse.Namespace) -> int:
    path = status_path(args.tun, args.status_dir)
    _cleanup_stale(path)
    options = ConnectOptions(
        server=args.server,
        ca_path=args.ca,
        username=args.user,
        password=_password(args),
        tun_name=args.tun,
        server_name=args.server_name,
        status_path=path,
        dead_after_seconds=args.dead_after,
    )
    asyncio.run(_connect(options))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    path = status_path(args.tun, args.status_dir)
    while True:
        try:
            status = read_status(path)
        except FileNotFoundError:
            print(f"not connected (no client on {args.tun})")
            return 1
        if not _alive(status.pid):
            status.state = f"{status.state} (client pid {status.pid} is gone)"
        print(format_status(status, time.time()), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


def cmd_disconnect(args: argparse.Namespace) -> int:
    path = status_path(args.tun, args.status_dir)
    try:
        status = read_status(path)
    except FileNotFoundError:
        print(f"not connected (no client on {args.tun})")
        return 1
    if not _alive(status.pid):
        _cleanup_stale(path)
        print("cleaned up after a client that had exited")
        return 0
    os.kill(status.pid, signal.SIGTERM)
    deadline = time.time() + 10
    while _alive(status.pid) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(status.pid):
        print(f"client pid {status.pid} did not exit", file=sys.stderr)
        return 1
    print("disconnected")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushgate-client", description="the pushgate VPN client")
    parser.add_argument("--tun", default="pgc0", help="TUN device name (default pgc0)")
    parser.add_argument("--status-dir", default=DEFAULT_STATUS_DIR)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    connect = commands.add_parser(
        "connect", help="log in and bring the tunnel up (SIGUSR1: new UDP port, SIGUSR2: rekey)"
    )
    connect.add_argument("--server", required=True, help="auth service host:port")
    connect.add_argument("--ca", required=True, help="the gateway's CA certificate (PEM)")
    connect.add_argument("--user", required=True)
    connect.add_argument(
        "--password-file", help=f"read the password from here (or set {PASSWORD_ENV})"
    )
    connect.add_argument("--server-name", help="TLS name to verify, if not the --server host")
    connect.add_argument("--dead-after", type=float, help="seconds of silence = server lost")
    connect.set_defaults(func=cmd_connect)
    status = commands.add_parser("status", help="show the running client's state")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every N s")
    status.set_defaults(func=cmd_status)
    disconnect = commands.add_parser("disconnect", help="stop the running client")
    disconnect.set_defaults(func=cmd_disconnect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ClientError as error:
        print(f"pushgate-client: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
