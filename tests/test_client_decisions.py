"""The client's decision core (client/core.py) in a simulated world on a virtual clock.

`World` plays the auth service (sessions that expire KEY_EXPIRY s after their last
rekey, as the real one does), the network setup and the UDP path (a keepalive is
answered while the path is up), and executes the core's actions with a latency.
Hypothesis drives it through random outages, refusals and requests and checks
the invariants after every step. No sockets: a fake of everything the core talks
to, because the core talks to nothing (the asyncio layer does; the end-to-end and
hostile suites run that with real parts).
"""

import itertools
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from client.auth import (
    ClientError,
    ClientSession,
    Gateway,
    PushedNetwork,
    RekeyAnswer,
    SessionGone,
)
from client.core import (
    BACKOFF_MAX_SECONDS,
    FAILBACK_PROBE_SECONDS,
    NETWORK_CHECK_SECONDS,
    PROBE_INTERVAL_SECONDS,
    ApplyNetwork,
    BringUp,
    CheckNetwork,
    CheckSession,
    ClientCore,
    InstallKeys,
    Login,
    Logout,
    ProbeGateway,
    Rebind,
    Rekey,
    Resolve,
    SendKeepalive,
    Suspend,
    TearDown,
    UseGateway,
)
from client.state import ClientState as S
from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial

KEY_LIFETIME, KEY_EXPIRY = 3.0, 8.0  # as in the hostile suite: expiry < handshake wait + lifetime
KEEPALIVE = 2.0
START = 1_000_000.0
DATAPLANE = "198.18.1.1"


def keys(epoch: int, now: float) -> KeyMaterial:
    return KeyMaterial(epoch, b"c" * 32, b"s" * 32, now)


