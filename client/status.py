"""The running client's status file: written by `connect`, read by `status`."""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

DEFAULT_STATUS_DIR = "/run/pushgate"
REPLACE_ATTEMPTS = 20


def status_path(tun_name: str, directory: str = DEFAULT_STATUS_DIR) -> str:
    return os.path.join(directory, f"client-{tun_name}.json")


@dataclass
class ClientStatus:
    pid: int
    state: str
    tun_name: str
    server: str
    tunnel_address: str = ""
    endpoint: str = ""
    local_port: int = 0
    session_id: int = 0
    key_epoch: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    last_received_at: float | None = None
    last_sent_at: float | None = None
    last_error: str = ""
    drops: dict[str, int] = field(default_factory=dict)
    undo: list[list[str]] = field(default_factory=list)  # to clean up after a crash
    updated_at: float = 0.0


_secured_dirs: set[str] = set()  # Windows: made private once per process


def secure_status_dir_windows(directory: str, security=None) -> None:
    """Windows: `directory` made private to SYSTEM and Administrators, or refused
    (a reparse point, another owner, a file in it someone else owns); see
    client/winsecurity.py. Once per process: after that nobody else can add to it."""
    from .auth import ClientError
    from .winsecurity import UnsafeDirectory, WinSecurity, ensure_private_directory

    if directory in _secured_dirs:
        return
    try:
        ensure_private_directory(directory, security or WinSecurity())
    except UnsafeDirectory as error:
        raise ClientError(str(error), retryable=False) from None
    _secured_dirs.add(directory)


def check_status_dir_windows(directory: str, security=None) -> None:
    """Windows, before reading: refuse a status directory that is not private."""
    from .auth import ClientError
    from .winsecurity import UnsafeDirectory, WinSecurity, check_private_directory

    try:
        check_private_directory(directory, security or WinSecurity())
    except UnsafeDirectory as error:
        raise ClientError(str(error), retryable=False) from None
    except PermissionError:
        raise ClientError(
            f"cannot check {directory}: run as Administrator", retryable=False
        ) from None


def write_status(path: str, status: ClientStatus) -> None:
    status.updated_at = time.time()
    if sys.platform == "win32":
        secure_status_dir_windows(os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(asdict(status), handle)
    # On Windows the replace fails while a reader (`status --watch`) has the file
    # open; it closes it within milliseconds.
    for attempt in range(REPLACE_ATTEMPTS):
        try:
            os.replace(temporary, path)
            return
        except PermissionError:
            if attempt == REPLACE_ATTEMPTS - 1:
                raise
            time.sleep(0.01)


def read_status(path: str) -> ClientStatus:
    if sys.platform == "win32":
        check_status_dir_windows(os.path.dirname(path))
    with open(path) as handle:
        return ClientStatus(**json.load(handle))


def _age(then: float | None, now: float) -> str:
    return "never" if then is None else f"{now - then:.1f} s ago"


def format_status(status: ClientStatus, now: float) -> str:
    lines = [
        f"state:          {status.state}",
        f"server:         {status.server}  (dataplane {status.endpoint or '-'},"
        f" local UDP port {status.local_port or '-'})",
        f"tunnel:         {status.tun_name} {status.tunnel_address or '-'}"
        f"  session {status.session_id:#010x} key epoch {status.key_epoch}",
        f"sent:           {status.tx_packets} packets, {status.tx_bytes} bytes",
        f"received:       {status.rx_packets} packets, {status.rx_bytes} bytes",
        f"last received:  {_age(status.last_received_at, now)}",
        f"last sent:      {_age(status.last_sent_at, now)}",
    ]
    if status.drops:
        lines.append(
            "drops:          " + ", ".join(f"{k}={v}" for k, v in sorted(status.drops.items()))
        )
    if status.last_error:
        lines.append(f"last error:     {status.last_error}")
    return "\n".join(lines)
