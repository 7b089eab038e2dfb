"""The local control sockets: gRPC on a Unix socket that only expected peers can use.

Both pushgate-auth (session feed) and pushgate-dataplane (stats) serve their
local APIs this way, never on TCP, and the dataplane reaches the feed this way.
A socket is mode 0600, or 0660 with `[gateway] control_group` (auth service and
dataplane running as different users: then the directory this process creates
is 1770 with that group, sticky, so neither user can remove or replace the
other's socket).

Who is at the other end is checked on every connection, from the credentials
the kernel recorded when that end called connect() or listen() (SO_PEERCRED):
our own uid, root, or a member of `[gateway] control_group` (its primary group
or a listed member, as the system's group database says at start-up). gRPC's Python API
cannot do this itself: `context.peer()` is just "unix:", its auth context is
empty for Unix sockets, and grpcio cannot adopt a socket we accepted
(grpc/grpc#23760). So each end holds the socket itself, in a `PeerCheckedRelay`:

- serving: the relay listens on the configured path, reads each connection's
  peer uid, refuses a stranger before reading a byte (counted and logged), and
  pipes the others to gRPC, which listens inside a directory of mode 0700 next
  to it that only our uid and root can enter;
- connecting: gRPC connects to a relay in our own process (an abstract socket
  with a random name; only our own pid is let through), which connects to the
  server and checks the server's uid before a byte passes either way.

A server that needs to know who called (the admin API records the caller's uid)
asks for `identify_callers`: its relay then connects to gRPC from a socket bound
to a random abstract name, which gRPC reports as the call's `context.peer()`,
and `PrivateServer.caller` maps that name back to the credentials it checked.

The directory a socket is served from must belong to an allowed peer and be
writable by no one else unless it is sticky (else another user could swap the
socket): checked at start-up, a clear error if not.
"""

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import secrets
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger("pushgate.control_socket")

REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused peers
PIPE_CHUNK = 65536
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus its terminating NUL


class ControlSocketError(Exception):
    """A control socket cannot be served or used safely; the message says why."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock) -> PeerCredentials:
    """The credentials the kernel recorded for the other end of a connected Unix
    socket (at its connect() or listen()), not anything the peer says."""
    return PeerCredentials(
        *_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    )


def group_members(group: str) -> tuple[int, frozenset[int]]:
    """(gid, uids of its members: those whose primary group it is, and those it
    lists); an unknown group is an error."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        raise ControlSocketError(f"[gateway] control_group {group!r} does not exist") from None
    uids = set()
    for user in pwd.getpwall():
        if user.pw_gid == entry.gr_gid or user.pw_name in entry.gr_mem:
            uids.add(user.pw_uid)
    return entry.gr_gid, frozenset(uids)


@dataclass(frozen=True)
class PeerPolicy:
    """Whose end of a control socket we talk to: our own uid, root, and the
    members of `group` (the other pushgate service's user, when they differ),
    who may also open the socket file (mode 0660 for that group)."""

    uids: frozenset[int]
    gid: int | None = None  # the control group's, if any

    @classmethod
    def for_service(cls, group: str | None = None) -> "PeerPolicy":
        own = frozenset({os.geteuid(), 0})
        if group is None:
            return cls(own)
        gid, members = group_members(group)
        return cls(own | members, gid)

    def allows(self, uid: int) -> bool:
        return uid in self.uids

    def __str__(self) -> str:
        return "uid " + ", ".join(str(uid) for uid in sorted(self.uids))


def directory_problem(st_uid: int, st_mode: int, owners: frozenset[int]) -> str | None:
    """Why a directory is no safe home for a control socket, or None: it must
    belong to an allowed peer, and be writable by no one else unless it is sticky
    (then only a file's owner, the directory's, or root can remove or replace it)."""
    if st_uid not in owners:
        return f"it belongs to uid {st_uid}, not to this service's user or an allowed peer"
    if st_mode & 0o022 and not st_mode & stat.S_ISVTX:
        return f"it is writable by others and not sticky (mode {stat.S_IMODE(st_mode):04o})"
    return None


def _safe_directory(path: str, mode: int, owners: frozenset[int]) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    info = os.stat(path)
    problem = directory_problem(info.st_uid, info.st_mode, owners)
    if problem:
        raise ControlSocketError(f"will not serve a control socket in {path}: {problem}")