class World:
    def __init__(
        self, rng: random.Random, *, max_latency: float = 0.0, endpoint=DATAPLANE, gateways=()
    ):
        self.rng = rng
        # A cluster's gateways (the first answers logins), the ones whose dataplane is
        # down, the one the tunnel uses and when it moved to each
        self.gateways: tuple[Gateway, ...] = gateways
        self.answering = gateways[0].id if gateways else ""  # the gateway logins reach
        self.down: set[str] = set()
        self.using = ""
        self.moves: list[tuple[float, str]] = []
        self.max_latency = max_latency
        self.endpoint_host = endpoint
        self.now = START
        self.core = ClientCore(rng=random.Random(rng.random()))
        self.auth_up = self.path_up = True
        self.login_error: ClientError | None = None  # what the next logins get
        self.rekey_error: ClientError | None = None
        self.setup_error: ClientError | None = None  # what the next bring-ups get
        self.resolves_to = DATAPLANE
        self.sessions: dict[str, float] = {}  # live at the auth service: token -> expiry
        self.expired_while_held: list[str] = []
        self.pending: list[tuple[float, int, str, object]] = []  # (ready, seq, kind, arg)
        self.in_flight: Counter[str] = Counter()
        self.tunnel: str | None = None  # token of the session the tunnel is up for
        self.tun_exists = False  # the TUN and its network (also held across a re-login)
        self.tun_builds = 0  # TUNs created (a re-login must not need a new one)
        self.logins = 0
        # the auth service's network for the user now; the tunnel's, as applied
        self.network = PushedNetwork(routes=("0.0.0.0/0",), digest="n0")
        self.tunnel_network: PushedNetwork | None = None
        self.apply_error: ClientError | None = None  # what the next network changes get
        self.applied: list[PushedNetwork] = []
        self.apply_attempts = 0
        self.failed_networks: list[PushedNetwork] = []
        self.teardowns = 0
        self.rekeys: list[float] = []
        self.logged_out: list[str] = []
        self.fatal_delivered = False
        self._seq = 0
        self._stalled = 0
        # The datapath's own keepalives (its session timers, not the core's decisions):
        # while the tunnel is up and the path works, one is answered every KEEPALIVE s.
        self._datapath_keepalive_at = START + KEEPALIVE
        self.core.start(self.now)
        self.execute()

    # -- the auth service, the host, the path -----------------------------------------

    def _later(self, kind: str, arg: object = None, latency: float | None = None) -> None:
        if latency is None:
            latency = self.rng.uniform(0, self.max_latency)
        self._seq += 1
        self.pending.append((self.now + latency, self._seq, kind, arg))

    def _expire(self) -> None:
        for token, expires_at in list(self.sessions.items()):
            if self.now >= expires_at:
                del self.sessions[token]
                held = self.core.session
                if held is not None and held.token == token:
                    self.expired_while_held.append(token)

    def execute(self) -> None:
        core = self.core
        for action in core.actions():
            if core.failure is not None:
                # after a non-retryable error only clean-up
                assert isinstance(action, TearDown | Logout), action
            match action:
                case Login():
                    self.in_flight["login"] += 1
                    self._later("login")
                case BringUp(session=session):
                    assert self.tunnel is None, "a second tunnel"
                    assert self.tun_exists == core.tunnel_held
                    self.in_flight["bring_up"] += 1
                    self._later("bring_up", session)
                case TearDown():
                    # make before break: the TUN goes only when the run ends
                    assert core.state is S.DISCONNECTED, "TUN torn down while running"
                    self.tunnel = self.tunnel_network = None
                    self.tun_exists = False
                    self.teardowns += 1
                case Suspend():
                    assert self.tunnel is not None and self.tun_exists
                    self.tunnel = None
                case Logout(token=token):
                    self.sessions.pop(token, None)
                    self.logged_out.append(token)
                case Rekey(token=token):
                    self.in_flight["rekey"] += 1
                    self._later("rekey", token)
                case InstallKeys():
                    assert self.tunnel is not None
                case CheckSession(token=token):
                    self.in_flight["check"] += 1
                    self._later("check", token)
                case CheckNetwork(token=token):
                    self.in_flight["network_check"] += 1
                    self._later("network_check", token)
                case ApplyNetwork(network=network):
                    assert self.tunnel is not None
                    assert network != self.tunnel_network, "a change that changes nothing"
                    self.in_flight["apply"] += 1
                    self.apply_attempts += 1
                    self._later("apply", network)
                case Resolve():
                    self.in_flight["resolve"] += 1
                    self._later("resolve")
                case Rebind():
                    assert self.tunnel is not None
                case SendKeepalive():
                    assert self.tunnel is not None
                    self.execute_keepalive_answer()
                case UseGateway(gateway=gateway):
                    assert self.tunnel is not None and gateway in self.gateways
                    self.using = gateway.id
                    self.moves.append((self.now, gateway.id))
                case ProbeGateway(gateway=gateway):
                    assert self.tunnel is not None and gateway.id != self.using
                    if self.path_up and gateway.id not in self.down:
                        self._later("probe_answer", gateway.id, latency=0.01)
        for kind in ("login", "rekey", "check", "resolve", "bring_up", "network_check", "apply"):
            assert self.in_flight[kind] <= 1, f"two {kind}s in flight"
        # one session at the auth service at most: none is left behind
        assert len(self.sessions) <= 1, self.sessions

    def _complete(self, kind: str, arg) -> None:
        core, now = self.core, self.now
        if kind == "answer":
            if self.tunnel == arg and self.path_up:
                core.handle_received(now, now)
            return
        if kind == "probe_answer":
            core.handle_probe_answer(now, arg)
            return
        self.in_flight[kind] -= 1
        live = core.state is not S.DISCONNECTED  # a result after a stop changes nothing
        if kind == "login":
            if not self.auth_up:
                result = ClientError("auth service unreachable", retryable=True)
            elif self.login_error is not None:
                result = self.login_error
            else:
                self.logins += 1
                token = f"token{self.logins}"
                self.sessions[token] = now + KEY_EXPIRY
                result = ClientSession(
                    session_id=self.logins,
                    token=token,
                    cipher=CipherSuite.AES_256_GCM,
                    keys=keys(0, now),
                    tunnel_address="198.19.0.2/24",
                    gateway_tunnel_address="198.19.0.1",
                    routes=list(self.network.routes),
                    dns_servers=list(self.network.dns_servers),
                    search_domains=list(self.network.search_domains),
                    match_domains=list(self.network.match_domains),
                    network_digest=self.network.digest,
                    mtu=1420,
                    keepalive_seconds=KEEPALIVE,
                    key_lifetime_seconds=KEY_LIFETIME,
                    endpoint=(self.endpoint_host, 51820),
                    expires_at=now + KEY_EXPIRY,
                    gateways=self.gateways,
                    gateway_id=self.answering,
                )
            self.fatal_delivered |= (
                live and isinstance(result, ClientError) and not result.retryable
            )
            core.handle_login_result(now, result)
        elif kind == "bring_up":
            if self.setup_error is not None:
                self.tun_exists = False  # the owner undoes everything, a held TUN too
                self.fatal_delivered |= live and not self.setup_error.retryable
                core.handle_bring_up_result(now, self.setup_error)
            else:
                self.tunnel = arg.token
                self.tunnel_network = arg.network
                self.using = arg.gateway_id
                if not self.tun_exists:
                    self.tun_builds += 1
                self.tun_exists = True
                core.handle_bring_up_result(now, self.resolves_to)
        elif kind == "rekey":
            if not self.auth_up:
                result = ClientError("auth service unreachable", retryable=True)
            elif arg not in self.sessions:
                result = SessionGone()
            elif self.rekey_error is not None:
                result = self.rekey_error
                self.fatal_delivered |= live and not result.retryable
            else:
                self.rekeys.append(now)
                self.sessions[arg] = now + KEY_EXPIRY
                result = RekeyAnswer(keys(len(self.rekeys), now), now + KEY_EXPIRY, self.network)
            core.handle_rekey_result(now, result)
        elif kind == "check":
            if not self.auth_up:
                core.handle_session_check(now, ClientError("unreachable", retryable=True))
            else:
                core.handle_session_check(now, arg in self.sessions)
        elif kind == "network_check":
            if not self.auth_up:
                core.handle_network_check(now, ClientError("unreachable", retryable=True))
            elif arg not in self.sessions:
                core.handle_network_check(now, SessionGone())
            else:
                core.handle_network_check(now, self.network)
        elif kind == "apply":
            if self.apply_error is not None:
                self.failed_networks.append(arg)
                core.handle_network_applied(now, self.apply_error)
            else:
                if self.tunnel is not None:
                    self.tunnel_network = arg
                    self.applied.append(arg)
                core.handle_network_applied(now, arg)
        elif kind == "resolve":
            core.handle_resolved(now, self.resolves_to)

    # -- driving ----------------------------------------------------------------------

    def step(self, until: float) -> None:
        """Advance to the next thing that happens (an answer, a timer) or `until`."""
        core = self.core
        timer = core.get_timer()
        if timer is not None:
            # nothing waits longer than the longest backoff, key lifetime or dead timer
            assert timer - self.now <= max(BACKOFF_MAX_SECONDS, KEY_LIFETIME, 2 * KEEPALIVE + 5)
        ready = min(self.pending, default=None)
        self._stalled = self._stalled + 1 if timer is not None and timer <= self.now else 0
        assert self._stalled < 100, "handle_timer does not move the timer on"
        keepalive_at = self._datapath_keepalive_at
        candidates = [until, keepalive_at] + [
            t for t in (timer, ready and ready[0]) if t is not None
        ]
        self.now = max(self.now, min(candidates))
        self._expire()
        if keepalive_at <= self.now:
            self._datapath_keepalive_at = self.now + KEEPALIVE
            if self.tunnel is not None and core.state in (S.UP, S.REKEYING):
                self.execute_keepalive_answer()
        elif ready is not None and ready[0] <= self.now:
            self.pending.remove(ready)
            self._complete(ready[2], ready[3])
        elif timer is not None and timer <= self.now:
            core.handle_timer(self.now)
        self.execute()

    def execute_keepalive_answer(self) -> None:
        """Answered by the dataplane in use, where its name points now."""
        if self.using in self.down:
            return
        if self.path_up and self.core.endpoint_address == self.resolves_to:
            self._later("answer", self.tunnel, latency=0.01)

    def run_until(self, end: float, done=lambda: False) -> None:
        while self.now < end and not done():
            self.step(end)


