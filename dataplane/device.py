"""The dataplane's I/O layer: one UDP receive loop, the server TUN, timers.

Thin on purpose: header checks, crypto, replay and lifecycle are in
push_protocol; addresses, ICMP and MSS in dataplane/inner.py. Nothing here ever
waits on a consumer: sockets and the TUN are non-blocking, a packet the kernel
won't take now goes into a bounded queue drained when the fd is writable, and
a full queue is a counted `queue_full` drop. Where the kernel filter is loaded
(socket_filter.py), malformed datagrams and unknown session ids never reach
this loop; the loop still checks every header and id itself, so it is correct
with or without the filter.
The socket has IP_RECVERR: a send the kernel cannot queue fails (ENOBUFS, a
counted `no_buffer_space` drop) instead of vanishing, and ICMP errors about
what we sent are read off its error queue and counted.
"""

import asyncio
import ipaddress
import logging
import os
import socket
import time

from push_protocol.codec import Header, read_header
from push_protocol.constants import MIN_DATAGRAM_LEN, PROTOCOL_VERSION
from push_protocol.drops import DropReason, PacketRejected
from push_protocol.lifecycle import SessionEnd
from pushgate_io import tso
from pushgate_io.rate_limited_log import RateLimitedLog
from pushgate_io.tun import TunDevice
from pushgate_io.udp import DATAGRAM_BUDGET, BatchSocket, ErrorReport

from . import inner, stall
from .fair_queue import FairQueue
from .metrics import BoundedQueue, Counters
from .mss import MssClamp
from .registry import Registry, SessionRecord
from .routing import TO_TUN, Action, Router, route_key
from .source_budget import SourceBudget, source_key

log = logging.getLogger("pushgate.dataplane")

BATCH = 64  # packets sealed per send callback
# Packets read from the TUN per loop iteration, shared by its queues' readers (at
# least BATCH each), while each reader's callback seals BATCH. With one queue it
# reads ahead, so that a backlog builds in the send queue, where each session has
# its turn, not in the kernel's one ring. With a queue per group of sessions
# (tun_steering.py) the kernel's rings already keep them apart, and reading no
# faster than sealing leaves a flood's excess in its own ring, dropped there for
# free, instead of read only to be dropped (docs/performance.md, "Fair send queue
# and a multi-queue TUN").
TUN_READ_BUDGET = 4 * BATCH
# Datagrams read from the push socket per callback: more than one callback serves
# (DATAGRAM_BUDGET), so that a backlog builds in the fair queue, not the socket.
READ_BUDGET = 4 * DATAGRAM_BUDGET
QUEUE_CAPACITY = 4096  # packets per output queue
LAG_INTERVAL = 0.1
HOUSEKEEPING_INTERVAL = 1.0
KEEPALIVE_REPLY_AFTER = 1.0  # answer a keepalive if we sent nothing for this long
# What is logged of a packet refused for its inner address: which one (0 source,
# 1 destination) and the line.
REFUSED_ADDRESS = {
    DropReason.SPOOFED_SOURCE: (0, "session %#010x sent a packet from %s, which it does not own"),
    DropReason.FORBIDDEN_DESTINATION: (
        1,
        "session %#010x sent a packet to %s, which clients may not reach",
    ),
    DropReason.POLICY_DENIED: (
        1,
        "session %#010x sent a packet to %s, which its access policy does not allow",
    ),
}


