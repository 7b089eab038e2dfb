"""The one-file client executable that `make client-exe` builds (PyInstaller,
release/pushgate-client.spec): it runs, it carries the checked wintun.dll and
its licence, and on Linux it connects through a real tunnel like the installed
client does.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.status import ClientStatus, write_status
from netlab import Lab
from netlab.gateway import LAN_HOST, GatewayLab
from release import wintun_dll

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / "dist" / ("pushgate-client.exe" if sys.platform == "win32" else "pushgate-client")


@pytest.fixture(scope="module")
def exe() -> Path:
    if not EXE.is_file():
        pytest.fail(f"{EXE} is missing: `make client-exe` builds it (`make test` does too)")
    return EXE


def run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_help(exe):
    result = run(exe, "--help")
    assert result.returncode == 0, result.stderr
    assert "pushgate-client" in result.stdout
    for command in ("connect", "status", "disconnect"):
        assert command in result.stdout


def test_the_executable_runs_the_compiled_hot_path(exe):
    """PyInstaller bundled the compiled packet cipher and TUN write merge (and the
    libcrypto the cipher links), so the Linux executable does not fall back."""
    result = run(exe, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("(hot path: compiled)\n"), result.stdout


def test_status_without_and_with_a_client(exe, tmp_path):
    result = run(exe, "--status-dir", str(tmp_path), "status")
    assert (result.returncode, result.stdout.strip()) == (1, "not connected (no client on pgc0)")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    status = ClientStatus(pid, "up", "pgc0", "198.18.0.1:7443", tunnel_address="198.19.0.2/24")
    write_status(str(tmp_path / "client-pgc0.json"), status)
    result = run(exe, "--status-dir", str(tmp_path), "status")
    assert result.returncode == 0, result.stderr
    assert f"state:          up (client pid {pid} is gone)" in result.stdout
    assert "pgc0 198.19.0.2/24" in result.stdout


def test_the_bundle_carries_the_checked_dll_and_its_licence(exe):
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(str(exe))
    dll = archive.extract("wintun.dll")
    assert hashlib.sha256(dll).hexdigest() == wintun_dll.PINNED_SHA256["amd64"]
    assert wintun_dll.check_dll(dll) == []
    assert b"Prebuilt Binaries License" in archive.extract("wintun-LICENSE.txt")


class ExecutableGatewayLab(GatewayLab):
    """The gateway lab with its client run from the built executable."""

    exe: Path

    def client_command(self, index: int) -> list[str]:
        return [str(self.exe), *super().client_command(index)[1:]]


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_the_executable_tunnels_on_linux(exe, tmp_path):
    with Lab("pgexe") as lab:
        gw = ExecutableGatewayLab(lab, str(tmp_path), clients=1, keepalive_seconds=2)
        gw.exe = exe
        gw.add_user("alice")
        gw.start()
        gw.connect(0, "alice")
        assert gw.ping(0, LAN_HOST, count=2).returncode == 0
        assert gw.status(0)["state"] == "up"
        gw.disconnect(0)
        links = lab.exec(gw.clients[0], ["ip", "-o", "link"]).stdout
        assert "pgc0" not in links