# -- random event sequences ----------------------------------------------------------------

APPLY_FAILED = ClientError("network setup failed: ip route: boom", retryable=False)
NETWORKS = [
    PushedNetwork(routes=("0.0.0.0/0",), dns_servers=("198.18.2.53",)),
    PushedNetwork(routes=("198.18.2.0/24",)),
    PushedNetwork(
        routes=("198.18.2.0/24", "198.18.3.0/24"),
        dns_servers=("198.18.2.53",),
        search_domains=("eng.example",),
        match_domains=("eng.example", "corp.example"),
    ),
    PushedNetwork(routes=()),
]


def another_network(world: World) -> PushedNetwork:
    """A network other than the auth service's current one, with a new digest."""
    choices = [n for n in NETWORKS if n != world.network]
    chosen = world.rng.choice(choices)
    return PushedNetwork(
        *(getattr(chosen, f) for f in ("routes", "dns_servers", "search_domains", "match_domains")),
        digest=f"n{world.rng.random()}",
    )


RETRYABLE = ClientError("throttled", retryable=True)
REFUSED = ClientError("login refused: wrong user name or password", retryable=False)
SETUP_FAILED = ClientError("network setup failed: ip route: boom", retryable=False)
NO_ROUTE = ClientError("no route to the gateway", retryable=True)

