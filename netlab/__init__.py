"""Throw-away network namespaces for the demo, end-to-end tests and benchmarks.

Every namespace is named `<prefix>-<pid>-<name>` so a run only ever removes its
own, and every process started through a `Lab` is killed (by PID, with its
process group) when the lab closes, even after a failure. Addresses come from
198.18.0.0/15 only; nothing is routed outside the namespaces.
"""

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence

ALLOWED = ipaddress.ip_network("198.18.0.0/15")
# Set by `make test-fast`, which leaves out the tests marked netns or processes
# (pyproject.toml): a test that builds a lab or starts a pushgate-auth there was
# not marked, and fails saying so.
FAST_TIER_ENV = "PUSHGATE_FAST_TIER"


class TestNotMarked(RuntimeError):
    """The fast tier ran a test that needs a marker (netns or processes)."""


def refuse_in_fast_tier(what: str, marker: str) -> None:
    if os.environ.get(FAST_TIER_ENV):
        raise TestNotMarked(
            f"this test {what}: mark it {marker} (`pytestmark = pytest.mark.{marker}` "
            "for a module) so that `make test` runs it and `make test-fast` leaves it out"
        )


def _check_address(interface: str) -> None:
    address = ipaddress.ip_interface(interface).ip
    if address not in ALLOWED and not address.is_loopback:
        raise ValueError(f"{interface}: test hosts use 198.18.0.0/15 only")


class Lab:
    def __init__(self, prefix: str = "pglab") -> None:
        refuse_in_fast_tier("builds network namespaces (netlab.Lab)", "netns")
        self.prefix = f"{prefix}-{os.getpid()}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self._links = 0

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def namespace(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        subprocess.run(["ip", "netns", "add", full], check=True)
        self.namespaces.append(full)
        self.exec(full, ["ip", "link", "set", "lo", "up"])
        return full

    def hosts(self, ns: str, names: dict[str, str]) -> None:
        """Name -> address entries for `ns`: `ip netns exec` bind-mounts
        /etc/netns/NS/hosts over /etc/hosts for what runs inside."""
        for address in names.values():
            _check_address(address)
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        with open(f"/etc/netns/{ns}/hosts", "w") as handle:
            handle.write("127.0.0.1 localhost\n")
            handle.writelines(f"{address} {name}\n" for name, address in names.items())

    def link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> tuple[str, str]:
        """A veth pair between two namespaces; returns the two device names."""
        _check_address(addr_a)
        _check_address(addr_b)
        self._links += 1
        tag = f"{os.getpid() % 100000}{self._links}"
        dev_a, dev_b = f"va{tag}", f"vb{tag}"
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                dev_a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                ns_b,
            ],
            check=True,
        )
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            self.exec(ns, ["ip", "address", "add", addr, "dev", dev])
            self.exec(ns, ["ip", "link", "set", dev, "up"])
        return dev_a, dev_b

    def exec(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def start(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], start_new_session=True, **kwargs
        )
        self.processes.append(process)
        return process

    def stop(
        self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10
    ) -> int | None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        return process.returncode

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process, timeout=5)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            # Anything still inside (a stray child) goes with the namespace.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.namespaces.clear()


def socket_in(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in namespace `ns`, for use in this process.

    A child started inside the namespace creates it and hands the descriptor
    back over a Unix socket pair (SCM_RIGHTS); a socket keeps the namespace it
    was created in.
    """
    ours, theirs = socket.socketpair()
    code = (
        "import socket,sys;"
        f"s=socket.socket({int(family)},{int(kind)},{int(proto)});"
        f"c=socket.socket(fileno={theirs.fileno()});"
        "socket.send_fds(c,[b'x'],[s.fileno()])"
    )
    with ours, theirs:
        subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            pass_fds=[theirs.fileno()],
            check=True,
            timeout=30,
        )
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    return socket.socket(fileno=fds[0])


def http_get(ns: str, port: int, path: str, timeout: float = 10) -> bytes:
    """The body of GET http://127.0.0.1:PORT/PATH inside namespace `ns` (HTTP/1.0)."""
    conn = socket_in(ns, kind=socket.SOCK_STREAM)
    with conn:
        conn.settimeout(timeout)
        conn.connect(("127.0.0.1", port))
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while data := conn.recv(65536):
            chunks.append(data)
    return b"".join(chunks).split(b"\r\n\r\n", 1)[1]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll until `predicate()` is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# Runs a command as user `nobody`: setpriv (util-linux) drops to it; Debian's own
# python3, since ours may live where `nobody` cannot read.
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOBODY_PYTHON = "/usr/bin/python3"
NOBODY_UID = 65534


def refuses_nobody(path: str) -> bool:
    """Whether user `nobody` is refused connecting to the Unix socket at `path` by the
    socket's own mode: the directories on the way are opened up for the probe (and
    closed again), so only the socket's permissions can refuse."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1]); print('connected')\n"
        "except PermissionError: print('refused')\n"
    )
    return run_as_nobody(probe, path).stdout.strip() == "refused"


def run_as_nobody(script: str, path: str) -> subprocess.CompletedProcess:
    """Run the Python `script` as user `nobody` with `path` as its argument, the
    directories above `path` opened for it meanwhile (so only `path`'s own
    permissions decide what it may do there)."""
    with directories_opened(os.path.dirname(path)):
        return subprocess.run(
            [*AS_NOBODY, NOBODY_PYTHON, "-c", script, path],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
        )


@contextlib.contextmanager
def directories_opened(directory: str):
    """`directory` and those above it readable and searchable by group and others for
    a while (for a process a test runs as another user), then as they were."""
    opened = []
    directory = os.path.abspath(directory)
    while directory != "/":
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if mode & 0o055 != 0o055:
            opened.append((directory, mode))
            os.chmod(directory, mode | 0o055)
        directory = os.path.dirname(directory)
    try:
        yield
    finally:
        for path, mode in opened:
            os.chmod(path, mode)
