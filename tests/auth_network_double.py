"""A test double of the auth service's NetworkConfig, for tests/test_client_network_netns.py.

A real gRPC server over TLS (the gateway's own certificate) in front of the real
pushgate-auth: every call is passed through to it unchanged, except that the
`network` of Rekey and SessionInfo answers is replaced by the contents of a JSON
file when the test has written one ({"routes": [...], "dns_servers": [...], ...}).
So the session, its keys and the dataplane are real, and only what the auth
service would push after a change of the user's groups is played by the test.

    python auth_network_double.py LISTEN UPSTREAM CA CERT KEY NETWORK_JSON
"""

import asyncio
import json
import sys

import grpc

from pushgate_api import auth_pb2, auth_pb2_grpc


class Double(auth_pb2_grpc.AuthServicer):
    def __init__(self, upstream: auth_pb2_grpc.AuthStub, network_path: str) -> None:
        self.upstream = upstream
        self.network_path = network_path

    def _network(self) -> auth_pb2.NetworkConfig | None:
        try:
            with open(self.network_path) as handle:
                return auth_pb2.NetworkConfig(**json.load(handle))
        except FileNotFoundError:
            return None

    async def _pass(self, method, request, context, *, rewrite: bool):
        try:
            response = await method(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            # the refusal's details travel in the trailers: hand them on as they are
            await context.abort(error.code(), error.details(), error.trailing_metadata())
        network = self._network() if rewrite else None
        if network is not None:
            response.network.CopyFrom(network)
        return response

    async def Login(self, request, context):
        return await self._pass(self.upstream.Login, request, context, rewrite=False)

    async def Rekey(self, request, context):
        return await self._pass(self.upstream.Rekey, request, context, rewrite=True)

    async def SessionInfo(self, request, context):
        return await self._pass(self.upstream.SessionInfo, request, context, rewrite=True)

    async def Logout(self, request, context):
        return await self._pass(self.upstream.Logout, request, context, rewrite=False)


async def main(listen: str, upstream: str, ca: str, cert: str, key: str, path: str) -> None:
    def read(name: str) -> bytes:
        with open(name, "rb") as handle:
            return handle.read()

    channel = grpc.aio.secure_channel(upstream, grpc.ssl_channel_credentials(read(ca)))
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServicer_to_server(Double(auth_pb2_grpc.AuthStub(channel), path), server)
    server.add_secure_port(listen, grpc.ssl_server_credentials([(read(key), read(cert))]))
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