disturbances = st.sampled_from(
    [
        "path_down",
        "path_up",
        "auth_down",
        "auth_up",
        "rekey_wanted",
        "rekey_requested",
        "setup_fails",
        "setup_fails_for_good",
        "setup_ok",
        "login_throttled",
        "login_refused",
        "login_ok",
        "rekey_refused",
        "moved",
        "network_changes",
        "apply_fails",
        "apply_ok",
        "stop",
    ]
)
timeline = st.lists(st.tuples(st.floats(0.0, 40.0), disturbances), max_size=25)


def disturb(world: World, what: str) -> None:
    core = world.core
    match what:
        case "path_down" | "path_up":
            world.path_up = what == "path_up"
        case "auth_down" | "auth_up":
            world.auth_up = what == "auth_up"
        case "rekey_wanted":
            core.handle_rekey_wanted(world.now)
        case "rekey_requested":
            core.request_rekey()
        case "setup_fails":
            world.setup_error = NO_ROUTE
        case "setup_fails_for_good":
            world.setup_error = SETUP_FAILED
        case "setup_ok":
            world.setup_error = None
        case "login_throttled":
            world.login_error = RETRYABLE
        case "login_refused":
            world.login_error = REFUSED
        case "login_ok":
            world.login_error = None
        case "rekey_refused":
            world.rekey_error = ClientError("access revoked", retryable=False)
        case "moved":
            world.resolves_to = "198.18.1.2"
        case "network_changes":
            world.network = another_network(world)
        case "apply_fails":
            world.apply_error = APPLY_FAILED
        case "apply_ok":
            world.apply_error = None
        case "stop":
            core.stop(world.now)


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.floats(0.0, 3.0), timeline)
def test_random_event_sequences_keep_the_invariants(rng, max_latency, events):
    """Whatever happens: one login, rekey, session check, network check and network
    change at a time; at most one session held at the auth service (a failed setup,
    a moved dataplane, a stop log out at once); timers bounded; a non-retryable
    error ends the run; a tunnel up with the auth service answering has the auth
    service's network (unless applying that one failed)."""
    world = World(rng, max_latency=max_latency, endpoint="vpn.example.test")
    for at, what in sorted(events, key=lambda event: event[0]):
        world.run_until(START + at)
        disturb(world, what)
        world.execute()
    world.run_until(world.now + 120)
    core = world.core
    if world.fatal_delivered:
        assert core.failure is not None and core.state is S.DISCONNECTED
    if core.failure is not None or core.state is S.DISCONNECTED:
        assert core.get_timer() is None and world.tunnel is None and not world.tun_exists
        assert not world.sessions  # logged out
        return
    settled = world.auth_up and core.state in (S.UP, S.REKEYING)
    if settled and world.network not in world.failed_networks:
        assert world.tunnel_network == world.network
    core.stop(world.now)
    world.execute()
    assert world.tunnel is None and not world.tun_exists and not world.sessions


@settings(max_examples=200, deadline=None)
@given(
    st.randoms(use_true_random=False),
    st.floats(0.0, 1.0),
    st.lists(st.floats(0.0, 30.0), max_size=12),
)
def test_keys_are_renewed_before_expiry_while_the_auth_service_answers(rng, latency, flips):
    """The UDP path goes down and up at random times (outages of any length) while
    the auth service answers within a second: the session never expires, the client
    never logs in again, and it is up soon after the path is."""
    world = World(rng, max_latency=latency)
    t = START
    for gap in flips:
        t += gap
        world.run_until(t)
        world.path_up = not world.path_up
    world.path_up = True
    healed = world.now
    world.run_until(healed + 120, done=lambda: world.core.state is S.UP)
    assert world.expired_while_held == []
    assert world.logins == 1
    assert world.core.state is S.UP
    world.run_until(world.now + 60)  # and stays up, rekeying
    assert world.core.state in (S.UP, S.REKEYING) and world.logins == 1
    assert world.expired_while_held == []


