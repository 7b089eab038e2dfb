"""The running client's status file: written by `connect`, read by `status`."""

import json
import os
import stat
import sys
import tempfile
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
    endpoint: str = ""  # the dataplane in use
    gateway: str = ""  # its gateway's id in a cluster ("" alone)
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
    # host name -> address as last resolved (auth service, dataplane): a client started
    # after a crash uses them while the kill switch the dead one left blocks lookups
    resolved: dict[str, str] = field(default_factory=dict)
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


class UntrustedStatusFile(OSError):
    """A status file (or directory) someone other than root could have written."""


def _trusted_owners() -> tuple[int, ...]:
    # root; and a client run by a non-root user with CAP_NET_ADMIN trusts its own
    # files (root itself trusts only root's).
    return (0,) if os.geteuid() == 0 else (0, os.geteuid())


def check_trusted_posix(path: str, *, directory: bool) -> None:
    """POSIX: `path` and every directory above it must be owned by root (or by us,
    when not root) and not writable by group or others (a directory above may be
    world-writable if it is sticky, as /tmp); `path` must not be a symbolic link.
    Else UntrustedStatusFile: as root we would run undo steps from it, follow its
    links and rewrite it (issue 20)."""
    owners = _trusted_owners()
    info = os.lstat(path)
    kind = "directory" if directory else "file"
    if stat.S_ISLNK(info.st_mode) or not (
        stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    ):
        raise UntrustedStatusFile(f"status {kind} {path} is not a plain {kind}")
    if info.st_uid not in owners:
        raise UntrustedStatusFile(f"status {kind} {path} is owned by uid {info.st_uid}, not root")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedStatusFile(f"status {kind} {path} is writable by others")
    parent = os.path.dirname(os.path.abspath(path if not directory else path.rstrip("/")))
    while True:
        info = os.stat(parent)
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if info.st_uid not in owners or (writable and not info.st_mode & stat.S_ISVTX):
            raise UntrustedStatusFile(f"{parent} (above the status file) is writable by others")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _check_posix(path: str, *, directory: bool) -> None:
    if os.name == "posix":
        check_trusted_posix(path, directory=directory)


def write_status(path: str, status: ClientStatus) -> None:
    status.updated_at = time.time()
    if sys.platform == "win32":
        secure_status_dir_windows(os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    directory = os.path.dirname(path)
    _check_posix(directory, directory=True)
    if os.path.lexists(path):
        _check_posix(path, directory=False)
    # A fresh file of ours (O_EXCL: never someone's link), renamed over the old one.
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".client-", suffix=".tmp")
    with os.fdopen(descriptor, "w") as handle:
        if os.name == "posix":
            os.fchmod(handle.fileno(), 0o644)  # `status` works for any user
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
    """The status file at `path`; on POSIX UntrustedStatusFile unless root's (see
    check_trusted_posix), FileNotFoundError if there is none."""
    if sys.platform == "win32":
        check_status_dir_windows(os.path.dirname(path))
    if os.name == "posix" and os.path.lexists(path):
        _check_posix(os.path.dirname(path), directory=True)
        _check_posix(path, directory=False)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags)) as handle:
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
    if status.gateway:  # a cluster's: which gateway the tunnel uses now
        lines.insert(2, f"gateway:        {status.gateway}")
    if status.drops:
        lines.append(
            "drops:          " + ", ".join(f"{k}={v}" for k, v in sorted(status.drops.items()))
        )
    if status.last_error:
        lines.append(f"last error:     {status.last_error}")
    return "\n".join(lines)
