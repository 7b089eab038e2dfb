"""The hostile input and fault suite (issue 6): the real gateway under attack and faults.

One gateway (netlab.gateway: pushgate-auth, pushgate-dataplane, two real
pushgate-clients "alice" and "bob", a lan host behind NAT) serves the module,
plus an "attacker" namespace linked straight to the gateway with a 65535-byte
MTU, so a 65507-byte datagram arrives whole, never as IP fragments. Each test
attacks it while real traffic flows and proves its pass criterion from the
dataplane's metrics, its DataplaneStats service, the auth service's metrics,
the kernel's own counters or the clients' status. Figures are printed (run
with -s) and, if PUSHGATE_RESULTS names a file, appended to it as JSON lines;
docs/reliability.md lists the last ones.

PUSHGATE_SOAK_SECONDS makes every timed scenario run at least that long
(`make soak`); by default they take a few seconds each.
"""

import ctypes
import datetime
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc
import pytest

from auth_service.pki import make_ca
from dataplane.fair_queue import FLOW_LIMIT
from dataplane.metrics import snmp_section
from netlab import Lab, http_get, metrics, refuses_nobody, socket_in, wait_for
from netlab.gateway import AUTH_PORT, DATAPLANE_PORT, GATEWAY, LAN_HOST, GatewayLab
from netlab.packets import ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.codec import PacketType, new_cipher, parse_header, seal
from push_protocol.constants import REPLAY_WINDOW_SIZE
from pushgate_api import control_pb2, control_pb2_grpc

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

SOAK_SECONDS = float(os.environ.get("PUSHGATE_SOAK_SECONDS", "0"))
RESULTS = os.environ.get("PUSHGATE_RESULTS")
SEED = 11
TRANSFER = 16 * 1024 * 1024
ATTACKER, ATTACKER_GW = "198.18.3.2", "198.18.3.1"
AUTH_METRICS_PORT = 9101
# Short key lifetimes, so every scenario runs across rekeys: clients rekey every
# KEY_LIFETIME s, and keys not replaced within KEY_EXPIRY s end their session.
KEY_LIFETIME, KEY_EXPIRY = 3, 8
NOISE_REASONS = ("too_short", "too_long", "bad_version", "unknown_type", "bad_length")


def seconds(default: float) -> float:
    """How long a timed scenario runs: its default, or longer under `make soak`."""
    return max(default, SOAK_SECONDS)


