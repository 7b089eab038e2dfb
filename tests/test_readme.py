"""README.md cannot drift: the `sh` blocks under "Setting up a gateway" and
"Connecting a client" run as written, in network namespaces, and traffic then flows
through the tunnel they set up.

How a block runs: each fenced `sh` block is one terminal, a `bash -e` script. The
gateway section's blocks run in the gateway's namespace, the client section's in
the client's, in order. A block may leave programs running (`pushgate-auth &`) or
keep one in the foreground (`pushgate-client connect`): the next block starts when
the block has exited, or when its section is up while it still runs (the gateway:
both services answer; the client: traffic flows through the tunnel). By the end
every block must have exited with status 0, and after the client section the
tunnel must be gone again.

Everything that differs from a real gateway and client is in the table below and
nowhere else.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from netlab import Lab, http_get, metrics, wait_for
from pushgate_io import gateway_config

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

README = Path(__file__).resolve().parent.parent / "README.md"

# -- the one place where the lab differs from the README's world ------------------
GATEWAY = "198.18.1.1"  # the gateway's address on the clients' network
CLIENT = "198.18.1.2"
LAN_GATEWAY = "198.18.2.1"  # the gateway on the lan, as `eth0` (the README's NAT side)
LAN_HOST = "198.18.2.2"  # a host behind the gateway: no route back but through NAT
SUBSTITUTIONS = {
    # The client resolves the dataplane endpoint per connection only with issue 16
    # item 5; until then the README's name is replaced by the address it names.
    "vpn.example.net": GATEWAY,
}
PASSWORD = "correct horse battery staple"  # typed at each prompt (PUSHGATE_PASSWORD)
GIVEN_TO_CLIENTS = ["tls/ca.crt"]  # "Give clients tls/ca.crt": into their directory
# Each block sees these directories of its own in place of the host's (a mount
# namespace: `ip netns exec` gives each command one), so /etc/pushgate and the
# client's status files are the lab's, and the commands name them as written.
PRIVATE_DIRECTORIES = ("/etc/pushgate", "/run/pushgate")
SECTIONS = {"gateway": "Setting up a gateway", "client": "Connecting a client"}
BLOCK_LANGUAGES = {"sh", "shell", "bash"}
UP_SECONDS = 60  # for a section to come up, or a block to end


@dataclass
class Block:
    section: str
    line: int  # in README.md, for messages
    text: str


def readme_blocks() -> list[Block]:
    """The shell blocks under each heading of SECTIONS (up to the next heading of that
    level), in order."""
    tokens = MarkdownIt().parse(README.read_text())
    blocks, section, level = [], None, None
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            title, depth = tokens[index + 1].content, int(token.tag[1:])
            if section and depth <= level:
                section = None
            for name, prefix in SECTIONS.items():
                if title.startswith(prefix):
                    section, level = name, depth
        elif token.type == "fence" and section and token.info.strip() in BLOCK_LANGUAGES:
            blocks.append(Block(section, token.map[0] + 1, token.content))
    return blocks


def substituted(text: str) -> str:
    for old, new in SUBSTITUTIONS.items():
        text = text.replace(old, new)
    return text


def test_the_readme_sections_have_shell_blocks():
    found = {block.section for block in readme_blocks()}
    assert found == set(SECTIONS), f"README.md: no ```sh block under {set(SECTIONS) - found}"


# -- the lab ----------------------------------------------------------------------


class ReadmeLab:
    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.gw = lab.namespace("gw")
        self.client = lab.namespace("cl")
        self.lan = lab.namespace("lan")
        lab.link(self.client, f"{CLIENT}/24", self.gw, f"{GATEWAY}/24")
        dev, _ = lab.link(self.gw, f"{LAN_GATEWAY}/24", self.lan, f"{LAN_HOST}/24")
        lab.exec(self.gw, ["ip", "link", "set", dev, "down"])
        lab.exec(self.gw, ["ip", "link", "set", dev, "name", "eth0"])
        lab.exec(self.gw, ["ip", "link", "set", "eth0", "up"])
        self.workdir = root / "home"  # both sections' working directory
        self.workdir.mkdir()
        self.private = {
            path: root / path.strip("/").replace("/", "-") for path in PRIVATE_DIRECTORIES
        }
        for path, ours in self.private.items():
            os.makedirs(path, exist_ok=True)  # a mount point (left, empty, if we made it)
            ours.mkdir()
        self.logs = root
        self.processes: list[tuple[Block, subprocess.Popen]] = []
        self.env = {
            **os.environ,
            "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PUSHGATE_PASSWORD": PASSWORD,
        }

    @property
    def etc(self) -> Path:
        return self.private["/etc/pushgate"]

    def start(self, block: Block, number: int) -> subprocess.Popen:
        script = self.logs / f"block{number}.sh"
        script.write_text(substituted(block.text))
        mounts = " && ".join(f"mount --bind {ours} {path}" for path, ours in self.private.items())
        namespace = self.gw if block.section == "gateway" else self.client
        with open(self.logs / f"block{number}.log", "w") as log:
            process = self.lab.start(
                namespace,
                [
                    "sh",
                    "-c",
                    f'{mounts} && cd "$1" && exec bash -e "$2"',
                    "sh",
                    self.workdir,
                    script,
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append((block, process))
        return process

    def log(self, number: int) -> str:
        return (self.logs / f"block{number}.log").read_text()

    def config(self) -> gateway_config.GatewayConfig:
        return gateway_config.load(str(self.etc / "pushgate.toml"), auth=True)

    def gateway_up(self) -> bool:
        try:
            cfg = self.config()
            http_get(self.gw, cfg.auth.metrics_listen[1], "/metrics", timeout=2)
            http_get(self.gw, cfg.dataplane.metrics_listen[1], "/metrics", timeout=2)
        except (OSError, gateway_config.ConfigError):
            return False
        return True

    def tunnel_up(self) -> bool:
        ping = ["ping", "-c", "1", "-W", "1", LAN_HOST]
        return self.lab.exec(self.client, ping, check=False).returncode == 0

    def dataplane_metrics(self) -> dict:
        port = self.config().dataplane.metrics_listen[1]
        return metrics.parse(http_get(self.gw, port, "/metrics").decode())

    def hand_over(self) -> None:
        for name in GIVEN_TO_CLIENTS:
            shutil.copy(self.etc / name, self.workdir / os.path.basename(name))

    def stop_all(self) -> None:
        """Every block's process group (the services a block left running too)."""
        for _, process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for namespace in (self.client, self.gw):
            with contextlib.suppress(TimeoutError):
                wait_for(lambda ns=namespace: not self.pids(ns), 15, what=f"{namespace} empty")

    def pids(self, namespace: str) -> list[str]:
        result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        return result.stdout.split()


