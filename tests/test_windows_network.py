"""The Windows client's network configuration, on Linux: the pure plan
(client/winnet.py), the IP Helper structures' Windows x64 layout, and the
executor (client/iphlpapi.py, client/windows_host.py) carrying a plan out and
undoing it against an in-memory IP Helper that keeps real tables.
"""

import ctypes
import ipaddress
import json
import os
import uuid
from types import SimpleNamespace

import pytest

from client.auth import ClientError
from client.iphlpapi import (
    AF_INET,
    DNS_INTERFACE_SETTINGS,
    ERROR_NOT_FOUND,
    ERROR_OBJECT_ALREADY_EXISTS,
    IP_ADDRESS_PREFIX,
    MIB_IPFORWARD_ROW2,
    MIB_IPINTERFACE_ROW,
    MIB_UNICASTIPADDRESS_ROW,
    SOCKADDR_IN,
    SOCKADDR_IN6,
    SOCKADDR_INET,
    IpHelper,
    sockaddr,
    sockaddr_text,
)
from client.status import ClientStatus, read_status, write_status
from client.windows_host import WindowsHost
from client.winnet import (
    ON_LINK,
    TUNNEL_INTERFACE_METRIC,
    Step,
    UnderlayPath,
    address,
    dns,
    interface_settings,
    plan_windows_network,
    route,
)
from client.wintun import GUID, adapter_guid, read_wide
from tests.fakes.fake_registry import FakeRegistry
from tests.fakes.fake_wfp import FakeWfp

TUN_LUID = 0x0006_0000_0100_0000
TUN_GUID = str(adapter_guid("pgc0"))  # WinTun gives the adapter the GUID we ask for
WIFI_LUID = 0x0047_0000_0200_0000
UNDERLAY = UnderlayPath(luid=WIFI_LUID, next_hop="198.18.5.1", mtu=1500)


# Windows x64 sizes from netioapi.h / ws2ipdef.h / ifdef.h / guiddef.h.
@pytest.mark.parametrize(
    ("structure", "size"),
    [
        (ctypes.c_uint64, 8),  # NET_LUID
        (GUID, 16),
        (SOCKADDR_IN, 16),
        (SOCKADDR_IN6, 28),
        (SOCKADDR_INET, 28),
        (IP_ADDRESS_PREFIX, 32),
        (MIB_UNICASTIPADDRESS_ROW, 80),
        (MIB_IPFORWARD_ROW2, 104),
        (MIB_IPINTERFACE_ROW, 168),
        (DNS_INTERFACE_SETTINGS, 64),
    ],
)
def test_structures_have_their_windows_x64_size(structure, size):
    assert ctypes.sizeof(structure) == size


@pytest.mark.parametrize(
    ("structure", "field", "offset"),
    [
        # The fields the executor writes or reads, where Windows x64 puts them.
        (MIB_UNICASTIPADDRESS_ROW, "InterfaceLuid", 32),
        (MIB_UNICASTIPADDRESS_ROW, "OnLinkPrefixLength", 60),
        (MIB_UNICASTIPADDRESS_ROW, "CreationTimeStamp", 72),
        (MIB_IPFORWARD_ROW2, "InterfaceLuid", 0),
        (MIB_IPFORWARD_ROW2, "DestinationPrefix", 12),
        (MIB_IPFORWARD_ROW2, "NextHop", 44),
        (MIB_IPFORWARD_ROW2, "Metric", 84),
        (MIB_IPFORWARD_ROW2, "Protocol", 88),
        (MIB_IPINTERFACE_ROW, "InterfaceLuid", 8),
        (MIB_IPINTERFACE_ROW, "UseAutomaticMetric", 44),
        (MIB_IPINTERFACE_ROW, "ZoneIndices", 80),
        (MIB_IPINTERFACE_ROW, "SitePrefixLength", 144),
        (MIB_IPINTERFACE_ROW, "Metric", 148),
        (MIB_IPINTERFACE_ROW, "NlMtu", 152),
        (MIB_IPINTERFACE_ROW, "DisableDefaultRoutes", 166),
        (DNS_INTERFACE_SETTINGS, "Flags", 8),
        (DNS_INTERFACE_SETTINGS, "NameServer", 24),
        (IP_ADDRESS_PREFIX, "PrefixLength", 28),
    ],
)
def test_fields_sit_at_their_windows_x64_offsets(structure, field, offset):
    assert getattr(structure, field).offset == offset


