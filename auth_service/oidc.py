"""Single sign-on with an OpenID Connect provider (the auth service's side).

The client is a public OAuth client (RFC 8252: authorization code with PKCE and a
loopback redirect; client/sso.py): it asks us for a nonce (BeginSso), sends its user
to the provider, redeems the code itself and hands us the ID token (Login.id_token).
Here the ID token is validated with PyJWT: its signature against the provider's
JWKS (fetched from discovery, cached, fetched again when a token names a key we do
not know: key rotation), the issuer, the audience (our client id; `azp` too when
there are several), the expiry and issue time, and the nonce, which we issued and
accept once. The claims then name the user (`username_claim`) and their groups
(`groups_claim`).

Blocking HTTP (discovery, JWKS): the caller runs `Provider` methods in a thread.
"""

import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from .user_names import user_name_problem

# Asymmetric algorithms only: a symmetric one would let anyone holding the client
# id's secret (none, for a public client) mint tokens.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
LEEWAY_SECONDS = 30  # clock skew allowed between us and the provider
NONCE_LIFETIME_SECONDS = 600  # the user has this long to sign in at the provider
MAX_NONCES = 10000  # outstanding nonces kept; beyond, the oldest are dropped
DISCOVERY_RETRY_SECONDS = 10  # after a failed discovery, ask again at most this often
# A token naming a key id we do not know makes us fetch the JWKS again (the provider
# rotated its keys), at most this often: bogus key ids cannot make us hammer it.
JWKS_REFETCH_SECONDS = 5
# The password hash the auth service gives accounts it creates for single sign-on: it is no
# argon2 hash, so such an account can never log in with a password.
SSO_ONLY_PASSWORD_HASH = "!sso-only"


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    public_client_secret: str = ""  # see [oidc] public_client_secret (README)
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    username_claim: str = "preferred_username"
    groups_claim: str | None = "groups"  # None: groups are not taken from the provider
    auto_provision: bool = False  # create unknown users on their first login
    http_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Identity:
    """Who a login proved to be, and how. `groups` is what the provider said (its
    groups claim), None when it said nothing; password logins carry None."""

    username: str
    method: str  # "password" or "sso"
    groups: tuple[str, ...] | None = None


class SsoError(Exception):
    """A single sign-on login failed; the message is for people and holds no token."""


class ProviderUnreachable(SsoError):
    pass


class TokenRejected(SsoError):
    pass


class NonceBook:
    """Nonces we issued, each accepted once before it expires (pure: the caller
    passes the time)."""

    def __init__(self, lifetime: float = NONCE_LIFETIME_SECONDS, limit: int = MAX_NONCES):
        self.lifetime = lifetime
        self.limit = limit
        self._issued: OrderedDict[str, float] = OrderedDict()  # nonce -> expires at

    def issue(self, now: float) -> tuple[str, float]:
        self.prune(now)
        while len(self._issued) >= self.limit:
            self._issued.popitem(last=False)
        nonce = secrets.token_urlsafe(24)
        self._issued[nonce] = now + self.lifetime
        return nonce, now + self.lifetime

    def take(self, nonce: str, now: float) -> bool:
        """Whether `nonce` is one we issued that is neither used nor expired; it is
        used up either way."""
        expires = self._issued.pop(nonce, None) if isinstance(nonce, str) else None
        return expires is not None and now < expires

    def prune(self, now: float) -> None:
        while self._issued and next(iter(self._issued.values())) <= now:
            self._issued.popitem(last=False)

    def __len__(self) -> int:
        return len(self._issued)


def identity_from_claims(claims: dict, settings: OidcSettings) -> Identity:
    """The user and groups validated ID token claims name; TokenRejected if they
    name no usable user."""
    name = claims.get(settings.username_claim)
    if not isinstance(name, str) or not name:
        raise TokenRejected(f"the ID token has no {settings.username_claim!r} claim")
    if settings.username_claim == "email" and claims.get("email_verified") is False:
        raise TokenRejected("the provider says the e-mail address is not verified")
    if problem := user_name_problem(name):
        raise TokenRejected(f"{settings.username_claim} {name!r} is no usable user name: {problem}")
    groups = None
    if settings.groups_claim is not None and settings.groups_claim in claims:
        value = claims[settings.groups_claim]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise TokenRejected(f"the {settings.groups_claim!r} claim is not a list of names")
        groups = tuple(dict.fromkeys(value))
    return Identity(name, "sso", groups)


