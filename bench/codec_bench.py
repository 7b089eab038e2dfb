"""Seal and open cost per packet through the shared wire core.

Prints one line per (cipher, size): microseconds per seal and per open, measured
through TunnelSession (header, counter, limits, replay window and AEAD), plus
the bare AEAD call for comparison. Best of 5 repeats; noise on this 2-core
machine only makes numbers worse, so the minimum is the fair figure.
"""

import os
import sys
import time

from push_protocol.aead import CipherSuite, new_aead, nonce_for
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession

ROUNDS = 20000
REPEATS = 5


def _best(fn) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / ROUNDS * 1e6


def bench(suite: CipherSuite, size: int) -> str:
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), 0.0)
    sender = TunnelSession(1, suite, Role.CLIENT, keys)
    receiver = TunnelSession(1, suite, Role.SERVER, keys)
    payload = os.urandom(size)
    datagrams: list[bytes] = []

    def seal_all() -> None:
        datagrams.clear()
        seal = sender.seal
        for _ in range(ROUNDS):
            datagrams.append(seal(payload, 1.0))

    def open_all() -> None:
        open_ = receiver.open
        for datagram in datagrams:
            open_(datagram, 1.0)

    seal_us = float("inf")
    open_us = float("inf")
    for _ in range(REPEATS):
        seal_us = min(seal_us, _best_once(seal_all))
        open_us = min(open_us, _best_once(open_all))

    aead = new_aead(suite, keys.client_to_server)
    nonce, aad = nonce_for(1), bytes(16)
    bare_us = _best(lambda: [aead.encrypt(nonce, payload, aad) for _ in range(ROUNDS)])
    return (
        f"{suite.value:<18} {size:>5} B  seal {seal_us:6.2f} us  open {open_us:6.2f} us"
        f"  (bare AEAD encrypt {bare_us:5.2f} us)"
    )


def _best_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / ROUNDS * 1e6


def main() -> int:
    print(f"codec: per packet through TunnelSession, best of {REPEATS} x {ROUNDS}")
    for suite in CipherSuite:
        for size in (1400, 64):
            print(bench(suite, size), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
