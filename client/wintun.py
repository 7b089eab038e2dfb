"""Windows TUN backend: WinTun 0.14.1 through ctypes on wintun.dll.

WinTun hands packets over in two shared-memory rings and has no file descriptor.
To keep the client core unchanged (it waits for a readable descriptor on the
asyncio loop), a small reader thread waits on WinTun's read event together with
a quit event and, when packets arrive, writes one byte into a socketpair whose
read end is what `fileno()` returns. `read_packets` drains the ring on the loop
thread and re-arms the reader thread only once the ring is empty, so there is
at most one wake-up byte in flight and no packet waits for a missed signal.

The declarations use fixed-width types (DWORD = c_uint32, NET_LUID = c_uint64):
on Linux `c_ulong` is 8 bytes, and the Linux tests drive these very declarations
against a compiled fake of the DLL (tests/fakes/fake_wintun.c). Wide strings are
passed as explicit UTF-16 buffers for the same reason (`wchar_t` is 4 bytes on
Linux).
"""

import contextlib
import ctypes
import hashlib
import logging
import os
import socket
import sys
import threading
import uuid
from ctypes import POINTER, c_int32, c_uint8, c_uint32, c_uint64, c_void_p

from pushgate_io import tso

log = logging.getLogger("pushgate.wintun")
dll_log = logging.getLogger("pushgate.wintun.dll")

WINDOWS = sys.platform == "win32"

# Windows error codes the binding acts on (winerror.h).
ERROR_HANDLE_EOF = 38  # the session ended (adapter removed, driver stopped)
ERROR_INVALID_PARAMETER = 87
ERROR_BUFFER_OVERFLOW = 111  # send ring full
ERROR_NO_MORE_ITEMS = 259  # receive ring empty

MIN_RING_CAPACITY = 0x20000  # 128 KiB, wintun.h
MAX_RING_CAPACITY = 0x4000000  # 64 MiB
DEFAULT_RING_CAPACITY = 0x400000  # 4 MiB: a few thousand full-size packets of slack
MAX_IP_PACKET_SIZE = 0xFFFF
TUNNEL_TYPE = "pushgate"

WAIT_OBJECT_0 = 0
WAIT_FAILED = 0xFFFFFFFF
INFINITE = 0xFFFFFFFF

# SHA-256 of WireGuard's signed wintun.dll 0.14.1 (as in wintun-0.14.1.zip): the
# only DLL the client loads, and the only one release/wintun_dll.py packages.
WINTUN_DLL_SHA256 = {
    "amd64": "e5da8447dc2c320edc0fc52fa01885c103de8c118481f683643cacc3220dafce",
}

# Our adapters' GUIDs are derived from their names, so the adapter a crashed run
# left behind is the one we find again (and Windows keeps one network profile
# for it instead of a new "pushgate 2", "pushgate 3", ...).
ADAPTER_GUID_NAMESPACE = uuid.UUID("5b1c7e0a-93a4-4f0e-8f4e-7075736867a7")

_callback_type = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)
LOGGER_CALLBACK = _callback_type(None, c_int32, c_uint64, c_void_p)
LOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR}


class GUID(ctypes.Structure):
    _fields_ = (
        ("Data1", c_uint32),
        ("Data2", ctypes.c_uint16),
        ("Data3", ctypes.c_uint16),
        ("Data4", c_uint8 * 8),
    )

    @classmethod
    def from_uuid(cls, value: uuid.UUID) -> "GUID":
        # GUID's first three fields are little-endian in memory: uuid.bytes_le.
        return cls.from_buffer_copy(value.bytes_le)

    def to_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self))


def adapter_guid(name: str) -> uuid.UUID:
    return uuid.uuid5(ADAPTER_GUID_NAMESPACE, name)


def wide(text: str) -> ctypes.Array:
    """A NUL-terminated UTF-16 string (LPCWSTR) as Windows lays it out."""
    return ctypes.create_string_buffer(text.encode("utf-16-le") + b"\0\0")


