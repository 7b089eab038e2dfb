"""Run a real pushgate-auth (subprocess) with a fresh gateway directory: on 127.0.0.1,
or inside a netlab namespace (`lab`, `namespace`) listening on every address there."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from netlab import Lab, http_get, refuse_in_fast_tier
from pushgate_api import auth_pb2, auth_pb2_grpc, control_pb2_grpc

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin(*args: str, password: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PUSHGATE_PASSWORD", None)
    if password is not None:
        env["PUSHGATE_PASSWORD"] = password
    return subprocess.run(
        [os.path.join(BIN, "pushgate-admin"), *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def use_database(config_text: str, directory: str, url: str) -> str:
    """`config_text` with the auth service's store in PostgreSQL at `url` (written to
    `directory`/database-url, mode 0600, as an operator would)."""
    url_file = os.path.join(directory, "database-url")
    with open(os.open(url_file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(url + "\n")
    return config_text.replace("[auth]\n", f'[auth]\ndatabase_url_file = "{url_file}"\n', 1)


class AuthServer:
    def __init__(
        self,
        directory: str,
        *,
        network: str = "198.19.0.0/24",
        settings: dict[str, str] | None = None,
        lab: Lab | None = None,
        namespace: str | None = None,
        server_names: tuple[str, ...] = ("localhost",),
        init_args: tuple[str, ...] = (),
        database_url: str | None = None,
    ) -> None:
        refuse_in_fast_tier("starts a pushgate-auth (netlab.auth.AuthServer)", "processes")
        self.directory = directory
        self.lab, self.namespace = lab, namespace
        self.port = free_port()
        self.metrics_port = free_port()
        listen = "0.0.0.0" if namespace else "127.0.0.1"
        result = admin(
            "init",
            "--dir",
            directory,
            *(arg for name in server_names for arg in ("--server-name", name)),
            "--auth-listen",
            f"{listen}:{self.port}",
            "--dataplane-endpoint",
            "198.18.0.1:51820",
            "--tunnel-network",
            network,
            *init_args,
        )
        assert result.returncode == 0, result.stderr
        self.config = os.path.join(directory, "pushgate.toml")
        text = (
            Path(self.config)
            .read_text()
            .replace("127.0.0.1:9101", f"127.0.0.1:{self.metrics_port}")
        )
        for key, value in (settings or {}).items():
            text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
            assert count == 1, key
        if database_url is not None:  # a shared PostgreSQL instead of the SQLite file
            text = use_database(text, directory, database_url)
        with open(self.config, "w") as handle:
            handle.write(text)
        self.ca = Path(directory, "tls", "ca.crt").read_bytes()
        self.control_socket = os.path.join(directory, "run", "control.sock")
        self.process: subprocess.Popen | None = None
        self.channels: list[grpc.Channel] = []

    def add_user(self, name: str, password: str) -> None:
        result = admin("user", "add", name, "--config", self.config, password=password)
        assert result.returncode == 0, result.stderr

    def start(self) -> "AuthServer":
        self.log = open(os.path.join(self.directory, "auth.log"), "a")  # noqa: SIM115
        argv = [os.path.join(BIN, "pushgate-auth"), "--config", self.config]
        if self.namespace:
            self.process = self.lab.start(
                self.namespace, argv, stdout=self.log, stderr=subprocess.STDOUT
            )
        else:
            self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.namespace:
                # The control socket is served after the client port, and a Unix
                # socket is seen from outside the namespace.
                if os.path.exists(self.control_socket):
                    return self
                time.sleep(0.1)
            else:
                try:
                    grpc.channel_ready_future(self.channel()).result(timeout=1)
                    if os.path.exists(self.control_socket):
                        return self
                except grpc.FutureTimeoutError:
                    pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(Path(self.directory, "auth.log").read_text())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()
        if self.namespace and self.process is not None:
            self.lab.stop(self.process, sig, timeout=15)
        elif self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)
        self.process = None
        self.log.close()

    def channel(self, root: bytes | None = None) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=root or self.ca)
        channel = grpc.secure_channel(f"localhost:{self.port}", credentials)
        self.channels.append(channel)
        return channel

    def stub(self) -> auth_pb2_grpc.AuthStub:
        return auth_pb2_grpc.AuthStub(self.channel())

    def feed(self) -> control_pb2_grpc.SessionFeedStub:
        channel = grpc.insecure_channel(f"unix:{self.control_socket}")
        self.channels.append(channel)
        return control_pb2_grpc.SessionFeedStub(channel)

    def metrics_text(self) -> str:
        if self.namespace:
            return http_get(self.namespace, self.metrics_port, "/metrics").decode()
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as response:
            return response.read().decode()

    def login(self, user: str, password: str) -> auth_pb2.LoginResponse:
        return self.stub().Login(
            auth_pb2.LoginRequest(username=user, password=password), timeout=30
        )
