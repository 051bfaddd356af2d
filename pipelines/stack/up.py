"""``depin up`` / ``depin down``: the local stack behind the Prefect UI, as one supervised process tree.

``depin up`` starts, each in its own process group with its log under ``UP_DIR/logs/``
(``UP_DIR`` is :data:`depin_core.paths.UP_DIR`):

1. a real ``prefect server start`` on ``host:port`` (default 127.0.0.1:4200) with
   ``PREFECT_HOME`` :data:`depin_core.paths.PREFECT_HOME` and analytics off, unless ``PREFECT_API_URL``
   points at a server already; its database is SQLite in ``PREFECT_HOME`` unless a database URL is given
   (``--database-url``, else ``DEPIN_UP_DATABASE_URL``, else Prefect's own
   ``PREFECT_SERVER_DATABASE_CONNECTION_URL``; see :func:`resolve_database`). That URL holds a password: it
   reaches the server through its environment only, and every message, the state file and ``--json`` show
   it redacted;
2. the DIMO emulator (credentials at :data:`pipelines.params.DEFAULT_EMULATOR_CREDENTIALS`, where the flows
   look by default), unless real DIMO is configured (``DEPIN_DIMO_ENV`` production/dev or
   ``DEPIN_DIMO_CLIENT_ID``);
3. the function gateway on the local registry (:data:`depin_core.paths.REGISTRY_DIR`);

then creates the ``dimo-api`` global concurrency limit (each ingest run holds one slot for its DIMO phase, non-strictly) and
serves the deployments (``prefect.serve(*deployments())`` in a child with ``PREFECT_API_URL`` set; flow runs
are its child processes). The supervising process writes ``UP_DIR/state.json`` (pids, ports, URLs) and
stops everything, newest first, on SIGINT/SIGTERM/SIGHUP: each process group plus any descendant that left
it, SIGKILL after a grace period.
``--background`` runs the supervisor detached (``python -m pipelines.stack``, log
:data:`depin_core.paths.UP_LOG`); ``depin down`` stops it.

Nothing here prints: progress reaches the caller through ``on_ready`` / ``notify`` callbacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from connectors.dimo.emulator.ratelimit import RateLimitKey
from depin_core import paths
from depin_core.errors import ConfigError, DepinError
from depin_core.fs import atomic_write_bytes
from depin_core.net import free_port, listen_socket, url_host
from depin_core.proc import Child, alive, start_time, stop_tree
from depin_core.settings import EnvSettings
from pipelines.params import (
    DEFAULT_EMULATOR_CREDENTIALS,
    DEFAULT_GROUND_TRUTH,
    DIMO_API_SLOTS,
    DIMO_CONCURRENCY_LIMIT,
)

STATE_DIR = paths.HOME
UP_DIR = paths.UP_DIR
STATE_FILE = UP_DIR / "state.json"
LOG_DIR = UP_DIR / "logs"
SUPERVISOR_LOG = paths.UP_LOG
PREFECT_HOME = paths.PREFECT_HOME
REGISTRY_DIR = paths.REGISTRY_DIR
# "module:function" returning the RunnerDeployments to serve (tests may serve others)
DEPLOYMENTS_ENV = "DEPIN_UP_DEPLOYMENTS"
# the database setting: ours (UpSettings.database_url) and Prefect's own, which the server reads
DATABASE_URL_ENV = "DEPIN_UP_DATABASE_URL"
PREFECT_DATABASE_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
DATABASE_SCHEMES = ("postgresql+asyncpg", "sqlite+aiosqlite")
DATABASE_EXAMPLE = "postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect"


class UpSettings(EnvSettings):
    """``depin up`` settings from the environment (prefix ``DEPIN_UP_``)."""

    model_config = SettingsConfigDict(env_prefix="DEPIN_UP_", extra="ignore")

    database_url: SecretStr | None = Field(
        None, description=f"the Prefect server's database, e.g. {DATABASE_EXAMPLE} (default: SQLite)"
    )


class UpOptions(BaseModel):
    """What ``depin up`` starts and where (JSON-serializable: the background supervisor gets it as JSON)."""

    host: str = "127.0.0.1"
    port: int = Field(4200, ge=0, le=65535, description="Prefect server (UI + API); 0 = a free port")
    gateway_port: int = Field(8787, ge=0, le=65535)
    emulator_port: int = Field(8765, ge=0, le=65535)
    emulator: bool | None = Field(None, description="None: start it unless real DIMO is configured")
    vehicles: int = Field(20, ge=1)
    days: float = Field(7.0, gt=0)
    seed: int = 0
    emulator_rate_limit: float = Field(0.0, ge=0, description="emulator: 429 past this many requests/s")
    emulator_rate_limit_per: RateLimitKey = "client-host"
    end: datetime | None = Field(None, description="end of the emulated history; default: start-up time")
    dimo_limit: int = Field(DIMO_API_SLOTS, ge=1, description="slots of the dimo-api concurrency limit")
    runner_poll_s: int = Field(5, ge=1, description="how often served deployments look for scheduled runs")
    serve: bool = Field(
        True, description="serve the deployments here; False when workers run them (depin deploy --pool)"
    )
    startup_timeout_s: float = Field(180.0, gt=0)
    stop_grace_s: float = Field(15.0, ge=0)
    # never in the JSON handed to the background supervisor (its command line is world-readable): that one
    # gets it in its environment as DEPIN_UP_DATABASE_URL
    database_url: SecretStr | None = Field(
        None, exclude=True, description="the Prefect server's database (--database-url)"
    )


class _Stopped(Exception):
    """A stop was requested while starting."""


def real_dimo_configured(env: dict[str, str] | None = None) -> bool:
    """Whether the environment points the flows at real DIMO (then ``depin up`` starts no emulator)."""
    env = dict(os.environ) if env is None else env
    return env.get("DEPIN_DIMO_ENV", env.get("DEPIN_DIMO_ENVIRONMENT", "")).strip().lower() in (
        "production",
        "dev",
    ) or bool(env.get("DEPIN_DIMO_CLIENT_ID", "").strip())


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (SQLAlchemy's rendering; "(unparsable URL)" if it is
    not a URL at all, never the text itself)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(unparsable URL)"


def check_database_url(url: str, source: str) -> str:
    """Validate a Prefect database URL (``source`` names where it came from, e.g. ``--database-url``);
    returns it redacted. ConfigError naming ``source`` and an example otherwise; the URL itself is never
    quoted in the error (it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    fix = f"expected {DATABASE_EXAMPLE} or sqlite+aiosqlite:///PATH/prefect.db"
    try:
        parsed = make_url(url.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(f"{source}: not a database URL; {fix}") from None
    if parsed.drivername not in DATABASE_SCHEMES:
        raise ConfigError(
            f"{source}: scheme {parsed.drivername!r} is not supported by the Prefect server; {fix}"
        )
    if parsed.drivername.startswith("postgresql") and not (parsed.host and parsed.database):
        raise ConfigError(f"{source}: a PostgreSQL URL needs a host and a database name; {fix}")
    return parsed.render_as_string(hide_password=True)


def resolve_database(
    opts: UpOptions, env: dict[str, str] | None = None
) -> tuple[SecretStr | None, str | None]:
    """The Prefect server's database URL and where it came from: ``--database-url``, else
    ``DEPIN_UP_DATABASE_URL``, else Prefect's own ``PREFECT_SERVER_DATABASE_CONNECTION_URL``; (None, None)
    for the default SQLite in ``PREFECT_HOME``. Validated (ConfigError naming the source)."""
    env = dict(os.environ) if env is None else env
    if opts.database_url is not None:
        url, source = opts.database_url, "--database-url"
    elif (ours := UpSettings.from_env(env).database_url) is not None:
        url, source = ours, DATABASE_URL_ENV
    elif env.get(PREFECT_DATABASE_ENV, "").strip():
        url, source = SecretStr(env[PREFECT_DATABASE_ENV].strip()), PREFECT_DATABASE_ENV
    else:
        return None, None
    check_database_url(url.get_secret_value(), source)
    return url, source


def _check_port(host: str, port: int, what: str) -> int:
    """``port`` if it can be bound now (0: a free one), else ConfigError naming the flag."""
    if port == 0:
        return free_port(host)
    try:
        listen_socket(host, port).close()
    except ConfigError:
        raise ConfigError(
            f"{what} {host}:{port} is in use; stop what listens there (depin down?) or pick another port"
        ) from None
    return port


def http_ok(url: str) -> bool:
    """Whether GET ``url`` answers 200 within 2 s."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def read_state(path: Path = STATE_FILE) -> dict[str, Any] | None:
    """The state file of a ``depin up`` whose supervisor still runs; None (and the file removed) otherwise."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if alive(int(state["pid"]), state.get("start_time")):
        return state
    path.unlink(missing_ok=True)
    return None


def _write_state(state: dict[str, Any]) -> None:
    atomic_write_bytes(STATE_FILE, json.dumps(state, indent=2).encode())


def wait_ready(
    child: Child,
    what: str,
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> None:
    """Poll ``ready`` until true; raise if the child exits, a stop is requested, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if stop is not None and stop.is_set():
            raise _Stopped
        if not child.running():
            raise DepinError(
                f"{what} exited during start-up; its log ({child.log_path}):\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DepinError(
                f"{what} not ready within {timeout_s:.0f}s; log {child.log_path}:\n{child.log_tail()}"
            )
        if stop is not None:
            stop.wait(0.1)
        else:
            time.sleep(0.1)


def prefect_server_command(
    host: str, port: int, home: Path, env: dict[str, str], database_url: SecretStr | None = None
) -> tuple[list[str], dict[str, str], str]:
    """``prefect server start`` on ``host:port`` with ``PREFECT_HOME=home`` and analytics off, on
    ``database_url`` if given (else SQLite in ``home``): (command, environment, API URL)."""
    base = f"http://{url_host(host)}:{port}"
    env = {k: v for k, v in env.items() if k not in (DATABASE_URL_ENV, PREFECT_DATABASE_ENV)}
    if database_url is not None:
        env[PREFECT_DATABASE_ENV] = database_url.get_secret_value()
    env = {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"{base}/api",  # else the UI calls the default port, 4200
    }
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return [*cmd, "--analytics-off"], env, f"{base}/api"


def ensure_concurrency_limit(api: str, limit: int) -> None:
    """Create the ``dimo-api`` global concurrency limit with ``limit`` slots (kept as it is if it exists)."""
    with httpx.Client(base_url=api, timeout=10) as client:
        if client.get(f"/v2/concurrency_limits/{DIMO_CONCURRENCY_LIMIT}").status_code == 200:
            return
        r = client.post("/v2/concurrency_limits/", json={"name": DIMO_CONCURRENCY_LIMIT, "limit": limit})
        if r.status_code not in (200, 201, 409):
            raise DepinError(
                f"creating the {DIMO_CONCURRENCY_LIMIT} concurrency limit: HTTP {r.status_code} {r.text[:300]}"
            )


class UpStack:
    """The services of ``depin up``, started in order and stopped in reverse order."""

    def __init__(
        self, opts: UpOptions, stop: threading.Event, notify: Callable[[str], None] = lambda _line: None
    ) -> None:
        self.opts = opts
        self.stop_event = stop
        self.notify = notify
        self.cwd = Path.cwd()
        self.children: list[Child] = []
        self.urls: dict[str, str | None] = {}
        self.deployments: list[str] = []
        self.notes: list[str] = []
        self.database: str | None = None  # the Prefect server's database URL, redacted
        # started children not yet ready: (child, what, ready check); the first three start side by side
        self._pending: list[tuple[Child, str, Callable[[], bool]]] = []
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "start_time": start_time(os.getpid()),
            "ready": False,
            "cwd": str(self.cwd),
            "children": {},
        }

    # ---------------------------------------------------------------------------------------- helpers

    def _env(self, **extra: str) -> dict[str, str]:
        """Our environment for a child, without the database URL (only the Prefect server gets that)."""
        env = {
            **{k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, PREFECT_DATABASE_ENV)},
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(extra)
        return env

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        child = Child(name, cmd, log_path=self.cwd / LOG_DIR / f"{name}.log", env=env, cwd=self.cwd).start()
        self.children.append(child)
        self.state["children"][name] = {
            "pid": child.pid,
            "pgid": child.pid,
            "start_time": start_time(child.pid),
            "log": str(child.log_path),
        }
        _write_state(self.state)
        return child

    def _wait(self, child: Child, what: str, ready: Callable[[], bool]) -> None:
        wait_ready(child, what, ready, timeout_s=self.opts.startup_timeout_s, stop=self.stop_event)

    # --------------------------------------------------------------------------------------- services

    def _prefect_server(self) -> tuple[str, dict[str, str]]:
        """Start ``prefect server start`` unless PREFECT_API_URL is set; returns (API URL, Prefect env); the
        server is ready once ``start`` has waited for ``_pending``."""
        home = str(self.cwd / PREFECT_HOME)
        api = os.environ.get("PREFECT_API_URL", "").strip().rstrip("/")
        if api:
            if self.opts.database_url is not None:
                raise ConfigError(
                    "--database-url sets the database of the Prefect server depin up starts, but "
                    "PREFECT_API_URL points at a server already: unset PREFECT_API_URL or drop --database-url"
                )
            self.notes.append("using the Prefect server at PREFECT_API_URL")
            return api, {"PREFECT_HOME": os.environ.get("PREFECT_HOME", home)}
        database_url, _source = resolve_database(self.opts)
        port = _check_port(self.opts.host, self.opts.port, "--port (Prefect server)")
        if database_url is None:
            self.database = f"sqlite+aiosqlite:///{home}/prefect.db"
        else:
            self.database = redact_url(database_url.get_secret_value())
        cmd, env, api = prefect_server_command(self.opts.host, port, Path(home), self._env(), database_url)
        child = self._start("prefect-server", cmd, env)
        self._pending.append((child, "the Prefect server", lambda: http_ok(f"{api}/health")))
        return api, {"PREFECT_HOME": home}

    def _emulator(self) -> str | None:
        """Start the DIMO emulator unless real DIMO is configured; returns its URL (ready later)."""
        from connectors.dimo.emulator.state import EmulatorConfig

        wanted = self.opts.emulator if self.opts.emulator is not None else not real_dimo_configured()
        if not wanted:
            self.notes.append("no emulator: real DIMO is configured (DEPIN_DIMO_*)")
            return None
        port = _check_port(self.opts.host, self.opts.emulator_port, "--emulator-port")
        creds = self.cwd / DEFAULT_EMULATOR_CREDENTIALS
        creds.unlink(missing_ok=True)
        config = EmulatorConfig(
            host=self.opts.host,
            port=port,
            vehicles=self.opts.vehicles,
            days=self.opts.days,
            seed=self.opts.seed,
            end=self.opts.end,
            rate_limit_per_s=self.opts.emulator_rate_limit,
            rate_limit_per=self.opts.emulator_rate_limit_per,
            credentials_out=creds,
            ground_truth_out=self.cwd / DEFAULT_GROUND_TRUTH,
        )
        cmd = [sys.executable, "-m", "connectors.dimo.emulator", "--config-json", config.model_dump_json()]
        child = self._start("emulator", cmd, self._env())
        url = f"http://{url_host(self.opts.host)}:{port}"
        self._pending.append(
            (child, "the DIMO emulator", lambda: creds.exists() and http_ok(f"{url}/healthz"))
        )
        self.notes.append(
            f"emulator: {self.opts.vehicles} vehicles, {self.opts.days:g} days; credentials {creds}"
        )
        return url

    def _gateway(self) -> str:
        """Start the function gateway on the local registry; returns its URL (ready later)."""
        from pipelines._targets import KEY_FILE
        from pipelines.stack.gateway import serve_settings

        port = _check_port(self.opts.host, self.opts.gateway_port, "--gateway-port")
        settings, notes, new_key = serve_settings(self.opts.host, port, self.cwd / REGISTRY_DIR)
        if new_key is not None:  # never printed here: the user reads it from the 0600 file when needed
            notes.append(f"admin key generated: {settings.registry_dir / KEY_FILE} (mode 0600)")
        del new_key
        self.notes.extend(notes)
        ready = self.cwd / UP_DIR / "gateway.ready.json"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "serving.server", "--settings-json", settings.model_dump_json()]
        child = self._start("gateway", [*cmd, "--ready-file", str(ready)], self._env())
        url = f"http://{url_host(self.opts.host)}:{port}"
        self._pending.append(
            (child, "the function gateway", lambda: ready.exists() and http_ok(f"{url}/healthz"))
        )
        return url

    def _serve_deployments(self, api: str, prefect_env: dict[str, str], gateway: str) -> Path:
        """Serve the deployments in a child (it waits for the API); ready once the server lists every one of
        them. Returns the file in which the child names them."""
        names_file = self.cwd / UP_DIR / "deployments.json"
        names_file.unlink(missing_ok=True)
        env = self._env(
            **prefect_env,
            PREFECT_API_URL=api,
            PREFECT_RUNNER_POLL_FREQUENCY=str(self.opts.runner_poll_s),
            DEPIN_GATEWAY_URL=gateway,
        )
        cmd = [sys.executable, "-m", "pipelines.stack", "--serve-deployments", str(names_file)]
        child = self._start("deployments", cmd, env)

        def listed() -> bool:
            if not names_file.exists():
                return False
            wanted = {tuple(n.split("/", 1)) for n in json.loads(names_file.read_text())}
            try:
                r = httpx.post(f"{api}/deployments/filter", json={"limit": 200}, timeout=5)
                r.raise_for_status()
                flows = httpx.post(f"{api}/flows/filter", json={"limit": 200}, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            flow_names = {f["id"]: f["name"] for f in flows}
            have = {(flow_names.get(d["flow_id"], ""), d["name"]) for d in r.json()}
            return wanted <= have

        self._pending.append((child, "the deployments server", listed))
        return names_file

    # ----------------------------------------------------------------------------------------- public

    def start(self) -> dict[str, Any]:
        """Start every service; returns the ``--json`` document."""
        t0 = time.perf_counter()
        _write_state(self.state)
        api, prefect_env = self._prefect_server()
        emulator = self._emulator()
        gateway = self._gateway()
        names_file = self._serve_deployments(api, prefect_env, gateway) if self.opts.serve else None
        for child, what, ready in self._pending:  # all four start side by side
            self._wait(child, what, ready)
        self._pending.clear()
        ensure_concurrency_limit(api, self.opts.dimo_limit)
        self.deployments = sorted(json.loads(names_file.read_text())) if names_file is not None else []
        self.urls = {"ui": api.removesuffix("/api"), "api": api, "gateway": gateway, "emulator": emulator}
        doc = {
            **self.urls,
            "pid": os.getpid(),
            "deployments": self.deployments,
            "state_file": str(self.cwd / STATE_FILE),
            "logs": str(self.cwd / LOG_DIR),
            "database": self.database,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        self.state.update(ready=True, urls=self.urls, doc=doc)
        _write_state(self.state)
        return doc

    def watch(self) -> None:
        """Block until a stop is requested; raise DepinError if a service exits on its own."""
        while not self.stop_event.wait(1.0):
            for child in self.children:
                if not child.running():
                    raise DepinError(
                        f"{child.name} exited with code {child.proc.returncode if child.proc else '?'}; "
                        f"stopping everything. Its log ({child.log_path}):\n{child.log_tail()}"
                    )
                child.remember_descendants()  # flow runs start sessions of their own

    def close(self, grace_s: float | None = None) -> None:
        """Stop every service, newest first; remove the state file."""
        grace = self.opts.stop_grace_s if grace_s is None else grace_s
        for child in reversed(self.children):
            killed = child.stop(grace)
            if killed:
                self.notify(f"depin up: {child.name}: killed {len(killed)} process(es) after {grace:g}s")
        state = read_state()
        if state is None or state.get("pid") == os.getpid():
            STATE_FILE.unlink(missing_ok=True)


def ready_text(doc: dict[str, Any], notes: list[str]) -> str:
    """What ``depin up`` tells a person once ready: the URLs, the notes and where the logs are (lines)."""
    lines = [
        f"depin up: ready in {doc['seconds']:.1f}s",
        f"  Prefect UI     {doc['ui']}",
        f"  Prefect API    {doc['api']}",
        f"  Prefect DB     {doc.get('database') or '(the one of PREFECT_API_URL)'}",
        f"  gateway        {doc['gateway']}",
        f"  DIMO emulator  {doc['emulator'] or '(none: real DIMO)'}",
        f"  deployments    {', '.join(doc['deployments']) or '(not served here: depin deploy --pool, workers)'}",
        *(f"  {n}" for n in notes),
        f"  logs in {doc['logs']}",
    ]
    return "\n".join(lines) + "\n"


def supervise(
    opts: UpOptions,
    on_ready: Callable[[dict[str, Any], list[str]], None],
    notify: Callable[[str], None] = lambda _line: None,
) -> None:
    """Run the stack in this process until SIGINT/SIGTERM/SIGHUP (the foreground ``depin up``). Once every
    service is ready, ``on_ready(doc, notes)`` gets the ``--json`` document and the notes for a person;
    ``notify`` gets the lines about stopping."""
    if (state := read_state()) is not None:
        raise ConfigError(
            f"depin up already runs here (pid {state['pid']}, UI {state.get('urls', {}).get('ui', '?')}); "
            "run `depin down` first"
        )
    stop = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stack = UpStack(opts, stop, notify)
    try:
        doc = stack.start()
        on_ready(doc, stack.notes)
        stack.watch()
    except _Stopped:
        pass
    finally:
        if stack.children:
            notify("depin up: stopping…")
        stack.close(grace_s=1.0 if hurry.is_set() else None)
        if stack.children:
            notify("depin up: stopped")
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_background(opts: UpOptions) -> dict[str, Any]:
    """Start the supervisor detached (own session, log ``SUPERVISOR_LOG``); return its ready document."""
    if (state := read_state()) is not None:
        raise ConfigError(f"depin up already runs here (pid {state['pid']}); run `depin down` first")
    resolve_database(opts)  # a bad URL fails here, not in the detached log
    env = dict(os.environ)
    if opts.database_url is not None:  # through the environment: the options JSON is on a command line
        env[DATABASE_URL_ENV] = opts.database_url.get_secret_value()
    log_path = Path.cwd() / SUPERVISOR_LOG
    cmd = [sys.executable, "-m", "pipelines.stack", "--options-json", opts.model_dump_json()]
    child = Child("supervisor", cmd, log_path=log_path, env=env, cwd=Path.cwd())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    child.start(die_with_parent=False)
    deadline = time.monotonic() + opts.startup_timeout_s * 2
    while time.monotonic() < deadline:
        state = read_state()
        if state and state.get("pid") == child.pid and state.get("ready"):
            return {**state["doc"], "background": True}
        if not child.running():
            raise DepinError(f"depin up --background failed; its log ({log_path}):\n{child.log_tail()}")
        time.sleep(0.2)
    child.stop(5)
    raise DepinError(f"depin up --background not ready in time; log {log_path}:\n{child.log_tail()}")


def stop_background(timeout_s: float = 60.0) -> dict[str, Any]:
    """``depin down``: SIGTERM the supervisor and wait; kill its services' groups if it does not finish in
    ``timeout_s``, or if it died without stopping them."""
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {"stopped": False, "pid": None, "reason": "depin up is not running here"}
    pid, started = int(state["pid"]), state.get("start_time")
    children = list(state.get("children", {}).values())
    killed: list[int] = []
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid, started):
            killed = stop_tree([int(c["pgid"]) for c in children], [pid], grace_s=2.0)
    else:  # the supervisor died without cleaning up: stop the services that are still the ones it started
        leaders = [c for c in children if alive(int(c["pid"]), c.get("start_time"))]
        if not leaders:
            STATE_FILE.unlink(missing_ok=True)
            return {
                "stopped": False,
                "pid": pid,
                "reason": "depin up is not running here (stale state removed)",
            }
        killed = stop_tree([int(c["pgid"]) for c in leaders], [], grace_s=5.0)
    STATE_FILE.unlink(missing_ok=True)
    return {"stopped": True, "pid": pid, "killed": killed}


def serve_deployments(names_file: Path) -> None:
    """The deployments child: build the deployments, name them in ``names_file``, serve until SIGTERM."""
    import importlib

    from prefect import serve

    module, _, attr = os.environ.get(DEPLOYMENTS_ENV, "pipelines.deployments:deployments").partition(":")
    deps = getattr(importlib.import_module(module), attr)()
    api = os.environ["PREFECT_API_URL"]
    deadline = time.monotonic() + 300  # started beside the server: wait for it
    while not http_ok(f"{api}/health"):
        if time.monotonic() > deadline:
            raise SystemExit(f"the Prefect API {api} did not answer within 300 s")
        time.sleep(0.2)
    names = [f"{d.flow_name}/{d.name}" for d in deps]
    atomic_write_bytes(names_file, json.dumps(names).encode())
    serve(*deps, print_starting_message=False)
