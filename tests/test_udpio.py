"""Batched UDP (udpio): runs a GSO send can carry, and the real kernel round trip."""

import os

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