def read_wide(address: int | None) -> str:
    """Read a NUL-terminated UTF-16 string at `address`."""
    if not address:
        return ""
    units = []
    index = 0
    while True:
        unit = ctypes.c_uint16.from_address(address + 2 * index).value
        if unit == 0:
            break
        units.append(unit)
        index += 1
    return b"".join(u.to_bytes(2, "little") for u in units).decode("utf-16-le", "replace")


class WintunError(OSError):
    """A WinTun call failed; `winerror` is the Windows error code."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed: Windows error {code}")
        self.call = call
        self.winerror_code = code


class DllRefused(OSError):
    """wintun.dll is not the pinned one."""


def install_checked_dll(source: str, directory: str, arch: str = "amd64") -> str:
    """Copy wintun.dll from `source` into `directory` (which only administrators can
    write: see client/winsecurity.py) after checking its SHA-256 against the pin,
    and return the copy's path once the copy's own bytes check too.

    The one-file executable unpacks its DLL into the user's temp folder, where the
    user could swap it between a check and the load; the copy in `directory`
    cannot change under us, so what is checked is what is loaded.
    """
    pinned = WINTUN_DLL_SHA256[arch]
    with open(source, "rb") as handle:
        data = handle.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned:
        raise DllRefused(f"{source}: SHA-256 {digest} is not the pinned {pinned}: not loaded")
    target = os.path.join(directory, "wintun.dll")
    try:
        with open(target, "rb") as handle:
            current = handle.read()
    except FileNotFoundError:
        current = b""
    if current != data:
        temporary = f"{target}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)  # fails while a running client has it loaded
    with open(target, "rb") as handle:
        if hashlib.sha256(handle.read()).hexdigest() != pinned:
            raise DllRefused(f"{target} changed while it was written: not loaded")
    return target


def load_library(path: str):
    """Load a DLL by absolute path, capturing the thread's last error per call.

    Returns (library, last_error). On Windows the error is GetLastError(); the
    Linux fake sets errno instead, which ctypes captures the same way.
    """
    if WINDOWS:
        library = ctypes.WinDLL(path, use_last_error=True)
        return library, ctypes.get_last_error
    library = ctypes.CDLL(path, use_errno=True)
    return library, ctypes.get_errno


class Waits:
    """The three kernel32 waits the reader thread needs, behind one small type.

    On Windows `library` is kernel32; the Linux tests pass the fake DLL, which
    exports the same four functions with the same signatures.
    """

    def __init__(self, library, last_error) -> None:
        self._last_error = last_error
        self._create = library.CreateEventW
        self._create.argtypes = (c_void_p, c_int32, c_int32, c_void_p)
        self._create.restype = c_void_p
        self._set = library.SetEvent
        self._set.argtypes = (c_void_p,)
        self._set.restype = c_int32
        self._wait = library.WaitForMultipleObjects
        self._wait.argtypes = (c_uint32, POINTER(c_void_p), c_int32, c_uint32)
        self._wait.restype = c_uint32
        self._close = library.CloseHandle
        self._close.argtypes = (c_void_p,)
        self._close.restype = c_int32

    def create_event(self) -> int:
        """A manual-reset event, not signalled."""
        handle = self._create(None, 1, 0, None)
        if not handle:
            raise WintunError("CreateEventW", self._last_error())
        return handle

    def set_event(self, handle: int) -> None:
        if not self._set(handle):
            raise WintunError("SetEvent", self._last_error())

    def wait_any(self, handles: list[int], timeout_ms: int = INFINITE) -> int:
        """Index of the first signalled handle, or None on timeout."""
        array = (c_void_p * len(handles))(*handles)
        result = self._wait(len(handles), array, 0, timeout_ms)
        if result == WAIT_FAILED:
            raise WintunError("WaitForMultipleObjects", self._last_error())
        index = result - WAIT_OBJECT_0
        return index if 0 <= index < len(handles) else None

    def close(self, handle: int) -> None:
        self._close(handle)


def kernel32_waits() -> Waits:
    return Waits(*load_library("kernel32.dll"))


class WintunLibrary:
    """The ctypes declarations of wintun.dll's exports (wintun.h, 0.14.1)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dll, self.last_error = load_library(path)
        d = self._dll
        self._declare(d.WintunCreateAdapter, c_void_p, c_void_p, c_void_p, POINTER(GUID))
        self._declare(d.WintunOpenAdapter, c_void_p, c_void_p)
        self._declare(d.WintunCloseAdapter, None, c_void_p)
        self._declare(d.WintunDeleteDriver, c_int32)
        self._declare(d.WintunGetAdapterLUID, None, c_void_p, POINTER(c_uint64))
        self._declare(d.WintunGetRunningDriverVersion, c_uint32)
        self._declare(d.WintunSetLogger, None, LOGGER_CALLBACK)
        self._declare(d.WintunStartSession, c_void_p, c_void_p, c_uint32)
        self._declare(d.WintunEndSession, None, c_void_p)
        self._declare(d.WintunGetReadWaitEvent, c_void_p, c_void_p)
        self._declare(d.WintunReceivePacket, c_void_p, c_void_p, POINTER(c_uint32))
        self._declare(d.WintunReleaseReceivePacket, None, c_void_p, c_void_p)
        self._declare(d.WintunAllocateSendPacket, c_void_p, c_void_p, c_uint32)
        self._declare(d.WintunSendPacket, None, c_void_p, c_void_p)
        self._logger = None

    @staticmethod
    def _declare(function, restype, *argtypes) -> None:
        function.restype = restype
        function.argtypes = argtypes

    def __getattr__(self, name: str):
        return getattr(self._dll, name)

    def route_logger(self) -> None:
        """Send the DLL's log lines into our logging (keeps the callback alive)."""

        def on_log(level: int, _timestamp: int, message: int) -> None:
            dll_log.log(LOG_LEVELS.get(level, logging.WARNING), "%s", read_wide(message))

        self._logger = LOGGER_CALLBACK(on_log)
        self._dll.WintunSetLogger(self._logger)

    def driver_version(self) -> str:
        """'major.minor' of the loaded driver; '' when none is loaded."""
        version = self._dll.WintunGetRunningDriverVersion()
        return f"{version >> 16}.{version & 0xFFFF}" if version else ""

    def delete_driver(self) -> None:
        """Remove the driver when no adapter uses it (uninstall)."""
        if not self._dll.WintunDeleteDriver():
            raise WintunError("WintunDeleteDriver", self.last_error())


