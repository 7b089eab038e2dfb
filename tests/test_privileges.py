"""Least privilege for the internet-facing dataplane (DESIGN.md invariant 12).

A real dataplane started as root in namespaces holds no capability once it is
serving (every thread's /proc status), may become a configured user, and
still passes traffic; NAT is a one-shot command of its own; the auth
service's secrets are unreadable for the dataplane's user.
"""

import os
import subprocess
import sys

import pytest

from dataplane import tun_steering
from netlab import Lab, directories_opened, metrics, socket_in
from netlab.dataplane_lab import GW_UNDERLAY, PORT, Gateway, dataplane_gateway
from netlab.feed import session

NOBODY = 65534


@pytest.fixture
def gateway(tmp_path):
    with dataplane_gateway("pgpriv", str(tmp_path)) as gw:
        yield gw


def task_status(pid: int) -> list[dict[str, str]]:
    """/proc/<pid>/task/*/status of every thread, as dicts."""
    statuses = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        statuses.append({key: value.strip() for key, value in fields.items()})
    return statuses


def assert_unprivileged(pid: int) -> list[dict[str, str]]:
    statuses = task_status(pid)
    assert len(statuses) > 1  # gRPC's threads started after the drop and hold nothing either
    for status in statuses:
        held = {key: status[key] for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
        assert set(held.values()) == {"0000000000000000"}, (status["Name"], held)
        assert status["NoNewPrivs"] == "1"
    return statuses


def passes_traffic(gateway: Gateway, session_id: int) -> None:
    sess = session(session_id, "198.19.10.2")
    gateway.feed.install(sess)
    gateway.wait_sessions(1)
    client = gateway.client(sess)
    client.send_udp(b"after the drop")
    assert gateway.observe() == ("198.19.10.2", 4000, b"after the drop")
    gateway.observer.sendto(b"back", ("198.19.10.2", 4000))
    assert client.receive_inner().endswith(b"back")
    # The kernel filter's counters are still read (through the map's fd) at scrape time.
    socket_in(gateway.cl).sendto(b"\x07" * 40, (GW_UNDERLAY, PORT))
    samples = gateway.scrape()
    assert metrics.total(samples, "pushgate_dataplane_kernel_filter") == 1
    assert metrics.total(samples, "pushgate_dataplane_tun_queues") == tun_steering.QUEUES
    bad_version = metrics.total(
        samples, "pushgate_dataplane_drops_total", direction="inbound", reason="bad_version"
    )
    assert bad_version == 1
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
    dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
    assert received == delivered + dropped


@pytest.mark.netns
def test_serving_dataplane_holds_no_capability_and_passes_traffic(gateway):
    gateway.start_dataplane()
    statuses = assert_unprivileged(gateway.process.pid)
    assert {status["Uid"].split()[0] for status in statuses} == {"0"}  # no user configured
    passes_traffic(gateway, 0x7001)


@pytest.mark.netns
def test_dataplane_started_as_root_becomes_the_configured_user(gateway):
    # After the switch it serves its stats socket in a directory of its own, and
    # reaches the session feed (the test's stands in for control_group's 0660).
    run_dir = os.path.join(gateway.workdir, "dataplane-run")
    os.mkdir(run_dir, 0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    with open(gateway.config) as handle:
        text = handle.read().replace('"dataplane.sock"', '"dataplane-run/stats.sock"')
    with open(gateway.config, "w") as handle:
        handle.write(text + 'user = "nobody"\n')  # ([dataplane] is the file's last section)
    os.chmod(gateway.feed.path, 0o666)
    code = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = os.path.dirname(sys.executable)
    with directories_opened(gateway.workdir), directories_opened(code), directories_opened(python):
        gateway.start_dataplane()
        statuses = assert_unprivileged(gateway.process.pid)
        for status in statuses:
            assert status["Uid"].split() == [str(NOBODY)] * 4
            assert status["Gid"].split()[0] == str(NOBODY)
            assert status["Groups"] == str(NOBODY)  # root's supplementary groups gone
        passes_traffic(gateway, 0x7002)
    assert os.stat(os.path.join(run_dir, "stats.sock")).st_uid == NOBODY


@pytest.mark.netns
def test_unknown_user_stops_the_dataplane_with_a_precise_message(gateway):
    with open(gateway.config, "a") as handle:
        handle.write('user = "pushgate-no-such-user"\n')
    result = gateway.lab.exec(
        gateway.gw,
        [sys.executable, "-m", "dataplane.cli", "--config", gateway.config],
        check=False,
    )
    assert result.returncode != 0
    assert "[dataplane] user 'pushgate-no-such-user' does not exist" in result.stderr


@pytest.mark.netns
def test_nat_is_a_one_shot_command_of_its_own(tmp_path):
    config = tmp_path / "pushgate.toml"
    config.write_text(
        '[gateway]\ntunnel_network = "198.19.20.0/24"\ngateway_address = "198.19.20.1"\n'
    )
    nat = os.path.join(os.path.dirname(sys.executable), "pushgate-nat")
    with Lab("pgnat") as lab:
        gw = lab.namespace("gw")
        other = lab.namespace("lan")
        lan_dev, _ = lab.link(gw, "198.18.20.1/24", other, "198.18.20.2/24")
        lab.exec(gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        out = lab.exec(gw, [nat, "--config", str(config), lan_dev]).stdout
        assert f"198.19.20.0/24 masqueraded out of {lan_dev}" in out
        table = lab.exec(gw, ["nft", "list", "table", "ip", "pushgate_nat"]).stdout
        assert f'ip saddr 198.19.20.0/24 oifname "{lan_dev}" masquerade' in table
        forward = lab.exec(gw, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout
        assert forward.strip() == "1"
        lab.exec(gw, [nat, "--config", str(config), "--remove"])
        gone = lab.exec(gw, ["nft", "list", "table", "ip", "pushgate_nat"], check=False)
        assert gone.returncode != 0
        refused = lab.exec(gw, [nat, "--config", str(config)], check=False)
        assert refused.returncode == 2 and "OUT_IF is required" in refused.stderr


def test_the_running_dataplane_has_no_nat_option():
    result = subprocess.run(
        [sys.executable, "-m", "dataplane.cli", "--config", "x.toml", "--nat", "eth0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unrecognized arguments: --nat" in result.stderr


# -- secrets: the layout `init` writes, the local sockets, the deploy files ----------

PROBE = (
    "import socket,sys\n"
    "for path in sys.argv[1:]:\n"
    " try:\n"
    "  if path.endswith('.sock'):\n"
    "   s=socket.socket(socket.AF_UNIX); s.connect(path)\n"
    "  else:\n"
    "   open(path,'rb').read(1)\n"
    "  print('ok')\n"
    " except PermissionError: print('refused')\n"
)


def access_as(uid: int, gid: int, *paths: str) -> list[str]:
    """'ok' or 'refused' per path, for a process of `uid`:`gid` (no other group);
    Debian's python3, since ours may live where that user cannot read."""
    result = subprocess.run(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
            *("/usr/bin/python3", "-c", PROBE, *paths),
        ],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.split()


@pytest.mark.netns
def test_auth_secrets_are_unreadable_for_the_dataplane_user_in_the_init_layout(tmp_path):
    admin = os.path.join(os.path.dirname(sys.executable), "pushgate-admin")
    directory = tmp_path / "gw"
    subprocess.run(
        [admin, "init", "--dir", str(directory), "--control-group", "nogroup"],
        check=True,
        capture_output=True,
    )
    config = str(directory / "pushgate.toml")
    subprocess.run(
        [admin, "user", "add", "alice", "--config", config],
        env={**os.environ, "PUSHGATE_PASSWORD": "correct horse battery staple"},
        check=True,
        capture_output=True,
    )
    secrets = [str(directory / name) for name in ("tls/ca.key", "tls/server.key", "pushgate.db")]
    with directories_opened(str(directory)):  # (only the files' own modes may refuse)
        # the dataplane's user: another user, in the auth service's group at most
        assert access_as(12345, 65534, config, *secrets) == ["ok"] + ["refused"] * 3
        assert access_as(12345, os.getgid(), config, *secrets) == ["ok"] + ["refused"] * 3
    with open(config) as handle:
        text = handle.read()
    assert "PRIVATE KEY" not in text and "argon2" not in text  # the config holds no secret
    assert 'control_group = "nogroup"' in text


@pytest.mark.netns
def test_control_group_opens_the_local_sockets_to_that_group_only(tmp_path):
    import asyncio

    import grpc

    from pushgate_io.control_socket import PeerPolicy, serve_private

    path = str(tmp_path / "run" / "control.sock")

    async def probe():
        served = await serve_private(grpc.aio.server(), path, PeerPolicy.for_service("nogroup"))
        try:
            with directories_opened(str(tmp_path)):
                member = await asyncio.to_thread(access_as, 12345, 65534, path)
                other = await asyncio.to_thread(access_as, 12345, 12345, path)
            return member, other, os.stat(path), os.stat(os.path.dirname(path))
        finally:
            await served.stop(0)

    member, other, sock, run_dir = asyncio.run(probe())
    assert (member, other) == (["ok"], ["refused"])
    assert oct(sock.st_mode & 0o7777) == "0o660" and sock.st_gid == NOBODY
    assert oct(run_dir.st_mode & 0o7777) == "0o1770" and run_dir.st_gid == NOBODY


DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")


def unit(name: str) -> dict[str, str]:
    """A systemd unit's [Unit] and [Service] keys (a repeated key's values joined)."""
    values: dict[str, str] = {}
    with open(os.path.join(DEPLOY, "systemd", name)) as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key] = f"{values[key]} {value}" if key in values else value
    return values


def test_systemd_units_keep_secrets_and_capabilities_from_the_dataplane():
    auth, dataplane, nat = (
        unit(f"pushgate-{name}.service") for name in ("auth", "dataplane", "nat")
    )
    assert dataplane["User"] != auth["User"] and dataplane["Group"] != auth["Group"]
    assert dataplane["SupplementaryGroups"] == auth["Group"]  # session feed socket, 0660
    for name in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert set(dataplane[name].split()) == {"CAP_NET_ADMIN", "CAP_BPF"}
    assert dataplane["NoNewPrivileges"] == auth["NoNewPrivileges"] == "yes"
    hidden = dataplane["InaccessiblePaths"].split()
    assert {"-/var/lib/pushgate/tls", "-/var/lib/pushgate/pushgate.db"} <= set(hidden)
    assert dataplane["ReadWritePaths"] == "/run/pushgate"  # the sockets only
    assert "StateDirectory" not in dataplane  # (systemd would give it the auth's files)
    assert auth["StateDirectory"] == auth["RuntimeDirectory"] == "pushgate"
    for service in (auth, dataplane):  # key times come from the wall clock
        assert "time-sync.target" in service["After"].split()
        assert "time-sync.target" in service["Wants"].split()
    assert "--nat" not in dataplane["ExecStart"]
    assert nat["ExecStart"].split()[0].endswith("/pushgate-nat") and nat["Type"] == "oneshot"
    assert "pushgate-nat.service" in dataplane["After"].split()


def test_compose_mounts_no_secret_into_the_dataplane():
    from ruamel.yaml import YAML

    compose = os.path.join(DEPLOY, "docker-compose.yml")
    required = {  # the operator's settings, which have no default
        "PUSHGATE_SERVER_NAME": "vpn.example.net",
        "PUSHGATE_PUBLIC_ENDPOINT": "vpn.example.net:51820",
        "PUSHGATE_TUNNEL_NETWORK": "198.19.0.0/24",
    }
    resolved = subprocess.run(
        ["docker-compose", "-f", compose, "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], **required},
        check=True,
    ).stdout
    services = YAML(typ="safe").load(resolved)["services"]

    def mounts(service: str) -> dict[str, tuple[str, bool]]:
        found = {}
        for volume in services[service]["volumes"]:
            if isinstance(volume, str):
                source, target, *mode = volume.split(":")
                found[target] = (source, mode == ["ro"])
            else:
                found[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        return found

    auth, dataplane = mounts("auth"), mounts("dataplane")
    secrets = {auth["/var/lib/pushgate/tls"][0], auth["/var/lib/pushgate/db"][0]}
    assert len(secrets) == 2 and auth["/var/lib/pushgate"][0] not in secrets
    assert not secrets & {source for source, _ in dataplane.values()}
    assert dataplane["/var/lib/pushgate"] == (auth["/var/lib/pushgate"][0], True)  # config, ro
    assert dataplane["/var/lib/pushgate/run"] == auth["/var/lib/pushgate/run"]  # the sockets
    assert set(services["dataplane"]["cap_drop"]) == {"ALL"}
    assert set(services["dataplane"]["cap_add"]) == {"NET_ADMIN", "BPF"}
    with open(os.path.join(DEPLOY, "entrypoint.sh")) as handle:
        entrypoint = handle.read()
    assert "--database db/pushgate.db" in entrypoint  # the database in its own volume
    assert 'pushgate-nat --config "$CONFIG"' in entrypoint and "--nat" not in entrypoint