def test_a_long_udp_outage_keeps_the_session_and_recovers_within_a_probe():
    """(From the asyncio-level test this replaces.) The UDP path goes down when a
    rekey is just due and stays down for a minute while the auth service answers:
    the client keeps renewing keys (the session never expires, no new login), and
    once the path heals it is up again within about one probe interval."""
    world = World(random.Random(1))
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP
    up_at = world.now
    world.run_until(up_at + KEY_LIFETIME - 0.01)  # the worst moment: a rekey is just due
    world.path_up = False
    world.run_until(world.now + 60)
    assert world.core.state is S.RECONNECTING
    assert world.expired_while_held == []
    gaps = [b - a for a, b in zip(world.rekeys, world.rekeys[1:], strict=False)]
    assert gaps and max(gaps) <= KEY_LIFETIME + 0.2
    world.path_up = True
    healed = world.now
    world.run_until(healed + 60, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP
    assert world.now - healed <= PROBE_INTERVAL_SECONDS + 0.2
    assert world.logins == 1


def test_a_login_whose_setup_fails_is_logged_out_at_once():
    world = World(random.Random(2))
    world.setup_error = NO_ROUTE
    world.run_until(START + 60)
    assert world.logins >= 3  # it kept trying, with backoff ...
    assert world.logged_out == [f"token{n}" for n in range(1, world.logins + 1)]  # ... cleanly
    assert world.core.state is S.RECONNECTING and world.core.failure is None
    world.setup_error = None
    world.run_until(world.now + 60, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP and list(world.sessions) == [f"token{world.logins}"]


def test_a_non_retryable_setup_failure_logs_out_and_ends_the_run():
    world = World(random.Random(3))
    world.setup_error = SETUP_FAILED
    world.run_until(START + 10)
    assert world.core.failure is SETUP_FAILED and world.core.state is S.DISCONNECTED
    assert world.logged_out == ["token1"] and not world.sessions


def test_a_revoked_session_ends_the_run_at_the_next_rekey():
    world = World(random.Random(4))
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    world.rekey_error = revoked = ClientError("access revoked", retryable=False)
    world.run_until(world.now + KEY_LIFETIME + 1)
    assert world.core.failure is revoked and world.core.state is S.DISCONNECTED
    assert world.tunnel is None and world.core.last_error == "access revoked"


def test_a_dead_path_resolves_the_dataplane_again_and_follows_a_move():
    """After a dead path the dataplane's host name is looked up again (WireGuard's
    reresolve-dns); same address: a new source port; a new address: the old session
    is logged out and a new attempt sets up route and datapath for the new one."""
    world = World(random.Random(5), endpoint="vpn.example.test")
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    world.path_up = False
    world.run_until(world.now + 30)
    assert world.core.state is S.RECONNECTING and world.logins == 1
    world.resolves_to = "198.18.1.2"
    world.path_up = True
    world.run_until(world.now + 60, done=lambda: world.logins == 2 and world.core.state is S.UP)
    assert world.logged_out == ["token1"]
    assert world.core.endpoint_address == "198.18.1.2"


def test_the_dataplane_asking_for_new_keys_rekeys_at_once():
    world = World(random.Random(6))
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    world.run_until(world.now + 0.5)
    asked = world.now
    world.core.handle_rekey_wanted(asked)
    world.run_until(asked + 1, done=lambda: bool(world.rekeys))
    assert world.rekeys == [asked]


# -- several gateways (a cluster) -----------------------------------------------------

CLUSTER = (
    Gateway("gw-a", ("198.18.1.10", 8443), (DATAPLANE, 51820), 10),
    Gateway("gw-b", ("198.18.1.11", 8443), ("198.18.1.2", 51820), 20),
    Gateway("gw-c", ("198.18.1.12", 8443), ("198.18.1.3", 51820), 30),
)
DEAD_AFTER = 2 * KEEPALIVE + 5  # the core's default


def cluster_world(seed: int) -> World:
    world = World(random.Random(seed), gateways=CLUSTER)
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP and world.using == "gw-a"
    return world


def test_a_dead_gateway_moves_the_tunnel_to_the_next_without_a_login_and_back_later():
    world = cluster_world(20)
    world.run_until(world.now + 5)
    world.down.add("gw-a")
    died = world.now
    world.run_until(died + 60, done=lambda: world.using == "gw-b" and world.core.state is S.UP)
    assert world.core.state is S.UP and world.using == "gw-b"
    assert world.now - died <= DEAD_AFTER + 0.1  # no wait beyond the dead path's
    world.run_until(world.now + 60)  # on gw-b: rekeys and probes of gw-a go on
    assert world.core.state is S.UP and world.using == "gw-b"
    assert world.expired_while_held == []
    world.down.discard("gw-a")
    healed = world.now
    world.run_until(healed + 60, done=lambda: world.using == "gw-a")
    assert world.using == "gw-a" and world.core.state is S.UP
    assert world.now - healed <= FAILBACK_PROBE_SECONDS + 0.1
    assert world.logins == 1 and world.logged_out == []
    assert [gateway for _, gateway in world.moves] == ["gw-b", "gw-a"]


def test_with_every_gateway_down_the_client_goes_round_them_and_takes_the_first_back():
    world = cluster_world(21)
    world.down.update({"gw-a", "gw-b", "gw-c"})
    world.run_until(world.now + 120)
    assert world.core.state is S.RECONNECTING and world.logins == 1
    tried = [gateway for _, gateway in world.moves]
    assert tried[:2] == ["gw-b", "gw-c"] and set(tried) == {"gw-a", "gw-b", "gw-c"}
    assert world.expired_while_held == []  # keys renewed all along
    world.down.discard("gw-c")
    healed = world.now
    world.run_until(healed + 120, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP and world.using == "gw-c" and world.logins == 1
    assert world.now - healed <= BACKOFF_MAX_SECONDS + 3 * 5.0 + 0.5  # a round of waits


def test_a_login_answered_by_a_less_preferred_gateway_moves_to_the_preferred_one():
    world = World(random.Random(22), gateways=CLUSTER)
    world.answering = "gw-b"  # the client was given gw-b's auth service
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    assert world.using == "gw-b"
    world.run_until(world.now + FAILBACK_PROBE_SECONDS + 1)
    assert world.using == "gw-a" and world.core.state is S.UP and world.logins == 1


gateway_events = st.sampled_from(
    [f"{g.id}_{change}" for g in CLUSTER for change in ("down", "up")]
    + ["path_down", "path_up", "auth_down", "auth_up", "rekey_wanted", "login_throttled"]
)


@settings(max_examples=150, deadline=None)
@given(
    st.randoms(use_true_random=False),
    st.floats(0.0, 1.0),
    st.lists(st.tuples(st.floats(0.0, 90.0), gateway_events), max_size=20),
)
def test_random_gateway_outages_end_on_the_most_preferred_gateway_alive(rng, latency, events):
    """Gateways, the path and the auth service fail and heal at random: once all is
    calm again (the auth service answering, the path up), the client is up within
    two minutes on the most preferred gateway alive, and no invariant broke on the
    way (one action of each kind in flight, probes only of other gateways)."""
    world = World(rng, max_latency=latency, gateways=CLUSTER)
    for at, what in sorted(events, key=lambda event: event[0]):
        world.run_until(START + at)
        name, _, change = what.partition("_")
        if change in ("down", "up") and name.startswith("gw-"):
            (world.down.add if change == "down" else world.down.discard)(name)
        else:
            disturb(world, what)
        world.execute()
    world.path_up = world.auth_up = True
    world.login_error = None
    world.run_until(world.now + 120)
    core, alive = world.core, [g.id for g in CLUSTER if g.id not in world.down]
    assert core.failure is None
    if alive:
        assert core.state in (S.UP, S.REKEYING) and world.using == alive[0], world.moves[-5:]
    else:
        assert core.state is S.RECONNECTING and core.tunnel_up


def test_a_lone_gateway_never_moves_nor_probes():
    world = up_world(23)
    world.path_up = False
    world.run_until(world.now + 60)
    world.path_up = True
    world.run_until(world.now + 60, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP and world.moves == []


# -- live network changes --------------------------------------------------------------


def up_world(seed: int) -> World:
    world = World(random.Random(seed))
    world.run_until(START + 30, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP and world.tunnel_network == world.network
    return world


def test_a_changed_network_reaches_the_live_tunnel_at_the_next_check():
    world = up_world(10)
    new = PushedNetwork(
        routes=("198.18.2.0/24",),
        dns_servers=("198.18.2.53",),
        match_domains=("eng.example",),
        digest="n1",
    )
    world.network = new
    world.run_until(world.now + NETWORK_CHECK_SECONDS + 1)
    assert world.applied == [new] and world.tunnel_network == new
    assert world.core.network == new
    # on the same tunnel and session: nothing torn down, no new login
    assert world.teardowns == 0 and world.logins == 1 and world.core.state is S.UP
    world.run_until(world.now + 5 * NETWORK_CHECK_SECONDS)
    assert world.applied == [new]  # unchanged since: nothing more to apply


def test_an_unchanged_network_is_never_applied_again():
    world = up_world(11)
    world.run_until(world.now + 10 * NETWORK_CHECK_SECONDS)
    assert world.apply_attempts == 0
    # a new digest for the same content changes nothing on the host either
    world.network = PushedNetwork(world.network.routes, digest="renamed")
    world.run_until(world.now + 2 * NETWORK_CHECK_SECONDS)
    assert world.apply_attempts == 0


def test_a_rekey_answer_brings_a_change_at_once():
    world = up_world(12)
    world.run_until(world.now + 1)
    world.network = new = PushedNetwork(routes=("198.18.3.0/24",), digest="n2")
    world.core.request_rekey()
    asked = world.now
    world.run_until(asked + 1, done=lambda: bool(world.applied))
    assert world.applied == [new] and world.now - asked < 1
    assert world.teardowns == 0


def test_the_network_is_checked_about_every_period_while_up():
    world = up_world(13)
    checks = []
    original = world._complete

    def complete(kind, arg):
        if kind == "network_check":
            checks.append(world.now)
        original(kind, arg)

    world._complete = complete
    world.run_until(world.now + 20 * NETWORK_CHECK_SECONDS)
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    assert len(checks) >= 19
    assert all(0.75 * NETWORK_CHECK_SECONDS <= gap <= NETWORK_CHECK_SECONDS for gap in gaps)


def test_a_failed_change_is_logged_and_not_retried_until_another_comes():
    world = up_world(14)
    before = world.tunnel_network
    world.apply_error = APPLY_FAILED
    world.network = first = PushedNetwork(routes=("198.18.2.0/24",), digest="n3")
    world.run_until(world.now + 4 * NETWORK_CHECK_SECONDS)
    assert world.apply_attempts == 1 and world.failed_networks == [first]
    assert world.tunnel_network == before and world.core.state is S.UP  # the tunnel stays
    assert "network change not applied" in world.core.last_error
    world.apply_error = None
    world.network = second = PushedNetwork(routes=("198.18.3.0/24",), digest="n4")
    world.run_until(world.now + NETWORK_CHECK_SECONDS + 1)
    assert world.applied == [second] and world.core.network == second


def test_a_session_the_check_finds_gone_means_a_new_login():
    world = up_world(15)
    world.sessions.clear()  # ended at the auth service; the dataplane still answers
    world.run_until(world.now + NETWORK_CHECK_SECONDS + 1, done=lambda: world.logins == 2)
    assert world.logins == 2
    world.run_until(world.now + 30, done=lambda: world.core.state is S.UP)
    assert world.core.state is S.UP


def test_a_revocation_the_check_finds_ends_the_run():
    world = up_world(16)
    revoked = ClientError("access revoked by the administrator", retryable=False)
    original = world._complete

    def complete(kind, arg):
        if kind == "network_check":
            world.in_flight[kind] -= 1
            world.core.handle_network_check(world.now, revoked)
        else:
            original(kind, arg)

    world._complete = complete
    world.run_until(world.now + NETWORK_CHECK_SECONDS + 1)
    assert world.core.failure is revoked and world.core.state is S.DISCONNECTED
    assert world.tunnel is None
