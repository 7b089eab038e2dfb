"""The client's decisions, as a pure object driven by events and `now`.

As aioquic's QuicConnection: no sockets, no clock, no awaits. Its owner
(client/connection.py) feeds it what happened (`start`, `handle_login_result`,
`handle_bring_up_result`, `handle_rekey_result`, `handle_session_check`,
`handle_resolved`, `handle_received`, `handle_rekey_wanted`, `handle_network`,
`handle_network_check`, `handle_network_applied`, `stop`) and the
time (`handle_timer(now)` once `get_timer()` is reached), and executes the
actions it takes from `actions()`: log in, bring the tunnel up or down, rekey,
install keys, check the session, resolve the dataplane's host, rebind, send a
keepalive, log out, ask for and apply the session's network. Every result comes
back as an event; the core never has two logins, two rekeys, two session checks
or two network changes in flight.

What it decides, all here:
- when the dataplane counts as lost (no authenticated packet for `dead_after`);
- while waiting for the dataplane (connecting, reconnecting): a keepalive every
  PROBE_INTERVAL_SECONDS, keys renewed when due all the while (the UDP path may be
  down while the auth service answers: fresh keys keep the session through an
  outage of any length); after HANDSHAKE_TIMEOUT_SECONDS the session is checked,
  the dataplane's host name resolved again (as WireGuard's reresolve-dns) and a new
  UDP source port tried, then probing for a backoff delay, and so on;
- when to rekey (key lifetime, the keys' limits or the dataplane's request) and
  when to retry a failed rekey; a session the auth service no longer knows means
  a new login at once;
- login retries with backoff; a login whose tunnel cannot be set up is logged out
  at once (it would hold a session and an address until it expired);
- a non-retryable ClientError from any auth call ends the run (`failure`);
- live network changes: the auth service's NetworkConfig follows the user's
  groups; a changed one, learned from a Rekey answer or from the SessionInfo check
  made every NETWORK_CHECK_SECONDS while up, is applied to the live tunnel
  (`ApplyNetwork`: the owner adds and removes routes and DNS on the same TUN), one
  change at a time, always the newest; a change that fails is logged and not tried
  again until a different one comes (the tunnel keeps what it had).
- failover between the session's gateways (a cluster, docs/scaling.md): a dead path
  moves the tunnel to the most preferred gateway not tried since it died
  (`UseGateway`: its dataplane, its wire keys, its auth service; the TUN, routes and
  DNS stay), each given HANDSHAKE_TIMEOUT_SECONDS to answer, no new login; once all
  were tried, the session check and a new source port as with one gateway. While on
  a less preferred gateway, the more preferred ones are probed every
  FAILBACK_PROBE_SECONDS (`ProbeGateway`: a keepalive with their keys) and the first
  that answers takes the tunnel back;
- make before break: a re-login (the session is gone, or the dataplane moved) keeps
  the TUN, its address, routes and DNS (`Suspend`: only the datapath stops) until the
  next bring-up reuses them, through any number of failed logins; packets wait in the
  TUN meanwhile and never leave in clear. Only a stop or a failure tears it down.
"""

import ipaddress
import logging
import random
from collections import deque
from dataclasses import dataclass

from push_protocol.backoff import Backoff
from push_protocol.keys import KeyMaterial

from .auth import ClientError, ClientSession, Gateway, PushedNetwork, RekeyAnswer, SessionGone
from .state import ClientEvent, ClientState, ClientStateMachine

log = logging.getLogger("pushgate.client")

HANDSHAKE_TIMEOUT_SECONDS = 5.0
# While waiting for the dataplane, a keepalive this often: an answer soon after the
# path heals.
PROBE_INTERVAL_SECONDS = 1.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# A failed rekey is retried after this long (WireGuard's REKEY_TIMEOUT), or sooner
# when the session would expire first: four tries fit before the keys' hard limit.
REKEY_RETRY_SECONDS = 5.0
REKEY_RETRY_MIN_SECONDS = 0.25
# Silence that means the dataplane is lost, unless configured: two keepalives and
# the handshake wait.
DEAD_AFTER_KEEPALIVES = 2
# While up, the client asks the auth service for its session (SessionInfo) this
# often, less a random quarter so that clients that came up together do not ask
# together. The dataplane enforces a changed policy within a second whatever the
# client knows; what the client learns here is only new routes and DNS, so a
# destination just allowed is routed within half a minute, at one small call per
# client per 30 s (10,000 clients: about 400 calls/s, each one store read).
NETWORK_CHECK_SECONDS = 30.0
NETWORK_CHECK_JITTER = 0.25
# On a less preferred gateway, the more preferred ones are probed this often: back
# within this long after the preferred one heals, at one keepalive each per probe.
FAILBACK_PROBE_SECONDS = 10.0


