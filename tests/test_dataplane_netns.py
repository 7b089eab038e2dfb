"""The dataplane in network namespaces: real UDP, real TUN, real gRPC feed.

The topology and the test client are netlab.dataplane_lab's.
"""

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from dataplane.metrics import snmp_section
from netlab import metrics, socket_in, wait_for
from netlab.dataplane_lab import (
    CLIENT_UNDERLAY,
    GW_TUNNEL,
    GW_UNDERLAY,
    LAN_HOST,
    OBSERVER_PORT,
    PORT,
    Gateway,
    dataplane_gateway,
)
from netlab.feed import FeedServer, access_policy, key_epoch, session
from netlab.packets import ipv4_udp, udp_payload
from push_protocol.codec import PacketType, parse_header
from push_protocol.keys import KeyMaterial
from pushgate_api import control_pb2, control_pb2_grpc
from pushgate_io.tun import TUN_QUEUE_PACKETS

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml


@pytest.fixture
def gateway(tmp_path):
    with dataplane_gateway("pgdp", str(tmp_path)) as gw:
        yield gw


def serve_one(gateway: Gateway, session_id: int):
    """Start the dataplane with one session at 198.19.10.2 and a client for it."""
    sess = session(session_id, "198.19.10.2")
    gateway.start_with(sess)
    return gateway.client(sess)


def drops(samples, reason: str) -> float:
    return metrics.total(
        samples, "pushgate_dataplane_drops_total", direction="inbound", reason=reason
    )


def assert_accounted(samples) -> None:
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
    dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
    assert received == delivered + dropped, (received, delivered, dropped)
    read = metrics.total(samples, "pushgate_dataplane_tun_packets_read_total")
    sent = metrics.total(samples, "pushgate_dataplane_outbound_delivered_total")
    out_dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="outbound")
    assert read == sent + out_dropped, (read, sent, out_dropped)


def test_packets_flow_both_ways(gateway):
    client = serve_one(gateway, 0x1001)
    client.send_udp(b"hello gateway")
    host, port, data = gateway.observe()
    assert (host, port, data) == ("198.19.10.2", 4000, b"hello gateway")
    gateway.observer.sendto(b"hello client", ("198.19.10.2", 4000))
    src, sport, dport, payload = udp_payload(client.receive_inner())
    assert (src, sport, dport, payload) == (GW_TUNNEL, OBSERVER_PORT, 4000, b"hello client")
    samples = gateway.scrape()
    assert metrics.total(samples, "pushgate_dataplane_packets_total", direction="inbound") == 1
    assert metrics.total(samples, "pushgate_dataplane_packets_total", direction="outbound") >= 1
    assert_accounted(samples)
    # the TUN's queue is longer than Linux's 500: bursts while the loop waits for a CPU
    link = gateway.lab.exec(gateway.gw, ["ip", "-o", "link", "show", "pgdp0"]).stdout
    assert f" qlen {TUN_QUEUE_PACKETS}" in link, link


def test_the_access_policy_from_the_feed_decides_and_a_change_applies_at_once(gateway):
    """Through the real feed and process: a session reaches the lan host's port
    its policy allows, every other probe is a policy_denied drop (the accounting
    holds), and a PolicyChange on the feed flips it without a new session."""
    lan = gateway.lan(5000)
    other_port = gateway.lan(5001)
    sess = session(0x1010, "198.19.10.2", policy=access_policy(f"{LAN_HOST}/32 udp 5000"))
    gateway.start_with(sess)
    client = gateway.client(sess)
    client.send_udp(b"allowed", dst=LAN_HOST, dport=5000)
    assert lan.recvfrom(100) == (b"allowed", ("198.19.10.2", 4000))
    before = drops(gateway.scrape(), "policy_denied")
    for probe in range(3):
        client.send_udp(b"refused %d" % probe, dst=LAN_HOST, dport=5001)
    client.send_udp(b"allowed again", dst=LAN_HOST, dport=5000)
    assert lan.recvfrom(100)[0] == b"allowed again"

    def three_refused():
        samples = gateway.scrape()
        return samples if drops(samples, "policy_denied") == before + 3 else None

    samples = wait_for(three_refused, 5, what="three policy_denied drops")
    assert_accounted(samples)
    other_port.settimeout(0.2)
    with pytest.raises(TimeoutError):
        other_port.recvfrom(100)

    revision = metrics.total(samples, "pushgate_dataplane_feed_revision")
    gateway.feed.change_policy(0x1010, access_policy(f"{LAN_HOST}/32 udp 5001"))
    wait_for(
        lambda: metrics.total(gateway.scrape(), "pushgate_dataplane_feed_revision") > revision,
        5,
        what="the policy change to reach the dataplane",
    )
    client.send_udp(b"now allowed", dst=LAN_HOST, dport=5001)
    client.send_udp(b"now refused", dst=LAN_HOST, dport=5000)
    other_port.settimeout(5)
    assert other_port.recvfrom(100)[0] == b"now allowed"
    wait_for(
        lambda: drops(gateway.scrape(), "policy_denied") == before + 4,
        5,
        what="the refused probe after the change",
    )
    lan.settimeout(0.2)
    with pytest.raises(TimeoutError):
        lan.recvfrom(100)
    assert metrics.total(gateway.scrape(), "pushgate_dataplane_policy_compiles_total") == 2


