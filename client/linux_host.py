"""The client on Linux: /dev/net/tun, `ip` and `resolvectl` (see client/host.py)."""

import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess

from pushgate_io import tso
from pushgate_io.tun_linux import LinuxTun

from . import killswitch_linux as killswitch
from .auth import ClientError, ClientSession
from .host import NetworkChangeFailed
from .killswitch_linux import Endpoint, FirewallPolicy
from .netplan import (
    dns_not_applied,
    needs_gateway_route,
    parse_route_get,
    plan_network,
    plan_network_update,
)

log = logging.getLogger("pushgate.client")


def run_commands(commands, *, check: bool) -> None:
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            message = f"{' '.join(command)}: {result.stderr.strip()}"
            if check:
                raise ClientError(f"network setup failed: {message}", retryable=False)
            log.warning("cleanup step failed: %s", message)


def underlay_route(gateway_ip: str):
    result = subprocess.run(
        ["ip", "-j", "route", "get", gateway_ip], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ClientError(
            f"no route to the gateway {gateway_ip}: {result.stderr.strip()}", retryable=True
        )
    return parse_route_get(json.loads(result.stdout))


def have_resolvectl() -> bool:
    return shutil.which("resolvectl") is not None


def update_network(
    tun_name: str, old: ClientSession, new: ClientSession, undo: list[list[str]]
) -> list[list[str]]:
    """Routes and DNS of the live tunnel from `old`'s network to `new`'s (see
    client/host.py ClientHost.update_network)."""
    gateway_ip = new.endpoint[0]
    resolvectl = have_resolvectl()
    outside = any(needs_gateway_route(n.routes, gateway_ip) for n in (old, new))
    # with the /32 in place this finds it; before, the path the tunnel's packets take
    underlay = underlay_route(gateway_ip) if outside else None
    if underlay is not None and underlay.dev == tun_name:
        raise ClientError(
            f"cannot change the network: the gateway {gateway_ip} is routed into the tunnel",
            retryable=False,
        )
    try:
        update = plan_network_update(
            tun_name=tun_name,
            tunnel_address=new.tunnel_address,
            old=old.network,
            new=new.network,
            gateway_ip=gateway_ip,
            underlay=underlay,  # in a full tunnel: the gateway's own /32 around it
            have_resolvectl=resolvectl,
        )
    except ValueError as error:
        raise ClientError(f"cannot plan the network change: {error}", retryable=False) from None
    undo_after = [list(command) for command in update.undo]
    try:
        run_commands(update.add, check=True)
    except ClientError as error:
        both = undo_after + [step for step in undo if step not in undo_after]
        raise NetworkChangeFailed(str(error), both) from None
    run_commands(update.remove, check=False)  # a route already gone is gone
    if (missing := dns_not_applied(new.network, resolvectl)) and new.network != old.network:
        log.warning("%s", missing)
    return undo_after


# Undo steps a status file may hold (it is trusted only when root's: client/status.py;
# this is a second fence): `ip` on routes, addresses and links, and `resolvectl`.
# Never `ip netns exec` or anything else that runs a program.
_UNDO_COMMANDS = (("ip", "route"), ("ip", "-6", "route"), ("ip", "address"), ("ip", "link"))


def undo_step_allowed(step) -> bool:
    if not isinstance(step, (list, tuple)) or not all(isinstance(a, str) for a in step):
        return False
    step = tuple(step)
    return step[:1] == ("resolvectl",) or any(step[: len(p)] == p for p in _UNDO_COMMANDS)


def full_tunnel(routes: list[str]) -> bool:
    return any(ipaddress.ip_network(route, strict=False).prefixlen == 0 for route in routes)


def firewall_policy(
    tun_name: str,
    *,
    lockdown: bool | None,
    allow_lan: bool,
    endpoints,
    is_full_tunnel: bool,
    engaged: bool,
) -> FirewallPolicy:
    """What the table must hold (pure). `lockdown` None is the default: on for a full
    tunnel, and once on it stays on (`engaged`) until disconnect. A full tunnel always
    blocks IPv6 (not carried yet) and DNS outside the tunnel, kill switch or not."""
    on = lockdown if lockdown is not None else (is_full_tunnel or engaged)
    return FirewallPolicy(
        tun_name,
        endpoints=tuple(sorted(set(endpoints))),
        lockdown=on,
        block_ipv6=is_full_tunnel,
        block_outside_dns=is_full_tunnel,
        allow_lan=allow_lan,
    )


class LinuxHost:
    status_dir = "/run/pushgate"
    loop_factory = None
    # its TUN (IFF_VNET_HDR) has the kernel complete partial TCP checksums
    completes_checksums = True

    def __init__(self) -> None:
        # The kill switch (client/killswitch_linux.py): None = on for a full tunnel.
        self.lockdown: bool | None = None
        self.allow_lan = False
        # Set by an explicit stop (SIGINT, SIGTERM from `disconnect`): the teardown
        # that follows removes the table. A reconnect, a re-login or a crash never do.
        self.stop_requested = False
        self._gateway: dict[str, set[Endpoint]] = {}  # the auth service (lock_down)
        self._dataplane: dict[str, Endpoint] = {}  # the session's (configure)
        self._policies: dict[str, FirewallPolicy] = {}  # as installed, per TUN

    # -- the kill switch ---------------------------------------------------------------

    def lock_down(self, tun_name: str, endpoints: list[tuple[str, int, str]]) -> None:
        """The auth service's endpoints known now (address, port, tcp), replacing the
        ones given before. A table already loaded (by an earlier session of this TUN,
        or left by a crashed client) is reloaded with them; a new one is loaded by
        `configure`, once the dataplane's host is resolved too (with the kill switch
        on, no lookup leaves outside the tunnel)."""
        self._gateway[tun_name] = {Endpoint(*endpoint) for endpoint in endpoints}
        current = self._policies.get(tun_name)
        if current is None and killswitch.installed(tun_name):
            current = FirewallPolicy(tun_name, lockdown=True)  # left by a crashed client
        if current is None or current.empty:
            return
        self._update_firewall(
            tun_name,
            is_full_tunnel=bool(current and current.block_ipv6),
            engaged=bool(current and current.lockdown),
        )

    def _update_firewall(self, tun_name: str, *, is_full_tunnel: bool, engaged: bool) -> None:
        endpoints = set(self._gateway.get(tun_name, ()))
        if tun_name in self._dataplane:
            endpoints.add(self._dataplane[tun_name])
        policy = firewall_policy(
            tun_name,
            lockdown=self.lockdown,
            allow_lan=self.allow_lan,
            endpoints=endpoints,
            is_full_tunnel=is_full_tunnel,
            engaged=engaged,
        )
        if policy == self._policies.get(tun_name):
            return
        if policy.empty and tun_name not in self._policies and self.lockdown is None:
            return  # nothing asked for, nothing there
        try:
            killswitch.install(policy)
        except OSError as error:
            raise ClientError(
                f"cannot install the firewall table (kill switch, IPv6, DNS): {error}",
                retryable=False,
            ) from None
        self._policies[tun_name] = policy
        log.info("firewall %s: %s", killswitch.table_name(tun_name), killswitch.describe(policy))

    def _firewall_for_session(self, tun_name: str, info: ClientSession) -> None:
        """Before the session's routes: the table lets its dataplane through and, in a
        full tunnel, blocks IPv6 and DNS outside the tunnel (all outside it with the
        kill switch). From here on nothing leaks, whatever fails next."""
        address, port = info.endpoint
        self._dataplane[tun_name] = Endpoint(address, port, "udp")
        current = self._policies.get(tun_name)
        self._update_firewall(
            tun_name,
            is_full_tunnel=full_tunnel(info.routes),
            engaged=bool(current and current.lockdown),
        )

    def release(self, tun_name: str) -> None:
        """Disconnect: remove the table of `tun_name` (also one a crashed client left)."""
        try:
            removed = killswitch.remove(tun_name)
        except OSError as error:
            raise ClientError(f"cannot remove the kill switch: {error}", retryable=False) from None
        self._policies.pop(tun_name, None)
        self._gateway.pop(tun_name, None)
        self._dataplane.pop(tun_name, None)
        if removed:
            log.info("removed the firewall table %s", killswitch.table_name(tun_name))

    def lockdown_engaged(self, tun_name: str) -> bool:
        """True while the kill switch of `tun_name` is loaded."""
        policy = self._policies.get(tun_name)
        return bool(policy and not policy.empty)

    def check_privileges(self) -> None:
        # Opening /dev/net/tun says it clearly enough, and a non-root user with
        # CAP_NET_ADMIN may run the client.
        pass

    def open_tun(self, name: str) -> LinuxTun:
        try:
            # TCP segments merged on write; and read as super-packets (TSO) where the
            # compiled cut and checksum are built: in Python they would cost more than
            # the reads they save (docs/performance.md)
            return LinuxTun(name, offload=True, tso_reads=tso.COMPILED)
        except OSError as error:
            raise ClientError(f"cannot create TUN {name}: {error}", retryable=False) from None

    def configure(self, tun, info: ClientSession) -> list[list[str]]:
        self._firewall_for_session(tun.name, info)
        around = self._route_auth_around(tun.name, info)
        endpoint_ip = info.endpoint[0]
        plan = plan_network(
            tun_name=tun.name,
            tunnel_address=info.tunnel_address,
            mtu=info.mtu,
            routes=info.routes,
            dns_servers=info.dns_servers,
            gateway_ip=endpoint_ip,
            underlay=underlay_route(endpoint_ip),
            have_resolvectl=have_resolvectl(),
            search_domains=info.search_domains,
            match_domains=info.match_domains,
        )
        try:
            run_commands(plan.apply, check=True)
        except ClientError:
            run_commands(plan.undo, check=False)
            run_commands([tuple(step) for step in around], check=False)
            raise
        if missing := dns_not_applied(info.network, have_resolvectl()):
            log.warning("%s", missing)
        return [list(command) for command in plan.undo] + around

    def _route_auth_around(self, tun_name: str, info: ClientSession) -> list[list[str]]:
        """Full tunnel: a host route through the original path to each auth service
        address that is not the dataplane's (that one the plan routes around), so a
        re-login while the TUN is held (make before break) never goes into the dead
        tunnel. Returns its undo steps."""
        if not full_tunnel(info.routes):
            return []
        undo = []
        for endpoint in sorted(self._gateway.get(tun_name, ())):
            address = ipaddress.ip_address(endpoint.address)
            if endpoint.address == info.endpoint[0]:
                continue
            host = f"{address}/{address.max_prefixlen}"
            path = underlay_route(endpoint.address)
            step = ("ip", "route", "replace", host, "dev", path.dev)
            run_commands([step + (("via", path.via) if path.via else ())], check=True)
            undo.append(["ip", "route", "del", host, "dev", path.dev])
        return undo

    def update_network(
        self, tun, old: ClientSession, new: ClientSession, undo: list[list[str]]
    ) -> list[list[str]]:
        # The firewall follows the stricter network while routes move: a change to a
        # full tunnel blocks IPv6 and DNS outside it before the /1 halves go in; a
        # change to a split tunnel lifts them only once the halves are gone.
        if full_tunnel(new.routes):
            self._firewall_for_session(tun.name, new)
        undo = update_network(tun.name, old, new, undo)
        if not full_tunnel(new.routes):
            self._firewall_for_session(tun.name, new)
        return undo

    def unconfigure(self, undo: list[list[str]]) -> None:
        steps = [tuple(step) for step in undo if undo_step_allowed(step)]
        if len(steps) != len(undo):
            log.warning("ignoring %d undo steps that are not ours", len(undo) - len(steps))
        run_commands(steps, check=False)
        if self.stop_requested:
            for tun_name in list(self._policies):
                self.release(tun_name)

    def process_alive(self, pid: int) -> bool:
        """True while `pid` runs (an exited child its parent has not reaped yet is not)."""
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")

    def install_stop_handlers(self, loop, connection) -> None:
        def stop() -> None:
            self.stop_requested = True  # an explicit stop: the kill switch may go
            connection.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        loop.add_signal_handler(signal.SIGUSR1, connection.request_rebind)
        loop.add_signal_handler(signal.SIGUSR2, connection.request_rekey)

    def request_stop(self, pid: int) -> bool:
        os.kill(pid, signal.SIGTERM)  # the client undoes its configuration itself
        return True
