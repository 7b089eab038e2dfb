"""Identity end to end (issue 19) in network namespaces (netlab.gateway): alice signs
in by single sign-on at a real OpenID provider (oidc-provider-mock, served over HTTPS
with a test CA on the gateway's address), tunnels traffic, renews twice with her
renewal token while the provider is down, and is cut off within 2 s when disabled;
bob, a TOTP user, needs the code.

The browser step is driven by the test, in the client's namespace: the provider's
page, its form posted, its redirect followed to the client's loopback listener.
The auth service, the client and that "browser" trust the test CA through
SSL_CERT_FILE (OpenSSL's default verify paths)."""

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auth_service import totp
from auth_service.pki import make_ca, make_server_cert
from client.auth import EXIT_ACCESS_REVOKED, EXIT_ERROR
from netlab import Lab, wait_for
from netlab.auth import free_port
from netlab.gateway import AUTH_PORT, GATEWAY, LAN_HOST, PASSWORD, GatewayLab, tool

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

CUT_OFF_WITHIN_SECONDS = 2.0  # issue 19: after `user disable` returns
SESSION_LIFETIME_SECONDS = 8  # short: the client has to renew soon and often

BROWSER = """
import sys, urllib.parse, urllib.request
url = sys.argv[1]
assert b'name="sub"' in urllib.request.urlopen(url, timeout=10).read()
form = urllib.parse.urlencode({"sub": sys.argv[2]}).encode()
print(urllib.request.urlopen(url, data=form, timeout=10).read().decode())
"""
PROVIDER = """
import json, sys, uvicorn
from oidc_provider_mock import app
from oidc_provider_mock._storage import User
host, port, cert, key, claims = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
claims = json.loads(claims)
user = User(sub=claims.pop("sub"), claims=claims)
uvicorn.run(app(require_nonce=True, user_claims=[user]), interface="wsgi", host=host, port=port,
            log_config=None, ssl_certfile=cert, ssl_keyfile=key)
"""


def _provider_tls(directory: Path) -> tuple[str, str, str]:
    """(CA, certificate, key) files for the provider at GATEWAY."""
    now = datetime.datetime.now(datetime.UTC)
    ca_pem, _, ca_cert, ca_key = make_ca("identity e2e test CA", now, [GATEWAY])
    cert_pem, key_pem = make_server_cert([GATEWAY], ca_cert, ca_key, now)
    paths = tuple(str(directory / name) for name in ("idp-ca.crt", "idp.crt", "idp.key"))
    for path, data in zip(paths, (ca_pem, cert_pem, key_pem), strict=True):
        Path(path).write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("identity-e2e"))
    idp_ca, idp_cert, idp_key = _provider_tls(Path(workdir))
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = idp_ca  # inherited by what the lab starts
    with Lab("pgidn") as lab:
        gw = GatewayLab(lab, workdir, clients=1, keepalive_seconds=2)
        provider_port = free_port()
        issuer = f"https://{GATEWAY}:{provider_port}"
        text = Path(gw.config).read_text()
        text = re.sub(
            r"(?m)^session_lifetime_seconds = .*$",
            f"session_lifetime_seconds = {SESSION_LIFETIME_SECONDS}",
            text,
        )
        text += (
            f'\n[oidc]\nissuer = "{issuer}"\nclient_id = "pushgate"\n'
            'public_client_secret = "public"\nauto_provision = true\n'
        )
        Path(gw.config).write_text(text)
        claims = {"sub": "s-alice", "preferred_username": "alice", "groups": ["eng"]}
        gw.provider = lab.start(
            gw.gw,
            [
                sys.executable,
                "-c",
                PROVIDER,
                GATEWAY,
                str(provider_port),
                idp_cert,
                idp_key,
                json.dumps(claims),
            ],
            stdout=gw._log("provider"),
            stderr=subprocess.STDOUT,
        )
        discovery = issuer + "/.well-known/openid-configuration"
        curl = ["curl", "-sf", "--cacert", idp_ca]
        wait_for(
            lambda: gw.lab.exec(gw.clients[0], [*curl, discovery], check=False).stdout,
            30,
            what="the OpenID provider answering",
        )
        gw.add_user("bob")
        gw.start()
        yield gw
    if saved is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = saved


