"""The two databases the store runs on: SQLite (the embedded default) and PostgreSQL
(several auth services sharing users, sessions and the address pool).

The store's SQL is written once, in the dialect both accept (`?` placeholders,
`INSERT ... ON CONFLICT`, `UPDATE ... RETURNING`); the PostgreSQL side turns the
placeholders into psycopg's and the migrations' SQLite column types into
PostgreSQL's. Both sides answer with `Rows` (fetched at once), so a statement never
holds a pooled connection after it returns.
"""

import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("pushgate.auth")

# How long a statement may wait for a pooled connection, and how long the store then
# refuses at once before trying again: while PostgreSQL is down the auth service's
# event loop must not wait on it for every call (the sweep runs every second).
POSTGRES_WAIT_SECONDS = 1.0
POSTGRES_RETRY_SECONDS = 1.0
POSTGRES_NOTIFY_CHANNEL = "pushgate_sessions"
# PostgreSQL advisory lock keys (any constants, ours alone)
ADVISORY_LOCKS = {"migration": 7268616, "allocation": 7268617}
# Both sides wait this long for a lock another writer holds.
LOCK_WAIT_SECONDS = 5


class DatabaseUnavailable(Exception):
    """The database cannot be reached now (the message says why, without the URL)."""


class Conflict(Exception):
    """A write broke a uniqueness rule (another writer took the name, address or id)."""


@dataclass
class Rows:
    rows: list = field(default_factory=list)
    rowcount: int = -1

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list:
        return self.rows

    def __iter__(self):
        return iter(self.rows)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def redact_url(url: str) -> str:
    """A database URL fit for a log line or an error: no password."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class SqliteDatabase:
    kind = "sqlite"
    shared = False  # one auth service owns the file

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=LOCK_WAIT_SECONDS
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        # Deleted and overwritten rows are zeroed in the file (the default is a
        # compile-time choice, so it is set here explicitly).
        self.db.execute("PRAGMA secure_delete=ON")
        self._probe: sqlite3.Connection | None = None

    def execute(self, sql: str, args: tuple = ()) -> Rows:
        try:
            cursor = self.db.execute(sql, args)
            return Rows(cursor.fetchall(), cursor.rowcount)
        except sqlite3.IntegrityError as error:
            raise Conflict(str(error)) from None
        except sqlite3.OperationalError as error:  # locked, disk full, gone
            raise DatabaseUnavailable(f"SQLite database {self.path}: {error}") from None

    def executemany(self, sql: str, args: list) -> None:
        try:
            self.db.executemany(sql, args)
        except sqlite3.IntegrityError as error:
            raise Conflict(str(error)) from None

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (taken at once, so readers never see half of it)."""
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def lock(self, name: str) -> None:
        """Nothing to take: BEGIN IMMEDIATE already holds the only write lock."""

    def migrate(self, migrations: list[str]) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(migrations[version:], start=version + 1):
            self.db.executescript(
                "BEGIN;" + script + "INSERT OR REPLACE INTO meta (key, value) VALUES "
                f"('schema_version', '{number}'); COMMIT;"
            )

    def wipe_freed(self) -> bool:
        """Checkpoint the WAL into the database and truncate it to zero bytes: the WAL
        keeps every old page image (old keys included) until then. False if a reader
        held the WAL."""
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    def listen(self, changed: Callable[[], None]) -> None:
        """Nothing to listen to: no other auth service writes this file."""

    def probe(self, timeout: float) -> None:
        """Take and release the write lock on a connection of its own (health), waiting
        at most `timeout` for it."""
        if self._probe is None:
            self._probe = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        try:
            self._probe.execute("BEGIN IMMEDIATE")
            self._probe.execute("ROLLBACK")
        except sqlite3.Error as error:
            raise DatabaseUnavailable(f"SQLite database {self.path}: {error}") from None

    def notify(self, payload: str) -> None:
        """No one else to tell."""

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
        self.db.close()


_POSTGRES_TYPES = {"BLOB": "BYTEA", "REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT"}


def postgres_script(script: str) -> str:
    """A migration written for SQLite in PostgreSQL's types: bytes, 64-bit floats
    (timestamps) and 64-bit integers (session ids are unsigned 32-bit)."""
    return re.sub(r"\b(BLOB|REAL|INTEGER)\b", lambda match: _POSTGRES_TYPES[match.group(1)], script)


