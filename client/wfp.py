"""The Windows kill switch: Windows Filtering Platform filters through ctypes.

Two halves, as client/winnet.py and client/iphlpapi.py:

- `plan_filters` (pure) turns a `FirewallPolicy` into `FilterSpec` records: what
  to permit (the gateway's endpoints, loopback, the WinTun adapter, DHCP and
  neighbour discovery on the physical interfaces, opt-in LAN ranges), what to
  block (everything else; or only IPv6; or only DNS outside the tunnel), in both
  families, at the ALE connect and receive-accept layers.
- `WfpFirewall` installs a plan with fwpuclnt.dll (FwpmEngineOpen0, one
  transaction): a provider, one sublayer per tunnel name and the filters, all
  *persistent* (FWPM_*_FLAG_PERSISTENT), so they outlive the process: a crash, a
  re-login or a reconnect never opens the way. `remove` (the `disconnect`
  command, or the clean end of a run) deletes them again.

Nothing about the filters is read back from a file: every key is derived from
the tunnel name (uuid5), so `remove` recomputes what to delete, and a new plan
replaces the old one inside one transaction (delete, add, commit), so no packet
ever sees a moment without the block filters.

Structures follow fwptypes.h / fwpmtypes.h for Windows x64 with fixed-width
types, so the layout is the same when imported on Linux, where the tests check
sizes and offsets and drive the executor against an in-memory WFP
(tests/fakes/fake_wfp.py) that decodes every structure we pass.
"""

import ctypes
import ipaddress
import uuid
from ctypes import POINTER, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass

from .host import LAN_PREFIXES
from .wintun import GUID, wide

# -- constants (fwptypes.h, fwpmtypes.h, fwpmu.h, winerror.h) -----------------------

RPC_C_AUTHN_WINNT = 10
INFINITE = 0xFFFFFFFF

FWP_EMPTY, FWP_UINT8, FWP_UINT16, FWP_UINT32, FWP_UINT64 = 0, 1, 2, 3, 4
FWP_BYTE_ARRAY16_TYPE = 11
FWP_V4_ADDR_MASK, FWP_V6_ADDR_MASK = 0x100, 0x101

FWP_MATCH_EQUAL = 0
FWP_MATCH_FLAGS_ALL_SET = 6

FWP_ACTION_FLAG_TERMINATING = 0x1000
FWP_ACTION_BLOCK = 0x1 | FWP_ACTION_FLAG_TERMINATING
FWP_ACTION_PERMIT = 0x2 | FWP_ACTION_FLAG_TERMINATING

FWPM_PROVIDER_FLAG_PERSISTENT = 0x1
FWPM_SUBLAYER_FLAG_PERSISTENT = 0x1
FWPM_FILTER_FLAG_PERSISTENT = 0x1
FWP_CONDITION_FLAG_IS_LOOPBACK = 0x1

ERROR_SUCCESS = 0
FWP_E_FILTER_NOT_FOUND = 0x80320003
FWP_E_PROVIDER_NOT_FOUND = 0x80320005
FWP_E_SUBLAYER_NOT_FOUND = 0x80320007
FWP_E_ALREADY_EXISTS = 0x80320009
FWP_E_IN_USE = 0x8032000A

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
PROTOCOLS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP, "icmpv6": IPPROTO_ICMPV6}

# Layers (fwpmu.h): where a connection is authorized, outbound and inbound.
LAYERS = {
    "connect_v4": uuid.UUID("c38d57d1-05a7-4c33-904f-7fbceee60e82"),
    "connect_v6": uuid.UUID("4a72393b-319f-44bc-84c3-ba54dcb3b6b4"),
    "accept_v4": uuid.UUID("e1cd9fe7-f4b5-4273-96c0-592e487b8650"),
    "accept_v6": uuid.UUID("a3b42c97-9f04-4672-b87e-cee9c483257f"),
}
# Condition fields (fwpmu.h). At the ALE layers an ICMP type is the local port.
FIELDS = {
    "remote_address": uuid.UUID("b235ae9a-1d64-49b8-a44c-5ff3d9095045"),
    "remote_port": uuid.UUID("c35a604d-d22b-4e1a-91b4-68f674ee674b"),
    "local_port": uuid.UUID("0c1ba1af-5765-453f-af22-a8f791ac775b"),
    "protocol": uuid.UUID("3971ef2b-623e-4f9a-8cb1-6e79b806b9a7"),
    "local_interface": uuid.UUID("4cd62a49-59c3-4969-b7f3-bda5d32890a4"),
    "flags": uuid.UUID("632ce23b-5167-435c-86d7-e903684aa80c"),
}

