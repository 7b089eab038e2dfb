"""Live network changes on the Windows client (issue 18 item 5), on any OS
against fakes: the pure difference (client/winnet.py plan_windows_update) and
`WindowsHost.update_network` carrying it out against the in-memory IP Helper
(tests/test_windows_network.py), WFP (tests/fakes/fake_wfp.py) and registry
(tests/fakes/fake_registry.py, where the NRPT rules live).

Verified here: new routes go in before old ones go; a change to a full tunnel
puts the filters (kill switch by default, IPv6 and DNS outside the tunnel
blocked) in place before its first route and the gateway's /32 before the /1
halves; a change to a split tunnel relaxes the filters only after the full
tunnel's routes are gone; the adapter's DNS servers and the NRPT rules are
replaced (in place, never a moment without the tunnel's rule); a failure leaves
an undo record covering both networks and the stricter filters; a crash after a
change is cleaned up from the record. Not verified without Windows: that IP
Helper, WFP and the DNS client take these calls as the fakes do while traffic
flows (tests/test_windows_live.py does not cover live changes).
"""

import pytest

from client.auth import ClientError, ClientSession
from client.host import NetworkChangeFailed
from client.nrpt import rule_key
from client.winnet import Step, dns, plan_windows_update, route
from client.winregistry import REG_MULTI_SZ
from tests.test_windows_failclosed import AUTH, Machine
from tests.test_windows_network import TUN, TUN_GUID, TUN_LUID, UNDERLAY, WIFI_LUID

GATEWAY_32 = (WIFI_LUID, "198.18.0.1/32", "198.18.5.1")
HALVES = {(TUN_LUID, "0.0.0.0/1", "0.0.0.0"), (TUN_LUID, "128.0.0.0/1", "0.0.0.0")}
RECORD = r"SOFTWARE\pushgate\clients\pgc0"


def client_session(routes, dns_servers=(), match_domains=()) -> ClientSession:
    return ClientSession(
        session_id=1,
        token="not-a-secret",
        cipher=None,
        keys=None,
        tunnel_address="198.19.0.2/24",
        gateway_tunnel_address="198.19.0.1",
        routes=list(routes),
        dns_servers=list(dns_servers),
        mtu=1420,
        keepalive_seconds=25.0,
        key_lifetime_seconds=600.0,
        endpoint=("198.18.0.1", 51820),
        expires_at=0.0,
        match_domains=list(match_domains),
    )


SPLIT = client_session(["198.18.100.0/24"], ["198.18.0.53"], ["eng.example"])
FULL = client_session(["0.0.0.0/0"], ["198.18.0.53"])


def update(old_routes, new_routes, old_dns=(), new_dns=(), underlay=UNDERLAY):
    return plan_windows_update(
        tunnel_luid=TUN_LUID,
        tunnel_guid=TUN_GUID,
        tunnel_address="198.19.0.2/24",
        old_routes=list(old_routes),
        old_dns=list(old_dns),
        new_routes=list(new_routes),
        new_dns=list(new_dns),
        gateway_ip="198.18.0.1",
        underlay=underlay,
    )


# -- the pure difference -------------------------------------------------------------


def test_a_change_to_a_full_tunnel_adds_the_gateways_route_first():
    change = update(["198.18.100.0/24"], ["0.0.0.0/0"], ["198.18.0.53"], ["198.18.0.54"])
    assert change.add == (
        route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1"),
        route(TUN_LUID, "0.0.0.0/1"),
        route(TUN_LUID, "128.0.0.0/1"),
        dns(TUN_LUID, TUN_GUID, ["198.18.0.54"]),
    )
    assert change.remove == (route(TUN_LUID, "198.18.100.0/24"),)
    assert change.recorded == change.add
    assert change.dropped == (
        route(TUN_LUID, "198.18.100.0/24"),
        dns(TUN_LUID, TUN_GUID, ["198.18.0.53"]),
    )


