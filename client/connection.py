"""The client's connection manager: drives the state machine (client/state.py).

Logs in, brings up the TUN device and the network plan, runs the datapath,
rekeys before the key lifetime ends, notices a dead server and reconnects with
exponential backoff and jitter, and undoes everything on the way out.
"""

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass

from push_protocol.keys import Role
from push_protocol.session import TunnelSession

from .auth import AuthClient, ClientError, ClientSession, SessionGone
from .datapath import Datapath
from .host import ClientHost, UndoSteps, current_host
from .state import ClientEvent, ClientState, ClientStateMachine
from .status import ClientStatus, write_status
from .tun import TunDevice

log = logging.getLogger("pushgate.client")

TICK_SECONDS = 0.5
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


@dataclass
class ConnectOptions:
    server: str  # auth service host:port
    ca_path: str
    username: str
    password: str
    tun_name: str = "pgc0"
    server_name: str | None = None
    status_path: str | None = None
    dead_after_seconds: float | None = None  # default: 2 keepalives + 5 s


class Backoff:
    """Exponential backoff with full jitter, reset on success."""

    def __init__(self, first: float = BACKOFF_FIRST_SECONDS, cap: float = BACKOFF_MAX_SECONDS):
        self.first, self.cap, self.attempt = first, cap, 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def rekey_retry_delay(now: float, expires_at: float) -> float:
    """How long to wait before trying a failed rekey again (times in seconds)."""
    if expires_at <= 0:  # the auth service did not say when the session ends
        return REKEY_RETRY_SECONDS
    return min(REKEY_RETRY_SECONDS, max(REKEY_RETRY_MIN_SECONDS, (expires_at - now) / 4))


