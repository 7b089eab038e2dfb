"""The Windows kill switch (client/wfp.py) on any OS: the WFP structures' Windows
x64 layout, the pure filter plan, and the executor against an in-memory WFP
(tests/fakes/fake_wfp.py) that decodes every structure passed to it and
classifies connections as WFP arbitrates inside our sublayer.

Verified here: which filters we ask for, that their conditions encode what we
mean (addresses, masks, ports, protocols, the adapter's LUID, the loopback
flag), persistence across a crash and a reboot, replacement in one transaction
without a gap, and removal recomputed from the tunnel name. Only a real Windows
machine verifies that the base filtering engine takes them the same way.
"""

import ctypes

import pytest

from client import wfp
from client.wfp import (
    FWP_VALUE0,
    FWPM_ACTION0,
    FWPM_FILTER0,
    FWPM_FILTER_CONDITION0,
    FWPM_PROVIDER0,
    FWPM_SESSION0,
    FWPM_SUBLAYER0,
    Endpoint,
    FirewallPolicy,
    WfpError,
    WfpFirewall,
    plan_filters,
)
from tests.fakes.fake_wfp import FakeWfp

TUN_LUID = 0x0006_0000_0100_0000
WIFI_LUID = 0x0047_0000_0200_0000
AUTH = Endpoint("198.18.0.1", 7443, "tcp")
DATAPLANE = Endpoint("198.18.0.1", 51820, "udp")
LOOPBACK = wfp.FWP_CONDITION_FLAG_IS_LOOPBACK


def lockdown(**changes) -> FirewallPolicy:
    values = dict(
        tun_name="pgc0",
        tunnel_luid=TUN_LUID,
        endpoints=(AUTH, DATAPLANE),
        lockdown=True,
        block_ipv6=True,
        block_outside_dns=True,
    )
    values.update(changes)
    return FirewallPolicy(**values)


# Sizes and offsets of Windows x64 (fwptypes.h, fwpmtypes.h), as WireGuard's
# tunnel/firewall tests pin them.
@pytest.mark.parametrize(
    ("structure", "size"),
    [
        (wfp.FWP_BYTE_BLOB, 16),
        (wfp.FWPM_DISPLAY_DATA0, 16),
        (wfp.FWP_V4_ADDR_AND_MASK, 8),
        (wfp.FWP_V6_ADDR_AND_MASK, 17),
        (FWP_VALUE0, 16),
        (FWPM_ACTION0, 20),
        (FWPM_FILTER_CONDITION0, 40),
        (FWPM_FILTER0, 200),
        (FWPM_SUBLAYER0, 72),
        (FWPM_PROVIDER0, 64),
        (FWPM_SESSION0, 72),
    ],
)
def test_wfp_structures_have_their_windows_x64_size(structure, size):
    assert ctypes.sizeof(structure) == size


@pytest.mark.parametrize(
    ("structure", "field", "offset"),
    [
        (FWP_VALUE0, "u", 8),
        (FWPM_FILTER_CONDITION0, "matchType", 16),
        (FWPM_FILTER_CONDITION0, "conditionValue", 24),
        (FWPM_FILTER0, "displayData", 16),
        (FWPM_FILTER0, "flags", 32),
        (FWPM_FILTER0, "providerKey", 40),
        (FWPM_FILTER0, "providerData", 48),
        (FWPM_FILTER0, "layerKey", 64),
        (FWPM_FILTER0, "subLayerKey", 80),
        (FWPM_FILTER0, "weight", 96),
        (FWPM_FILTER0, "numFilterConditions", 112),
        (FWPM_FILTER0, "filterCondition", 120),
        (FWPM_FILTER0, "action", 128),
        (FWPM_FILTER0, "context", 152),
        (FWPM_FILTER0, "reserved", 168),
        (FWPM_FILTER0, "filterId", 176),
        (FWPM_FILTER0, "effectiveWeight", 184),
        (FWPM_SUBLAYER0, "flags", 32),
        (FWPM_SUBLAYER0, "providerKey", 40),
        (FWPM_SUBLAYER0, "weight", 64),
        (FWPM_PROVIDER0, "serviceName", 56),
        (FWPM_SESSION0, "flags", 32),
        (FWPM_SESSION0, "txnWaitTimeoutInMSec", 36),
        (FWPM_SESSION0, "kernelMode", 64),
    ],
)
def test_wfp_fields_sit_at_their_windows_x64_offsets(structure, field, offset):
    assert getattr(structure, field).offset == offset


def test_no_policy_no_filters():
    assert plan_filters(FirewallPolicy("pgc0", TUN_LUID, (AUTH,))) == []


