"""Password hashing with Argon2id (argon2-cffi).

Parameters follow OWASP's Password Storage Cheat Sheet (Argon2id, m=19 MiB, t=2,
p=1). Verification is constant-time inside argon2; an unknown user is verified
against a dummy hash so that it costs the same as a wrong password.
"""

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1

HASHER = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM)
_DUMMY_HASH = HASHER.hash("pushgate dummy password: never matches anything real")


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True if `password` matches; with no stored hash, same work and False."""
    try:
        return HASHER.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