def test_hostile_datagrams_are_counted_by_reason_and_valid_traffic_flows(gateway):
    client = serve_one(gateway, 0x1002)
    attacker = socket_in(gateway.cl)
    target = (GW_UNDERLAY, PORT)
    client.send_udp(b"first")
    assert gateway.observe()[2] == b"first"
    before = gateway.scrape()

    valid = client.send_udp(b"replay me")
    assert gateway.observe()[2] == b"replay me"
    attacker.sendto(valid, target)  # replayed exactly
    tampered = bytearray(
        client.session.seal(ipv4_udp(client.address, GW_TUNNEL, 1, 2, b"x"), time.time())
    )
    tampered[-1] ^= 1
    attacker.sendto(bytes(tampered), target)  # bad tag
    attacker.sendto(b"", target)  # zero length
    attacker.sendto(valid[:10], target)  # truncated header
    attacker.sendto(b"\x07" + valid[1:], target)  # bad version
    attacker.sendto(valid[:1] + b"\x09" + valid[2:], target)  # unknown type
    attacker.sendto(valid[:4] + struct.pack("!I", 0xBAD) + valid[8:], target)  # unknown session
    client.send_udp(b"spoofed", src="198.19.10.77")  # spoofed inner source
    client.send_inner(b"\x99" * 40)  # not an IP packet
    client.send_udp(bytes(1500))  # bigger than the tunnel MTU: ICMP back, counted
    icmp = client.receive_inner()
    assert icmp[9] == 1 and icmp[20:22] == b"\x03\x04"

    # Reordered inside the window: all accepted.
    sealed = [
        client.session.seal(
            ipv4_udp(client.address, GW_TUNNEL, 4000, OBSERVER_PORT, m), time.time()
        )
        for m in (b"one", b"two", b"three")
    ]
    for index in (2, 0, 1):
        attacker.sendto(sealed[index], target)
    assert sorted(gateway.observe()[2] for _ in range(3)) == [b"one", b"three", b"two"]

    client.send_udp(b"still flowing")
    assert gateway.observe()[2] == b"still flowing"
    after = gateway.scrape()
    expected = {
        "replay": 1,
        "bad_tag": 1,
        "too_short": 2,
        "bad_version": 1,
        "unknown_type": 1,
        "unknown_session": 1,
        "spoofed_source": 1,
        "inner_malformed": 1,
        "too_big": 1,
    }
    for reason, count in expected.items():
        assert drops(after, reason) - drops(before, reason) == count, reason
    assert_accounted(after)
    stub_channel = grpc.insecure_channel(f"unix:{gateway.workdir}/dataplane.sock")
    with stub_channel:
        stats = control_pb2_grpc.DataplaneStatsStub(stub_channel).GetSessionStats(
            control_pb2.GetSessionStatsRequest(session_id=0x1002), timeout=5
        )
    assert stats.last_drop_reason == "too_big"
    assert stats.endpoint.startswith(CLIENT_UNDERLAY)


