"""The client on Linux: /dev/net/tun, `ip` and `resolvectl` (see client/host.py)."""

import json
import logging
import os
import shutil
import signal
import subprocess

from pushgate_io.tun_linux import LinuxTun

from .auth import ClientError, ClientSession
from .host import NetworkChangeFailed
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


class LinuxHost:
    status_dir = "/run/pushgate"
    loop_factory = None

    def check_privileges(self) -> None:
        # Opening /dev/net/tun says it clearly enough, and a non-root user with
        # CAP_NET_ADMIN may run the client.
        pass

    def open_tun(self, name: str) -> LinuxTun:
        try:
            return LinuxTun(name, offload=True)  # TCP segments merged on write
        except OSError as error:
            raise ClientError(f"cannot create TUN {name}: {error}", retryable=False) from None

    def configure(self, tun, info: ClientSession) -> list[list[str]]:
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
            raise
        if missing := dns_not_applied(info.network, have_resolvectl()):
            log.warning("%s", missing)
        return [list(command) for command in plan.undo]

    def update_network(
        self, tun, old: ClientSession, new: ClientSession, undo: list[list[str]]
    ) -> list[list[str]]:
        return update_network(tun.name, old, new, undo)

    def unconfigure(self, undo: list[list[str]]) -> None:
        run_commands([tuple(command) for command in undo], check=False)

    def process_alive(self, pid: int) -> bool:
        """True while `pid` runs (an exited child its parent has not reaped yet is not)."""
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")

    def install_stop_handlers(self, loop, connection) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, connection.stop)
        loop.add_signal_handler(signal.SIGUSR1, connection.request_rebind)
        loop.add_signal_handler(signal.SIGUSR2, connection.request_rekey)

    def request_stop(self, pid: int) -> bool:
        os.kill(pid, signal.SIGTERM)  # the client undoes its configuration itself
        return True