def test_sockaddr_round_trips_both_families():
    v4 = sockaddr("198.18.5.1")
    assert v4.si_family == AF_INET and bytes(v4)[4:8] == bytes([198, 18, 5, 1])
    assert sockaddr_text(v4) == "198.18.5.1"
    assert sockaddr_text(sockaddr("2001:db8::1")) == "2001:db8::1"


def plan(routes, dns_servers=(), gateway="198.18.0.1", mtu=1420, underlay=UNDERLAY):
    return plan_windows_network(
        tunnel_luid=TUN_LUID,
        tunnel_guid=TUN_GUID,
        tunnel_address="198.19.0.2/24",
        mtu=mtu,
        routes=list(routes),
        dns_servers=list(dns_servers),
        gateway_ip=gateway,
        underlay=underlay,
    )


def test_full_tunnel_plan_keeps_the_gateway_outside():
    full = plan(["0.0.0.0/0"], ["198.18.0.53", "198.18.0.54"])
    assert full.apply == (
        interface_settings(TUN_LUID, 1420, TUNNEL_INTERFACE_METRIC),
        address(TUN_LUID, "198.19.0.2/24"),
        route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1"),
        route(TUN_LUID, "0.0.0.0/1"),
        route(TUN_LUID, "128.0.0.0/1"),
        dns(TUN_LUID, TUN_GUID, ["198.18.0.53", "198.18.0.54"]),
    )
    assert full.undo == (
        dns(TUN_LUID, TUN_GUID, ["198.18.0.53", "198.18.0.54"]),
        route(TUN_LUID, "128.0.0.0/1"),
        route(TUN_LUID, "0.0.0.0/1"),
        route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1"),
        address(TUN_LUID, "198.19.0.2/24"),
    )


def test_split_tunnel_plan_routes_only_what_is_pushed():
    split = plan(["198.19.0.0/24", "198.18.100.0/24", "2001:db8::/32"], mtu=1380)
    assert split.apply == (
        interface_settings(TUN_LUID, 1380, TUNNEL_INTERFACE_METRIC),
        address(TUN_LUID, "198.19.0.2/24"),
        route(TUN_LUID, "198.18.100.0/24"),  # the on-link /24 comes with the address
    )
    assert split.undo == (route(TUN_LUID, "198.18.100.0/24"), address(TUN_LUID, "198.19.0.2/24"))


def test_a_full_tunnel_keeps_a_clusters_other_gateways_outside_too():
    """Every gateway a move may go to keeps its /32 through its own underlay path,
    before the tunnel's routes (client/windows_host.py passes lock_down's endpoints)."""
    wired = UnderlayPath(WIFI_LUID + 1, "198.18.6.1", 1500)
    full = plan_windows_network(
        tunnel_luid=TUN_LUID,
        tunnel_guid=TUN_GUID,
        tunnel_address="198.19.0.2/24",
        mtu=1420,
        routes=["0.0.0.0/0"],
        dns_servers=[],
        gateway_ip="198.18.0.1",
        underlay=UNDERLAY,
        other_endpoints=(("198.18.0.3", wired), ("198.18.0.1", UNDERLAY)),
    )
    assert full.apply[2:5] == (
        route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1"),
        route(WIFI_LUID + 1, "198.18.0.3/32", "198.18.6.1"),
        route(TUN_LUID, "0.0.0.0/1"),
    )
    assert route(WIFI_LUID + 1, "198.18.0.3/32", "198.18.6.1") in full.undo


def test_only_ipv4_dns_servers_are_set():
    mixed = plan(["198.18.100.0/24"], ["2001:db8::53", "198.18.0.53"])
    assert mixed.apply[-1] == dns(TUN_LUID, TUN_GUID, ["198.18.0.53"])
    only_v6 = plan(["198.18.100.0/24"], ["2001:db8::53"])
    assert all(step.kind != "dns" for step in only_v6.apply + only_v6.undo)


