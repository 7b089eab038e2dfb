"""A bounded set of built AEAD contexts, for the keypairs that are in use.

A built AES-GCM or ChaCha20-Poly1305 context holds an OpenSSL context of a few
KiB; building one costs about a microsecond. A dataplane may hold 100,000
installed sessions of which few send at any moment, so a `Keypair` keeps only
its raw keys and asks this cache for its contexts: the first packet builds
them, and at most `capacity` keypairs hold built contexts at once.

Eviction is FIFO with a second chance (the CLOCK idea): the oldest entry is
evicted unless its keypair sealed or opened a packet since it was last looked
at, in which case it goes to the back. Looking costs nothing per packet (the
keypair's own `sent`/`received` counts are the "used" bit), and at most
SECOND_CHANCE_SCAN entries are looked at per build, so a peer that makes us
build contexts cannot make one build cost more than a few steps.

Sans-I/O and single-threaded, as the rest of the core; `builds` and
`evictions` are counted for the owner's metrics.
"""

from collections import OrderedDict
from typing import TYPE_CHECKING

from .codec import Cipher
from .drops import UsageError

if TYPE_CHECKING:
    from .keys import Keypair

DEFAULT_CAPACITY = 4096  # keypairs with built contexts (~5 KiB each): ~20 MiB at most
SECOND_CHANCE_SCAN = 8


class CipherCache:
    __slots__ = ("_entries", "builds", "capacity", "evictions")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise UsageError("a cipher cache holds at least one keypair")
        self.capacity = capacity
        # keypair -> its sent + received count when it was (re)queued, plus one at a build
        self._entries: OrderedDict[Keypair, int] = OrderedDict()
        self.builds = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, keypair: "Keypair") -> bool:
        return keypair in self._entries

    def build(self, keypair: "Keypair") -> tuple[Cipher, Cipher]:
        """Build `keypair`'s (send, receive) contexts, making room if needed."""
        if len(self._entries) >= self.capacity:
            self._evict_one()
        contexts = keypair._build_contexts()
        # the packet being sealed or opened now does not count as a later use
        self._entries[keypair] = keypair.sent + keypair.received + 1
        self.builds += 1
        return contexts

    def release(self, keypair: "Keypair") -> None:
        """Forget `keypair`'s contexts (its keys were replaced or its session removed)."""
        if self._entries.pop(keypair, None) is not None:
            keypair._drop_contexts()

    def _evict_one(self) -> None:
        entries = self._entries
        for _ in range(min(SECOND_CHANCE_SCAN, len(entries))):
            keypair, mark = entries.popitem(last=False)
            usage = keypair.sent + keypair.received
            if usage <= mark:  # not used since it was queued: evict it
                break
            entries[keypair] = usage  # used: to the back, with a new mark
        else:
            keypair, _ = entries.popitem(last=False)
        keypair._drop_contexts()
        self.evictions += 1


DEFAULT_CIPHER_CACHE = CipherCache()
