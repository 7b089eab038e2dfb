"""The client on Windows: WinTun and the IP Helper API (see client/host.py).

Imported only on Windows (client.host.current_host), but written so that its
pure parts import anywhere. Everything it does to the system goes through
client/wintun.py, client/iphlpapi.py, client/wfp.py (the kill switch and the
DNS filters), client/nrpt.py (DNS rules) and client/winregistry.py.

Fail closed:
- the WFP filters (client/wfp.py) are persistent and per tunnel name; bringing
  the tunnel down for a reconnect or a re-login leaves them; only `release`
  (disconnect) removes them;
- undo is never read from the status file, which carries only a reference
  (["windows", tun]): the adapter's routes, addresses and DNS are recomputed
  from the adapter (found by the GUID derived from its name); the gateway's
  route on the physical interface comes from HKLM\\SOFTWARE\\pushgate\\clients\\<tun>,
  which only administrators can write; NRPT rules and filters are found again
  from the tunnel name. A forged status file can make us undo nothing but a
  pushgate tunnel's own configuration.

A changed pushed network is applied live (`update_network`): routes added before
any is removed, the filters tightened before a full tunnel's routes and lifted
after them, the undo record kept up to date at each step.
"""

import asyncio
import ctypes
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from ctypes import c_int32, c_uint32, c_void_p
from pathlib import Path

from .auth import ClientError, ClientSession
from .host import NetworkChangeFailed
from .iphlpapi import ERROR_NOT_FOUND, IpHelper
from .netplan import is_full_tunnel
from .nrpt import Nrpt, NrptRule, plan_nrpt
from .status import secure_status_dir_windows
from .wfp import Endpoint, FirewallPolicy, WfpFirewall
from .winnet import Step, plan_windows_network, plan_windows_update, windows_needs_gateway_route
from .winregistry import REG_SZ, Registry
from .winsecurity import WinSecurity, same_image
from .wintun import (
    WintunLibrary,
    WintunTun,
    adapter_guid,
    install_checked_dll,
    load_library,
    wide,
)

log = logging.getLogger("pushgate.client")

DLL_NAME = "wintun.dll"
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
STILL_ACTIVE = 259
EVENT_MODIFY_STATE = 0x0002
SYNCHRONIZE = 0x00100000
INTERFACE_WAIT_SECONDS = 5.0  # a new adapter's IPv4 interface may lag behind it
UNDO_BASE = r"SOFTWARE\pushgate\clients"  # HKLM: administrators and SYSTEM only
TUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ADMIN_MESSAGE = (
    "pushgate-client must run as Administrator: it creates a network adapter and "
    "changes routes and DNS. Start it from an elevated terminal (or accept the UAC prompt)."
)