class PeerCheckedRelay:
    """Accepts on `listen`, checks both ends' credentials, pipes bytes to `upstream`.

    `admit_client(creds)` and `admit_upstream(creds)` decide; a refused
    connection is closed before any byte of it is read or passed on, counted in
    `refused`, reported through `on_refused` and logged (at most one line per
    REFUSAL_LOG_INTERVAL, with the count since the last)."""

    def __init__(
        self,
        listen: str,
        upstream: str,
        *,
        name: str,
        admit_client: Callable[[PeerCredentials], bool],
        admit_upstream: Callable[[PeerCredentials], bool] | None = None,
        on_refused: Callable[[], None] = lambda: None,
        identify_callers: bool = False,
    ) -> None:
        self.listen, self.upstream, self.name = listen, upstream, name
        self._identify = identify_callers
        # while a connection lasts: the gRPC peer string of its upstream end -> its client
        self.callers: dict[str, PeerCredentials] = {}
        self._admit_client, self._admit_upstream = admit_client, admit_upstream
        self._on_refused = on_refused
        self.refused = 0
        self._unlogged = 0
        self._last_log = -REFUSAL_LOG_INTERVAL
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, mode: int | None = None, gid: int | None = None) -> None:
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._accepted, path=self.listen)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(self.listen, -1, gid)
        if mode is not None:
            os.chmod(self.listen, mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _refuse(self, why: str, creds: PeerCredentials) -> None:
        self.refused += 1
        self._unlogged += 1
        self._on_refused()
        now = time.monotonic()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "%s: refused %s uid %d (pid %d): not an allowed peer; %d refused since the "
                "last such line",
                self.name,
                why,
                creds.uid,
                creds.pid,
                self._unlogged,
            )
            self._last_log, self._unlogged = now, 0

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        upstream_writer = caller = None
        try:
            creds = peer_credentials(writer.get_extra_info("socket"))
            if not self._admit_client(creds):
                self._refuse("a client,", creds)
                return
            try:
                if self._identify:
                    caller, upstream = await self._connect_labelled()
                    self.callers[caller] = creds
                    upstream_reader, upstream_writer = await asyncio.open_unix_connection(
                        sock=upstream
                    )
                else:
                    upstream_reader, upstream_writer = await asyncio.open_unix_connection(
                        self.upstream
                    )
            except OSError as error:
                log.debug("%s: cannot reach %s: %s", self.name, self.upstream, error)
                return
            if self._admit_upstream is not None:
                server = peer_credentials(upstream_writer.get_extra_info("socket"))
                if not self._admit_upstream(server):
                    self._refuse(f"the server at {self.upstream},", server)
                    return
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (OSError, asyncio.CancelledError):
            # A cancelled connection task just ends: Python 3.11's stream server
            # would log a cancelled handler as an error (fixed in 3.12).
            pass
        finally:
            for end in (writer, upstream_writer):
                if end is not None:
                    end.close()
            self.callers.pop(caller, None)
            self._connections.discard(task)

    async def _connect_labelled(self) -> tuple[str, socket.socket]:
        """A socket connected to upstream from a random abstract address, and the
        peer string gRPC will report for it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            name = f"pushgate-caller-{secrets.token_hex(12)}"
            sock.bind("\0" + name)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.upstream)
        except BaseException:
            sock.close()
            raise
        return f"unix-abstract:{name}", sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either end closes, then close the writing side (HTTP/2 never
    half-closes, so the other direction ends too)."""
    try:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class PrivateServer:
    """A gRPC server behind a PeerCheckedRelay on `path`; see the module's doc."""

    def __init__(self, server: grpc.aio.Server, relay: PeerCheckedRelay, inner_dir: str) -> None:
        self.grpc = server
        self.relay = relay
        self._inner_dir = inner_dir

    @property
    def refused(self) -> int:
        return self.relay.refused

    def caller(self, peer: str) -> PeerCredentials | None:
        """Who made a call, from its `context.peer()` (with `identify_callers` only)."""
        return self.relay.callers.get(peer)

    async def stop(self, grace: float | None) -> None:
        await self.relay.close()
        await self.grpc.stop(grace)
        with contextlib.suppress(OSError):
            os.unlink(self.relay.upstream)
            os.rmdir(self._inner_dir)


async def serve_private(
    server: grpc.aio.Server,
    path: str,
    peers: PeerPolicy,
    *,
    on_refused: Callable[[], None] = lambda: None,
    identify_callers: bool = False,
) -> PrivateServer:
    """Serve `server` on the Unix socket `path` to `peers` only: the socket is mode
    0600, or 0660 for the control group; the peer check keeps everyone else out
    whatever the modes."""
    directory, base = os.path.split(os.path.abspath(path))
    own = frozenset({os.geteuid()})
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if peers.gid is not None and os.stat(directory).st_uid == os.geteuid():
        os.chown(directory, -1, peers.gid)
        os.chmod(directory, 0o1770)  # the group may add its socket, not touch ours
    _safe_directory(directory, 0o700, peers.uids)
    inner_dir = os.path.join(directory, f".{base}.grpc")
    _safe_directory(inner_dir, 0o700, own)
    os.chmod(inner_dir, 0o700)  # reachable by our uid (and root) only
    inner = os.path.join(inner_dir, "socket")
    if len(inner.encode()) > SUN_PATH_MAX:
        raise ControlSocketError(f"control socket path too long for a Unix socket: {inner}")
    for stale in (path, inner):
        if os.path.lexists(stale):
            os.unlink(stale)
    old = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{inner}")
        await server.start()
    finally:
        os.umask(old)
    relay = PeerCheckedRelay(
        path,
        inner,
        name=f"control socket {path}",
        admit_client=lambda creds: peers.allows(creds.uid),
        on_refused=on_refused,
        identify_callers=identify_callers,
    )
    await relay.start(mode=0o600 if peers.gid is None else 0o660, gid=peers.gid)
    return PrivateServer(server, relay, inner_dir)


@contextlib.asynccontextmanager
async def checked_target(
    path: str, peers: PeerPolicy, *, name: str, on_refused: Callable[[], None] = lambda: None
):
    """A gRPC target (for grpc.aio channels of this process) that reaches the Unix
    socket `path` only while the process serving it is one of `peers`."""
    address = f"pushgate-{os.getpid()}-{secrets.token_hex(8)}"
    own_pid = os.getpid()
    relay = PeerCheckedRelay(
        "\0" + address,
        path,
        name=name,
        admit_client=lambda creds: creds.pid == own_pid,  # our gRPC, no one else
        admit_upstream=lambda creds: peers.allows(creds.uid),
        on_refused=on_refused,
    )
    await relay.start()
    try:
        yield f"unix-abstract:{address}", relay
    finally:
        await relay.close()