class WintunTun:
    """A WinTun adapter with a running session: the client's `TunDevice` on Windows."""

    def __init__(
        self,
        library: WintunLibrary,
        name: str,
        waits: Waits | None = None,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
    ) -> None:
        if not MIN_RING_CAPACITY <= ring_capacity <= MAX_RING_CAPACITY or (
            ring_capacity & (ring_capacity - 1)
        ):
            raise ValueError(
                f"ring capacity {ring_capacity} must be a power of two in "
                f"[{MIN_RING_CAPACITY}, {MAX_RING_CAPACITY}]"
            )
        self.name = name
        self.partial_tcp = False  # reads are plain packets
        self._lib = library
        self._waits = waits or kernel32_waits()
        self._adapter = None
        self._session = None
        self._quit = None
        self._thread = None
        self._wake_r = self._wake_w = None
        self._armed = threading.Event()
        self._ended = False
        try:
            self._adapter = self._open_adapter(name)
            self._session = library.WintunStartSession(self._adapter, ring_capacity)
            if not self._session:
                raise WintunError("WintunStartSession", library.last_error())
            self._read_event = library.WintunGetReadWaitEvent(self._session)
            self._quit = self._waits.create_event()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            # Let the loop look once: the ring may hold packets already.
            self._wake_w.send(b"\0")
            self._thread = threading.Thread(
                target=self._wait_for_packets, name=f"wintun-{name}", daemon=True
            )
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def _open_adapter(self, name: str) -> int:
        """Reuse the adapter of this name a previous run left, or create it."""
        lib = self._lib
        adapter = lib.WintunOpenAdapter(wide(name))
        if adapter:
            log.info("reusing WinTun adapter %s left by an earlier run", name)
            return adapter
        guid = GUID.from_uuid(adapter_guid(name))
        adapter = lib.WintunCreateAdapter(wide(name), wide(TUNNEL_TYPE), ctypes.byref(guid))
        if not adapter:
            raise WintunError("WintunCreateAdapter", lib.last_error())
        version = lib.driver_version()
        log.info("created WinTun adapter %s (driver %s)", name, version or "not loaded")
        return adapter

    @property
    def luid(self) -> int:
        """The adapter's NET_LUID, which the IP Helper API addresses it by."""
        value = c_uint64()
        self._lib.WintunGetAdapterLUID(self._adapter, ctypes.byref(value))
        return value.value

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def _wait_for_packets(self) -> None:
        """Reader thread: wake the loop whenever the (empty) ring gets packets."""
        handles = [self._read_event, self._quit]
        while True:
            self._armed.wait()
            self._armed.clear()
            if self._ended:
                return
            try:
                index = self._waits.wait_any(handles)
            except OSError as error:
                log.error("waiting for WinTun packets failed: %s", error)
                return
            if index != 0:  # quit
                return
            try:
                self._wake_w.send(b"\0")
            except OSError:
                return  # closed under us

    def _rearm(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(64):
                pass
        self._armed.set()

    def read_queues(self) -> list:
        return [self]

    def read_packets(self, limit: int) -> list[bytes]:
        packets: list[bytes] = []
        if self._ended:
            return packets
        lib, session = self._lib, self._session
        size = c_uint32()
        while len(packets) < limit:
            pointer = lib.WintunReceivePacket(session, ctypes.byref(size))
            if not pointer:
                code = lib.last_error()
                if code == ERROR_NO_MORE_ITEMS:
                    self._rearm()  # empty: the thread waits for the next packet
                    return packets
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(64)
                self._ended = True  # no more wake-ups: the session is over
                self._armed.set()
                if code == ERROR_HANDLE_EOF:
                    log.error("WinTun session on %s ended (adapter removed?)", self.name)
                raise WintunError("WintunReceivePacket", code)
            try:
                packets.append(ctypes.string_at(pointer, size.value))
            finally:
                lib.WintunReleaseReceivePacket(session, pointer)
        # Limit reached with packets left: the wake-up byte stays, the loop calls again.
        return packets

    def write_packet(self, packet: bytes) -> bool:
        """False when the send ring is full; OSError for a packet it refuses or a
        session that ended."""
        if len(packet) > MAX_IP_PACKET_SIZE or not packet:
            raise WintunError("WintunAllocateSendPacket", ERROR_INVALID_PARAMETER)
        lib = self._lib
        pointer = lib.WintunAllocateSendPacket(self._session, len(packet))
        if not pointer:
            code = lib.last_error()
            if code == ERROR_BUFFER_OVERFLOW:
                return False
            raise WintunError("WintunAllocateSendPacket", code)
        ctypes.memmove(pointer, packet, len(packet))
        lib.WintunSendPacket(self._session, pointer)
        return True

    def coalesce(self, packets: list[bytes], partial_tcp: bool = False) -> list[tuple[list, int]]:
        if partial_tcp:  # never asked for (WindowsHost.completes_checksums): done here
            packets = [tso.complete(packet) for packet in packets]
        return [([packet], 1) for packet in packets]  # the ring takes one packet at a time

    def write_buffers(self, buffers: list) -> bool:
        return self.write_packet(buffers[0])

    def close(self) -> None:
        self._ended = True
        if self._quit is not None:
            with contextlib.suppress(OSError):
                self._waits.set_event(self._quit)
        self._armed.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._session is not None:
            self._lib.WintunEndSession(self._session)
            self._session = None
        if self._adapter is not None:
            # Removes an adapter we created; releases one we opened.
            self._lib.WintunCloseAdapter(self._adapter)
            self._adapter = None
        if self._quit is not None:
            self._waits.close(self._quit)
            self._quit = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
