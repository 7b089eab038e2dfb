"""Login churn and password guessing against a real auth service, for the hostile tests.

    python -m netlab.churn churn HOST:PORT CA USER PASSWORD_FILE CYCLES CONCURRENCY
    python -m netlab.churn guess HOST:PORT CA USER ATTEMPTS

`churn` logs in and out CYCLES times (CONCURRENCY at once); `guess` tries
ATTEMPTS wrong passwords one after another, as a brute-force attacker would.
Both print one JSON line: how many calls ended how, and how long they took.
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
    for n in range(attempts):
        request = auth_pb2.LoginRequest(username=user, password=f"guess-{n}")
        outcomes[_code(lambda r=request: stub.Login(r, timeout=60))] += 1
    elapsed = time.monotonic() - started
    channel.close()
    return {"attempts": attempts, "outcomes": dict(outcomes), "seconds": round(elapsed, 2)}


def main(argv: list[str]) -> int:
    command, target, ca_path, user, *rest = argv
    if command == "churn":
        with open(rest[0]) as handle:
            password = handle.readline().rstrip("\n")
        result = churn(target, ca_path, user, password, int(rest[1]), int(rest[2]))
    elif command == "guess":
        result = guess(target, ca_path, user, int(rest[0]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
