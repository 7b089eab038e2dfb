"""Internet noise for the hostile tests: random datagrams as fast as one process can send.

    python -m netlab.noise HOST PORT SECONDS SEED [--rate N]   # prints {"sent": N, ...}

Lengths are random in 0..65507 (half of them uniform over the whole range, half
uniform in 0..1500, where most real noise is); the bytes are random, except
that half of the datagrams start with version 1 and, of those, half with a
known type, so the deeper header checks see traffic too. The sender counts
every datagram under the drop reason docs/protocol.md says it must get: this
classifier is written from the document, not taken from the codec, so the test
compares the dataplane's counters against an independent oracle. A random
32-bit session id names a live session with odds of about 2^-30 per datagram;
the caller passes the live ids (`--live`) so even that case is classified.
"""

import argparse
import json
import os
import random
import socket
import struct
import sys
import time
from collections import Counter

MIN_LEN, MAX_LEN = 32, 65507  # header + tag; the largest IPv4 UDP payload
DATA, KEEPALIVE = 1, 2


def expected_reason(prefix: bytes, length: int, live: frozenset[int]) -> str:
    """The drop reason of a datagram that is not a valid packet (docs/protocol.md)."""
    if length < MIN_LEN:
        return "too_short"
    if length > MAX_LEN:
        return "too_long"
    if prefix[0] != 1:
        return "bad_version"
    if prefix[1] not in (DATA, KEEPALIVE):
        return "unknown_type"
    if (prefix[1] == KEEPALIVE) != (length == MIN_LEN):
        return "bad_length"
    (session_id,) = struct.unpack_from("!I", prefix, 4)
    return "live_session" if session_id in live else "unknown_session"


def blast(
    host: str, port: int, seconds: float, seed: int, live: frozenset[int], rate: float = 0
) -> dict:
    """Send for `seconds`, as fast as possible or at about `rate` datagrams/s."""
    rng = random.Random(seed)
    pool = memoryview(os.urandom(4 * MAX_LEN))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    target = (host, port)
    by_reason: Counter[str] = Counter()
    by_size = Counter()
    send_errors = 0
    end = time.monotonic() + seconds
    started = time.monotonic()
    while (now := time.monotonic()) < end:
        if rate:
            ahead = sum(by_reason.values()) / rate - (now - started)
            if ahead > 0:
                time.sleep(ahead)
        for _ in range(64):
            length = rng.randint(0, MAX_LEN) if rng.random() < 0.5 else rng.randint(0, 1500)
            offset = rng.randrange(0, len(pool) - MAX_LEN)
            body = pool[offset : offset + length]
            shape = rng.random()
            if length >= 2 and shape < 0.5:
                kind = rng.choice((DATA, KEEPALIVE)) if shape < 0.25 else body[1]
                head = bytes((1, kind))
                parts = [head, body[2:]]
            else:
                head = bytes(body[:2])
                parts = [body]
            prefix = head + bytes(body[2:8])
            try:
                sock.sendmsg(parts, [], 0, target)
            except OSError:
                send_errors += 1  # not on the wire: not counted as sent
                continue
            by_reason[expected_reason(prefix, length, live)] += 1
            by_size["small" if length <= 1500 else "large"] += 1
    elapsed = time.monotonic() - started
    sent = sum(by_reason.values())
    return {
        "sent": sent,
        "by_reason": dict(by_reason),
        "by_size": dict(by_size),
        "send_errors": send_errors,
        "seconds": round(elapsed, 3),
        "rate": round(sent / elapsed),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m netlab.noise")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("seed", type=int)
    parser.add_argument("--live", default="", help="comma-separated live session ids")
    parser.add_argument("--rate", type=float, default=0, help="datagrams/s (default: flat out)")
    args = parser.parse_args(argv)
    live = frozenset(int(x, 0) for x in args.live.split(",") if x)
    print(
        json.dumps(blast(args.host, args.port, args.seconds, args.seed, live, args.rate)),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
