"""A real PostgreSQL server for tests: Debian's PostgreSQL binaries (``initdb``, ``pg_ctl``), a cluster in a
temp directory, listening on 127.0.0.1 (a free port) and on a unix socket in that directory, with a password
login ``depin`` owning a database ``prefect`` in which ``pg_trgm`` (which Prefect's schema needs) is created.

The server refuses to run as root: as root the cluster belongs to the ``postgres`` system user and every
server command runs through ``runuser -u postgres --``; otherwise it runs as the current user.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from depin_core.errors import DepinError
from depin_core.net import free_port
from tests.support.ci import require

USER = "depin"
DATABASE = "prefect"
_SUPERUSER = "postgres"


def bin_dir() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``/``psql`` (the newest Debian version, else PATH), or None."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version, reverse=True):
        return Path(found).parent
    initdb = shutil.which("initdb")
    return Path(os.path.realpath(initdb)).parent if initdb else None


def _version(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


class PostgresServer:
    """One PostgreSQL cluster; ``url`` is the SQLAlchemy/asyncpg URL of database ``prefect`` (with password),
    ``dsn`` the same for asyncpg/psql. Use as a context manager: stopped (``pg_ctl stop -m fast``) and its
    directory removed on exit."""

    def __init__(self, bindir: Path, *, startup_timeout_s: int = 60) -> None:
        self.bindir = bindir
        self.startup_timeout_s = startup_timeout_s
        self.password = secrets.token_hex(16)  # unique: tests search logs for it
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="depin-postgres-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        self._started = False

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    def __repr__(self) -> str:  # never the password
        return f"PostgresServer(127.0.0.1:{self.port}, {self.dir})"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> str:
        cmd = [str(self.bindir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", _SUPERUSER, "--", *cmd]
        env = {**os.environ, "LC_ALL": "C.UTF-8", "PGTZ": "UTC"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.dir)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise DepinError(f"{tool} {args[0] if args else ''} failed: {done.stderr[-2000:]}\n{log}")
        return done.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the unix socket; returns psql's unaligned output."""
        return self._run(
            "psql",
            *("-h", str(self.dir), "-p", str(self.port), "-U", _SUPERUSER, "-d", database),
            *("-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-c", sql),
        )

    def start(self) -> Self:
        """initdb, start, wait until it accepts connections, create the login, database and pg_trgm."""
        if self._as_postgres:
            shutil.chown(self.dir, _SUPERUSER, _SUPERUSER)
        self._run(
            "initdb",
            *("-D", str(self.data), "-U", _SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256"),
            *("--encoding=UTF8", "--locale=C", "--no-sync"),
            timeout=120,
        )
        self.port = free_port()
        options = " ".join(
            [
                f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}",
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",  # a throwaway cluster
            ]
        )
        self._started = True
        # pg_ctl -w polls the server itself (bounded by -t) until it accepts connections
        self._run(
            "pg_ctl",
            *("start", "-D", str(self.data), "-l", str(self.log_path), "-o", options),
            *("-w", "-t", str(self.startup_timeout_s)),
            timeout=self.startup_timeout_s + 10,
        )
        self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-t", "10", timeout=20)
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_trgm", database=DATABASE)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        try:
            if self._started and (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", timeout=70)
        finally:
            self._started = False
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (skips without PostgreSQL; fails under CI)."""
    bindir = bin_dir()
    require(
        None if bindir else "PostgreSQL server binaries (initdb, pg_ctl) not found",
        in_ci="PostgreSQL is missing under CI: .ci/run installs Debian's postgresql",
    )
    assert bindir is not None
    with PostgresServer(bindir) as server:
        yield server
