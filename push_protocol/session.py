"""A tunnel session at one end: keys across rekeys, seal/open, liveness, timers.

Shared by the client (role CLIENT) and the dataplane (role SERVER). Like
aioquic's QuicConnection it never touches a socket or a clock: the owner passes
`now` in, feeds received datagrams to `open`, sends what `seal` returns, and
calls `handle_timer(now)` at `get_timer()`.

Rekey, as both ends see it: new keys arrive from the auth service and are
installed as *next*. Packets under next are accepted at once; the first one
proves the peer has the keys, so next is promoted to current and used for
sending; current becomes *previous*, still accepted for a grace period. If no
proof arrives, next is promoted after NEXT_KEY_PROMOTE_SECONDS anyway.
"""

from .aead import CipherSuite
from .ciphercache import DEFAULT_CIPHER_CACHE, CipherCache
from .codec import Header, PacketType, parse_header
from .constants import (
    DEFAULT_KEEPALIVE_SECONDS,
    KEY_EPOCH_MODULUS,
    NEXT_KEY_PROMOTE_SECONDS,
    PREVIOUS_KEY_GRACE_SECONDS,
    REKEY_REQUEST_INTERVAL_SECONDS,
)
from .drops import (
    DropReason,
    PacketRejected,
    SessionExpired,
    UnknownKey,
    UnknownSession,
    UsageError,
)
from .keys import KeyMaterial, Keypair, Role
from .lifecycle import LIVE_STATES, Lifecycle, SessionEnd, SessionEvent, SessionState


