"""The local control sockets' one rule: gRPC on a Unix socket only its owner can use.

Both pushgate-auth (session feed) and pushgate-dataplane (stats) serve their
local APIs this way, never on TCP: the directory is created 0700, the socket
is bound under umask 077 and then set to mode 0600.
"""

import os

import grpc


async def serve_private(server: grpc.aio.Server, path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{path}")
        await server.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
