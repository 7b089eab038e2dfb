"""The audit log: one JSON object a line, for every login attempt, every session
end, and every change an administrator makes (with the caller's uid).

Never rate-limited (unlike the service log) and never holding a secret: no
password, hash, token or key is ever passed in. Written to a file (append,
mode 0640) or to stdout; each line is flushed as it is written.
"""

import json
import os
import sys
import time
from typing import TextIO

from pushgate_api import auth_pb2, control_pb2

from .store import StoredSession

# Names used in the log for the proto enums (stable: scripts match on them).
REMOVAL_NAMES = {
    control_pb2.REMOVAL_REASON_LOGOUT: "logout",
    control_pb2.REMOVAL_REASON_EXPIRED: "expired",
    control_pb2.REMOVAL_REASON_ADMIN: "admin",
    control_pb2.REMOVAL_REASON_REPLACED: "replaced",
}
REVOCATION_NAMES = {
    auth_pb2.REVOCATION_CAUSE_KICKED: "kicked",
    auth_pb2.REVOCATION_CAUSE_USER_DISABLED: "user_disabled",
    auth_pb2.REVOCATION_CAUSE_USER_REMOVED: "user_removed",
    auth_pb2.REVOCATION_CAUSE_PASSWORD_CHANGED: "password_changed",
}


class AuditLog:
    def __init__(self, stream: TextIO, clock=time.time) -> None:
        self._stream = stream
        self._clock = clock

    @classmethod
    def open(cls, path: str | None) -> "AuditLog":
        """Append to `path`, or write to stdout if None."""
        if path is None:
            return cls(sys.stdout)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return cls(os.fdopen(fd, "a", encoding="utf-8"))

    def close(self) -> None:
        if self._stream is not sys.stdout:
            self._stream.close()

    def record(self, event: str, **fields) -> None:
        line = {"time": round(self._clock(), 3), "event": event, **fields}
        self._stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._stream.flush()

    def login(
        self,
        result: str,
        user: str,
        source: str,
        session: StoredSession | None,
        *,
        method: str | None = None,
    ) -> None:
        """`result` is the pushgate_auth_logins_total label for this attempt; `method`
        how the user proved who they are (pushgate_auth_logins_by_method)."""
        fields = {"result": result, "user": user, "source": source}
        if method is not None:
            fields["method"] = method
        if session is not None:
            fields |= {"session": f"{session.session_id:#010x}", "address": session.address}
        self.record("login", **fields)

    def session_ended(self, session: StoredSession, reason: int, cause: int) -> None:
        fields = {
            "session": f"{session.session_id:#010x}",
            "user": session.username,
            "reason": REMOVAL_NAMES.get(reason, str(reason)),
        }
        if cause:
            fields["cause"] = REVOCATION_NAMES.get(cause, str(cause))
        self.record("session_end", **fields)

    def admin(self, action: str, caller_uid: int | None, **fields) -> None:
        self.record("admin", action=action, caller_uid=caller_uid, **fields)
