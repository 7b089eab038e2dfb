"""Renewal tokens (like OpenVPN's auth-gen-token): Login hands the client one, bound to
its session; the client gets a new session with it (Renew) instead of keeping the
password or signing in at the provider again. Each token is used once (its
successor comes with the answer), is stored only as a hash, and lives no longer
than `renewal_lifetime_seconds` from the login that began the chain. Disabling,
removing or changing the password of the user, or kicking the session, revokes it.

Pure: the decision on a presented token; the auth service does the I/O."""

import secrets

from .sessions import revocation_cause
from .store import Renewal, User

TOKEN_BYTES = 32
DEFAULT_RENEWAL_LIFETIME_SECONDS = 7 * 86400


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def renewal_verdict(renewal: Renewal | None, user: User | None, now: float) -> int | str | None:
    """None if `renewal` may renew now; else an auth_pb2.RevocationCause (the user was
    disabled, removed or given a new password since, or the session was kicked), or
    "unknown" (no such token: used already, logged out, or never issued) or "expired"."""
    if renewal is None:
        return "unknown"
    if renewal.revoked:
        return renewal.revoked
    if cause := revocation_cause(user, renewal.authenticated_at):
        return cause
    if now >= renewal.expires_at:
        return "expired"
    return None
