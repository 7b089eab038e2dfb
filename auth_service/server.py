"""The auth service's servicers: the client API (Auth) and the local SessionFeed."""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from cryptography import x509
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from push_protocol.aead import CipherSuite
from pushgate_api import auth_pb2, control_pb2, control_pb2_grpc
from pushgate_io.rate_limited_log import RateLimitedLog

from . import totp
from .audit import AuditLog
from .database import DatabaseUnavailable
from .oidc import (
    SSO_ONLY_PASSWORD_HASH,
    Identity,
    NonceBook,
    Provider,
    ProviderUnreachable,
    TokenRejected,
)
from .passwords import verify_password
from .renewal import DEFAULT_RENEWAL_LIFETIME_SECONDS, new_token, renewal_verdict
from .sessions import (
    MAX_COUNTER_RANGES_PER_LEASE,
    AllocationKind,
    PoolExhausted,
    SessionManager,
    token_hash,
)
from .store import Renewal, UserExists
from .throttle import Outcome, SprayWatch, Throttle, Verdict, login_keys
from .user_names import MAX_USERNAME_BYTES, user_name_problem

log = logging.getLogger("pushgate.auth")

MAX_PASSWORD_BYTES = 1024
GENERIC_LOGIN_ERROR = "invalid user name or password"
REVOKED_MESSAGE = "access revoked by the administrator"
MAX_CLIENT_VERSION_CHARS = 64  # what the admin listing keeps of LoginRequest.client_version
LOGIN_RESULTS = ("success", "bad_credentials", "throttled", "invalid", "pool_exhausted", "busy")
# pushgate_auth_logins_by_method: how the user proved who they are ("renewal": a
# renewal token, Renew), and the results beyond LOGIN_RESULTS that only some have.
LOGIN_METHODS = ("password", "totp", "sso", "renewal")
IDENTITY_RESULTS = (
    "otp_required",  # the password was right, the account needs a code: none was sent
    "sso_unavailable",  # not configured, or the provider could not be reached
    "sso_rejected",  # the ID token was refused
    "unknown_user",  # valid ID token, no such (enabled) account
    "renewal_refused",  # renewal token unknown, used or expired
    "revoked",  # renewal token of a disabled/removed user or a kicked session
)
MAX_ID_TOKEN_BYTES = 16384
MAX_OTP_CODE_CHARS = 16
SSO_HTTP_WORKERS = 2
FAILURE_LOG_SECONDS = 10.0  # at most one "login failed" line per user name this often
FAILURE_LOG_NAMES = 1024  # names remembered for that; beyond, one line for all the rest


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.logins = Counter(
            "pushgate_auth_logins", "Login attempts by result", ["result"], registry=registry
        )
        for result in LOGIN_RESULTS:
            self.logins.labels(result)
        self.login_seconds = Histogram(
            "pushgate_auth_login_duration_seconds", "Time to answer a login", registry=registry
        )
        self.rekeys = Counter("pushgate_auth_rekeys", "Rekeys", registry=registry)
        self.logouts = Counter("pushgate_auth_logouts", "Logouts", registry=registry)
        self.expired = Counter(
            "pushgate_auth_sessions_expired", "Sessions expired", registry=registry
        )
        self.sessions = Gauge("pushgate_auth_sessions_active", "Live sessions", registry=registry)
        self.pool = Gauge(
            "pushgate_auth_pool_addresses",
            "Tunnel addresses by state",
            ["state"],
            registry=registry,
        )
        self.allocations = Counter(
            "pushgate_auth_address_allocations",
            "Tunnel addresses handed out, by the rule that picked them "
            "(quarantined: another user's, freed within the quarantine, none else free)",
            ["kind"],
            registry=registry,
        )
        for kind in AllocationKind:
            self.allocations.labels(kind.value)
        self.watchers = Gauge(
            "pushgate_auth_feed_watchers", "Dataplanes watching the session feed", registry=registry
        )
        self.revision = Gauge(
            "pushgate_auth_feed_revision", "Session feed revision", registry=registry
        )
        self.password_checks = Counter(
            "pushgate_auth_password_checks",
            "Password hashes verified (a throttled login never gets this far)",
            registry=registry,
        )
        self.throttle_records = Gauge(
            "pushgate_auth_throttle_records",
            "Failed-login records the throttle holds (bounded by max_throttle_records)",
            registry=registry,
        )
        self.throttle_evictions = Counter(
            "pushgate_auth_throttle_evictions",
            "Throttle records pushed out at max_throttle_records",
            registry=registry,
        )
        self.accounts_targeted = Gauge(
            "pushgate_auth_accounts_targeted",
            "Existing accounts that failed to log in from spray_alert_sources or more "
            "sources in the last 15 minutes (a password spray across sources)",
            registry=registry,
        )
        self.control_peers_refused = Counter(
            "pushgate_auth_control_peers_refused",
            "Connections to the session feed socket refused: the peer's uid is not allowed",
            registry=registry,
        )
        self.admin_peers_refused = Counter(
            "pushgate_auth_admin_peers_refused",
            "Connections to the admin socket refused: the peer is neither root nor this "
            "service's user",
            registry=registry,
        )
        self.replaced = Counter(
            "pushgate_auth_sessions_replaced",
            "Sessions ended because their user logged in beyond max_sessions_per_user",
            registry=registry,
        )
        self.healthy = Gauge(
            "pushgate_auth_healthy",
            "1 while the self-check passes (event loop runs, database takes writes)",
            registry=registry,
        )
        self.self_check_age = Gauge(
            "pushgate_auth_self_check_age_seconds",
            "Seconds since the self-check last passed (computed when scraped)",
            registry=registry,
        )
        self.connections_limit = Gauge(
            "pushgate_auth_connections_limit",
            "Client API connections accepted at once (from max_connections and the fd limit)",
            registry=registry,
        )
        self.health_watchers = Gauge(
            "pushgate_auth_health_watchers", "Health.Watch streams open", registry=registry
        )
        self.certificate_not_after = Gauge(
            "pushgate_auth_server_certificate_not_after_timestamp_seconds",
            "When the TLS certificate the client API serves expires (Unix time)",
            registry=registry,
        )
        self.logins_by_method = Counter(
            "pushgate_auth_logins_by_method",
            "Login attempts by how the user proved who they are (password, totp: password "
            "and one-time code, sso, renewal: a renewal token) and result",
            ["method", "result"],
            registry=registry,
        )
        for method in LOGIN_METHODS:
            self.logins_by_method.labels(method, "success")

    def served_certificate(self, cert_pem: bytes) -> None:
        """Export the not-after of the certificate the client API was given."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.certificate_not_after.set(cert.not_valid_after_utc.timestamp())


def refusal(
    code: grpc.StatusCode,
    message: str,
    reason: int,
    *,
    retry_after: float = 0,
    revocation: int = 0,
) -> grpc.Status:
    """An error status whose google.rpc.Status details hold an auth_pb2.Refusal:
    clients decide on `reason`, never on `message` (protos/auth.proto)."""
    detail = any_pb2.Any()
    detail.Pack(
        auth_pb2.Refusal(
            reason=reason, retry_after_seconds=round(retry_after), revocation=revocation
        )
    )
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])
    )


def peer_ip(context) -> str:
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


class _CodeMissing(Exception):
    """A password login of a TOTP user came without a code (the throttle counts nothing)."""


class AuthServicer:
    """pushgate.auth.v1.Auth. Registered by hand (see `generic_handler`) so that
    a request that does not even parse (e.g. a non-UTF-8 user name) gets
    INVALID_ARGUMENT instead of a transport error."""

    def __init__(
        self,
        sessions: SessionManager,
        metrics: AuthMetrics,
        *,
        throttle: Throttle,
        spray_watch: SprayWatch,
        hash_workers: int,
        max_pending_hashes: int,
        default_cipher: int,
        response_template: dict,
        audit: AuditLog,
        renewal_lifetime: float = DEFAULT_RENEWAL_LIFETIME_SECONDS,
        provider: Provider | None = None,
        auto_provision: bool = False,
        identity_seen: Callable[[Identity], None] | None = None,
    ) -> None:
        self.renewal_lifetime = renewal_lifetime  # 0: no renewal tokens
        self.provider = provider  # None: no single sign-on
        self.auto_provision = auto_provision
        # Told every identity a single sign-on proved (its groups claim included).
        self.identity_seen = identity_seen or (lambda identity: None)
        self.nonces = NonceBook()
        self._http_pool = ThreadPoolExecutor(SSO_HTTP_WORKERS, thread_name_prefix="oidc")
        self.sessions = sessions
        self.audit = audit
        self.metrics = metrics
        self.throttle = throttle
        self.spray_watch = spray_watch
        self._settled = asyncio.Condition()  # a password check ended: waiters ask again
        self._hash_pool = ThreadPoolExecutor(hash_workers, thread_name_prefix="argon2")
        self._pending = 0
        self._max_pending = max_pending_hashes
        self.default_cipher = default_cipher
        self.template = response_template
        self._failure_log = RateLimitedLog(log, FAILURE_LOG_SECONDS, FAILURE_LOG_NAMES)
        self._evictions_seen = 0

    def update_gauges(self) -> None:
        store = self.sessions.store
        used = store.count_sessions()
        self.metrics.sessions.set(used)
        self.metrics.pool.labels("used").set(used)
        self.metrics.pool.labels("free").set(self.sessions.pool.size - used)
        self.metrics.revision.set(self.sessions.published)
        self.metrics.watchers.set(self.sessions.feed.watchers)

    def sweep(self, now: float) -> None:
        """Forget what the throttle, spray watch and failure log no longer need
        (`now` is time.monotonic(), their clock); called every second."""
        self.throttle.prune(now)
        self.nonces.prune(time.time())
        self.sessions.store.forget_expired_renewals(time.time())
        self._failure_log.prune()
        self.metrics.accounts_targeted.set(self.spray_watch.targeted(now))
        self._throttle_gauges()

    def _throttle_gauges(self) -> None:
        self.metrics.throttle_records.set(len(self.throttle))
        self.metrics.throttle_evictions.inc(self.throttle.evicted - self._evictions_seen)
        self._evictions_seen = self.throttle.evicted

    async def _refuse(
        self,
        context,
        attempt: tuple[str, str],
        result: str,
        code,
        message: str,
        reason: int,
        *,
        method: str = "password",
        **extra,
    ):
        """Refuse a login (`attempt` is its user name and source): counted by `result`
        (and `method`) in the metrics and the audit log alike."""
        self.metrics.logins.labels(result).inc()
        self.metrics.logins_by_method.labels(method, result).inc()
        self.audit.login(result, *attempt, None, method=method)
        await context.abort_with_status(refusal(code, message, reason, **extra))

    async def _admit(self, keys) -> Verdict:
        while True:
            verdict = self.throttle.begin(keys, time.monotonic())
            if not verdict.wait:
                return verdict
            async with self._settled:
                await self._settled.wait()

    async def Login(self, request, context):
        started = time.perf_counter()
        try:
            return await self._login(request, context)
        finally:
            self.metrics.login_seconds.observe(time.perf_counter() - started)

    async def _login(self, request, context):
        source = peer_ip(context)
        invalid = auth_pb2.REFUSAL_REASON_INVALID_REQUEST
        if request is None:
            await self._refuse(
                context,
                ("", source),
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                "malformed request",
                invalid,
            )
        if request.id_token:
            return await self._sso_login(request, context, source)
        name, password = request.username, request.password
        attempt = (name[:MAX_USERNAME_BYTES], source)
        if problem := user_name_problem(name):
            await self._refuse(
                context, attempt, "invalid", grpc.StatusCode.INVALID_ARGUMENT, problem, invalid
            )
        if not password or len(password.encode()) > MAX_PASSWORD_BYTES:
            await self._refuse(
                context,
                attempt,
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"password must be 1-{MAX_PASSWORD_BYTES} bytes",
                invalid,
            )
        if len(request.otp_code) > MAX_OTP_CODE_CHARS:
            await self._refuse(
                context,
                attempt,
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                "malformed one-time code",
                invalid,
            )
        cipher = request.preferred_cipher
        if cipher and CipherSuite.from_api_code(cipher) is None:
            await self._refuse(
                context,
                attempt,
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                "unknown cipher",
                invalid,
            )
        if self._pending >= self._max_pending:
            await self._refuse(
                context,
                attempt,
                "busy",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the auth service is busy; try again shortly",
                auth_pb2.REFUSAL_REASON_BUSY,
                retry_after=1,
            )
        keys = login_keys(name, source)
        self._pending += 1  # also while waiting for the throttle: waiters are bounded too
        try:
            verdict = await self._admit(keys)
            if not verdict.go:
                await self._refuse(
                    context,
                    attempt,
                    "throttled",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many failed logins; try again in {verdict.retry_after:.0f} s",
                    auth_pb2.REFUSAL_REASON_THROTTLED,
                    retry_after=verdict.retry_after,
                )
            outcome = Outcome.ABANDONED
            method, otp = "password", None
            try:
                user = self.sessions.store.get_user(name)
                self.metrics.password_checks.inc()
                ok = await asyncio.get_running_loop().run_in_executor(
                    self._hash_pool, verify_password, user.password_hash if user else None, password
                )
                good = ok and user is not None and not user.disabled
                if good and (otp := self._check_otp(name, request.otp_code)) is not None:
                    method = "totp"
                    good = otp == "ok"
                    if otp == "missing":  # neither a failure nor a success: a code is asked
                        raise _CodeMissing
                outcome = Outcome.SUCCEEDED if good else Outcome.FAILED
            except _CodeMissing:
                pass
            finally:
                self.throttle.finish(keys, time.monotonic(), outcome)
                self._throttle_gauges()
                async with self._settled:
                    self._settled.notify_all()
        finally:
            self._pending -= 1
        if otp == "missing":
            await self._refuse(
                context,
                attempt,
                "otp_required",
                grpc.StatusCode.UNAUTHENTICATED,
                "this account needs a one-time code",
                auth_pb2.REFUSAL_REASON_OTP_REQUIRED,
                method=method,
            )
        if outcome is Outcome.FAILED:
            now = time.monotonic()
            if user is not None:
                self.spray_watch.failed(name, source, now)
            self._failure_log.warning(name, "login failed user=%r peer=%s", name, source)
            await self._refuse(
                context,
                attempt,
                "bad_credentials",
                grpc.StatusCode.UNAUTHENTICATED,
                GENERIC_LOGIN_ERROR if otp is None else "wrong or already used one-time code",
                auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS,
                method=method,
            )
        now = time.time()
        return await self._start(
            context,
            request,
            source,
            Identity(name, method),
            authenticated_at=now,
            renewal_until=now + self.renewal_lifetime,
        )

    def _check_otp(self, name: str, code: str) -> str | None:
        """None if `name` has no TOTP secret; else "ok" (and the code's step is used
        up), "missing" or "wrong" (wrong, or used before)."""
        store = self.sessions.store
        enrolled = store.totp(name)
        if enrolled is None:
            return None
        if not code:
            return "missing"
        secret, last_used = enrolled
        step = totp.matching_step(secret, code, time.time(), last_used)
        return "ok" if step is not None and store.use_totp_step(name, step) else "wrong"

    async def _sso_login(self, request, context, source: str):
        """Login with an ID token from the configured OpenID provider (auth_service/oidc.py)."""
        attempt, unavailable = ("", source), auth_pb2.REFUSAL_REASON_SSO_UNAVAILABLE

        async def refuse(result, code, message, reason):
            await self._refuse(context, attempt, result, code, message, reason, method="sso")

        if self.provider is None:
            await refuse(
                "sso_unavailable",
                grpc.StatusCode.FAILED_PRECONDITION,
                "single sign-on is not set up on this gateway",
                unavailable,
            )
        if len(request.id_token) > MAX_ID_TOKEN_BYTES or request.username or request.password:
            await refuse(
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                "an ID token login has no user name or password, and an ID token of at most "
                f"{MAX_ID_TOKEN_BYTES} bytes",
                auth_pb2.REFUSAL_REASON_INVALID_REQUEST,
            )
        cipher = request.preferred_cipher
        if cipher and CipherSuite.from_api_code(cipher) is None:
            await refuse(
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                "unknown cipher",
                auth_pb2.REFUSAL_REASON_INVALID_REQUEST,
            )
        if self._pending >= self._max_pending:
            await refuse(
                "busy",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the auth service is busy; try again shortly",
                auth_pb2.REFUSAL_REASON_BUSY,
            )
        self._pending += 1
        try:
            identity, nonce = await asyncio.get_running_loop().run_in_executor(
                self._http_pool, self.provider.validate, request.id_token
            )
            if not self.nonces.take(nonce, time.time()):
                raise TokenRejected("the ID token's nonce is unknown, used or expired (a replay?)")
        except ProviderUnreachable as error:
            log.warning("single sign-on: %s", error)
            await refuse(
                "sso_unavailable",
                grpc.StatusCode.UNAVAILABLE,
                "the single sign-on provider cannot be reached; try again later",
                unavailable,
            )
        except TokenRejected as error:
            self._failure_log.warning(source, "single sign-on refused peer=%s: %s", source, error)
            await refuse(
                "sso_rejected",
                grpc.StatusCode.UNAUTHENTICATED,
                f"single sign-on refused: {error}",
                auth_pb2.REFUSAL_REASON_SSO_REJECTED,
            )
        finally:
            self._pending -= 1
        attempt = (identity.username, source)
        store = self.sessions.store
        user = store.get_user(identity.username)
        if user is None and self.auto_provision:
            try:
                store.add_user(identity.username, SSO_ONLY_PASSWORD_HASH, time.time())
            except UserExists:  # another login of theirs just did
                pass
            else:
                self.audit.admin("user_add", None, user=identity.username, source="sso")
                log.info("single sign-on: user %r created (auto_provision)", identity.username)
            user = store.get_user(identity.username)
        if user is None or user.disabled:
            what = "is disabled" if user is not None else "does not exist here"
            await refuse(
                "unknown_user",
                grpc.StatusCode.UNAUTHENTICATED,
                f"the account {identity.username!r} {what}; ask the gateway's administrator",
                auth_pb2.REFUSAL_REASON_SSO_UNKNOWN_USER,
            )
        log.info(
            "single sign-on user=%r groups=%s",
            identity.username,
            "(no groups claim)" if identity.groups is None else ",".join(identity.groups),
        )
        self.identity_seen(identity)
        await self._take_provider_groups(identity)
        now = time.time()
        return await self._start(
            context,
            request,
            source,
            identity,
            authenticated_at=now,
            renewal_until=now + self.renewal_lifetime,
        )

    async def Renew(self, request, context):
        started = time.perf_counter()
        try:
            return await self._renew(request, context)
        finally:
            self.metrics.login_seconds.observe(time.perf_counter() - started)

    async def _renew(self, request, context):
        source = peer_ip(context)
        attempt = ("", source)
        if (
            request is None
            or not request.renewal_token
            or (
                request.preferred_cipher
                and CipherSuite.from_api_code(request.preferred_cipher) is None
            )
        ):
            await self._refuse(
                context,
                attempt,
                "invalid",
                grpc.StatusCode.INVALID_ARGUMENT,
                "a renewal token and a known cipher are required",
                auth_pb2.REFUSAL_REASON_INVALID_REQUEST,
                method="renewal",
            )
        store, now = self.sessions.store, time.time()
        with store.transaction():  # taken and deleted at once: two uses cannot both pass
            renewal = store.take_renewal(token_hash(request.renewal_token))
        user = store.get_user(renewal.username) if renewal is not None else None
        if renewal is not None:
            attempt = (renewal.username, source)
        verdict = renewal_verdict(renewal, user, now)
        if isinstance(verdict, int):
            await self._refuse(
                context,
                attempt,
                "revoked",
                grpc.StatusCode.PERMISSION_DENIED,
                REVOKED_MESSAGE,
                auth_pb2.REFUSAL_REASON_SESSION_REVOKED,
                method="renewal",
                revocation=verdict,
            )
        if verdict is not None:
            await self._refuse(
                context,
                attempt,
                "renewal_refused",
                grpc.StatusCode.UNAUTHENTICATED,
                f"renewal refused ({verdict}): log in again",
                auth_pb2.REFUSAL_REASON_RENEWAL_REFUSED,
                method="renewal",
            )
        old = store.session_by_id(renewal.session_id)
        if old is not None and old.username == renewal.username:
            await self.sessions.remove(old, control_pb2.REMOVAL_REASON_REPLACED, now)
        return await self._start(
            context,
            request,
            source,
            Identity(renewal.username, renewal.method),
            authenticated_at=renewal.authenticated_at,
            renewal_until=renewal.expires_at,
            label="renewal",
        )

    async def _take_provider_groups(self, identity: Identity) -> None:
        """The provider's groups claim is the user's "idp" membership (the admin's is
        kept beside it): groups the config declares; the others are only logged. Live
        sessions of the user get the new policy at once, the new one is made with it."""
        access = self.sessions.access
        if identity.groups is None or access is None or access.groups is None:
            return
        groups = [group for group in identity.groups if group in access.groups]
        if ignored := sorted(set(identity.groups) - set(groups)):
            log.debug(
                "single sign-on user=%r: groups not in the config: %s", identity.username, ignored
            )
        store = self.sessions.store
        with store.transaction():
            changed = store.replace_user_groups(identity.username, groups, "idp")
        if changed:
            await self.sessions.update_policies({identity.username})

    async def _start(
        self,
        context,
        request,
        source: str,
        identity: Identity,
        *,
        authenticated_at: float,
        renewal_until: float,
        label: str | None = None,
    ):
        """The session (and renewal token) for a login that proved `identity`; `label`
        is the method the metrics count it under (default: the identity's)."""
        name, method = identity.username, label or identity.method
        attempt = (name, source)
        try:
            session, token, replaced = await self.sessions.create(
                name,
                request.preferred_cipher or self.default_cipher,
                time.time(),
                client_version=request.client_version[:MAX_CLIENT_VERSION_CHARS],
                login_source=source,
                partial_checksums=request.completes_checksums,
            )
        except PoolExhausted as error:
            await self._refuse(
                context,
                attempt,
                "pool_exhausted",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                str(error),
                auth_pb2.REFUSAL_REASON_NO_FREE_ADDRESS,
                method=method,
            )
        renewal_token, renewal_expires = "", 0.0
        if self.renewal_lifetime > 0 and renewal_until > time.time():
            renewal_token, renewal_expires = new_token(), renewal_until
            self.sessions.store.add_renewal(
                token_hash(renewal_token),
                Renewal(
                    username=name,
                    session_id=session.session_id,
                    method=identity.method,
                    authenticated_at=authenticated_at,
                    expires_at=renewal_until,
                    revoked=0,
                ),
            )
        self.audit.login("success", name, source, session, method=method)
        self.metrics.logins.labels("success").inc()
        self.metrics.logins_by_method.labels(method, "success").inc()
        self.metrics.replaced.inc(len(replaced))
        self.update_gauges()
        for old in replaced:
            log.info(
                "session=%#010x user=%r ended: replaced by a new login (max_sessions_per_user=%d)",
                old.session_id,
                name,
                self.sessions.max_sessions_per_user,
            )
        log.info(
            "login ok user=%r method=%s session=%#010x address=%s peer=%s",
            name,
            method,
            session.session_id,
            session.address,
            source,
        )
        t = self.template
        return auth_pb2.LoginResponse(
            session_id=session.session_id,
            session_token=token,
            cipher=session.cipher,
            keys=self._keys(session),
            tunnel_address=f"{session.address}/{t['prefix']}",
            gateway_tunnel_address=t["gateway"],
            network=self.sessions.network_of(name),
            mtu=t["mtu"],
            keepalive_seconds=t["keepalive"],
            key_lifetime_seconds=t["key_lifetime"],
            dataplane_endpoint=t["endpoint"],
            expires_at_unix_ms=int(session.expires_at * 1000),
            renewal_token=renewal_token,
            renewal_expires_at_unix_ms=int(renewal_expires * 1000),
            username=name,
            gateways=t["gateways"],
            gateway_id=self.sessions.gateway_id,
            partial_checksums=bool(session.partial_checksums),
        )

    async def BeginSso(self, request, context):
        unavailable = auth_pb2.REFUSAL_REASON_SSO_UNAVAILABLE
        if self.provider is None:
            await context.abort_with_status(
                refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "single sign-on is not set up on this gateway",
                    unavailable,
                )
            )
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self._http_pool, self.provider.metadata
            )
        except ProviderUnreachable as error:
            log.warning("single sign-on: %s", error)
            await context.abort_with_status(
                refusal(
                    grpc.StatusCode.UNAVAILABLE,
                    "the single sign-on provider cannot be reached; try again later",
                    unavailable,
                )
            )
        nonce, expires = self.nonces.issue(time.time())
        settings = self.provider.settings
        return auth_pb2.BeginSsoResponse(
            issuer=settings.issuer,
            authorization_endpoint=found["authorization_endpoint"],
            token_endpoint=found["token_endpoint"],
            client_id=settings.client_id,
            client_secret=settings.public_client_secret,
            scopes=settings.scopes,
            nonce=nonce,
            nonce_expires_at_unix_ms=int(expires * 1000),
        )

    @staticmethod
    def _keys(session) -> auth_pb2.SessionKeys:
        return auth_pb2.SessionKeys(
            key_epoch=session.key_epoch,
            client_to_server_key=session.c2s_key,
            server_to_client_key=session.s2c_key,
            created_at_unix_ms=int(session.keys_created_at * 1000),
        )

    async def _session(self, request, context):
        """The caller's live session, or the call is refused: SESSION_REVOKED if an
        administrator ended it (or its user is disabled, removed or has a new
        password, which ends it now), SESSION_UNKNOWN otherwise."""
        if request is None:
            await context.abort_with_status(
                refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "malformed request",
                    auth_pb2.REFUSAL_REASON_INVALID_REQUEST,
                )
            )
        session = self.sessions.by_token(request.session_token)
        if session is not None:
            if await self.sessions.still_allowed(session):
                return session
            self.update_gauges()
        revoked = self.sessions.revocation(request.session_token)
        if revoked is not None:
            await context.abort_with_status(
                refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    REVOKED_MESSAGE,
                    auth_pb2.REFUSAL_REASON_SESSION_REVOKED,
                    revocation=revoked.cause,
                )
            )
        await context.abort_with_status(
            refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown or expired session",
                auth_pb2.REFUSAL_REASON_SESSION_UNKNOWN,
            )
        )

    async def Rekey(self, request, context):
        session = await self._rekey(await self._session(request, context))
        return auth_pb2.RekeyResponse(
            keys=self._keys(session),
            key_lifetime_seconds=self.template["key_lifetime"],
            expires_at_unix_ms=int(session.expires_at * 1000),
            network=self.sessions.network_of(session.username),
        )

    async def _rekey(self, session):
        session = await self.sessions.rekey(session, time.time())
        self.metrics.rekeys.inc()
        self.update_gauges()
        log.info("rekey session=%#010x epoch=%d", session.session_id, session.key_epoch)
        return session

    async def Logout(self, request, context):
        session = await self._session(request, context)
        await self.sessions.remove(session, control_pb2.REMOVAL_REASON_LOGOUT, time.time())
        self.sessions.store.drop_renewals(session.session_id)  # logged out: no renewal
        self.metrics.logouts.inc()
        self.update_gauges()
        log.info("logout session=%#010x user=%r", session.session_id, session.username)
        return auth_pb2.LogoutResponse()

    async def SessionInfo(self, request, context):
        s = await self._session(request, context)
        return auth_pb2.SessionInfoResponse(
            session_id=s.session_id,
            username=s.username,
            tunnel_address=f"{s.address}/{self.template['prefix']}",
            key_epoch=s.key_epoch,
            created_at_unix_ms=int(s.created_at * 1000),
            expires_at_unix_ms=int(s.expires_at * 1000),
            last_rekey_at_unix_ms=int(s.last_rekey_at * 1000),
            cipher=s.cipher,
            network=self.sessions.network_of(s.username),
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def lenient(message_class):
            def deserialize(data: bytes):
                try:
                    return message_class.FromString(data)
                except DecodeError:
                    return None

            return deserialize

        methods = {
            "Login": (auth_pb2.LoginRequest, auth_pb2.LoginResponse),
            "Rekey": (auth_pb2.RekeyRequest, auth_pb2.RekeyResponse),
            "Logout": (auth_pb2.LogoutRequest, auth_pb2.LogoutResponse),
            "SessionInfo": (auth_pb2.SessionInfoRequest, auth_pb2.SessionInfoResponse),
            "BeginSso": (auth_pb2.BeginSsoRequest, auth_pb2.BeginSsoResponse),
            "Renew": (auth_pb2.RenewRequest, auth_pb2.LoginResponse),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, name),
                request_deserializer=lenient(request),
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in methods.items()
        }
        return grpc.method_handlers_generic_handler("pushgate.auth.v1.Auth", handlers)


