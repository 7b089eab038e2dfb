"""A TCP or UDP transfer with a checksum, for the demo and end-to-end tests.

    python -m netlab.transfer serve-tcp PORT SIZE_BYTES SEED   # sends SIZE bytes to each client
    python -m netlab.transfer fetch-tcp HOST PORT              # prints "<bytes> <sha256> <seconds>"
    python -m netlab.transfer expected SIZE_BYTES SEED         # prints the sha256 to expect
    python -m netlab.transfer udp-echo PORT                    # echoes datagrams
    python -m netlab.transfer udp-probe HOST PORT COUNT SIZE   # prints how many came back

The payload is a deterministic pseudo-random stream, so both ends know the hash.
"""

import hashlib
import random
import socket
import sys
import time

CHUNK = 1 << 16


def stream(size: int, seed: int):
    generator = random.Random(seed)
    remaining = size
    while remaining:
        n = min(CHUNK, remaining)
        yield generator.randbytes(n)
        remaining -= n


def expected_sha256(size: int, seed: int) -> str:
    digest = hashlib.sha256()
    for chunk in stream(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


def serve_tcp(port: int, size: int, seed: int) -> None:
    with socket.create_server(("0.0.0.0", port), reuse_port=True) as server:
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                for chunk in stream(size, seed):
                    conn.sendall(chunk)


def fetch_tcp(host: str, port: int) -> tuple[int, str, float]:
    digest = hashlib.sha256()
    total = 0
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as conn:
        while data := conn.recv(CHUNK):
            digest.update(data)
            total += len(data)
    return total, digest.hexdigest(), time.monotonic() - start


def udp_echo(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        print("listening", flush=True)
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(data, peer)


def udp_probe(host: str, port: int, count: int, size: int) -> int:
    """Send `count` numbered datagrams, one at a time; return how many came back intact."""
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for number in range(count):
            payload = number.to_bytes(4, "big") * (size // 4)
            sock.sendto(payload, (host, port))
            try:
                if sock.recv(65536) == payload:
                    answered += 1
            except TimeoutError:
                pass
    return answered


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "serve-tcp":
        serve_tcp(int(args[0]), int(args[1]), int(args[2]))
    elif command == "fetch-tcp":
        total, sha, seconds = fetch_tcp(args[0], int(args[1]))
        print(total, sha, f"{seconds:.3f}")
    elif command == "udp-echo":
        udp_echo(int(args[0]))
    elif command == "udp-probe":
        print(udp_probe(args[0], int(args[1]), int(args[2]), int(args[3])))
    elif command == "expected":
        print(expected_sha256(int(args[0]), int(args[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