def test_split_tunnel_covering_the_gateway_still_keeps_it_outside():
    covering = plan(["198.18.0.0/16"], underlay=UnderlayPath(WIFI_LUID, ON_LINK, 1500))
    assert route(WIFI_LUID, "198.18.0.1/32", ON_LINK) in covering.apply
    # The exception comes before the route that would capture the gateway.
    index = covering.apply.index
    assert index(route(WIFI_LUID, "198.18.0.1/32")) < index(route(TUN_LUID, "198.18.0.0/16"))


@pytest.mark.parametrize(
    ("underlay_mtu", "pushed", "gateway", "expected"),
    [
        (1500, 1420, "198.18.0.1", 1420),  # pushed fits: kept
        (1400, 1420, "198.18.0.1", 1340),  # PPPoE-ish path: 1400 - 60
        (1500, 1500, "198.18.0.1", 1440),  # pushed too big for the path
        (1500, 1500, "2001:db8::1", 1420),  # IPv6 underlay: 80 bytes of overhead
    ],
)
def test_tunnel_mtu_fits_inside_the_path(underlay_mtu, pushed, gateway, expected):
    underlay = UnderlayPath(WIFI_LUID, ON_LINK, underlay_mtu)
    assert plan(["198.18.100.0/24"], gateway=gateway, mtu=pushed, underlay=underlay).mtu == expected


def test_a_path_too_small_for_a_tunnel_is_refused():
    with pytest.raises(ValueError, match="MTU 600"):
        plan(["0.0.0.0/0"], underlay=UnderlayPath(WIFI_LUID, ON_LINK, 600))


def test_steps_survive_the_status_file(tmp_path):
    steps = plan(["0.0.0.0/0"], ["198.18.0.53"]).undo
    path = tmp_path / "client-pgc0.json"
    write_status(str(path), ClientStatus(1, "up", "pgc0", "x", undo=[s.to_list() for s in steps]))
    assert tuple(Step.from_list(items) for items in read_status(str(path)).undo) == steps
    with pytest.raises(ValueError):
        Step.from_list(["format-disk", "1"])


