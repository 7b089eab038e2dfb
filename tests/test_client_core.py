"""Pure parts of the client: state machine, network plan, backoff, status."""

import itertools
import random

import pytest

from client.core import REKEY_RETRY_SECONDS, rekey_retry_delay
from client.netplan import UnderlayRoute, parse_route_get, plan_network
from client.state import (
    TRANSITIONS,
    ClientEvent,
    ClientState,
    ClientStateMachine,
)
from client.status import ClientStatus, format_status, read_status, write_status
from push_protocol.backoff import Backoff
from push_protocol.drops import IllegalTransition


def test_happy_path_through_the_states():
    machine = ClientStateMachine()
    for event, state in [
        (ClientEvent.START, ClientState.LOGGING_IN),
        (ClientEvent.LOGGED_IN, ClientState.CONNECTING),
        (ClientEvent.TUNNEL_UP, ClientState.UP),
        (ClientEvent.REKEY_STARTED, ClientState.REKEYING),
        (ClientEvent.REKEY_DONE, ClientState.UP),
        (ClientEvent.SERVER_LOST, ClientState.RECONNECTING),
        (ClientEvent.TUNNEL_UP, ClientState.UP),
        (ClientEvent.STOP, ClientState.DISCONNECTED),
    ]:
        assert machine.handle(event) is state


@pytest.mark.parametrize(
    ("state", "event"),
    [p for p in itertools.product(ClientState, ClientEvent) if p not in TRANSITIONS],
)
def test_illegal_client_transitions_raise(state, event):
    machine = ClientStateMachine()
    machine.state = state
    with pytest.raises(IllegalTransition, match=state.value):
        machine.handle(event)


def test_every_state_can_stop():
    for state in ClientState:
        if state is not ClientState.DISCONNECTED:
            assert TRANSITIONS[(state, ClientEvent.STOP)] is ClientState.DISCONNECTED


UNDERLAY = UnderlayRoute(dev="ul0", via="198.18.5.1")


def test_full_tunnel_plan_keeps_the_gateway_outside():
    plan = plan_network(
        tun_name="pgc0",
        tunnel_address="198.19.0.2/24",
        mtu=1420,
        routes=["0.0.0.0/0"],
        dns_servers=["198.18.0.53"],
        gateway_ip="198.18.0.1",
        underlay=UNDERLAY,
        have_resolvectl=True,
    )
    assert plan.apply == (
        ("ip", "link", "set", "dev", "pgc0", "addrgenmode", "none"),
        ("ip", "address", "add", "198.19.0.2/24", "dev", "pgc0"),
        ("ip", "link", "set", "dev", "pgc0", "mtu", "1420", "txqueuelen", "2000", "up"),
        ("ip", "route", "replace", "198.18.0.1/32", "dev", "ul0", "via", "198.18.5.1"),
        ("ip", "route", "replace", "0.0.0.0/1", "dev", "pgc0"),
        ("ip", "route", "replace", "128.0.0.0/1", "dev", "pgc0"),
        ("resolvectl", "dns", "pgc0", "198.18.0.53"),
        ("resolvectl", "domain", "pgc0", "~."),
        ("resolvectl", "default-route", "pgc0", "yes"),
    )
    assert plan.undo == (
        ("resolvectl", "revert", "pgc0"),
        ("ip", "route", "del", "198.18.0.1/32", "dev", "ul0"),
    )
    assert plan.dns_applied


def test_split_tunnel_plan_routes_only_what_is_pushed():
    plan = plan_network(
        tun_name="pgc0",
        tunnel_address="198.19.0.2/24",
        mtu=1380,
        routes=["198.19.0.0/24", "198.18.100.0/24"],
        dns_servers=["198.18.0.53"],
        gateway_ip="198.18.0.1",
        underlay=UnderlayRoute(dev="ul0"),
        have_resolvectl=False,
    )
    assert plan.apply == (
        ("ip", "link", "set", "dev", "pgc0", "addrgenmode", "none"),
        ("ip", "address", "add", "198.19.0.2/24", "dev", "pgc0"),
        ("ip", "link", "set", "dev", "pgc0", "mtu", "1380", "txqueuelen", "2000", "up"),
        ("ip", "route", "replace", "198.18.100.0/24", "dev", "pgc0"),
    )
    assert plan.undo == ()
    assert not plan.dns_applied


def test_route_get_parsing():
    assert parse_route_get([{"dst": "198.18.0.1", "dev": "ul0"}]) == UnderlayRoute("ul0")
    assert parse_route_get([{"dev": "eth0", "gateway": "198.18.9.1"}]).via == "198.18.9.1"
    with pytest.raises(ValueError, match="no route"):
        parse_route_get([])


def test_backoff_grows_with_jitter_and_resets():
    backoff = Backoff(first=1.0, cap=8.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_a_failed_rekey_is_retried_well_before_the_session_expires():
    # Production defaults (rekey at 600 s, keys end at 900 s): every WireGuard-like 5 s.
    assert rekey_retry_delay(600.0, 900.0) == REKEY_RETRY_SECONDS
    # Little time left: a quarter of it, so several tries fit before the end ...
    assert rekey_retry_delay(100.0, 104.0) == 1.0
    # ... but never a busy loop, also when the end has passed.
    assert rekey_retry_delay(100.0, 100.1) == rekey_retry_delay(100.0, 90.0) == 0.25
    assert rekey_retry_delay(100.0, 0.0) == REKEY_RETRY_SECONDS  # end not known


def test_status_round_trip_and_format(tmp_path):
    path = str(tmp_path / "client-pgc0.json")
    status = ClientStatus(
        pid=1,
        state="up",
        tun_name="pgc0",
        server="198.18.0.1:7443",
        tunnel_address="198.19.0.2/24",
        rx_packets=3,
        last_received_at=10.0,
        drops={"bad_tag": 2},
    )
    write_status(path, status)
    loaded = read_status(path)
    assert loaded == status
    text = format_status(loaded, now=12.5)
    assert "state:          up" in text
    assert "2.5 s ago" in text
    assert "bad_tag=2" in text
