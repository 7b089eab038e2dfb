"""The Windows IP Helper API through ctypes: carries out `winnet` plan steps.

Structures are laid out as netioapi.h / ws2ipdef.h define them for Windows x64,
with fixed-width types (ULONG = c_uint32, NET_LUID = c_uint64) so the layout is
the same when the module is imported on Linux, where tests assert every size
and the offsets of the fields we write. The functions return a Windows error
code (NO_ERROR = 0) rather than setting the last error.
"""

import ctypes
import ipaddress
import logging
import uuid
from ctypes import POINTER, c_int32, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

from .winnet import ON_LINK, Step, UnderlayPath
from .wintun import GUID, wide

log = logging.getLogger("pushgate.client.iphlpapi")

NO_ERROR = 0
AF_UNSPEC = 0
TABLE_ROWS_OFFSET = 8  # MIB_*_TABLE2: ULONG NumEntries, then the rows (8-aligned)
ERROR_FILE_NOT_FOUND = 2
ERROR_NOT_FOUND = 1168
ERROR_OBJECT_ALREADY_EXISTS = 5010
AF_INET, AF_INET6 = 2, 23  # Windows' values (AF_INET6 is 10 on Linux)
MIB_IPPROTO_NETMGMT = 3  # a static route set by management
DNS_INTERFACE_SETTINGS_VERSION1 = 1
DNS_SETTING_NAMESERVER = 0x0002
ScopeLevelCount = 16
BOOLEAN = c_uint8


class SOCKADDR_IN(ctypes.Structure):
    _fields_ = (
        ("sin_family", c_uint16),
        ("sin_port", c_uint16),
        ("sin_addr", c_uint8 * 4),
        ("sin_zero", c_uint8 * 8),
    )


class SOCKADDR_IN6(ctypes.Structure):
    _fields_ = (
        ("sin6_family", c_uint16),
        ("sin6_port", c_uint16),
        ("sin6_flowinfo", c_uint32),
        ("sin6_addr", c_uint8 * 16),
        ("sin6_scope_id", c_uint32),
    )


class SOCKADDR_INET(ctypes.Union):
    _fields_ = (("Ipv4", SOCKADDR_IN), ("Ipv6", SOCKADDR_IN6), ("si_family", c_uint16))


class IP_ADDRESS_PREFIX(ctypes.Structure):
    _fields_ = (("Prefix", SOCKADDR_INET), ("PrefixLength", c_uint8))


class MIB_UNICASTIPADDRESS_ROW(ctypes.Structure):
    _fields_ = (
        ("Address", SOCKADDR_INET),
        ("InterfaceLuid", c_uint64),
        ("InterfaceIndex", c_uint32),
        ("PrefixOrigin", c_int32),
        ("SuffixOrigin", c_int32),
        ("ValidLifetime", c_uint32),
        ("PreferredLifetime", c_uint32),
        ("OnLinkPrefixLength", c_uint8),
        ("SkipAsSource", BOOLEAN),
        ("DadState", c_int32),
        ("ScopeId", c_uint32),
        ("CreationTimeStamp", ctypes.c_int64),
    )


class MIB_IPFORWARD_ROW2(ctypes.Structure):
    _fields_ = (
        ("InterfaceLuid", c_uint64),
        ("InterfaceIndex", c_uint32),
        ("DestinationPrefix", IP_ADDRESS_PREFIX),
        ("NextHop", SOCKADDR_INET),
        ("SitePrefixLength", c_uint8),
        ("ValidLifetime", c_uint32),
        ("PreferredLifetime", c_uint32),
        ("Metric", c_uint32),
        ("Protocol", c_int32),
        ("Loopback", BOOLEAN),
        ("AutoconfigureAddress", BOOLEAN),
        ("Publish", BOOLEAN),
        ("Immortal", BOOLEAN),
        ("Age", c_uint32),
        ("Origin", c_int32),
    )