class FakeIpHelper:
    """iphlpapi.dll's tables in memory, answering through the same ctypes rows.

    Rows that skipped their Initialize* call are refused, as Windows refuses rows
    with zero lifetimes; duplicates and missing entries give Windows' codes.
    """

    def __init__(self, interface_lag_calls: int = 0) -> None:
        self.interfaces = {
            WIFI_LUID: {"mtu": 1500, "metric": 35, "auto": 1},
            TUN_LUID: {"mtu": 65535, "metric": 25, "auto": 1},
        }
        self.lag = interface_lag_calls  # the new adapter's interface shows up late
        self.addresses: set[tuple[int, str]] = set()
        self.routes: set[tuple[int, str, str]] = set()
        self.dns: dict[str, str] = {}
        self.fail_route: tuple[str, int] | None = None
        # Routes Windows derives from an address itself (MIB_IPPROTO_LOCAL).
        self.local_routes: set[tuple[int, str, str]] = set()
        self._tables: dict[int, ctypes.Structure] = {}  # handed out, not yet freed

    def library(self) -> SimpleNamespace:
        """The exports as plain functions, which take ctypes' argtypes/restype."""

        def export(method):
            return lambda *args: method(*args)

        names = [name for name in dir(self) if name[0].isupper()]
        return SimpleNamespace(**{name: export(getattr(self, name)) for name in names})

    # Initialize* set what Windows sets: infinite lifetimes, everything else zero.
    @staticmethod
    def InitializeUnicastIpAddressEntry(row):
        ctypes.memset(ctypes.addressof(row._obj), 0, ctypes.sizeof(row._obj))
        row._obj.ValidLifetime = row._obj.PreferredLifetime = 0xFFFFFFFF

    @staticmethod
    def InitializeIpForwardEntry(row):
        ctypes.memset(ctypes.addressof(row._obj), 0, ctypes.sizeof(row._obj))
        row._obj.ValidLifetime = row._obj.PreferredLifetime = 0xFFFFFFFF

    @staticmethod
    def InitializeIpInterfaceEntry(row):
        ctypes.memset(ctypes.addressof(row._obj), 0, ctypes.sizeof(row._obj))

    def GetBestRoute2(self, luid, index, source, destination, options, best, best_source):
        gateway = ipaddress.ip_address(sockaddr_text(destination._obj))
        assert luid is None and index == 0 and source is None
        assert gateway in ipaddress.ip_network("198.18.0.0/15")
        # The longest prefix wins; the Wi-Fi's default route is always there.
        routes = [(WIFI_LUID, "0.0.0.0/0", "198.18.5.1"), *sorted(self.routes)]
        matching = [r for r in routes if gateway in ipaddress.ip_network(r[1])]
        found, _, hop = max(matching, key=lambda r: ipaddress.ip_network(r[1]).prefixlen)
        best._obj.InterfaceLuid = found
        best._obj.NextHop = sockaddr(hop)
        return 0

    def GetIpInterfaceEntry(self, row):
        row = row._obj
        if row.InterfaceLuid == TUN_LUID and self.lag > 0:
            self.lag -= 1
            return ERROR_NOT_FOUND
        entry = self.interfaces.get(row.InterfaceLuid)
        if entry is None or row.Family != AF_INET:
            return ERROR_NOT_FOUND
        row.NlMtu, row.Metric, row.UseAutomaticMetric = entry["mtu"], entry["metric"], entry["auto"]
        row.SitePrefixLength = 24  # what Windows returns; Set refuses it for IPv4
        return 0

    def SetIpInterfaceEntry(self, row):
        row = row._obj
        if row.SitePrefixLength != 0:
            return 87  # ERROR_INVALID_PARAMETER, as Windows answers
        self.interfaces[row.InterfaceLuid] = {
            "mtu": row.NlMtu,
            "metric": row.Metric,
            "auto": row.UseAutomaticMetric,
        }
        return 0

    @staticmethod
    def _address(row):
        return row.InterfaceLuid, f"{sockaddr_text(row.Address)}/{row.OnLinkPrefixLength}"

    def CreateUnicastIpAddressEntry(self, row):
        if row._obj.ValidLifetime != 0xFFFFFFFF:
            return 87
        key = self._address(row._obj)
        if key in self.addresses:
            return ERROR_OBJECT_ALREADY_EXISTS
        self.addresses.add(key)
        return 0

    def DeleteUnicastIpAddressEntry(self, row):
        key = self._address(row._obj)
        if key not in self.addresses:
            return ERROR_NOT_FOUND
        self.addresses.remove(key)
        return 0

    @staticmethod
    def _route(row):
        prefix = row.DestinationPrefix
        return (
            row.InterfaceLuid,
            f"{sockaddr_text(prefix.Prefix)}/{prefix.PrefixLength}",
            sockaddr_text(row.NextHop),
        )

    def CreateIpForwardEntry2(self, row):
        if row._obj.ValidLifetime != 0xFFFFFFFF:
            return 87
        key = self._route(row._obj)
        if self.fail_route and key[1] == self.fail_route[0]:
            return self.fail_route[1]
        if key in self.routes:
            return ERROR_OBJECT_ALREADY_EXISTS
        self.routes.add(key)
        return 0

    def DeleteIpForwardEntry2(self, row):
        key = self._route(row._obj)
        if key not in self.routes:
            return ERROR_NOT_FOUND
        self.routes.remove(key)
        return 0

    def SetInterfaceDnsSettings(self, guid, settings):
        settings = settings._obj
        assert settings.Version == 1 and settings.Flags == 0x2
        self.dns[str(guid.to_uuid())] = read_wide(settings.NameServer)
        return 0

    def ConvertInterfaceGuidToLuid(self, guid, luid):
        if str(guid._obj.to_uuid()) != TUN_GUID or TUN_LUID not in self.interfaces:
            return ERROR_NOT_FOUND
        luid._obj.value = TUN_LUID
        return 0

    def _hand_out(self, row_type, rows, table):
        class Table(ctypes.Structure):
            _fields_ = (("NumEntries", ctypes.c_uint32), ("Table", row_type * len(rows)))

        value = Table()
        value.NumEntries = len(rows)
        for index, row in enumerate(rows):
            value.Table[index] = row
        assert Table.Table.offset == 8  # where iphlpapi puts the first row
        self._tables[ctypes.addressof(value)] = value
        table._obj.value = ctypes.addressof(value)
        return 0

    def GetIpForwardTable2(self, family, table):
        assert family == 0  # AF_UNSPEC: both families
        rows = []
        for protocol, routes in ((3, self.routes), (2, self.local_routes)):
            for luid, prefix, hop in sorted(routes):
                row = MIB_IPFORWARD_ROW2()
                network = ipaddress.ip_network(prefix)
                row.InterfaceLuid = luid
                row.DestinationPrefix.Prefix = sockaddr(str(network.network_address))
                row.DestinationPrefix.PrefixLength = network.prefixlen
                row.NextHop = sockaddr(hop)
                row.Protocol = protocol
                rows.append(row)
        return self._hand_out(MIB_IPFORWARD_ROW2, rows, table)

    def GetUnicastIpAddressTable(self, family, table):
        assert family == AF_INET
        rows = []
        for luid, text in sorted(self.addresses):
            row = MIB_UNICASTIPADDRESS_ROW()
            interface = ipaddress.ip_interface(text)
            row.Address = sockaddr(str(interface.ip))
            row.InterfaceLuid = luid
            row.OnLinkPrefixLength = interface.network.prefixlen
            rows.append(row)
        return self._hand_out(MIB_UNICASTIPADDRESS_ROW, rows, table)

    def FreeMibTable(self, table):
        del self._tables[table.value]

    def ConvertInterfaceLuidToGuid(self, luid, guid):
        if luid._obj.value != TUN_LUID:
            return ERROR_NOT_FOUND
        adapter = GUID.from_uuid(uuid.UUID(TUN_GUID))
        ctypes.memmove(ctypes.addressof(guid._obj), ctypes.addressof(adapter), 16)
        return 0


