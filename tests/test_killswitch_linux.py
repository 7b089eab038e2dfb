"""The Linux client's fail-closed parts without a network: the kill switch's nft rule
set (client/killswitch_linux.py), what the host asks of it (client/linux_host.py
firewall_policy, the undo fence), the status file's trust checks (client/status.py)
and make before break in the decision core (client/core.py).

The rule sets are also loaded into the kernel here (`nft --check`, in a namespace of
our own when root), and tests/test_failclosed_netns.py runs them against real
traffic."""

import dataclasses
import os
import random
import subprocess

import pytest

from client.auth import ClientError, SessionGone
from client.connection import same_network
from client.core import Login, Rekey, Suspend, TearDown
from client.killswitch_linux import (
    Endpoint,
    FirewallPolicy,
    build_ruleset,
    describe,
    table_name,
)
from client.linux_host import firewall_policy, undo_step_allowed
from client.state import ClientState
from client.status import (
    ClientStatus,
    UntrustedStatusFile,
    check_trusted_posix,
    read_status,
    write_status,
)
from tests.test_client_decisions import START, World

AUTH = Endpoint("198.18.1.1", 7443, "tcp")
DATA = Endpoint("2001:db8:1::1", 51820, "udp")


def output_chain(ruleset: str) -> list[str]:
    body = ruleset.split("chain output {\n", 1)[1].split("\n\t}", 1)[0]
    return [line.strip() for line in body.splitlines()[1:]]  # after "type filter hook"


def test_kill_switch_lets_out_only_loopback_the_tun_and_the_gateway_endpoints():
    rules = output_chain(build_ruleset(FirewallPolicy("pgc0", (DATA, AUTH), lockdown=True)))
    assert rules[:4] == [
        'oifname "lo" accept',
        'oifname "pgc0" accept',
        "ip daddr 198.18.1.1 tcp dport 7443 accept",  # the auth service: TCP only
        "ip6 daddr 2001:db8:1::1 udp dport 51820 accept",  # the dataplane: UDP only
    ]
    accepts = [rule for rule in rules[4:] if rule.endswith("accept")]
    # the rest that passes is link housekeeping: DHCP, DHCPv6, NDP (hop limit 255), MLD
    assert all("dport 67" in r or "dport 547" in r or "icmpv6" in r for r in accepts), accepts
    assert "udp dport 53 counter drop" in rules and "tcp dport 53 counter drop" in rules
    assert rules[-1] == "counter drop"
    ruleset = build_ruleset(FirewallPolicy("pgc0", (AUTH,), lockdown=True))
    assert "chain input" in ruleset and "chain forward" in ruleset  # containers, VMs too
    assert "ct state established,related accept" in ruleset


def test_the_lan_is_opt_in_private_ranges_only_and_never_its_dns():
    closed = build_ruleset(FirewallPolicy("pgc0", (AUTH,), lockdown=True))
    assert "192.168.0.0/16" not in closed
    rules = output_chain(
        build_ruleset(FirewallPolicy("pgc0", (AUTH,), lockdown=True, allow_lan=True))
    )
    lan = next(i for i, rule in enumerate(rules) if "192.168.0.0/16" in rule)
    assert rules.index("udp dport 53 counter drop") < lan  # the LAN's resolver: never
    # "LocalNet": a public prefix a hostile LAN announces on-link is not the LAN
    assert not any("198.18." in rule or " 0.0.0.0/" in rule for rule in rules[lan:])


def test_full_tunnel_without_the_kill_switch_still_blocks_ipv6_and_dns():
    ruleset = build_ruleset(
        FirewallPolicy("pgc0", (AUTH,), block_ipv6=True, block_outside_dns=True)
    )
    rules = output_chain(ruleset)
    assert rules[-1] == "meta nfproto ipv6 counter drop"  # IPv4 left to the routes
    assert "udp dport 53 counter drop" in rules
    assert "chain input" not in ruleset
    assert FirewallPolicy("pgc0").empty


