"""The client's connection loop on a virtual clock, with the auth service and the
datapath replaced by recording fakes: what it does while the UDP path is down."""

import asyncio

from client.auth import SessionGone
from client.connection import Connection, ConnectOptions
from client.state import ClientEvent
from client.state import ClientState as S
from push_protocol.keys import KeyMaterial

KEY_LIFETIME, KEY_EXPIRY = 3.0, 8.0  # as in the hostile suite: expiry < handshake wait + lifetime


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeAuth:
    """Ends the session KEY_EXPIRY seconds after its last rekey, as the auth service does."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.expires_at = clock.now + KEY_EXPIRY
        self.epoch = 0
        self.rekeys: list[float] = []
        self.expired_at: float | None = None

    def _check(self) -> None:
        if self.clock.now >= self.expires_at:
            self.expired_at = self.expired_at or self.clock.now
            raise SessionGone()

    async def rekey(self, token: str):
        self._check()
        self.epoch += 1
        self.rekeys.append(self.clock.now)
        self.expires_at = self.clock.now + KEY_EXPIRY
        keys = KeyMaterial(self.epoch, b"c" * 32, b"s" * 32, self.clock.now)
        return keys, self.expires_at

    async def session_alive(self, token: str) -> bool:
        try:
            self._check()
        except SessionGone:
            return False
        return True

    async def close(self) -> None:
        pass


class FakeSession:
    def __init__(self) -> None:
        self.last_received_at: float | None = None

    def handle_timer(self, now: float) -> None:
        pass

    def install_next(self, keys: KeyMaterial, now: float) -> None:
        pass


class FakeDatapath:
    """Keepalives are lost until the path heals; then the dataplane answers each."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.session = FakeSession()
        self.healed = False
        self.keepalives: list[float] = []

    def send_keepalive(self) -> None:
        self.keepalives.append(self.clock.now)
        if self.healed:
            self.session.last_received_at = self.clock.now + 0.01

    def rebind(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Info:
    token = "token"
    session_id = 0x1234
    keepalive_seconds = 2.0
    key_lifetime_seconds = KEY_LIFETIME


def reconnecting(tmp_path, clock: VirtualClock) -> Connection:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"")
    conn = Connection(
        ConnectOptions("127.0.0.1:1", str(ca), "alice", "secret"), clock=clock, host=object()
    )
    conn.auth = FakeAuth(clock)
    conn.datapath = FakeDatapath(clock)
    conn.session_info = Info()
    conn._rekey_at = clock.now + KEY_LIFETIME
    for event in (ClientEvent.START, ClientEvent.LOGGED_IN, ClientEvent.TUNNEL_UP):
        conn.machine.handle(event)
    clock.now += KEY_LIFETIME - 0.01  # the worst moment: a rekey is just due
    conn.machine.handle(ClientEvent.SERVER_LOST)

    async def virtual_sleep(seconds: float, *, wakeable: bool = False) -> None:
        clock.now += max(seconds, 0.01)

    conn._sleep = virtual_sleep
    return conn


async def run_until(conn: Connection, clock: VirtualClock, until: float, done) -> None:
    while clock.now < until and not done():
        await conn._step()


def test_a_long_udp_outage_keeps_the_session_and_recovers_within_a_probe(tmp_path):
    """The UDP path is down for a minute while the auth service answers: the client
    keeps renewing keys (the session never expires, no new login), and once the path
    heals it is up again within about one probe interval."""
    clock = VirtualClock()

    async def scenario() -> tuple[Connection, float]:
        conn = reconnecting(tmp_path, clock)  # in the loop: the gRPC channel needs one
        outage_ends = clock.now + 60
        await run_until(conn, clock, outage_ends, lambda: conn.state is not S.RECONNECTING)
        assert conn.state is S.RECONNECTING
        assert conn.auth.expired_at is None
        gaps = [b - a for a, b in zip(conn.auth.rekeys, conn.auth.rekeys[1:], strict=False)]
        assert gaps and max(gaps) <= KEY_LIFETIME + 0.2
        healed_at = clock.now
        conn.datapath.healed = True
        await run_until(conn, clock, healed_at + 60, lambda: conn.state is S.UP)
        return conn, healed_at

    conn, healed_at = asyncio.run(scenario())
    assert conn.state is S.UP
    assert clock.now - healed_at <= 1.2
