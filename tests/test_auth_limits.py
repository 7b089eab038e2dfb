"""The auth service's public port under connection and stream floods, from an attacker
namespace (issue 14, item 4): real pushgate-auth, real TLS, raw HTTP/2 from the attacker.

    atk ns 198.18.7.2 --- 198.18.7.1  gw ns (pushgate-auth on 198.18.7.1:7443)
    cli ns 198.18.8.2 --- 198.18.8.1

The service runs with a soft descriptor limit of 1024 and a hard one of 4096, as a
shell's default; it must raise the soft one itself, or 1100 idle connections take
every descriptor and nobody can log in.
"""

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from auth_service import limits
from netlab import Lab, wait_for
from netlab.auth import admin

GATEWAY = "198.18.7.1"
ATTACKER = "198.18.7.2"
CLIENT_GATEWAY = "198.18.8.1"
CLIENT = "198.18.8.2"
PORT = 7443
PASSWORD = "correct horse battery staple"
MIB = 1 << 20
# What the service may grow by under 1100 idle connections and 50k streams: each
# connection costs gRPC's buffers and a TLS session (about 30 KiB measured), each
# live stream a call object; the limits cap both. Before them, one connection's
# 9.7k Watch streams alone cost 187 MiB.
RSS_GROWTH_BOUND = 96 * MIB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("limits") / "gw")
    with Lab("pglim") as lab:
        gw, atk, cli = lab.namespace("gw"), lab.namespace("atk"), lab.namespace("cli")
        lab.link(gw, f"{GATEWAY}/24", atk, f"{ATTACKER}/24")
        lab.link(gw, f"{CLIENT_GATEWAY}/24", cli, f"{CLIENT}/24")
        lab.exec(cli, ["ip", "route", "add", "default", "via", CLIENT_GATEWAY])
        result = admin(
            "init",
            "--dir",
            directory,
            "--server-name",
            GATEWAY,
            "--auth-listen",
            f"{GATEWAY}:{PORT}",
            "--dataplane-endpoint",
            f"{GATEWAY}:51820",
        )
        assert result.returncode == 0, result.stderr
        config = os.path.join(directory, "pushgate.toml")
        password_file = os.path.join(directory, "password")
        with open(password_file, "w") as handle:
            handle.write(PASSWORD + "\n")
        assert admin("user", "add", "alice", "--config", config, password=PASSWORD).returncode == 0
        log = open(os.path.join(directory, "auth.log"), "a")  # noqa: SIM115
        auth = lab.start(
            gw,
            [
                "prlimit",
                "--nofile=1024:4096",
                os.path.join(os.path.dirname(sys.executable), "pushgate-auth"),
                "--config",
                config,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        setup = SimpleNamespace(
            lab=lab, auth=auth, gw=gw, atk=atk, cli=cli, directory=directory,
            password_file=password_file,
        )  # fmt: skip
        wait_for(
            lambda: lab.exec(gw, ["ss", "-Hltn", f"sport = :{PORT}"]).stdout.strip(),
            30,
            what="the auth service listening",
        )
        yield setup
        log.close()


def real_client(setup) -> dict:
    command = [sys.executable, "-m", "netlab.flood", "client", GATEWAY, str(PORT)]
    command += [os.path.join(setup.directory, "tls", "ca.crt"), GATEWAY, "alice"]
    result = setup.lab.exec(setup.cli, [*command, setup.password_file], timeout=60)
    return json.loads(result.stdout)


@pytest.mark.netns
def test_a_real_client_logs_in_and_rekeys_through_idle_connections_and_a_stream_flood(gateway):
    setup, lab = gateway, gateway.lab
    assert real_client(setup)["key_epoch"] == 1  # baseline, and warms the service up
    before = rss(setup.auth.pid)
    flood = [sys.executable, "-m", "netlab.flood"]
    idle = lab.start(
        setup.atk,
        [*flood, "idle", GATEWAY, str(PORT), "1100", "25"],
        stdout=subprocess.PIPE,
        text=True,
    )
    opened = json.loads(idle.stdout.readline())
    peak = [rss(setup.auth.pid)]
    streams = lab.start(
        setup.atk,
        [*flood, "streams", GATEWAY, str(PORT), "10", "50000", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    done = threading.Event()

    def watch_rss():
        while not done.wait(0.2):
            peak.append(rss(setup.auth.pid))

    watcher = threading.Thread(target=watch_rss)
    watcher.start()
    time.sleep(5)
    during = real_client(setup)
    flood_report = json.loads(streams.communicate(timeout=60)[0])
    released = json.loads(idle.stdout.readline())
    done.set()
    watcher.join()
    growth = max(peak) - before
    print(
        json.dumps(
            {
                "opened": opened,
                "streams": flood_report,
                "released": released,
                "client": during,
                "rss_growth_mib": round(growth / MIB, 1),
            }
        )
    )
    assert during.get("key_epoch") == 1, during  # logged in and rekeyed meanwhile
    assert opened["opened"] == 1100, opened
    assert released["closed_by_server"] == 0  # within the idle limit they are kept
    # Each connection holds at most 32 streams and the service at most 16 watchers:
    # the rest are refused at once, none is left hanging.
    assert flood_report["opened"] == 50000
    assert flood_report["still_open"] <= 16, flood_report
    assert growth < RSS_GROWTH_BOUND, growth / MIB


def test_the_descriptor_limit_is_raised_to_the_hard_one_and_connections_fit_below_it():
    assert limits.plan(1024, 4096, 10000) == limits.Limits(4096, 4096 - limits.FD_RESERVE)
    assert limits.plan(1024, 1 << 20, 10000) == limits.Limits(1 << 20, 10000)
    assert limits.plan(1024, -1, 10000).fd_limit == limits.UNLIMITED_FDS  # RLIM_INFINITY
    assert limits.plan(100, 100, 10000).connections == 1  # never zero
