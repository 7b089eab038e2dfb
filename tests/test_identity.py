"""Identity (issue 19): one-time codes, renewal tokens, single sign-on (OpenID Connect).

Real parts: a real pushgate-auth over TLS; a real OpenID provider process
(oidc-provider-mock) whose login form the test posts like a browser would; and, for
the token cases a provider will not produce on request (expired, wrong audience,
wrong issuer, bad signature), a small issuer served over real HTTP on 127.0.0.1 by
the test itself (discovery document and JWKS), whose keys the test holds.
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from auth_service import totp
from auth_service.oidc import (
    JWKS_REFETCH_SECONDS,
    Identity,
    NonceBook,
    OidcSettings,
    Provider,
    ProviderUnreachable,
    TokenRejected,
    identity_from_claims,
)
from client import profile
from client.auth import AuthClient, refusal_of
from client.sso import SsoOptions, callback_result, pkce_pair, sso_login
from netlab import metrics, wait_for
from netlab.auth import AuthServer, admin, free_port
from pushgate_api import auth_pb2, control_pb2

PASSWORD = "correct horse battery staple"
CLIENT_ID = "pushgate-test"


def _refusal(call) -> tuple[grpc.StatusCode, auth_pb2.Refusal]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    refusal = refusal_of(caught.value)
    assert refusal is not None, caught.value
    return caught.value.code(), refusal


def _configure(server: AuthServer, oidc: str) -> None:
    """Add an [oidc] table to the config."""
    with open(server.config, "a") as handle:
        handle.write("\n[oidc]\n" + oidc)


# -- one-time codes: pure, fixed clock --------------------------------------------

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_800_000_015.0  # 15 s into a step
STEP = int(NOW // 30)


def test_totp_right_code_reused_code_wrong_code_and_skew():
    right = totp.code_at(SECRET, STEP)
    assert totp.matching_step(SECRET, right, NOW, None) == STEP
    assert totp.matching_step(SECRET, right, NOW, STEP) is None  # used once already
    assert totp.matching_step(SECRET, right, NOW, STEP + 1) is None  # a later one was
    wrong = f"{(int(right) + 1) % 10**6:06d}"
    assert totp.matching_step(SECRET, wrong, NOW, None) is None
    assert totp.matching_step(SECRET, "12345", NOW, None) is None  # not 6 digits
    assert totp.matching_step(SECRET, "abcdef", NOW, None) is None
    # one step of skew either way is accepted, two are not
    assert totp.matching_step(SECRET, totp.code_at(SECRET, STEP - 1), NOW, None) == STEP - 1
    assert totp.matching_step(SECRET, totp.code_at(SECRET, STEP + 1), NOW, None) == STEP + 1
    assert totp.matching_step(SECRET, totp.code_at(SECRET, STEP - 2), NOW, None) is None
    assert totp.matching_step(SECRET, totp.code_at(SECRET, STEP + 2), NOW, None) is None
    # the code of the step before, after the current step's code was used: refused
    assert totp.matching_step(SECRET, totp.code_at(SECRET, STEP - 1), NOW, STEP) is None


def test_totp_secrets_and_uri():
    secret = totp.new_secret()
    assert totp.secret_problem(secret) is None
    assert totp.secret_problem("not base32!") is not None
    assert totp.secret_problem("JBSWY3DP") is not None  # 40 bits
    uri = totp.provisioning_uri(secret, "alice")
    assert uri.startswith("otpauth://totp/") and f"secret={secret}" in uri and "alice" in uri


def _current_code(secret: str, after_step: int | None = None) -> tuple[str, int]:
    """A code the server accepts now: of the current step, later than `after_step`."""
    step = int(time.time() // 30)
    if after_step is not None and step <= after_step:
        step = after_step + 1  # one step ahead is within the accepted skew
    return totp.code_at(secret, step), step


def _secret_of(server: AuthServer, name: str) -> str:
    with contextlib.closing(sqlite3.connect(Path(server.directory, "pushgate.db"))) as db:
        return db.execute("SELECT totp_secret FROM users WHERE name=?", (name,)).fetchone()[0]


@pytest.mark.processes
def test_totp_user_needs_the_code_once_and_wrong_codes_are_throttled(tmp_path):
    server = AuthServer(
        str(tmp_path / "gw"),
        settings={"max_failures_before_delay": "3", "failure_delay_seconds": "30.0"},
    )
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        enrolled = admin("user", "totp", "enroll", "alice", "--config", server.config)
        assert enrolled.returncode == 0, enrolled.stderr
        secret = _secret_of(server, "alice")
        assert secret in enrolled.stdout and "otpauth://totp/" in enrolled.stdout
        stub = server.stub()

        def login(password=PASSWORD, code=""):
            request = auth_pb2.LoginRequest(username="alice", password=password, otp_code=code)
            return stub.Login(request, timeout=30)

        code, refusal = _refusal(login)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert refusal.reason == auth_pb2.REFUSAL_REASON_OTP_REQUIRED
        # a wrong password does not learn that a code is needed
        code, refusal = _refusal(lambda: login("wrong"))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS
        good, step = _current_code(secret)
        assert login(code=good).session_id
        code, refusal = _refusal(lambda: login(code=good))  # the same code again
        assert refusal.reason == auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS
        # wrong codes count like wrong passwords (the success above cleared the count):
        # the reused code and three wrong ones pass the limit of 3 (as four wrong
        # passwords do, tests/test_auth_service.py); then even a right code waits
        for delta in (1, 2, 3):
            wrong = f"{(int(good) + delta) % 10**6:06d}"
            code, refusal = _refusal(lambda w=wrong: login(code=w))
            assert refusal.reason == auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS
        fresh, _ = _current_code(secret, step)
        code, refusal = _refusal(lambda: login(code=fresh))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_THROTTLED
        samples = metrics.parse(server.metrics_text())
        by_method = "pushgate_auth_logins_by_method_total"
        assert metrics.total(samples, by_method, method="totp", result="success") == 1
        assert metrics.total(samples, by_method, method="totp", result="otp_required") == 1
        removed = admin("user", "totp", "remove", "alice", "--config", server.config)
        assert removed.returncode == 0, removed.stderr
        assert "removed" in removed.stdout
    finally:
        server.stop()
    audit = Path(server.directory, "audit.log").read_text()
    assert secret not in audit and secret not in Path(server.directory, "auth.log").read_text()
    assert '"action": "user_totp_enroll"' in audit


# -- renewal tokens ------------------------------------------------------------------


def _renew(stub, token: str) -> auth_pb2.LoginResponse:
    return stub.Renew(auth_pb2.RenewRequest(renewal_token=token), timeout=30)


@pytest.mark.processes
def test_renewal_rotates_ends_the_old_session_and_is_stored_hashed(tmp_path):
    server = AuthServer(str(tmp_path / "gw"))
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        stub = server.stub()
        first = server.login("alice", PASSWORD)
        assert first.renewal_token and first.username == "alice"
        lifetime = first.renewal_expires_at_unix_ms / 1000 - time.time()
        assert 7 * 86400 - 60 < lifetime <= 7 * 86400  # the default week
        second = _renew(stub, first.renewal_token)
        assert second.session_id != first.session_id and second.session_token
        assert second.renewal_token not in ("", first.renewal_token)
        # the chain keeps the first login's end: renewing does not extend it
        assert second.renewal_expires_at_unix_ms == first.renewal_expires_at_unix_ms
        assert second.tunnel_address == first.tunnel_address  # sticky address
        # the session the token was bound to is over; the used token is refused
        info = auth_pb2.SessionInfoRequest(session_token=first.session_token)
        code, refusal = _refusal(lambda: stub.SessionInfo(info, timeout=30))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SESSION_UNKNOWN
        code, refusal = _refusal(lambda: _renew(stub, first.renewal_token))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert refusal.reason == auth_pb2.REFUSAL_REASON_RENEWAL_REFUSED
        third = _renew(stub, second.renewal_token)
        # logging out ends renewal too
        stub.Logout(auth_pb2.LogoutRequest(session_token=third.session_token), timeout=30)
        code, refusal = _refusal(lambda: _renew(stub, third.renewal_token))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_RENEWAL_REFUSED
        samples = metrics.parse(server.metrics_text())
        by_method = "pushgate_auth_logins_by_method_total"
        assert metrics.total(samples, by_method, method="renewal", result="success") == 2
        assert metrics.total(samples, by_method, method="renewal", result="renewal_refused") == 2
        tokens = [first.renewal_token, second.renewal_token, third.renewal_token]
    finally:
        server.stop()
    data = b"".join(p.read_bytes() for p in Path(server.directory).glob("pushgate.db*"))
    logs = Path(server.directory, "auth.log").read_text()
    logs += Path(server.directory, "audit.log").read_text()
    for token in tokens:
        assert token.encode() not in data and token not in logs
    assert '"method": "renewal"' in logs


@pytest.mark.processes
@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (("user", "disable", "alice"), auth_pb2.REVOCATION_CAUSE_USER_DISABLED),
        (("user", "remove", "alice"), auth_pb2.REVOCATION_CAUSE_USER_REMOVED),
        (("session", "kick", "--user", "alice"), auth_pb2.REVOCATION_CAUSE_KICKED),
    ],
)
def test_disable_remove_and_kick_revoke_the_renewal_token(tmp_path, change, cause):
    server = AuthServer(str(tmp_path / "gw"))
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        login = server.login("alice", PASSWORD)
        result = admin(*change, "--config", server.config)
        assert result.returncode == 0, result.stderr
        if change[1] == "disable":  # enabled again: the token stays revoked
            assert admin("user", "enable", "alice", "--config", server.config).returncode == 0
        code, refusal = _refusal(lambda: _renew(server.stub(), login.renewal_token))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SESSION_REVOKED
        assert refusal.revocation == cause
    finally:
        server.stop()


@pytest.mark.processes
def test_renewal_lifetime_ends_and_zero_issues_none(tmp_path):
    server = AuthServer(str(tmp_path / "gw"), settings={"renewal_lifetime_seconds": "2"})
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        login = server.login("alice", PASSWORD)
        assert login.renewal_token
        time.sleep(2.2)
        _code, refusal = _refusal(lambda: _renew(server.stub(), login.renewal_token))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_RENEWAL_REFUSED
    finally:
        server.stop()
    off = AuthServer(str(tmp_path / "gw2"), settings={"renewal_lifetime_seconds": "0"})
    off.add_user("alice", PASSWORD)
    off.start()
    try:
        login = off.login("alice", PASSWORD)
        assert login.renewal_token == "" and login.renewal_expires_at_unix_ms == 0
    finally:
        off.stop()


# -- single sign-on: an issuer the test holds the keys of ---------------------------


def _rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Issuer:
    """An OpenID issuer over real HTTP on 127.0.0.1: discovery and JWKS only (the
    test mints the ID tokens with its keys)."""

    def __init__(self) -> None:
        self.keys = {"k1": _rsa_key()}
        issuer = self
        self.jwks_fetches = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {
                        "issuer": issuer.url,
                        "authorization_endpoint": issuer.url + "/authorize",
                        "token_endpoint": issuer.url + "/token",
                        "jwks_uri": issuer.url + "/jwks",
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = {"keys": [issuer.jwk(kid) for kid in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def jwk(self, kid: str) -> dict:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
        return {**public, "kid": kid, "use": "sig", "alg": "RS256"}

    def token(self, nonce: str, *, key=None, kid="k1", **claims) -> str:
        now = int(time.time())
        body = {
            "iss": self.url,
            "aud": CLIENT_ID,
            "sub": "0001",
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            "preferred_username": "alice",
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        signer = key or self.keys[kid]
        return jwt.encode(body, signer, algorithm="RS256", headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer():
    served = Issuer()
    yield served
    served.close()


def _oidc_table(issuer_url: str, auto_provision: bool = False) -> str:
    return (
        f'issuer = "{issuer_url}"\nclient_id = "{CLIENT_ID}"\n'
        f"auto_provision = {'true' if auto_provision else 'false'}\n"
    )


def _sso(stub, id_token: str) -> auth_pb2.LoginResponse:
    return stub.Login(auth_pb2.LoginRequest(id_token=id_token), timeout=30)


def _nonce(stub) -> str:
    return stub.BeginSso(auth_pb2.BeginSsoRequest(), timeout=30).nonce


@pytest.mark.processes
def test_id_token_checks_against_the_issuer(tmp_path, issuer):
    server = AuthServer(str(tmp_path / "gw"))
    _configure(server, _oidc_table(issuer.url))
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        stub = server.stub()
        begin = stub.BeginSso(auth_pb2.BeginSsoRequest(), timeout=30)
        assert begin.issuer == issuer.url and begin.client_id == CLIENT_ID
        assert begin.authorization_endpoint == issuer.url + "/authorize"
        assert "openid" in begin.scopes and begin.nonce
        good = issuer.token(begin.nonce)
        login = _sso(stub, good)
        assert login.username == "alice" and login.session_id and login.renewal_token
        # the same token (its nonce) a second time: a replay
        code, refusal = _refusal(lambda: _sso(stub, good))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SSO_REJECTED
        assert "nonce" in refusal_details(lambda: _sso(stub, good))
        # key rotation: the provider starts signing with a new key; the JWKS is fetched
        # again for the new key id (at most every JWKS_REFETCH_SECONDS, so first wait)
        time.sleep(JWKS_REFETCH_SECONDS + 0.2)
        issuer.keys["k2"] = _rsa_key()
        fetches = issuer.jwks_fetches
        assert _sso(stub, issuer.token(_nonce(stub), kid="k2")).username == "alice"
        assert issuer.jwks_fetches == fetches + 1
        now = int(time.time())
        other = _rsa_key()
        cases = {
            "expired": lambda n: issuer.token(n, iat=now - 900, exp=now - 600),
            "audience": lambda n: issuer.token(n, aud="someone-else"),
            "issuer": lambda n: issuer.token(n, iss="https://elsewhere.example"),
            "signature": lambda n: issuer.token(n, key=other),  # k1's name, another key
            "unknown key": lambda n: issuer.token(n, key=other, kid="k9"),
            "no nonce": lambda n: issuer.token(None),
            "nonce not ours": lambda n: issuer.token("made-up-nonce"),
        }
        for what, mint in cases.items():
            code, refusal = _refusal(lambda m=mint: _sso(stub, m(_nonce(stub))))
            assert code is grpc.StatusCode.UNAUTHENTICATED, what
            assert refusal.reason == auth_pb2.REFUSAL_REASON_SSO_REJECTED, what
        # a valid token for a user the gateway does not know, auto-provisioning off
        code, refusal = _refusal(
            lambda: _sso(stub, issuer.token(_nonce(stub), preferred_username="bob"))
        )
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SSO_UNKNOWN_USER
        assert "bob" not in admin("user", "list", "--config", server.config).stdout
        samples = metrics.parse(server.metrics_text())
        by_method = "pushgate_auth_logins_by_method_total"
        assert metrics.total(samples, by_method, method="sso", result="success") == 2
        assert metrics.total(samples, by_method, method="sso", result="sso_rejected") == 9
    finally:
        server.stop()
    logs = Path(server.directory, "auth.log").read_text()
    logs += Path(server.directory, "audit.log").read_text()
    assert good not in logs and good.split(".")[2] not in logs


def refusal_details(call) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.details()


@pytest.mark.processes
def test_auto_provisioning_and_an_unreachable_provider(tmp_path, issuer):
    server = AuthServer(str(tmp_path / "gw"))
    _configure(server, _oidc_table(issuer.url, auto_provision=True))
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        stub = server.stub()
        login = _sso(stub, issuer.token(_nonce(stub), preferred_username="carol"))
        assert login.username == "carol"
        listed = admin("user", "list", "--config", server.config).stdout
        assert "carol\tenabled" in listed
        # a provisioned account has no password that could ever match
        code, refusal = _refusal(lambda: server.login("carol", "!sso-only"))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS
        # a disabled account is refused even with a valid token
        assert admin("user", "disable", "carol", "--config", server.config).returncode == 0
        code, refusal = _refusal(
            lambda: _sso(stub, issuer.token(_nonce(stub), preferred_username="carol"))
        )
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SSO_UNKNOWN_USER
    finally:
        server.stop()
    # the provider gone: a clear refusal; password users are not affected
    down = AuthServer(str(tmp_path / "gw2"))
    _configure(down, _oidc_table(f"http://127.0.0.1:{free_port()}"))
    down.add_user("alice", PASSWORD)
    down.start()
    try:
        stub = down.stub()
        code, refusal = _refusal(lambda: stub.BeginSso(auth_pb2.BeginSsoRequest(), timeout=30))
        assert code is grpc.StatusCode.UNAVAILABLE
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SSO_UNAVAILABLE
        assert down.login("alice", PASSWORD).session_id
    finally:
        down.stop()


@pytest.mark.processes
def test_sso_refused_where_not_configured(tmp_path):
    server = AuthServer(str(tmp_path / "gw"))
    server.start()
    try:
        code, refusal = _refusal(
            lambda: server.stub().BeginSso(auth_pb2.BeginSsoRequest(), timeout=30)
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SSO_UNAVAILABLE
    finally:
        server.stop()


def test_claims_map_to_a_user_and_groups():
    settings = OidcSettings(issuer="https://idp.example", client_id=CLIENT_ID)
    identity = identity_from_claims(
        {"preferred_username": "alice", "groups": ["eng", "ops", "eng"]}, settings
    )
    assert identity == Identity("alice", "sso", ("eng", "ops"))
    assert identity_from_claims({"preferred_username": "alice"}, settings).groups is None
    by_mail = OidcSettings(
        issuer="https://idp.example",
        client_id=CLIENT_ID,
        username_claim="email",
        groups_claim="roles",
    )
    found = identity_from_claims({"email": "a@example.org", "roles": "admin"}, by_mail)
    assert found == Identity("a@example.org", "sso", ("admin",))
    with pytest.raises(TokenRejected):
        identity_from_claims({"email": "a@example.org", "email_verified": False}, by_mail)
    with pytest.raises(TokenRejected):
        identity_from_claims({"sub": "x"}, settings)
    with pytest.raises(TokenRejected):
        identity_from_claims({"preferred_username": "alice", "groups": [1]}, settings)


def test_nonces_are_single_use_and_expire():
    book = NonceBook(lifetime=10, limit=3)
    nonce, expires = book.issue(100.0)
    assert expires == 110.0
    assert book.take(nonce, 105.0) and not book.take(nonce, 105.0)
    late, _ = book.issue(100.0)
    assert not book.take(late, 110.0)
    first, _ = book.issue(200.0)
    for _ in range(3):
        book.issue(200.0)
    assert len(book) == 3 and not book.take(first, 201.0)  # the oldest went first
    assert not book.take(None, 201.0)


@pytest.mark.processes
def test_provider_validates_in_process_and_reports_groups(issuer):
    provider = Provider(OidcSettings(issuer=issuer.url, client_id=CLIENT_ID))
    identity, nonce = provider.validate(issuer.token("n1", groups=["eng"]))
    assert identity == Identity("alice", "sso", ("eng",)) and nonce == "n1"
    issuer.close()
    fresh = Provider(OidcSettings(issuer=issuer.url, client_id=CLIENT_ID, http_timeout_seconds=1))
    with pytest.raises(ProviderUnreachable):
        fresh.metadata()


# -- single sign-on with a real provider process --------------------------------------


class MockProvider:
    """oidc-provider-mock, a real OpenID provider (authlib), on 127.0.0.1."""

    def __init__(self, directory: Path, *users: dict) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "oidc_provider_mock", "-p", str(self.port), "-n", "true"]
        for claims in users:
            argv += ["--user-claims", json.dumps(claims)]
        self.log = open(directory / "provider.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._up, 30, what="oidc-provider-mock answering")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError("oidc-provider-mock exited")
        try:
            with urllib.request.urlopen(self.url + "/.well-known/openid-configuration", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)
        self.log.close()


def browser(url: str, sub: str, problems: list) -> None:
    """What a person's browser does: open the provider's page, post its form (the
    mock's: a subject to sign in as), follow the redirect to the client's loopback."""
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b'name="sub"' in page.read()
        form = urllib.parse.urlencode({"sub": sub}).encode()
        with urllib.request.urlopen(url, data=form, timeout=10) as landed:
            assert landed.geturl().startswith("http://127.0.0.1:")
            assert b"signed in" in landed.read()
    except Exception as error:  # reported by the test, not lost in the thread
        problems.append(error)


@pytest.mark.processes
def test_sso_with_a_real_provider_then_renewals_without_it(tmp_path):
    provider = MockProvider(
        tmp_path,
        {"sub": "s-alice", "preferred_username": "alice", "groups": ["eng", "ops"]},
    )
    server = AuthServer(str(tmp_path / "gw"))
    # the mock takes no public client (token endpoint auth "none"): a public secret
    _configure(server, _oidc_table(provider.url) + 'public_client_secret = "public"\n')
    with open(server.config, "a") as handle:  # eng is declared, ops is not
        handle.write('\n[groups.eng]\nallow = ["198.18.2.10/32 tcp 22"]\n')
    server.add_user("alice", PASSWORD)
    server.start()
    problems, browsers = [], []

    def announce(text: str) -> None:
        url = re.search(r"https?://\S+", text).group(0)
        assert url.startswith(provider.url + "/oauth2/authorize?")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert query["code_challenge_method"] == ["S256"] and query["nonce"][0]
        thread = threading.Thread(target=browser, args=(url, "s-alice", problems))
        thread.start()
        browsers.append(thread)

    async def scenario():
        client = AuthClient(f"localhost:{server.port}", str(Path(server.directory, "tls/ca.crt")))
        try:
            session = await sso_login(client, SsoOptions(open_browser=False, announce=announce))
            assert session.username == "alice" and session.renewal_token
            provider.stop()  # renewals need neither the provider nor the password
            renewed = await client.renew(session.renewal_token)
            again = await client.renew(renewed.renewal_token)
            assert len({session.session_id, renewed.session_id, again.session_id}) == 3
            assert await client.session_alive(again.token)
            assert not await client.session_alive(renewed.token)
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
        for thread in browsers:
            thread.join(15)
        assert not problems, problems
        log = Path(server.directory, "auth.log").read_text()
        assert "single sign-on user='alice' groups=eng,ops" in log  # the groups claim
        # ... is alice's membership from the provider (declared groups only), and
        # her live session's policy follows it
        listed = admin("group", "list", "--json", "--config", server.config)
        assert listed.returncode == 0, listed.stderr
        assert [(g["group"], g["members"]) for g in json.loads(listed.stdout)] == [
            ("eng", [{"user": "alice", "sources": ["idp"]}])
        ]
        listing = server.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        (session,) = listing.sessions
        assert ("198.18.2.10/32", 6) in [(r.destination, r.protocol) for r in session.policy.allow]
    finally:
        provider.stop()
        server.stop()


# -- the client's pieces ---------------------------------------------------------------


def test_pkce_and_the_loopback_callback():
    verifier, challenge = pkce_pair()
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert 43 <= len(verifier) <= 128
    assert callback_result("/callback?code=abc&state=s1", "s1") == ("abc", None)
    assert callback_result("/callback?code=abc&state=other", "s1") == (None, None)  # not ours
    assert callback_result("/favicon.ico", "s1") == (None, None)
    code, problem = callback_result("/callback?error=access_denied&state=s1", "s1")
    assert code is None and "access_denied" in problem
    assert callback_result("/callback?state=s1", "s1")[1] is not None


def test_an_sso_profile_needs_no_user():
    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    written = profile.Profile(server="vpn.example.net:7443", user="", ca_pem=ca, login="sso")
    loaded = profile.parse(written.to_toml())
    assert loaded.login == "sso" and loaded.user == ""
    with pytest.raises(profile.ProfileError):
        profile.parse(written.to_toml().replace('login = "sso"', 'login = "magic"'))
    with pytest.raises(profile.ProfileError):  # a password profile names its user
        profile.parse(written.to_toml().replace('login = "sso"\n', ""))


@pytest.mark.processes
def test_disabling_revokes_the_renewal_of_a_session_that_already_ended(tmp_path):
    """The laptop slept through its session's end: disabling (and enabling) the user
    meanwhile still revokes the renewal token, though no session was live to end."""
    server = AuthServer(str(tmp_path / "gw"), settings={"session_lifetime_seconds": "1"})
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        login = server.login("alice", PASSWORD)
        info = auth_pb2.SessionInfoRequest(session_token=login.session_token)

        def ended() -> bool:
            try:
                server.stub().SessionInfo(info, timeout=30)
            except grpc.RpcError as error:
                return refusal_of(error).reason == auth_pb2.REFUSAL_REASON_SESSION_UNKNOWN
            return False

        wait_for(ended, 10, what="the session to expire")
        for action in ("disable", "enable"):
            assert admin("user", action, "alice", "--config", server.config).returncode == 0
        _code, refusal = _refusal(lambda: _renew(server.stub(), login.renewal_token))
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SESSION_REVOKED
        assert refusal.revocation == auth_pb2.REVOCATION_CAUSE_USER_DISABLED
    finally:
        server.stop()


@pytest.mark.processes
def test_admin_writes_an_sso_profile(tmp_path):
    server = AuthServer(str(tmp_path / "gw"))
    server.add_user("alice", PASSWORD)
    result = admin("user", "profile", "alice", "--sso", "--config", server.config)
    assert result.returncode == 0, result.stderr
    assert profile.parse(result.stdout).login == "sso"
    plain = admin("user", "profile", "alice", "--config", server.config)
    assert profile.parse(plain.stdout).login == "password" and "login" not in plain.stdout
