"""A real PostgreSQL for tests and benchmarks: Debian's server binaries, run as user
`nobody` in a temporary directory, listening on a Unix socket there only (no TCP
port: nothing collides, and processes in other network namespaces reach it through
the file system), removed by `close`.

    with Postgres() as server:
        url = server.create_database("test")   # postgresql://pushgate@/test?host=...
        server.restart()                        # same data, same socket
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

SUPERUSER = "pushgate"
RUN_AS = "nobody"


def server_binaries() -> str:
    """The newest installed server's bin directory (Debian's postgresql package)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(path.split("/")[4]),
    )
    if not found:
        raise RuntimeError("no PostgreSQL server: apt-get install postgresql (make test does)")
    return os.path.dirname(found[-1])


class Postgres:
    def __init__(self) -> None:
        self.bin = server_binaries()
        self.directory = tempfile.mkdtemp(prefix="pushgate-pg-")
        self.data = os.path.join(self.directory, "data")
        self.log = os.path.join(self.directory, "server.log")
        user = pwd.getpwnam(RUN_AS)
        os.chown(self.directory, user.pw_uid, user.pw_gid)
        os.chmod(self.directory, 0o755)  # the socket's directory: clients must reach it
        self._as_user(
            "initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        self.start()

    def _as_user(self, program: str, *args: str) -> None:
        command = [
            "setpriv",
            f"--reuid={RUN_AS}",
            f"--regid={pwd.getpwnam(RUN_AS).pw_gid}",
            "--clear-groups",
            os.path.join(self.bin, program),
            *args,
        ]
        done = subprocess.run(
            command, cwd=self.directory, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> None:
        # -F: no fsync (a test's data need not survive a power cut); socket in our directory
        options = f"-F -k {self.directory} -c listen_addresses='' -c max_connections=200"
        self._as_user("pg_ctl", "-D", self.data, "-o", options, "-l", self.log, "-w", "start")

    def stop(self) -> None:
        self._as_user("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.directory}"

    def create_database(self, name: str) -> str:
        """A new empty database `name`; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
