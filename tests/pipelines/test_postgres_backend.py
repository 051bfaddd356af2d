"""The Prefect control plane on PostgreSQL: ``depin up --database-url`` starts a real Prefect server on a real
PostgreSQL 15 (tests/support/postgres.py); a flow run against its API is stored in PostgreSQL's ``flow_run``
table, and the database password appears in no log, state file, output, command line or other service's
environment. Plus the URL checks and where the URL comes from."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from depin_core.errors import ConfigError
from pipelines.stack.up import (
    DATABASE_URL_ENV,
    PREFECT_DATABASE_ENV,
    PREFECT_HOME,
    STATE_FILE,
    UP_DIR,
    UpOptions,
    UpStack,
    check_database_url,
    prefect_server_command,
    redact_url,
    resolve_database,
)
from tests.support.postgres import PostgresServer, postgres_server  # noqa: F401 (the fixture)
from tests.support.up_stack import DEPIN, clean_env, last_json
from tests.support.up_stack import up_args as _up_args

REPO = Path(__file__).resolve().parents[2]
PG_URL = "postgresql+asyncpg://depin:s3cret-pw@db.example:5432/prefect"


def tiny_deployments() -> list[Any]:
    """``DEPIN_UP_DEPLOYMENTS`` for the test's ``depin up``: one trivial deployment (serving is not what is
    tested here, and the project's deployments import the whole pipeline)."""
    from prefect import flow

    @flow(name="pg-tiny")
    def tiny() -> int:
        return 1

    return [tiny.to_deployment(name="tiny")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if k not in (DATABASE_URL_ENV, PREFECT_DATABASE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["DEPIN_UP_DEPLOYMENTS"] = f"{__name__}:tiny_deployments"
    return env


def _depin(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEPIN, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


# -------------------------------------------------------------------------------- the URL, without servers


def test_redacted_and_checked() -> None:
    assert redact_url(PG_URL) == "postgresql+asyncpg://depin:***@db.example:5432/prefect"
    assert check_database_url(PG_URL, "--database-url") == redact_url(PG_URL)
    assert check_database_url("sqlite+aiosqlite:///tmp/p.db", "--database-url").startswith("sqlite+aiosqlite")
    for bad, why in [
        ("mysql://u:s3cret-pw@h/db", "scheme 'mysql'"),
        ("postgresql://u:s3cret-pw@h/db", "scheme 'postgresql'"),
        ("postgresql+asyncpg://u:s3cret-pw@/db", "needs a host and a database"),
        ("not a url s3cret-pw", "not a database URL"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_database_url(bad, "--database-url")
        msg = str(err.value)
        assert why in msg and msg.startswith("--database-url:") and "postgresql+asyncpg://USER:" in msg
        assert "s3cret-pw" not in msg


def test_where_the_url_comes_from() -> None:
    flag = UpOptions(database_url=SecretStr(PG_URL))
    plain = UpOptions()
    other = PG_URL.replace("db.example", "other.example")
    both = {DATABASE_URL_ENV: other, PREFECT_DATABASE_ENV: "sqlite+aiosqlite:///x.db"}
    url, source = resolve_database(flag, both)
    assert url is not None and url.get_secret_value() == PG_URL and source == "--database-url"
    url, source = resolve_database(plain, both)
    assert url is not None and url.get_secret_value() == other and source == DATABASE_URL_ENV
    url, source = resolve_database(plain, {PREFECT_DATABASE_ENV: PG_URL})
    assert url is not None and source == PREFECT_DATABASE_ENV
    assert resolve_database(plain, {}) == (None, None)  # SQLite in PREFECT_HOME
    with pytest.raises(ConfigError, match=f"^{DATABASE_URL_ENV}: scheme 'mysql'"):
        resolve_database(plain, {DATABASE_URL_ENV: "mysql://u:p@h/db"})
    # never in the options JSON (the background supervisor's command line), nor in its repr
    assert "s3cret-pw" not in flag.model_dump_json() and "s3cret-pw" not in repr(flag)


def test_only_the_server_gets_the_url(tmp_path: Path) -> None:
    env = {"PATH": "/bin", DATABASE_URL_ENV: "x", PREFECT_DATABASE_ENV: "y"}
    _cmd, server_env, _api = prefect_server_command("127.0.0.1", 1, tmp_path, env, SecretStr(PG_URL))
    assert server_env[PREFECT_DATABASE_ENV] == PG_URL and DATABASE_URL_ENV not in server_env
    _cmd, sqlite_env, _api = prefect_server_command("127.0.0.1", 1, tmp_path, env)
    assert PREFECT_DATABASE_ENV not in sqlite_env and DATABASE_URL_ENV not in sqlite_env


def test_the_flag_needs_a_server_of_our_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    stack = UpStack(UpOptions(database_url=SecretStr(PG_URL)), threading.Event())
    with pytest.raises(ConfigError, match=r"--database-url .* PREFECT_API_URL points at a server") as err:
        stack._prefect_server()
    assert "s3cret-pw" not in str(err.value) and stack.children == []


def test_a_bad_flag_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    done = _depin("up", "--database-url", "mysql://u:s3cret-pw@h/db", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--database-url" in done.stderr and "postgresql+asyncpg://USER:PASSWORD@HOST" in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
    assert not (tmp_path / STATE_FILE).exists()


# ----------------------------------------------------------------------------- a real server on PostgreSQL

_FLOW = textwrap.dedent(
    """
    import json
    from prefect import flow

    @flow(name="pg-check")
    def pg_check(x: int) -> int:
        return x * 2

    state = pg_check(21, return_state=True)
    print(json.dumps({"result": state.result(), "state": state.type.value,
                      "run": str(state.state_details.flow_run_id)}))
    """
)


async def _stored_run(dsn: str, run_id: str) -> dict[str, Any] | None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT f.name AS flow, r.state_type::text AS state FROM flow_run r JOIN flow f ON f.id = r.flow_id "
            "WHERE r.id = $1::uuid",
            run_id,
        )
        return dict(row) if row else None
    finally:
        await conn.close()


def _proc_bytes(pid: int, what: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes()
    except OSError:
        return b""


@pytest.mark.e2e
def test_up_on_postgres_stores_flow_runs_there(tmp_path: Path, postgres_server: PostgresServer) -> None:  # noqa: F811
    pg = postgres_server
    secret = pg.password.encode()
    args = [*_up_args(), "--no-emulator", "--database-url", pg.url, "--background", "--json"]
    started = _depin(*args, cwd=tmp_path)
    outputs = started.stdout + started.stderr
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        doc = last_json(started.stdout)
        assert doc["database"] == f"postgresql+asyncpg://depin:***@127.0.0.1:{pg.port}/prefect"
        state_text = (tmp_path / STATE_FILE).read_bytes()
        services = json.loads(state_text)["children"]
        # the password: not on any command line; in the environment of the Prefect server alone
        assert secret not in _proc_bytes(doc["pid"], "cmdline")
        for name, child in services.items():
            assert secret not in _proc_bytes(child["pid"], "cmdline"), name
            in_env = secret in _proc_bytes(child["pid"], "environ")
            assert in_env == (name == "prefect-server"), name

        flow_env = {**_env(), "PREFECT_API_URL": doc["api"], "PREFECT_HOME": str(tmp_path / "client")}
        ran = subprocess.run(
            [sys.executable, "-c", _FLOW],
            env=flow_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
        out = json.loads(ran.stdout.strip().splitlines()[-1])
        assert out["state"] == "COMPLETED" and out["result"] == 42
        run_id = out["run"]

        stored = asyncio.run(_stored_run(pg.dsn, run_id))
        assert stored == {"flow": "pg-check", "state": "COMPLETED"}
        api = httpx.get(f"{doc['api']}/flow_runs/{run_id}", timeout=10).json()
        assert api["id"] == run_id and api["state"]["type"] == "COMPLETED"
        # the server's own SQLite file was never created: PostgreSQL is its only database
        assert not (tmp_path / PREFECT_HOME / "prefect.db").exists()
    finally:
        stopped = _depin("down", "--json", cwd=tmp_path, timeout=120)
    assert stopped.returncode == 0 and last_json(stopped.stdout)["stopped"] is True, stopped.stderr[-2000:]
    leaks = [p for p in (tmp_path / UP_DIR).rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaks == [] and secret not in state_text
    assert secret.decode() not in outputs + stopped.stdout + stopped.stderr
