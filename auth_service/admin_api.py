"""pushgate.admin.v1.Admin: what `pushgate-admin` asks of a running auth service.

Served on [auth] admin_socket (a PrivateServer that identifies its callers): each
change is written to the store, published to the dataplane through the session
feed at once, and recorded in the audit log with the caller's uid.
"""

import logging
import time
from collections.abc import Callable

import grpc

from pushgate_api import admin_pb2, admin_pb2_grpc, auth_pb2
from pushgate_io.control_socket import PeerCredentials

from .access import group_listing, joining_problem
from .audit import AuditLog
from .sessions import SessionManager
from .store import NoSuchUser, StoredSession, UserExists

log = logging.getLogger("pushgate.auth")

ARGON2_PREFIX = "$argon2"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        sessions: SessionManager,
        audit: AuditLog,
        *,
        caller: Callable[[str], PeerCredentials | None],
        prefix: int,
        on_change: Callable[[], None],
    ) -> None:
        self.sessions = sessions
        self.store = sessions.store
        self.audit = audit
        self._caller = caller
        self.prefix = prefix  # of the tunnel network, for addresses as clients see them
        self.on_change = on_change

    def _uid(self, context) -> int | None:
        creds = self._caller(context.peer())
        return creds.uid if creds else None

    async def _user_change(self, context, action: str, username: str, change) -> list[int]:
        """Apply `change` to the store, end what it revokes, audit it."""
        if not username:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a user name is required")
        try:
            change()
        except NoSuchUser:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no such user {username}")
        except UserExists:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"user {username} already exists")
        ended = [s.session_id for s in await self.sessions.revoke_stale(username)]
        self.on_change()
        self.audit.admin(
            action,
            self._uid(context),
            user=username,
            ended_sessions=[f"{i:#010x}" for i in ended],
        )
        log.info("admin: %s %r; %d sessions ended", action, username, len(ended))
        return ended

    async def _check_hash(self, context, password_hash: str) -> None:
        if not password_hash.startswith(ARGON2_PREFIX):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "password_hash must be an argon2 hash"
            )

    async def _check_groups(self, context, groups) -> None:
        for group in groups:
            if self.sessions.access is not None and (
                problem := joining_problem(self.sessions.access, group)
            ):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)

    async def AddUser(self, request, context):
        name, password_hash = request.username, request.password_hash
        groups = list(request.groups)
        await self._check_hash(context, password_hash)
        await self._check_groups(context, groups)

        def change() -> None:
            with self.store.transaction():
                self.store.add_user(name, password_hash, time.time())
                for group in groups:
                    self.store.add_members(group, [name])

        await self._user_change(context, "user_add", name, change)
        if groups:
            self.audit.admin("group_add", self._uid(context), group=groups, users=[name])
        return admin_pb2.UserChangeResponse()

    async def _members_change(self, context, action: str, request, change):
        group, users = request.group, list(dict.fromkeys(request.usernames))
        if not group or not users:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a group and at least one user are required"
            )
        try:
            with self.store.transaction():
                changed = change(group, users)
        except NoSuchUser as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no such user {error}")
        updated = await self.sessions.update_policies(set(changed))
        self.on_change()
        self.audit.admin(
            action,
            self._uid(context),
            group=group,
            users=changed,
            updated_sessions=[f"{i:#010x}" for i in updated],
        )
        log.info(
            "admin: %s %r %s; %d live session(s) got a new access policy",
            action,
            group,
            ", ".join(changed) or "(no change)",
            len(updated),
        )
        return admin_pb2.GroupChangeResponse(changed=changed, updated_session_ids=updated)

    async def AddGroupMembers(self, request, context):
        await self._check_groups(context, [request.group])
        return await self._members_change(context, "group_add", request, self.store.add_members)

    async def RemoveGroupMembers(self, request, context):
        # (members of a group the config no longer declares may be removed too)
        if not self.store.memberships(request.group):
            await self._check_groups(context, [request.group])
        return await self._members_change(
            context, "group_remove", request, self.store.remove_members
        )

    async def ListGroups(self, request, context):
        access = self.sessions.access
        if access is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no access rules loaded")
        groups = group_listing(access, self.store.memberships(request.group or None), request.group)
        if request.group and not groups:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no group {request.group!r}")
        return admin_pb2.ListGroupsResponse(groups=groups, compatibility_mode=access.compatibility)

    async def SetUserDisabled(self, request, context):
        name, disabled = request.username, request.disabled
        ended = await self._user_change(
            context,
            "user_disable" if disabled else "user_enable",
            name,
            lambda: self.store.set_disabled(name, disabled),
        )
        return admin_pb2.UserChangeResponse(ended_session_ids=ended)

    async def RemoveUser(self, request, context):
        name = request.username
        ended = await self._user_change(
            context, "user_remove", name, lambda: self.store.remove_user(name)
        )
        return admin_pb2.UserChangeResponse(ended_session_ids=ended)

    async def SetPassword(self, request, context):
        name, password_hash = request.username, request.password_hash
        await self._check_hash(context, password_hash)
        ended = await self._user_change(
            context,
            "user_passwd",
            name,
            lambda: self.store.set_password(name, password_hash, time.time()),
        )
        return admin_pb2.UserChangeResponse(ended_session_ids=ended)

    def _summary(self, s: StoredSession) -> admin_pb2.SessionSummary:
        return admin_pb2.SessionSummary(
            session_id=s.session_id,
            username=s.username,
            tunnel_address=f"{s.address}/{self.prefix}",
            client_version=s.client_version,
            login_source=s.login_source,
            created_at_unix_ms=_ms(s.created_at),
            expires_at_unix_ms=_ms(s.expires_at),
            last_rekey_at_unix_ms=_ms(s.last_rekey_at),
            key_epoch=s.key_epoch,
            cipher=s.cipher,
        )

    def _select(self, username: str, session_id: int) -> list[StoredSession]:
        if session_id:
            found = self.store.session_by_id(session_id)
            sessions = [found] if found else []
        elif username:
            sessions = self.store.sessions_of(username)
        else:
            sessions = self.store.list_sessions()
        if username:
            sessions = [s for s in sessions if s.username == username]
        return sorted(sessions, key=lambda s: (s.created_at, s.session_id))

    async def ListSessions(self, request, context):
        sessions = self._select(request.username, request.session_id)
        return admin_pb2.ListSessionsResponse(sessions=[self._summary(s) for s in sessions])

    async def KickSessions(self, request, context):
        target = request.WhichOneof("target")
        if target is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a session id or a user name is required"
            )
        if target == "session_id":
            sessions = self._select("", request.session_id)
            what = f"session {request.session_id:#010x}"
        else:
            sessions = self._select(request.username, 0)
            what = f"sessions of user {request.username}"
        if not sessions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live {what}")
        ended = [
            s.session_id
            for s in await self.sessions.revoke(sessions, auth_pb2.REVOCATION_CAUSE_KICKED)
        ]
        self.on_change()
        self.audit.admin(
            "session_kick",
            self._uid(context),
            target=what,
            ended_sessions=[f"{i:#010x}" for i in ended],
        )
        log.info("admin: kicked %s; %d sessions ended", what, len(ended))
        return admin_pb2.UserChangeResponse(ended_session_ids=ended)