class MIB_IPINTERFACE_ROW(ctypes.Structure):
    _fields_ = (
        ("Family", c_uint16),
        ("InterfaceLuid", c_uint64),
        ("InterfaceIndex", c_uint32),
        ("MaxReassemblySize", c_uint32),
        ("InterfaceIdentifier", c_uint64),
        ("MinRouterAdvertisementInterval", c_uint32),
        ("MaxRouterAdvertisementInterval", c_uint32),
        ("AdvertisingEnabled", BOOLEAN),
        ("ForwardingEnabled", BOOLEAN),
        ("WeakHostSend", BOOLEAN),
        ("WeakHostReceive", BOOLEAN),
        ("UseAutomaticMetric", BOOLEAN),
        ("UseNeighborUnreachabilityDetection", BOOLEAN),
        ("ManagedAddressConfigurationSupported", BOOLEAN),
        ("OtherStatefulConfigurationSupported", BOOLEAN),
        ("AdvertiseDefaultRoute", BOOLEAN),
        ("RouterDiscoveryBehavior", c_int32),
        ("DadTransmits", c_uint32),
        ("BaseReachableTime", c_uint32),
        ("RetransmitTime", c_uint32),
        ("PathMtuDiscoveryTimeout", c_uint32),
        ("LinkLocalAddressBehavior", c_int32),
        ("LinkLocalAddressTimeout", c_uint32),
        ("ZoneIndices", c_uint32 * ScopeLevelCount),
        ("SitePrefixLength", c_uint32),
        ("Metric", c_uint32),
        ("NlMtu", c_uint32),
        ("Connected", BOOLEAN),
        ("SupportsWakeUpPatterns", BOOLEAN),
        ("SupportsNeighborDiscovery", BOOLEAN),
        ("SupportsRouterDiscovery", BOOLEAN),
        ("ReachableTime", c_uint32),
        ("TransmitOffload", c_uint8),  # NL_INTERFACE_OFFLOAD_ROD: one byte of bit flags
        ("ReceiveOffload", c_uint8),
        ("DisableDefaultRoutes", BOOLEAN),
    )


class DNS_INTERFACE_SETTINGS(ctypes.Structure):
    _fields_ = (
        ("Version", c_uint32),
        ("Flags", c_uint64),
        ("Domain", c_void_p),  # PWSTR
        ("NameServer", c_void_p),
        ("SearchList", c_void_p),
        ("RegistrationEnabled", c_uint32),
        ("RegisterAdapterName", c_uint32),
        ("EnableLLMNR", c_uint32),
        ("QueryAdapterName", c_uint32),
        ("ProfileNameServer", c_void_p),
    )


def sockaddr(address: str) -> SOCKADDR_INET:
    """A SOCKADDR_INET holding `address` (port 0)."""
    ip = ipaddress.ip_address(address)
    value = SOCKADDR_INET()
    if ip.version == 4:
        value.Ipv4.sin_family = AF_INET
        value.Ipv4.sin_addr[:] = list(ip.packed)
    else:
        value.Ipv6.sin6_family = AF_INET6
        value.Ipv6.sin6_addr[:] = list(ip.packed)
    return value


def sockaddr_text(value: SOCKADDR_INET) -> str:
    if value.si_family == AF_INET6:
        return str(ipaddress.IPv6Address(bytes(value.Ipv6.sin6_addr)))
    return str(ipaddress.IPv4Address(bytes(value.Ipv4.sin_addr)))


def unicast_row(luid: int, interface: str, row: MIB_UNICASTIPADDRESS_ROW) -> None:
    """Fill an (initialized) address row for `interface` ("198.19.0.2/24") on `luid`."""
    parsed = ipaddress.ip_interface(interface)
    row.Address = sockaddr(str(parsed.ip))
    row.InterfaceLuid = luid
    row.OnLinkPrefixLength = parsed.network.prefixlen


def forward_row(luid: int, prefix: str, next_hop: str, row: MIB_IPFORWARD_ROW2) -> None:
    """Fill an (initialized) route row: `prefix` on `luid` via `next_hop`."""
    network = ipaddress.ip_network(prefix)
    row.InterfaceLuid = luid
    row.DestinationPrefix.Prefix = sockaddr(str(network.network_address))
    row.DestinationPrefix.PrefixLength = network.prefixlen
    hop = next_hop if network.version == 4 or next_hop != ON_LINK else "::"
    row.NextHop = sockaddr(hop)
    row.Metric = 0  # added to the interface metric
    row.Protocol = MIB_IPPROTO_NETMGMT


class IpHelperError(OSError):
    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed: Windows error {code}")
        self.winerror_code = code


