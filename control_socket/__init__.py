"""The local control sockets' one rule: gRPC on a Unix socket only its owner can use.

Both pushgate-auth (session feed) and pushgate-dataplane (stats) serve their
local APIs this way, never on TCP: the directory is created 0700, the socket
is bound under umask 077 and then set to mode 0600. With `[gateway]
control_group` (auth service and dataplane running as different users) the
group may use them too: sockets 0660 and, if this process created the
directory, directory 1770 with that group (sticky: neither user can remove or
replace the other's socket).
"""

import grp
import os

import grpc


async def serve_private(server: grpc.aio.Server, path: str, group: str | None = None) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SystemExit(f"[gateway] control_group {group!r} does not exist") from None
        if os.stat(directory).st_uid == os.geteuid():
            os.chown(directory, -1, gid)
            os.chmod(directory, 0o1770)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{path}")
        await server.start()
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o600 if gid is None else 0o660)