def test_the_lockdown_plan_blocks_both_families_last():
    specs = plan_filters(lockdown())
    blocks = [s for s in specs if s.action == "block" and not s.conditions]
    assert {s.layer for s in blocks} == set(wfp.LAYERS)
    assert all(s.weight == wfp.WEIGHT_BLOCK_ALL for s in blocks)
    assert all(s.weight > wfp.WEIGHT_BLOCK_ALL for s in specs if s.action == "permit")
    endpoints = [s for s in specs if s.weight == wfp.WEIGHT_ENDPOINT]
    assert [(s.layer, s.conditions) for s in endpoints] == [
        (
            "connect_v4",
            (
                wfp.Condition("remote_address", "198.18.0.1"),
                wfp.Condition("protocol", wfp.IPPROTO_TCP),
                wfp.Condition("remote_port", 7443),
            ),
        ),
        (
            "connect_v4",
            (
                wfp.Condition("remote_address", "198.18.0.1"),
                wfp.Condition("protocol", wfp.IPPROTO_UDP),
                wfp.Condition("remote_port", 51820),
            ),
        ),
    ]


def firewall(fake: FakeWfp) -> WfpFirewall:
    return WfpFirewall(fake.library())


def outbound(fake, address, port=443, protocol="tcp", luid=WIFI_LUID, flags=0, **extra):
    layer = "connect_v6" if ":" in address else "connect_v4"
    return fake.decide(
        layer,
        remote_address=address,
        remote_port=port,
        protocol=wfp.PROTOCOLS[protocol],
        local_interface=luid,
        flags=flags,
        **extra,
    )


def test_the_kill_switch_lets_only_the_gateway_out_of_the_physical_interface():
    fake = FakeWfp()
    assert firewall(fake).apply(lockdown()) == len(plan_filters(lockdown()))
    # The gateway's endpoints, exactly: address, protocol and port.
    assert outbound(fake, "198.18.0.1", 7443, "tcp") == "permit"
    assert outbound(fake, "198.18.0.1", 51820, "udp") == "permit"
    assert outbound(fake, "198.18.0.1", 7443, "udp") == "block"
    assert outbound(fake, "198.18.0.1", 22, "tcp") == "block"
    assert outbound(fake, "198.18.0.2", 7443, "tcp") == "block"
    # Everything else on the physical interface, both families, DNS too.
    assert outbound(fake, "198.18.9.9") == "block"
    assert outbound(fake, "198.18.5.1", 53, "udp") == "block"
    assert outbound(fake, "2001:db8::1") == "block"
    assert outbound(fake, "2001:db8::53", 53, "udp") == "block"
    assert outbound(fake, "192.168.1.10") == "block"  # the LAN, not opted in
    # Through the tunnel, on loopback: anything.
    assert outbound(fake, "198.18.9.9", luid=TUN_LUID) == "permit"
    assert outbound(fake, "198.18.0.53", 53, "udp", luid=TUN_LUID) == "permit"
    assert outbound(fake, "2001:db8::1", luid=TUN_LUID) == "permit"
    assert outbound(fake, "127.0.0.1", 8080, flags=LOOPBACK) == "permit"
    assert outbound(fake, "::1", 8080, flags=LOOPBACK) == "permit"
    # The physical interface keeps its lease and its neighbours.
    assert outbound(fake, "255.255.255.255", 67, "udp", local_port=68) == "permit"
    assert outbound(fake, "ff02::1:2", 547, "udp", local_port=546) == "permit"
    assert outbound(fake, "ff02::1:ff00:1", 0, "icmpv6", local_port=135) == "permit"
    assert outbound(fake, "2001:db8::1", 0, "icmpv6", local_port=128) == "block"  # echo
    # Nothing comes in from outside either.
    inbound = dict(remote_port=50000, protocol=wfp.IPPROTO_TCP, local_interface=WIFI_LUID)
    assert fake.decide("accept_v4", remote_address="198.18.9.9", flags=0, **inbound) == "block"
    assert fake.decide("accept_v6", remote_address="2001:db8::9", flags=0, **inbound) == "block"


def test_the_lan_is_reachable_only_when_asked_and_only_private_ranges():
    fake = FakeWfp()
    firewall(fake).apply(lockdown(allow_lan=True))
    assert outbound(fake, "192.168.1.10") == "permit"
    assert outbound(fake, "10.1.2.3") == "permit"
    assert outbound(fake, "fe80::1") == "permit"
    # A hostile LAN announcing a public prefix on-link (LocalNet) gets nothing.
    assert outbound(fake, "198.18.9.9") == "block"
    assert outbound(fake, "2001:db8::1") == "block"
    # The LAN's resolver is not asked: DNS goes through the tunnel only.
    assert outbound(fake, "192.168.1.1", 53, "udp") == "block"
    assert outbound(fake, "fe80::1", 53, "udp") == "block"


