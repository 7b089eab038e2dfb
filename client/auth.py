"""Talking to the auth service: login, renewal, rekey, session info, logout (gRPC over TLS).

Every failure becomes a `ClientError` with a message a person can act on, a
flag saying whether retrying can help, and the exit code pushgate-client ends
with if it cannot. What the auth service refused, and why, is read from the
`Refusal` in the error's google.rpc.Status details (protos/auth.proto), never
from its message text.
"""

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import NamedTuple

import grpc
from grpc_status import rpc_status

from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial
from pushgate_api import auth_pb2, auth_pb2_grpc

from . import profile

RPC_TIMEOUT_SECONDS = 10.0


def client_version() -> str:
    """What LoginRequest.client_version says (the admin's session list shows it)."""
    try:
        version = metadata.version("pushgate")
    except metadata.PackageNotFoundError:  # e.g. a one-file build without metadata
        version = "unknown"
    return f"{version} {sys.platform}"


RECONNECT_BACKOFF_MAX_MS = 5000


# pushgate-client's exit codes (README, "Exit codes"); 1 is a command's own "no".
EXIT_ERROR = 2  # any error retrying cannot fix (bad password, bad CA, bad options...)
EXIT_ACCESS_REVOKED = 3  # an administrator ended the session: do not reconnect on your own

_REVOCATIONS = {
    auth_pb2.REVOCATION_CAUSE_KICKED: "the session was ended",
    auth_pb2.REVOCATION_CAUSE_USER_DISABLED: "the account is disabled",
    auth_pb2.REVOCATION_CAUSE_USER_REMOVED: "the account was removed",
    auth_pb2.REVOCATION_CAUSE_PASSWORD_CHANGED: "the password was changed",
}


class ClientError(Exception):
    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class AccessRevoked(ClientError):
    """An administrator ended our session (kicked it, or disabled, removed or changed
    the password of the account): neither retrying nor logging in again helps."""

    exit_code = EXIT_ACCESS_REVOKED

    def __init__(self, cause: int) -> None:
        what = _REVOCATIONS.get(cause)
        super().__init__(
            "access revoked by the administrator" + (f": {what}" if what else ""),
            retryable=False,
        )
        self.cause = cause


class CodeRequired(ClientError):
    """The password was right and the account needs a one-time code."""

    def __init__(self) -> None:
        super().__init__(
            "this account needs a one-time code from its authenticator app: run "
            "pushgate-client in a terminal to be asked for it, or set PUSHGATE_OTP_CODE",
            retryable=False,
        )


class RenewalRefused(ClientError):
    """The renewal token is no longer accepted (its lifetime ended, or the gateway
    forgot it): only a new login (password, code or single sign-on) helps."""

    def __init__(self) -> None:
        super().__init__(
            "the gateway no longer renews this login (its renewal lifetime ended): "
            "connect again to log in",
            retryable=False,
        )


class SessionGone(ClientError):
    """The auth service no longer knows our session: only a new login helps."""

    def __init__(self) -> None:
        super().__init__(
            "the gateway no longer knows this session (it expired or was ended there)",
            retryable=True,
        )


@dataclass
class PasswordLogin:
    """A password login's credentials, held only until the first login that brings a
    renewal token (client/connection.py drops them then)."""

    username: str
    password: str = field(repr=False)
    otp_code: str = field(default="", repr=False)  # given up front (PUSHGATE_OTP_CODE)
    ask_code: Callable[[], str] | None = None  # asks a person for the one-time code


@dataclass(frozen=True)
class PushedNetwork:
    """What the auth service wants the client's side of the tunnel to look like
    (protos/auth.proto NetworkConfig): it follows the user's groups, so a Rekey or
    SessionInfo answer may bring a new one while the tunnel is up."""

    routes: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    search_domains: tuple[str, ...] = ()
    match_domains: tuple[str, ...] = ()  # split DNS
    digest: str = field(default="", compare=False)  # the auth service's name for it

    @classmethod
    def from_proto(cls, config: auth_pb2.NetworkConfig) -> "PushedNetwork":
        return cls(
            tuple(config.routes),
            tuple(config.dns_servers),
            tuple(config.search_domains),
            tuple(config.match_domains),
            config.digest,
        )

    def describe(self) -> str:
        """One line for the log: what is routed and which DNS (no secret in here)."""
        parts = [f"routes {', '.join(self.routes) or 'none'}"]
        for what, values in (
            ("DNS", self.dns_servers),
            ("search", self.search_domains),
            ("match", self.match_domains),
        ):
            if values:
                parts.append(f"{what} {', '.join(values)}")
        return "; ".join(parts)


