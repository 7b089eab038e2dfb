"""Batched UDP (pushgate_io.udp), the one layer under the dataplane's and the
client's loops: runs a GSO send can carry, `BatchSocket`'s receive (GRO split,
budget) and send (GSO runs, their fallback, each datagram's fate counted) on the
in-memory network, and the real kernel round trips in a namespace."""

import errno
import os
import socket
from collections import Counter

import pytest

from netlab import Lab, socket_in
from push_protocol.drops import DropReason
from pushgate_io import udp
from pushgate_io.memory import MemoryNetwork

A, B = ("198.18.0.1", 5555), ("198.18.0.2", 6666)


def test_runs_are_equal_sizes_with_at_most_a_shorter_last():
    sizes = [100, 100, 100, 40, 100, 100, 200, 200, 50, 50]
    runs = udp.runs([bytes(n) for n in sizes])
    assert [[len(d) for d in run] for run in runs] == [
        [100, 100, 100, 40],
        [100, 100],
        [200, 200, 50],
        [50],
    ]


def test_runs_respect_the_segment_and_byte_limits():
    runs = udp.runs([bytes(10)] * (udp.MAX_SEGMENTS + 1))
    assert [len(r) for r in runs] == [udp.MAX_SEGMENTS, 1]
    runs = udp.runs([bytes(1500)] * 50)
    assert all(sum(map(len, r)) <= udp.MAX_DATAGRAM for r in runs)
    assert sum(len(r) for r in runs) == 50


def test_split_without_a_gro_message_is_the_datagram_itself():
    assert udp.split(b"abc", []) == [b"abc"]


class Errors:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.reports: list = []

    def on_error(self, kind: str, error: OSError, address) -> None:
        self.calls.append((kind, error.errno))


def pair(*, offloads: bool = True, screen=None):
    """A sender's BatchSocket on A and a receiver's on B, on one memory network."""
    network = MemoryNetwork()
    sender_sock = network.socket(host=A[0], offloads=offloads)
    receiver_sock = network.socket(host=B[0], offloads=offloads)
    sender_sock.bind(A)
    receiver_sock.bind(B)
    errors = Errors()
    sender = udp.BatchSocket(sender_sock, on_error=errors.on_error)
    receiver = udp.BatchSocket(receiver_sock, on_error=errors.on_error, screen=screen)
    return sender, receiver, errors


def test_a_gso_run_arrives_as_one_receive_split_into_its_datagrams():
    sender, receiver, _ = pair()
    datagrams = [bytes([i]) * 100 for i in range(5)] + [b"short"]
    drops = Counter()
    assert sender.gso and receiver.gro and receiver.send_errors
    assert sender.send(datagrams, B, drops) == (6, 6)
    assert sender.sock.send_calls == 1 and not drops
    assert list(receiver.receive(64)) == [(datagrams, A)]
    assert list(receiver.receive(64)) == []


def test_without_offloads_each_datagram_is_its_own_call():
    sender, receiver, _ = pair(offloads=False)
    datagrams = [bytes([i]) * 100 for i in range(3)]
    assert sender.send(datagrams, B, Counter()) == (3, 3)
    assert not sender.gso and not receiver.gro and sender.sock.send_calls == 3
    assert list(receiver.receive(64)) == [((d,), A) for d in datagrams]


def test_receive_stops_at_its_budget_and_takes_the_rest_next_time():
    sender, receiver, _ = pair()
    for i in range(100):
        sender.send_datagram(bytes([i]) * 40, B)
    first = [d for datagrams, _ in receiver.receive(64) for d in datagrams]
    rest = [d for datagrams, _ in receiver.receive(64) for d in datagrams]
    assert len(first) == 64 and len(rest) == 36
    assert first + rest == [bytes([i]) * 40 for i in range(100)]


def test_a_screened_gro_batch_is_not_yielded():
    seen = []

    def screen(data, size, source):
        seen.append((len(data), size, source))
        return data.startswith(b"x")

    sender, receiver, _ = pair(screen=screen)
    sender.send([b"x" * 50] * 4, B, Counter())
    sender.send([b"y" * 50] * 2, B, Counter())
    assert list(receiver.receive(64)) == [([b"y" * 50] * 2, A)]
    assert seen == [(200, 50, A), (100, 50, A)]


def test_a_device_that_cannot_segment_gets_one_datagram_a_call_from_then_on():
    sender, receiver, errors = pair()
    sender.sock.refuse_gso = True
    datagrams = [bytes([i]) * 100 for i in range(4)]
    drops = Counter()
    assert sender.send(datagrams, B, drops) == (4, 4)
    assert not sender.gso and not drops and not errors.calls
    assert sender.sock.send_calls == 4
    sender.send(datagrams, B, drops)
    assert sender.sock.send_calls == 8
    received = [d for batch, _ in receiver.receive(64) for d in batch]
    assert received == datagrams * 2


def test_a_run_the_kernel_refuses_as_one_is_counted_as_one_call_and_each_datagram():
    sender, receiver, errors = pair()
    sender.sock.fail_sends(errno.ENOBUFS)
    datagrams = [b"a" * 100] * 3 + [b"b" * 200] * 2  # two runs: the first refused
    drops = Counter()
    assert sender.send(datagrams, B, drops) == (2, 5)
    assert drops == {DropReason.NO_BUFFER_SPACE: 3}
    assert errors.calls == [("udp_send", errno.ENOBUFS)]
    assert list(receiver.receive(64)) == [([b"b" * 200] * 2, A)]