class Connection:
    def __init__(
        self, options: ConnectOptions, clock=time.time, host: ClientHost | None = None
    ) -> None:
        self.options = options
        self.clock = clock
        self.host = host or current_host()  # the OS: TUN backend and network config
        self.machine = ClientStateMachine()
        self.auth = AuthClient(options.server, options.ca_path, options.server_name)
        self.session_info: ClientSession | None = None
        self.datapath: Datapath | None = None
        self.tun: TunDevice | None = None
        self.undo: UndoSteps | None = None  # how to undo the network configuration
        self.last_error = ""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # the datapath has news for the next tick (a rekey request)
        self._backoff = Backoff()
        self._rekey_at = 0.0
        self._rekey_retry_at = 0.0  # after a failed rekey, not before (whatever asks for one)
        self._expires_at = 0.0  # when the session ends unless rekeyed (unix seconds)
        self._since = 0.0  # when we last (re)started waiting for the server

    @property
    def state(self) -> ClientState:
        return self.machine.state

    def stop(self) -> None:
        self._stop.set()

    def request_rekey(self) -> None:
        """Rekey at the next tick instead of waiting for the key lifetime (SIGUSR2)."""
        self._rekey_at = self._rekey_retry_at = 0.0

    def request_rebind(self) -> None:
        """Move to a new UDP source port at once, as after a NAT change (SIGUSR1)."""
        if self.datapath is not None:
            self.datapath.rebind()
            self.datapath.send_keepalive()
            log.info("moved to UDP source port %d", self.datapath.local_port)

    def _event(self, event: ClientEvent) -> None:
        before = self.machine.state
        after = self.machine.handle(event)
        log.info("state %s -> %s (%s)", before.value, after.value, event.value)

    async def run(self) -> None:
        """Run until stopped; raises ClientError for failures retrying can't fix."""
        self._event(ClientEvent.START)
        try:
            while not self._stop.is_set():
                await self._step()
                self._write_status()
        finally:
            await self._teardown(logout=True)
            if self.machine.state is not ClientState.DISCONNECTED:
                self._event(ClientEvent.STOP)
            self._write_status()
            await self.auth.close()

    async def _sleep(self, seconds: float, *, wakeable: bool = False) -> None:
        """Wait `seconds`, less if stopped or, if `wakeable`, woken by the datapath."""
        waits = [asyncio.ensure_future(self._stop.wait())]
        if wakeable:
            waits.append(asyncio.ensure_future(self._wake.wait()))
        _, pending = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        self._wake.clear()

    async def _step(self) -> None:
        state = self.machine.state
        if state is ClientState.LOGGING_IN:
            await self._login()
        elif state in (ClientState.CONNECTING, ClientState.RECONNECTING):
            await self._await_server()
        else:
            await self._sleep(TICK_SECONDS, wakeable=True)
            await self._tick()

    async def _login(self) -> None:
        try:
            info = await self.auth.login(self.options.username, self.options.password)
            await self._bring_up(info)
        except ClientError as error:
            self.last_error = str(error)
            if not error.retryable:
                raise
            log.warning("%s", error)
            self._event(ClientEvent.LOGIN_FAILED)
            await self._sleep(self._backoff.next_delay())
            return
        self._event(ClientEvent.LOGGED_IN)

    async def _bring_up(self, info: ClientSession) -> None:
        await self._teardown(logout=False)
        now = self.clock()
        session = TunnelSession(
            info.session_id,
            info.cipher,
            Role.CLIENT,
            info.keys,
            keepalive_interval=info.keepalive_seconds,
        )
        self.tun = self.host.open_tun(self.options.tun_name)
        self.undo = self.host.configure(self.tun, info)
        self.session_info = info
        self.datapath = Datapath(
            asyncio.get_running_loop(),
            session,
            self.tun,
            info.endpoint,
            self.clock,
            on_rekey_requested=self._wake.set,  # rekey at once, not at the next tick
        )
        self.datapath.start()
        self._rekey_at = now + info.key_lifetime_seconds
        self._expires_at = info.expires_at
        log.info(
            "tunnel %s up with %s, session %#010x, dataplane %s:%d",
            self.tun.name,
            info.tunnel_address,
            info.session_id,
            *info.endpoint,
        )

    def _dead_after(self) -> float:
        if self.options.dead_after_seconds is not None:
            return self.options.dead_after_seconds
        return 2 * self.session_info.keepalive_seconds + 5

    async def _await_server(self) -> None:
        if self.datapath is None:
            self._event(ClientEvent.RELOGIN)
            return
        if await self._probe_until(self.clock() + HANDSHAKE_TIMEOUT_SECONDS):
            return
        if self._stop.is_set() or self.datapath is None:
            return
        if self.machine.state is ClientState.CONNECTING:
            self.last_error = "no answer from the dataplane"
            self._event(ClientEvent.SERVER_LOST)
            return
        # Reconnecting: is the session still there? Then try a new source port.
        try:
            alive = await self.auth.session_alive(self.session_info.token)
        except ClientError as error:
            if not error.retryable:  # e.g. AccessRevoked: the client ends
                raise
            alive = True  # auth service down: the dataplane may still know us
            log.info("%s", error)
        if not alive:
            await self._log_in_again()
            return
        self.datapath.rebind()
        await self._probe_until(self.clock() + self._backoff.next_delay())

    async def _probe_until(self, deadline: float) -> bool:
        """Send a keepalive every PROBE_INTERVAL_SECONDS until the dataplane answers
        (True: the tunnel is up) or `deadline`. Keys are renewed when due all the
        while: the UDP path may be down while the auth service answers, and fresh
        keys keep the session alive through an outage of any length."""
        datapath = self.datapath
        session = datapath.session
        start = next_probe = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if session.last_received_at is not None and session.last_received_at > start:
                self._backoff.reset()
                self._since = now
                self._event(ClientEvent.TUNNEL_UP)
                return True
            if now >= deadline:
                return False
            if now >= self._rekey_at:
                try:
                    await self._renew_keys(now)
                except SessionGone:
                    await self._log_in_again()
                    return False
            if now >= next_probe:
                session.handle_timer(now)  # keys renewed while waiting take over
                datapath.send_keepalive()
                next_probe = now + PROBE_INTERVAL_SECONDS
            await self._sleep(min(0.1, max(0.0, deadline - now)))
        return False

    async def _tick(self) -> None:
        datapath = self.datapath
        session = datapath.session
        datapath.tick()
        now = self.clock()
        last = max(session.last_received_at or 0.0, self._since)
        if now - last > self._dead_after():
            self.last_error = f"no packet from the dataplane for {now - last:.0f} s"
            log.warning("server lost: %s", self.last_error)
            self._event(ClientEvent.SERVER_LOST)
            return
        # needs_rekey: the keys' limits, or the dataplane asked (REKEY_REQUIRED)
        if (
            self.machine.state is ClientState.UP
            and (now >= self._rekey_at or session.needs_rekey(now))
            and now >= self._rekey_retry_at
        ):
            await self._rekey(now)

    async def _rekey(self, now: float) -> None:
        self._event(ClientEvent.REKEY_STARTED)
        try:
            renewed = await self._renew_keys(now)
        except SessionGone:
            # Retrying the rekey cannot help, and the dataplane has dropped the
            # session too: log in now rather than after the dead-peer timeout.
            await self._log_in_again()
            return
        self._event(ClientEvent.REKEY_DONE if renewed else ClientEvent.REKEY_FAILED)

    async def _log_in_again(self) -> None:
        self.last_error = (
            f"the gateway no longer knows session {self.session_info.session_id:#010x};"
            " logging in again"
        )
        log.warning("%s", self.last_error)
        await self._teardown(logout=False)
        self._event(ClientEvent.RELOGIN)

    async def _renew_keys(self, now: float) -> bool:
        """New keys from the auth service, installed; if that fails, when to retry.
        Raises SessionGone if the auth service no longer knows the session."""
        try:
            keys, expires_at = await self.auth.rekey(self.session_info.token)
            self.datapath.session.install_next(keys, self.clock())
        except SessionGone:
            raise
        except ClientError as error:
            if not error.retryable:  # e.g. AccessRevoked: the client ends
                raise
            self.last_error = f"rekey failed: {error}"
            log.warning("%s", self.last_error)
            self._rekey_at = self._rekey_retry_at = now + rekey_retry_delay(now, self._expires_at)
            return False
        self._expires_at = expires_at
        self._rekey_retry_at = 0.0
        self._rekey_at = keys.created_at + self.session_info.key_lifetime_seconds
        log.info("rekeyed: key epoch %d", keys.epoch)
        return True

    async def _teardown(self, *, logout: bool) -> None:
        if self.datapath is not None:
            self.datapath.stop()
            self.datapath = None
        if self.undo is not None:
            self.host.unconfigure(self.undo)
            self.undo = None
        if self.tun is not None:
            self.tun.close()  # the OS removes the device, its address and routes
            self.tun = None
        if logout and self.session_info is not None:
            try:
                await asyncio.wait_for(self.auth.logout(self.session_info.token), 3.0)
            except (ClientError, TimeoutError) as error:
                log.info("logout not confirmed: %s", error)
        if logout:
            self.session_info = None

    def snapshot(self) -> ClientStatus:
        status = ClientStatus(
            pid=os.getpid(),
            state=self.machine.state.value,
            tun_name=self.options.tun_name,
            server=self.options.server,
            last_error=self.last_error,
        )
        info, datapath = self.session_info, self.datapath
        if info is not None:
            status.tunnel_address = info.tunnel_address
            status.endpoint = f"{info.endpoint[0]}:{info.endpoint[1]}"
            status.session_id = info.session_id
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
        return status

    def _write_status(self) -> None:
        if self.options.status_path:
            write_status(self.options.status_path, self.snapshot())