class PostgresDatabase:
    kind = "postgresql"
    shared = True  # other auth services write it too

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        # Imported here: a gateway on SQLite needs neither.
        import psycopg
        import psycopg_pool

        self._psycopg = psycopg
        self._pool_timeout = psycopg_pool.PoolTimeout
        self.url = url
        self.where = redact_url(url)
        self._sql: dict[str, str] = {}
        self._local = threading.local()  # the connection a transaction holds
        self._down_until = 0.0
        self._closing = False
        self._listener: threading.Thread | None = None
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "connect_timeout": 2},
            check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=0,  # keep trying while PostgreSQL is down
            name="pushgate-store",
            open=False,
        )
        self.pool.open(wait=False)

    def _translate(self, sql: str) -> str:
        translated = self._sql.get(sql)
        if translated is None:
            translated = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return translated

    @contextlib.contextmanager
    def _connection(self):
        held = getattr(self._local, "connection", None)
        if held is not None:
            yield held
            return
        if time.monotonic() < self._down_until:
            raise DatabaseUnavailable(f"PostgreSQL at {self.where} is unreachable")
        try:
            with self.pool.connection(timeout=POSTGRES_WAIT_SECONDS) as connection:
                yield connection
        except self._psycopg.OperationalError as error:  # refused, reset, shut down
            raise self._unavailable(_first_line(error)) from None
        except self._pool_timeout:
            raise self._unavailable(f"no connection within {POSTGRES_WAIT_SECONDS:g} s") from None

    def _unavailable(self, why: str) -> DatabaseUnavailable:
        """Refuse at once for POSTGRES_RETRY_SECONDS, then try again."""
        self._down_until = time.monotonic() + POSTGRES_RETRY_SECONDS
        return DatabaseUnavailable(f"PostgreSQL at {self.where}: {why}")

    def execute(self, sql: str, args: tuple = ()) -> Rows:
        with self._connection() as connection:
            try:
                cursor = connection.execute(self._translate(sql), args)
            except self._psycopg.errors.IntegrityError as error:
                raise Conflict(_first_line(error)) from None
            rows = cursor.fetchall() if cursor.description else []
            return Rows(rows, cursor.rowcount)

    def executemany(self, sql: str, args: list) -> None:
        if not args:
            return
        with self._connection() as connection:
            try:
                connection.cursor().executemany(self._translate(sql), args)
            except self._psycopg.errors.IntegrityError as error:
                raise Conflict(_first_line(error)) from None

    @contextlib.contextmanager
    def transaction(self):
        """One transaction on one pooled connection; nested calls join it."""
        if getattr(self._local, "connection", None) is not None:
            yield
            return
        with self._connection() as connection:
            try:
                with connection.transaction():
                    self._local.connection = connection
                    try:
                        yield
                    finally:
                        self._local.connection = None
            except self._psycopg.errors.IntegrityError as error:
                raise Conflict(_first_line(error)) from None

    def lock(self, name: str) -> None:
        """In a transaction: take the advisory lock `name` until it ends."""
        self.execute("SELECT pg_advisory_xact_lock(?)", (ADVISORY_LOCKS[name],))

    def migrate(self, migrations: list[str]) -> None:
        """Apply the migrations not yet applied, under an advisory lock: two auth
        services starting at once against one database apply each migration once."""
        with self.transaction():
            self.lock("migration")
            self.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            connection = self._local.connection
            for number, script in enumerate(migrations[version:], start=version + 1):
                connection.execute(postgres_script(script).encode())  # several statements
                self.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                    (str(number),),
                )

    def wipe_freed(self) -> bool:
        """PostgreSQL keeps a deleted row's bytes until VACUUM reuses its space and has
        no way to zero them: keys at rest there are protected by the database's own
        disk encryption and access rules (docs/operations.md)."""
        return True

    def notify(self, payload: str) -> None:
        """Tell every listening auth service that the sessions changed (after commit:
        NOTIFY inside a transaction is delivered when it commits)."""
        self.execute("SELECT pg_notify(?, ?)", (POSTGRES_NOTIFY_CHANNEL, payload))

    def listen(self, changed: Callable[[], None]) -> None:
        """Call `changed` (from a thread of its own) whenever another auth service
        NOTIFYs a session change, and after each (re)connection (changes may have been
        missed meanwhile)."""
        self._listener = threading.Thread(
            target=self._listen, args=(changed,), name="pg-listen", daemon=True
        )
        self._listener.start()

    def _listen(self, changed: Callable[[], None]) -> None:
        psycopg = self._psycopg
        while not self._closing:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as connection:
                    connection.execute(f"LISTEN {POSTGRES_NOTIFY_CHANNEL}")
                    changed()
                    while not self._closing:
                        for _ in connection.notifies(timeout=1.0, stop_after=1):
                            changed()
            except psycopg.Error as error:
                if self._closing:
                    return
                log.warning("listening for session changes at %s: %s", self.where, error)
            time.sleep(POSTGRES_RETRY_SECONDS)

    def probe(self, timeout: float) -> None:
        """One round trip on a pooled connection (health); the pool's own wait bounds it."""
        self.execute("SELECT 1")

    def close(self) -> None:
        self._closing = True
        self.pool.close()
        if self._listener is not None:
            self._listener.join(timeout=3)


def open_database(location: str) -> SqliteDatabase | PostgresDatabase:
    """The database at `location`: a postgresql:// URL, or a SQLite file's path."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(location)
    return SqliteDatabase(location)