def wintun_dll_path() -> Path:
    """wintun.dll by absolute path: bundled in the executable, or next to it.

    Never by bare name: the DLL search order would let any directory on it
    supply a wintun.dll to a process running as Administrator.
    """
    candidates = []
    if getattr(sys, "frozen", False) and hasattr(sys, "_MEIPASS"):
        candidates.append(Path(sys._MEIPASS) / DLL_NAME)
    candidates.append(Path(sys.executable).resolve().parent / DLL_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ClientError(
        f"{DLL_NAME} not found (looked in {', '.join(map(str, candidates))})", retryable=False
    )


def checked_tun_name(name: str) -> str:
    """An adapter name we accept (it becomes part of registry and WFP key names)."""
    if not isinstance(name, str) or not TUN_NAME.fullmatch(name):
        raise ClientError(f"not a tunnel name: {str(name)[:80]!r}", retryable=False)
    return name


def flush_dns_cache() -> None:
    """DnsFlushResolverCache (dnsapi.dll, undocumented but stable, as ipconfig
    /flushdns uses it); best effort, and nothing where there is no dnsapi."""
    try:
        ctypes.WinDLL("dnsapi.dll").DnsFlushResolverCache()
    except (AttributeError, OSError) as error:
        log.debug("DNS cache not flushed: %s", error)


def session_nrpt(tun_name: str, info: ClientSession) -> list[NrptRule]:
    """The NRPT rules for a session's pushed DNS (IPv4 servers: the tunnel's)."""
    return plan_nrpt(
        tun_name,
        dns_servers=[s for s in info.dns_servers if ipaddress.ip_address(s).version == 4],
        match_domains=list(info.match_domains),
        full_tunnel=is_full_tunnel(info.routes),
    )


def stop_event_name(pid: int) -> str:
    return f"Global\\pushgate-client-stop-{pid}"


class Kernel32:
    """The few kernel32 calls the host needs besides the waits in wintun.py."""

    def __init__(self) -> None:
        self.lib, self.last_error = load_library("kernel32.dll")
        lib = self.lib
        for name, restype, argtypes in (
            ("OpenProcess", c_void_p, (c_uint32, c_int32, c_uint32)),
            ("GetExitCodeProcess", c_int32, (c_void_p, ctypes.POINTER(c_uint32))),
            ("CloseHandle", c_int32, (c_void_p,)),
            ("CreateEventW", c_void_p, (c_void_p, c_int32, c_int32, c_void_p)),
            ("OpenEventW", c_void_p, (c_uint32, c_int32, c_void_p)),
            ("SetEvent", c_int32, (c_void_p,)),
            ("WaitForSingleObject", c_uint32, (c_void_p, c_uint32)),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes


class WindowsHost:
    status_dir = os.path.join(os.environ.get("PROGRAMDATA", r"C:\ProgramData"), "pushgate")
    # The Proactor loop (Windows' default) has no add_reader; the selector loop
    # waits on sockets, which is what the WinTun backend's fileno() is.
    loop_factory = asyncio.SelectorEventLoop
    completes_checksums = False  # WinTun writes take complete packets only

    def __init__(self) -> None:
        self._wintun: WintunLibrary | None = None
        self._helper: IpHelper | None = None
        self._kernel32: Kernel32 | None = None
        self._registry: Registry | None = None
        self._firewall: WfpFirewall | None = None
        # The kill switch: None = on for a full tunnel, off for a split one.
        self.lockdown: bool | None = None
        self.allow_lan = False
        self._policies: dict[str, FirewallPolicy] = {}  # what the filters do now, per tunnel
        self._gateway: dict[str, frozenset[Endpoint]] = {}  # from lock_down (auth service)
        self._dataplane: dict[str, Endpoint | None] = {}  # the session's, from configure
        # Set by an explicit stop (Ctrl-C, Ctrl-Break, `disconnect`'s event or its
        # request_stop): the teardown that follows also releases the kill switch. A
        # teardown for a reconnect or a re-login, and a crash, never do.
        self.stop_requested = False

    def _reg(self) -> Registry:
        if self._registry is None:
            self._registry = Registry()
        return self._registry

    def _wfp(self) -> WfpFirewall:
        if self._firewall is None:
            self._firewall = WfpFirewall()
        return self._firewall

    def _k32(self) -> Kernel32:
        if self._kernel32 is None:
            self._kernel32 = Kernel32()
        return self._kernel32

    def _ip_helper(self) -> IpHelper:
        if self._helper is None:
            self._helper = IpHelper()
        return self._helper

    def check_privileges(self) -> None:
        if not ctypes.windll.shell32.IsUserAnAdmin():
            raise ClientError(ADMIN_MESSAGE, retryable=False)

    def checked_dll(self) -> str:
        """wintun.dll copied into %ProgramData%\\pushgate\\bin (private to SYSTEM and
        Administrators) once its pinned SHA-256 checks: the path to load."""
        directory = os.path.join(self.status_dir, "bin")
        try:
            secure_status_dir_windows(self.status_dir)
            secure_status_dir_windows(directory)
            return install_checked_dll(str(wintun_dll_path()), directory)
        except OSError as error:
            raise ClientError(f"cannot load WinTun: {error}", retryable=False) from None

    def open_tun(self, name: str) -> WintunTun:
        checked_tun_name(name)
        if self._wintun is None:
            self._wintun = WintunLibrary(self.checked_dll())
            self._wintun.route_logger()
        try:
            return WintunTun(self._wintun, name)
        except OSError as error:
            raise ClientError(
                f"cannot create WinTun adapter {name}: {error}", retryable=False
            ) from None

    def configure(self, tun: WintunTun, info: ClientSession) -> list[list[str]]:
        name = checked_tun_name(tun.name)
        helper = self._ip_helper()
        gateway_ip = info.endpoint[0]
        try:
            underlay = helper.underlay_path(gateway_ip)  # before our routes exist
            # a cluster's other gateways (lock_down): a move must not go into the tunnel
            others = sorted({e.address for e in self._gateway.get(name, ())} - {gateway_ip})
            other_endpoints = tuple((a, helper.underlay_path(a)) for a in others)
            plan = plan_windows_network(
                tunnel_luid=tun.luid,
                tunnel_guid=helper.luid_to_guid(tun.luid),
                tunnel_address=info.tunnel_address,
                mtu=info.mtu,
                routes=info.routes,
                dns_servers=info.dns_servers,
                gateway_ip=gateway_ip,
                underlay=underlay,
                other_endpoints=other_endpoints,
            )
            full_tunnel = is_full_tunnel(info.routes)
            rules = session_nrpt(name, info)
        except (OSError, ValueError) as error:
            raise ClientError(f"cannot plan the network: {error}", retryable=True) from None
        # The filters first: from here on nothing leaks, whatever fails next.
        self._update_firewall(
            name,
            tunnel_luid=tun.luid,
            dataplane=Endpoint(gateway_ip, info.endpoint[1], "udp"),
            full_tunnel=full_tunnel,
        )
        done: list[Step] = []
        try:
            # Added to what an earlier configuration of this tunnel recorded (a
            # re-login that keeps the tunnel up configures it again): undo takes all.
            recorded = self._load_undo(name)
            for step in plan.apply:
                self._apply(helper, step)
                done.append(step)
                new = [s for s in reversed(done) if s in plan.undo and s not in recorded]
                self._save_undo(name, [s.to_list() for s in new + recorded])
            Nrpt(self._reg()).apply(name, rules)
            if rules:
                flush_dns_cache()  # answers cached from other servers go
        except OSError as error:
            self.unconfigure([["windows", name]])
            raise ClientError(f"network setup failed: {error}", retryable=False) from None
        log.info("tunnel MTU %d (path to the gateway: MTU %d)", plan.mtu, underlay.mtu)
        if rules:
            log.info("DNS: %s through NRPT", ", ".join(n for r in rules for n in r.names))
        return [["windows", name]]

    def update_network(
        self, tun: WintunTun, old: ClientSession, new: ClientSession, undo: list[list[str]]
    ) -> list[list[str]]:
        """Routes, DNS servers, NRPT rules and filters of the live tunnel from `old`'s
        network to `new`'s (see client/host.py ClientHost.update_network), in the
        order that never opens a way out: for a change to a full tunnel the
        filters first, then the gateway's /32 and the new routes, the adapter's
        DNS and the NRPT rules; the routes no longer pushed last, and for a change
        to a split tunnel the filters relaxed only then. A failure leaves what was
        done (the undo record covers both networks) and the filters of the
        stricter one. `undo` stays the reference (["windows", tun])."""
        name = checked_tun_name(tun.name)
        reference = [["windows", name]]
        helper = self._ip_helper()
        gateway_ip = new.endpoint[0]
        try:
            outside = any(
                windows_needs_gateway_route(new.tunnel_address, list(n.routes), gateway_ip)
                for n in (old, new)
            )
            # with the /32 in place this finds it; before, the path the tunnel's packets take
            underlay = helper.underlay_path(gateway_ip) if outside else None
            if underlay is not None and underlay.luid == tun.luid:
                raise ValueError(f"the gateway {gateway_ip} is routed into the tunnel")
            update = plan_windows_update(
                tunnel_luid=tun.luid,
                tunnel_guid=helper.luid_to_guid(tun.luid),
                tunnel_address=new.tunnel_address,
                old_routes=list(old.routes),
                old_dns=list(old.dns_servers),
                new_routes=list(new.routes),
                new_dns=list(new.dns_servers),
                gateway_ip=gateway_ip,
                underlay=underlay,
            )
            old_rules, new_rules = session_nrpt(name, old), session_nrpt(name, new)
        except (OSError, ValueError) as error:
            raise ClientError(f"cannot plan the network change: {error}", retryable=False) from None
        old_full, new_full = is_full_tunnel(old.routes), is_full_tunnel(new.routes)
        dataplane = Endpoint(gateway_ip, new.endpoint[1], "udp")
        if new_full and not old_full:  # nothing changed yet if this fails
            self._update_firewall(name, tunnel_luid=tun.luid, dataplane=dataplane, full_tunnel=True)
        try:
            record = self._load_undo(name)
            for step in update.add:
                self._apply(helper, step)
                if step in update.recorded and step not in record:
                    record.insert(0, step)  # newest first, as configure records
                    self._save_undo(name, [s.to_list() for s in record])
            if new_rules != old_rules:
                Nrpt(self._reg()).apply(name, new_rules)
                flush_dns_cache()  # answers cached from the old servers go
        except OSError as error:
            raise NetworkChangeFailed(f"network change failed: {error}", reference) from None
        left = []  # routes that would not go: kept in the record for the teardown
        for step in update.remove:
            try:
                helper.undo(step)  # a route already gone is gone
            except (OSError, ValueError) as error:
                log.warning("removing %s failed: %s", step.to_list(), error)
                left.append(step)
        try:
            dropped = [s for s in update.dropped if s not in left]
            self._save_undo(name, [s.to_list() for s in record if s not in dropped])
        except OSError as error:
            log.warning("undo record of %s not updated: %s", name, error)  # it has more
        if old_full and not new_full:
            try:
                self._update_firewall(
                    name, tunnel_luid=tun.luid, dataplane=dataplane, full_tunnel=False
                )
            except ClientError as error:
                raise NetworkChangeFailed(
                    f"{error} (the full tunnel's filters stay)", reference
                ) from None
        if new_rules != old_rules and new_rules:
            log.info("DNS: %s through NRPT", ", ".join(n for r in new_rules for n in r.names))
        return reference

    # -- the kill switch and DNS filters (WFP) ---------------------------------------

    def lock_down(self, tun_name: str, endpoints: list[tuple[str, int, str]]) -> None:
        """The gateway's endpoints known now (address, port, tcp|udp: the auth service
        before a login, as just resolved), replacing the ones given before. With the
        kill switch asked for (`lockdown` True), or already on for the last session
        (a full tunnel), the filters let only these and the session's dataplane out
        of the physical interfaces from now on."""
        name = checked_tun_name(tun_name)
        self._gateway[name] = frozenset(Endpoint(*e) for e in endpoints)
        current = self._policies.get(name, FirewallPolicy(name))
        lockdown = current.lockdown if self.lockdown is None else self.lockdown
        self._install(self._policy(name, current, lockdown=lockdown))

    def _update_firewall(self, name, *, tunnel_luid, dataplane, full_tunnel) -> None:
        self._dataplane[name] = dataplane
        current = self._policies.get(name, FirewallPolicy(name))
        self._install(
            self._policy(
                name,
                current,
                tunnel_luid=tunnel_luid,
                lockdown=self.lockdown if self.lockdown is not None else full_tunnel,
                block_ipv6=full_tunnel,  # the tunnel carries IPv4 only
                block_outside_dns=full_tunnel,
            )
        )

    def _policy(self, name: str, current: FirewallPolicy, **changes) -> FirewallPolicy:
        endpoints = set(self._gateway.get(name, ()))
        if self._dataplane.get(name) is not None:
            endpoints.add(self._dataplane[name])
        values = {
            "tunnel_luid": current.tunnel_luid,
            "lockdown": current.lockdown,
            "block_ipv6": current.block_ipv6,
            "block_outside_dns": current.block_outside_dns,
            "allow_lan": self.allow_lan,
            "endpoints": tuple(sorted(endpoints, key=lambda e: (e.address, e.port, e.protocol))),
        }
        values.update(changes)
        return FirewallPolicy(name, **values)

    def _install(self, policy: FirewallPolicy) -> None:
        if policy.empty and policy.tun_name not in self._policies:
            return
        try:
            count = self._wfp().apply(policy)
        except OSError as error:
            raise ClientError(
                f"cannot install the firewall filters (kill switch, DNS): {error}",
                retryable=False,
            ) from None
        self._policies[policy.tun_name] = policy
        log.info(
            "firewall: %d filters (kill switch %s, IPv6 %s, DNS outside the tunnel %s)",
            count,
            "on" if policy.lockdown else "off",
            "blocked" if policy.block_ipv6 or policy.lockdown else "open",
            "blocked" if policy.block_outside_dns or policy.lockdown else "open",
        )

    def release(self, tun_name: str) -> None:
        """Disconnect: remove the kill switch and the DNS rules of `tun_name` (also
        what a crashed client left), recomputed from the name alone."""
        name = checked_tun_name(tun_name)
        removed = self._wfp().remove(name)
        rules = Nrpt(self._reg()).remove(name)
        self._policies.pop(name, None)
        self._gateway.pop(name, None)
        self._dataplane.pop(name, None)
        if removed or rules:
            log.info("removed %d firewall filters and %d NRPT rules of %s", removed, rules, name)

    # -- undo records (HKLM, administrators only) ------------------------------------

    def _save_undo(self, name: str, steps: list[list[str]]) -> None:
        self._reg().write(rf"{UNDO_BASE}\{name}", {"Undo": (REG_SZ, json.dumps(steps))})

    def _undo_steps(self, helper: IpHelper, name: str) -> list[Step]:
        """The adapter's part recomputed from the adapter (found by its name's GUID);
        the rest (the gateway's route on the physical interface) from the record."""
        recorded = self._load_undo(name)
        guid = str(adapter_guid(name))
        try:
            luid = helper.guid_to_luid(guid)
            on_adapter = helper.adapter_steps(luid, guid) if luid is not None else []
        except OSError as error:
            log.warning("cannot list what is on adapter %s: %s", name, error)
            return recorded
        elsewhere = [step for step in recorded if step.luid != luid]
        # The adapter's DNS first, then every route, then its addresses.
        order = {"dns": 0, "route": 1, "address": 2}
        return sorted(on_adapter + elsewhere, key=lambda step: order.get(step.kind, 3))

    def _load_undo(self, name: str) -> list[Step]:
        values = self._reg().read(rf"{UNDO_BASE}\{name}") or {}
        kind, text = values.get("Undo", (REG_SZ, "[]"))
        if kind != REG_SZ:
            log.warning("undo record of %s is not a string: ignored", name)
            return []
        try:
            return [Step.from_list(items) for items in json.loads(text)]
        except (ValueError, TypeError) as error:
            log.warning("undo record of %s unreadable: %s", name, error)
            return []

    @staticmethod
    def _apply(helper: IpHelper, step: Step) -> None:
        deadline = time.monotonic() + INTERFACE_WAIT_SECONDS
        while True:
            try:
                helper.apply(step)
                return
            except OSError as error:
                lagging = getattr(error, "winerror_code", None) == ERROR_NOT_FOUND
                if not lagging or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def unconfigure(self, undo: list[list[str]]) -> None:
        """Undo a configuration. `undo` is only a reference (["windows", tun]), never
        the steps: those are recomputed from the adapter, plus the gateway's route
        from the administrators-only record (see `_undo_steps`). The kill switch
        stays unless a stop was asked for (see `release`)."""
        helper = self._ip_helper()
        for reference in undo:
            if not isinstance(reference, list) or len(reference) != 2 or reference[0] != "windows":
                log.warning("ignoring an undo entry that is not ours: %.80r", reference)
                continue
            try:
                name = checked_tun_name(reference[1])
            except ClientError as error:
                log.warning("%s", error)
                continue
            for step in self._undo_steps(helper, name):
                try:
                    helper.undo(step)
                except (OSError, ValueError) as error:
                    log.warning("cleanup step %s failed: %s", step.to_list(), error)
            try:
                Nrpt(self._reg()).remove(name)
                self._reg().delete(rf"{UNDO_BASE}\{name}")
                if self.stop_requested:
                    self.release(name)
            except OSError as error:
                log.warning("cleanup of %s failed: %s", name, error)

    def process_alive(self, pid: int) -> bool:
        k32 = self._k32()
        handle = k32.lib.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid)
        if not handle:
            return False
        try:
            code = c_uint32()
            if not k32.lib.GetExitCodeProcess(handle, ctypes.byref(code)):
                return False
            return code.value == STILL_ACTIVE
        finally:
            k32.lib.CloseHandle(handle)

    def install_stop_handlers(self, loop, connection) -> None:
        # Ctrl-C and Ctrl-Break in the console; `disconnect` sets a named event.
        def on_signal(_signum, _frame):
            self.stop_requested = True  # an explicit stop: the kill switch may go
            loop.call_soon_threadsafe(connection.stop)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGBREAK, on_signal)
        k32 = self._k32()
        name = wide(stop_event_name(os.getpid()))
        event = k32.lib.CreateEventW(None, 1, 0, ctypes.addressof(name))
        if not event:
            log.warning(
                "no stop event (error %d): disconnect will end the process", k32.last_error()
            )
            return

        def wait_for_stop() -> None:
            k32.lib.WaitForSingleObject(event, 0xFFFFFFFF)
            self.stop_requested = True
            loop.call_soon_threadsafe(connection.stop)

        threading.Thread(target=wait_for_stop, name="stop-event", daemon=True).start()

    def request_stop(self, pid: int) -> bool:
        """True if the client was asked to disconnect cleanly; False if it had to be
        ended (then the caller undoes its network configuration)."""
        self.stop_requested = True  # `disconnect`: its clean-up releases the kill switch
        k32 = self._k32()
        name = wide(stop_event_name(pid))
        event = k32.lib.OpenEventW(EVENT_MODIFY_STATE, 0, ctypes.addressof(name))
        if event:
            try:
                if k32.lib.SetEvent(event):
                    return True
            finally:
                k32.lib.CloseHandle(event)
        # TerminateProcess (no clean-up of its own), and only a pushgate client: the
        # pid comes from the status file.
        if not self.is_pushgate_client(pid):
            raise ClientError(
                f"process {pid} is not a pushgate client: not ending it", retryable=False
            )
        os.kill(pid, signal.SIGTERM)
        return False

    def is_pushgate_client(self, pid: int, security: WinSecurity | None = None) -> bool:
        """True when `pid` runs our own executable (pushgate-client.exe; or, for a
        pip install, the same python.exe, which is all Windows can tell us)."""
        image = (security or WinSecurity()).process_image(pid)
        return same_image(image, sys.executable)