def record(scenario: str, **figures) -> None:
    print(f"\n[hostile] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    if RESULTS:
        with open(RESULTS, "a") as handle:
            handle.write(json.dumps({"scenario": scenario, "soak": SOAK_SECONDS, **figures}) + "\n")


class Hostile:
    """The gateway lab plus what the attacks need."""

    def __init__(self, lab: Lab, gw: GatewayLab) -> None:
        self.lab = lab
        self.gw = gw
        self.atk = lab.namespace("atk")
        dev_atk, dev_gw = lab.link(self.atk, f"{ATTACKER}/24", gw.gw, f"{ATTACKER_GW}/24")
        lab.exec(self.atk, ["ip", "link", "set", dev_atk, "mtu", "65535"])
        lab.exec(gw.gw, ["ip", "link", "set", dev_gw, "mtu", "65535"])
        lab.exec(self.atk, ["ip", "route", "add", "198.18.1.0/24", "via", ATTACKER_GW])

    # -- observing -------------------------------------------------------------------

    def dp(self) -> dict:
        return self.gw.scrape()

    def auth_metrics(self) -> dict:
        return metrics.parse(http_get(self.gw.gw, AUTH_METRICS_PORT, "/metrics").decode())

    def kernel_udp(self) -> dict[str, int]:
        """The gateway namespace's UDP counters from /proc/net/snmp (RcvbufErrors, ...)."""
        return snmp_section(self.lab.exec(self.gw.gw, ["cat", "/proc/net/snmp"]).stdout, "Udp")

    def kernel_drops(self) -> dict[str, int]:
        """Where the kernels on the path drop on their own: UDP receive buffers (gateway,
        clients) and TUN transmit queues (pg0, pgcN), read from the kernel itself (the
        dataplane exports its own two as kernel_drops_total; the clients' are only here)."""
        found = {}
        for ns, dev in (
            (self.gw.gw, "pg0"),
            *((c, f"pgc{i}") for i, c in enumerate(self.gw.clients)),
        ):
            text = self.lab.exec(
                ns,
                ["sh", "-c", f"cat /sys/class/net/{dev}/statistics/tx_dropped; cat /proc/net/snmp"],
                check=False,
            ).stdout
            lines = text.splitlines()
            if lines and lines[0].isdigit():
                found[f"{dev} tx_dropped"] = int(lines[0])
            udp = snmp_section(text, "Udp")
            found[f"{ns.rsplit('-', 1)[1]} udp RcvbufErrors"] = udp["RcvbufErrors"]
        return found

    def settled(self) -> dict:
        """A scrape taken once the dataplane has read everything queued for it."""
        return metrics.settled(self.dp, "pushgate_dataplane_datagrams_received_total")

    def feed_sessions(self) -> dict[int, control_pb2.Session]:
        """What the auth service's session feed lists (its control socket, as root)."""
        path = os.path.join(self.gw.workdir, "run", "control.sock")
        with grpc.insecure_channel(f"unix:{path}") as channel:
            listing = control_pb2_grpc.SessionFeedStub(channel).ListSessions(
                control_pb2.ListSessionsRequest(), timeout=10
            )
        return {s.session_id: s for s in listing.sessions}

    def stats(self) -> dict[int, control_pb2.SessionStats]:
        """Per-session state from the dataplane's DataplaneStats service."""
        path = os.path.join(self.gw.workdir, "run", "dataplane.sock")
        with grpc.insecure_channel(f"unix:{path}") as channel:
            listing = control_pb2_grpc.DataplaneStatsStub(channel).ListSessionStats(
                control_pb2.ListSessionStatsRequest(), timeout=10
            )
        return {s.session_id: s for s in listing.sessions}

    def client_dev(self, index: int) -> str:
        """The client namespace's underlay veth."""
        out = self.lab.exec(self.gw.clients[index], ["ip", "-o", "link", "show", "type", "veth"])
        return out.stdout.split(":")[1].strip().split("@")[0]

    def just_rekeyed(self, index: int) -> None:
        """Return right after client `index` rekeyed: the next rekey is KEY_LIFETIME s away."""
        epoch = self.gw.status(index)["tunnel"].split("key epoch ")[1]
        wait_for(
            lambda: self.gw.status(index)["tunnel"].split("key epoch ")[1] != epoch,
            3 * KEY_LIFETIME + 10,
            interval=0.05,
            what="a rekey",
        )

    def process(self, pid: int) -> dict[str, int]:
        """Resident memory (bytes) and open file descriptors of a process we started."""
        with open(f"/proc/{pid}/status") as handle:
            rss = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        return {"rss": rss * 1024, "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def churn(self, cycles: int, workers: int = 8) -> subprocess.Popen:
        gw = self.gw
        return self.lab.start(
            gw.clients[1],
            [
                *(sys.executable, "-m", "netlab.churn", "churn", f"{GATEWAY}:{AUTH_PORT}"),
                *(gw.ca, "churner", gw.password_file, str(cycles), str(workers)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def consistent(self) -> tuple[set[int], set[int]]:
        """The session ids the auth service lists, and those the dataplane holds."""
        return set(self.feed_sessions()), set(self.stats())

    def session_id(self, index: int) -> int:
        return int(self.gw.status(index)["tunnel"].split("session ")[1].split()[0], 16)

    # -- traffic -----------------------------------------------------------------------

    def ping(self, index: int, count: int, interval: float = 0.1) -> subprocess.Popen:
        return self.lab.start(
            self.gw.clients[index],
            ["ping", "-c", str(count), "-i", str(interval), "-W", "2", LAN_HOST],
            stdout=subprocess.PIPE,
            text=True,
        )


def ping_loss(process: subprocess.Popen) -> tuple[int, int]:
    """(sent, received) of a finished ping."""
    out, _ = process.communicate(timeout=600)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    return int(match[1]), int(match[2])


def transfers_while(h: Hostile, busy: subprocess.Popen, index: int = 0) -> tuple[int, int, float]:
    """Fetch over and over while `busy` runs: (fetches, good hashes, lowest Mbit/s)."""
    done = good = 0
    slowest = float("inf")
    while True:
        ok, rate = h.gw.fetched(h.gw.fetch(index))
        done += 1
        good += ok
        slowest = min(slowest, rate)
        if busy.poll() is not None:
            return done, good, slowest


def kernel_drops(samples, where: str) -> float:
    return metrics.total(samples, "pushgate_dataplane_kernel_drops_total", where=where)


def drops(samples, reason: str, direction: str = "inbound") -> float:
    return metrics.total(
        samples, "pushgate_dataplane_drops_total", direction=direction, reason=reason
    )


def lag_over(samples, bound: str) -> float:
    """Loop-lag observations later than `bound` seconds (a histogram bucket edge)."""
    return metrics.total(samples, "pushgate_dataplane_loop_lag_seconds_count") - metrics.total(
        samples, "pushgate_dataplane_loop_lag_seconds_bucket", le=bound
    )


def max_lag(after, before) -> str:
    """The smallest histogram bucket edge that holds every loop-lag observation in between."""
    total = delta(after, before, metrics.total, "pushgate_dataplane_loop_lag_seconds_count")
    edges = sorted(
        float(dict(labels)["le"])
        for (name, labels) in after
        if name == "pushgate_dataplane_loop_lag_seconds_bucket"
    )
    for edge in edges:
        label = "+Inf" if edge == float("inf") else str(edge)
        bucket = "pushgate_dataplane_loop_lag_seconds_bucket"
        if delta(after, before, metrics.total, bucket, le=label) == total:
            return f"<= {label} s"
    return "?"


def all_drops(after, before) -> dict[str, int]:
    """Every drop counter that moved, as 'direction reason': count."""
    moved = {}
    for (name, labels), value in after.items():
        if name == "pushgate_dataplane_drops_total":
            change = value - before.get((name, labels), 0)
            if change:
                label = dict(labels)
                moved[f"{label['direction']} {label['reason']}"] = int(change)
    return moved


def delta(after, before, fn, *args, **labels) -> float:
    return fn(after, *args, **labels) - fn(before, *args, **labels)


def assert_accounted(samples) -> None:
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
    dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
    assert received == delivered + dropped, (received, delivered, dropped)
    read = metrics.total(samples, "pushgate_dataplane_tun_packets_read_total")
    sent = metrics.total(samples, "pushgate_dataplane_outbound_delivered_total")
    out_dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="outbound")
    assert read == sent + out_dropped, (read, sent, out_dropped)


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hostile"))
    with Lab("pghost") as lab:
        gw = GatewayLab(lab, workdir, clients=2, keepalive_seconds=2)
        with open(gw.config) as handle:
            text = handle.read()
        text = re.sub(
            r"(?m)^key_lifetime_seconds = .*$", f"key_lifetime_seconds = {KEY_LIFETIME}", text
        )
        text = re.sub(r"(?m)^key_expiry_seconds = .*$", f"key_expiry_seconds = {KEY_EXPIRY}", text)
        # The churner logs in 8 at a time: above the default cap, which would end sessions
        # it is about to log out.
        text = re.sub(r"(?m)^max_sessions_per_user = .*$", "max_sessions_per_user = 16", text)
        with open(gw.config, "w") as handle:
            handle.write(text)
        hostile = Hostile(lab, gw)
        gw.add_user("alice")
        gw.add_user("bob")
        gw.add_user("churner")
        gw.start()
        gw.connect(0, "alice")
        gw.connect(1, "bob")
        gw.serve_transfers(TRANSFER, SEED)
        wait_for(lambda: gw.ping(0, LAN_HOST, count=1).returncode == 0, 20, what="alice's tunnel")
        yield hostile


# -- noise ---------------------------------------------------------------------------------


NOISE_CAPACITY: list[float] = []  # datagrams/s the dataplane handled in the flood


def noise_run(h: Hostile, duration: float, seed: int, rate: float = 0) -> dict:
    """Noise from the attacker while alice transfers and bob pings; the figures."""
    before, udp_before, path_before = h.settled(), h.kernel_udp(), h.kernel_drops()
    command = [sys.executable, "-m", "netlab.noise", GATEWAY, str(DATAPLANE_PORT)]
    noise = h.lab.start(
        h.atk,
        [*command, str(duration), str(seed), "--rate", str(rate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    ping = h.ping(1, int(duration / 0.05), interval=0.05)
    fetches, good, slowest = transfers_while(h, noise)
    report = json.loads(noise.communicate(timeout=60)[0])
    sent, received = ping_loss(ping)
    after, udp_after, path_after = h.settled(), h.kernel_udp(), h.kernel_drops()
    counted = {r: int(delta(after, before, drops, r)) for r in (*NOISE_REASONS, "unknown_session")}
    expected = report["by_reason"]
    figures = {
        "seconds": report["seconds"],
        "datagrams": report["sent"],
        "rate_per_s": report["rate"],
        "sizes": report["by_size"],
        "expected": expected,
        "counted": counted,
        "missing": {r: expected.get(r, 0) - counted[r] for r in counted},
        "kernel_rcvbuf_drops": udp_after["RcvbufErrors"] - udp_before["RcvbufErrors"],
        "dataplane_kernel_drops": int(delta(after, before, kernel_drops, "udp_receive_buffer")),
        "kernel_udp_in": udp_after["InDatagrams"] - udp_before["InDatagrams"],
        "fetches": f"{good}/{fetches}",
        "slowest_mbit": round(slowest),
        "ping": f"{received}/{sent}",
        "lag_over_100ms": delta(after, before, lag_over, "0.1"),
        "lag_over_250ms": delta(after, before, lag_over, "0.25"),
        "max_lag": max_lag(after, before),
        # where valid packets may have gone: the dataplane's other drops, the kernels'
        "other_drops": {
            k: v for k, v in all_drops(after, before).items() if k.split()[1] not in counted
        },
        "path_drops": {k: v - path_before[k] for k, v in path_after.items() if v - path_before[k]},
    }
    assert expected.get("live_session", 0) == 0  # odds ~2^-30 per datagram
    assert good == fetches >= 1, "a transfer under noise had the wrong hash"
    assert figures["lag_over_250ms"] == 0, "the receive loop ran a timer > 250 ms late"
    # Datagram for datagram: every noise datagram is under the reason the protocol
    # document gives it, or was dropped by the kernel before the dataplane saw it
    # (the socket's receive buffer overflowed; the kernel counts that itself).
    missing, kernel = figures["missing"], figures["kernel_rcvbuf_drops"]
    assert figures["dataplane_kernel_drops"] == kernel  # the dataplane exports them itself
    assert all(m >= 0 for m in missing.values()), f"counted more than was sent: {missing}"
    assert sum(missing.values()) <= kernel, (missing, kernel)
    if kernel == 0:
        assert all(m == 0 for m in missing.values()), missing
    assert_accounted(after)
    figures["handled_per_s"] = round(sum(counted.values()) / report["seconds"])
    figures["_ping"] = (sent, received)
    return figures


def test_noise_flat_out_is_counted_and_valid_traffic_keeps_flowing(h):
    """As fast as one process can send: more than the dataplane can read."""
    figures = noise_run(h, seconds(5), seed=1)
    sent, received = figures.pop("_ping")
    NOISE_CAPACITY.append(figures["handled_per_s"])
    kernel_share = figures["kernel_rcvbuf_drops"] / max(
        1, figures["kernel_udp_in"] + figures["kernel_rcvbuf_drops"]
    )
    figures["kernel_drop_share"] = round(kernel_share, 3)
    record("noise flat out", **figures)
    # The kernel drops what overflows the socket buffer, noise and valid alike; the
    # dataplane must not make valid traffic fare worse than that.
    assert received >= sent * (1 - kernel_share - 0.1), (received, sent, kernel_share)


def test_noise_within_capacity_is_counted_exactly_and_costs_no_pings(h):
    """At a quarter of the rate the dataplane handled flat out: nothing should overflow."""
    rate = (NOISE_CAPACITY[0] if NOISE_CAPACITY else 40000) / 4
    figures = noise_run(h, seconds(5), seed=2, rate=rate)
    sent, received = figures.pop("_ping")
    record("noise at a quarter of capacity", **figures)
    # The dataplane drops no valid packet. The little ping loss there is happens in the
    # kernels' TUN queues while alice's bulk transfer bursts (see path_drops; the rekey
    # test reports the same without noise), so it is bounded, not required to be zero.
    assert figures["other_drops"] == {}, figures["other_drops"]
    assert received >= sent * 0.9, f"ping loss under noise: {received}/{sent}"


# -- rotation and limits -------------------------------------------------------------------


KEY_DROPS = ("unknown_key", "key_expired", "session_expired", "bad_tag", "no_endpoint")


def test_rekeys_under_traffic_lose_nothing(h):
    """Both clients rekey every KEY_LIFETIME s. Phase 1: alice transfers flat out
    (every hash must match). Phase 2: both ping 20 times a second with nothing
    else going on (not one ping may be lost). Phase 1 also pings, but the bulk
    transfer overflows the kernel's queue into the gateway TUN (pg0 tx_dropped,
    a kernel counter), so its ping losses are reported, not judged."""
    duration = seconds(3 * KEY_LIFETIME)
    sessions = [h.session_id(0), h.session_id(1)]
    before, auth_before, kernel_before = h.settled(), h.auth_metrics(), h.kernel_drops()
    ping = h.ping(1, int(duration / 0.1))
    fetches, good, slowest = transfers_while(h, ping)
    bulk_ping = ping_loss(ping)
    middle, kernel_middle = h.settled(), h.kernel_drops()
    pings = [h.ping(i, int(duration / 0.05), interval=0.05) for i in (0, 1)]
    quiet = [ping_loss(p) for p in pings]
    after, auth_after = h.settled(), h.auth_metrics()
    key_drops = {
        f"{direction} {reason}": int(delta(after, before, drops, reason, direction))
        for direction in ("inbound", "outbound")
        for reason in KEY_DROPS
    }
    rekeys = [
        int(delta(b, a, metrics.total, "pushgate_dataplane_session_rekeys_total"))
        for a, b in ((before, middle), (middle, after))
    ]
    logins = delta(auth_after, auth_before, metrics.total, "pushgate_auth_logins_total")
    record(
        "rekeys under traffic",
        seconds_per_phase=duration,
        rekeys_per_phase=rekeys,
        fetches=f"{good}/{fetches}",
        slowest_mbit=round(slowest),
        bulk_phase_ping=f"{bulk_ping[1]}/{bulk_ping[0]}",
        bulk_phase_kernel_drops={
            k: v - kernel_before[k] for k, v in kernel_middle.items() if v != kernel_before[k]
        },
        quiet_phase_pings=[f"{r}/{s}" for s, r in quiet],
        key_drops=sum(key_drops.values()),
        drops=all_drops(after, before),
        expiries=delta(after, before, metrics.total, "pushgate_dataplane_session_expiries_total"),
    )
    assert good == fetches >= 1
    assert all(r == s for s, r in quiet), f"pings lost across rekeys: {quiet}"
    expected = 2 * (duration // KEY_LIFETIME - 1)
    assert min(rekeys) >= expected, f"clients did not rekey on schedule: {rekeys}"
    assert all(v == 0 for v in key_drops.values()), key_drops
    assert delta(after, before, metrics.total, "pushgate_dataplane_session_expiries_total") == 0
    assert logins == 0 and [h.session_id(0), h.session_id(1)] == sessions, h.gw.log_tail(
        "client0", "client1", "auth"
    )  # no re-login


# -- malformed and crafted --------------------------------------------------------------------

STATE_FIELDS = ("endpoint", "rx_packets", "rx_bytes", "last_received_unix_ms", "key_epoch")


def crafted(alice: control_pb2.Session, live: set[int]) -> list[tuple[str, bytes]]:
    """(reason, datagram) for every kind of wrong datagram the wire can carry."""
    sid, keys = alice.session_id, alice.current_keys
    epoch = keys.key_epoch

    def header(version=1, kind=PacketType.DATA, ep=epoch, session=sid, counter=1 << 62):
        return struct.pack("!BBHIQ", version, kind, ep, session, counter)

    body = os.urandom(64)
    out = [("too_short", b"")]
    out += [("too_short", (header() + body)[:n]) for n in range(1, 32)]  # truncated
    out += [("bad_version", header(version=v) + body) for v in range(256) if v != 1]
    out += [("unknown_type", header(kind=t) + body) for t in range(256) if t not in (1, 2)]
    out += [
        ("bad_length", header(kind=PacketType.KEEPALIVE) + bytes(17)),  # keepalive with data
        ("bad_length", header(kind=PacketType.KEEPALIVE) + bytes(1000)),
        ("bad_length", header(kind=PacketType.DATA) + bytes(16)),  # data without any
    ]
    unknown = next(i for i in range(sid ^ 0x5A5A5A5A, 1 << 32) if i not in live)
    out += [("unknown_session", header(session=unknown, counter=n) + body) for n in range(10)]
    out += [("unknown_key", header(ep=(epoch + 7) % 65536, counter=n) + body) for n in range(10)]
    out += [("bad_tag", header(counter=(1 << 62) + n) + body) for n in range(20)]
    out += [("bad_tag", header(counter=(1 << 63) + n) + os.urandom(65507 - 16)) for n in range(5)]
    cipher = new_cipher(CipherSuite.AES_256_GCM, keys.client_to_server_key)  # alice's own key
    for n in range(10):
        counter = (1 << 61) + n
        forged = bytearray(seal(cipher, PacketType.DATA, epoch, sid, counter, b"E" + bytes(40)))
        forged[20 + n] ^= 0x01  # one flipped bit in the ciphertext
        out.append(("bad_tag", bytes(forged)))
    return out


def test_crafted_datagrams_are_counted_by_reason_and_touch_no_session_state(h):
    """Every wrong version and type, truncated, unknown session and key, bad tags (some
    65507 bytes long, some a real packet of alice's key with one bit flipped): each
    under its reason, and alice's record in the dataplane does not move at all.
    (A datagram over 65507 bytes cannot be sent over IPv4, so `too_long` is left to
    the codec's tests.) Alice is stopped meanwhile, so nothing else moves it, and
    stopped right after a rekey, so no rekey of hers is still on its way."""
    h.just_rekeyed(0)
    alice_id = h.session_id(0)
    sessions = h.feed_sessions()
    datagrams = crafted(sessions[alice_id], set(sessions))
    expected: dict[str, int] = {}
    for reason, _ in datagrams:
        expected[reason] = expected.get(reason, 0) + 1
    attacker = socket_in(h.atk)
    alice = h.gw.client_processes[0]
    os.kill(alice.pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)
        before, state_before = h.settled(), h.stats()[alice_id]
        for _, datagram in datagrams:
            attacker.sendto(datagram, (GATEWAY, DATAPLANE_PORT))
            time.sleep(0.0005)  # well inside the dataplane's capacity: nothing overflows
        after, state_after = h.settled(), h.stats()[alice_id]
    finally:
        os.kill(alice.pid, signal.SIGCONT)
        attacker.close()
    counted = {r: int(delta(after, before, drops, r)) for r in expected}
    moved = {f: (getattr(state_before, f), getattr(state_after, f)) for f in STATE_FIELDS}
    record(
        "crafted",
        datagrams=len(datagrams),
        expected=expected,
        counted=counted,
        other_drops={k: v for k, v in all_drops(after, before).items() if k[8:] not in expected},
        alice_state={f: a == b for f, (a, b) in moved.items()},
        last_drop_reason=state_after.last_drop_reason,
    )
    assert counted == expected
    assert all(a == b for a, b in moved.values()), moved
    assert state_after.state == "active" and state_after.endpoint.startswith("198.18.1.2:")
    # Bad tags with counters up to 2^63 did not move alice's replay window.
    ping = h.ping(0, 20, interval=0.05)
    assert ping_loss(ping) == (20, 20)
    assert delta(h.dp(), after, drops, "too_old") == 0
    assert_accounted(after)


# -- replay and reorder ---------------------------------------------------------------------


# Classic BPF on the packet socket (offsets from the Ethernet header): IPv4 UDP to the
# dataplane port; everything else (the big GRO'd packets coming back) stays out.
CAPTURE_FILTER = [
    (0x28, 0, 0, 12),  # ldh [12]            ethertype
    (0x15, 0, 6, 0x0800),  # jeq IPv4, else drop
    (0x30, 0, 0, 23),  # ldb [23]            IP protocol
    (0x15, 0, 4, 17),  # jeq UDP, else drop
    (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf)   IP header length
    (0x48, 0, 0, 16),  # ldh [x + 16]        UDP destination port
    (0x15, 0, 1, DATAPLANE_PORT),
    (0x06, 0, 0, 0x40000),  # accept
    (0x06, 0, 0, 0),  # drop
]
SOL_PACKET, PACKET_VNET_HDR, PACKET_STATISTICS, SO_ATTACH_FILTER = 263, 15, 6, 26
VIRTIO_GSO_UDP_L4 = 5


class Capture:
    """Alice's datagrams to the dataplane as they leave her namespace (AF_PACKET).

    A sender may hand the kernel many datagrams in one UDP GSO buffer; with
    PACKET_VNET_HDR the tap says so, and the buffer is cut into its datagrams."""

    def __init__(self, h: Hostile) -> None:
        self.sock = socket_in(h.gw.clients[0], socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        program = b"".join(struct.pack("HBBI", *insn) for insn in CAPTURE_FILTER)
        self._program = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(CAPTURE_FILTER), ctypes.addressof(self._program))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.bind((h.client_dev(0), 0x0003))  # ETH_P_ALL: taps see outgoing packets
        self.sock.settimeout(0.2)
        self.datagrams: list[bytes] = []  # UDP payloads, in the order they left
        self.source: tuple[str, int] | None = None
        self.buffers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        gateway = socket.inet_aton(GATEWAY)
        while not self._stop.is_set():
            try:
                frame, (_, ethertype, kind, *_) = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            gso_type, gso_size = frame[1], struct.unpack_from("<H", frame, 4)[0]
            packet = frame[10 + 14 :]  # after struct virtio_net_hdr and the Ethernet header
            if ethertype != 0x0800 or kind != socket.PACKET_OUTGOING:
                continue
            ihl = (packet[0] & 0x0F) * 4
            if packet[9] != 17 or packet[16:20] != gateway:
                continue
            self.source = (socket.inet_ntoa(packet[12:16]), *struct.unpack_from("!H", packet, ihl))
            payload = packet[ihl + 8 :]
            self.buffers += 1
            if gso_type & 0x7F == VIRTIO_GSO_UDP_L4 and gso_size:
                self.datagrams += [
                    payload[i : i + gso_size] for i in range(0, len(payload), gso_size)
                ]
            else:
                self.datagrams.append(payload)

    def stop(self) -> int:
        """Stop; the number of packets the kernel could not queue for us."""
        self._stop.set()
        self._thread.join(5)
        _, dropped = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.sock.close()
        return dropped


def test_replays_are_rejected_and_counted_and_never_move_the_endpoint(h):
    """Alice's real datagrams, captured on her link, replayed from the attacker: those
    still inside the window are `replay`, those the window has moved past are
    `too_old`, datagram for datagram. The expected reason of each comes from the
    capture itself: per key epoch, how far the highest counter alice sent is ahead."""
    alice_id = h.session_id(0)
    h.just_rekeyed(0)  # the next rekey is KEY_LIFETIME s away: the burst fits before it
    capture = Capture(h)
    try:
        # A paced burst (about 0.6 s), not a flood that takes as long as the machine
        # is slow: the window must move far under one key epoch.
        h.lab.exec(h.gw.clients[0], [sys.executable, "-c", PACED_BURST, LAN_HOST, "12000"])
        assert ping_loss(h.ping(0, 10, interval=0.02)) == (10, 10)
    finally:
        capture_drops = capture.stop()
    assert capture_drops == 0
    headers = [parse_header(d) for d in capture.datagrams]
    highest: dict[int, int] = {}
    for header in headers:
        highest[header.key_epoch] = max(highest.get(header.key_epoch, 0), header.counter)
    current = h.stats()[alice_id].key_epoch
    held = {current, (current - 1) % 65536}  # previous keys stay for 30 s
    chosen: list[tuple[str, bytes]] = []
    margin = 200  # leave out counters near the window's edge
    for header, datagram in zip(headers, capture.datagrams, strict=True):
        if header.key_epoch not in held:
            continue
        behind = highest[header.key_epoch] - header.counter
        if behind >= REPLAY_WINDOW_SIZE + margin:
            chosen.append(("too_old", datagram))
        elif behind < REPLAY_WINDOW_SIZE - margin:
            chosen.append(("replay", datagram))
    old = [c for c in chosen if c[0] == "too_old"][:200]
    recent = [c for c in chosen if c[0] == "replay"][-200:]
    attacker = socket_in(h.atk)
    before = h.settled()
    for _, datagram in old + recent:
        attacker.sendto(datagram, (GATEWAY, DATAPLANE_PORT))
        time.sleep(0.0005)
    after = h.settled()
    attacker.close()
    counted = {r: int(delta(after, before, drops, r)) for r in ("replay", "too_old")}
    record(
        "replay",
        captured=len(capture.datagrams),
        epochs_seen=len(highest),
        replayed={"too_old": len(old), "replay": len(recent)},
        counted=counted,
        endpoint=h.stats()[alice_id].endpoint,
    )
    assert len(old) >= 50 and len(recent) >= 10, "the capture did not move the window far"
    assert counted == {"replay": len(recent), "too_old": len(old)}
    assert h.stats()[alice_id].endpoint.startswith("198.18.1.2:")  # not the attacker's


# Sends argv[2] datagrams through the tunnel to argv[1]'s discard port, 50 every 2.5 ms.
PACED_BURST = """
import socket, sys, time
target, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(count):
    s.sendto(b"burst %d" % n, (target, 9))
    if n % 50 == 49:
        time.sleep(0.0025)
"""

HOLD = """
table inet pghostile {
  chain input {
    type filter hook input priority 0; ip saddr 198.18.1.2 udp dport 51820 counter drop;
  }
}
"""


def test_reordered_packets_in_the_window_are_accepted_and_duplicates_counted(h):
    """Alice's datagrams are held back at the gateway (nftables drops and counts them)
    while captured on her link; then the very same IP packets are sent again from
    her namespace (a raw socket: same source address and port) in reverse order:
    every one is accepted. Sent once more, every one is a `replay`. Alice is
    stopped meanwhile, so her record in the dataplane counts only these."""
    alice_id, ns = h.session_id(0), h.gw.clients[0]
    h.just_rekeyed(0)  # so that no rekey falls into what follows
    h.lab.exec(h.gw.gw, ["nft", "-f", "-"], input=HOLD)
    capture = Capture(h)
    try:
        h.ping(0, 40, interval=0.02).communicate(timeout=60)  # lost: held back
        time.sleep(0.2)
    finally:
        capture_drops = capture.stop()
        out = h.lab.exec(h.gw.gw, ["nft", "list", "table", "inet", "pghostile"]).stdout
        h.lab.exec(h.gw.gw, ["nft", "delete", "table", "inet", "pghostile"])
    held = int(re.search(r"counter packets (\d+)", out)[1])
    captured = capture.datagrams
    assert capture_drops == 0 and held >= 1 and len(captured) >= 40
    source = (capture.source[0], capture.source[1])
    raw = socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    alice = h.gw.client_processes[0]

    def send(datagrams):
        for datagram in datagrams:
            packet = ipv4_udp(source[0], GATEWAY, source[1], DATAPLANE_PORT, datagram)
            raw.sendto(packet, (GATEWAY, 0))
            time.sleep(0.001)

    os.kill(alice.pid, signal.SIGSTOP)
    try:
        first, state_first = h.settled(), h.stats()[alice_id]
        send(reversed(captured))
        second, state_second = h.settled(), h.stats()[alice_id]
        send(captured)
        third, state_third = h.settled(), h.stats()[alice_id]
    finally:
        os.kill(alice.pid, signal.SIGCONT)
        raw.close()
    reversed_in = {r: int(delta(second, first, drops, r)) for r in ("replay", "too_old")}
    again = {r: int(delta(third, second, drops, r)) for r in ("replay", "too_old")}
    accepted = state_second.rx_packets - state_first.rx_packets
    record(
        "reorder and duplicates",
        held_at_gateway=held,
        captured=len(captured),
        reversed_accepted=accepted,
        reversed_drops=all_drops(second, first),
        sent_again_drops=all_drops(third, second),
        accepted_again=state_third.rx_packets - state_second.rx_packets,
        epochs_captured=sorted({parse_header(d).key_epoch for d in captured}),
        dataplane_epoch=(state_first.key_epoch, state_third.key_epoch),
    )
    assert accepted == len(captured) and reversed_in == {"replay": 0, "too_old": 0}
    assert again == {"replay": len(captured), "too_old": 0}
    assert state_third.rx_packets == state_second.rx_packets
    assert state_third.endpoint == state_first.endpoint
    assert ping_loss(h.ping(0, 10, interval=0.05)) == (10, 10)


# -- spoofing -----------------------------------------------------------------------------


def test_spoofed_inner_sources_and_packets_to_nobody(h):
    """Alice's own client seals packets whose inner source is not hers (an unused
    tunnel address, and bob's): each is `spoofed_source`. The gateway's kernel
    sends packets into the TUN for a tunnel address no session owns: each is
    `no_route` on the way out. Nothing of either reaches anyone."""
    ns = h.gw.clients[0]
    bob_address = h.gw.status(1)["tunnel"].split()[1].split("/")[0]
    spoofs = ["198.19.0.250", bob_address]
    count = 25
    before = h.settled()
    for address in spoofs:
        h.lab.exec(ns, ["ip", "address", "add", f"{address}/32", "dev", "lo"])
    try:
        for address in spoofs:
            h.lab.exec(ns, [sys.executable, "-c", SEND_UDP, address, LAN_HOST, str(count)])
    finally:
        for address in spoofs:
            h.lab.exec(ns, ["ip", "address", "del", f"{address}/32", "dev", "lo"], check=False)
    h.lab.exec(h.gw.gw, [sys.executable, "-c", SEND_UDP, "198.19.0.1", "198.19.0.251", str(count)])
    wait_for(
        lambda: delta(h.dp(), before, drops, "no_route", "outbound") >= count,
        10,
        what="the packets to nobody",
    )
    after = h.settled()
    spoofed = int(delta(after, before, drops, "spoofed_source"))
    no_route = int(delta(after, before, drops, "no_route", "outbound"))
    record(
        "spoofing",
        spoofed_sent=count * len(spoofs),
        spoofed_source=spoofed,
        to_nobody_sent=count,
        no_route=no_route,
        all_drops=all_drops(after, before),
    )
    assert spoofed == count * len(spoofs)
    assert no_route == count
    assert_accounted(after)


SEND_UDP = """
import socket, sys
source, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((source, 0))
for n in range(count):
    s.sendto(b"spoofed %d" % n, (target, 9))
"""


# -- churn --------------------------------------------------------------------------------

CHURN_CYCLES = 500  # logins and logouts in `make test` (about 40 a second here)
CHURN_RATE = 40  # cycles per second assumed when a soak sizes its churn by time
MIB = 1 << 20


def installed_sessions(scrape: dict) -> float:
    """Sessions in the dataplane's registry: active or rekeying. With this module's
    short key lifetime alice's and bob's sessions rekey every few seconds, each
    `rekeying` until its client's next packet under the new keys, so counting
    only `active` ones misses a live session now and then."""
    return sum(
        metrics.total(scrape, "pushgate_dataplane_sessions", state=state)
        for state in ("active", "rekeying")
    )


def test_login_churn_returns_everything_to_baseline(h):
    """Hundreds of logins and logouts while alice transfers and bob pings: the
    dataplane installs and removes each session exactly once, registry and address
    pool are back to their baseline, and neither process keeps memory or file
    descriptors: RSS grows by less than 8 MiB (dataplane) / 24 MiB (auth service,
    which keeps the last 10000 feed events by design), descriptors by at most 2."""
    cycles = max(CHURN_CYCLES, int(SOAK_SECONDS * CHURN_RATE))
    warm = h.churn(100)  # first allocations (Argon2 arenas, gRPC) are not leaks
    assert json.loads(warm.communicate(timeout=300)[0])["outcomes"] == {"OK": 100}
    gw = h.gw
    before, auth_before = h.settled(), h.auth_metrics()
    procs_before = {"dataplane": h.process(gw.dataplane.pid), "auth": h.process(gw.auth.pid)}
    churn = h.churn(cycles)
    ping = h.ping(0, 100000, interval=0.1)
    fetches, good, _ = transfers_while(h, churn)
    report = json.loads(churn.communicate(timeout=600)[0])
    ping.send_signal(signal.SIGINT)
    sent, received = ping_loss(ping)
    installed = installed_sessions(before)
    wait_for(
        lambda: installed_sessions(h.dp()) == installed,
        20,
        what="the dataplane's registry back at its baseline",
    )
    after, auth_after = h.settled(), h.auth_metrics()
    procs_after = {"dataplane": h.process(gw.dataplane.pid), "auth": h.process(gw.auth.pid)}
    installs = delta(after, before, metrics.total, "pushgate_dataplane_session_installs_total")
    removals = delta(after, before, metrics.total, "pushgate_dataplane_session_removals_total")
    pool = {
        state: (
            metrics.total(auth_before, "pushgate_auth_pool_addresses", state=state),
            metrics.total(auth_after, "pushgate_auth_pool_addresses", state=state),
        )
        for state in ("used", "free")
    }
    growth = {
        name: {
            "rss_mib": round((procs_after[name]["rss"] - procs_before[name]["rss"]) / MIB, 1),
            "fds": procs_after[name]["fds"] - procs_before[name]["fds"],
        }
        for name in procs_before
    }
    record(
        "churn",
        cycles=cycles,
        outcomes=report["outcomes"],
        seconds=report["seconds"],
        per_second=report["per_second"],
        login_logout_p99_ms=report["p99_ms"],
        installs=int(installs),
        removals=int(removals),
        installed_sessions=(installed, installed_sessions(after)),
        pool=pool,
        growth=growth,
        rss_mib_after={n: round(p["rss"] / MIB) for n, p in procs_after.items()},
        fetches=f"{good}/{fetches}",
        ping=f"{received}/{sent}",
    )
    assert report["outcomes"] == {"OK": cycles}
    assert installs == removals == cycles
    assert all(a == b for a, b in pool.values()), pool
    # (pings share the gateway TUN's kernel queue with the bulk transfers: a few may
    # be dropped there, see the rekey scenario)
    assert good == fetches >= 1 and received >= sent * 0.95
    assert growth["dataplane"]["rss_mib"] < 8 and growth["auth"]["rss_mib"] < 24, growth
    assert all(g["fds"] <= 2 for g in growth.values()), growth
    assert_accounted(after)


# -- key limits -------------------------------------------------------------------------------

BLOCK_AUTH = """
table inet pghostile {
  chain output { type filter hook output priority 0; tcp dport 7443 drop; }
}
"""


def test_keys_past_their_expiry_end_the_session_and_the_client_recovers(h):
    """Alice cannot reach the auth service (her TCP to it is dropped), so she cannot
    rekey: KEY_EXPIRY s after her last rekey her session ends in the auth service
    and in the dataplane, and her packets are refused from then on. Once the auth
    service is reachable again she logs in anew by herself and traffic flows.
    (The hard message limit, 2^28 packets per key, is out of reach of a test run:
    tests/test_session.py proves it on the core, which both processes share.)"""
    gw, ns = h.gw, h.gw.clients[0]
    old_id = h.session_id(0)
    auth_before = h.auth_metrics()
    h.just_rekeyed(0)
    started = time.monotonic()
    h.lab.exec(ns, ["nft", "-f", "-"], input=BLOCK_AUTH)
    try:
        wait_for(lambda: old_id not in h.stats(), KEY_EXPIRY + 5, what="the dataplane to end it")
        ended = time.monotonic() - started
        before = h.dp()
        wait_for(
            lambda: delta(h.dp(), before, drops, "unknown_session") > 0,
            10,
            what="alice's packets to be refused",
        )
        refused = int(delta(h.dp(), before, drops, "unknown_session"))
        # The auth service's expiry sweep runs on its own second, not in step with the
        # dataplane's: wait for it too rather than look once.
        wait_for(lambda: old_id not in h.feed_sessions(), 5, what="the auth service to end it")
    finally:
        h.lab.exec(ns, ["nft", "delete", "table", "inet", "pghostile"])
    unblocked = time.monotonic()
    wait_for(
        lambda: gw.status(0).get("state") == "up" and h.session_id(0) != old_id,
        90,
        interval=0.5,
        what="alice to log in again",
    )
    recovered = time.monotonic() - unblocked
    auth_after = h.auth_metrics()
    expired = delta(auth_after, auth_before, metrics.total, "pushgate_auth_sessions_expired_total")
    record(
        "key expiry",
        key_expiry_s=KEY_EXPIRY,
        ended_after_s=round(ended, 1),
        refused_after=refused,
        auth_expired=int(expired),
        relogin_after_unblock_s=round(recovered, 1),
        new_session=h.session_id(0) != old_id,
    )
    assert (
        ended <= KEY_EXPIRY + 2.5
    )  # the sweep (auth) and housekeeping (dataplane) run every second
    assert expired == 1
    assert ping_loss(h.ping(0, 10, interval=0.05)) == (10, 10)
    ids = h.consistent()
    assert ids[0] == ids[1] and old_id not in ids[0]


# -- restarts and failures ----------------------------------------------------------------


def test_dataplane_sigkill_mid_transfer_needs_no_login(h):
    """SIGKILL the dataplane while alice transfers, start it again: the transfer
    completes with its hash, no client logs in again, and the dataplane holds
    exactly the sessions the auth service lists."""
    gw = h.gw
    sessions = [h.session_id(0), h.session_id(1)]
    auth_before = h.auth_metrics()
    transfer = h.gw.fetch(0)
    time.sleep(0.3)
    gw.kill(gw.dataplane)
    killed = time.monotonic()
    gw.start_dataplane()
    wait_for(lambda: gw.ping(0, LAN_HOST, count=1).returncode == 0, 30, what="traffic again")
    back = time.monotonic() - killed
    ok, rate = h.gw.fetched(transfer)
    auth_after = h.auth_metrics()
    logins = delta(auth_after, auth_before, metrics.total, "pushgate_auth_logins_total")
    feed, held = h.consistent()
    installs = metrics.total(h.dp(), "pushgate_dataplane_session_installs_total")
    record(
        "dataplane SIGKILL",
        traffic_back_after_s=round(back, 1),
        transfer_hash_ok=ok,
        mbit=round(rate),
        logins=int(logins),
        sessions_auth=len(feed),
        sessions_dataplane=len(held),
        installs_after_restart=int(installs),
    )
    assert ok
    assert logins == 0 and [h.session_id(0), h.session_id(1)] == sessions, gw.log_tail(
        "client0", "client1", "auth"
    )
    assert feed == held and installs == len(feed)
    # bob's first packet after the restart, under re-learned keys, is refused and
    # answered with REKEY_REQUIRED; he rekeys once, then nothing is lost
    wait_for(lambda: gw.ping(1, LAN_HOST, count=1).returncode == 0, 10, what="bob's rekey")
    assert ping_loss(h.ping(1, 10, interval=0.05)) == (10, 10)


def test_auth_sigkill_cuts_the_control_channel_and_stale_sessions_expire(h):
    """Bob's client dies without logging out (SIGKILL: a stale session), then the auth
    service is SIGKILLed, which cuts the dataplane's control channel, and started
    again. Alice's traffic flows throughout; the dataplane reconnects and lists
    again; bob's stale session expires KEY_EXPIRY s after his last rekey in both
    processes; nobody logs in again and both processes hold the same sessions."""
    gw = h.gw
    alice_id, bob_id = h.session_id(0), h.session_id(1)
    before = h.dp()
    gw.kill(gw.client_processes.pop(1))  # stale: bob's session stays until it expires
    gw.kill(gw.auth)
    cut = time.monotonic()
    wait_for(
        lambda: metrics.total(h.dp(), "pushgate_dataplane_control_connected") == 0,
        10,
        what="the dataplane to notice the cut",
    )
    during = h.ping(0, 10, interval=0.05)
    assert ping_loss(during) == (10, 10)  # the auth service is down: traffic flows
    gw.start_auth()
    wait_for(
        lambda: metrics.total(h.dp(), "pushgate_dataplane_control_connected") == 1,
        20,
        what="the control channel to come back",
    )
    restored = time.monotonic() - cut
    wait_for(
        lambda: bob_id not in h.stats() and bob_id not in h.feed_sessions(),
        KEY_EXPIRY + 10,
        what="bob's stale session to go from both processes",
    )
    gone = time.monotonic() - cut
    after = h.dp()
    feed, held = h.consistent()
    record(
        "auth SIGKILL, control channel cut",
        channel_back_after_s=round(restored, 1),
        stale_session_gone_after_s=round(gone, 1),
        resyncs=int(
            delta(after, before, metrics.total, "pushgate_dataplane_control_resyncs_total")
        ),
        sessions_auth=sorted(feed),
        sessions_dataplane=sorted(held),
        alice_same_session=h.session_id(0) == alice_id,
    )
    assert feed == held == {alice_id}
    assert delta(after, before, metrics.total, "pushgate_dataplane_control_resyncs_total") >= 1
    assert ping_loss(h.ping(0, 10, interval=0.05)) == (10, 10)
    gw.connect(1, "bob")  # bob comes back with a new session for what follows
    wait_for(lambda: set(h.stats()) == set(h.feed_sessions()), 10, what="bob's new session")


def test_tun_write_failures_are_counted_and_traffic_resumes(h):
    """The gateway's TUN goes down under alice's pings: every inner packet the
    dataplane then takes from a client is a `tun_write_error` (none vanish), and
    traffic resumes when it comes back up."""
    gw = h.gw
    before = h.settled()
    h.lab.exec(gw.gw, ["ip", "link", "set", "pg0", "down"])
    try:
        ping_loss(h.ping(0, 20, interval=0.05))
        during = h.settled()
    finally:
        h.lab.exec(gw.gw, ["ip", "link", "set", "pg0", "up"])
    failed = int(delta(during, before, drops, "tun_write_error"))
    inner = int(
        delta(
            during, before, metrics.total, "pushgate_dataplane_packets_total", direction="inbound"
        )
    )
    wait_for(lambda: gw.ping(0, LAN_HOST, count=1).returncode == 0, 20, what="traffic again")
    record("TUN write failures", inner_packets_while_down=inner, tun_write_error=failed)
    assert failed >= 20 and failed == inner
    assert_accounted(during)


def test_client_network_outage_longer_than_the_keepalive_timeout(h):
    """Alice's UDP path drops for longer than the client's dead-peer timeout (two
    keepalives + 5 s): she notices, says why, and recovers on her own with the
    same session (the auth service stays reachable, so she keeps rekeying)."""
    gw, ns = h.gw, h.gw.clients[0]
    alice_id = h.session_id(0)
    auth_before = h.auth_metrics()
    outage = """
table inet pghostile {
  chain output { type filter hook output priority 0; udp dport 51820 drop; }
  chain input { type filter hook input priority 0; udp sport 51820 drop; }
}
"""
    h.lab.exec(ns, ["nft", "-f", "-"], input=outage)
    started = time.monotonic()
    try:
        wait_for(lambda: gw.status(0)["state"] == "reconnecting", 30, what="alice to notice")
        noticed = time.monotonic() - started
        reason = gw.status(0)["last error"]
        time.sleep(2)
    finally:
        h.lab.exec(ns, ["nft", "delete", "table", "inet", "pghostile"])
    restored = time.monotonic()
    wait_for(lambda: gw.status(0)["state"] == "up", 60, what="alice to recover")
    recovered = time.monotonic() - restored
    logins = delta(h.auth_metrics(), auth_before, metrics.total, "pushgate_auth_logins_total")
    record(
        "client network outage",
        noticed_after_s=round(noticed, 1),
        reason=reason,
        recovered_after_s=round(recovered, 1),
        same_session=h.session_id(0) == alice_id,
        logins=int(logins),
    )
    assert "no packet from the dataplane" in reason
    assert h.session_id(0) == alice_id and logins == 0, gw.log_tail("client0", "auth")
    assert ping_loss(h.ping(0, 10, interval=0.05)) == (10, 10)


# -- slow consumer ------------------------------------------------------------------------

# One process on the gateway sending 1200-byte UDP datagrams to a tunnel address as
# fast as it can; prints how many it sent.
BLAST = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
payload, target = bytes(1200), (sys.argv[1], 9)
sent, end = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for _ in range(64):
        try:
            s.sendto(payload, target)
            sent += 1
        except BlockingIOError:
            pass
print(sent)
"""
UPLINK = "50mbit"  # the gateway's shaped uplink towards its clients
BOB_PINGS_FOR = 3.0  # seconds


def test_slow_uplink_fills_alices_send_queue_counted_and_bob_keeps_his_turns(h):
    """The gateway's uplink to its clients (br0) is shaped to 50 Mbit/s while a process
    on the gateway sends alice UDP much faster: the UDP socket stops taking datagrams,
    the dataplane stops sealing, and alice's flow in its send queue fills; what does
    not fit is a counted `queue_full` drop (CoDel's `queue_delay` drops come first),
    never a wait. Bob's replies have their turns meanwhile: they wait in a TUN
    queue of their own (dataplane/tun_steering.py), where the kernel drops none,
    and in his own flow of the send queue, so every ping he sends is answered.
    What the kernel drops at alice's TUN queue, which the flood outruns the
    reads of, is in the dataplane's metrics too. The receive loop stays live: it
    reads every datagram that reaches the socket (the kernel drops none there),
    every ping request bob sends reaches the lan host, and the loop-lag timer
    stays on time.
    Once the uplink is free again the queues drain and both clients ping cleanly."""
    gw = h.gw
    alice = h.feed_sessions()[h.session_id(0)].tunnel_addresses[0]

    def echo_requests() -> int:  # ICMP echo requests that reached the lan host
        return snmp_section(h.lab.exec(gw.lan, ["cat", "/proc/net/snmp"]).stdout, "Icmp")["InEchos"]

    duration = seconds(3)
    before, path_before, echoes_before = h.settled(), h.kernel_drops(), echo_requests()
    shape = "tc qdisc add dev br0 root tbf burst 64kb limit 64mb rate " + UPLINK
    h.lab.exec(gw.gw, shape.split())
    try:
        blast = h.lab.start(
            gw.gw,
            [sys.executable, "-c", BLAST, alice, str(duration)],
            stdout=subprocess.PIPE,
            text=True,
        )
        ping = h.ping(1, int(min(duration, BOB_PINGS_FOR) / 0.05), interval=0.05)
        sent = int(blast.communicate(timeout=duration + 30)[0])
        pinged, answered = ping_loss(ping)
        during = h.dp()
    finally:
        h.lab.exec(gw.gw, ["tc", "qdisc", "del", "dev", "br0", "root"])
    wait_for(
        lambda: metrics.total(h.dp(), "pushgate_dataplane_queue_depth", queue="send") == 0,
        30,
        what="the send queue to drain",
    )
    after, path_after = h.settled(), h.kernel_drops()
    echoes = echo_requests() - echoes_before
    full = int(delta(after, before, drops, "queue_full", direction="outbound"))
    codel = int(delta(after, before, drops, "queue_delay", direction="outbound"))
    overflows = {
        queue: delta(
            after, before, metrics.total, "pushgate_dataplane_queue_overflows_total", queue=queue
        )
        for queue in ("send", "udp_send")
    }
    read = delta(after, before, metrics.total, "pushgate_dataplane_tun_packets_read_total")
    tun_queue = delta(after, before, kernel_drops, "tun_queue")
    record(
        "slow uplink",
        uplink=UPLINK,
        seconds=duration,
        blasted=sent,
        tun_read=int(read),
        outbound_delivered=int(
            delta(after, before, metrics.total, "pushgate_dataplane_outbound_delivered_total")
        ),
        queue_full=full,
        queue_delay=codel,
        send_queue_overflows=int(overflows["send"]),
        udp_send_overflows=int(overflows["udp_send"]),
        udp_receive_buffer_drops=int(delta(after, before, kernel_drops, "udp_receive_buffer")),
        send_queue_high_water=int(
            metrics.total(during, "pushgate_dataplane_queue_high_water", queue="send")
        ),
        udp_send_high_water=int(
            metrics.total(during, "pushgate_dataplane_queue_high_water", queue="udp_send")
        ),
        pg0_tx_dropped=path_after["pg0 tx_dropped"] - path_before["pg0 tx_dropped"],
        kernel_drops_tun_queue=int(tun_queue),
        bob_echo_requests=f"{echoes}/{pinged}",
        bob_answered=f"{answered}/{pinged}",
        max_lag=max_lag(after, before),
    )
    # Alice's flow filled to its bound and each packet refused is one drop; CoDel
    # dropped from its head before that. The socket's own queue holds at most the
    # batch being sent (and control datagrams): it never fills.
    assert 0 < full == overflows["send"] and codel > 0
    assert overflows["udp_send"] == 0
    assert metrics.total(during, "pushgate_dataplane_queue_high_water", queue="send") >= FLOW_LIMIT
    # Whatever the kernel dropped at the TUN's queue, the dataplane's metrics say so.
    assert tun_queue == path_after["pg0 tx_dropped"] - path_before["pg0 tx_dropped"]
    # Bob's replies had their turns through alice's flood: none was dropped, in the
    # kernel (his TUN queue is not alice's) or in the dataplane.
    bob_drops = h.stats()[h.session_id(1)].drops
    assert not {"queue_full", "queue_delay"} & set(bob_drops), bob_drops
    assert answered == pinged
    assert echoes >= pinged  # the receive loop took every request bob sent ...
    assert delta(after, before, kernel_drops, "udp_receive_buffer") == 0  # ... and all else
    assert delta(after, before, lag_over, "0.25") == 0
    assert_accounted(after)
    for index in (0, 1):
        assert ping_loss(h.ping(index, 10, interval=0.05)) == (10, 10)


# -- auth abuse -----------------------------------------------------------------------------


def test_password_guessing_and_bad_requests_while_alice_transfers(h, tmp_path):
    """From the attacker's namespace: 40 password guesses at alice's account, malformed
    and oversized requests, a server check against another CA, plain TCP. Guessing is
    throttled after 6 failures (answered without hashing, so quickly); every bad
    request gets its precise status; the auth service's metrics count each login by
    result; alice's connected session does not notice (her transfer completes, she
    keeps rekeying with her token); the control and stats sockets refuse another user."""
    gw = h.gw
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(
        make_ca("someone else", datetime.datetime.now(datetime.UTC), ["localhost"])[0]
    )
    auth_before = h.auth_metrics()
    epoch_before = h.stats()[h.session_id(0)].key_epoch
    transfer = h.gw.fetch(0)
    churn = [sys.executable, "-m", "netlab.churn"]
    target = f"{GATEWAY}:{AUTH_PORT}"
    guessed = json.loads(
        h.lab.exec(h.atk, [*churn, "guess", target, gw.ca, "alice", "40"], timeout=120).stdout
    )
    refused = json.loads(
        h.lab.exec(h.atk, [*churn, "abuse", target, gw.ca, "alice", str(other_ca)]).stdout
    )
    ok, rate = h.gw.fetched(transfer)
    time.sleep(KEY_LIFETIME + 1)
    auth_after = h.auth_metrics()
    logins = {
        result: int(
            delta(
                auth_after, auth_before, metrics.total, "pushgate_auth_logins_total", result=result
            )
        )
        for result in ("bad_credentials", "throttled", "invalid", "success")
    }
    private = {
        name: refuses_nobody(os.path.join(gw.workdir, "run", name))
        for name in ("control.sock", "dataplane.sock")
    }
    rekeys = h.stats()[h.session_id(0)].key_epoch - epoch_before
    record(
        "auth abuse",
        guesses=guessed["outcomes"],
        guess_seconds=guessed["seconds"],
        bad_requests=refused,
        logins_by_result=logins,
        alice_transfer_hash_ok=ok,
        alice_mbit=round(rate),
        alice_rekeys_meanwhile=rekeys,
        sockets_refuse_nobody=private,
    )
    # Five free failures, the sixth starts the delay, and from then on no password is
    # even checked (max_failures_before_delay = 5).
    assert guessed["outcomes"] == {"UNAUTHENTICATED": 6, "RESOURCE_EXHAUSTED": 34}
    assert refused == {
        **dict.fromkeys(
            ("empty_name", "long_name", "nul_in_name", "empty_password", "long_password"),
            "INVALID_ARGUMENT",
        ),
        "not_utf8": "INVALID_ARGUMENT",
        "oversized": "RESOURCE_EXHAUSTED",
        "garbage": "INVALID_ARGUMENT",
        "other_ca": "UNAVAILABLE",
        "plaintext": "UNAVAILABLE",
    }
    assert logins == {"bad_credentials": 6, "throttled": 34, "invalid": 7, "success": 0}
    assert ok and rekeys >= 1
    assert all(private.values()), private