def test_an_ipv6_gateway_stays_reachable_when_ipv6_is_blocked():
    gateway = Endpoint("2001:db8::1", 51820, "udp")
    for policy in (
        FirewallPolicy("pgc0", TUN_LUID, (gateway,), block_ipv6=True),
        lockdown(endpoints=(gateway,)),
    ):
        fake = FakeWfp()
        firewall(fake).apply(policy)
        assert outbound(fake, "2001:db8::1", 51820, "udp") == "permit"
        assert outbound(fake, "2001:db8::1", 51821, "udp") == "block"
        assert outbound(fake, "2001:db8::2", 51820, "udp") == "block"


def test_the_filters_outlive_a_crash_and_a_reboot_and_disconnect_removes_them():
    fake = FakeWfp()
    firewall(fake).apply(lockdown())
    filters = set(fake.state.filters)
    fake.crash()  # the client dies without a word
    assert set(fake.state.filters) == filters
    assert outbound(fake, "198.18.9.9") == "block"
    fake.reboot()
    assert set(fake.state.filters) == filters
    assert all(f.persistent for f in fake.state.filters.values())

    # `disconnect` in a new process: the keys come from the tunnel name alone.
    assert firewall(fake).remove("pgc0") == len(filters)
    assert fake.state.filters == {} and fake.state.sublayers == {}
    assert fake.state.providers == {}
    assert outbound(fake, "198.18.9.9") == "permit"
    assert outbound(fake, "2001:db8::1") == "permit"
    assert firewall(fake).remove("pgc0") == 0  # twice is harmless


def test_a_new_plan_replaces_the_old_one_without_a_gap():
    fake = FakeWfp()
    fw = firewall(fake)
    fw.apply(lockdown(tunnel_luid=None))  # before the adapter exists: the gateway only
    assert outbound(fake, "198.18.9.9", luid=TUN_LUID) == "block"
    fake.commits.clear()
    moved = Endpoint("198.18.0.7", 51820, "udp")  # the dataplane moved
    fw.apply(lockdown(endpoints=(AUTH, moved)))
    assert len(fake.commits) == 1  # one transaction: no state in between was visible
    assert outbound(fake, "198.18.0.7", 51820, "udp") == "permit"
    assert outbound(fake, "198.18.0.1", 51820, "udp") == "block"
    assert outbound(fake, "198.18.9.9", luid=TUN_LUID) == "permit"
    assert len(fake.state.filters) == len(plan_filters(lockdown(endpoints=(AUTH, moved))))


def test_a_failed_update_keeps_the_previous_filters():
    fake = FakeWfp()
    fw = firewall(fake)
    fw.apply(lockdown())
    before = dict(fake.state.filters)
    fake.fail_filter_add_at = fake._filter_adds + 3
    with pytest.raises(WfpError, match="0x80070005"):
        fw.apply(lockdown(endpoints=(AUTH, Endpoint("198.18.0.7", 51820, "udp"))))
    assert fake.state.filters.keys() == before.keys()
    assert "FwpmTransactionAbort0" in fake.calls
    assert fake.sessions == {}  # the engine handle was closed


def test_a_full_tunnel_without_the_kill_switch_still_blocks_ipv6():
    fake = FakeWfp()
    firewall(fake).apply(FirewallPolicy("pgc0", TUN_LUID, (AUTH, DATAPLANE), block_ipv6=True))
    assert outbound(fake, "198.18.9.9") == "permit"  # IPv4 follows the routes
    assert outbound(fake, "2001:db8::1") == "block"
    assert outbound(fake, "2001:db8::1", luid=TUN_LUID) == "permit"
    assert outbound(fake, "::1", flags=LOOPBACK) == "permit"


def test_block_outside_dns_leaves_other_traffic_alone():
    fake = FakeWfp()
    firewall(fake).apply(FirewallPolicy("pgc0", TUN_LUID, block_outside_dns=True))
    assert outbound(fake, "198.18.5.1", 53, "udp") == "block"
    assert outbound(fake, "198.18.5.1", 53, "tcp") == "block"
    assert outbound(fake, "2001:db8::53", 53, "udp") == "block"
    assert outbound(fake, "198.18.0.53", 53, "udp", luid=TUN_LUID) == "permit"
    assert outbound(fake, "198.18.9.9", 443, "tcp") == "permit"
    assert outbound(fake, "2001:db8::1", 443, "tcp") == "permit"


def test_two_tunnels_keep_their_own_filters():
    fake = FakeWfp()
    fw = firewall(fake)
    fw.apply(lockdown())
    fw.apply(lockdown(tun_name="pgc1", tunnel_luid=TUN_LUID + 1))
    fw.remove("pgc0")
    assert len(fake.state.sublayers) == 1 and len(fake.state.providers) == 1
    assert outbound(fake, "198.18.9.9") == "block"
    fw.remove("pgc1")
    assert fake.state.providers == {} and fake.state.filters == {}
