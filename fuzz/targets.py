"""Fuzz targets: everything a datagram from the network touches, as total functions.

One input is split into a datagram for the session core (parse, open) and an
inner packet for the dataplane's pure code (addresses, routing, the access
policy's checks, MSS clamp, ICMP too-big). Anything but a PacketRejected
escaping is a bug; so is any forged datagram that authenticates. Driven by
fuzz/fuzz_receive.py (atheris, coverage-guided) and replayed over fuzz/corpus/
by tests/test_fuzz_corpus.py.
"""

import contextlib
import ipaddress

from dataplane import inner
from dataplane.registry import Registry, SessionRecord, packed_address
from dataplane.routing import Router
from push_protocol.aead import CipherSuite
from push_protocol.codec import parse_header
from push_protocol.drops import PacketRejected
from push_protocol.keys import KeyMaterial, Role
from push_protocol.policy import ALLOW_ALL, CompiledPolicy, Rule
from push_protocol.session import TunnelSession

KEYS = KeyMaterial(0, bytes(range(32)), bytes(range(32, 64)), 0.0)
SESSION_ID = 0x01020304


def fresh_session() -> TunnelSession:
    return TunnelSession(SESSION_ID, CipherSuite.AES_256_GCM, Role.SERVER, KEYS)


SOME_EVERYWHERE = CompiledPolicy(
    [
        Rule.make("0.0.0.0/0", 6, [(22, 22), (80, 90)]),
        Rule.make("0.0.0.0/0", 1),
        Rule.make("::/0", 17, [(53, 53), (1000, 3000)]),
        Rule.make("::/0", 58),
    ]
)

REGISTRY = Registry()
RECORD = SessionRecord(fresh_session(), (packed_address("198.19.0.2"),), 0.0, policy=ALLOW_ALL)
REGISTRY.add(RECORD)
ROUTER = Router(
    REGISTRY, ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_address("198.19.0.1"), 1420
)


def receive(data: bytes) -> None:
    split = data[0] if data else 0
    datagram, packet = data[1 : 1 + split * 4], data[1 + split * 4 :]
    session = fresh_session()
    try:
        header = parse_header(datagram)
        session.open(datagram, 1.0, header)
    except PacketRejected:
        pass
    else:
        raise AssertionError("a forged datagram authenticated")
    for decide in (lambda: ROUTER.from_session(RECORD, packet), lambda: ROUTER.from_tun(packet)):
        decide()
    with contextlib.suppress(PacketRejected):
        source, destination = inner.addresses(packet)
        # the access policy's reading of protocol, ports, fragments, extension headers
        # and quoted ICMP errors: every address allowed for some protocols and ports
        SOME_EVERYWHERE.allows_packet(packet, destination)
        SOME_EVERYWHERE.allows_reply(packet, source)
    # Total functions: any bytes in, a packet or None out.
    inner.clamp_mss(packet, 1380)
    inner.too_big_reply(packet, 1420, bytes(4) if packet[:1] < b"\x60" else bytes(16))
