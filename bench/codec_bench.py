"""Seal and open cost per packet through the shared wire core.

Prints one line per (implementation, cipher, size): microseconds per seal and per
open, measured through TunnelSession (header, counter, limits, replay window and
AEAD), per packet of a `seal_many` batch of 44 (what the data paths call), and
the bare AEAD call of `cryptography` for comparison. Both implementations of the
packet cipher run, in one process (bench/implementations.py): the pure-Python
reference (`codec.PythonCipher`) and the compiled one (push_protocol/_codec.c)
where it was built. Best of 5 repeats; noise on this 2-core
machine only makes numbers worse, so the minimum is the fair figure.
"""

import os
import sys
import time

from implementations import NAMES, implementation, missing_note

from push_protocol.aead import CipherSuite, new_aead, nonce_for
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession

ROUNDS = 20000
REPEATS = 5
BATCH = 44  # packets per seal_many call, as one GSO send of a bulk stream


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

    batch = [payload] * BATCH
    batches = range(ROUNDS // BATCH)

    def seal_batches() -> None:
        seal_many = sender.seal_many
        for _ in batches:
            seal_many(batch, 1.0)

    seal_us = float("inf")
    open_us = float("inf")
    batch_us = float("inf")
    for _ in range(REPEATS):
        seal_us = min(seal_us, _best_once(seal_all))
        open_us = min(open_us, _best_once(open_all))
        batch_us = min(batch_us, _best_once(seal_batches) * ROUNDS / (len(batches) * BATCH))

    aead = new_aead(suite, keys.client_to_server)
    nonce, aad = nonce_for(1), bytes(16)
    bare_us = _best(lambda: [aead.encrypt(nonce, payload, aad) for _ in range(ROUNDS)])
    return (
        f"{suite.value:<18} {size:>5} B  seal {seal_us:6.2f} us  open {open_us:6.2f} us"
        f"  seal_many {batch_us:5.2f} us  (bare AEAD encrypt {bare_us:5.2f} us)"
    )


def _best_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / ROUNDS * 1e6


def main() -> int:
    print(f"codec: per packet through TunnelSession, best of {REPEATS} x {ROUNDS}")
    for name in NAMES:
        with implementation(name):
            for suite in CipherSuite:
                for size in (1400, 64):
                    print(f"{name:<12} {bench(suite, size)}", flush=True)
    note = missing_note()
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
