"""The client on Windows: WinTun and the IP Helper API (see client/host.py).

Imported only on Windows (client.host.current_host), but written so that its
pure parts import anywhere. Everything it does to the system goes through
client/wintun.py and client/iphlpapi.py.
"""

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from ctypes import c_int32, c_uint32, c_void_p
from pathlib import Path

from .auth import ClientError, ClientSession
from .iphlpapi import ERROR_NOT_FOUND, IpHelper
from .winnet import Step, plan_windows_network
from .wintun import WintunLibrary, WintunTun, load_library, wide

log = logging.getLogger("pushgate.client")

DLL_NAME = "wintun.dll"
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
STILL_ACTIVE = 259
EVENT_MODIFY_STATE = 0x0002
SYNCHRONIZE = 0x00100000
INTERFACE_WAIT_SECONDS = 5.0  # a new adapter's IPv4 interface may lag behind it
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

    def __init__(self) -> None:
        self._wintun: WintunLibrary | None = None
        self._helper: IpHelper | None = None
        self._kernel32: Kernel32 | None = None

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

    def open_tun(self, name: str) -> WintunTun:
        if self._wintun is None:
            self._wintun = WintunLibrary(str(wintun_dll_path()))
            self._wintun.route_logger()
        try:
            return WintunTun(self._wintun, name)
        except OSError as error:
            raise ClientError(
                f"cannot create WinTun adapter {name}: {error}", retryable=False
            ) from None

    def configure(self, tun: WintunTun, info: ClientSession) -> list[list[str]]:
        helper = self._ip_helper()
        gateway_ip = info.endpoint[0]
        try:
            underlay = helper.underlay_path(gateway_ip)  # before our routes exist
            plan = plan_windows_network(
                tunnel_luid=tun.luid,
                tunnel_guid=helper.luid_to_guid(tun.luid),
                tunnel_address=info.tunnel_address,
                mtu=info.mtu,
                routes=info.routes,
                dns_servers=info.dns_servers,
                gateway_ip=gateway_ip,
                underlay=underlay,
            )
        except (OSError, ValueError) as error:
            raise ClientError(f"cannot plan the network: {error}", retryable=True) from None
        done: list[Step] = []
        try:
            for step in plan.apply:
                self._apply(helper, step)
                done.append(step)
        except OSError as error:
            self.unconfigure([s.to_list() for s in reversed(done) if s in plan.undo])
            raise ClientError(f"network setup failed: {error}", retryable=False) from None
        log.info("tunnel MTU %d (path to the gateway: MTU %d)", plan.mtu, underlay.mtu)
        return [step.to_list() for step in plan.undo]

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
        helper = self._ip_helper()
        for items in undo:
            try:
                helper.undo(Step.from_list(items))
            except (OSError, ValueError) as error:
                log.warning("cleanup step %s failed: %s", items, error)

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
            loop.call_soon_threadsafe(connection.stop)

        threading.Thread(target=wait_for_stop, name="stop-event", daemon=True).start()

    def request_stop(self, pid: int) -> bool:
        """True if the client was asked to disconnect cleanly; False if it had to be
        ended (then the caller undoes its network configuration)."""
        k32 = self._k32()
        name = wide(stop_event_name(pid))
        event = k32.lib.OpenEventW(EVENT_MODIFY_STATE, 0, ctypes.addressof(name))
        if event:
            try:
                if k32.lib.SetEvent(event):
                    return True
            finally:
                k32.lib.CloseHandle(event)
        os.kill(pid, signal.SIGTERM)  # TerminateProcess: no clean-up of its own
        return False
