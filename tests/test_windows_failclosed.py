"""The Windows client fails closed (issue 20), on any OS against fakes: the
WindowsHost with the in-memory IP Helper (tests/test_windows_network.py), WFP
(tests/fakes/fake_wfp.py) and registry (tests/fakes/fake_registry.py).

Verified here: the kill switch is on by default for a full tunnel, in place
before any route, kept when the tunnel is torn down for a reconnect or a
re-login and after a crash, and removed only by `release` (disconnect); IPv6 and
DNS outside the tunnel are blocked in a full tunnel even without it; the NRPT
rules for full and split DNS. Not verified without Windows: that WFP and the DNS
client behave as these fakes do.
"""

import pytest

from client import nrpt, wfp
from client.auth import ClientError
from client.nrpt import LOCAL_BASE, Nrpt, plan_nrpt, rule_key
from client.winregistry import REG_DWORD, REG_MULTI_SZ, REG_SZ
from tests.fakes.fake_registry import FakeRegistry
from tests.fakes.fake_wfp import FakeWfp
from tests.test_windows_network import TUN, TUN_LUID, WIFI_LUID, FakeIpHelper, session
from tests.test_windows_network import windows_host as make_host

AUTH = ("198.18.0.1", 7443, "tcp")


class Machine:
    """One Windows machine's state, shared by successive client processes."""

    def __init__(self) -> None:
        self.ip, self.registry, self.wfp = FakeIpHelper(), FakeRegistry(), FakeWfp()

    def host(self, **settings):
        host = make_host(self.ip, self.registry, self.wfp)
        for name, value in settings.items():
            setattr(host, name, value)
        return host

    def out(self, address, port=443, protocol="tcp", luid=WIFI_LUID):
        layer = "connect_v6" if ":" in address else "connect_v4"
        return self.wfp.decide(
            layer,
            remote_address=address,
            remote_port=port,
            protocol=wfp.PROTOCOLS[protocol],
            local_interface=luid,
            flags=0,
        )

    def rules(self) -> dict:
        prefix = LOCAL_BASE.lower() + "\\"
        return {k[len(prefix) :]: v for k, v in self.registry.keys.items() if k.startswith(prefix)}


FULL = session(["0.0.0.0/0"], ["198.18.0.53"])


def test_asked_for_the_kill_switch_holds_from_before_the_first_login():
    machine = Machine()
    machine.host(lockdown=True).lock_down("pgc0", [AUTH])  # the auth service only
    assert machine.out("198.18.0.1", 7443) == "permit"
    assert machine.out("198.18.0.1", 51820, "udp") == "block"  # no session yet
    assert machine.out("198.18.9.9") == "block"
    assert machine.out("2001:db8::1") == "block"


def test_a_full_tunnel_locks_down_before_its_routes_and_keeps_it_through_a_relogin():
    machine = Machine()
    host = machine.host()  # the default: on for a full tunnel
    host.lock_down("pgc0", [AUTH])  # the first login: not known to be a full tunnel yet
    assert machine.wfp.state.filters == {}

    undo = host.configure(TUN, FULL)
    assert machine.out("198.18.0.1", 7443) == "permit"  # the auth service, still
    assert machine.out("198.18.0.1", 51820, "udp") == "permit"  # and the dataplane
    assert machine.out("198.18.9.9") == "block"
    assert machine.out("198.18.9.9", luid=TUN_LUID) == "permit"
    assert machine.out("2001:db8::1") == "block"
    assert machine.out("198.18.5.1", 53, "udp") == "block"

    # A re-login: the tunnel's configuration goes, the filters stay; the auth
    # service now resolves elsewhere, and the dataplane moved.
    host.unconfigure(undo)
    assert machine.ip.routes == set()
    assert machine.out("198.18.9.9") == "block"
    assert machine.out("2001:db8::1") == "block"
    host.lock_down("pgc0", [("198.18.0.2", 7443, "tcp")])
    assert machine.out("198.18.0.2", 7443) == "permit"
    assert machine.out("198.18.0.1", 7443) == "block"
    assert machine.out("198.18.0.1", 51820, "udp") == "permit"  # the session's, still
    moved = session(["0.0.0.0/0"], ["198.18.0.53"])
    moved.endpoint = ("198.18.0.3", 51820)
    host.configure(TUN, moved)
    assert machine.out("198.18.0.3", 51820, "udp") == "permit"
    assert machine.out("198.18.0.1", 51820, "udp") == "block"

    # A crash, then `disconnect` from a new process.
    machine.wfp.crash()
    assert machine.out("198.18.9.9") == "block"
    later = machine.host()
    later.unconfigure([["windows", "pgc0"]])
    later.release("pgc0")
    assert machine.wfp.state.filters == {} and machine.rules() == {}
    assert machine.out("198.18.9.9") == "permit"
    assert machine.out("2001:db8::1") == "permit"
    assert machine.out("198.18.5.1", 53, "udp") == "permit"


def test_full_tunnel_dns_goes_to_the_pushed_servers_for_every_name():
    machine = Machine()
    machine.host().configure(TUN, FULL)
    ((key, values),) = machine.rules().items()
    assert key == rule_key("pgc0", 0).lower()
    assert values == {
        "Version": (REG_DWORD, 1),
        "Name": (REG_MULTI_SZ, ["."]),
        "GenericDNSServers": (REG_SZ, "198.18.0.53"),
        "ConfigOptions": (REG_DWORD, 8),
        "IPSECCARestriction": (REG_SZ, ""),
    }