def windows_host(fake: FakeIpHelper, registry=None, firewall=None) -> WindowsHost:
    """A WindowsHost on fakes; the registry and WFP are the machine's, shared by
    every process (pass the same ones to model a later run)."""
    from client.wfp import WfpFirewall

    host = WindowsHost()
    host._helper = IpHelper(fake.library())
    host._registry = registry if registry is not None else FakeRegistry()
    host._firewall = WfpFirewall((firewall if firewall is not None else FakeWfp()).library())
    return host


def session(routes, dns_servers=(), match_domains=()):
    return SimpleNamespace(
        endpoint=("198.18.0.1", 51820),
        tunnel_address="198.19.0.2/24",
        mtu=1420,
        routes=list(routes),
        dns_servers=list(dns_servers),
        match_domains=list(match_domains),
    )


TUN = SimpleNamespace(name="pgc0", luid=TUN_LUID)


def test_the_executor_applies_a_full_tunnel_and_undoes_it_all():
    fake, registry, wfp = FakeIpHelper(interface_lag_calls=3), FakeRegistry(), FakeWfp()
    host = windows_host(fake, registry, wfp)
    undo = host.configure(TUN, session(["0.0.0.0/0"], ["198.18.0.53", "198.18.0.54"]))
    assert undo == [["windows", "pgc0"]]  # a reference: the steps stay in HKLM
    assert fake.interfaces[TUN_LUID] == {"mtu": 1420, "metric": TUNNEL_INTERFACE_METRIC, "auto": 0}
    assert fake.addresses == {(TUN_LUID, "198.19.0.2/24")}
    assert fake.routes == {
        (WIFI_LUID, "198.18.0.1/32", "198.18.5.1"),
        (TUN_LUID, "0.0.0.0/1", "0.0.0.0"),
        (TUN_LUID, "128.0.0.0/1", "0.0.0.0"),
    }
    assert fake.dns == {TUN_GUID: "198.18.0.53,198.18.0.54"}

    # A crash: a new process finds the steps in the administrators-only record.
    recovered = json.loads(json.dumps(undo))
    windows_host(fake, registry, wfp).unconfigure(recovered)
    assert fake.addresses == set() and fake.routes == set()
    assert fake.dns == {TUN_GUID: ""}
    assert registry.read(r"SOFTWARE\pushgate\clients\pgc0") is None
    windows_host(fake, registry, wfp).unconfigure(recovered)  # twice is harmless
    # The kill switch outlives the configuration: only `release` removes it.
    assert wfp.state.filters
    windows_host(fake, registry, wfp).release("pgc0")
    assert wfp.state.filters == {}