@pytest.fixture
def readme_lab(tmp_path):
    with Lab("pgreadme") as lab:
        world = ReadmeLab(lab, tmp_path)
        try:
            yield world
        finally:
            world.stop_all()


def run_section(world: ReadmeLab, blocks: list[Block], number: int, up) -> int:
    """Start each block after the one before has exited (status 0) or `up()` holds."""
    for block in blocks:
        process = world.start(block, number)
        where = f"README.md:{block.line} ({block.section})"
        wait_for(
            lambda p=process: p.poll() is not None or up(),
            UP_SECONDS,
            what=f"{where} to end or its section to come up",
        )
        if process.poll() is not None:
            assert process.returncode == 0, f"{where} failed:\n{world.log(number)}"
        number += 1
    return number


def test_the_readme_sets_up_a_gateway_and_a_client_that_tunnel(readme_lab):
    world = readme_lab
    blocks = readme_blocks()
    gateway = [block for block in blocks if block.section == "gateway"]
    client = [block for block in blocks if block.section == "client"]

    number = run_section(world, gateway, 0, world.gateway_up)
    wait_for(world.gateway_up, UP_SECONDS, what="pushgate-auth and pushgate-dataplane")
    world.hand_over()

    tunnel_seen = False

    def client_up() -> bool:
        nonlocal tunnel_seen
        if not world.tunnel_up():
            return False
        if tunnel_seen:  # checked once; later blocks may be taking it down
            return True
        # Traffic flows through the tunnel: the lan host answers (it has no route back
        # but through the gateway's NAT) and the dataplane counted the packets.
        before = metrics.total(
            world.dataplane_metrics(), "pushgate_dataplane_packets_total", direction="inbound"
        )
        ping = world.lab.exec(
            world.client, ["ping", "-c", "5", "-i", "0.2", "-W", "2", LAN_HOST], check=False
        )
        after = metrics.total(
            world.dataplane_metrics(), "pushgate_dataplane_packets_total", direction="inbound"
        )
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        assert after - before >= 5, (before, after)
        tunnel_seen = True
        return True

    first_client = number
    run_section(world, client, number, client_up)
    assert tunnel_seen, "the client section ended without the tunnel ever passing traffic"
    for offset, (block, process) in enumerate(world.processes[len(gateway) :]):
        try:
            process.wait(UP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"README.md:{block.line} still runs after its section ended")
        log = world.log(first_client + offset)
        assert process.returncode == 0, f"README.md:{block.line} failed:\n{log}"
    assert not world.tunnel_up(), "the tunnel is still up after the client section"
    routes = world.lab.exec(world.client, ["ip", "route"]).stdout
    assert not re.search(r"^(0\.0\.0\.0|128\.0\.0\.0)/1 ", routes, re.M), routes