def test_flood_of_random_datagrams_does_not_stop_valid_traffic(gateway):
    client = serve_one(gateway, 0x1003)
    flood = gateway.lab.start(
        gateway.cl,
        [sys.executable, "-c", FLOOD, GW_UNDERLAY, str(PORT), "3"],
        stdout=subprocess.PIPE,
    )
    sent = delivered = 0
    gateway.observer.setblocking(False)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        client.send_udp(b"valid %d" % sent)
        sent += 1
        try:
            while gateway.observer.recvfrom(65536):
                delivered += 1
        except BlockingIOError:
            pass
        time.sleep(0.01)
    flood_count = int(flood.communicate(timeout=30)[0])
    gateway.observer.settimeout(1)
    try:
        while gateway.observer.recvfrom(65536):
            delivered += 1
    except TimeoutError:
        pass
    samples = gateway.scrape()
    assert_accounted(samples)
    noise = sum(
        drops(samples, r)
        for r in ("too_short", "bad_version", "unknown_type", "bad_length", "unknown_session")
    )
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    kernel_lost = flood_count + sent - received  # dropped by the kernel's socket buffer
    print(
        f"flood {flood_count} datagrams, noise counted {noise:.0f}, kernel-dropped "
        f"{kernel_lost:.0f}; valid {delivered}/{sent} delivered"
    )
    assert delivered >= sent * 0.5, f"only {delivered} of {sent} valid packets got through"
    stalls = metrics.total(samples, "pushgate_dataplane_loop_lag_seconds_count") - metrics.total(
        samples, "pushgate_dataplane_loop_lag_seconds_bucket", le="1.0"
    )
    assert stalls == 0, "the receive loop stalled for more than a second"


FLOOD = """
import os, random, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
blobs = [os.urandom(random.choice((0, 8, 31, 32, 33, 100, 1400, 9000))) for _ in range(256)]
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for blob in blobs:
        s.sendto(blob, (host, port))
    n += len(blobs)
print(n)
"""


def test_rotation_removal_and_roaming(gateway):
    client = serve_one(gateway, 0x1004)
    client.send_udp(b"epoch 0")
    assert gateway.observe()[2] == b"epoch 0"

    new_keys = key_epoch(1)
    gateway.feed.rotate(0x1004, new_keys)
    wait_for(
        lambda: metrics.total(gateway.scrape(), "pushgate_dataplane_session_rekeys_total"),
        10,
        what="the rotation to reach the dataplane",
    )
    client.session.install_next(
        KeyMaterial(1, new_keys.client_to_server_key, new_keys.server_to_client_key, time.time()),
        time.time() - 2,
    )  # promote at once
    datagram = client.send_udp(b"epoch 1")
    assert parse_header(datagram).key_epoch == 1
    assert gateway.observe()[2] == b"epoch 1"

    # Roaming: the same session from a new source port; replies follow it.
    client.sock = socket_in(gateway.cl)
    client.sock.settimeout(5)
    client.send_udp(b"moved", sport=4001)
    assert gateway.observe()[2] == b"moved"
    gateway.observer.sendto(b"found you", ("198.19.10.2", 4001))
    assert udp_payload(client.receive_inner())[3] == b"found you"

    gateway.feed.remove(0x1004)
    gateway.wait_sessions(0)
    before = drops(gateway.scrape(), "unknown_session")
    client.send_udp(b"after logout")
    wait_for(
        lambda: drops(gateway.scrape(), "unknown_session") == before + 1,
        5,
        what="the packet after logout to be dropped",
    )


def test_resync_after_the_feed_restarts_and_after_a_dataplane_restart(gateway):
    client = serve_one(gateway, 0x1005)

    gateway.feed.stop()  # the auth service goes away: traffic keeps flowing
    client.send_udp(b"auth is down")
    assert gateway.observe()[2] == b"auth is down"

    restarted = FeedServer(gateway.feed.path)
    restarted.sessions = dict(gateway.feed.sessions)
    second = session(0x1006, "198.19.10.3")
    restarted.sessions[second.session_id] = second
    restarted.revision = 100
    gateway.feed = restarted.start()
    gateway.wait_sessions(2)
    client.send_udp(b"after resync")
    assert gateway.observe()[2] == b"after resync"  # counters and window were kept

    gateway.lab.stop(gateway.process, sig=9)  # SIGKILL the dataplane, then restart it
    gateway.start_dataplane()
    gateway.wait_sessions(2)
    # Re-learned keys: the packet is refused and the client asked to rekey ...
    client.send_udp(b"after restart")
    receive_rekey_request(client)
    rekey(gateway, client, 1)  # ... which it does (the auth service's part played here)
    client.send_udp(b"after the rekey")
    assert gateway.observe()[2] == b"after the rekey"
    gateway.observer.sendto(b"reply after restart", ("198.19.10.2", 4000))
    assert udp_payload(client.receive_inner())[3] == b"reply after restart"