class IpHelper:
    """The calls a plan needs, declared on iphlpapi.dll."""

    def __init__(self, library=None) -> None:
        if library is None:
            library = ctypes.WinDLL("iphlpapi.dll", use_last_error=True)
        self._lib = library
        declarations = {
            "GetBestRoute2": (
                POINTER(c_uint64),
                c_uint32,
                POINTER(SOCKADDR_INET),
                POINTER(SOCKADDR_INET),
                c_uint32,
                POINTER(MIB_IPFORWARD_ROW2),
                POINTER(SOCKADDR_INET),
            ),
            "GetIpInterfaceEntry": (POINTER(MIB_IPINTERFACE_ROW),),
            "SetIpInterfaceEntry": (POINTER(MIB_IPINTERFACE_ROW),),
            "CreateUnicastIpAddressEntry": (POINTER(MIB_UNICASTIPADDRESS_ROW),),
            "DeleteUnicastIpAddressEntry": (POINTER(MIB_UNICASTIPADDRESS_ROW),),
            "CreateIpForwardEntry2": (POINTER(MIB_IPFORWARD_ROW2),),
            "DeleteIpForwardEntry2": (POINTER(MIB_IPFORWARD_ROW2),),
            "SetInterfaceDnsSettings": (GUID, POINTER(DNS_INTERFACE_SETTINGS)),
            "ConvertInterfaceLuidToGuid": (POINTER(c_uint64), POINTER(GUID)),
            "ConvertInterfaceGuidToLuid": (POINTER(GUID), POINTER(c_uint64)),
            "GetIpForwardTable2": (c_uint16, POINTER(c_void_p)),
            "GetUnicastIpAddressTable": (c_uint16, POINTER(c_void_p)),
        }
        for name, argtypes in declarations.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = c_uint32
        library.FreeMibTable.argtypes = (c_void_p,)
        library.FreeMibTable.restype = None
        for name, row in (
            ("InitializeUnicastIpAddressEntry", MIB_UNICASTIPADDRESS_ROW),
            ("InitializeIpForwardEntry", MIB_IPFORWARD_ROW2),
            ("InitializeIpInterfaceEntry", MIB_IPINTERFACE_ROW),
        ):
            function = getattr(library, name)
            function.argtypes = (POINTER(row),)
            function.restype = None

    def _check(self, call: str, code: int, *tolerated: int) -> int:
        if code not in (NO_ERROR, *tolerated):
            raise IpHelperError(call, code)
        return code

    def interface_row(self, luid: int, family: int = AF_INET) -> MIB_IPINTERFACE_ROW:
        row = MIB_IPINTERFACE_ROW()
        self._lib.InitializeIpInterfaceEntry(ctypes.byref(row))
        row.Family = family
        row.InterfaceLuid = luid
        self._check("GetIpInterfaceEntry", self._lib.GetIpInterfaceEntry(ctypes.byref(row)))
        return row

    def underlay_path(self, gateway_ip: str) -> UnderlayPath:
        """The interface, next hop and MTU that reach the gateway right now."""
        destination = sockaddr(gateway_ip)
        best = MIB_IPFORWARD_ROW2()
        source = SOCKADDR_INET()
        self._check(
            "GetBestRoute2",
            self._lib.GetBestRoute2(
                None, 0, None, ctypes.byref(destination), 0, ctypes.byref(best),
                ctypes.byref(source),
            ),
        )  # fmt: skip
        family = AF_INET6 if ":" in gateway_ip else AF_INET
        next_hop = sockaddr_text(best.NextHop)
        if ipaddress.ip_address(next_hop).is_unspecified:
            next_hop = ON_LINK
        mtu = self.interface_row(best.InterfaceLuid, family).NlMtu
        return UnderlayPath(luid=best.InterfaceLuid, next_hop=next_hop, mtu=mtu)

    def luid_to_guid(self, luid: int) -> str:
        guid = GUID()
        value = c_uint64(luid)
        self._check(
            "ConvertInterfaceLuidToGuid",
            self._lib.ConvertInterfaceLuidToGuid(ctypes.byref(value), ctypes.byref(guid)),
        )
        return str(guid.to_uuid())

    def guid_to_luid(self, adapter_guid: str) -> int | None:
        """The LUID of the adapter with this GUID; None when there is none."""
        guid = GUID.from_uuid(uuid.UUID(adapter_guid))
        value = c_uint64()
        code = self._lib.ConvertInterfaceGuidToLuid(ctypes.byref(guid), ctypes.byref(value))
        if code in (ERROR_NOT_FOUND, ERROR_FILE_NOT_FOUND):
            return None
        self._check("ConvertInterfaceGuidToLuid", code)
        return value.value

    def _table(self, call: str, row_type, family: int) -> list:
        pointer = c_void_p()
        self._check(call, getattr(self._lib, call)(family, ctypes.byref(pointer)))
        try:
            count = c_uint32.from_address(pointer.value).value
            rows = (row_type * count).from_address(pointer.value + TABLE_ROWS_OFFSET)
            copies = []
            for row in rows:
                copy = row_type()
                ctypes.memmove(ctypes.addressof(copy), ctypes.addressof(row), ctypes.sizeof(row))
                copies.append(copy)
            return copies
        finally:
            self._lib.FreeMibTable(pointer)

    def adapter_steps(self, luid: int, adapter_guid: str) -> list[Step]:
        """What to undo on the adapter `luid`, recomputed from what Windows reports
        now: its DNS servers, the routes management set on it (not the ones Windows
        derived from its address), its IPv4 addresses. In undo order."""
        steps = [Step("dns", luid, (adapter_guid, ""))]
        for row in self._table("GetIpForwardTable2", MIB_IPFORWARD_ROW2, AF_UNSPEC):
            if row.InterfaceLuid != luid or row.Protocol != MIB_IPPROTO_NETMGMT:
                continue
            prefix = row.DestinationPrefix
            text = f"{sockaddr_text(prefix.Prefix)}/{prefix.PrefixLength}"
            hop = sockaddr_text(row.NextHop)
            steps.append(Step("route", luid, (text, ON_LINK if hop in ("0.0.0.0", "::") else hop)))
        for row in self._table("GetUnicastIpAddressTable", MIB_UNICASTIPADDRESS_ROW, AF_INET):
            if row.InterfaceLuid == luid:
                text = f"{sockaddr_text(row.Address)}/{row.OnLinkPrefixLength}"
                steps.append(Step("address", luid, (text,)))
        return steps

    def apply(self, step: Step) -> None:
        getattr(self, f"_apply_{step.kind}")(step)

    def undo(self, step: Step) -> None:
        """Reverse `step`; what is already gone is not an error."""
        getattr(self, f"_undo_{step.kind}")(step)

    def _apply_interface(self, step: Step) -> None:
        mtu, metric = (int(value) for value in step.args)
        row = self.interface_row(step.luid)
        row.NlMtu = mtu
        row.Metric = metric
        row.UseAutomaticMetric = 0
        row.SitePrefixLength = 0  # SetIpInterfaceEntry refuses IPv4 rows without this
        self._check("SetIpInterfaceEntry", self._lib.SetIpInterfaceEntry(ctypes.byref(row)))

    def _undo_interface(self, step: Step) -> None:
        pass  # the adapter's own settings go with the adapter

    def _address_row(self, step: Step) -> MIB_UNICASTIPADDRESS_ROW:
        row = MIB_UNICASTIPADDRESS_ROW()
        self._lib.InitializeUnicastIpAddressEntry(ctypes.byref(row))
        unicast_row(step.luid, step.args[0], row)
        return row

    def _apply_address(self, step: Step) -> None:
        code = self._lib.CreateUnicastIpAddressEntry(ctypes.byref(self._address_row(step)))
        self._check("CreateUnicastIpAddressEntry", code, ERROR_OBJECT_ALREADY_EXISTS)

    def _undo_address(self, step: Step) -> None:
        code = self._lib.DeleteUnicastIpAddressEntry(ctypes.byref(self._address_row(step)))
        self._check("DeleteUnicastIpAddressEntry", code, ERROR_NOT_FOUND, ERROR_FILE_NOT_FOUND)

    def _route_row(self, step: Step) -> MIB_IPFORWARD_ROW2:
        row = MIB_IPFORWARD_ROW2()
        self._lib.InitializeIpForwardEntry(ctypes.byref(row))
        forward_row(step.luid, step.args[0], step.args[1], row)
        return row

    def _apply_route(self, step: Step) -> None:
        code = self._lib.CreateIpForwardEntry2(ctypes.byref(self._route_row(step)))
        self._check("CreateIpForwardEntry2", code, ERROR_OBJECT_ALREADY_EXISTS)

    def _undo_route(self, step: Step) -> None:
        code = self._lib.DeleteIpForwardEntry2(ctypes.byref(self._route_row(step)))
        self._check("DeleteIpForwardEntry2", code, ERROR_NOT_FOUND, ERROR_FILE_NOT_FOUND)

    def _set_dns(self, adapter_guid: str, servers: str, *tolerated: int) -> None:
        settings = DNS_INTERFACE_SETTINGS()
        settings.Version = DNS_INTERFACE_SETTINGS_VERSION1
        settings.Flags = DNS_SETTING_NAMESERVER
        text = wide(servers)  # "a,b": comma-separated, as the API wants; kept alive here
        settings.NameServer = ctypes.addressof(text)
        guid = GUID.from_uuid(uuid.UUID(adapter_guid))
        code = self._lib.SetInterfaceDnsSettings(guid, ctypes.byref(settings))
        self._check("SetInterfaceDnsSettings", code, *tolerated)

    def _apply_dns(self, step: Step) -> None:
        self._set_dns(step.args[0], step.args[1])

    def _undo_dns(self, step: Step) -> None:
        # An empty list: back to none. The adapter may be gone already.
        self._set_dns(step.args[0], "", ERROR_NOT_FOUND, ERROR_FILE_NOT_FOUND)