class Device:
    def __init__(
        self,
        *,
        registry: Registry,
        counters: Counters,
        sock: socket.socket,
        tun: TunDevice,
        mtu: int,
        tunnel_network,
        gateway_address,
        loop_lag_histogram,
        clock=time.time,
        queue_clock=time.monotonic,
        destinations=None,
    ) -> None:
        self.registry = registry
        self.counters = counters
        self.tun = tun
        self._tun_queues = tun.read_queues()
        self._tun_read_budget = max(BATCH, TUN_READ_BUDGET // len(self._tun_queues))
        self.mtu = mtu
        self.router = Router(registry, tunnel_network, gateway_address, mtu, destinations)
        self.gateway_packed = gateway_address.packed
        self.clock = clock
        self.queue_clock = queue_clock  # waiting times in the receive queue
        self.receive_queue = FairQueue("receive")
        self.send_queue = FairQueue("send")  # packets from the TUN, one flow per session
        # (session_id, reason, count) each queue dropped, not yet counted
        self._receive_drops: list = []
        self._send_drops: list = []
        # the next _serve or _serve_send, while a backlog waits in its queue
        self._serve_scheduled: asyncio.Handle | None = None
        self._send_scheduled: asyncio.Handle | None = None
        self.udp_queue = BoundedQueue("udp_send", QUEUE_CAPACITY)
        self.tun_queue = BoundedQueue("tun_write", QUEUE_CAPACITY)
        self._loop_lag = loop_lag_histogram
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bad_input_log = RateLimitedLog(log)
        self._udp_writer = self._tun_writer = False
        self._lag_due = 0.0
        self._tun_pending: list[bytes] = []  # decrypted packets for the TUN, this callback
        self.source_budget = SourceBudget()  # forged tags per source (source_budget.py)
        mss = MssClamp(mtu, counters)
        self._clamp = mss.clamp
        # what the TUN reads give: TCP packets in the partial checksum form with TSO
        # reads (pushgate_io/tso.py); each session gets the form its client takes
        self._clamp_tun = mss.clamp_partial if tun.partial_tcp else mss.clamp
        # several datagrams per receive / send call where the kernel can (GRO, GSO)
        self.udp = BatchSocket(
            sock,
            on_error=self._udp_error,
            on_reports=self._log_error_reports,
            screen=self._screen_batch,
            error_reports=counters.udp_error_reports,
        )

    @property
    def queues(self) -> list[BoundedQueue]:
        return [self.receive_queue, self.send_queue, self.udp_queue, self.tun_queue]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.udp.fileno(), self.on_udp_readable)
        for queue in self._tun_queues:  # each ready one is read once an iteration: in turn
            loop.add_reader(queue.fileno(), self.on_tun_readable, queue)
        self._lag_due = loop.time() + LAG_INTERVAL
        loop.call_at(self._lag_due, self._measure_lag)
        loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeeping_timer)

    def stop(self) -> None:
        for handle in (self._serve_scheduled, self._send_scheduled):
            if handle is not None:  # a backlog stays where it is
                handle.cancel()
        self._serve_scheduled = self._send_scheduled = None
        loop = self._loop
        for fd in (self.udp.fileno(), self.tun.fileno()):
            loop.remove_writer(fd)
        for fd in (self.udp.fileno(), *(queue.fileno() for queue in self._tun_queues)):
            loop.remove_reader(fd)

    # -- inbound: UDP -> TUN or another session -------------------------------

    def on_udp_readable(self) -> None:
        """Take what waits on the UDP socket into the receive queue, and serve it
        (the event loop calls this). Reads up to READ_BUDGET datagrams and serves
        DATAGRAM_BUDGET: when datagrams come faster than the loop can open them,
        the backlog waits in the fair queue, where each client gets its turn and
        CoDel keeps it short, not in the socket's buffer, where the fastest
        sender crowds out everyone else (fair_queue.py)."""
        counters = self.counters
        drops = counters.inbound_drops
        enqueue = self._enqueue
        arrived = self.queue_clock()
        bad_headers = 0
        try:
            for datagrams, source in self.udp.receive(READ_BUDGET, READ_BUDGET):
                # runs of well-formed datagrams of one session (with GRO, usually all)
                run, headers, run_session = [], [], None
                for datagram in datagrams:
                    header = read_header(datagram)  # noise stops here, cheaply
                    if type(header) is not Header:
                        counters.datagrams_received += 1
                        drops[header] += 1
                        bad_headers += 1
                        bad_source, bad_reason = source, header
                        continue
                    if header.session_id != run_session and run:
                        enqueue(run_session, run, headers, source, arrived)
                        run, headers = [], []
                    run_session = header.session_id
                    run.append(datagram)
                    headers.append(header)
                if run:
                    enqueue(run_session, run, headers, source, arrived)
        finally:
            if bad_headers:  # one (rate-limited) line per callback, not per datagram
                self._bad_input_log.warning(
                    "header",
                    "dropped %d datagrams with bad headers, the last from %s: %s",
                    bad_headers,
                    bad_source[0],
                    bad_reason.value,
                )
        if self._serve_scheduled is None:
            self._serve()

    def _enqueue(self, session_id: int, datagrams: list, headers: list, source, arrived: float):
        """Queue a run of one session's datagrams on its flow: the session's own if
        they come from its endpoint, their source address's if not, so that forged
        datagrams under a session's id wait apart from the session's own."""
        record = self.registry.by_id.get(session_id)
        if record is None:
            self.counters.datagrams_received += len(datagrams)
            self.counters.inbound_drops[DropReason.UNKNOWN_SESSION] += len(datagrams)
            self._bad_input_log.warning(
                "session", "dropped datagram from %s: unknown session", source[0]
            )
            return
        flow = session_id if source == record.endpoint else source_key(source[0])
        self.receive_queue.push(
            flow, session_id, source, datagrams, headers, arrived, self._receive_drops
        )
        if self._receive_drops:
            self._count_queue_drops(self.receive_queue, self._receive_drops)

    def _serve(self) -> None:
        """Open and deliver up to DATAGRAM_BUDGET datagrams from the receive queue,
        each session in its turn; come back in the next loop iteration while
        datagrams wait, after the loop's other callbacks had theirs."""
        self._serve_scheduled = None
        queue = self.receive_queue
        now = self.clock()
        counters = self.counters
        inbound = self._inbound
        try:
            for session_id, source, datagrams, headers in queue.pop(
                DATAGRAM_BUDGET, self.queue_clock(), self._receive_drops
            ):
                counters.datagrams_received += len(datagrams)
                inbound(session_id, datagrams, headers, source, now)
        finally:
            if self._tun_pending:
                self._flush_tun()
            if self._receive_drops:
                self._count_queue_drops(queue, self._receive_drops)
            if queue and self._loop is not None:
                self._serve_scheduled = self._loop.call_soon(self._serve)

    def _count_queue_drops(self, queue: FairQueue, dropped: list) -> None:
        """Count what a fair queue dropped (over a bound, or by CoDel), then forget
        it: in the totals of its direction and on its session. A datagram the
        receive queue drops is counted as received here; a packet of the send
        queue was counted when it was read."""
        counters = self.counters
        receive = queue is self.receive_queue
        totals = counters.inbound_drops if receive else counters.outbound_drops
        by_id = self.registry.by_id
        for session_id, reason, count in dropped:
            totals[reason] += count
            record = by_id.get(session_id)
            if record is not None:
                record.drops[reason] += count
                record.last_drop_reason = reason
        total = sum(count for _, _, count in dropped)
        if receive:
            counters.datagrams_received += total
        session_id, reason, _ = dropped[-1]
        dropped.clear()
        self._bad_input_log.warning(
            f"{queue.name}_queue",
            "%s queue: dropped %d packets, the last of session %#010x: %s",
            queue.name,
            total,
            session_id,
            reason.value,
        )

    def _screen_batch(self, data: bytes, size: int, source) -> bool:
        """Drop a whole GRO batch before it is cut apart, when that is already
        decided: noise, or a batch for a flow the receive queue would refuse."""
        return self._drop_noise_batch(data, size, source) or self._drop_for_full_flow(
            data, size, source
        )

    def _drop_for_full_flow(self, data: bytes, size: int, source) -> bool:
        """A GRO batch for a flow already at its bound in the receive queue goes
        whole, counted as `queue_full`, on the session of its first datagram (a
        batch has one source). What the queue would refuse then costs one header
        read, not one per datagram: a flood of 64-byte datagrams comes hundreds
        to a receive call."""
        header = read_header(data[:size])
        if type(header) is not Header:
            return False  # each one is looked at, and counted under its own reason
        record = self.registry.by_id.get(header.session_id)
        if record is None:
            return False
        flow = header.session_id if source == record.endpoint else source_key(source[0])
        count = -(-len(data) // size)
        if not self.receive_queue.refuses(flow, count):
            return False
        self.counters.datagrams_received += count
        self.counters.inbound_drops[DropReason.QUEUE_FULL] += count
        record.drops[DropReason.QUEUE_FULL] += count
        record.last_drop_reason = DropReason.QUEUE_FULL
        return True

    def _drop_noise_batch(self, data: bytes, size: int, source) -> bool:
        """Count a whole GRO batch as dropped, each datagram under its own reason,
        when its headers show at a glance that none can be a push packet: all too
        short, or not one with our version byte. False: look at each one."""
        count = -(-len(data) // size)
        if size < MIN_DATAGRAM_LEN:  # the last one is no longer than the others
            reason = DropReason.TOO_SHORT
        elif PROTOCOL_VERSION not in data[::size]:  # every datagram's first byte
            reason = DropReason.BAD_VERSION
            if len(data) % size and len(data) % size < MIN_DATAGRAM_LEN:
                return False  # a short last one is too_short first: look at each
        else:
            return False
        self.counters.datagrams_received += count
        self.counters.inbound_drops[reason] += count
        self._bad_input_log.warning(
            "header", "dropped %d datagrams from %s: %s", count, source[0], reason.value
        )
        return True

    def _inbound(self, session_id: int, datagrams: list, headers: list, source, now: float):
        """Authenticate datagrams of one session (their headers read) and take each
        where it goes; count each delivered or dropped, except those held for the
        TUN write at the end of this callback (`_flush_tun` counts them)."""
        counters = self.counters
        drops = counters.inbound_drops
        record = self.registry.by_id.get(session_id)
        if record is None:
            drops[DropReason.UNKNOWN_SESSION] += len(datagrams)
            self._bad_input_log.warning(
                "session", "dropped datagram from %s: unknown session", source[0]
            )
            return
        budget_key = None
        if source != record.endpoint:  # a session's own endpoint is never held back
            budget_key = source_key(source[0])
            if not self.source_budget.allows(budget_key, now):
                drops[DropReason.SOURCE_OVER_BUDGET] += len(datagrams)
                self._bad_input_log.warning(
                    "budget", "dropped datagram from %s: too many forged tags", source[0]
                )
                return
            forged_before = drops[DropReason.BAD_TAG]
        from_session, clamp, mtu = self.router.from_session, self._clamp, self.router.mtu
        # the route key of the last packet this run sent to the TUN: a packet of the
        # same flow goes there too, undecided (routing.route_key)
        tun_key = None
        pending = self._tun_pending
        rx_packets = rx_bytes = 0
        tunnel = record.tunnel
        results = tunnel.open_many(datagrams, headers, now)
        if tunnel.advanced:  # roaming: only a counter above all seen for its key moves it
            record.endpoint = source
        for index, result in enumerate(results):
            if type(result) is not bytes:
                drops[result] += 1
                record.drops[result] += 1
                record.last_drop_reason = result
                if result is DropReason.REKEY_REQUIRED:
                    self._ask_to_rekey(record, headers[index].key_epoch, source, now)
                    continue
                self._bad_input_log.warning(
                    "open",
                    "session %#010x: dropped datagram from %s: %s",
                    session_id,
                    source[0],
                    result.value,
                )
                continue
            if not result:
                self._keepalive_received(record, now)
                counters.datagrams_delivered += 1
                continue
            key = route_key(result)
            if key is not None and key == tun_key and len(result) <= mtu:
                decision = TO_TUN
            else:
                decision = from_session(record, result)
                tun_key = key if decision is TO_TUN else None
            if decision is TO_TUN:
                rx_packets += 1
                rx_bytes += len(result)
                pending.append(clamp(result))  # counted where it ends, by _flush_tun
                continue
            reason = self._deliver_elsewhere(record, result, decision, now)
            if reason is None:
                counters.datagrams_delivered += 1
            else:
                drops[reason] += 1
        counters.rx_packets += rx_packets
        counters.rx_bytes += rx_bytes
        if budget_key is not None and drops[DropReason.BAD_TAG] != forged_before:
            self.source_budget.charge(budget_key, drops[DropReason.BAD_TAG] - forged_before, now)

    def _ask_to_rekey(self, record: SessionRecord, epoch: int, source, now: float) -> None:
        """Answer an authentic packet under re-learned keys with REKEY_REQUIRED, sent to
        its source (the endpoint is not moved: the packet may be a replay), at most
        once a second per session and source (TunnelSession.rekey_request)."""
        datagram = record.tunnel.rekey_request(epoch, source, now)
        if datagram is not None and self._send_datagram(datagram, source) is None:
            self.counters.rekey_requests_sent += 1

    def _keepalive_received(self, record: SessionRecord, now: float) -> None:
        last = record.tunnel.last_sent_at
        if last is None or now - last >= KEEPALIVE_REPLY_AFTER:
            self._send_keepalive(record, now)

    def _deliver_elsewhere(self, record: SessionRecord, payload: bytes, decision, now: float):
        """Where a payload the router did not send to the TUN ends: None if delivered
        to another session (hub), else the drop reason."""
        action = decision.action
        if action is Action.SESSION:  # hub: client to client, never through the TUN
            self._count_rx(payload)
            packet = self._clamp(payload)
            if decision.target.partial_checksums:
                packet = tso.to_partial(packet)
            return self._send_to(decision.target, packet, now)
        record.drops[decision.reason] += 1
        record.last_drop_reason = decision.reason
        if action is Action.TOO_BIG:
            self._reply_too_big(record, payload, now)
        elif decision.reason in REFUSED_ADDRESS:
            which, message = REFUSED_ADDRESS[decision.reason]
            self._bad_input_log.warning(
                decision.reason.value,
                message,
                record.session_id,
                ipaddress.ip_address(inner.addresses(payload)[which]),
            )
        return decision.reason

    def _count_rx(self, payload: bytes) -> None:
        self.counters.rx_packets += 1
        self.counters.rx_bytes += len(payload)

    def _reply_too_big(self, record: SessionRecord, payload: bytes, now: float) -> None:
        gateway = self.gateway_packed
        if len(gateway) != (4 if payload[0] >> 4 == 4 else 16):
            return  # no gateway address of that family to answer from
        reply = inner.too_big_reply(payload, self.mtu, gateway)
        if reply is not None and self._send_to(record, reply, now) is None:
            self.counters.icmp_too_big_sent += 1

    def _flush_tun(self) -> None:
        """Write this callback's packets for the TUN, consecutive TCP segments of a
        flow as one write (pushgate_io/gro.py), and count each packet where it ended."""
        pending, self._tun_pending = self._tun_pending, []
        counters = self.counters
        drops = counters.inbound_drops
        for buffers, count in self.tun.coalesce(pending):
            reason = self._write_tun(buffers)
            if reason is None:
                counters.datagrams_delivered += count
            else:
                drops[reason] += count

    def _write_tun(self, buffers: list) -> DropReason | None:
        if self.tun_queue:  # keep order: once queued, everything queues
            return None if self._queue(self.tun_queue, buffers) else DropReason.QUEUE_FULL
        try:
            if self.tun.write_buffers(buffers):
                return None
        except OSError as error:
            self.counters.io_errors["tun_write"] += 1
            self._bad_input_log.warning("tun_write", "TUN write failed: %s", error)
            return DropReason.TUN_WRITE_ERROR
        return None if self._queue(self.tun_queue, buffers) else DropReason.QUEUE_FULL

    # -- outbound: TUN -> a session --------------------------------------------

    def on_tun_readable(self, queue) -> None:
        """Take what waits on one of the TUN's queues into the send queue, and serve
        it (the event loop calls this for each queue with packets, in turn). Reads
        its share of TUN_READ_BUDGET and seals BATCH: when packets for clients
        come faster than the loop can seal them, the backlog waits in the send
        queue, each session in its own FIFO under CoDel, or in its own TUN
        queue's ring, not in one kernel FIFO, where a flood to one client crowds
        out every other client's replies (fair_queue.py, tun_steering.py)."""
        counters = self.counters
        drops = counters.outbound_drops
        try:
            packets = queue.read_packets(self._tun_read_budget)
        except OSError as error:
            counters.io_errors["tun_read"] += 1
            self._bad_input_log.warning("tun_read", "TUN read failed: %s", error)
            return
        counters.tun_packets_read += len(packets)
        arrived = self.queue_clock()
        from_tun, clamp = self.router.from_tun, self._clamp_tun
        by_session: dict[SessionRecord, list] = {}  # each session's packets, in order
        # the IPv4 destination of the last packet queued, and its session's list: a
        # packet to the same address goes to the same session, undecided
        run_destination = run = None
        for packet in packets:
            if packet[16:20] == run_destination and packet[0] == 0x45:
                run.append(clamp(packet))
                continue
            run_destination = None
            decision = from_tun(packet)
            if decision.action is not Action.SESSION:
                drops[decision.reason] += 1
                continue
            target = decision.target
            if target.endpoint is None:
                drops[DropReason.NO_ENDPOINT] += 1
                continue
            run = by_session.get(target)
            if run is None:
                run = by_session[target] = []
            run.append(clamp(packet))
            if packet[0] == 0x45:
                run_destination = packet[16:20]
        push, dropped = self.send_queue.push, self._send_drops
        for record, run in by_session.items():
            session_id = record.session_id
            for start in range(0, len(run), BATCH):  # a turn serves a batch whole
                push(
                    session_id, session_id, None, run[start : start + BATCH], None, arrived, dropped
                )
        if dropped:
            self._count_queue_drops(self.send_queue, dropped)
        if self._send_scheduled is not None:  # served now instead
            self._send_scheduled.cancel()
        self._serve_send()

    def _serve_send(self) -> None:
        """Seal and send about BATCH packets from the send queue, each session in its
        turn; come back in the next loop iteration while packets wait. Nothing is
        sealed while the socket takes no more (datagrams wait in `udp_queue`):
        then the backlog stays in the send queue, where a slow uplink is shared
        fairly too, and `_drain_udp` comes back here once the socket took them."""
        self._send_scheduled = None
        if self.udp_queue:
            return
        queue = self.send_queue
        now = self.clock()
        counters = self.counters
        drops = counters.outbound_drops
        by_id = self.registry.by_id
        tun_form = self.tun.partial_tcp
        try:
            for session_id, _, payloads, _ in queue.pop(
                BATCH, self.queue_clock(), self._send_drops
            ):
                record = by_id.get(session_id)
                if record is None:  # removed while its packets waited
                    drops[DropReason.NO_ROUTE] += len(payloads)
                    continue
                if record.partial_checksums != tun_form:  # the form its client takes
                    convert = tso.to_partial if record.partial_checksums else tso.complete
                    payloads = [convert(payload) for payload in payloads]
                tunnel = record.tunnel
                sent_bytes = tunnel.tx_bytes
                datagrams, rejected = tunnel.seal_many(payloads, now)
                for reason in rejected:
                    drops[reason] += 1
                counters.tx_packets += len(datagrams)
                counters.tx_bytes += tunnel.tx_bytes - sent_bytes
                self._send_run(datagrams, record.endpoint)
        finally:
            if self._send_drops:
                self._count_queue_drops(queue, self._send_drops)
            if queue and not self.udp_queue and self._loop is not None:
                self._send_scheduled = self._loop.call_soon(self._serve_send)

    def _send_run(self, datagrams: list, endpoint) -> None:
        """Send datagrams to one endpoint, with UDP GSO in as few calls as it
        allows; what the socket cannot take now is queued, each fate counted."""
        counters = self.counters
        if self.udp_queue:  # keep order: once queued, everything queues
            sent = done = 0
        else:
            sent, done = self.udp.send(datagrams, endpoint, counters.outbound_drops)
        counters.outbound_delivered += sent
        for datagram in datagrams[done:] if done < len(datagrams) else ():
            if self._queue(self.udp_queue, (datagram, endpoint)):
                counters.outbound_delivered += 1
            else:
                counters.outbound_drops[DropReason.QUEUE_FULL] += 1

    def _seal_for(self, record: SessionRecord, packet: bytes, now: float):
        """(datagram, endpoint) carrying `packet` to `record`, or the drop reason."""
        endpoint = record.endpoint
        if endpoint is None:
            return DropReason.NO_ENDPOINT
        try:
            datagram = record.tunnel.seal(packet, now)
        except PacketRejected as rejected:
            return rejected.reason
        self.counters.tx_packets += 1
        self.counters.tx_bytes += len(packet)
        return datagram, endpoint

    def _send_to(self, record: SessionRecord, packet: bytes, now: float) -> DropReason | None:
        result = self._seal_for(record, packet, now)
        if type(result) is not tuple:
            return result
        return self._send_datagram(*result)

    def _send_keepalive(self, record: SessionRecord, now: float) -> None:
        if record.endpoint is None:
            return
        try:
            datagram = record.tunnel.seal_keepalive(now)
        except PacketRejected:
            return
        self._send_datagram(datagram, record.endpoint)

    def _send_datagram(self, datagram: bytes, endpoint) -> DropReason | None:
        if not self.udp_queue:
            reason = self.udp.send_datagram(datagram, endpoint)
            if reason is not DropReason.QUEUE_FULL:
                return reason
        return None if self._queue(self.udp_queue, (datagram, endpoint)) else DropReason.QUEUE_FULL

    def _udp_error(self, kind: str, error: OSError, endpoint) -> None:
        """Count a UDP call the kernel refused (BatchSocket counts its datagrams)."""
        self.counters.io_errors[kind] += 1
        if kind == "udp_recv":
            self._bad_input_log.warning(kind, "UDP receive error: %s", error)
        else:
            self._bad_input_log.warning(kind, "UDP send to %s failed: %s", endpoint, error)

    def _log_error_reports(self, reports: list[ErrorReport]) -> None:
        """ICMP errors about datagrams we sent (BatchSocket counts them by errno):
        a client that went away answers "port unreachable"."""
        last = reports[-1]
        self._bad_input_log.warning(
            "udp_error_report",
            "%d UDP error reports, the last about a datagram to %s: %s (%s)",
            len(reports),
            last.destination[0],
            os.strerror(last.errno),
            last.origin,
        )

    # -- bounded output queues --------------------------------------------------

    def _queue(self, queue: BoundedQueue, item) -> bool:
        if not queue.put(item):
            return False
        if queue is self.udp_queue and not self._udp_writer:
            self._loop.add_writer(self.udp.fileno(), self._drain_udp)
            self._udp_writer = True
        elif queue is self.tun_queue and not self._tun_writer:
            self._loop.add_writer(self.tun.fileno(), self._drain_tun)
            self._tun_writer = True
        return True

    def _drain_udp(self) -> None:
        queue = self.udp_queue
        while queue:
            datagram, endpoint = queue.peek()
            if self.udp.send_datagram(datagram, endpoint) is DropReason.QUEUE_FULL:
                return  # a refused one is counted in io_errors (it was delivered to the queue)
            queue.pop()
        self._loop.remove_writer(self.udp.fileno())
        self._udp_writer = False
        if self.send_queue and self._send_scheduled is None:
            self._send_scheduled = self._loop.call_soon(self._serve_send)

    def _drain_tun(self) -> None:
        queue = self.tun_queue
        while queue:
            try:
                if not self.tun.write_buffers(queue.peek()):
                    return
            except OSError:
                self.counters.io_errors["tun_write"] += 1
            queue.pop()
        self._loop.remove_writer(self.tun.fileno())
        self._tun_writer = False

    # -- timers -----------------------------------------------------------------

    def _measure_lag(self) -> None:
        loop = self._loop
        now = loop.time()
        self._loop_lag.observe(max(0.0, now - self._lag_due))
        self._lag_due = now + LAG_INTERVAL
        loop.call_at(self._lag_due, self._measure_lag)

    def _housekeeping_timer(self) -> None:
        self._loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeeping_timer)
        self.housekeeping()

    def housekeeping(self) -> None:
        """Once a second (the event loop's timer calls this): expire sessions, run
        their timers, flag stalled ones."""
        now = self.clock()
        expired = []
        stalled = 0
        for record in self.registry.by_id.values():
            tunnel = record.tunnel
            if record.expires_at and now >= record.expires_at:
                expired.append(record)
                continue
            timer = tunnel.get_timer()
            if timer is not None and now >= timer:
                tunnel.handle_timer(now)
            stalled += self._check_stalled(record, now)
        self.counters.stalled_sessions = stalled
        for queue in (self.receive_queue, self.send_queue):
            queue.forget_idle(self.queue_clock())
        for record in expired:
            self.registry.remove(record.session_id, SessionEnd.EXPIRED)
            self.counters.session_expiries += 1
            self.counters.session_removals += 1
            log.info("session %#010x expired", record.session_id)

    def _check_stalled(self, record: SessionRecord, now: float) -> int:
        """Flag a session that only receives, or only sends, for over two keepalives."""
        tunnel = record.tunnel
        one_way = stall.one_way(
            tunnel.last_received_at,
            tunnel.last_sent_at,
            record.installed_at,
            tunnel.keepalive_interval,
            now,
        )
        if one_way is not None and not record.stalled:
            log.warning(
                "session %#010x is stalled: it %s for %.0f s (last drop reason: %s)",
                record.session_id,
                one_way.description,
                one_way.seconds,
                record.last_drop_reason.value if record.last_drop_reason else "none",
            )
        record.stalled = one_way is not None
        return int(record.stalled)