def test_a_full_tunnel_without_the_kill_switch_still_blocks_ipv6_and_outside_dns():
    machine = Machine()
    machine.host(lockdown=False).configure(TUN, FULL)
    assert machine.out("198.18.9.9") == "permit"  # IPv4 follows the /1 routes
    assert machine.out("2001:db8::1") == "block"
    assert machine.out("198.18.5.1", 53, "udp") == "block"
    assert machine.out("198.18.0.53", 53, "udp", luid=TUN_LUID) == "permit"


def test_split_dns_sends_only_the_match_domains_and_leaves_other_traffic_alone():
    machine = Machine()
    split = session(["198.18.100.0/24"], ["198.18.0.53"], ["eng.example", ".Ops.Example."])
    machine.host().configure(TUN, split)
    ((_, values),) = machine.rules().items()
    assert values["Name"] == (REG_MULTI_SZ, [".eng.example", ".ops.example"])
    assert machine.wfp.state.filters == {}  # split tunnel: no kill switch unless asked
    assert machine.out("198.18.5.1", 53, "udp") == "permit"


def test_a_split_tunnel_takes_the_kill_switch_when_asked():
    machine = Machine()
    machine.host(lockdown=True, allow_lan=True).configure(TUN, session(["198.18.100.0/24"]))
    assert machine.out("198.18.9.9") == "block"
    assert machine.out("192.168.1.20") == "permit"
    assert machine.out("198.18.100.7", luid=TUN_LUID) == "permit"


def test_no_route_is_set_when_the_filters_cannot_be_installed():
    machine = Machine()
    machine.wfp.fail_filter_add_at = 1
    with pytest.raises(ClientError, match="firewall filters"):
        machine.host().configure(TUN, FULL)
    assert machine.ip.routes == set() and machine.ip.addresses == set()
    assert machine.wfp.state.filters == {}


def test_nrpt_rules_hold_fifty_names_each_and_go_away_by_tunnel_name():
    domains = [f"d{i}.example" for i in range(120)]
    rules = plan_nrpt("pgc0", dns_servers=["198.18.0.53"], match_domains=domains, full_tunnel=True)
    assert [len(r.names) for r in rules] == [50, 50, 20]
    assert [r.key for r in rules] == [rule_key("pgc0", i) for i in range(3)]
    assert plan_nrpt("pgc0", dns_servers=[], match_domains=domains, full_tunnel=True) == []
    assert plan_nrpt("pgc0", dns_servers=["198.18.0.53"], match_domains=[], full_tunnel=False) == []
    registry = FakeRegistry()
    Nrpt(registry).apply("pgc0", rules)
    other = plan_nrpt("pgc1", dns_servers=["198.18.0.53"], match_domains=[], full_tunnel=True)
    Nrpt(registry).apply("pgc1", other)
    assert Nrpt(registry).remove("pgc0") == 3  # recomputed: no list kept anywhere
    assert registry.subkeys(LOCAL_BASE) == [rule_key("pgc1", 0)]
    assert Nrpt(registry).remove("pgc0") == 0


def test_group_policy_rules_are_reported(caplog):
    registry = FakeRegistry()
    registry.write(nrpt.POLICY_BASE + r"\{corporate}", {"Version": (REG_DWORD, 1)})
    Nrpt(registry).apply("pgc0", plan_nrpt("pgc0", dns_servers=["198.18.0.53"],
                                           match_domains=[], full_tunnel=True))  # fmt: skip
    assert "Group Policy defines NRPT rules" in caplog.text


def test_configuring_again_keeps_what_the_first_configuration_must_undo():
    machine = Machine()
    host = machine.host()
    undo = host.configure(TUN, FULL)
    moved = session(["0.0.0.0/0"], ["198.18.0.53"])
    moved.endpoint = ("198.18.0.3", 51820)
    host.configure(TUN, moved)  # a re-login that kept the tunnel: no unconfigure between
    assert (WIFI_LUID, "198.18.0.1/32", "198.18.5.1") in machine.ip.routes
    host.unconfigure(undo)
    assert machine.ip.routes == set() and machine.ip.addresses == set()


def test_a_registry_failure_is_a_clean_client_error():
    machine = Machine()

    def refused(path, values):
        raise PermissionError(5, "Access is denied")

    machine.registry.write = refused
    with pytest.raises(ClientError, match="network setup failed"):
        machine.host().configure(TUN, FULL)
    assert machine.ip.routes == set()
    assert machine.out("198.18.9.9") == "block"  # the filters stay: fail closed


def test_an_explicit_stop_releases_the_kill_switch_with_the_teardown():
    machine = Machine()
    host = machine.host()
    undo = host.configure(TUN, FULL)
    host.stop_requested = True  # Ctrl-C, Ctrl-Break, or `disconnect`'s stop event
    host.unconfigure(undo)
    assert machine.wfp.state.filters == {} and machine.rules() == {}
    assert machine.out("198.18.9.9") == "permit"
