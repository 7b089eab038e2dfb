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
import errno
import ipaddress
import logging
import os
import socket
import time

import udpio
from push_protocol.codec import Header, read_header
from push_protocol.constants import MIN_DATAGRAM_LEN, PROTOCOL_VERSION
from push_protocol.drops import DropReason, PacketRejected
from tundev.linux import LinuxTun

from . import inner
from .metrics import BoundedQueue, Counters
from .registry import Registry, SessionRecord
from .routing import TO_TUN, Action, Router
from .source_budget import SourceBudget, source_key

log = logging.getLogger("pushgate.dataplane")

BATCH = 64  # receive calls (UDP) or packets (TUN) per readiness callback
# Datagrams per UDP readiness callback: with GRO one receive call brings up to ~45,
# and every packet of a callback waits for its end (the TUN write is batched), as
# does the other direction; bounding the batch in datagrams bounds that wait.
DATAGRAM_BUDGET = 64
RECV_SIZE = 65536
QUEUE_CAPACITY = 4096  # packets per output queue
ERROR_REPORTS_PER_READ = 256  # bounds one read of the error queue (it refills by ICMP)
LAG_INTERVAL = 0.1
HOUSEKEEPING_INTERVAL = 1.0
KEEPALIVE_REPLY_AFTER = 1.0  # answer a keepalive if we sent nothing for this long
MSS_OVERHEAD = {4: 40, 6: 60}  # IP + TCP headers without options