def receive_rekey_request(client) -> None:
    """The REKEY_REQUIRED the dataplane answers a packet under re-learned keys with."""
    datagram = client.sock.recv(65536)
    header = parse_header(datagram, True)
    assert header.packet_type is PacketType.REKEY_REQUIRED
    client.session.open(datagram, time.time(), header)
    assert client.session.needs_rekey(time.time())


def rekey(gateway, client, epoch: int) -> None:
    """What a rekey does: the auth service mints keys and publishes them (a watch
    event), the client installs them."""
    before = metrics.total(gateway.scrape(), "pushgate_dataplane_session_rekeys_total")
    new_keys = key_epoch(epoch)
    gateway.feed.rotate(client.session.session_id, new_keys)
    wait_for(
        lambda: metrics.total(gateway.scrape(), "pushgate_dataplane_session_rekeys_total") > before,
        10,
        what="the rotation to reach the dataplane",
    )
    client.session.install_next(
        KeyMaterial(
            epoch, new_keys.client_to_server_key, new_keys.server_to_client_key, time.time()
        ),
        time.time(),
    )


def session_stats(gateway, session_id: int) -> control_pb2.SessionStats:
    with grpc.insecure_channel(f"unix:{gateway.workdir}/dataplane.sock") as channel:
        return control_pb2_grpc.DataplaneStatsStub(channel).GetSessionStats(
            control_pb2.GetSessionStatsRequest(session_id=session_id), timeout=5
        )


def test_packets_replayed_after_a_restart_are_refused_and_move_nothing(gateway):
    client = serve_one(gateway, 0x100A)
    captured = [client.send_udp(b"captured %d" % n) for n in range(3)]
    assert sorted(gateway.observe()[2] for _ in captured) == [
        b"captured 0",
        b"captured 1",
        b"captured 2",
    ]

    gateway.lab.stop(gateway.process, sig=9)
    gateway.start_dataplane()
    gateway.wait_sessions(1)
    replayer = socket_in(gateway.cl)  # another source: a replay must not become the endpoint
    replayer.settimeout(5)
    for datagram in captured:
        replayer.sendto(datagram, (GW_UNDERLAY, PORT))
    wait_for(
        lambda: drops(gateway.scrape(), "rekey_required") == 3,
        10,
        what="three refused replays",
    )
    gateway.observer.settimeout(0.5)
    with pytest.raises(TimeoutError):
        gateway.observe()  # nothing reached the network behind the gateway
    assert session_stats(gateway, 0x100A).endpoint == ""
    # The one answer (a second apart at most) went to where the packets came from.
    assert parse_header(replayer.recv(65536), True).packet_type is PacketType.REKEY_REQUIRED
    for datagram in captured:  # again: now a cheap replay drop
        replayer.sendto(datagram, (GW_UNDERLAY, PORT))
    wait_for(lambda: drops(gateway.scrape(), "replay") == 3, 10, what="three replays")
    samples = gateway.scrape()
    assert metrics.total(samples, "pushgate_dataplane_rekey_requests_sent_total") == 1
    assert_accounted(samples)


def test_an_authentic_packet_out_of_order_does_not_move_the_endpoint(gateway):
    client = serve_one(gateway, 0x100B)
    sealed = [
        client.session.seal(
            ipv4_udp(client.address, GW_TUNNEL, 4000, OBSERVER_PORT, m), time.time()
        )
        for m in (b"early", b"late")
    ]
    client.sock.sendto(sealed[1], (GW_UNDERLAY, PORT))
    assert gateway.observe()[2] == b"late"
    spoofer = socket_in(gateway.cl)  # delays the early one and sends it from elsewhere
    spoofer.sendto(sealed[0], (GW_UNDERLAY, PORT))
    assert gateway.observe()[2] == b"early"  # in the window: delivered, but ...
    own_port = client.sock.getsockname()[1]
    assert session_stats(gateway, 0x100B).endpoint == f"{CLIENT_UNDERLAY}:{own_port}"
    gateway.observer.sendto(b"to the client", ("198.19.10.2", 4000))
    assert udp_payload(client.receive_inner())[3] == b"to the client"  # ... nothing moved


