"""How many forged tags one source may make the dataplane check: a token bucket per
source address (IPv6 by /64), bounded in size. Pure: time is an argument.

A datagram with a live session id and a forged tag costs the receive loop an
AEAD open (about 6 us) before it is known to be junk, so a source that keeps
sending them could take the loop for itself. Each failed authentication takes a
token from its source's bucket; while a source has no token left, its datagrams
for a session are dropped as `source_over_budget` before the AEAD open
(docs/protocol.md, step 6a). Valid packets take nothing, and a session's
datagrams from its own endpoint (the source of its newest authenticated packet)
are never held back, so an attacker elsewhere cannot stop a client's traffic.
"""

import ipaddress

from push_protocol.drops import UsageError

# The numbers, and why (the one place they are set):
# A client's own packets fail authentication only when corrupted on the way,
# which UDP's checksum makes rare; 100 a second per source is far above that,
# and costs the loop at most 100 x 6 us = 0.6 ms a second per source.
FORGED_TAGS_PER_SECOND = 100.0
# A burst covers one receive call's worth (a GRO batch holds up to 64 datagrams)
# of damaged packets without holding back the source's next ones.
FORGED_TAG_BURST = 200.0
# Sources remembered at once (about 100 bytes each). A source that has refilled its
# bucket is forgotten first; past the bound the longest-unseen quarter is
# forgotten, which lets an attacker with more addresses than this start afresh:
# the budget bounds the cost of one source, not of a botnet.
MAX_SOURCES = 16384


def source_key(host: str) -> str:
    """The budget's key for a source address: the address for IPv4 (also when mapped
    into IPv6), the /64 for IPv6, where one host usually holds a whole /64."""
    if ":" not in host:
        return host
    address = ipaddress.IPv6Address(host.partition("%")[0])
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(address.packed[:8] + bytes(8))}/64"


class SourceBudget:
    """Token buckets of failed authentications, by source key."""

    def __init__(
        self,
        rate: float = FORGED_TAGS_PER_SECOND,
        burst: float = FORGED_TAG_BURST,
        capacity: int = MAX_SOURCES,
    ) -> None:
        if rate <= 0 or burst < 1 or capacity < 1:
            raise UsageError(f"no budget with rate {rate}, burst {burst}, capacity {capacity}")
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        # key -> [tokens, when they were counted]; oldest charge first
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, bucket: list[float], now: float) -> float:
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)

    def allows(self, key: str, now: float) -> bool:
        """Whether `key` may have its datagrams authenticated now (it has a token)."""
        bucket = self._buckets.get(key)
        return bucket is None or self._tokens(bucket, now) >= 1

    def charge(self, key: str, failures: int, now: float) -> None:
        """Take a token for each of `failures` failed authentications from `key`. A
        batch allowed with one token left may take more: the source then waits longer."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            if len(self._buckets) >= self.capacity:
                self._prune(now)
            tokens = self.burst
        else:
            tokens = self._tokens(bucket, now)
        self._buckets[key] = [tokens - failures, now]  # (re)inserted last: newest

    def _prune(self, now: float) -> None:
        """Forget sources whose bucket is full again (as good as unknown); if that is
        not a quarter of them, the longest-unseen too, so a full table costs one
        scan per capacity/4 new sources."""
        full = [
            key for key, bucket in self._buckets.items() if self._tokens(bucket, now) >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        target = self.capacity - max(1, self.capacity // 4)
        while len(self._buckets) > target:
            del self._buckets[next(iter(self._buckets))]