class RateLimitedLog:
    """At most one line per key per interval; counts what it swallowed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        if suppressed:
            message += f" ({suppressed} similar suppressed)"
        log.warning(message, *args)
        self._last[key] = (now, 0)


class Device:
    def __init__(
        self,
        *,
        registry: Registry,
        counters: Counters,
        sock: socket.socket,
        tun: LinuxTun,
        mtu: int,
        tunnel_network,
        gateway_address,
        loop_lag_histogram,
        clock=time.time,
        destinations=None,
    ) -> None:
        self.registry = registry
        self.counters = counters
        self.sock = sock
        self.tun = tun
        self.mtu = mtu
        self.router = Router(registry, tunnel_network, gateway_address, mtu, destinations)
        self.gateway_packed = gateway_address.packed
        self.clock = clock
        self.udp_queue = BoundedQueue("udp_send", QUEUE_CAPACITY)
        self.tun_queue = BoundedQueue("tun_write", QUEUE_CAPACITY)
        self._loop_lag = loop_lag_histogram
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bad_input_log = RateLimitedLog()
        self._udp_writer = self._tun_writer = False
        self._lag_due = 0.0
        self._tun_pending: list[bytes] = []  # decrypted packets for the TUN, this callback
        self.source_budget = SourceBudget()  # forged tags per source (source_budget.py)
        # batched UDP (udpio): several datagrams per recvmsg / sendmsg where the kernel can
        self._gro = udpio.enable_gro(sock)
        self._gso = udpio.gso_capable(sock)
        # refused sends fail loudly (ENOBUFS), not silently; ICMP errors queue up
        self._send_errors = udpio.enable_send_errors(sock)

    @property
    def queues(self) -> list[BoundedQueue]:
        return [self.udp_queue, self.tun_queue]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_udp_readable)
        loop.add_reader(self.tun.fileno(), self._on_tun_readable)
        self._lag_due = loop.time() + LAG_INTERVAL
        loop.call_at(self._lag_due, self._measure_lag)
        loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeeping)

    def stop(self) -> None:
        loop = self._loop
        for fd in (self.sock.fileno(), self.tun.fileno()):
            loop.remove_reader(fd)
            loop.remove_writer(fd)

    # -- inbound: UDP -> TUN or another session -------------------------------

    def _on_udp_readable(self) -> None:
        counters = self.counters
        drops = counters.inbound_drops
        recvfrom = self.sock.recvfrom
        recvmsg = self.sock.recvmsg if self._gro else None
        inbound = self._inbound
        now = self.clock()
        bad_headers = 0
        budget = DATAGRAM_BUDGET
        try:
            for call in range(BATCH):
                if budget <= 0:
                    return  # the loop calls back at once if more is waiting
                try:
                    if recvmsg is None:
                        data, source = recvfrom(RECV_SIZE)
                        datagrams = None
                    else:  # with GRO one call may bring several datagrams of a flow
                        data, ancdata, _, source = recvmsg(RECV_SIZE, udpio.GRO_CMSG_SPACE)
                        datagrams = None
                        if ancdata:
                            size = udpio.segment_size(data, ancdata)
                            if self._drop_noise_batch(data, size, source):
                                continue
                            datagrams = udpio.segments(data, size)
                except BlockingIOError:
                    if call == 0 and self._send_errors:  # woken for the error queue
                        self._read_error_reports()
                    return
                except OSError as error:
                    if error.errno in udpio.REPORTED_ERRNOS:  # an ICMP error, not ours
                        self._read_error_reports()
                        continue
                    counters.io_errors["udp_recv"] += 1
                    self._bad_input_log.warning("udp_recv", "UDP receive error: %s", error)
                    continue
                datagrams = datagrams or (data,)
                budget -= len(datagrams)
                counters.datagrams_received += len(datagrams)
                # runs of well-formed datagrams of one session (with GRO, usually all)
                run, headers, run_session = [], [], None
                for datagram in datagrams:
                    header = read_header(datagram)  # noise stops here, cheaply
                    if type(header) is not Header:
                        drops[header] += 1
                        bad_headers += 1
                        bad_source, bad_reason = source, header
                        continue
                    if header.session_id != run_session and run:
                        inbound(run_session, run, headers, source, now)
                        run, headers = [], []
                    run_session = header.session_id
                    run.append(datagram)
                    headers.append(header)
                if run:
                    inbound(run_session, run, headers, source, now)
        finally:
            if self._tun_pending:
                self._flush_tun()
            if bad_headers:  # one (rate-limited) line per callback, not per datagram
                self._bad_input_log.warning(
                    "header",
                    "dropped %d datagrams with bad headers, the last from %s: %s",
                    bad_headers,
                    bad_source[0],
                    bad_reason.value,
                )

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
        from_session, clamp = self.router.from_session, self._clamp
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
            decision = from_session(record, result)
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
            return self._send_to(decision.target, self._clamp(payload), now)
        record.drops[decision.reason] += 1
        record.last_drop_reason = decision.reason
        if action is Action.TOO_BIG:
            self._reply_too_big(record, payload, now)
        elif decision.reason is DropReason.SPOOFED_SOURCE:
            self._bad_input_log.warning(
                "spoof",
                "session %#010x sent a packet from %s, which it does not own",
                record.session_id,
                ipaddress.ip_address(inner.addresses(payload)[0]),
            )
        elif decision.reason is DropReason.FORBIDDEN_DESTINATION:
            self._bad_input_log.warning(
                "forbidden",
                "session %#010x sent a packet to %s, which clients may not reach",
                record.session_id,
                ipaddress.ip_address(inner.addresses(payload)[1]),
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

    def _clamp(self, packet: bytes) -> bytes:
        if packet[0] == 0x45 and (packet[9] != 6 or len(packet) < 40 or not packet[33] & 0x02):
            return packet  # IPv4 without options, and not a TCP SYN: nothing to clamp
        max_mss = self.mtu - MSS_OVERHEAD.get(packet[0] >> 4, 40)
        clamped = inner.clamp_mss(packet, max_mss)
        if clamped is not packet:
            self.counters.mss_clamped += 1
        return clamped

    def _flush_tun(self) -> None:
        """Write this callback's packets for the TUN, consecutive TCP segments of a
        flow as one write (tundev/gro.py), and count each packet where it ended."""
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

    def _on_tun_readable(self) -> None:
        counters = self.counters
        drops = counters.outbound_drops
        now = self.clock()
        try:
            packets = self.tun.read_packets(BATCH)
        except OSError as error:
            counters.io_errors["tun_read"] += 1
            self._bad_input_log.warning("tun_read", "TUN read failed: %s", error)
            return
        counters.tun_packets_read += len(packets)
        from_tun, clamp = self.router.from_tun, self._clamp
        runs = []  # [session, its packets], consecutive packets for one session together
        for packet in packets:
            decision = from_tun(packet)
            if decision.action is not Action.SESSION:
                drops[decision.reason] += 1
                continue
            target = decision.target
            if target.endpoint is None:
                drops[DropReason.NO_ENDPOINT] += 1
            elif runs and runs[-1][0] is target:
                runs[-1][1].append(clamp(packet))
            else:
                runs.append((target, [clamp(packet)]))
        for record, payloads in runs:
            tunnel = record.tunnel
            sent_bytes = tunnel.tx_bytes
            datagrams, rejected = tunnel.seal_many(payloads, now)
            for reason in rejected:
                drops[reason] += 1
            counters.tx_packets += len(datagrams)
            counters.tx_bytes += tunnel.tx_bytes - sent_bytes
            self._send_run(datagrams, record.endpoint)

    def _send_run(self, datagrams: list, endpoint) -> None:
        """Send datagrams to one endpoint, with UDP GSO in as few calls as it
        allows; what the socket refuses goes datagram by datagram (queued or counted)."""
        counters = self.counters
        drops = counters.outbound_drops
        for run in udpio.runs(datagrams) if self._gso else [datagrams]:
            if len(run) > 1 and self._gso and not self.udp_queue:
                try:
                    self._send(run, endpoint)
                    counters.outbound_delivered += len(run)
                    continue
                except BlockingIOError:
                    pass
                except OSError as error:
                    if error.errno == errno.ENOBUFS:  # the kernel dropped the run as one
                        drops[self._send_failed(error, endpoint)] += len(run)
                        continue
                    if error.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                        self._gso = False  # cannot segment here: one by one from now on
            for datagram in run:
                reason = self._send_datagram(datagram, endpoint)
                if reason is None:
                    counters.outbound_delivered += 1
                else:
                    drops[reason] += 1

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
        if self.udp_queue:
            ok = self._queue(self.udp_queue, (datagram, endpoint))
            return None if ok else DropReason.QUEUE_FULL
        try:
            self._send([datagram], endpoint)
        except BlockingIOError:
            ok = self._queue(self.udp_queue, (datagram, endpoint))
            return None if ok else DropReason.QUEUE_FULL
        except OSError as error:
            return self._send_failed(error, endpoint)
        return None

    def _send(self, run: list, endpoint) -> None:
        """One send call (a GSO one if `run` has several datagrams), raising as it
        does; except that an error which only passed on an ICMP report about an
        earlier datagram (the socket's pending error) did not stop this one: the
        reports are read and the call made once more."""
        try:
            udpio.send_run(self.sock, run, endpoint)
        except OSError as error:
            if error.errno not in udpio.REPORTED_ERRNOS:
                raise
            self._read_error_reports()
            udpio.send_run(self.sock, run, endpoint)

    def _send_failed(self, error: OSError, endpoint) -> DropReason:
        """Count a send call the kernel refused; the drop reason of its datagrams."""
        self.counters.io_errors["udp_send"] += 1
        self._bad_input_log.warning("udp_send", "UDP send to %s failed: %s", endpoint, error)
        return (
            DropReason.NO_BUFFER_SPACE if error.errno == errno.ENOBUFS else DropReason.SOCKET_ERROR
        )

    def _read_error_reports(self) -> None:
        """Empty the socket's error queue and count its reports (ICMP errors about
        datagrams we sent: a client that went away answers "port unreachable").
        Left there they would hold receive-buffer memory and wake the loop again."""
        reports = udpio.read_error_queue(self.sock, ERROR_REPORTS_PER_READ)
        counts = self.counters.udp_error_reports
        for report in reports:
            name = errno.errorcode.get(report.errno, "other")
            counts[name] = counts.get(name, 0) + 1
        if reports:
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
            self._loop.add_writer(self.sock.fileno(), self._drain_udp)
            self._udp_writer = True
        elif queue is self.tun_queue and not self._tun_writer:
            self._loop.add_writer(self.tun.fileno(), self._drain_tun)
            self._tun_writer = True
        return True

    def _drain_udp(self) -> None:
        queue = self.udp_queue
        while queue:
            datagram, endpoint = queue.peek()
            try:
                self._send([datagram], endpoint)
            except BlockingIOError:
                return
            except OSError:
                self.counters.io_errors["udp_send"] += 1
            queue.pop()
        self._loop.remove_writer(self.sock.fileno())
        self._udp_writer = False

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

    def _housekeeping(self) -> None:
        self._loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeeping)
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
        for record in expired:
            if record.tunnel.lifecycle.is_live:
                record.tunnel.expire()
            self.registry.remove(record.session_id)
            self.counters.session_expiries += 1
            self.counters.session_removals += 1
            log.info("session %#010x expired", record.session_id)

    def _check_stalled(self, record: SessionRecord, now: float) -> int:
        """Flag a session that only receives, or only sends, for over two keepalives."""
        tunnel = record.tunnel
        received = tunnel.last_received_at or record.installed_at
        sent = tunnel.last_sent_at or record.installed_at
        limit = tunnel.keepalive_interval * 2
        stalled = (tunnel.last_received_at is not None or tunnel.last_sent_at is not None) and (
            abs(received - sent) > limit and now - min(received, sent) > limit
        )
        if stalled and not record.stalled:
            one_way = (
                "receives but sends nothing" if received > sent else "sends but receives nothing"
            )
            log.warning(
                "session %#010x is stalled: it %s for %.0f s (last drop reason: %s)",
                record.session_id,
                one_way,
                abs(received - sent),
                record.last_drop_reason.value if record.last_drop_reason else "none",
            )
        record.stalled = stalled
        return int(stalled)