def test_the_adapters_part_is_recomputed_from_the_adapter():
    fake, registry = FakeIpHelper(), FakeRegistry()
    host = windows_host(fake, registry)
    undo = host.configure(TUN, session(["0.0.0.0/0", "198.18.200.0/24"], ["198.18.0.53"]))
    # Windows' own route for the address, and a route someone added on our adapter
    # after we recorded our steps: the first stays, the second goes.
    fake.local_routes.add((TUN_LUID, "198.19.0.0/24", "0.0.0.0"))
    fake.routes.add((TUN_LUID, "198.18.201.0/24", "0.0.0.0"))
    registry.write(r"SOFTWARE\pushgate\clients\pgc0", {"Undo": (1, "[]")})  # record lost
    windows_host(fake, registry).unconfigure(undo)
    assert fake.routes == {(WIFI_LUID, "198.18.0.1/32", "198.18.5.1")}  # only in the record
    assert fake.addresses == set() and fake.dns == {TUN_GUID: ""}
    assert fake.local_routes == {(TUN_LUID, "198.19.0.0/24", "0.0.0.0")}
    assert fake._tables == {}  # every table freed


def test_undo_steps_in_a_forged_status_file_are_never_run():
    fake = FakeIpHelper()
    fake.routes.add((WIFI_LUID, "198.18.7.0/24", "198.18.5.1"))  # the machine's own
    fake.addresses.add((WIFI_LUID, "198.18.5.20/24"))
    forged = [
        route(WIFI_LUID, "198.18.7.0/24", "198.18.5.1").to_list(),
        address(WIFI_LUID, "198.18.5.20/24").to_list(),
        ["windows", "..\\..\\Run"],  # a registry path, not a tunnel name
        ["windows", "pgc0"],  # ours, but nothing recorded for it: nothing to undo
        "windows",
        7,
    ]
    windows_host(fake).unconfigure(forged)
    assert (WIFI_LUID, "198.18.7.0/24", "198.18.5.1") in fake.routes
    assert (WIFI_LUID, "198.18.5.20/24") in fake.addresses


def test_a_failed_step_undoes_the_steps_before_it():
    fake = FakeIpHelper()
    fake.fail_route = ("128.0.0.0/1", 5)  # ERROR_ACCESS_DENIED
    with pytest.raises(ClientError, match=r"network setup failed.*error 5"):
        windows_host(fake).configure(TUN, session(["0.0.0.0/0"]))
    assert fake.routes == set()  # the gateway exception did not stay behind
    assert fake.addresses == set()


def test_reapplying_over_a_stale_configuration_is_not_an_error():
    fake = FakeIpHelper()
    host = windows_host(fake)
    host.configure(TUN, session(["198.18.100.0/24"]))
    undo = host.configure(TUN, session(["198.18.100.0/24"]))  # a crash left it all
    host.unconfigure(undo)
    assert fake.routes == set() and fake.addresses == set()


def test_status_writes_wait_out_a_reader_holding_the_file(tmp_path, monkeypatch):
    # Windows refuses to replace a file another process has open: PermissionError.
    real_replace, refusals = os.replace, []

    def replace_refused_twice(source, target):
        if len(refusals) < 2:
            refusals.append(target)
            raise PermissionError(13, "in use by another process")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_refused_twice)
    path = str(tmp_path / "client-pgc0.json")
    write_status(path, ClientStatus(1, "up", "pgc0", "x"))
    assert len(refusals) == 2 and read_status(path).state == "up"
