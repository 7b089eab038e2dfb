"""One-time codes (TOTP, RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps) as a second
factor for password users. Pure: the caller passes the time and the last step used,
and records the step this returns (Store.use_totp_step), so that a code is accepted
once. pyotp computes the codes."""

import hmac

import pyotp

STEP_SECONDS = 30
DIGITS = 6
SKEW_STEPS = 1  # a code of the step before or after is accepted too (clock drift)
ISSUER = "pushgate"


def new_secret() -> str:
    """A fresh secret: 160 random bits, base32 (what authenticator apps take)."""
    return pyotp.random_base32(32)


def secret_problem(secret: str) -> str | None:
    """Why `secret` is no usable TOTP secret, or None."""
    try:
        raw = pyotp.TOTP(secret).byte_secret()
    except (ValueError, TypeError):
        return "not base32"
    return None if len(raw) >= 16 else "shorter than 128 bits"


def provisioning_uri(secret: str, username: str, issuer: str = ISSUER) -> str:
    """The otpauth:// URI an authenticator app enrolls from (also as a QR code)."""
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def code_at(secret: str, step: int) -> str:
    return pyotp.TOTP(secret).at(step * STEP_SECONDS)


def matching_step(secret: str, code: str, now: float, last_used: int | None) -> int | None:
    """The time step whose code `code` is (now's, or one step off), if that step is
    later than `last_used`; None otherwise: a wrong code, or one already used (or
    older than one already used)."""
    code = code.strip()
    if len(code) != DIGITS or not code.isdigit():
        return None
    current = int(now // STEP_SECONDS)
    found = None
    for step in range(current - SKEW_STEPS, current + SKEW_STEPS + 1):
        if hmac.compare_digest(code_at(secret, step), code):  # every step compared
            found = step if found is None else found
    if found is None or (last_used is not None and found <= last_used):
        return None
    return found