def network_of(response) -> PushedNetwork | None:
    """The NetworkConfig in a Rekey or SessionInfo answer; None if the auth service
    did not say (one from before NetworkConfig answers only at login)."""
    return PushedNetwork.from_proto(response.network) if response.HasField("network") else None


class RekeyAnswer(NamedTuple):
    keys: KeyMaterial
    expires_at: float  # unix seconds: the session ends then unless rekeyed
    network: PushedNetwork | None  # None: not said


@dataclass(frozen=True)
class Gateway:
    """One gateway the session may use (auth_pb2.Gateway)."""

    id: str  # "" for a lone gateway: its wire keys are the session keys as minted
    auth: tuple[str, int] | None  # its auth service; None: the one logged in to
    dataplane: tuple[str, int]
    preference: int  # lower is preferred


def gateways_of(response: auth_pb2.LoginResponse) -> tuple[Gateway, ...]:
    """The login answer's gateways, most preferred first (ties in listed order); an
    auth service from before clusters names only its dataplane."""
    listed = [
        Gateway(
            g.id,
            (g.auth_endpoint.host, g.auth_endpoint.port) if g.auth_endpoint.host else None,
            (g.dataplane_endpoint.host, g.dataplane_endpoint.port),
            g.preference,
        )
        for g in response.gateways
    ]
    if not listed:
        endpoint = response.dataplane_endpoint
        listed = [Gateway("", None, (endpoint.host, endpoint.port), 0)]
    return tuple(sorted(listed, key=lambda g: g.preference))


@dataclass(frozen=True)
class ClientSession:
    """What a login gave us."""

    session_id: int
    token: str
    cipher: CipherSuite
    keys: KeyMaterial
    tunnel_address: str
    gateway_tunnel_address: str
    routes: list[str]
    dns_servers: list[str]
    mtu: int
    keepalive_seconds: float
    key_lifetime_seconds: float
    endpoint: tuple[str, int]
    expires_at: float  # unix seconds: the session ends then unless rekeyed; 0 if not said
    search_domains: list[str] = field(default_factory=list)
    match_domains: list[str] = field(default_factory=list)  # split DNS
    network_digest: str = ""
    renewal_token: str = ""  # a new session without the password (AuthClient.renew)
    renewal_expires_at: float = 0.0  # unix seconds; 0: no renewal token
    username: str = ""  # the account (from the ID token, for single sign-on)
    # Every gateway the session may use, most preferred first; the one that answered
    # the login (its dataplane is `endpoint`). `keys` are as minted: each gateway's
    # wire keys are derived from them (push_protocol.keys.for_gateway).
    gateways: tuple[Gateway, ...] = ()
    gateway_id: str = ""
    # the dataplane sends TCP packets in the partial checksum form (pushgate_io/tso.py)
    partial_checksums: bool = False

    @property
    def answering_gateway(self) -> Gateway:
        for gateway in self.gateways:
            if gateway.id == self.gateway_id:
                return gateway
        return Gateway(self.gateway_id, None, self.endpoint, 0)

    @property
    def network(self) -> PushedNetwork:
        return PushedNetwork(
            tuple(self.routes),
            tuple(self.dns_servers),
            tuple(self.search_domains),
            tuple(self.match_domains),
            self.network_digest,
        )

    def with_network(self, network: PushedNetwork) -> "ClientSession":
        return dataclasses.replace(
            self,
            routes=list(network.routes),
            dns_servers=list(network.dns_servers),
            search_domains=list(network.search_domains),
            match_domains=list(network.match_domains),
            network_digest=network.digest,
        )

    def __repr__(self) -> str:  # the token and keys never reach a log line
        return f"ClientSession(id={self.session_id:#010x}, address={self.tunnel_address})"


def key_material(keys: auth_pb2.SessionKeys, received_at: float) -> KeyMaterial:
    # Key age counts from when we received the keys: never earlier than the
    # auth service minted them, so we always rekey before the dataplane rejects.
    return KeyMaterial(
        keys.key_epoch, keys.client_to_server_key, keys.server_to_client_key, received_at
    )


