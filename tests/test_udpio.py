"""Batched UDP (udpio): runs a GSO send can carry, and the real kernel round trip."""

import errno
import os
import socket

import pytest

import udpio
from netlab import Lab, socket_in


def test_runs_are_equal_sizes_with_at_most_a_shorter_last():
    sizes = [100, 100, 100, 40, 100, 100, 200, 200, 50, 50]
    runs = udpio.runs([bytes(n) for n in sizes])
    assert [[len(d) for d in run] for run in runs] == [
        [100, 100, 100, 40],
        [100, 100],
        [200, 200, 50],
        [50],
    ]


def test_runs_respect_the_segment_and_byte_limits():
    runs = udpio.runs([bytes(10)] * (udpio.MAX_SEGMENTS + 1))
    assert [len(r) for r in runs] == [udpio.MAX_SEGMENTS, 1]
    runs = udpio.runs([bytes(1500)] * 50)
    assert all(sum(map(len, r)) <= udpio.MAX_DATAGRAM for r in runs)
    assert sum(len(r) for r in runs) == 50


def test_split_without_a_gro_message_is_the_datagram_itself():
    assert udpio.split(b"abc", []) == [b"abc"]


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
            assert udpio.gso_capable(sender) and udpio.enable_gro(glued)
            datagrams = [bytes([i]) * 1000 for i in range(9)] + [b"short"]
            for receiver in (plain, glued):
                for run in udpio.runs(datagrams):
                    udpio.send_run(sender, run, receiver.getsockname())
            plain.settimeout(2)
            got_plain = [plain.recv(65536) for _ in datagrams]
            glued.settimeout(2)
            got_glued, calls = [], 0
            while len(got_glued) < len(datagrams):
                data, ancdata, _, _ = glued.recvmsg(65536, udpio.GRO_CMSG_SPACE)
                got_glued += udpio.split(data, ancdata)
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
            assert udpio.enable_send_errors(sender)
            assert udpio.read_error_queue(sender, 10) == []
            for _ in range(3):
                sender.sendto(b"anyone?", nobody)
                with pytest.raises(OSError) as pending:  # the report's errno, once
                    sender.sendto(b"lost", receiver.getsockname())
                assert pending.value.errno == errno.ECONNREFUSED in udpio.REPORTED_ERRNOS
            first = udpio.read_error_queue(sender, 2)
            rest = udpio.read_error_queue(sender, 10)
            assert len(first) == 2 and len(rest) == 1
            for report in first + rest:
                assert (report.errno, report.origin) == (errno.ECONNREFUSED, origin)
                assert report.destination[:2] == nobody[:2]
            assert udpio.read_error_queue(sender, 10) == []
            sender.sendto(b"after", receiver.getsockname())
            assert receiver.recv(100) == b"after"  # "lost" never left