# -- actions: what the owner executes, in order ------------------------------------


@dataclass(frozen=True)
class Login:
    """Resolve the auth service's host and log in; answer with handle_login_result."""


@dataclass(frozen=True)
class BringUp:
    """Resolve the dataplane's host, open the TUN, configure the network and start the
    datapath for `session`; answer with handle_bring_up_result (the address used).
    On failure the owner undoes what it did before answering."""

    session: ClientSession


@dataclass(frozen=True)
class TearDown:
    """Stop the datapath, undo the network configuration, close the TUN (also a
    suspended one). Only when the run ends: stop or failure."""


@dataclass(frozen=True)
class Suspend:
    """Stop the datapath (its keys belong to a session that is gone); keep the TUN,
    its address, routes and DNS for the next BringUp, which reuses them when the new
    session's network is the same (make before break: nothing leaves in clear)."""


@dataclass(frozen=True)
class Logout:
    token: str


@dataclass(frozen=True)
class Rekey:
    """Ask the auth service for new keys; answer with handle_rekey_result."""

    token: str


@dataclass(frozen=True)
class InstallKeys:
    keys: KeyMaterial


@dataclass(frozen=True)
class CheckSession:
    """Does the auth service still know the session? Answer with handle_session_check."""

    token: str


@dataclass(frozen=True)
class CheckNetwork:
    """Ask the auth service for the session's network (SessionInfo); answer with
    handle_network_check."""

    token: str


@dataclass(frozen=True)
class ApplyNetwork:
    """Move the live tunnel from the network it has to `network` (routes added and
    removed, DNS set anew) without tearing it down; answer with
    handle_network_applied."""

    network: PushedNetwork


@dataclass(frozen=True)
class Resolve:
    """Resolve the dataplane's host again; answer with handle_resolved."""

    host: str


@dataclass(frozen=True)
class Rebind:
    """A new UDP socket (a new source port)."""


@dataclass(frozen=True)
class SendKeepalive:
    pass


@dataclass(frozen=True)
class UseGateway:
    """Send to `gateway` from now on: its dataplane, with its wire keys, and its auth
    service; the TUN, its routes and DNS stay as they are."""

    gateway: Gateway


@dataclass(frozen=True)
class ProbeGateway:
    """Send `gateway`'s dataplane a keepalive with its wire keys, beside the tunnel;
    an authenticated answer comes back as handle_probe_answer."""

    gateway: Gateway


Action = (
    Login
    | BringUp
    | TearDown
    | Suspend
    | Logout
    | Rekey
    | InstallKeys
    | CheckSession
    | CheckNetwork
    | ApplyNetwork
    | Resolve
    | Rebind
    | SendKeepalive
    | UseGateway
    | ProbeGateway
)


