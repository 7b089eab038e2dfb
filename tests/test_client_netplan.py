"""The Linux client's network plan for split DNS and live changes (client/netplan.py):
which `ip` and `resolvectl` commands a pushed network, and a change of it, become."""

import pytest

from client.auth import PushedNetwork, network_of
from client.netplan import (
    UnderlayRoute,
    dns_not_applied,
    plan_dns,
    plan_network,
    plan_network_update,
)
from pushgate_api import auth_pb2

UNDERLAY = UnderlayRoute(dev="ul0", via="198.18.5.1")
TUNNEL = "198.19.0.2/24"
GATEWAY = "198.18.0.1"


def update(old: PushedNetwork, new: PushedNetwork, *, resolvectl: bool = True):
    return plan_network_update(
        tun_name="pgc0",
        tunnel_address=TUNNEL,
        old=old,
        new=new,
        gateway_ip=GATEWAY,
        underlay=UNDERLAY,
        have_resolvectl=resolvectl,
    )


def route(prefix: str) -> tuple[str, ...]:
    return ("ip", "route", "replace", prefix, "dev", "pgc0")


def unroute(prefix: str) -> tuple[str, ...]:
    return ("ip", "route", "del", prefix, "dev", "pgc0")


# -- DNS at bring-up ------------------------------------------------------------------


def test_split_dns_routes_only_the_match_domains_to_the_tunnel():
    network = PushedNetwork(
        routes=("198.18.2.0/24",),
        dns_servers=("198.18.2.53", "198.18.2.54"),
        search_domains=("eng.example",),
        match_domains=("eng.example", "corp.example"),
    )
    assert plan_dns("pgc0", network) == (
        ("resolvectl", "dns", "pgc0", "198.18.2.53", "198.18.2.54"),
        ("resolvectl", "domain", "pgc0", "eng.example", "~eng.example", "~corp.example"),
        ("resolvectl", "default-route", "pgc0", "no"),
    )


def test_full_tunnel_dns_takes_every_name():
    network = PushedNetwork(
        routes=("0.0.0.0/0",), dns_servers=("198.18.2.53",), match_domains=("eng.example",)
    )
    assert plan_dns("pgc0", network) == (
        ("resolvectl", "dns", "pgc0", "198.18.2.53"),
        ("resolvectl", "domain", "pgc0", "~eng.example", "~."),
        ("resolvectl", "default-route", "pgc0", "yes"),
    )


def test_split_tunnel_servers_without_domains_answer_every_name():
    network = PushedNetwork(routes=("198.18.2.0/24",), dns_servers=("198.18.2.53",))
    assert plan_dns("pgc0", network)[1:] == (
        ("resolvectl", "domain", "pgc0", "~."),
        ("resolvectl", "default-route", "pgc0", "yes"),
    )


def test_domains_without_a_server_are_not_routed_and_the_log_says_so():
    network = PushedNetwork(routes=("198.18.2.0/24",), match_domains=("eng.example",))
    assert plan_dns("pgc0", network) == ()
    assert dns_not_applied(network, True) == (
        "pushed match domains eng.example not applied: no DNS server was pushed for them"
    )


def test_without_resolvectl_the_log_names_everything_left_out():
    network = PushedNetwork(
        dns_servers=("198.18.2.53",),
        search_domains=("eng.example",),
        match_domains=("corp.example",),
    )
    assert dns_not_applied(network, False) == (
        "pushed DNS servers 198.18.2.53; search domains eng.example; match domains "
        "corp.example not applied: resolvectl is not available"
    )
    assert dns_not_applied(network, True) is None
    assert dns_not_applied(PushedNetwork(routes=("0.0.0.0/0",)), False) is None


def test_bring_up_plan_sets_the_split_dns_and_undoes_it():
    plan = plan_network(
        tun_name="pgc0",
        tunnel_address=TUNNEL,
        mtu=1380,
        routes=["198.18.2.0/24"],
        dns_servers=["198.18.2.53"],
        gateway_ip=GATEWAY,
        underlay=UNDERLAY,
        have_resolvectl=True,
        search_domains=["eng.example"],
        match_domains=["eng.example"],
    )
    assert plan.apply[3:] == (
        route("198.18.2.0/24"),
        ("resolvectl", "dns", "pgc0", "198.18.2.53"),
        ("resolvectl", "domain", "pgc0", "eng.example", "~eng.example"),
        ("resolvectl", "default-route", "pgc0", "no"),
    )
    assert plan.undo == (("resolvectl", "revert", "pgc0"),)
    assert plan.dns_applied


# -- live changes ---------------------------------------------------------------------

SPLIT = PushedNetwork(routes=("198.18.2.0/24", "198.18.3.0/24"))


def test_an_unchanged_network_needs_nothing():
    assert update(SPLIT, PushedNetwork(SPLIT.routes, digest="other")).empty
    assert update(SPLIT, SPLIT).undo == ()


def test_split_routes_added_and_removed_on_the_same_tun():
    new = PushedNetwork(routes=("198.18.3.0/24", "198.18.4.0/24"))
    plan = update(SPLIT, new)
    assert plan.add == (route("198.18.4.0/24"),)
    assert plan.remove == (unroute("198.18.2.0/24"),)
    assert plan.undo == ()


