"""Users, sessions, the address pool's records and the session change log, in
SQLite (the embedded default) or PostgreSQL (several auth services sharing them;
auth_service/database.py).

Schema changes are numbered migrations, one list for both databases;
`meta.schema_version` says which have run. Session keys are stored so that a
restarted auth service can hand every live session to the dataplane again: a
SQLite file is created mode 0600. In SQLite, keys that were deleted or replaced
leave no copy behind once `wipe_replaced_keys` has run: secure_delete zeroes freed
content in the database file, and a truncating checkpoint removes the old page
images the write-ahead log still holds.

Every write that several auth services could race on is decided by the database:
unique constraints on a session's id, token and address (the loser gets `Conflict`
and tries again), `UPDATE ... RETURNING` for the revision and the counter-range
lease, `DELETE ... RETURNING` for a renewal token's single use.
"""

import os
from dataclasses import dataclass

from push_protocol.constants import KEY_LEN, SEND_COUNTER_RANGES

from .database import Conflict, open_database

MIGRATIONS = [
    # 1: users, sessions, the feed revision
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE sessions (
        session_id INTEGER PRIMARY KEY,
        token_hash BLOB NOT NULL UNIQUE,
        username TEXT NOT NULL,
        address TEXT NOT NULL UNIQUE,
        cipher INTEGER NOT NULL,
        key_epoch INTEGER NOT NULL,
        c2s_key BLOB NOT NULL,
        s2c_key BLOB NOT NULL,
        keys_created_at REAL NOT NULL,
        previous_epoch INTEGER,
        previous_c2s_key BLOB,
        previous_s2c_key BLOB,
        previous_created_at REAL,
        previous_until REAL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        last_rekey_at REAL NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('revision', '0');
    """,
    # 2: who last held each freed tunnel address, and when (quarantine and sticky addresses)
    """
    CREATE TABLE released_addresses (
        address TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        released_at REAL NOT NULL
    );
    """,
    # 3: revocation (issue 17): when a password last changed (sessions older than that
    # end), sessions an administrator ended (their clients are told so), and what the
    # admin listing shows of a session
    """
    ALTER TABLE users ADD COLUMN password_changed_at REAL;
    ALTER TABLE sessions ADD COLUMN client_version TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN login_source TEXT NOT NULL DEFAULT '';
    CREATE TABLE revoked_sessions (
        token_hash BLOB PRIMARY KEY,
        session_id INTEGER NOT NULL,
        username TEXT NOT NULL,
        cause INTEGER NOT NULL,
        revoked_at REAL NOT NULL
    );
    """,
    # 4: group membership (issue 18): given by an administrator or by the identity
    # provider's claims at login; a user is a member if either source says so
    """
    CREATE TABLE group_members (
        group_name TEXT NOT NULL,
        username TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('admin', 'idp')),
        PRIMARY KEY (group_name, username, source)
    );
    CREATE INDEX group_members_by_user ON group_members (username);
    """,
    # 5: identity (issue 19): TOTP secrets and the last time step used (a code is
    # accepted once), renewal tokens (hashed; `revoked` holds the auth_pb2.RevocationCause
    # that ended them, so their client is told)
    """
    ALTER TABLE users ADD COLUMN totp_secret TEXT;
    ALTER TABLE users ADD COLUMN totp_last_step INTEGER;
    CREATE TABLE renewal_tokens (
        token_hash BLOB PRIMARY KEY,
        username TEXT NOT NULL,
        session_id INTEGER NOT NULL,
        method TEXT NOT NULL,
        authenticated_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX renewal_tokens_user ON renewal_tokens (username);
    """,
    # 6: whether the session's client completes partial checksums (issue 23)
    """
    ALTER TABLE sessions ADD COLUMN partial_checksums INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: several auth services on one database (issue 22): the change log every auth
    # service follows to tell its own dataplane (`kind` is the SessionEvent's change,
    # `reason` a removal's control_pb2.RemovalReason), and the counter-range lease as a
    # row of its own (taken with UPDATE ... RETURNING); the indexes a login's
    # allocation reads by (SessionManager._allocate)
    """
    CREATE TABLE session_changes (
        revision INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO meta (key, value) VALUES ('counter_ranges_leased', '1')
        ON CONFLICT (key) DO NOTHING;
    CREATE INDEX sessions_by_user ON sessions (username);
    CREATE INDEX released_by_user ON released_addresses (username, released_at);
    CREATE INDEX released_by_age ON released_addresses (released_at);
    """,
]

MEMBERSHIP_SOURCES = ("admin", "idp")


# auth_pb2.RevocationCause values (the store does not import the generated code)
_CAUSE_USER_DISABLED, _CAUSE_USER_REMOVED, _CAUSE_PASSWORD_CHANGED = 2, 3, 4


class UserExists(Exception):
    pass


class NoSuchUser(Exception):
    pass


@dataclass
class User:
    name: str
    password_hash: str
    disabled: bool
    created_at: float
    password_changed_at: float | None = None  # sessions created before it are ended


@dataclass(frozen=True)
class Revocation:
    """A session an administrator ended, remembered so its client can be told."""

    session_id: int
    username: str
    cause: int  # auth_pb2.RevocationCause
    revoked_at: float


@dataclass(frozen=True)
class Release:
    """Who last held a freed tunnel address, and when it was freed."""

    username: str
    released_at: float


@dataclass(frozen=True)
class Renewal:
    """A renewal token's record (the token itself is never stored, only its hash)."""

    username: str
    session_id: int  # the session it was issued with
    method: str  # how the user first authenticated: "password" or "sso"
    authenticated_at: float  # then; the token's successors keep it
    expires_at: float  # no renewal after this, successors included
    revoked: int  # auth_pb2.RevocationCause, or 0


@dataclass
class StoredSession:
    session_id: int
    token_hash: bytes
    username: str
    address: str
    cipher: int
    key_epoch: int
    c2s_key: bytes
    s2c_key: bytes
    keys_created_at: float
    previous_epoch: int | None
    previous_c2s_key: bytes | None
    previous_s2c_key: bytes | None
    previous_created_at: float | None
    previous_until: float | None
    created_at: float
    expires_at: float
    last_rekey_at: float
    client_version: str = ""
    login_source: str = ""
    # 1: its client completes partial TCP checksums (an integer, as the column)
    partial_checksums: int = 0

    def __repr__(self) -> str:  # keys and token never reach a log line
        return f"StoredSession(id={self.session_id:#010x}, user={self.username!r})"

    @classmethod
    def begun(
        cls,
        session_id: int,
        token_hash: bytes,
        username: str,
        address: str,
        cipher: int,
        now: float,
        expires_at: float,
        **client,  # client_version, login_source, partial_checksums
    ) -> "StoredSession":
        """A session that begins at `now`: fresh keys of epoch 0, none before them."""
        return cls(
            session_id=session_id,
            token_hash=token_hash,
            username=username,
            address=address,
            cipher=cipher,
            key_epoch=0,
            c2s_key=os.urandom(KEY_LEN),
            s2c_key=os.urandom(KEY_LEN),
            keys_created_at=now,
            previous_epoch=None,
            previous_c2s_key=None,
            previous_s2c_key=None,
            previous_created_at=None,
            previous_until=None,
            created_at=now,
            expires_at=expires_at,
            last_rekey_at=now,
            **client,
        )


_SESSION_COLUMNS = ", ".join(StoredSession.__dataclass_fields__)


class Store:
    def __init__(self, location: str) -> None:
        """The store at `location`: a postgresql:// URL, or a SQLite file's path
        (created mode 0600)."""
        self.location = location
        postgres = location.startswith(("postgresql://", "postgres://"))
        if not postgres and location != ":memory:" and not os.path.exists(location):
            os.makedirs(os.path.dirname(os.path.abspath(location)), exist_ok=True)
            os.close(os.open(location, os.O_CREAT | os.O_WRONLY, 0o600))
        self.db = open_database(location)
        # old key bytes may be in the WAL (since the last wipe, or left by an earlier run)
        self._keys_replaced = True
        self.db.migrate(MIGRATIONS)

    @property
    def shared(self) -> bool:
        """Whether other auth services write this database too."""
        return self.db.shared

    def close(self) -> None:
        self.db.close()

    @property
    def schema_version(self) -> int:
        return int(
            self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        )

    # -- users -------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str, now: float) -> None:
        try:
            self.db.execute(
                "INSERT INTO users (name, password_hash, disabled, created_at) VALUES (?, ?, 0, ?)",
                (name, password_hash, now),
            )
        except Conflict:
            raise UserExists(name) from None

    _USER_COLUMNS = "name, password_hash, disabled, created_at, password_changed_at"

    def get_user(self, name: str) -> User | None:
        row = self.db.execute(
            f"SELECT {self._USER_COLUMNS} FROM users WHERE name=?", (name,)
        ).fetchone()
        return User(row[0], row[1], bool(row[2]), row[3], row[4]) if row else None

    def list_users(self) -> list[User]:
        rows = self.db.execute(f"SELECT {self._USER_COLUMNS} FROM users ORDER BY name").fetchall()
        return [User(r[0], r[1], bool(r[2]), r[3], r[4]) for r in rows]

    def _update_user(self, sql: str, args: tuple) -> None:
        if self.db.execute(sql, args).rowcount == 0:
            raise NoSuchUser(args[-1])

    def set_password(self, name: str, password_hash: str, now: float) -> None:
        """Also records `now`: the user's sessions from before it are to end."""
        self._update_user(
            "UPDATE users SET password_hash=?, password_changed_at=? WHERE name=?",
            (password_hash, now, name),
        )
        self.revoke_renewals(name, _CAUSE_PASSWORD_CHANGED)

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._update_user("UPDATE users SET disabled=? WHERE name=?", (int(disabled), name))
        if disabled:
            self.revoke_renewals(name, _CAUSE_USER_DISABLED)

    def remove_user(self, name: str) -> None:
        """The user and their group memberships (a namesake added later has none)."""
        self._update_user("DELETE FROM users WHERE name=?", (name,))
        self.db.execute("DELETE FROM group_members WHERE username=?", (name,))
        self.revoke_renewals(name, _CAUSE_USER_REMOVED)

    # -- group membership ----------------------------------------------------------

    def _check_users(self, usernames: list[str]) -> None:
        for name in usernames:
            if self.get_user(name) is None:
                raise NoSuchUser(name)

    def add_members(self, group: str, usernames: list[str], source: str = "admin") -> list[str]:
        """Make `usernames` (existing users) members of `group`; those not already
        members from `source`."""
        self._check_users(usernames)
        return [
            name
            for name in dict.fromkeys(usernames)
            if self.db.execute(
                "INSERT INTO group_members VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (group, name, source),
            ).rowcount
        ]

    def remove_members(self, group: str, usernames: list[str], source: str = "admin") -> list[str]:
        """Membership of `group` from `source` ended for `usernames`; those that had it."""
        self._check_users(usernames)
        return [
            name
            for name in dict.fromkeys(usernames)
            if self.db.execute(
                "DELETE FROM group_members WHERE group_name=? AND username=? AND source=?",
                (group, name, source),
            ).rowcount
        ]

    def replace_user_groups(self, username: str, groups, source: str) -> bool:
        """Set the groups `source` ("admin" or "idp") gives `username` to exactly
        `groups` (the other source's are kept: membership is the union of both);
        whether anything changed. The identity provider's login calls this with "idp"."""
        if source not in MEMBERSHIP_SOURCES:
            raise ValueError(f"membership source must be one of {MEMBERSHIP_SOURCES}")
        self._check_users([username])
        wanted = set(groups)
        rows = self.db.execute(
            "SELECT group_name FROM group_members WHERE username=? AND source=?",
            (username, source),
        )
        current = {row[0] for row in rows.fetchall()}
        self.db.executemany(
            "DELETE FROM group_members WHERE group_name=? AND username=? AND source=?",
            [(group, username, source) for group in current - wanted],
        )
        self.db.executemany(
            "INSERT INTO group_members VALUES (?, ?, ?)",
            [(group, username, source) for group in wanted - current],
        )
        return wanted != current

    def groups_of(self, username: str) -> list[str]:
        """The groups `username` is a member of (from either source), by name."""
        rows = self.db.execute(
            "SELECT DISTINCT group_name FROM group_members WHERE username=? ORDER BY group_name",
            (username,),
        )
        return [row[0] for row in rows.fetchall()]

    def memberships(self, group: str | None = None) -> dict[str, dict[str, list[str]]]:
        """{group: {user: [sources]}} of every group with members (or of `group`)."""
        sql = "SELECT group_name, username, source FROM group_members"
        rows = self.db.execute(
            sql + (" WHERE group_name=?" if group else "") + " ORDER BY 1, 2, 3",
            (group,) if group else (),
        )
        found: dict[str, dict[str, list[str]]] = {}
        for group_name, username, source in rows.fetchall():
            found.setdefault(group_name, {}).setdefault(username, []).append(source)
        return found

    # -- one-time codes (auth_service/totp.py decides) -------------------------------

    def set_totp(self, name: str, secret: str | None) -> None:
        """Give `name` a TOTP secret (None: take it away); no step is used yet."""
        self._update_user(
            "UPDATE users SET totp_secret=?, totp_last_step=NULL WHERE name=?", (secret, name)
        )

    def totp(self, name: str) -> tuple[str, int | None] | None:
        """The user's TOTP secret and the last time step a code was accepted for."""
        row = self.db.execute(
            "SELECT totp_secret, totp_last_step FROM users WHERE name=?", (name,)
        ).fetchone()
        return (row[0], row[1]) if row and row[0] else None

    def use_totp_step(self, name: str, step: int) -> bool:
        """Record that a code of time step `step` was accepted; False if that step or a
        later one already was (one write: two logins cannot both use one code)."""
        return (
            self.db.execute(
                "UPDATE users SET totp_last_step=? WHERE name=? AND totp_secret IS NOT NULL "
                "AND (totp_last_step IS NULL OR totp_last_step < ?)",
                (step, name, step),
            ).rowcount
            == 1
        )

    # -- renewal tokens ------------------------------------------------------------

    def add_renewal(self, token_hash: bytes, renewal: Renewal) -> None:
        self.db.execute(
            "INSERT INTO renewal_tokens (token_hash, username, session_id, method, "
            "authenticated_at, expires_at, revoked) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                token_hash,
                renewal.username,
                renewal.session_id,
                renewal.method,
                renewal.authenticated_at,
                renewal.expires_at,
                renewal.revoked,
            ),
        )

    def take_renewal(self, token_hash: bytes) -> Renewal | None:
        """The record of a renewal token, deleted: a token is used once (one statement,
        so two auth services cannot both take it)."""
        row = self.db.execute(
            "DELETE FROM renewal_tokens WHERE token_hash=? RETURNING username, session_id, "
            "method, authenticated_at, expires_at, revoked",
            (token_hash,),
        ).fetchone()
        return Renewal(*row) if row is not None else None

    def revoke_renewals(self, name: str, cause: int, session_id: int | None = None) -> None:
        """Mark the renewal tokens of `name` (or of one session of theirs) revoked."""
        sql, args = "UPDATE renewal_tokens SET revoked=? WHERE username=?", (cause, name)
        if session_id is not None:
            sql, args = sql + " AND session_id=?", (*args, session_id)
        self.db.execute(sql, args)

    def drop_renewals(self, session_id: int) -> None:
        """Forget the renewal tokens of a session its user logged out of."""
        self.db.execute("DELETE FROM renewal_tokens WHERE session_id=?", (session_id,))

    def forget_expired_renewals(self, now: float) -> int:
        old = "FROM renewal_tokens WHERE expires_at <= ?"
        if self.db.execute(f"SELECT 1 {old} LIMIT 1", (now,)).fetchone() is None:
            return 0
        return self.db.execute(f"DELETE {old}", (now,)).rowcount

    def transaction(self):
        """One write transaction (readers never see half of it)."""
        return self.db.transaction()

    # -- sessions and the feed revision ----------------------------------------------

    def next_revision(self) -> int:
        """The next feed revision. In a transaction, the row stays locked until it
        ends: revisions commit in order, on every auth service."""
        row = self.db.execute(
            "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
            "WHERE key='revision' RETURNING value"
        ).fetchone()
        return int(row[0])

    @property
    def revision(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])

    def lock_allocation(self) -> None:
        """In a transaction: wait for other auth services' logins to commit first."""
        self.db.lock("allocation")

    def log_change(self, revision: int, session_id: int, kind: str, reason: int = 0) -> None:
        """Record a session change for every auth service's feed (`changes_after`)."""
        self.db.execute(
            "INSERT INTO session_changes (revision, session_id, kind, reason) VALUES (?, ?, ?, ?)",
            (revision, session_id, kind, reason),
        )

    def changes_after(self, revision: int) -> list[tuple[int, int, str, int]]:
        """(revision, session id, kind, reason) of every change after `revision`."""
        return self.db.execute(
            "SELECT revision, session_id, kind, reason FROM session_changes "
            "WHERE revision > ? ORDER BY revision",
            (revision,),
        ).fetchall()

    def forget_changes(self, before: int) -> int:
        """Forget the changes up to `before`; writes only if there are any (the sweep
        calls this every second, and must not wait on a locked database)."""
        old = "FROM session_changes WHERE revision <= ?"
        if self.db.execute(f"SELECT 1 {old} LIMIT 1", (before,)).fetchone() is None:
            return 0
        return self.db.execute(f"DELETE {old}", (before,)).rowcount

    def oldest_change(self) -> int:
        """The revision before the oldest change still logged (or the current one)."""
        row = self.db.execute("SELECT MIN(revision) FROM session_changes").fetchone()
        return row[0] - 1 if row and row[0] is not None else self.revision

    def add_session(self, session: StoredSession) -> None:
        values = tuple(getattr(session, f) for f in StoredSession.__dataclass_fields__)
        marks = ", ".join("?" * len(values))
        self.db.execute(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({marks})", values)

    def save_session(self, session: StoredSession) -> None:
        self._keys_replaced = True
        fields = [f for f in StoredSession.__dataclass_fields__ if f != "session_id"]
        assignments = ", ".join(f"{f}=?" for f in fields)
        values = (*(getattr(session, f) for f in fields), session.session_id)
        self.db.execute(f"UPDATE sessions SET {assignments} WHERE session_id=?", values)

    def _sessions(self, where: str = "", args: tuple = ()) -> list[StoredSession]:
        rows = self.db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions {where}", args)
        return [StoredSession(*row) for row in rows.fetchall()]

    def session_by_token(self, token_hash: bytes) -> StoredSession | None:
        found = self._sessions("WHERE token_hash=?", (token_hash,))
        return found[0] if found else None

    def sessions_of(self, username: str) -> list[StoredSession]:
        """The user's sessions, oldest first."""
        return self._sessions("WHERE username=? ORDER BY created_at, session_id", (username,))

    _FREE = "NOT EXISTS (SELECT 1 FROM sessions s WHERE s.address = r.address)"

    def previous_address(self, username: str) -> str | None:
        """The address `username` freed last that nobody uses now."""
        row = self.db.execute(
            f"SELECT r.address FROM released_addresses r WHERE r.username=? AND {self._FREE} "
            "ORDER BY r.released_at DESC, r.address DESC LIMIT 1",
            (username,),
        ).fetchone()
        return row[0] if row else None

    def oldest_freed(self) -> tuple[str, float] | None:
        """The address freed longest ago that nobody uses now, and when it was freed."""
        row = self.db.execute(
            f"SELECT r.address, r.released_at FROM released_addresses r WHERE {self._FREE} "
            "ORDER BY r.released_at, r.address LIMIT 1"
        ).fetchone()
        return (row[0], row[1]) if row else None

    def is_held(self, address: str) -> bool:
        """Whether `address` is live or on record as freed."""
        return (
            self.db.execute(
                "SELECT 1 FROM sessions WHERE address=? "
                "UNION ALL SELECT 1 FROM released_addresses WHERE address=? LIMIT 1",
                (address, address),
            ).fetchone()
            is not None
        )

    def never_held_mark(self) -> tuple[str | None, int]:
        """(tunnel network, number) below which every address of that network was held."""
        row = self.db.execute("SELECT value FROM meta WHERE key='never_held_from'").fetchone()
        if row is None:
            return None, 0
        network, _, number = row[0].rpartition(" ")
        return network, int(number)

    def set_never_held_mark(self, network: str, number: int) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES ('never_held_from', ?) "
            "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            (f"{network} {number}",),
        )

    def used_addresses(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT address FROM sessions")}

    def list_sessions(self) -> list[StoredSession]:
        return self._sessions("ORDER BY session_id")

    def expired_sessions(self, now: float) -> list[StoredSession]:
        return self._sessions("WHERE expires_at <= ?", (now,))

    def session_owners(self) -> list[tuple[int, str, float]]:
        """(session id, user name, created at) of every session."""
        return self.db.execute(
            "SELECT session_id, username, created_at FROM sessions ORDER BY session_id"
        ).fetchall()

    def session_by_id(self, session_id: int) -> StoredSession | None:
        found = self._sessions("WHERE session_id=?", (session_id,))
        return found[0] if found else None

    def remember_revoked(self, session: StoredSession, cause: int, now: float) -> None:
        self.db.execute(
            "INSERT INTO revoked_sessions VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) "
            "DO UPDATE SET session_id=excluded.session_id, username=excluded.username, "
            "cause=excluded.cause, revoked_at=excluded.revoked_at",
            (session.token_hash, session.session_id, session.username, cause, now),
        )

    def revocation(self, token_hash: bytes) -> Revocation | None:
        row = self.db.execute(
            "SELECT session_id, username, cause, revoked_at FROM revoked_sessions "
            "WHERE token_hash=?",
            (token_hash,),
        ).fetchone()
        return Revocation(*row) if row else None

    def forget_revoked(self, before: float) -> int:
        """Forget sessions revoked before `before`; writes only if there are any (the
        sweep calls this every second, and must not wait on a locked database)."""
        old = "FROM revoked_sessions WHERE revoked_at < ?"
        if self.db.execute(f"SELECT 1 {old} LIMIT 1", (before,)).fetchone() is None:
            return 0
        return self.db.execute(f"DELETE {old}", (before,)).rowcount

    def delete_session(self, session_id: int, now: float) -> bool:
        """Delete a session and record its address as released by its user at `now`."""
        self._keys_replaced = True
        self.db.execute(
            "INSERT INTO released_addresses (address, username, released_at) "
            "SELECT address, username, ? FROM sessions WHERE session_id=? "
            "ON CONFLICT (address) DO UPDATE SET username=excluded.username, "
            "released_at=excluded.released_at",
            (now, session_id),
        )
        return (
            self.db.execute("DELETE FROM sessions WHERE session_id=?", (session_id,)).rowcount > 0
        )

    def wipe_replaced_keys(self) -> bool:
        """Checkpoint the WAL into the database and truncate it to zero bytes if any
        session was saved or deleted since the last wipe: the WAL keeps every old
        page image (old keys included) until then. The auth service's sweep calls
        this, so it runs at most once a second. False if a reader held the WAL
        (it is tried again next time)."""
        if not self._keys_replaced:
            return True
        self._keys_replaced = not self.db.wipe_freed()
        return not self._keys_replaced

    def lease_counter_ranges(self, count: int) -> int:
        """The first of `count` send-counter ranges that were never leased before
        (push_protocol/constants.py, SEND_COUNTER_RANGE), within a transaction.
        Range 0 is the clients'; the store keeps the lease beside the keys it covers,
        so no range is handed out twice while those keys exist."""
        row = self.db.execute(
            "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT) "
            "WHERE key='counter_ranges_leased' RETURNING value",
            (count,),
        ).fetchone()
        first = int(row[0]) - count
        if int(row[0]) > SEND_COUNTER_RANGES:
            raise RuntimeError("every send-counter range has been leased")
        return first

    def released_addresses(self) -> dict[str, Release]:
        rows = self.db.execute("SELECT address, username, released_at FROM released_addresses")
        return {address: Release(username, at) for address, username, at in rows.fetchall()}

    def forget_released(self, addresses: list[str]) -> None:
        self.db.executemany(
            "DELETE FROM released_addresses WHERE address=?", [(a,) for a in addresses]
        )

    def count_sessions(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