def rekey_retry_delay(now: float, expires_at: float) -> float:
    """How long to wait before trying a failed rekey again (times in seconds)."""
    if expires_at <= 0:  # the auth service did not say when the session ends
        return REKEY_RETRY_SECONDS
    return min(REKEY_RETRY_SECONDS, max(REKEY_RETRY_MIN_SECONDS, (expires_at - now) / 4))


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ClientCore:
    def __init__(
        self, *, dead_after_seconds: float | None = None, rng: random.Random | None = None
    ) -> None:
        self.machine = ClientStateMachine()
        self._rng = rng or random.Random()
        self.dead_after_seconds = dead_after_seconds
        self.backoff = Backoff(BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS, rng)
        self.session: ClientSession | None = None  # logged in (its tunnel may be down)
        self.tunnel_up = False  # TUN, network and datapath exist for `session`
        self.tunnel_held = False  # a suspended TUN and network wait for the next session
        self.endpoint_address: str | None = None  # where the datapath sends
        self.last_error = ""
        self.failure: ClientError | None = None  # set when the run must end
        self._actions: deque[Action] = deque()
        # one of each in flight at most
        self.login_pending = self.bring_up_pending = False
        self.rekey_pending = self.check_pending = self.resolve_pending = False
        self._rekey_for: ClientSession | None = None  # the session a pending rekey is for
        self._rekey_at = 0.0
        self._rekey_retry_at = 0.0  # after a failed rekey, not before (whatever asks)
        self._rekey_wanted = False  # the keys' limits or the dataplane ask for new ones
        self._expires_at = 0.0  # when the session ends unless rekeyed (unix seconds)
        self._last_received = 0.0  # newest authenticated packet (or when we began waiting)
        self._waiting_since = 0.0  # an answer after this means the tunnel is up
        self._wait_until = 0.0  # then check the session (reconnecting) or give up (connecting)
        self._probe_at = 0.0
        self._login_at = 0.0  # the next login try, after a failed one
        # the network of the tunnel, as applied; the newest one learned; one that failed
        self.network: PushedNetwork | None = None
        self._network_wanted: PushedNetwork | None = None
        self._network_failed: PushedNetwork | None = None
        self.network_check_pending = self.apply_pending = False
        self._network_check_for: ClientSession | None = None
        self._apply_for: ClientSession | None = None  # the session a pending apply is for
        self._applying: PushedNetwork | None = None
        self._network_check_at = 0.0
        self.gateway: Gateway | None = None  # the one the tunnel uses
        self._tried: set[str] = set()  # gateways tried since the path died
        self._failback_probe_at = 0.0

    @property
    def state(self) -> ClientState:
        return self.machine.state

    @property
    def awaiting_answer(self) -> bool:
        """True while the first packet from the dataplane is news (connecting, reconnecting)."""
        return self.tunnel_up and self.state in (ClientState.CONNECTING, ClientState.RECONNECTING)

    def actions(self) -> list[Action]:
        taken = list(self._actions)
        self._actions.clear()
        return taken

    def _error(self, message: str) -> None:
        self.last_error = message
        log.warning("%s", message)

    def _event(self, event: ClientEvent) -> None:
        before = self.machine.state
        after = self.machine.handle(event)
        log.info("state %s -> %s (%s)", before.value, after.value, event.value)

    # -- events from the owner --------------------------------------------------------

    def start(self, now: float) -> None:
        self._event(ClientEvent.START)
        self._login()

    def stop(self, now: float) -> None:
        if self.state is ClientState.DISCONNECTED:
            return
        self._close_session(logout=True)
        self._event(ClientEvent.STOP)

    def request_rekey(self) -> None:
        """Rekey as soon as possible instead of waiting for the key lifetime (SIGUSR2)."""
        self._rekey_at = self._rekey_retry_at = 0.0

    def handle_login_result(self, now: float, result: ClientSession | ClientError) -> None:
        self.login_pending = False
        if self.state is ClientState.DISCONNECTED:
            if isinstance(result, ClientSession):
                self._actions.append(Logout(result.token))  # stopped meanwhile
            return
        if isinstance(result, ClientError):
            self._login_failed(now, result)
            return
        self.session = result
        self.bring_up_pending = True
        self._actions.append(BringUp(result))

    def handle_bring_up_result(self, now: float, result: str | ClientError) -> None:
        self.bring_up_pending = False
        if self.state is ClientState.DISCONNECTED:
            if not isinstance(result, ClientError):
                self._actions.append(TearDown())
            return
        if isinstance(result, ClientError):
            # The session is of no use without its tunnel: end it now, not in 900 s.
            self.tunnel_held = False  # the owner undid everything, a held TUN too
            self._actions.append(Logout(self.session.token))
            self.session = None
            self._login_failed(now, result)
            return
        self.tunnel_up = True
        self.tunnel_held = False
        self.endpoint_address = result
        self._rekey_at = now + self.session.key_lifetime_seconds
        self._rekey_retry_at = 0.0
        self._rekey_wanted = False
        self._expires_at = self.session.expires_at
        self.network = self.session.network  # as configured by the bring-up
        self._network_wanted = self._network_failed = None
        self._schedule_network_check(now)
        self.gateway = self.session.answering_gateway
        self._failback_probe_at = now + FAILBACK_PROBE_SECONDS
        self._event(ClientEvent.LOGGED_IN)
        self._wait_for_answer(now, HANDSHAKE_TIMEOUT_SECONDS)

    def handle_received(self, now: float, received_at: float | None) -> None:
        """The datapath's newest authenticated packet (None: none yet)."""
        if received_at is None or not self.tunnel_up:
            return
        self._last_received = max(self._last_received, received_at)
        if self.awaiting_answer and received_at > self._waiting_since:
            self.backoff.reset()
            self._last_received = max(self._last_received, now)
            self._event(ClientEvent.TUNNEL_UP)

    def handle_rekey_wanted(self, now: float) -> None:
        """The keys near their limits, or the dataplane asked for new ones."""
        if self.tunnel_up:
            self._rekey_wanted = True

    def handle_rekey_result(self, now: float, result: RekeyAnswer | ClientError) -> None:
        session, self._rekey_for = self._rekey_for, None
        self.rekey_pending = False
        if self.state is ClientState.DISCONNECTED or session is not self.session:
            return  # for a session we have left meanwhile
        rekeying = self.state is ClientState.REKEYING
        if isinstance(result, SessionGone):
            self._log_in_again()
            return
        if isinstance(result, ClientError):
            if not result.retryable:
                self._fail(result)
                return
            self._error(f"rekey failed: {result}")
            self._rekey_at = self._rekey_retry_at = now + rekey_retry_delay(now, self._expires_at)
            if rekeying:
                self._event(ClientEvent.REKEY_FAILED)
            return
        keys, expires_at, network = result
        if self.tunnel_up:
            self._actions.append(InstallKeys(keys))
        self._expires_at = expires_at
        self._rekey_retry_at = 0.0
        self._rekey_wanted = False
        self._rekey_at = keys.created_at + session.key_lifetime_seconds
        if rekeying:
            self._event(ClientEvent.REKEY_DONE)
        self.handle_network(now, network)

    def handle_network(self, now: float, network: PushedNetwork | None) -> None:
        """The auth service's network for our session (None: it did not say)."""
        if network is None or not self.tunnel_up:
            return
        self._network_wanted = network
        self._apply_network()

    def handle_network_check(self, now: float, result: PushedNetwork | ClientError | None) -> None:
        """The answer to CheckNetwork: the session's network, or why there is none."""
        session, self._network_check_for = self._network_check_for, None
        self.network_check_pending = False
        if self.state is ClientState.DISCONNECTED or session is not self.session:
            return
        if not self.tunnel_up:
            return
        self._schedule_network_check(now)
        if isinstance(result, SessionGone):
            self._log_in_again()
            return
        if isinstance(result, ClientError):
            if not result.retryable:
                self._fail(result)
            else:  # the tunnel does not need the auth service now: ask again later
                log.info("session check failed: %s", result)
            return
        self.handle_network(now, result)

    def handle_network_applied(self, now: float, result: PushedNetwork | ClientError) -> None:
        """The answer to ApplyNetwork: the network the tunnel now has, or what failed."""
        session, self._apply_for = self._apply_for, None
        self.apply_pending = False
        if not self.tunnel_up or session is not self.session:
            return  # torn down meanwhile: the next bring-up configures from scratch
        if isinstance(result, ClientError):
            self._network_failed = self._applying
            self._error(f"network change not applied: {result}")
        else:
            self.network = result
            log.info("network changed: %s", result.describe())
        self._apply_network()  # a newer one may have come meanwhile

    def handle_session_check(self, now: float, result: bool | ClientError) -> None:
        """True: the auth service knows the session; False: it does not."""
        self.check_pending = False
        if self.state is not ClientState.RECONNECTING or not self.tunnel_up:
            return
        if isinstance(result, ClientError):
            if not result.retryable:
                self._fail(result)
                return
            result = True  # auth service down: the dataplane may still know us
        if not result:
            self._log_in_again()
            return
        host = self.session.endpoint[0]
        if is_address(host) or self.gateway != self.session.answering_gateway:
            # another gateway's host was resolved at the bring-up (the move is the
            # way out of a dead path there)
            self._try_new_port(now)
        else:
            self.resolve_pending = True
            self._actions.append(Resolve(host))

    def handle_resolved(self, now: float, result: str | ClientError) -> None:
        """The dataplane's host resolved again after a dead path."""
        self.resolve_pending = False
        if self.state is not ClientState.RECONNECTING or not self.tunnel_up:
            return
        if isinstance(result, str) and result != self.endpoint_address:
            # The route around the tunnel and the datapath go to the old address:
            # a new connection attempt sets both up for the new one.
            self._error(
                f"the dataplane {self.session.endpoint[0]} moved from"
                f" {self.endpoint_address} to {result}; connecting again"
            )
            self._close_session(logout=True, keep_tunnel=True)
            self._event(ClientEvent.RELOGIN)
            self._login()
            return
        self._try_new_port(now)  # a failed lookup keeps the address we have

    def handle_probe_answer(self, now: float, gateway_id: str) -> None:
        """A gateway we probed (ProbeGateway) answered: back to it if it is preferred."""
        if self.state is not ClientState.UP or not self.tunnel_up:
            return
        better = self._preferred_over_current()
        for gateway in better:
            if gateway.id == gateway_id:
                log.info("gateway %s answers again: moving back to it", gateway.id)
                self._use(gateway)
                self._last_received = now  # it just answered
                return

    # -- timers ----------------------------------------------------------------------

    def _dead_after(self) -> float:
        if self.dead_after_seconds is not None:
            return self.dead_after_seconds
        return DEAD_AFTER_KEEPALIVES * self.session.keepalive_seconds + HANDSHAKE_TIMEOUT_SECONDS

    def _rekey_due_at(self) -> float | None:
        if not self.tunnel_up or self.rekey_pending:
            return None
        due = 0.0 if self._rekey_wanted else self._rekey_at
        return max(due, self._rekey_retry_at)

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called, or None (waiting for an event)."""
        state = self.state
        if state is ClientState.DISCONNECTED or self.failure is not None:
            return None
        if not self.tunnel_up:  # logging in, or waiting to try again
            if state is ClientState.RECONNECTING and not self.login_pending:
                return self._login_at
            return None
        deadlines = [self._rekey_due_at()]
        if state in (ClientState.UP, ClientState.REKEYING):
            deadlines.append(self._last_received + self._dead_after())
            if not self.network_check_pending:
                deadlines.append(self._network_check_at)
            if state is ClientState.UP and self._preferred_over_current():
                deadlines.append(self._failback_probe_at)
        else:
            deadlines.append(self._probe_at)
            if not (self.check_pending or self.resolve_pending):
                deadlines.append(self._wait_until)
        return min(deadline for deadline in deadlines if deadline is not None)

    def handle_timer(self, now: float) -> None:
        state = self.state
        if state is ClientState.DISCONNECTED or self.failure is not None:
            return
        if not self.tunnel_up:
            waited = not self.login_pending and now >= self._login_at
            if state is ClientState.RECONNECTING and waited:
                self._event(ClientEvent.RELOGIN)
                self._login()
            return
        if state in (ClientState.UP, ClientState.REKEYING):
            silent = now - self._last_received
            if silent >= self._dead_after():
                self._error(f"no packet from the dataplane for {silent:.0f} s")
                self._lost(now)
                return
            if now >= self._network_check_at and not self.network_check_pending:
                self.network_check_pending = True
                self._network_check_for = self.session
                self._actions.append(CheckNetwork(self.session.token))
            better = self._preferred_over_current() if state is ClientState.UP else []
            if better and now >= self._failback_probe_at:
                self._failback_probe_at = now + FAILBACK_PROBE_SECONDS
                self._actions.extend(ProbeGateway(gateway) for gateway in better)
        else:
            if now >= self._wait_until and not (self.check_pending or self.resolve_pending):
                if state is ClientState.CONNECTING:
                    self._error("no answer from the dataplane")
                    self._lost(now)
                    return
                if self._move_to_untried():
                    self._wait_for_answer(now, HANDSHAKE_TIMEOUT_SECONDS)
                    return
                # Reconnecting, every gateway tried: is the session still there?
                # Then a new source port (and another round of the gateways).
                self._tried = {self.gateway.id}
                self.check_pending = True
                self._actions.append(CheckSession(self.session.token))
            if now >= self._probe_at:
                self._probe_at = now + PROBE_INTERVAL_SECONDS
                self._actions.append(SendKeepalive())
        due = self._rekey_due_at()
        if due is not None and now >= due:
            self._rekey()

    # -- decisions -------------------------------------------------------------------

    def _login(self) -> None:
        self.login_pending = True
        self._actions.append(Login())

    def _login_failed(self, now: float, error: ClientError) -> None:
        if not error.retryable:
            self._fail(error)
            return
        self._error(str(error))
        self._event(ClientEvent.LOGIN_FAILED)
        self._login_at = now + self.backoff.next_delay()

    def _wait_for_answer(self, now: float, seconds: float) -> None:
        self._waiting_since = now
        self._wait_until = now + seconds
        self._probe_at = now + PROBE_INTERVAL_SECONDS
        self._actions.append(SendKeepalive())

    def _lost(self, now: float) -> None:
        """The dataplane in use is silent: the next gateway if there is one, and wait
        for an answer."""
        self._event(ClientEvent.SERVER_LOST)
        self._tried = {self.gateway.id}
        self._move_to_untried()
        self._wait_for_answer(now, HANDSHAKE_TIMEOUT_SECONDS)

    def _move_to_untried(self) -> bool:
        """Move to the most preferred gateway not tried since the path died, if any."""
        for gateway in self.session.gateways:
            if gateway.id not in self._tried:
                self._error(f"moving to gateway {gateway.id} ({gateway.dataplane[0]})")
                self._tried.add(gateway.id)
                self._use(gateway)
                return True
        return False

    def _use(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._actions.append(UseGateway(gateway))

    def _preferred_over_current(self) -> list[Gateway]:
        """The session's gateways more preferred than the one in use."""
        if self.session is None or self.gateway is None:
            return []
        gateways = self.session.gateways
        if self.gateway not in gateways:
            return []
        return [g for g in gateways[: gateways.index(self.gateway)]]

    def _try_new_port(self, now: float) -> None:
        self._actions.append(Rebind())
        self._wait_for_answer(now, self.backoff.next_delay())

    def _schedule_network_check(self, now: float) -> None:
        spread = 1.0 - NETWORK_CHECK_JITTER * self._rng.random()
        self._network_check_at = now + NETWORK_CHECK_SECONDS * spread

    def _apply_network(self) -> None:
        wanted = self._network_wanted
        if self.apply_pending or wanted is None or not self.tunnel_up:
            return
        if wanted == self.network or wanted == self._network_failed:
            return
        self.apply_pending = True
        self._apply_for, self._applying = self.session, wanted
        self._actions.append(ApplyNetwork(wanted))

    def _rekey(self) -> None:
        if self.state is ClientState.UP:
            self._event(ClientEvent.REKEY_STARTED)
        self.rekey_pending = True
        self._rekey_for = self.session
        self._actions.append(Rekey(self.session.token))

    def _log_in_again(self) -> None:
        """The auth service no longer knows the session: a new login, now."""
        self._error(
            f"the gateway no longer knows session {self.session.session_id:#010x}; logging in again"
        )
        self._close_session(logout=False, keep_tunnel=True)
        self._event(ClientEvent.RELOGIN)
        self._login()

    def _close_session(self, *, logout: bool, keep_tunnel: bool = False) -> None:
        if keep_tunnel and self.tunnel_up:
            self._actions.append(Suspend())
            self.tunnel_held = True
        elif self.tunnel_up or self.tunnel_held:
            self._actions.append(TearDown())
            self.tunnel_held = False
        if self.tunnel_up:
            self.tunnel_up = False
            self.endpoint_address = None
        self.gateway = None
        if logout and self.session is not None:
            self._actions.append(Logout(self.session.token))
        self.session = None
        self._rekey_wanted = False
        self.network = self._network_wanted = self._network_failed = None

    def _fail(self, error: ClientError) -> None:
        """Retrying cannot help: end the run with `error`."""
        self.last_error = str(error)  # the CLI says it and exits
        self.failure = error
        self._close_session(logout=True)
        self._event(ClientEvent.STOP)
