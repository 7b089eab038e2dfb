"""Login churn and password guessing against a real auth service, for the hostile tests.

    python -m netlab.churn churn HOST:PORT CA USER PASSWORD_FILE CYCLES CONCURRENCY
    python -m netlab.churn guess HOST:PORT CA USER ATTEMPTS
    python -m netlab.churn abuse HOST:PORT CA USER OTHER_CA

`churn` logs in and out CYCLES times (CONCURRENCY at once); `guess` tries
ATTEMPTS wrong passwords one after another, as a brute-force attacker would
(USER may be a comma-separated list, taken in turn: a password spray);
`abuse` sends malformed and oversized requests, and tries a server certificate
from another CA and plain TCP. Each prints one JSON line: how many calls ended
how (gRPC status names), and how long they took.
"""

import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from pushgate_api import auth_pb2, auth_pb2_grpc


def _stub(target: str, ca_path: str) -> tuple[grpc.Channel, auth_pb2_grpc.AuthStub]:
    with open(ca_path, "rb") as handle:
        credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
    channel = grpc.secure_channel(target, credentials)
    return channel, auth_pb2_grpc.AuthStub(channel)


def _code(call) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def churn(target: str, ca_path: str, user: str, password: str, cycles: int, workers: int):
    channel, stub = _stub(target, ca_path)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    def cycle(_: int) -> None:
        started = time.monotonic()
        try:
            login = stub.Login(auth_pb2.LoginRequest(username=user, password=password), timeout=60)
            stub.Logout(auth_pb2.LogoutRequest(session_token=login.session_token), timeout=60)
            outcomes["OK"] += 1
        except grpc.RpcError as error:
            outcomes[error.code().name] += 1
        latencies.append(time.monotonic() - started)

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(cycle, range(cycles)))
    elapsed = time.monotonic() - started
    channel.close()
    latencies.sort()
    return {
        "cycles": cycles,
        "outcomes": dict(outcomes),
        "seconds": round(elapsed, 2),
        "per_second": round(cycles / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000),
    }


def guess(target: str, ca_path: str, user: str, attempts: int):
    channel, stub = _stub(target, ca_path)
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    users = user.split(",")
    for n in range(attempts):
        request = auth_pb2.LoginRequest(username=users[n % len(users)], password=f"guess-{n}")
        outcomes[_code(lambda r=request: stub.Login(r, timeout=60))] += 1
    elapsed = time.monotonic() - started
    channel.close()
    return {"attempts": attempts, "outcomes": dict(outcomes), "seconds": round(elapsed, 2)}


def abuse(target: str, ca_path: str, user: str, other_ca_path: str):
    """What each kind of bad request gets: a gRPC status name."""
    channel, stub = _stub(target, ca_path)
    raw = channel.unary_unary(
        "/pushgate.auth.v1.Auth/Login",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    requests = {
        "empty_name": auth_pb2.LoginRequest(username="", password="x"),
        "long_name": auth_pb2.LoginRequest(username="a" * 300, password="x"),
        "nul_in_name": auth_pb2.LoginRequest(username=user + "\x00", password="x"),
        "empty_password": auth_pb2.LoginRequest(username=user, password=""),
        "long_password": auth_pb2.LoginRequest(username=user, password="p" * 2000),
    }
    outcomes = {k: _code(lambda r=r: stub.Login(r, timeout=30)) for k, r in requests.items()}
    # Field 1 (username) as bytes that are not UTF-8; then 1 MiB where 64 KiB is the limit.
    outcomes["not_utf8"] = _code(lambda: raw(b"\x0a\x02\xff\xfe\x12\x01x", timeout=30))
    outcomes["oversized"] = _code(lambda: raw(b"\x0a\x80\x80\x40" + bytes(1 << 20), timeout=30))
    outcomes["garbage"] = _code(lambda: raw(b"\xff" * 64, timeout=30))
    channel.close()
    request = auth_pb2.LoginRequest(username=user, password="x")
    stranger, stub = _stub(target, other_ca_path)
    outcomes["other_ca"] = _code(lambda: stub.Login(request, timeout=10))
    stranger.close()
    plain = grpc.insecure_channel(target)
    outcomes["plaintext"] = _code(lambda: auth_pb2_grpc.AuthStub(plain).Login(request, timeout=10))
    plain.close()
    return outcomes


def main(argv: list[str]) -> int:
    command, target, ca_path, user, *rest = argv
    if command == "churn":
        with open(rest[0]) as handle:
            password = handle.readline().rstrip("\n")
        result = churn(target, ca_path, user, password, int(rest[1]), int(rest[2]))
    elif command == "guess":
        result = guess(target, ca_path, user, int(rest[0]))
    elif command == "abuse":
        result = abuse(target, ca_path, user, rest[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