def test_a_change_to_a_split_tunnel_removes_the_halves_before_the_gateways_route():
    change = update(["0.0.0.0/0"], ["198.18.100.0/24"], ["198.18.0.53"], ["198.18.0.53"])
    assert change.add == (route(TUN_LUID, "198.18.100.0/24"),)  # the DNS stays as it is
    assert change.remove == (
        route(TUN_LUID, "128.0.0.0/1"),
        route(TUN_LUID, "0.0.0.0/1"),
        route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1"),
    )


def test_dns_withdrawn_is_set_to_none_and_ipv6_servers_change_nothing():
    withdrawn = update(["198.18.100.0/24"], ["198.18.100.0/24"], ["198.18.0.53"], [])
    assert withdrawn.add == (dns(TUN_LUID, TUN_GUID, []),)
    assert withdrawn.recorded == () and withdrawn.dropped == (
        dns(TUN_LUID, TUN_GUID, ["198.18.0.53"]),
    )
    v6_only = update(["198.18.100.0/24"], ["198.18.100.0/24"], ["198.18.0.53"],
                     ["198.18.0.53", "2001:db8::53"])  # fmt: skip
    assert v6_only.empty and not v6_only.recorded


def test_a_route_kept_is_neither_added_nor_removed():
    change = update(["198.18.100.0/24", "198.18.101.0/24"], ["198.18.101.0/24", "198.18.102.0/24"])
    assert change.add == (route(TUN_LUID, "198.18.102.0/24"),)
    assert change.remove == (route(TUN_LUID, "198.18.100.0/24"),)
    assert update(["0.0.0.0/0"], ["0.0.0.0/0"]).empty


def test_a_full_tunnel_cannot_be_planned_without_the_path_to_the_gateway():
    with pytest.raises(ValueError, match="outside the tunnel"):
        update(["198.18.100.0/24"], ["0.0.0.0/0"], underlay=None)
    # a split change that never covers the gateway needs no path
    assert update(["198.18.100.0/24"], ["198.18.101.0/24"], underlay=None).add


# -- the host against fakes ----------------------------------------------------------


def up(machine: Machine, info: ClientSession, **settings):
    host = machine.host(**settings)
    host.lock_down("pgc0", [AUTH])
    undo = host.configure(TUN, info)
    return host, undo


def recorded(machine: Machine) -> list[Step]:
    host = machine.host()
    return host._load_undo("pgc0")


def test_split_to_split_adds_routes_and_replaces_dns_and_nrpt():
    machine = Machine()
    host, undo = up(machine, SPLIT)
    new = client_session(["198.18.101.0/24"], ["198.18.0.54"], ["ops.example", "eng.example"])
    assert host.update_network(TUN, SPLIT, new, undo) == [["windows", "pgc0"]]
    assert machine.ip.routes == {(TUN_LUID, "198.18.101.0/24", "0.0.0.0")}
    assert machine.ip.dns == {TUN_GUID: "198.18.0.54"}
    ((_, values),) = machine.rules().items()
    assert values["Name"] == (REG_MULTI_SZ, [".ops.example", ".eng.example"])
    assert values["GenericDNSServers"][1] == "198.18.0.54"
    assert machine.wfp.state.filters == {}  # split: no kill switch unless asked
    assert machine.out("198.18.5.1", 53, "udp") == "permit"


def test_split_to_full_locks_down_before_the_first_route(monkeypatch):
    machine = Machine()
    host, undo = up(machine, SPLIT)
    assert machine.wfp.state.filters == {}
    seen = []
    create = machine.ip.CreateIpForwardEntry2

    def watching(row):
        seen.append((machine.out("198.18.9.9"), machine.out("2001:db8::1")))
        return create(row)

    monkeypatch.setattr(machine.ip, "CreateIpForwardEntry2", watching)
    host._helper = type(host._helper)(machine.ip.library())
    host.update_network(TUN, SPLIT, FULL, undo)
    assert seen == [("block", "block")] * 3  # the /32 and both halves, all behind the filters
    assert machine.ip.routes == {GATEWAY_32, *HALVES}
    assert machine.out("198.18.0.1", 51820, "udp") == "permit"  # the dataplane
    assert machine.out("198.18.0.1", 7443) == "permit"  # the auth service
    assert machine.out("198.18.9.9", luid=TUN_LUID) == "permit"
    assert machine.out("198.18.5.1", 53, "udp") == "block"
    ((key, values),) = machine.rules().items()
    assert key == rule_key("pgc0", 0).lower() and values["Name"] == (REG_MULTI_SZ, ["."])
    assert route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1") in recorded(machine)