class TunnelSession:
    def __init__(
        self,
        session_id: int,
        suite: CipherSuite,
        role: Role,
        keys: KeyMaterial,
        *,
        keepalive_interval: float = DEFAULT_KEEPALIVE_SECONDS,
        cipher_cache: CipherCache = DEFAULT_CIPHER_CACHE,
        counter_range: int = 0,
        relearned: bool = False,
    ) -> None:
        if not 0 <= session_id < 1 << 32:
            raise UsageError(f"session id {session_id} does not fit in 32 bits")
        self.session_id = session_id
        self.suite = suite
        self.role = role
        self.keepalive_interval = keepalive_interval
        self._lifecycle = Lifecycle()
        self.cipher_cache = cipher_cache
        self.current = self._keypair(keys, counter_range, relearned)
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self._previous_until = 0.0
        self._promote_next_at = 0.0
        # True after an `open`/`open_many` that authenticated a packet whose counter is
        # above every one authenticated before under its key (current or next): only
        # such a packet may move the session's endpoint (roaming). A delayed or
        # reordered packet, even an authentic one, moves nothing.
        self.advanced = False
        # Client: the key epoch the dataplane asked us to replace (REKEY_REQUIRED).
        self._rekey_requested_epoch: int | None = None
        # Dataplane: (to where, when) we last asked the client to rekey.
        self._rekey_request_sent: tuple[object, float] | None = None
        # Liveness moves only on authenticated packets.
        self.last_received_at: float | None = None
        self.last_sent_at: float | None = None
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._lifecycle.state

    @property
    def is_live(self) -> bool:
        """True while the session accepts and sends packets."""
        return self._lifecycle.is_live

    def install_next(
        self, keys: KeyMaterial, now: float, *, counter_range: int = 0, relearned: bool = False
    ) -> None:
        """New keys from a rekey: accepted at once, sent with once confirmed, or at
        once if the peer asked for them (it refuses the current keys anyway). Keys
        still pending from an earlier rekey are promoted first."""
        if keys.epoch == self.current.epoch:
            raise UsageError(f"key epoch {keys.epoch} is already current")
        if self.next is not None:
            # A rekey while one is pending: the peer may already send with the pending
            # keys (it promoted them on its timer), so they become current here too,
            # with the old current accepted for the grace period, instead of being
            # dropped and every packet under them with them.
            self._promote_next(now)
        self._lifecycle.handle(SessionEvent.ROTATE)
        self.next = self._keypair(keys, counter_range, relearned)
        asked = self._rekey_requested_epoch == self.current.epoch
        self._promote_next_at = now if asked else now + NEXT_KEY_PROMOTE_SECONDS

    def restore_previous(self, keys: KeyMaterial, until: float, *, counter_range: int) -> None:
        """Re-learn keys replaced at most a grace period ago (a dataplane after a
        restart), accepted until `until` (as the auth service recorded it), and as
        re-learned keys: authenticated, never delivered."""
        if keys.epoch == self.current.epoch:
            raise UsageError(f"key epoch {keys.epoch} is current, not previous")
        if self.previous is not None:
            self.previous.release()
        self.previous = self._keypair(keys, counter_range, relearned=True)
        self._previous_until = until

    def _keypair(self, keys: KeyMaterial, counter_range: int, relearned: bool) -> Keypair:
        return Keypair(
            keys,
            self.suite,
            self.role,
            self.cipher_cache,
            counter_range=counter_range,
            relearned=relearned,
        )

    def end(self, why: SessionEnd) -> None:
        """The session is over (its lifetime ran out, or it was closed): it refuses
        every packet from now on and its keys are released. A session ends once;
        ending it again raises IllegalTransition."""
        if self._lifecycle.is_live:
            event = SessionEvent.EXPIRE if why is SessionEnd.EXPIRED else SessionEvent.CLOSE
            self._lifecycle.handle(event)
        self._lifecycle.handle(SessionEvent.REMOVE)
        for keypair in (self.previous, self.current, self.next):
            if keypair is not None:
                keypair.release()

    def _promote_next(self, now: float) -> None:
        assert self.next is not None
        if self.previous is not None:
            self.previous.release()
        self.previous, self.current, self.next = self.current, self.next, None
        self._previous_until = now + PREVIOUS_KEY_GRACE_SECONDS
        self._lifecycle.handle(SessionEvent.REKEY_DONE)

    # -- timers ------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called, or None."""
        deadlines = []
        if self.next is not None:
            deadlines.append(self._promote_next_at)
        if self.previous is not None:
            deadlines.append(self._previous_until)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        if self.next is not None and now >= self._promote_next_at:
            self._promote_next(now)
        if self.previous is not None and now >= self._previous_until:
            self.previous.release()
            self.previous = None

    def needs_rekey(self, now: float) -> bool:
        """True when current keys are due for replacement, or the dataplane asked
        for new ones, and none are pending."""
        return self.rekey_requested or (self.next is None and self.current.needs_rekey(now))

    @property
    def rekey_requested(self) -> bool:
        """(Client) The dataplane asked for new keys and none are pending yet."""
        return self.next is None and self._rekey_requested_epoch == self.current.epoch

    def rekey_request(self, epoch: int, source: object, now: float) -> bytes | None:
        """(Dataplane) The REKEY_REQUIRED datagram answering a packet from `source`
        refused under re-learned keys of `epoch`, sealed with the same keys; None if
        the last one went to the same source less than REKEY_REQUEST_INTERVAL_SECONDS
        ago, or the keys can't seal. Limited per source, so that replays from
        elsewhere cannot use up the client's answers; each authentic packet is
        answered at most once (a repeat is a replay), so a replayer gets no more
        packets than it sends, and no bigger ones."""
        last = self._rekey_request_sent
        if (
            last is not None
            and last[0] == source
            and now - last[1] < REKEY_REQUEST_INTERVAL_SECONDS
        ):
            return None
        try:
            keypair = self._keypair_for(epoch, now)
            datagram = keypair.seal(PacketType.REKEY_REQUIRED, self.session_id, b"", now)
        except PacketRejected:
            return None
        self._rekey_request_sent = (source, now)
        return datagram

    def keepalive_due(self, now: float) -> bool:
        last = self.last_sent_at
        return last is None or now - last >= self.keepalive_interval

    # -- packets -----------------------------------------------------------

    def seal(self, payload: bytes, now: float) -> bytes:
        """The datagram carrying one inner packet. Raises PacketRejected if it can't go."""
        return self._seal(PacketType.DATA, payload, now)

    def seal_many(self, payloads: list[bytes], now: float) -> tuple[list[bytes], list]:
        """`seal` for each payload in turn: (the datagrams, in order; the drop
        reason of each payload refused). A batch that the current key can carry
        whole is sealed in one step (tests/test_session_batch.py shows it gives
        the same datagrams); otherwise packet by packet."""
        current = self.current
        if not payloads:
            return [], []
        if (
            self._lifecycle.state in LIVE_STATES
            and (self.next is None or now < self._promote_next_at)
            and current.may_seal(len(payloads), now)
        ):
            datagrams = current.seal_many(self.session_id, payloads, now)
            self.last_sent_at = now
            self.tx_packets += len(payloads)
            self.tx_bytes += sum(map(len, payloads))
            return datagrams, []
        datagrams, rejected = [], []
        for payload in payloads:
            try:
                datagrams.append(self.seal(payload, now))
            except PacketRejected as refused:
                rejected.append(refused.reason)
        return datagrams, rejected

    def seal_keepalive(self, now: float) -> bytes:
        return self._seal(PacketType.KEEPALIVE, b"", now)

    def _seal(self, packet_type: PacketType, payload: bytes, now: float) -> bytes:
        if not self._lifecycle.is_live:
            raise SessionExpired(f"session {self.session_id} is {self.state.value}")
        if self.next is not None and now >= self._promote_next_at:
            self._promote_next(now)
        datagram = self.current.seal(packet_type, self.session_id, payload, now)
        self.last_sent_at = now
        self.tx_packets += 1
        self.tx_bytes += len(payload)
        return datagram

    def open(self, datagram: bytes, now: float, header: Header | None = None) -> bytes:
        """Authenticate a received datagram and return its payload (b"" for a keepalive).

        `header` is `parse_header(datagram)` if the caller already has it.
        Raises a PacketRejected subclass; on any error no state changes.
        """
        if header is None:
            header = parse_header(datagram)
        packet_type, epoch, session_id, counter = header
        self.advanced = False
        if session_id != self.session_id:
            raise UnknownSession(f"session {session_id} is not {self.session_id}")
        if self._lifecycle.state not in LIVE_STATES:
            raise SessionExpired(f"session {self.session_id} is {self.state.value}")
        current = self.current
        if epoch == current.epoch:  # nearly always
            above = counter > current.replay.highest
            payload = current.open(datagram, counter, now)
        else:
            keypair = self._keypair_for(epoch, now)
            above = counter > keypair.replay.highest and keypair is not self.previous
            payload = keypair.open(datagram, counter, now)
            if keypair is self.next:
                self._promote_next(now)
        self.advanced = above
        if packet_type is PacketType.REKEY_REQUIRED:
            self._rekey_requested_epoch = epoch
        self.last_received_at = now
        self.rx_packets += 1
        self.rx_bytes += len(payload)
        return payload

    def open_many(self, datagrams: list, headers: list, now: float) -> list:
        """`open` for each of `datagrams` (with its `headers`) in turn: each one's
        payload, or the DropReason `open` rejects it for.

        One GRO receive brings dozens of datagrams of one session under one key,
        so what `open` checks per packet is checked once for the batch where it
        can be (the session is live, the current key is within its limits for
        all of them); anything else (another key epoch, a limit within reach)
        goes through `open` itself. tests/test_session_batch.py shows both give
        the same results and leave the same state.
        """
        current = self.current
        if (
            self._lifecycle.state not in LIVE_STATES
            or current.relearned
            or not current.may_open(len(datagrams), now)
        ):
            return self._open_each(datagrams, headers, now)
        epoch, session_id, replay = current.epoch, self.session_id, current.replay
        open_ = current.receive_context().open
        results = []
        opened = opened_bytes = 0
        advanced, roams = False, True
        for datagram, header in zip(datagrams, headers, strict=True):
            packet_type, key_epoch, header_session, counter = header
            if key_epoch != epoch or header_session != session_id:
                results.append(self._open_or_reason(datagram, header, now))
                advanced = advanced or self.advanced
                # next keys promoted: the batch's key is previous now and moves nothing
                roams = roams and self.current is current
                continue
            if counter <= replay.highest:  # cheap rejection before the crypto
                reason = replay.rejects(counter)
                if reason is not None:
                    results.append(reason)
                    continue
            payload = open_(datagram, counter)
            if payload is None:
                results.append(DropReason.BAD_TAG)
                continue
            if roams and counter > replay.highest:
                advanced = True
            replay.update(counter)
            if not payload and packet_type is PacketType.REKEY_REQUIRED:
                self._rekey_requested_epoch = key_epoch
            opened += 1
            opened_bytes += len(payload)
            results.append(payload)
        if opened:
            current.received += opened
            self.last_received_at = now
            self.rx_packets += opened
            self.rx_bytes += opened_bytes
        self.advanced = advanced
        return results

    def _open_each(self, datagrams: list, headers: list, now: float) -> list:
        """`open` of each datagram in turn; `advanced` if any of them advanced."""
        results = []
        advanced = False
        for datagram, header in zip(datagrams, headers, strict=True):
            results.append(self._open_or_reason(datagram, header, now))
            advanced = advanced or self.advanced
        self.advanced = advanced
        return results

    def _open_or_reason(self, datagram: bytes, header: Header, now: float):
        try:
            return self.open(datagram, now, header)
        except PacketRejected as rejected:
            return rejected.reason

    def _keypair_for(self, epoch: int, now: float) -> Keypair:
        if epoch == self.current.epoch:
            return self.current
        if self.next is not None and epoch == self.next.epoch:
            return self.next
        previous = self.previous
        if previous is not None and epoch == previous.epoch and now < self._previous_until:
            return previous
        raise UnknownKey(f"session {self.session_id} has no key epoch {epoch}")


def next_epoch(epoch: int) -> int:
    """The key epoch that follows `epoch` (the header field wraps at 16 bits)."""
    return (epoch + 1) % KEY_EPOCH_MODULUS