def test_expiry_and_stalled_sessions_are_visible(gateway):
    talker = session(0x1007, "198.19.10.2", keepalive=1)
    short = session(0x1008, "198.19.10.3", expires_at=time.time() + 2)
    gateway.start_with(talker, short)
    gateway.feed.stop()  # expiry must not depend on the auth service
    wait_for(
        lambda: metrics.total(gateway.scrape(), "pushgate_dataplane_session_expiries_total") == 1,
        10,
        what="the short session to expire",
    )
    gateway.wait_sessions(1)

    # The talker only sends and nothing answers: stalled after two keepalives (2 s).
    client = gateway.client(talker)
    deadline = time.monotonic() + 15
    stalled = 0.0
    while time.monotonic() < deadline and not stalled:
        client.send_udp(b"anyone there?")
        time.sleep(0.5)
        stalled = metrics.total(gateway.scrape(), "pushgate_dataplane_stalled_sessions")
    assert stalled == 1
    gateway.log.flush()
    log = Path(gateway.log.name).read_text()
    assert "session 0x00001007 is stalled: it receives but sends nothing" in log
    gateway.observer.sendto(b"answer", ("198.19.10.2", 4000))  # traffic both ways again
    udp_payload(client.receive_inner())
    client.send_udp(b"thanks")
    wait_for(
        lambda: metrics.total(gateway.scrape(), "pushgate_dataplane_stalled_sessions") == 0,
        5,
        what="the stall to clear",
    )


def test_tun_write_errors_are_counted_and_not_fatal(gateway):
    client = serve_one(gateway, 0x1009)
    client.send_udp(b"before")
    assert gateway.observe()[2] == b"before"
    gateway.lab.exec(gateway.gw, ["ip", "link", "set", "pgdp0", "down"])
    for _ in range(5):
        client.send_udp(b"into a down TUN")
    wait_for(
        lambda: drops(gateway.scrape(), "tun_write_error") == 5, 10, what="five TUN write errors"
    )
    gateway.lab.exec(gateway.gw, ["ip", "link", "set", "pgdp0", "up"])
    client.send_udp(b"after")
    assert gateway.observe()[2] == b"after"
    assert_accounted(gateway.scrape())


def kernel_snmp(lab, ns: str, section: str) -> dict[str, int]:
    return snmp_section(lab.exec(ns, ["cat", "/proc/net/snmp"]).stdout, section)


def dataplane_metric(samples, name: str, **labels) -> float:
    return metrics.total(samples, f"pushgate_dataplane_{name}", **labels)


def moved(after, before, name: str, **labels) -> int:
    """How much a dataplane metric moved between two scrapes."""
    return int(dataplane_metric(after, name, **labels) - dataplane_metric(before, name, **labels))


def settled(gateway: Gateway):
    """A scrape taken once the dataplane has read everything its TUN held."""
    return metrics.settled(gateway.scrape, "pushgate_dataplane_tun_packets_read_total")


SO_RCVBUFFORCE = 33  # asm-generic/socket.h (root may pass rmem_max); not in Python 3.11
BLAST = """
import socket, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload, n, end = bytes(1200), 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(64):
        s.sendto(payload, (host, 4000))
    n += 64
print(n)
"""


