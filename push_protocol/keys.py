"""One generation of session keys at one end of the tunnel.

wireguard-go's keypair.go is the model: a session holds previous, current and
next keypairs across a rekey. A `Keypair` owns the send key with its counter
(which never repeats) and the receive key with its replay window, and enforces
the limits of constants.py.
"""

from dataclasses import dataclass
from enum import StrEnum

from . import codec
from .aead import AEAD, CipherSuite, check_key, new_aead
from .ciphercache import DEFAULT_CIPHER_CACHE, CipherCache
from .constants import (
    COUNTER_FLOOR_PER_SECOND,
    KEY_EPOCH_MODULUS,
    MAX_COUNTER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_SECONDS,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_SECONDS,
)
from .drops import KeyExpired, UsageError
from .replay import ReplayWindow


class Role(StrEnum):
    """Which end we are: decides which of the two keys is ours to send with."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """One generation of keys as minted by the auth service."""

    epoch: int
    client_to_server: bytes
    server_to_client: bytes
    created_at: float  # seconds, on the holder's clock

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < KEY_EPOCH_MODULUS:
            raise UsageError(f"key epoch {self.epoch} does not fit in 16 bits")
        if self.client_to_server == self.server_to_client:
            raise UsageError("the two directions must have different keys")

    def __repr__(self) -> str:  # keys never reach a log line
        return f"KeyMaterial(epoch={self.epoch}, created_at={self.created_at})"


def initial_send_counter(created_at: float, now: float) -> int:
    """First counter for keys installed at `now` (see COUNTER_FLOOR_PER_SECOND)."""
    return max(0, int((now - created_at) * COUNTER_FLOOR_PER_SECOND))


class Keypair:
    """Keys of one epoch. The AEAD contexts are built on first use and held only
    while `cache` keeps them (ciphercache.py): an idle keypair is its raw keys."""

    __slots__ = (
        "_cache",
        "_contexts",
        "_next_counter",
        "_recv_key",
        "_send_key",
        "_suite",
        "created_at",
        "epoch",
        "received",
        "replay",
        "sent",
    )

    def __init__(
        self,
        material: KeyMaterial,
        suite: CipherSuite,
        role: Role,
        now: float,
        cache: CipherCache = DEFAULT_CIPHER_CACHE,
    ) -> None:
        if role is Role.CLIENT:
            send_key, recv_key = material.client_to_server, material.server_to_client
        else:
            send_key, recv_key = material.server_to_client, material.client_to_server
        check_key(suite, send_key)
        check_key(suite, recv_key)
        self.epoch = material.epoch
        self.created_at = material.created_at
        self._suite = suite
        self._send_key = send_key
        self._recv_key = recv_key
        self._cache = cache
        self._contexts: tuple[AEAD, AEAD] | None = None  # (send, receive) while cached
        self._next_counter = initial_send_counter(material.created_at, now)
        self.sent = 0
        self.received = 0
        self.replay = ReplayWindow()

    def _build_contexts(self) -> tuple[AEAD, AEAD]:
        """Called by the cache only."""
        contexts = (new_aead(self._suite, self._send_key), new_aead(self._suite, self._recv_key))
        self._contexts = contexts
        return contexts

    def _drop_contexts(self) -> None:
        """Called by the cache only."""
        self._contexts = None

    def release(self) -> None:
        """This keypair will not be used again: free its contexts now."""
        self._cache.release(self)

    def age(self, now: float) -> float:
        return now - self.created_at

    def needs_rekey(self, now: float) -> bool:
        return self.sent >= REKEY_AFTER_MESSAGES or self.age(now) >= REKEY_AFTER_SECONDS

    def _check_limits(self, count: int, now: float) -> None:
        if count >= REJECT_AFTER_MESSAGES:
            raise KeyExpired(f"key epoch {self.epoch} used for {count} messages")
        if self.age(now) >= REJECT_AFTER_SECONDS:
            raise KeyExpired(f"key epoch {self.epoch} is {self.age(now):.0f} s old")

    def seal(
        self, packet_type: codec.PacketType, session_id: int, payload: bytes, now: float
    ) -> bytes:
        """Seal with the next counter; raises KeyExpired past the hard limits."""
        self._check_limits(self.sent, now)
        counter = self._next_counter
        if counter > MAX_COUNTER:
            raise KeyExpired(f"key epoch {self.epoch} ran out of counters")
        contexts = self._contexts or self._cache.build(self)  # before counting this packet
        self._next_counter = counter + 1
        self.sent += 1
        return codec.seal(contexts[0], packet_type, self.epoch, session_id, counter, payload)

    def may_seal(self, count: int, now: float) -> bool:
        """True if `count` more packets can be sealed now within the hard limits."""
        return (
            self.sent + count <= REJECT_AFTER_MESSAGES
            and now - self.created_at < REJECT_AFTER_SECONDS
            and self._next_counter + count - 1 <= MAX_COUNTER
        )

    def seal_many(self, session_id: int, payloads: list[bytes], now: float) -> list[bytes]:
        """`seal` of a DATA packet for each payload; the batch must fit `may_seal`."""
        if not self.may_seal(len(payloads), now):
            raise KeyExpired(f"key epoch {self.epoch} cannot seal {len(payloads)} more packets")
        counter = self._next_counter
        contexts = self._contexts or self._cache.build(self)  # before counting the batch
        self._next_counter = counter + len(payloads)
        self.sent += len(payloads)
        return codec.seal_many(contexts[0], self.epoch, session_id, counter, payloads)

    def may_open(self, count: int, now: float) -> bool:
        """True if `count` more packets can be opened now without reaching a hard
        limit, so a batch needs no check per packet."""
        return (
            self.received + count < REJECT_AFTER_MESSAGES
            and now - self.created_at < REJECT_AFTER_SECONDS
        )

    def receive_context(self) -> AEAD:
        return (self._contexts or self._cache.build(self))[1]

    def open(self, datagram: bytes, counter: int, now: float) -> bytes:
        """Authenticate, decrypt and record `counter`; raises PacketRejected."""
        if self.received >= REJECT_AFTER_MESSAGES or now - self.created_at >= REJECT_AFTER_SECONDS:
            self._check_limits(self.received, now)  # raises, saying which limit
        replay = self.replay
        if counter <= replay.highest:
            replay.check(counter)  # cheap rejection before the crypto
        payload = codec.open_payload(self.receive_context(), datagram, counter)
        replay.update(counter)
        self.received += 1
        return payload
