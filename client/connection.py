"""The client's connection: executes what client/core.py decides, on asyncio.

Thin on purpose: `ClientCore` decides (dead path, rekey, backoff, relogin,
probing, session checks, giving up); this layer runs its actions (auth calls
and name lookups as tasks whose results go back to the core as events; the TUN,
the network configuration and the datapath at once), feeds it what the datapath
saw, and sleeps until the core's next timer, the session's next timer or news
(a result, a first answer from the dataplane, a rekey request, a signal).
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass

from push_protocol.keys import KeyMaterial, Role, for_gateway
from push_protocol.session import TunnelSession
from pushgate_io.tun import TunDevice

from .auth import (
    RPC_TIMEOUT_SECONDS,
    AuthClient,
    ClientError,
    ClientSession,
    CodeRequired,
    Gateway,
    PasswordLogin,
    PushedNetwork,
    RenewalRefused,
)
from .core import (
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
    is_address,
)
from .datapath import Datapath, GatewayProbe
from .host import ClientHost, NetworkChangeFailed, UndoSteps, current_host
from .sso import SsoOptions, sso_login
from .state import ClientState
from .status import ClientStatus, write_status

log = logging.getLogger("pushgate.client")

LOGOUT_TIMEOUT_SECONDS = 3.0
RESOLVE_TIMEOUT_SECONDS = 5.0
# The status file's counters are rewritten this often while nothing else happens
# (`pushgate-client status --watch`); decisions never wait for it.
STATUS_INTERVAL_SECONDS = 1.0


@dataclass
class ConnectOptions:
    server: str  # auth service host:port
    ca_path: str
    # How the first login proves who we are; dropped once a login brings a renewal
    # token: later logins renew with that, never with the password again.
    credentials: PasswordLogin | SsoOptions | None
    tun_name: str = "pgc0"
    server_name: str | None = None
    status_path: str | None = None
    dead_after_seconds: float | None = None  # default: 2 keepalives + 5 s
    # host -> address found by an earlier client (its status file): used when a
    # lookup fails, as while a kill switch it left blocks them
    known_addresses: dict[str, str] = dataclasses.field(default_factory=dict)


def split_host_port(target: str) -> tuple[str, int]:
    """ "host:port" or "[v6 address]:port"."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClientError(f"not host:port: {target!r}", retryable=False)
    return host.removeprefix("[").removesuffix("]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def same_network(old: ClientSession | None, new: ClientSession) -> bool:
    """True when a TUN configured for `old` serves `new` as it is: same address,
    MTU, routes, DNS and dataplane endpoint (its route around the tunnel)."""
    if old is None:
        return False
    fields = (
        "tunnel_address",
        "mtu",
        "routes",
        "dns_servers",
        "search_domains",
        "match_domains",
        "endpoint",
    )
    return all(getattr(old, name, None) == getattr(new, name, None) for name in fields)


async def resolve(host: str) -> str:
    """The address to use for `host` now (an address is itself); ClientError if none."""
    if is_address(host):
        return host
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM), RESOLVE_TIMEOUT_SECONDS
        )
    except (OSError, TimeoutError) as error:
        reason = str(error) or "timed out"
        raise ClientError(f"cannot resolve {host}: {reason}", retryable=True) from None
    return found[0][4][0]