def refusal_of(error: grpc.RpcError) -> auth_pb2.Refusal | None:
    """The Refusal the auth service packed into the error's status details, if any."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, TypeError, AttributeError):  # inconsistent or no trailers
        return None
    for detail in status.details if status is not None else ():
        refusal = auth_pb2.Refusal()
        if detail.Unpack(refusal):
            return refusal
    return None


def describe_rpc_error(error: grpc.RpcError, target: str, ca_path: str) -> ClientError:
    code, details = error.code(), error.details() or ""
    refusal = refusal_of(error)
    reason = refusal.reason if refusal is not None else auth_pb2.REFUSAL_REASON_UNSPECIFIED
    if reason == auth_pb2.REFUSAL_REASON_SESSION_REVOKED:
        return AccessRevoked(refusal.revocation)
    if reason == auth_pb2.REFUSAL_REASON_SESSION_UNKNOWN:
        return SessionGone()
    if reason == auth_pb2.REFUSAL_REASON_OTP_REQUIRED:
        return CodeRequired()
    if reason == auth_pb2.REFUSAL_REASON_RENEWAL_REFUSED:
        return RenewalRefused()
    if reason == auth_pb2.REFUSAL_REASON_SSO_UNAVAILABLE:
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            return ClientError("this gateway does not offer single sign-on", retryable=False)
        return ClientError(
            "the gateway cannot reach its single sign-on provider; trying again", retryable=True
        )
    if reason in (
        auth_pb2.REFUSAL_REASON_SSO_REJECTED,
        auth_pb2.REFUSAL_REASON_SSO_UNKNOWN_USER,
    ):
        return ClientError(details or "single sign-on refused", retryable=False)
    if reason == auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS or (
        refusal is None and code is grpc.StatusCode.UNAUTHENTICATED
    ):
        return ClientError(
            "login refused: wrong user name or password (or one-time code), or the account "
            "is disabled",
            retryable=False,
        )
    if reason == auth_pb2.REFUSAL_REASON_NO_FREE_ADDRESS:
        return ClientError(
            "the gateway has no free tunnel address; try again later", retryable=True
        )
    if reason == auth_pb2.REFUSAL_REASON_THROTTLED:
        return ClientError(
            "the auth service is throttling logins after failed attempts; next try in "
            f"{refusal.retry_after_seconds} s",
            retryable=True,
        )
    if reason == auth_pb2.REFUSAL_REASON_BUSY:
        return ClientError("the auth service is busy; trying again", retryable=True)
    if reason == auth_pb2.REFUSAL_REASON_INVALID_REQUEST or (
        refusal is None and code is grpc.StatusCode.INVALID_ARGUMENT
    ):
        return ClientError(f"the auth service rejected the request: {details}", retryable=False)
    lowered = details.lower()
    # gRPC's own transport errors carry no Refusal: these words come from its TLS layer
    if code is grpc.StatusCode.UNAVAILABLE and any(
        word in lowered for word in ("handshake", "certificate", "ssl", "tls")
    ):
        return ClientError(
            f"certificate mismatch: the auth service at {target} does not present a "
            f"certificate signed by the CA in {ca_path} ({details})",
            retryable=False,
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ClientError(f"auth service unreachable at {target}: {details}", retryable=True)
    return ClientError(f"auth service error {code.name}: {details}", retryable=True)


class AuthClient:
    def __init__(
        self,
        target: str,
        ca_path: str,
        server_name: str | None = None,
        completes_checksums: bool = False,
    ) -> None:
        self.target = target
        # our TUN completes partial TCP checksums: said at every login and renewal
        self.completes_checksums = completes_checksums
        self.ca_path = ca_path
        try:
            with open(ca_path, "rb") as handle:
                root = handle.read()
            if b"[profile]" in root:  # a client profile (client/profile.py) holds the CA
                root = profile.parse(root.decode(), ca_path).ca_pem.encode()
        except OSError as error:
            raise ClientError(f"cannot read CA file {ca_path}: {error}", retryable=False) from None
        except (UnicodeDecodeError, profile.ProfileError) as error:
            raise ClientError(str(error), retryable=False) from None
        # gRPC's reconnect backoff grows to 120 s by default: after an outage of the
        # auth service, rekeys would then fail at once for minutes after it is back.
        options = [("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=root), options=options
        )
        self._stub = auth_pb2_grpc.AuthStub(self._channel)

    async def _call(self, method, request, *, with_session: bool = False):
        """`with_session`: the request carries a session token, so UNAUTHENTICATED
        means the session is gone (not bad credentials, as for a login), also from
        an auth service that sends no Refusal."""
        try:
            return await method(request, timeout=RPC_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            described = describe_rpc_error(error, self.target, self.ca_path)
            if (
                with_session
                and error.code() is grpc.StatusCode.UNAUTHENTICATED
                and not isinstance(described, AccessRevoked)
            ):
                raise SessionGone() from None
            raise described from None

    async def login(self, username: str, password: str, otp_code: str = "") -> ClientSession:
        """Log in with a password (and a one-time code, if the account has one:
        CodeRequired says so)."""
        return self._session(
            await self._call(
                self._stub.Login,
                auth_pb2.LoginRequest(
                    username=username,
                    password=password,
                    otp_code=otp_code,
                    client_version=client_version(),
                    completes_checksums=self.completes_checksums,
                ),
            )
        )

    async def begin_sso(self) -> auth_pb2.BeginSsoResponse:
        """Where to send the user for single sign-on, and the nonce to send along."""
        return await self._call(self._stub.BeginSso, auth_pb2.BeginSsoRequest())

    async def login_sso(self, id_token: str) -> ClientSession:
        """Log in with the ID token the provider gave us (client/sso.py)."""
        return self._session(
            await self._call(
                self._stub.Login,
                auth_pb2.LoginRequest(
                    id_token=id_token,
                    client_version=client_version(),
                    completes_checksums=self.completes_checksums,
                ),
            )
        )

    async def renew(self, renewal_token: str) -> ClientSession:
        """A new session for a renewal token; the answer holds the token's successor.
        RenewalRefused: log in again; AccessRevoked: an administrator said no."""
        return self._session(
            await self._call(
                self._stub.Renew,
                auth_pb2.RenewRequest(
                    renewal_token=renewal_token,
                    client_version=client_version(),
                    completes_checksums=self.completes_checksums,
                ),
            )
        )

    def _session(self, response: auth_pb2.LoginResponse) -> ClientSession:
        cipher = CipherSuite.from_api_code(response.cipher)
        if cipher is None:
            raise ClientError(f"server chose an unknown cipher {response.cipher}", retryable=False)
        endpoint = response.dataplane_endpoint
        return ClientSession(
            session_id=response.session_id,
            token=response.session_token,
            cipher=cipher,
            keys=key_material(response.keys, time.time()),
            tunnel_address=response.tunnel_address,
            gateway_tunnel_address=response.gateway_tunnel_address,
            routes=list(response.network.routes),
            dns_servers=list(response.network.dns_servers),
            mtu=response.mtu,
            keepalive_seconds=float(response.keepalive_seconds or 10),
            key_lifetime_seconds=float(response.key_lifetime_seconds or 600),
            endpoint=(endpoint.host, endpoint.port),
            expires_at=response.expires_at_unix_ms / 1000,
            search_domains=list(response.network.search_domains),
            match_domains=list(response.network.match_domains),
            network_digest=response.network.digest,
            renewal_token=response.renewal_token,
            renewal_expires_at=response.renewal_expires_at_unix_ms / 1000,
            username=response.username,
            gateways=gateways_of(response),
            gateway_id=response.gateway_id,
            partial_checksums=response.partial_checksums,
        )

    async def rekey(self, token: str) -> RekeyAnswer:
        """New keys, when the session now ends unless rekeyed, and its network."""
        response = await self._call(
            self._stub.Rekey, auth_pb2.RekeyRequest(session_token=token), with_session=True
        )
        return RekeyAnswer(
            key_material(response.keys, time.time()),
            response.expires_at_unix_ms / 1000,
            network_of(response),
        )

    async def session_network(self, token: str) -> PushedNetwork | None:
        """The session's network as the auth service sees it now (None: not said);
        SessionGone if it no longer knows the session, AccessRevoked if an
        administrator ended it, another ClientError if unreachable."""
        response = await self._call(
            self._stub.SessionInfo,
            auth_pb2.SessionInfoRequest(session_token=token),
            with_session=True,
        )
        return network_of(response)

    async def session_alive(self, token: str) -> bool:
        """False if the auth service no longer knows the session; raises if unreachable,
        and AccessRevoked if an administrator ended it."""
        try:
            await self.session_network(token)
        except SessionGone:
            return False
        return True

    async def logout(self, token: str) -> None:
        await self._call(
            self._stub.Logout, auth_pb2.LogoutRequest(session_token=token), with_session=True
        )

    async def close(self) -> None:
        await self._channel.close()