class DatabaseGuard(grpc.aio.ServerInterceptor):
    """A call the database cannot serve now ends UNAVAILABLE with a plain message (the
    log has the cause; the caller never sees the database's address)."""

    _failure_log = RateLimitedLog(log, 10.0, 16)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, name = handler.unary_unary, handler_call_details.method

        async def guarded(request, context):
            try:
                return await method(request, context)
            except DatabaseUnavailable as error:
                self._failure_log.warning(name, "%s refused: %s", name, error)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the gateway's user database is unreachable; try again shortly",
                )

        return handler._replace(unary_unary=guarded)


class SessionFeedServicer(control_pb2_grpc.SessionFeedServicer):
    def __init__(self, sessions: SessionManager, on_change) -> None:
        self.sessions = sessions
        self.on_change = on_change

    async def ListSessions(self, request, context):
        return self.sessions.listing(time.time())

    async def LeaseCounterRanges(self, request, context):
        if not 0 < request.count <= MAX_COUNTER_RANGES_PER_LEASE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"count must be 1..{MAX_COUNTER_RANGES_PER_LEASE}, not {request.count}",
            )
        return self.sessions.lease_counter_ranges(request.count)

    async def WatchSessions(self, request, context):
        feed = self.sessions.feed
        after = request.after_revision
        if after > self.sessions.published or after < feed.oldest_replayable:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"cannot replay from revision {after}; list again"
            )
        feed.watchers += 1
        self.on_change()
        generation = feed.generation
        try:
            while feed.generation == generation:
                for event in feed.since(after):
                    yield event
                    after = event.revision
                async with feed.changed:
                    await feed.changed.wait_for(
                        lambda seen=after: (
                            feed.generation != generation
                            or (bool(feed.events) and feed.events[-1].revision > seen)
                        )
                    )
        finally:
            feed.watchers -= 1
            self.on_change()