def _get_json(url: str, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise ProviderUnreachable(f"cannot reach the OpenID provider at {url}: {reason}") from None
    except ValueError:
        raise ProviderUnreachable(f"{url} did not answer JSON") from None
    if not isinstance(data, dict):
        raise ProviderUnreachable(f"{url} did not answer a JSON object")
    return data


class Provider:
    """The configured OpenID provider: discovery, keys, ID token validation."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._metadata: dict | None = None
        self._failed_at = -DISCOVERY_RETRY_SECONDS
        self._keys: jwt.PyJWKClient | None = None

    def metadata(self) -> dict:
        """The discovery document (fetched once; again after a failure, at most every
        DISCOVERY_RETRY_SECONDS); ProviderUnreachable if it cannot be had."""
        with self._lock:
            if self._metadata is not None:
                return self._metadata
            if time.monotonic() - self._failed_at < DISCOVERY_RETRY_SECONDS:
                raise ProviderUnreachable("the OpenID provider was unreachable moments ago")
            issuer = self.settings.issuer.rstrip("/")
            try:
                found = _get_json(
                    issuer + "/.well-known/openid-configuration",
                    self.settings.http_timeout_seconds,
                )
                missing = [
                    key
                    for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
                    if not isinstance(found.get(key), str)
                ]
                if missing:
                    raise ProviderUnreachable(f"discovery document lacks {', '.join(missing)}")
                if found["issuer"] != self.settings.issuer:
                    raise ProviderUnreachable(
                        f"the provider calls itself {found['issuer']!r}, not the configured "
                        f"issuer {self.settings.issuer!r}"
                    )
            except ProviderUnreachable:
                self._failed_at = time.monotonic()
                raise
            self._metadata = found
            self._keys = jwt.PyJWKClient(
                found["jwks_uri"],
                cache_keys=False,
                lifespan=3600,
                timeout=self.settings.http_timeout_seconds,
                cooldown_duration=JWKS_REFETCH_SECONDS,
            )
            return found

    def validate(self, id_token: str) -> tuple[Identity, str]:
        """The identity a valid ID token proves, and its nonce (the caller takes it from
        its NonceBook: accepted once); TokenRejected or ProviderUnreachable."""
        self.metadata()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise TokenRejected("the ID token is not a JWT") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRejected(f"ID token algorithm {header.get('alg')!r} is not accepted")
        try:
            if header.get("kid") is None:  # allowed while the provider has one key
                keys = self._keys.get_signing_keys()
                if len(keys) != 1:
                    raise TokenRejected("the ID token names no key, and the provider has several")
                key = keys[0]
            else:
                key = self._keys.get_signing_key(header["kid"])
        except jwt.PyJWKClientConnectionError as error:
            raise ProviderUnreachable(f"cannot fetch the provider's keys: {error}") from None
        except jwt.PyJWKClientError:
            raise TokenRejected(
                "the ID token is signed with a key the provider does not publish"
            ) from None
        except jwt.PyJWTError:
            raise TokenRejected("the ID token's header is malformed") from None
        try:
            claims = jwt.decode(
                id_token,
                key=key,
                algorithms=list(ALGORITHMS),
                audience=self.settings.client_id,
                issuer=self.settings.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the ID token has expired") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("the ID token is for another client (audience)") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("the ID token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("the ID token's signature is wrong") from None
        except jwt.PyJWTError as error:
            raise TokenRejected(f"the ID token is invalid: {type(error).__name__}") from None
        audience = claims["aud"]
        several = isinstance(audience, list) and len(audience) > 1
        if several and claims.get("azp") != self.settings.client_id:
            raise TokenRejected("the ID token's azp is not our client id")
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise TokenRejected("the ID token has no nonce")
        return identity_from_claims(claims, self.settings), nonce