def _client_log(gw: GatewayLab, index: int = 0) -> str:
    return Path(gw.workdir, f"client{index}.log").read_text()


def _start_client(gw: GatewayLab, *args: str, env: dict | None = None):
    gw.client_processes[0] = gw.lab.start(
        gw.clients[0],
        [
            *gw.client_command(0),
            "connect",
            "--server",
            f"{gw.server_host}:{AUTH_PORT}",
            "--ca",
            gw.ca,
            "--dead-after",
            "3",
            *args,
        ],
        stdout=gw._log("client0"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    return gw.client_processes[0]


def test_sso_login_traffic_renewals_without_the_provider_and_disable(gateway):
    gw = gateway
    client = _start_client(gw, "--sso", "--no-browser")
    url = wait_for(
        lambda: re.search(r"https://\S+/oauth2/authorize\?\S+", _client_log(gw)),
        30,
        what="the client printing the sign-in URL",
    ).group(0)
    landed = gw.lab.exec(gw.clients[0], [sys.executable, "-c", BROWSER, url, "s-alice"])
    assert "signed in" in landed.stdout, landed.stderr
    wait_for(lambda: gw.status(0).get("state") == "up", 30, what="the SSO client up")
    assert gw.ping(0, LAN_HOST, count=3).returncode == 0

    gw.lab.stop(gw.provider)  # renewals need neither the provider nor a password
    renewals = "session renewed without a new sign-in"
    wait_for(
        lambda: _client_log(gw).count(renewals) >= 2,
        4 * SESSION_LIFETIME_SECONDS + 30,
        what="two renewals",
    )
    wait_for(lambda: gw.status(0).get("state") == "up", 30, what="up after the renewals")
    assert gw.ping(0, LAN_HOST, count=3).returncode == 0
    auth_log = Path(gw.workdir, "auth.log").read_text()
    assert "single sign-on user='alice' groups=eng" in auth_log
    assert len(re.findall(r"login ok user='alice' method=renewal", auth_log)) >= 2

    pinger = gw.lab.start(
        gw.clients[0],
        ["ping", "-D", "-n", "-i", "0.2", "-W", "1", LAN_HOST],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: "bytes from" in (pinger.stdout.readline() or ""), 10, what="pings flowing")
    result = subprocess.run(
        [tool("pushgate-admin"), "user", "disable", "alice", "--config", gw.config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    disabled_at = time.time()
    assert result.returncode == 0, result.stderr
    code = client.wait(60)
    gw.client_processes.pop(0)
    assert code == EXIT_ACCESS_REVOKED, _client_log(gw)[-2000:]
    gw.lab.stop(pinger)
    replies = [
        float(stamp)
        for stamp in re.findall(r"^\[(\d+\.\d+)\].*bytes from", pinger.stdout.read(), re.M)
    ]
    late = [stamp - disabled_at for stamp in replies if stamp > disabled_at]
    assert not late or max(late) < CUT_OFF_WITHIN_SECONDS, late


def test_a_totp_user_needs_the_code(gateway):
    gw = gateway
    enrolled = subprocess.run(
        [tool("pushgate-admin"), "user", "totp", "enroll", "bob", "--config", gw.config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    secret = re.search(r"secret=([A-Z2-7]+)", enrolled.stdout).group(1)
    env = {k: v for k, v in os.environ.items() if k != "PUSHGATE_OTP_CODE"}
    client = _start_client(gw, "--user", "bob", "--password-file", gw.password_file, env=env)
    assert client.wait(60) == EXIT_ERROR
    assert "needs a one-time code" in _client_log(gw)
    env["PUSHGATE_OTP_CODE"] = totp.code_at(secret, int(time.time() // 30))
    _start_client(gw, "--user", "bob", "--password-file", gw.password_file, env=env)
    wait_for(lambda: gw.status(0).get("state") == "up", 30, what="bob up with his code")
    assert gw.ping(0, LAN_HOST, count=3).returncode == 0
    gw.disconnect(0)
    assert PASSWORD not in _client_log(gw)
