"""A PostgreSQL cluster of the drill's own, on one host: Debian's binaries, a fresh data folder,
password authentication for the network, nothing shared with a system cluster.

The password is the cluster's secret: it reaches the servers that use the database through
`PGPASSWORD` in their environment (libpq, psycopg2 and asyncpg all read it), never a URL on a
command line or in a log.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from scripts.hosts import Host

PORT = 5432


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL's binaries are missing: run `bash scripts/setup --tests` as root (it installs Debian's postgresql)")
    return str(found[-1])


class PostgresCluster:
    """One cluster on `host`, run by the `postgres` OS user, one database per `databases` entry,
    each owned by a role of the same name with the cluster's password."""

    def __init__(self, host: Host, folder: Path, databases: tuple[str, ...]) -> None:
        self.host, self.folder, self.databases = host, folder, databases
        self.password = secrets.token_urlsafe(18)
        self.data = folder / "pgdata"
        self.log = folder / "postgres.log"

    def url(self, database: str, driver: str = "postgresql") -> str:
        """The database's URL without its password (that travels as PGPASSWORD)."""
        return f"{driver}://{database}@{self.host.address}:{PORT}/{database}"

    def start(self) -> PostgresCluster:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        subprocess.run(["chown", "postgres:postgres", str(self.folder)], check=True)
        self.folder.chmod(0o700)
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password)
        subprocess.run(["chown", "postgres:postgres", str(pwfile)], check=True)
        self._as_postgres(
            _bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"
        )
        pwfile.unlink()
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\n")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '{self.host.address}'\nport = {PORT}\nunix_socket_directories = '{self.folder}'\n")
            conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")  # a test cluster: speed over durability
        self._ctl("start")
        for database in self.databases:
            self.sql(f"CREATE ROLE {database} LOGIN PASSWORD '{self.password}'")
            self.sql(f"CREATE DATABASE {database} OWNER {database}")
        return self

    def down(self) -> None:
        """The database goes away, every open connection with it."""
        self._ctl("stop", "-m", "fast")

    def up(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", "immediate")

    def sql(self, statement: str) -> str:
        done = self._as_postgres(_bin("psql"), "-h", str(self.folder), "-p", str(PORT), "-U", "postgres", "-tAc", statement)
        return done.stdout

    def _ctl(self, action: str, *args: str) -> None:
        self._as_postgres(_bin("pg_ctl"), action, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args)

    def _as_postgres(self, *command: str) -> subprocess.CompletedProcess:
        done = self.host.run(*command, user="postgres", env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr or done.stdout}")
        return done
