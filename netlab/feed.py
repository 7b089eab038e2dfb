"""A SessionFeed server for dataplane tests: it plays the auth service's part.

Real gRPC on a real Unix socket, built on the generated servicer; sessions are
whatever the test installs, rotates and removes.
"""

import os
import threading
import time
from concurrent import futures

import grpc

from auth_service.sessions import COUNTER_RANGES_AHEAD
from push_protocol.constants import PREVIOUS_KEY_GRACE_SECONDS
from pushgate_api import auth_pb2, control_pb2, control_pb2_grpc


def key_epoch(epoch: int = 0, created_at: float | None = None) -> auth_pb2.SessionKeys:
    return auth_pb2.SessionKeys(
        key_epoch=epoch,
        client_to_server_key=os.urandom(32),
        server_to_client_key=os.urandom(32),
        created_at_unix_ms=int((time.time() if created_at is None else created_at) * 1000),
    )


def access_policy(*rules: str, digest: str | None = None) -> control_pb2.AccessPolicy:
    """An AccessPolicy from rules as the config writes them, "PREFIX [PROTOCOL [PORTS]]"
    (PROTOCOL tcp, udp, icmp, any or a number; PORTS "22,443,8000-8999"). The digest
    defaults to the rules joined: equal rule lists, equal digests."""
    names = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}
    allow = []
    for rule in rules:
        destination, *rest = rule.split()
        protocol = rest[0] if rest else "any"
        ports = []
        for part in rest[1].split(",") if len(rest) > 1 else ():
            first, _, last = part.partition("-")
            ports.append(control_pb2.PortRange(first=int(first), last=int(last or first)))
        allow.append(
            control_pb2.AccessRule(
                destination=destination,
                protocol=names[protocol] if protocol in names else int(protocol),
                ports=ports,
            )
        )
    return control_pb2.AccessPolicy(allow=allow, digest=digest or "|".join(rules))


def allow_all() -> control_pb2.AccessPolicy:
    """Every destination, every protocol: for tests of everything but the policy."""
    return access_policy("0.0.0.0/0", "::/0")


def session(
    session_id: int,
    address: str,
    keys: auth_pb2.SessionKeys | None = None,
    keepalive: int = 10,
    expires_at: float = 0.0,
    policy: control_pb2.AccessPolicy | None = None,
) -> control_pb2.Session:
    """A feed session; its policy allows everything unless `policy` is given
    (`control_pb2.AccessPolicy()` for one that allows nothing). Without a policy
    at all a session reaches nothing: clear the field for that."""
    return control_pb2.Session(
        session_id=session_id,
        cipher=auth_pb2.CIPHER_SUITE_AES_256_GCM,
        tunnel_addresses=[address],
        current_keys=keys or key_epoch(),
        keepalive_seconds=keepalive,
        expires_at_unix_ms=int(expires_at * 1000),
        username=f"user{session_id}",
        policy=allow_all() if policy is None else policy,
    )


class FeedServer(control_pb2_grpc.SessionFeedServicer):
    def __init__(self, path: str) -> None:
        self.path = path
        self.sessions: dict[int, control_pb2.Session] = {}
        self.events: list[control_pb2.SessionEvent] = []
        self.revision = 0
        self._next_counter_range = 1  # as the auth service: never lease a range twice
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None

    def start(self) -> "FeedServer":
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        control_pb2_grpc.add_SessionFeedServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{self.path}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None
        with self._changed:
            self._changed.notify_all()

    def _publish(self, **change) -> None:
        with self._changed:
            self.revision += 1
            self.events.append(control_pb2.SessionEvent(revision=self.revision, **change))
            self._changed.notify_all()

    def install(self, sess: control_pb2.Session) -> None:
        self.sessions[sess.session_id] = sess
        self._publish(installed=sess)

    def rotate(self, session_id: int, keys: auth_pb2.SessionKeys) -> None:
        sess = self.sessions[session_id]
        sess.previous_keys.CopyFrom(sess.current_keys)
        sess.previous_keys_until_unix_ms = int((time.time() + PREVIOUS_KEY_GRACE_SECONDS) * 1000)
        sess.current_keys.CopyFrom(keys)
        self._publish(rotated=control_pb2.KeyRotation(session_id=session_id, keys=keys))

    def change_policy(self, session_id: int, policy: control_pb2.AccessPolicy) -> None:
        self.sessions[session_id].policy.CopyFrom(policy)
        self._publish(policy_changed=control_pb2.PolicyChange(session_id=session_id, policy=policy))

    def remove(self, session_id: int) -> None:
        del self.sessions[session_id]
        self._publish(
            removed=control_pb2.SessionRemoval(
                session_id=session_id, reason=control_pb2.REMOVAL_REASON_LOGOUT
            )
        )

    # -- the API ------------------------------------------------------------------

    def _lease(self, count: int) -> control_pb2.CounterRanges:
        with self._changed:
            first, self._next_counter_range = (
                self._next_counter_range,
                self._next_counter_range + count,
            )
        return control_pb2.CounterRanges(first=first, count=count)

    def ListSessions(self, request, context):
        with self._changed:
            sessions = list(self.sessions.values())
            revision = self.revision
        return control_pb2.ListSessionsResponse(
            sessions=sessions,
            revision=revision,
            counter_ranges=self._lease(2 * len(sessions) + COUNTER_RANGES_AHEAD),
        )

    def LeaseCounterRanges(self, request, context):
        return self._lease(request.count)

    def WatchSessions(self, request, context):
        after = request.after_revision
        if after > self.revision:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "unknown revision")
        while context.is_active() and self._server is not None:
            with self._changed:
                pending = [e for e in self.events if e.revision > after]
                if not pending:
                    self._changed.wait(0.5)
                    continue
            for event in pending:
                yield event
                after = event.revision