def test_the_table_is_replaced_in_one_transaction_and_names_are_checked():
    ruleset = build_ruleset(FirewallPolicy("pg-c.0", (AUTH,), lockdown=True))
    assert ruleset.startswith(
        "table inet pushgate_pg_c_0\ndelete table inet pushgate_pg_c_0\n"
        "table inet pushgate_pg_c_0 {"
    )
    for bad in ('pgc0" accept', "a" * 16, ""):
        with pytest.raises(ValueError):
            table_name(bad)
    for bad in (("198.18.1.1 or 1", 1, "tcp"), ("198.18.1.1", 0, "tcp"), ("198.18.1.1", 1, "icmp")):
        with pytest.raises(ValueError):
            Endpoint(*bad)
    assert "kill switch on" in describe(FirewallPolicy("pgc0", (AUTH,), lockdown=True))


@pytest.mark.netns  # root: nft asks the kernel
def test_every_rule_set_is_one_the_kernel_takes():
    policies = [
        FirewallPolicy("pgc0", (AUTH, DATA), lockdown=True, allow_lan=lan, block_ipv6=True)
        for lan in (False, True)
    ] + [FirewallPolicy("pgc0", (AUTH,), block_ipv6=True, block_outside_dns=True)]
    for policy in policies:
        result = subprocess.run(
            ["nft", "--check", "-f", "-"],
            input=build_ruleset(policy),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


def test_lockdown_defaults_on_for_a_full_tunnel_and_stays_on():
    def policy(lockdown, full, engaged=False):
        return firewall_policy(
            "pgc0",
            lockdown=lockdown,
            allow_lan=False,
            endpoints=[AUTH],
            is_full_tunnel=full,
            engaged=engaged,
        )

    assert policy(None, True).lockdown and policy(None, True).block_ipv6
    assert policy(None, False).empty  # a split tunnel: nothing, unless asked
    assert policy(None, False, engaged=True).lockdown  # on once, on until disconnect
    assert policy(True, False).lockdown
    off = policy(False, True)
    assert not off.lockdown and off.block_ipv6 and off.block_outside_dns  # --no-lockdown


def test_undo_steps_from_a_file_run_only_if_they_are_ours():
    assert undo_step_allowed(["ip", "route", "del", "198.18.1.1/32", "dev", "eth0"])
    assert undo_step_allowed(["resolvectl", "revert", "pgc0"])
    for step in (
        ["ip", "netns", "exec", "x", "sh", "-c", "id"],
        ["sh", "-c", "id"],
        ["ip", "route", 1],
        "ip route del",
        [],
    ):
        assert not undo_step_allowed(step), step


# -- the status file (issue 20, item 5) ------------------------------------------------


def status() -> ClientStatus:
    return ClientStatus(pid=1, state="up", tun_name="pgc0", server="198.18.1.1:7443")


@pytest.mark.skipif(os.name != "posix", reason="POSIX ownership")
def test_a_status_file_others_could_write_is_refused(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    path = str(directory / "client-pgc0.json")
    write_status(path, status())
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert read_status(path).undo == []
    os.chmod(path, 0o666)
    with pytest.raises(UntrustedStatusFile, match="writable by others"):
        read_status(path)
    with pytest.raises(UntrustedStatusFile):
        write_status(path, status())
    os.chmod(path, 0o644)
    os.chmod(directory, 0o777)  # anyone could swap the file
    with pytest.raises(UntrustedStatusFile, match="writable by others"):
        read_status(path)
    os.chmod(directory, 0o755)
    os.symlink(path, directory / "client-pgc1.json")
    with pytest.raises(UntrustedStatusFile, match="not a plain file"):
        read_status(str(directory / "client-pgc1.json"))
    os.chmod(tmp_path, 0o777)  # a directory above, writable and not sticky
    try:
        with pytest.raises(UntrustedStatusFile, match="above the status file"):
            check_trusted_posix(path, directory=False)
        os.chmod(tmp_path, 0o1777)  # sticky, as /tmp: fine
        check_trusted_posix(path, directory=False)
    finally:
        os.chmod(tmp_path, 0o700)


@pytest.mark.netns  # root: files of another uid
def test_root_refuses_a_status_file_another_user_owns(tmp_path):
    path = tmp_path / "client-pgc0.json"
    write_status(str(path), status())
    os.chown(path, 65534, 65534)  # nobody planted it
    with pytest.raises(UntrustedStatusFile, match="owned by uid 65534"):
        read_status(str(path))
    os.chown(path, 0, 0)
    os.chown(tmp_path, 65534, 65534)
    try:
        with pytest.raises(UntrustedStatusFile, match="owned by uid 65534"):
            read_status(str(path))
    finally:
        os.chown(tmp_path, 0, 0)


# -- make before break (issue 20, item 4) ----------------------------------------------


def up_world() -> World:
    world = World(random.Random(1))
    world.run_until(START + 30, lambda: world.core.state is ClientState.UP)
    assert world.core.state is ClientState.UP and world.tun_builds == 1
    return world


def test_a_relogin_keeps_the_tunnel_through_throttled_logins():
    """The session is gone and the account is throttled for a minute: the core never
    tears the TUN down (Suspend, not TearDown), and the next bring-up reuses it."""
    world = up_world()
    world.sessions.clear()  # ended at the gateway
    world.login_error = ClientError("throttled", retryable=True)
    world.core.request_rekey()
    world.run_until(world.now + 60)
    core = world.core
    assert core.state is ClientState.RECONNECTING and core.tunnel_held
    assert world.tun_exists and world.tunnel is None  # the datapath stopped, TUN kept
    world.login_error = None
    world.run_until(world.now + 60, lambda: core.state is ClientState.UP)
    assert core.state is ClientState.UP and world.tun_builds == 1 and world.logins == 2


def test_only_stop_and_failure_tear_the_tunnel_down():
    world = up_world()
    core = world.core
    core.request_rekey()
    core.handle_timer(world.now)
    assert any(isinstance(action, Rekey) for action in core.actions())
    core.handle_rekey_result(world.now, SessionGone())  # the rekey found it gone
    actions = core.actions()
    assert Suspend() in actions and TearDown() not in actions
    assert Login() in actions and core.tunnel_held
    core.handle_login_result(world.now, ClientError("throttled", retryable=True))
    assert TearDown() not in core.actions() and core.tunnel_held
    core.stop(world.now)
    assert TearDown() in core.actions() and not core.tunnel_held


def test_a_held_tunnel_is_reused_only_for_the_same_network():
    world = up_world()
    old = world.core.session
    same = dataclasses.replace(old, session_id=old.session_id + 1, token="new")
    assert same_network(old, same)
    for change in (
        {"tunnel_address": "198.19.0.3/24"},
        {"routes": ["198.18.2.0/24"]},
        {"dns_servers": ["198.18.2.53"]},
        {"endpoint": ("198.18.1.9", 51820)},
        {"mtu": 1380},
    ):
        assert not same_network(old, dataclasses.replace(old, **change)), change
    assert not same_network(None, old)


@pytest.mark.netns  # root: files of another uid
def test_disconnect_as_root_runs_nothing_from_a_planted_status_file(tmp_path, capsys):
    """`--status-dir` pointing at a file another user wrote: refused, its undo steps
    never run; one of ours with foreign undo steps: those are skipped."""
    from client import cli

    marker = tmp_path / "ran"
    planted = status()
    planted.pid = 2**22 + 1  # beyond pid_max: no such process
    planted.undo = [["sh", "-c", f"touch {marker}"]]
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    path = directory / "client-pgc9.json"
    write_status(str(path), planted)
    os.chown(path, 65534, 65534)
    argv = ["--tun", "pgc9", "--status-dir", str(directory), "disconnect"]
    assert cli.main(argv) == 2
    assert "refusing the status file" in capsys.readouterr().err
    os.chown(path, 0, 0)
    assert cli.main(argv) == 0  # ours: cleaned up, but the foreign step is not run
    assert not marker.exists() and not path.exists()