# Our objects. The provider is one for all pushgate clients; the sublayer and the
# filters are per tunnel name, their keys derived from it.
KEY_NAMESPACE = uuid.UUID("0e6f3d1c-7a52-4b8e-9d4a-70757368676b")
PROVIDER_KEY = uuid.uuid5(KEY_NAMESPACE, "provider")
SUBLAYER_WEIGHT = 0xFFFF  # evaluated before the other sublayers
MAX_FILTERS = 1024  # a plan never holds more; `remove` stops at the first missing key

# Weights inside our sublayer: the highest matching filter decides.
WEIGHT_ENDPOINT = 15  # the gateway: even port 53 outside the tunnel, if it is there
WEIGHT_TUNNEL_DNS = 14  # DNS through the tunnel
WEIGHT_BLOCK_DNS = 13  # DNS anywhere else
WEIGHT_PERMIT = 12  # loopback, the tunnel, DHCP, neighbour discovery, LAN
WEIGHT_BLOCK_ALL = 0


def sublayer_key(tun_name: str) -> uuid.UUID:
    return uuid.uuid5(KEY_NAMESPACE, f"sublayer/{tun_name}")


def filter_key(tun_name: str, index: int) -> uuid.UUID:
    return uuid.uuid5(KEY_NAMESPACE, f"filter/{tun_name}/{index}")


