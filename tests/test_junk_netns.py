"""Well-formed junk against the real dataplane (netlab.dataplane_lab: namespaces,
real UDP, TUN and feed): unknown session ids stop in the kernel's socket filter,
whose set of live ids follows the registry; forged tags from one source stop at
that source's budget while a real session from another source keeps working."""

import os
import random
import struct
import time

import pytest

from netlab import metrics, socket_in, wait_for
from netlab.dataplane_lab import CLIENT_UNDERLAY, GW_UNDERLAY, PORT, Gateway, dataplane_gateway
from netlab.feed import session
from push_protocol.constants import MIN_DATAGRAM_LEN

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

ATTACKER = "198.18.10.3"  # a second address in the client's namespace


@pytest.fixture
def gateway(tmp_path):
    with dataplane_gateway("pgjk", str(tmp_path)) as gw:
        yield gw


def inbound_drops(samples, reason: str) -> float:
    return metrics.total(
        samples, "pushgate_dataplane_drops_total", direction="inbound", reason=reason
    )


def in_kernel(samples, reason: str) -> float:
    return metrics.total(samples, "pushgate_dataplane_kernel_filter_drops_total", reason=reason)


def assert_accounted(samples) -> None:
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
    dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
    assert received == delivered + dropped, (received, delivered, dropped)


def scrape_when(gateway: Gateway, predicate, timeout: float, what: str):
    """The first scrape for which `predicate(samples)` holds."""

    def scrape():
        samples = gateway.scrape()
        return samples if predicate(samples) else None

    return wait_for(scrape, timeout, what=what)


def well_formed(session_id: int, keepalive: bool, counter: int) -> bytes:
    """A datagram whose header passes every check before the session lookup."""
    header = struct.pack("!BBHIQ", 1, 2 if keepalive else 1, 0, session_id, counter)
    return header + os.urandom(MIN_DATAGRAM_LEN - 16 + (0 if keepalive else 44))


def attacker_socket(gateway: Gateway):
    """A UDP socket in the client's namespace on another address than the client's."""
    routes = gateway.lab.exec(gateway.cl, ["ip", "-o", "-4", "address", "show"]).stdout
    device = next(line.split()[1] for line in routes.splitlines() if CLIENT_UNDERLAY in line)
    gateway.lab.exec(gateway.cl, ["ip", "address", "add", f"{ATTACKER}/24", "dev", device])
    sock = socket_in(gateway.cl)
    sock.bind((ATTACKER, 0))
    return sock


def test_unknown_session_ids_stop_in_the_kernel_and_its_ids_follow_the_registry(gateway):
    first = session(0x2001, "198.19.10.2")
    gateway.start_with(first)
    alice = gateway.client(first)
    alice.send_udp(b"before")
    assert gateway.observe()[2] == b"before"

    attacker = socket_in(gateway.cl)
    rng = random.Random(13)
    junk = [
        well_formed(rng.choice([rng.getrandbits(32), 0x2002, 0x2003]), i % 2 == 0, i)
        for i in range(600)
    ]
    for datagram in junk:
        attacker.sendto(datagram, (GW_UNDERLAY, PORT))
    samples = scrape_when(
        gateway,
        lambda samples: in_kernel(samples, "unknown_session") >= 600,
        10,
        "the junk counted in the kernel",
    )
    assert in_kernel(samples, "unknown_session") == 600
    assert inbound_drops(samples, "unknown_session") == 600  # none counted in user space
    assert_accounted(samples)

    # a session installed later gets through (its id is added to the kernel's set)
    second = session(0x2002, "198.19.10.3")
    gateway.feed.install(second)
    gateway.wait_sessions(2)
    bob = gateway.client(second)
    bob.send_udp(b"bob's first")
    assert gateway.observe()[2] == b"bob's first"

    # a session removed stops in the kernel (its id is taken out); the other flows
    gateway.feed.remove(0x2001)
    gateway.wait_sessions(1)
    alice.send_udp(b"after logout")
    bob.send_udp(b"bob goes on")
    assert gateway.observe()[2] == b"bob goes on"
    samples = scrape_when(
        gateway,
        lambda samples: in_kernel(samples, "unknown_session") == 601,
        5,
        "alice's packet after logout to be dropped in the kernel",
    )
    assert inbound_drops(samples, "unknown_session") == 601
    assert_accounted(samples)


def test_forged_tags_from_one_source_stop_at_its_budget_and_a_real_client_goes_on(gateway):
    sess = session(0x2101, "198.19.10.2")
    gateway.start_with(sess)
    alice = gateway.client(sess)
    alice.send_udp(b"hello")
    assert gateway.observe()[2] == b"hello"
    attacker = attacker_socket(gateway)
    before = gateway.scrape()

    # forged tags under alice's live session id, fresh counters (past the replay check)
    forged = [well_formed(0x2101, False, 1_000_000 + i) for i in range(2000)]
    started = time.monotonic()
    delivered = []
    for start in range(0, len(forged), 100):  # paced: nothing is lost in the socket buffer
        for datagram in forged[start : start + 100]:
            attacker.sendto(datagram, (GW_UNDERLAY, PORT))
        alice.send_udp(b"during %d" % start)
        delivered.append(gateway.observe()[2])
        time.sleep(0.01)
    assert delivered == [b"during %d" % start for start in range(0, len(forged), 100)]

    def counted():
        samples = gateway.scrape()
        tried = inbound_drops(samples, "bad_tag") - inbound_drops(before, "bad_tag")
        held = inbound_drops(samples, "source_over_budget") - inbound_drops(
            before, "source_over_budget"
        )
        return (samples, tried, held) if tried + held >= len(forged) else None

    samples, tried, held = wait_for(counted, 10, what="every forged datagram counted")
    elapsed = time.monotonic() - started
    print(f"{len(forged)} forged tags in {elapsed:.2f} s: {tried:.0f} tried, {held:.0f} held back")
    # the burst (200), what refilled meanwhile (100/s), and one overdrawn receive call
    assert 200 <= tried <= 200 + 100 * elapsed + 64, (tried, elapsed)
    assert tried + held == len(forged)
    assert_accounted(samples)

    # alice moves to a new port while her old source has no budget left: she is not
    # charged for the attacker's tags (another address), so her roaming works
    alice.sock = socket_in(gateway.cl)
    alice.sock.settimeout(5)
    alice.send_udp(b"roamed")
    assert gateway.observe()[2] == b"roamed"
