"""One generation of session keys at one end of the tunnel.

wireguard-go's keypair.go is the model: a session holds previous, current and
next keypairs across a rekey. A `Keypair` owns the send key with its counter
(which never repeats) and the receive key with its replay window, and enforces
the limits of constants.py.
"""

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import codec
from .aead import CipherSuite, check_key
from .ciphercache import DEFAULT_CIPHER_CACHE, CipherCache
from .constants import (
    KEY_EPOCH_MODULUS,
    MAX_COUNTER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_SECONDS,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_SECONDS,
    SEND_COUNTER_RANGE,
    SEND_COUNTER_RANGES,
)
from .drops import KeyExpired, RekeyRequired, UsageError
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


GATEWAY_KEY_LABEL = b"pushgate gateway key v1\x00"


def gateway_key(key: bytes, gateway_id: str) -> bytes:
    """`key` as gateway `gateway_id` uses it on the wire: HKDF-SHA256 with the
    gateway's id (docs/protocol.md, "Per-gateway keys"). Two gateways of a cluster
    never hold the same wire key, so no (key, nonce) pair is used by two dataplanes
    and a packet sent to one is no use at another."""
    info = GATEWAY_KEY_LABEL + gateway_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=len(key), salt=None, info=info).derive(key)


def for_gateway(keys: KeyMaterial, gateway_id: str) -> KeyMaterial:
    """The keys of one epoch as gateway `gateway_id` uses them; a lone gateway (no
    id) uses them as minted."""
    if not gateway_id:
        return keys
    return dataclasses.replace(
        keys,
        client_to_server=gateway_key(keys.client_to_server, gateway_id),
        server_to_client=gateway_key(keys.server_to_client, gateway_id),
    )


def first_send_counter(counter_range: int) -> int:
    """The first send counter of a keypair given range `counter_range` (constants.py,
    SEND_COUNTER_RANGE: the client uses range 0, the dataplane leased ones)."""
    if not 0 <= counter_range < SEND_COUNTER_RANGES:
        raise UsageError(f"send counter range {counter_range} does not exist")
    return counter_range * SEND_COUNTER_RANGE


class Keypair:
    """Keys of one epoch. The AEAD contexts are built on first use and held only
    while `cache` keeps them (ciphercache.py): an idle keypair is its raw keys.

    Its send counters are those of range `counter_range` (constants.py). A
    `relearned` keypair holds keys that an earlier incarnation of this process may
    have received with (the dataplane after a restart): its empty replay window
    cannot tell a replay from a new packet, so `open` authenticates and then
    refuses every packet (`RekeyRequired`); sending is safe (a new counter range).
    """

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
        "relearned",
        "replay",
        "sent",
    )

    def __init__(
        self,
        material: KeyMaterial,
        suite: CipherSuite,
        role: Role,
        cache: CipherCache = DEFAULT_CIPHER_CACHE,
        *,
        counter_range: int = 0,
        relearned: bool = False,
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
        # (send, receive) while cached
        self._contexts: tuple[codec.Cipher, codec.Cipher] | None = None
        self._next_counter = first_send_counter(counter_range)
        self.relearned = relearned
        self.sent = 0
        self.received = 0
        self.replay = ReplayWindow()

    def _build_contexts(self) -> tuple[codec.Cipher, codec.Cipher]:
        """Called by the cache only."""
        new_cipher, suite = codec.new_cipher, self._suite
        contexts = (new_cipher(suite, self._send_key), new_cipher(suite, self._recv_key))
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

    def receive_context(self) -> codec.Cipher:
        return (self._contexts or self._cache.build(self))[1]

    def open(self, datagram: bytes, counter: int, now: float) -> bytes:
        """Authenticate, decrypt and record `counter`; raises PacketRejected
        (RekeyRequired for an authentic packet under re-learned keys)."""
        if self.received >= REJECT_AFTER_MESSAGES or now - self.created_at >= REJECT_AFTER_SECONDS:
            self._check_limits(self.received, now)  # raises, saying which limit
        replay = self.replay
        if counter <= replay.highest:
            replay.check(counter)  # cheap rejection before the crypto
        payload = codec.open_payload(self.receive_context(), datagram, counter)
        replay.update(counter)  # a repeat of a refused packet is then a cheap `replay`
        self.received += 1
        if self.relearned:
            raise RekeyRequired(f"key epoch {self.epoch} was re-learned after a restart")
        return payload