def test_all_routes_withdrawn():
    plan = update(SPLIT, PushedNetwork())
    assert plan.add == ()
    assert plan.remove == (unroute("198.18.3.0/24"), unroute("198.18.2.0/24"))


def test_the_tunnel_network_itself_is_never_routed_or_unrouted():
    plan = update(SPLIT, PushedNetwork(routes=("198.19.0.0/24", *SPLIT.routes)))
    assert plan.empty


def test_split_to_full_keeps_the_gateway_outside_before_taking_everything():
    plan = update(SPLIT, PushedNetwork(routes=("0.0.0.0/0",)))
    assert plan.add == (
        ("ip", "route", "replace", "198.18.0.1/32", "dev", "ul0", "via", "198.18.5.1"),
        route("0.0.0.0/1"),
        route("128.0.0.0/1"),
    )
    assert plan.remove == (unroute("198.18.3.0/24"), unroute("198.18.2.0/24"))
    assert plan.undo == (("ip", "route", "del", "198.18.0.1/32", "dev", "ul0"),)


def test_full_to_split_drops_the_halves_before_the_gateway_route():
    plan = update(PushedNetwork(routes=("0.0.0.0/0",)), SPLIT)
    assert plan.add == (route("198.18.2.0/24"), route("198.18.3.0/24"))
    assert plan.remove == (
        unroute("128.0.0.0/1"),
        unroute("0.0.0.0/1"),
        ("ip", "route", "del", "198.18.0.1/32", "dev", "ul0"),
    )
    assert plan.undo == ()


def test_dns_set_anew_when_it_changes_and_reverted_when_withdrawn():
    with_dns = PushedNetwork(
        routes=SPLIT.routes, dns_servers=("198.18.2.53",), match_domains=("eng.example",)
    )
    plan = update(SPLIT, with_dns)
    assert plan.add == (
        ("resolvectl", "dns", "pgc0", "198.18.2.53"),
        ("resolvectl", "domain", "pgc0", "~eng.example"),
        ("resolvectl", "default-route", "pgc0", "no"),
    )
    assert plan.remove == () and plan.dns_applied
    assert plan.undo == (("resolvectl", "revert", "pgc0"),)

    more = PushedNetwork(
        routes=SPLIT.routes,
        dns_servers=("198.18.2.53",),
        match_domains=("eng.example", "corp.example"),
    )
    assert update(with_dns, more).add == (
        ("resolvectl", "dns", "pgc0", "198.18.2.53"),
        ("resolvectl", "domain", "pgc0", "~eng.example", "~corp.example"),
        ("resolvectl", "default-route", "pgc0", "no"),
    )

    withdrawn = update(with_dns, SPLIT)
    assert withdrawn.add == (("resolvectl", "revert", "pgc0"),)
    assert withdrawn.undo == () and not withdrawn.dns_applied


def test_without_resolvectl_only_routes_change():
    with_dns = PushedNetwork(routes=("198.18.4.0/24",), dns_servers=("198.18.2.53",))
    plan = update(SPLIT, with_dns, resolvectl=False)
    assert plan.add == (route("198.18.4.0/24"),)
    assert not plan.dns_applied and plan.undo == ()


def test_a_full_tunnel_change_needs_the_route_to_the_gateway():
    with pytest.raises(ValueError, match="route to the gateway"):
        plan_network_update(
            tun_name="pgc0",
            tunnel_address=TUNNEL,
            old=SPLIT,
            new=PushedNetwork(routes=("0.0.0.0/0",)),
            gateway_ip=GATEWAY,
            underlay=None,
            have_resolvectl=False,
        )


def test_an_answer_without_a_network_means_unchanged():
    assert network_of(auth_pb2.RekeyResponse()) is None
    assert network_of(auth_pb2.SessionInfoResponse()) is None
    # an empty one is a network: nothing routed, no DNS (the user lost every group)
    empty = auth_pb2.SessionInfoResponse(network=auth_pb2.NetworkConfig(digest="d0"))
    assert network_of(empty) == PushedNetwork()
    full = auth_pb2.RekeyResponse(
        network=auth_pb2.NetworkConfig(
            routes=["198.18.2.0/24"],
            dns_servers=["198.18.2.53"],
            search_domains=["eng.example"],
            match_domains=["eng.example"],
            digest="d1",
        )
    )
    got = network_of(full)
    assert got == PushedNetwork(
        ("198.18.2.0/24",), ("198.18.2.53",), ("eng.example",), ("eng.example",)
    )
    assert got.digest == "d1"


def test_a_split_route_over_the_gateway_keeps_the_gateway_outside():
    plan = update(SPLIT, PushedNetwork(routes=("198.18.0.0/15",)))
    assert plan.add == (
        ("ip", "route", "replace", "198.18.0.1/32", "dev", "ul0", "via", "198.18.5.1"),
        route("198.18.0.0/15"),
    )
    assert plan.undo == (("ip", "route", "del", "198.18.0.1/32", "dev", "ul0"),)
    back = update(PushedNetwork(routes=("198.18.0.0/15",)), SPLIT)
    assert back.remove == (
        unroute("198.18.0.0/15"),
        ("ip", "route", "del", "198.18.0.1/32", "dev", "ul0"),
    )