def test_split_to_full_without_the_kill_switch_blocks_ipv6_and_outside_dns():
    machine = Machine()
    host, undo = up(machine, SPLIT, lockdown=False)
    host.update_network(TUN, SPLIT, FULL, undo)
    assert machine.out("198.18.9.9") == "permit"  # IPv4 follows the /1 routes
    assert machine.out("2001:db8::1") == "block"
    assert machine.out("198.18.5.1", 53, "udp") == "block"
    assert machine.out("198.18.0.53", 53, "udp", luid=TUN_LUID) == "permit"


def test_full_to_split_relaxes_the_filters_only_once_the_halves_are_gone(monkeypatch):
    machine = Machine()
    host, undo = up(machine, FULL)
    seen = []
    delete = machine.ip.DeleteIpForwardEntry2

    def watching(row):
        seen.append((machine.out("2001:db8::1"), machine.out("198.18.5.1", 53, "udp")))
        return delete(row)

    monkeypatch.setattr(machine.ip, "DeleteIpForwardEntry2", watching)
    host._helper = type(host._helper)(machine.ip.library())
    host.update_network(TUN, FULL, SPLIT, undo)
    assert seen == [("block", "block")] * 3  # both halves, then the gateway's /32
    assert machine.ip.routes == {(TUN_LUID, "198.18.100.0/24", "0.0.0.0")}
    assert machine.wfp.state.filters == {}
    assert machine.out("2001:db8::1") == "permit"
    assert machine.out("198.18.5.1", 53, "udp") == "permit"
    ((_, values),) = machine.rules().items()
    assert values["Name"] == (REG_MULTI_SZ, [".eng.example"])
    assert route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1") not in recorded(machine)


def test_a_kill_switch_asked_for_stays_on_in_a_split_tunnel():
    machine = Machine()
    host, undo = up(machine, FULL, lockdown=True)
    host.update_network(TUN, FULL, SPLIT, undo)
    assert machine.out("198.18.9.9") == "block"
    assert machine.out("198.18.0.1", 51820, "udp") == "permit"
    assert machine.out("198.18.100.7", luid=TUN_LUID) == "permit"


def test_the_nrpt_rule_is_replaced_in_place_never_deleted_first(monkeypatch):
    machine = Machine()
    many = client_session(["198.18.100.0/24"], ["198.18.0.53"],
                          [f"d{i}.example" for i in range(60)])  # fmt: skip
    host, undo = up(machine, many)
    assert len(machine.rules()) == 2  # 50 names a rule
    deleted = []
    delete = machine.registry.delete
    monkeypatch.setattr(machine.registry, "delete", lambda p: deleted.append(p) or delete(p))
    host.update_network(TUN, many, SPLIT, undo)
    assert [p.rsplit("\\", 1)[1] for p in deleted] == [rule_key("pgc0", 1), rule_key("pgc0", 2)]
    ((key, values),) = machine.rules().items()
    assert key == rule_key("pgc0", 0).lower()
    assert values["Name"] == (REG_MULTI_SZ, [".eng.example"])


def test_dns_withdrawn_clears_the_adapter_and_the_rules():
    machine = Machine()
    host, undo = up(machine, SPLIT)
    host.update_network(TUN, SPLIT, client_session(["198.18.100.0/24"]), undo)
    assert machine.ip.dns == {TUN_GUID: ""}
    assert machine.rules() == {}
    assert all(step.kind != "dns" for step in recorded(machine))