def test_sends_the_kernel_refuses_are_drops_and_the_outbound_sum_holds(gateway):
    """A TUN->UDP blast towards a client behind a slow link (10 Mbit/s, a 128 kB
    queue): the kernel refuses the dataplane's sends (ENOBUFS). Each refused send
    call is an io error and each of its datagrams a `no_buffer_space` drop; the
    kernel's own count of refusals (SndbufErrors) is exported and equals the calls;
    tun_packets_read == outbound_delivered + drops exactly, and "delivered" is
    true: the client receives exactly the datagrams counted as delivered."""
    client = serve_one(gateway, 0x100A)
    client.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)  # holds it all
    client.send_udp(b"here I am")  # gives the session its endpoint
    assert gateway.observe()[2] == b"here I am"
    lab, gw, cl = gateway.lab, gateway.gw, gateway.cl
    # The blast comes from the client's namespace, forwarded into the TUN, so that the
    # dataplane's socket is the only UDP sender in the gateway's namespace.
    lab.exec(gw, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    lab.exec(cl, ["ip", "route", "add", "198.19.10.0/24", "via", GW_UNDERLAY])
    uplink = lab.exec(gw, ["ip", "-o", "link", "show", "type", "veth"]).stdout
    uplink = uplink.split(":")[1].strip().split("@")[0]
    shape = f"tc qdisc add dev {uplink} root tbf rate 10mbit burst 128kb limit 128kb"
    lab.exec(gw, shape.split())
    before, udp_before = settled(gateway), kernel_snmp(lab, gw, "Udp")
    client_before = kernel_snmp(lab, cl, "Udp")
    blast = lab.start(
        cl, [sys.executable, "-c", BLAST, "198.19.10.2", "1.5"], stdout=subprocess.PIPE
    )
    blasted = int(blast.communicate(timeout=30)[0])
    after, udp_after = settled(gateway), kernel_snmp(lab, gw, "Udp")

    client.sock.setblocking(False)
    received = 0
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:  # the shaped queue drains, then nothing
        try:
            datagram = client.sock.recv(65536)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        received += parse_header(datagram).packet_type == PacketType.DATA
        quiet_since = time.monotonic()

    refused = moved(after, before, "drops_total", direction="outbound", reason="no_buffer_space")
    calls = moved(after, before, "io_errors_total", kind="udp_send")
    delivered = moved(after, before, "outbound_delivered_total")
    kernel = udp_after["SndbufErrors"] - udp_before["SndbufErrors"]
    read = moved(after, before, "tun_packets_read_total")
    print(
        f"blasted {blasted}, read {read}, delivered {delivered},"
        f" no_buffer_space {refused} in {calls} refused calls (kernel: {kernel}),"
        f" the client received {received}"
    )
    assert refused > 0  # the slow link made the kernel refuse ...
    assert calls == kernel  # ... and every refusal it counted is one of ours
    assert (
        moved(after, before, "kernel_udp_sndbuf_errors_total") == kernel
    )  # exported as it counts it
    assert dataplane_metric(after, "queue_high_water", queue="udp_send") == 0  # none was EAGAIN
    assert moved(after, before, "drops_total", direction="outbound", reason="socket_error") == 0
    assert_accounted(after)
    client_after = kernel_snmp(lab, cl, "Udp")
    assert client_after["RcvbufErrors"] == client_before["RcvbufErrors"]
    assert received == delivered


def test_icmp_errors_from_a_vanished_client_are_read_counted_and_cost_nothing(gateway):
    """The client's socket closes: its kernel answers each datagram the dataplane
    sends it with ICMP port unreachable, which (the socket has IP_RECVERR) lands on
    the push socket's error queue and fails its next call once. Each report is read
    and counted; no send fails for it (every datagram for the client is sent), no
    receive error is counted, the error queue holds no receive-buffer memory, and
    the loop goes on: the client comes back from a new port and traffic flows."""
    client = serve_one(gateway, 0x100B)
    client.send_udp(b"here I am")
    assert gateway.observe()[2] == b"here I am"
    lab, gw, cl = gateway.lab, gateway.gw, gateway.cl
    lab.exec(cl, ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])  # answer every datagram
    before, icmp_before = gateway.scrape(), kernel_snmp(lab, cl, "Icmp")
    client.sock.close()
    rounds = 20
    for _ in range(rounds):  # two sizes: two send calls, the second after the first's ICMP
        gateway.observer.sendto(b"s" * 10, ("198.19.10.2", 4000))
        gateway.observer.sendto(b"L" * 300, ("198.19.10.2", 4000))
        time.sleep(0.02)

    def reports(samples) -> float:
        return dataplane_metric(samples, "udp_error_reports_total", error="ECONNREFUSED")

    def unreachable() -> int:  # what the client's kernel answered
        return kernel_snmp(lab, cl, "Icmp")["OutDestUnreachs"] - icmp_before["OutDestUnreachs"]

    settled(gateway)  # every packet for the client sent: every ICMP error answered
    wait_for(
        lambda: 0 < unreachable() == reports(gateway.scrape()) - reports(before),
        10,
        what="a report for every ICMP error",
    )
    after = gateway.scrape()
    assert reports(after) - reports(before) == unreachable() == 2 * rounds
    assert moved(after, before, "outbound_delivered_total") == 2 * rounds
    assert moved(after, before, "drops_total", direction="outbound", reason="socket_error") == 0
    assert moved(after, before, "io_errors_total", kind="udp_send") == 0
    assert moved(after, before, "io_errors_total", kind="udp_recv") == 0
    port = f":{PORT:04X} "
    table = lab.exec(gw, ["cat", "/proc/net/udp"]).stdout.splitlines()
    (row,) = [line.split() for line in table if port in line]
    assert int(row[4].split(":")[1], 16) == 0  # rx_queue: nothing left on the error queue

    client.sock = socket_in(cl)  # back, from another port
    client.sock.settimeout(5)
    client.send_udp(b"back again", sport=4001)
    assert gateway.observe()[2] == b"back again"
    gateway.observer.sendto(b"welcome back", ("198.19.10.2", 4001))
    assert udp_payload(client.receive_inner())[3] == b"welcome back"
    assert_accounted(gateway.scrape())