class Connection:
    def __init__(
        self, options: ConnectOptions, clock=time.time, host: ClientHost | None = None
    ) -> None:
        self.options = options
        self.clock = clock
        self.host = host or current_host()  # the OS: TUN backend and network config
        self.core = ClientCore(dead_after_seconds=options.dead_after_seconds)
        self.auth: AuthClient | None = None  # opened by the first login
        self._renewal_token = ""  # from the last login: the next one renews with it
        self._auth_target = ""
        # host name -> its address as last resolved (auth service, dataplane)
        self._resolved: dict[str, str] = dict(options.known_addresses)
        self.session_info: ClientSession | None = None  # as brought up (resolved endpoint)
        self.datapath: Datapath | None = None
        # The session's keys as minted (newest), and a TunnelSession per gateway used
        # or probed with them: its send counters go on where they stopped when the
        # tunnel comes back to it, so no (key, nonce) pair is ever sent twice.
        self._keys: KeyMaterial | None = None
        self._tunnels: dict[str, TunnelSession] = {}
        self._probes: dict[str, GatewayProbe] = {}
        self._retired_auth: list[AuthClient] = []  # a gateway's, after a move
        self._known_gateways: tuple[Gateway, ...] = ()  # the last session's
        self._failed_logins = 0  # in a row: picks the next auth service to try
        self.gateway: Gateway | None = None  # the one the datapath sends to
        self.tun: TunDevice | None = None
        self.undo: UndoSteps | None = None  # how to undo the network configuration
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # news for the core: a result, an answer, a signal
        self._tasks: set[asyncio.Task] = set()  # auth calls and lookups in flight
        self._logouts: set[asyncio.Task] = set()
        self._crash: BaseException | None = None  # a bug in a task: ends the run

    @property
    def state(self) -> ClientState:
        return self.core.state

    @property
    def last_error(self) -> str:
        return self.core.last_error

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_rekey(self) -> None:
        """Rekey now instead of waiting for the key lifetime (SIGUSR2)."""
        self.core.request_rekey()
        self._wake.set()

    def request_rebind(self) -> None:
        """Move to a new UDP source port at once, as after a NAT change (SIGUSR1)."""
        if self.datapath is not None:
            self.datapath.rebind()
            self.datapath.send_keepalive()
            log.info("moved to UDP source port %d", self.datapath.local_port)
            self._wake.set()  # the status file shows the new port

    async def run(self) -> None:
        """Run until stopped; raises ClientError for failures retrying can't fix."""
        core = self.core
        core.start(self.clock())
        try:
            while True:
                now = self.clock()
                if self._stop.is_set():
                    core.stop(now)
                else:
                    self._feed_datapath(now)
                    core.handle_timer(now)
                self._execute(core.actions())
                self._write_status()
                if self._crash is not None:
                    raise self._crash
                if core.failure is not None:
                    raise core.failure
                if core.state is ClientState.DISCONNECTED:
                    return
                await self._sleep()
        finally:
            for task in self._tasks:
                task.cancel()
            if core.state is not ClientState.DISCONNECTED:
                core.stop(self.clock())
            self._execute(core.actions())
            self._teardown()  # also what a bring-up cancelled half-way left
            self._release_if_stopped()
            if self._logouts:
                await asyncio.wait(self._logouts)
            self._write_status()
            if self.auth is not None:
                await self.auth.close()
            for auth in self._retired_auth:
                await auth.close()

    # -- waiting -------------------------------------------------------------------

    def _next_wake(self) -> float | None:
        deadlines = [self.core.get_timer()]
        if self.datapath is not None:
            session = self.datapath.session
            deadlines.append(session.get_timer())  # new keys take over, old ones go
            if session.last_sent_at is not None:
                deadlines.append(session.last_sent_at + session.keepalive_interval)
        if self.options.status_path:
            deadlines.append(self.clock() + STATUS_INTERVAL_SECONDS)
        return min((d for d in deadlines if d is not None), default=None)

    async def _sleep(self) -> None:
        deadline = self._next_wake()
        if not self._wake.is_set():
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    def _feed_datapath(self, now: float) -> None:
        datapath = self.datapath
        if datapath is None:
            return
        datapath.tick()  # the session's timers; a keepalive when one is due
        session = datapath.session
        self.core.handle_received(now, session.last_received_at)
        if session.needs_rekey(now):  # the keys' limits, or the dataplane asked
            self.core.handle_rekey_wanted(now)

    def _on_received(self) -> None:
        """The datapath authenticated a packet: news only while waiting for an answer."""
        if self.core.awaiting_answer:
            self._wake.set()

    # -- executing the core's actions ------------------------------------------------

    def _execute(self, actions) -> None:
        core = self.core
        for action in actions:
            match action:
                case Login():
                    self._spawn(self._login(), core.handle_login_result)
                case BringUp(session=session):
                    self._spawn(self._bring_up(session), core.handle_bring_up_result)
                case TearDown():
                    self._teardown()
                case Suspend():
                    self._suspend()
                case Logout(token=token):
                    self._logout(token)
                case Rekey(token=token):
                    self._spawn(self.auth.rekey(token), core.handle_rekey_result)
                case InstallKeys(keys=keys):
                    self._keys = keys
                    for gateway_id, tunnel in self._tunnels.items():
                        tunnel.install_next(for_gateway(keys, gateway_id), self.clock())
                    log.info("rekeyed: key epoch %d", keys.epoch)
                case UseGateway(gateway=gateway):
                    self._use_gateway(gateway)
                case ProbeGateway(gateway=gateway):
                    self._probe(gateway)
                case CheckSession(token=token):
                    self._spawn(self.auth.session_alive(token), core.handle_session_check)
                case CheckNetwork(token=token):
                    self._spawn(self.auth.session_network(token), core.handle_network_check)
                case ApplyNetwork(network=network):
                    core.handle_network_applied(self.clock(), self._apply_network(network))
                    self._wake.set()  # what the core decided next runs at once
                case Resolve(host=host):
                    self._spawn(resolve(host), core.handle_resolved)
                case Rebind():
                    self.datapath.rebind()
                    log.info("trying UDP source port %d", self.datapath.local_port)
                case SendKeepalive():
                    self.datapath.session.handle_timer(self.clock())  # renewed keys take over
                    self.datapath.send_keepalive()

    def _spawn(self, work, deliver) -> None:
        """Run `work`; its result, or its ClientError, goes to `deliver(now, result)`."""

        async def run() -> None:
            try:
                result = await work
            except ClientError as error:
                result = error
            deliver(self.clock(), result)
            self._execute(self.core.actions())  # at once: new keys before the next check
            self._wake.set()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._crash = self._crash or task.exception()
            self._wake.set()

    def _login_server(self) -> tuple[str, int]:
        """Where this login goes: the server given, or after a failed attempt, in
        turn, the auth services of the gateways the last session listed (a cluster
        whose first gateway is down still takes a new login)."""
        servers = [split_host_port(self.options.server)]
        for gateway in self._known_gateways:
            if gateway.auth is not None and gateway.auth not in servers:
                servers.append(gateway.auth)
        return servers[self._failed_logins % len(servers)]

    async def _login(self) -> ClientSession:
        """One connection attempt's login: the auth service's host resolved now."""
        try:
            info = await self._log_in_at(*self._login_server())
        except ClientError as error:
            if error.retryable:
                self._failed_logins += 1
            raise
        self._failed_logins = 0
        self._known_gateways = info.gateways
        return info

    async def _log_in_at(self, host: str, port: int) -> ClientSession:
        address = await self._resolve(host)
        lock_down = getattr(self.host, "lock_down", None)  # the kill switch lets it out
        if lock_down is not None:
            lock_down(self.options.tun_name, [(address, port, "tcp")])
        target = join_host_port(address, port)
        self._switch_auth(host, target)
        info = None
        if self._renewal_token:
            try:
                info = await self.auth.renew(self._renewal_token)
                log.info("session renewed without a new sign-in")
            except RenewalRefused:
                # e.g. the first login's tunnel could not be set up and was logged out
                # (which ends its renewal); the credentials are still here until a
                # tunnel was up once
                if self.options.credentials is None:
                    raise
            self._renewal_token = ""
        if info is None:
            info = await self._sign_in()
        self._renewal_token = info.renewal_token
        return info

    async def _sign_in(self) -> ClientSession:
        credentials = self.options.credentials
        if isinstance(credentials, SsoOptions):
            return await sso_login(self.auth, credentials)
        if credentials is None:  # cannot happen: a renewal token replaced them
            raise ClientError("no credentials left to log in with", retryable=False)
        try:
            return await self.auth.login(
                credentials.username, credentials.password, credentials.otp_code
            )
        except CodeRequired:
            if credentials.ask_code is None or credentials.otp_code:
                raise
        code = await asyncio.get_running_loop().run_in_executor(None, credentials.ask_code)
        return await self.auth.login(credentials.username, credentials.password, code)

    async def _resolve(self, host: str) -> str:
        """`host`'s address now; when the lookup fails, the one found before: with the
        kill switch on and the tunnel down no lookup gets out (as a failed re-resolve
        after a dead path keeps the address)."""
        try:
            address = await resolve(host)
        except ClientError as error:
            if host not in self._resolved:
                raise
            log.info("%s; using %s as before", error, self._resolved[host])
            return self._resolved[host]
        if address != host:
            self._resolved[host] = address
        return address

    async def _bring_up(self, info: ClientSession) -> str:
        """TUN, network and datapath for `info`, the dataplane's host resolved now;
        returns the address used. On failure undoes what it did (a held TUN too).
        A TUN held from the last session (Suspend) is reused as it is when the new
        session's network is the same (the auth service gives a user back their
        address): only the datapath is new; else it is rebuilt."""
        host, port = info.endpoint
        try:
            address = await self._resolve(host)
        except ClientError:
            self._teardown()
            raise
        info = dataclasses.replace(info, endpoint=(address, port))
        await self._resolve_gateways(info)
        held = self.tun is not None and self.datapath is None
        if not (held and same_network(self.session_info, info)):
            self._teardown()
        try:
            if self.tun is None:
                self.tun = self.host.open_tun(self.options.tun_name)
                self.undo = self.host.configure(self.tun, info)
            else:
                log.info("tunnel %s kept: same address, routes and DNS", self.tun.name)
            self._keys, self._tunnels = info.keys, {}
            self.gateway = info.answering_gateway
            session = self._tunnel_for(info, self.gateway)
            self.datapath = Datapath(
                asyncio.get_running_loop(),
                session,
                self.tun,
                info.endpoint,
                self.clock,
                on_rekey_requested=self._wake.set,  # rekey at once, not at the next timer
                on_received=self._on_received,
                partial_tcp=info.partial_checksums,
            )
            self.datapath.start()
        except BaseException:
            self._teardown()
            raise
        self.session_info = info
        if self._renewal_token:
            self.options.credentials = None  # from now on renewals only: not kept
        log.info(
            "tunnel %s up with %s, session %#010x, dataplane %s:%d",
            self.tun.name,
            info.tunnel_address,
            info.session_id,
            *info.endpoint,
        )
        log.info("network: %s", info.network.describe())
        return address

    async def _resolve_gateways(self, info: ClientSession) -> None:
        """Every gateway's hosts resolved now (a move after a dead path must not wait
        for a lookup, nor make one outside the tunnel), and let through the kill switch
        and, in a full tunnel, routed around it: the auth services over TCP, the other
        dataplanes over UDP (the session's own is the bring-up's)."""
        host, port = split_host_port(self.options.server)
        endpoints = [(self._resolved.get(host, host), port, "tcp")]
        for gateway in info.gateways:
            for what, protocol in ((gateway.auth, "tcp"), (gateway.dataplane, "udp")):
                if what is None or (protocol == "udp" and gateway.id == info.gateway_id):
                    continue
                try:
                    endpoints.append((await self._resolve(what[0]), what[1], protocol))
                except ClientError as error:
                    log.warning("gateway %s: %s", gateway.id, error)
        lock_down = getattr(self.host, "lock_down", None)
        if lock_down is not None and len(endpoints) > 1:
            lock_down(self.options.tun_name, endpoints)

    def _tunnel_for(self, info: ClientSession, gateway: Gateway) -> TunnelSession:
        """The session as `gateway` knows it (its wire keys), made at its first use.
        One kept while another gateway had the tunnel catches up with its timers
        first: keys installed meanwhile take over as they would have (the gateway
        no longer accepts the ones before them)."""
        tunnel = self._tunnels.get(gateway.id)
        if tunnel is None:
            tunnel = self._tunnels[gateway.id] = TunnelSession(
                info.session_id,
                info.cipher,
                Role.CLIENT,
                for_gateway(self._keys, gateway.id),
                keepalive_interval=info.keepalive_seconds,
            )
        else:
            tunnel.handle_timer(self.clock())
        return tunnel

    def _known_address(self, host: str) -> str | None:
        """`host` as an address: itself, or what it resolved to at bring-up (None if
        it did not: a move needs no lookup, and the kill switch lets only those out)."""
        return host if is_address(host) else self._resolved.get(host)

    def _use_gateway(self, gateway: Gateway) -> None:
        """The datapath moves to `gateway` (core.UseGateway); so do the auth calls."""
        info, address = self.session_info, self._known_address(gateway.dataplane[0])
        if info is None or self.datapath is None or address is None:
            log.warning("gateway %s not used: its host was not resolved", gateway.id)
            return
        self._close_probe(gateway.id)
        self.datapath.move(self._tunnel_for(info, gateway), (address, gateway.dataplane[1]))
        self.gateway = gateway
        self._use_auth(gateway)
        self.datapath.send_keepalive()
        log.info(
            "now through gateway %s: dataplane %s, UDP source port %d",
            gateway.id,
            join_host_port(address, gateway.dataplane[1]),
            self.datapath.local_port,
        )

    def _use_auth(self, gateway: Gateway) -> None:
        """Rekeys, session checks and logouts go to `gateway`'s auth service (its host
        may be down with its dataplane); a lone gateway's is the one logged in to."""
        host, port = gateway.auth or split_host_port(self.options.server)
        address = self._known_address(host)
        if address is None:
            return
        self._switch_auth(host, join_host_port(address, port))

    def _switch_auth(self, host: str, target: str) -> None:
        """Auth calls go to `target` (`host` resolved) from now on. The client they
        went to is closed once the calls in flight on it are answered or timed out:
        closing it at once would cancel them, and their results would never come."""
        if target == self._auth_target:
            return
        old, self._auth_target = self.auth, target
        # TLS still checks the name given (or --server-name), not the address.
        server_name = self.options.server_name or (None if is_address(host) else host)
        self.auth = AuthClient(
            target,
            self.options.ca_path,
            server_name,
            completes_checksums=getattr(self.host, "completes_checksums", False),
        )
        if old is not None:
            self._retired_auth.append(old)
            self._spawn_quiet(self._retire(old))

    async def _retire(self, auth: AuthClient) -> None:
        await asyncio.sleep(RPC_TIMEOUT_SECONDS + 1)
        self._retired_auth.remove(auth)
        await auth.close()

    def _spawn_quiet(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _probe(self, gateway: Gateway) -> None:
        """A keepalive to `gateway`'s dataplane beside the tunnel (core.ProbeGateway)."""
        info, address = self.session_info, self._known_address(gateway.dataplane[0])
        if info is None or address is None:
            return
        self._close_probe(gateway.id)

        def answered() -> None:
            self._probes.pop(gateway.id, None)
            self.core.handle_probe_answer(self.clock(), gateway.id)
            self._wake.set()

        probe = GatewayProbe(
            asyncio.get_running_loop(),
            self._tunnel_for(info, gateway),
            (address, gateway.dataplane[1]),
            self.clock,
            answered,
        )
        self._probes[gateway.id] = probe
        probe.send()

    def _close_probe(self, gateway_id: str) -> None:
        probe = self._probes.pop(gateway_id, None)
        if probe is not None:
            probe.close()

    def _apply_network(self, network: PushedNetwork) -> PushedNetwork | ClientError:
        """The live tunnel's routes and DNS moved to `network`, on the same TUN while
        packets flow (the `ip` steps take milliseconds: done here, as the bring-up)."""
        info = self.session_info
        update = getattr(self.host, "update_network", None)
        if update is None:
            return ClientError(
                "this system's client applies a changed network at its next connection",
                retryable=False,
            )
        new = info.with_network(network)
        try:
            self.undo = update(self.tun, info, new, self.undo)
        except NetworkChangeFailed as error:
            self.undo = error.undo
            return error
        except ClientError as error:
            return error
        self.session_info = new
        return network

    def _suspend(self) -> None:
        """The datapath stops; the TUN, its address, routes and DNS stay (see Suspend)."""
        if self.datapath is not None:
            self.datapath.stop()
            self.datapath = None
        self._forget_gateways()
        if self.tun is not None:
            log.info("tunnel %s held while logging in again", self.tun.name)

    def _release_if_stopped(self) -> None:
        """An explicit stop (SIGINT, SIGTERM: `disconnect`) also removes the kill
        switch; a failure or a crash leaves it for `disconnect` to remove."""
        release = getattr(self.host, "release", None)
        if release is None:
            return
        if getattr(self.host, "stop_requested", False):
            release(self.options.tun_name)
        elif getattr(self.host, "lockdown_engaged", lambda _: False)(self.options.tun_name):
            log.warning("the kill switch stays on: `pushgate-client disconnect` removes it")

    def _forget_gateways(self) -> None:
        """The session's keys, its per-gateway tunnels and probes: gone with it."""
        for gateway_id in list(self._probes):
            self._close_probe(gateway_id)
        self._keys, self._tunnels, self.gateway = None, {}, None

    def _teardown(self) -> None:
        if self.datapath is not None:
            self.datapath.stop()
            self.datapath = None
        self._forget_gateways()
        if self.undo is not None:
            self.host.unconfigure(self.undo)
            self.undo = None
        if self.tun is not None:
            self.tun.close()  # the OS removes the device, its address and routes
            self.tun = None
        self.session_info = None

    def _logout(self, token: str) -> None:
        async def logout() -> None:
            try:
                await asyncio.wait_for(self.auth.logout(token), LOGOUT_TIMEOUT_SECONDS)
            except (ClientError, TimeoutError) as error:
                log.info("logout not confirmed: %s", error)

        task = asyncio.ensure_future(logout())
        self._logouts.add(task)
        task.add_done_callback(self._logouts.discard)

    # -- status ----------------------------------------------------------------------

    def snapshot(self) -> ClientStatus:
        status = ClientStatus(
            pid=os.getpid(),
            state=self.core.state.value,
            tun_name=self.options.tun_name,
            server=self.options.server,
            last_error=self.core.last_error,
        )
        info, datapath = self.session_info, self.datapath
        if info is not None:
            status.tunnel_address = info.tunnel_address
            status.endpoint = join_host_port(*info.endpoint)
            status.session_id = info.session_id
        if datapath is not None and self.gateway is not None:
            status.gateway = self.gateway.id
            status.endpoint = join_host_port(*datapath.server)
        if datapath is not None:
            session = datapath.session
            status.local_port = datapath.local_port
            status.key_epoch = session.current.epoch
            status.rx_packets, status.rx_bytes = session.rx_packets, session.rx_bytes
            status.tx_packets, status.tx_bytes = session.tx_packets, session.tx_bytes
            status.last_received_at = session.last_received_at
            status.last_sent_at = session.last_sent_at
            status.drops = {reason.value: n for reason, n in datapath.drops.items()}
        if self.undo is not None:
            status.undo = self.undo
        status.resolved = dict(self._resolved)
        return status

    def _write_status(self) -> None:
        if self.options.status_path:
            write_status(self.options.status_path, self.snapshot())