def test_a_failed_change_covers_both_networks_and_keeps_the_stricter_filters():
    machine = Machine()
    host, undo = up(machine, SPLIT)
    machine.ip.fail_route = ("128.0.0.0/1", 5)  # ERROR_ACCESS_DENIED
    with pytest.raises(NetworkChangeFailed, match="error 5") as failed:
        host.update_network(TUN, SPLIT, FULL, undo)
    assert failed.value.undo == [["windows", "pgc0"]]
    # what was done stays: the old route, the /32 and one half, behind the filters
    assert machine.ip.routes == {
        (TUN_LUID, "198.18.100.0/24", "0.0.0.0"),
        GATEWAY_32,
        (TUN_LUID, "0.0.0.0/1", "0.0.0.0"),
    }
    assert machine.out("2001:db8::1") == "block"
    assert machine.out("198.18.5.1", 53, "udp") == "block"
    # the teardown that follows (or a later process after a crash) undoes both
    host.unconfigure(failed.value.undo)
    assert machine.ip.routes == set() and machine.ip.addresses == set()


def test_a_crash_after_a_change_is_cleaned_up_from_the_record():
    machine = Machine()
    host, undo = up(machine, SPLIT)
    host.update_network(TUN, SPLIT, FULL, undo)
    machine.wfp.crash()
    del machine.ip.interfaces[TUN_LUID]  # WinTun's adapter is gone with the process
    later = machine.host()
    later.unconfigure([["windows", "pgc0"]])
    assert GATEWAY_32 not in machine.ip.routes  # it lives on the Wi-Fi: only the record knew
    assert machine.registry.read(RECORD) is None


def test_a_gateway_routed_into_the_tunnel_is_refused_before_anything_changes():
    machine = Machine()
    host, undo = up(machine, FULL)
    machine.ip.routes.discard(GATEWAY_32)  # someone deleted the gateway's route
    before = set(machine.ip.routes)
    wider = client_session(["0.0.0.0/0", "198.18.200.0/24"], ["198.18.0.53"])
    with pytest.raises(ClientError, match="routed into the tunnel") as refused:
        host.update_network(TUN, FULL, wider, undo)
    assert not isinstance(refused.value, NetworkChangeFailed)
    assert machine.ip.routes == before


def test_nothing_changed_changes_nothing():
    machine = Machine()
    host, undo = up(machine, FULL)
    routes, filters = set(machine.ip.routes), dict(machine.wfp.state.filters)
    rules = machine.rules()
    host.update_network(TUN, FULL, client_session(["0.0.0.0/0"], ["198.18.0.53"]), undo)
    assert machine.ip.routes == routes and machine.wfp.state.filters == filters
    assert machine.rules() == rules


def test_the_gateway_route_is_kept_when_a_full_tunnel_gains_a_route():
    machine = Machine()
    host, undo = up(machine, FULL)
    wider = client_session(["0.0.0.0/0", "198.18.200.0/24"], ["198.18.0.53"])
    host.update_network(TUN, FULL, wider, undo)
    assert machine.ip.routes == {GATEWAY_32, *HALVES, (TUN_LUID, "198.18.200.0/24", "0.0.0.0")}
    assert recorded(machine).count(route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1")) == 1


def test_a_route_that_would_not_go_stays_in_the_record(monkeypatch):
    machine = Machine()
    host, undo = up(machine, FULL)
    delete = machine.ip.DeleteIpForwardEntry2

    def refusing(row):
        key = machine.ip._route(row._obj)
        return 5 if key == GATEWAY_32 else delete(row)  # ERROR_ACCESS_DENIED, once

    monkeypatch.setattr(machine.ip, "DeleteIpForwardEntry2", refusing)
    host._helper = type(host._helper)(machine.ip.library())
    host.update_network(TUN, FULL, SPLIT, undo)  # logged, not a failed change
    assert GATEWAY_32 in machine.ip.routes
    assert route(WIFI_LUID, "198.18.0.1/32", "198.18.5.1") in recorded(machine)
    monkeypatch.setattr(machine.ip, "DeleteIpForwardEntry2", delete)
    machine.host().unconfigure(undo)
    assert machine.ip.routes == set()