# -- the plan (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A gateway endpoint the underlay may reach: the auth service (tcp) or the
    dataplane (udp)."""

    address: str
    port: int
    protocol: str  # tcp | udp


@dataclass(frozen=True)
class FirewallPolicy:
    """What the filters of one tunnel must do.

    lockdown: the kill switch: nothing leaves except to `endpoints`, through the
    tunnel, on loopback, DHCP/neighbour discovery and (allow_lan) the LAN.
    block_ipv6: a full tunnel without the kill switch: IPv6 is blocked outside the
    tunnel (the tunnel carries IPv4 only), so it cannot leak in clear.
    block_outside_dns: port 53 only through the tunnel (OpenVPN's block-outside-dns).
    """

    tun_name: str
    tunnel_luid: int | None = None  # None before the adapter exists
    endpoints: tuple[Endpoint, ...] = ()
    lockdown: bool = False
    block_ipv6: bool = False
    block_outside_dns: bool = False
    allow_lan: bool = False

    @property
    def empty(self) -> bool:
        return not (self.lockdown or self.block_ipv6 or self.block_outside_dns)


@dataclass(frozen=True)
class Condition:
    """field: a FIELDS name; value: an address/prefix text, a port or protocol
    number, a LUID, or flags (match 'flags_all_set')."""

    field: str
    value: str | int
    match: str = "equal"


@dataclass(frozen=True)
class FilterSpec:
    name: str  # shown in `netsh wfp show filters`
    layer: str  # a LAYERS name
    action: str  # permit | block
    weight: int
    conditions: tuple[Condition, ...] = ()


def _family_layers(version: int) -> tuple[str, str]:
    return (f"connect_v{version}", f"accept_v{version}")


def plan_filters(policy: FirewallPolicy) -> list[FilterSpec]:
    """The filters for `policy`, in the order they are added."""
    if policy.empty:
        return []
    families = (4, 6) if (policy.lockdown or policy.block_outside_dns) else (6,)
    specs: list[FilterSpec] = []

    def add(name, layers, action, weight, *conditions):
        for layer in layers:
            specs.append(FilterSpec(name, layer, action, weight, tuple(conditions)))

    for endpoint in policy.endpoints:
        version = ipaddress.ip_address(endpoint.address).version
        if version not in families:
            continue
        add(
            f"pushgate: gateway {endpoint.protocol} {endpoint.address} port {endpoint.port}",
            (f"connect_v{version}",),
            "permit",
            WEIGHT_ENDPOINT,
            Condition("remote_address", endpoint.address),
            Condition("protocol", PROTOCOLS[endpoint.protocol]),
            Condition("remote_port", endpoint.port),
        )
    tunnel = (
        (Condition("local_interface", policy.tunnel_luid),)
        if policy.tunnel_luid is not None
        else ()
    )
    for version in families:
        layers = _family_layers(version)
        if policy.block_outside_dns:
            for protocol in ("udp", "tcp"):
                dns = (Condition("protocol", PROTOCOLS[protocol]), Condition("remote_port", 53))
                if tunnel:
                    add(f"pushgate: DNS ({protocol}) through the tunnel",
                        layers[:1], "permit", WEIGHT_TUNNEL_DNS, *tunnel, *dns)  # fmt: skip
                add(f"pushgate: DNS ({protocol}) outside the tunnel",
                    layers[:1], "block", WEIGHT_BLOCK_DNS, *dns)  # fmt: skip
        if not (policy.lockdown or (version == 6 and policy.block_ipv6)):
            continue
        add("pushgate: loopback", layers, "permit", WEIGHT_PERMIT,
            Condition("flags", FWP_CONDITION_FLAG_IS_LOOPBACK, "flags_all_set"))  # fmt: skip
        if tunnel:
            add("pushgate: the tunnel", layers, "permit", WEIGHT_PERMIT, *tunnel)
        if version == 4:
            # DHCP keeps the physical interface's lease (client port 68, server 67).
            add("pushgate: DHCP", layers, "permit", WEIGHT_PERMIT,
                Condition("protocol", IPPROTO_UDP), Condition("local_port", 68),
                Condition("remote_port", 67))  # fmt: skip
        else:
            add("pushgate: DHCPv6", layers, "permit", WEIGHT_PERMIT,
                Condition("protocol", IPPROTO_UDP), Condition("local_port", 546),
                Condition("remote_port", 547))  # fmt: skip
            # Router and neighbour discovery (ICMPv6 133-137): link-scope by design
            # (hop limit 255), they carry no data.
            for icmp_type in range(133, 138):
                add(f"pushgate: neighbour discovery (ICMPv6 {icmp_type})", layers, "permit",
                    WEIGHT_PERMIT, Condition("protocol", IPPROTO_ICMPV6),
                    Condition("local_port", icmp_type))  # fmt: skip
        if policy.allow_lan:
            for prefix in LAN_PREFIXES:
                if ipaddress.ip_network(prefix).version == version:
                    add(f"pushgate: LAN {prefix}", layers, "permit", WEIGHT_PERMIT,
                        Condition("remote_address", prefix))  # fmt: skip
        add(f"pushgate: block IPv{version}", layers, "block", WEIGHT_BLOCK_ALL)
    if len(specs) > MAX_FILTERS:
        raise ValueError(f"{len(specs)} filters: more than {MAX_FILTERS}")
    return specs


# -- structures (Windows x64) -----------------------------------------------------


class FWP_BYTE_BLOB(ctypes.Structure):
    _fields_ = (("size", c_uint32), ("data", POINTER(c_uint8)))


class FWPM_DISPLAY_DATA0(ctypes.Structure):
    _fields_ = (("name", c_void_p), ("description", c_void_p))  # PWSTR


class FWP_V4_ADDR_AND_MASK(ctypes.Structure):
    _fields_ = (("addr", c_uint32), ("mask", c_uint32))  # host byte order


class FWP_V6_ADDR_AND_MASK(ctypes.Structure):
    _fields_ = (("addr", c_uint8 * 16), ("prefixLength", c_uint8))


class _ValueUnion(ctypes.Union):
    _fields_ = (
        ("uint8", c_uint8),
        ("uint16", c_uint16),
        ("uint32", c_uint32),
        ("uint64", POINTER(c_uint64)),
        ("byteArray16", POINTER(c_uint8 * 16)),
        ("v4AddrMask", POINTER(FWP_V4_ADDR_AND_MASK)),
        ("v6AddrMask", POINTER(FWP_V6_ADDR_AND_MASK)),
        ("pointer", c_void_p),
    )


class FWP_VALUE0(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = (("type", c_uint32), ("u", _ValueUnion))


FWP_CONDITION_VALUE0 = FWP_VALUE0  # the same layout; the union has more pointer members


class FWPM_FILTER_CONDITION0(ctypes.Structure):
    _fields_ = (("fieldKey", GUID), ("matchType", c_uint32), ("conditionValue", FWP_VALUE0))


class FWPM_ACTION0(ctypes.Structure):
    _fields_ = (("type", c_uint32), ("filterType", GUID))  # or calloutKey


class _ContextUnion(ctypes.Union):
    _fields_ = (("rawContext", c_uint64), ("providerContextKey", GUID))


class FWPM_FILTER0(ctypes.Structure):
    _anonymous_ = ("context",)
    _fields_ = (
        ("filterKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("providerKey", POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("layerKey", GUID),
        ("subLayerKey", GUID),
        ("weight", FWP_VALUE0),
        ("numFilterConditions", c_uint32),
        ("filterCondition", POINTER(FWPM_FILTER_CONDITION0)),
        ("action", FWPM_ACTION0),
        ("context", _ContextUnion),
        ("reserved", POINTER(GUID)),
        ("filterId", c_uint64),
        ("effectiveWeight", FWP_VALUE0),
    )


class FWPM_SUBLAYER0(ctypes.Structure):
    _fields_ = (
        ("subLayerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("providerKey", POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("weight", c_uint16),
    )


class FWPM_PROVIDER0(ctypes.Structure):
    _fields_ = (
        ("providerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("providerData", FWP_BYTE_BLOB),
        ("serviceName", c_void_p),
    )


class FWPM_SESSION0(ctypes.Structure):
    _fields_ = (
        ("sessionKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("txnWaitTimeoutInMSec", c_uint32),
        ("processId", c_uint32),
        ("sid", c_void_p),
        ("username", c_void_p),
        ("kernelMode", c_uint32),  # BOOL
    )


# -- building the structures --------------------------------------------------------


class _Keeper(list):
    """Holds every buffer a call's structures point into until the call returns."""

    def keep(self, item):
        self.append(item)
        return item


def _display(keeper: _Keeper, name: str, description: str = "") -> FWPM_DISPLAY_DATA0:
    data = FWPM_DISPLAY_DATA0()
    data.name = ctypes.addressof(keeper.keep(wide(name)))
    if description:
        data.description = ctypes.addressof(keeper.keep(wide(description)))
    return data


def _condition_value(keeper: _Keeper, condition: Condition, value: FWP_VALUE0) -> None:
    field = condition.field
    if field == "remote_address":
        network = ipaddress.ip_network(condition.value)
        if network.version == 4:
            mask = keeper.keep(FWP_V4_ADDR_AND_MASK())
            mask.addr = int(network.network_address)
            mask.mask = int(network.netmask)
            value.type, value.v4AddrMask = FWP_V4_ADDR_MASK, ctypes.pointer(mask)
        else:
            mask6 = keeper.keep(FWP_V6_ADDR_AND_MASK())
            mask6.addr[:] = list(network.network_address.packed)
            mask6.prefixLength = network.prefixlen
            value.type, value.v6AddrMask = FWP_V6_ADDR_MASK, ctypes.pointer(mask6)
    elif field in ("remote_port", "local_port"):
        value.type, value.uint16 = FWP_UINT16, int(condition.value)
    elif field == "protocol":
        value.type, value.uint8 = FWP_UINT8, int(condition.value)
    elif field == "local_interface":
        luid = keeper.keep(c_uint64(int(condition.value)))
        value.type, value.uint64 = FWP_UINT64, ctypes.pointer(luid)
    elif field == "flags":
        value.type, value.uint32 = FWP_UINT32, int(condition.value)
    else:
        raise ValueError(f"unknown condition field {field!r}")


MATCH_TYPES = {"equal": FWP_MATCH_EQUAL, "flags_all_set": FWP_MATCH_FLAGS_ALL_SET}


def build_filter(
    keeper: _Keeper, spec: FilterSpec, key: uuid.UUID, sublayer: uuid.UUID
) -> FWPM_FILTER0:
    """The FWPM_FILTER0 for `spec` (its pointers kept alive by `keeper`)."""
    row = keeper.keep(FWPM_FILTER0())
    row.filterKey = GUID.from_uuid(key)
    row.displayData = _display(keeper, spec.name)
    row.flags = FWPM_FILTER_FLAG_PERSISTENT
    row.providerKey = ctypes.pointer(keeper.keep(GUID.from_uuid(PROVIDER_KEY)))
    row.layerKey = GUID.from_uuid(LAYERS[spec.layer])
    row.subLayerKey = GUID.from_uuid(sublayer)
    row.weight.type, row.weight.uint8 = FWP_UINT8, spec.weight
    if spec.conditions:
        array = keeper.keep((FWPM_FILTER_CONDITION0 * len(spec.conditions))())
        for item, condition in zip(array, spec.conditions, strict=True):
            item.fieldKey = GUID.from_uuid(FIELDS[condition.field])
            item.matchType = MATCH_TYPES[condition.match]
            _condition_value(keeper, condition, item.conditionValue)
        row.numFilterConditions = len(spec.conditions)
        row.filterCondition = ctypes.cast(array, POINTER(FWPM_FILTER_CONDITION0))
    row.action.type = FWP_ACTION_PERMIT if spec.action == "permit" else FWP_ACTION_BLOCK
    return row


# -- the executor -------------------------------------------------------------------


class WfpError(OSError):
    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed: error {code:#010x}")
        self.winerror_code = code


class WfpFirewall:
    """fwpuclnt.dll's calls for our provider, sublayer and filters."""

    def __init__(self, library=None) -> None:
        if library is None:
            library = ctypes.WinDLL("fwpuclnt.dll")
        self._lib = library
        handle = POINTER(c_void_p)
        declarations = {
            "FwpmEngineOpen0": (c_void_p, c_uint32, c_void_p, POINTER(FWPM_SESSION0), handle),
            "FwpmEngineClose0": (c_void_p,),
            "FwpmTransactionBegin0": (c_void_p, c_uint32),
            "FwpmTransactionCommit0": (c_void_p,),
            "FwpmTransactionAbort0": (c_void_p,),
            "FwpmProviderAdd0": (c_void_p, POINTER(FWPM_PROVIDER0), c_void_p),
            "FwpmProviderDeleteByKey0": (c_void_p, POINTER(GUID)),
            "FwpmSubLayerAdd0": (c_void_p, POINTER(FWPM_SUBLAYER0), c_void_p),
            "FwpmSubLayerDeleteByKey0": (c_void_p, POINTER(GUID)),
            "FwpmFilterAdd0": (c_void_p, POINTER(FWPM_FILTER0), c_void_p, POINTER(c_uint64)),
            "FwpmFilterDeleteByKey0": (c_void_p, POINTER(GUID)),
        }
        for name, argtypes in declarations.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = c_uint32

    def _check(self, call: str, code: int, *tolerated: int) -> int:
        if code not in (ERROR_SUCCESS, *tolerated):
            raise WfpError(call, code)
        return code

    def _open(self) -> int:
        keeper = _Keeper()
        session = FWPM_SESSION0()  # not dynamic: our objects outlive the handle
        session.displayData = _display(keeper, "pushgate-client")
        session.txnWaitTimeoutInMSec = INFINITE
        engine = c_void_p()
        self._check(
            "FwpmEngineOpen0",
            self._lib.FwpmEngineOpen0(
                None, RPC_C_AUTHN_WINNT, None, ctypes.byref(session), ctypes.byref(engine)
            ),
        )
        return engine.value

    def _transaction(self, work) -> None:
        engine = self._open()
        try:
            self._check("FwpmTransactionBegin0", self._lib.FwpmTransactionBegin0(engine, 0))
            try:
                work(engine)
            except BaseException:
                self._lib.FwpmTransactionAbort0(engine)
                raise
            self._check("FwpmTransactionCommit0", self._lib.FwpmTransactionCommit0(engine))
        finally:
            self._lib.FwpmEngineClose0(engine)

    def _delete_filters(self, engine: int, tun_name: str) -> int:
        """Delete our filters for `tun_name` (keys 0, 1, ... up to the first missing).

        A call that fails inside a transaction does not end it (Microsoft's
        "Installing a Provider" sample ignores FWP_E_ALREADY_EXISTS the same way);
        tests/test_windows_live.py checks this on a real machine."""
        for index in range(MAX_FILTERS):
            key = GUID.from_uuid(filter_key(tun_name, index))
            code = self._lib.FwpmFilterDeleteByKey0(engine, ctypes.byref(key))
            if code == FWP_E_FILTER_NOT_FOUND:
                return index
            self._check("FwpmFilterDeleteByKey0", code)
        return MAX_FILTERS

    def _add_base_objects(self, engine: int, tun_name: str, keeper: _Keeper) -> None:
        provider = FWPM_PROVIDER0()
        provider.providerKey = GUID.from_uuid(PROVIDER_KEY)
        provider.displayData = _display(keeper, "pushgate", "pushgate VPN client")
        provider.flags = FWPM_PROVIDER_FLAG_PERSISTENT
        code = self._lib.FwpmProviderAdd0(engine, ctypes.byref(provider), None)
        self._check("FwpmProviderAdd0", code, FWP_E_ALREADY_EXISTS)
        sublayer = FWPM_SUBLAYER0()
        sublayer.subLayerKey = GUID.from_uuid(sublayer_key(tun_name))
        sublayer.displayData = _display(keeper, f"pushgate {tun_name}", "kill switch and DNS")
        sublayer.flags = FWPM_SUBLAYER_FLAG_PERSISTENT
        sublayer.providerKey = ctypes.pointer(keeper.keep(GUID.from_uuid(PROVIDER_KEY)))
        sublayer.weight = SUBLAYER_WEIGHT
        code = self._lib.FwpmSubLayerAdd0(engine, ctypes.byref(sublayer), None)
        self._check("FwpmSubLayerAdd0", code, FWP_E_ALREADY_EXISTS)

    def apply(self, policy: FirewallPolicy) -> int:
        """Replace the filters of `policy.tun_name` with the plan for `policy`, in one
        transaction; returns how many filters are in place."""
        specs = plan_filters(policy)
        if not specs:
            self.remove(policy.tun_name)
            return 0
        return self.install(policy.tun_name, specs)

    def install(self, name: str, specs: list[FilterSpec]) -> int:
        """Replace the filters of tunnel `name` with `specs`, in one transaction."""
        if len(specs) > MAX_FILTERS:
            raise ValueError(f"{len(specs)} filters: more than {MAX_FILTERS}")

        def work(engine: int) -> None:
            keeper = _Keeper()
            self._add_base_objects(engine, name, keeper)
            self._delete_filters(engine, name)
            sublayer = sublayer_key(name)
            for index, spec in enumerate(specs):
                row = build_filter(keeper, spec, filter_key(name, index), sublayer)
                code = self._lib.FwpmFilterAdd0(engine, ctypes.byref(row), None, None)
                self._check("FwpmFilterAdd0", code)

        self._transaction(work)
        return len(specs)

    def remove(self, tun_name: str) -> int:
        """Delete the filters and sublayer of `tun_name` (and the provider when no
        other tunnel uses it); what is already gone is not an error. Returns how
        many filters were deleted."""
        deleted = []

        def work(engine: int) -> None:
            deleted.append(self._delete_filters(engine, tun_name))
            key = GUID.from_uuid(sublayer_key(tun_name))
            code = self._lib.FwpmSubLayerDeleteByKey0(engine, ctypes.byref(key))
            self._check("FwpmSubLayerDeleteByKey0", code, FWP_E_SUBLAYER_NOT_FOUND)
            provider = GUID.from_uuid(PROVIDER_KEY)
            code = self._lib.FwpmProviderDeleteByKey0(engine, ctypes.byref(provider))
            # In use: another tunnel's sublayer still refers to it.
            self._check("FwpmProviderDeleteByKey0", code, FWP_E_PROVIDER_NOT_FOUND, FWP_E_IN_USE)

        self._transaction(work)
        return deleted[0]