def test_after_another_refusal_each_datagram_of_the_run_meets_its_own_fate():
    sender, receiver, errors = pair()
    sender.sock.fail_sends(errno.EPERM, errno.ENOBUFS)  # the run, then its first datagram
    datagrams = [bytes([i]) * 100 for i in range(3)]
    drops = Counter()
    assert sender.send(datagrams, B, drops) == (2, 3)
    assert drops == {DropReason.NO_BUFFER_SPACE: 1}
    assert errors.calls == [("udp_send", errno.ENOBUFS)]
    assert sender.gso  # EPERM says nothing about segmenting
    assert [d for batch, _ in receiver.receive(64) for d in batch] == datagrams[1:]


def test_a_full_socket_stops_the_send_and_says_where():
    sender, receiver, errors = pair()
    sender.sock.fail_sends(errno.EAGAIN)
    datagrams = [b"a" * 100] * 2 + [b"b" * 200] * 2
    drops = Counter()
    assert sender.send(datagrams, B, drops) == (0, 0)
    sender.sock.block_sends()
    assert sender.send_datagram(b"c", B) is DropReason.QUEUE_FULL
    sender.sock.unblock_sends()
    assert sender.send(datagrams, B, drops) == (4, 4)
    assert not drops and not errors.calls
    assert [d for batch, _ in receiver.receive(64) for d in batch] == datagrams


def test_an_error_that_only_passed_on_an_icmp_report_is_not_a_drop():
    sender, receiver, errors = pair()
    sender.sock.fail_sends(errno.ECONNREFUSED)
    assert sender.send_datagram(b"one", B) is None
    sender.sock.fail_sends(errno.ECONNREFUSED)
    assert sender.send([b"two"] * 2, B, Counter()) == (2, 2)
    assert not errors.calls
    assert [d for batch, _ in receiver.receive(64) for d in batch] == [b"one", b"two", b"two"]


def test_without_ip_recverr_a_reported_errno_is_a_socket_error():
    sender, _, errors = pair()
    sender.send_errors = False  # as on a system without IP_RECVERR
    sender.sock.fail_sends(errno.ECONNREFUSED)
    assert sender.send_datagram(b"one", B) is DropReason.SOCKET_ERROR
    assert errors.calls == [("udp_send", errno.ECONNREFUSED)]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_a_gso_send_arrives_as_the_same_datagrams_whether_gro_glues_them_or_not():
    with Lab("pgudp") as lab:
        ns = lab.namespace("a")
        lab.exec(ns, ["ip", "link", "set", "lo", "up"])
        lab.exec(ns, ["ip", "address", "add", "198.18.99.1/32", "dev", "lo"])
        sender = socket_in(ns)
        plain, glued = socket_in(ns), socket_in(ns)
        with sender, plain, glued:
            plain.bind(("198.18.99.1", 0))
            glued.bind(("198.18.99.1", 0))
            assert udp.gso_capable(sender) and udp.enable_gro(glued)
            datagrams = [bytes([i]) * 1000 for i in range(9)] + [b"short"]
            for receiver in (plain, glued):
                for run in udp.runs(datagrams):
                    udp.send_run(sender, run, receiver.getsockname())
            plain.settimeout(2)
            got_plain = [plain.recv(65536) for _ in datagrams]
            glued.settimeout(2)
            got_glued, calls = [], 0
            while len(got_glued) < len(datagrams):
                data, ancdata, _, _ = glued.recvmsg(65536, udp.GRO_CMSG_SPACE)
                got_glued += udp.split(data, ancdata)
                calls += 1
            assert got_plain == datagrams and got_glued == datagrams
            assert calls < len(datagrams)  # the kernel handed the batch over glued


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
@pytest.mark.parametrize(
    ("family", "address", "origin"),
    [(socket.AF_INET, "198.18.99.1", "icmp"), (socket.AF_INET6, "2001:db8::1", "icmp6")],
)
def test_icmp_errors_come_back_as_reports_and_fail_one_later_call_until_read(
    family, address, origin
):
    """With IP_RECVERR (IPV6_RECVERR) a port unreachable for a datagram we sent is
    queued on the error queue, and fails the socket's next call once: the error
    the dataplane then reads the queue for and repeats the call."""
    with Lab("pgudp") as lab:
        ns = lab.namespace("a")
        lab.exec(ns, ["ip", "address", "add", address, "dev", "lo"])
        sender, receiver = socket_in(ns, family), socket_in(ns, family)
        with sender, receiver:
            receiver.bind((address, 0))
            receiver.settimeout(2)
            closed = socket_in(ns, family)
            closed.bind((address, 0))
            nobody = closed.getsockname()
            closed.close()  # nothing listens there now: the kernel answers ICMP
            assert udp.enable_send_errors(sender)
            assert udp.read_error_queue(sender, 10) == []
            for _ in range(3):
                sender.sendto(b"anyone?", nobody)
                with pytest.raises(OSError) as pending:  # the report's errno, once
                    sender.sendto(b"lost", receiver.getsockname())
                assert pending.value.errno == errno.ECONNREFUSED in udp.REPORTED_ERRNOS
            first = udp.read_error_queue(sender, 2)
            rest = udp.read_error_queue(sender, 10)
            assert len(first) == 2 and len(rest) == 1
            for report in first + rest:
                assert (report.errno, report.origin) == (errno.ECONNREFUSED, origin)
                assert report.destination[:2] == nobody[:2]
            assert udp.read_error_queue(sender, 10) == []
            sender.sendto(b"after", receiver.getsockname())
            assert receiver.recv(100) == b"after"  # "lost" never left
