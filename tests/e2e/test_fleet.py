"""Past one machine, end to end: a Prefect server on a real PostgreSQL (``depin up --database-url --no-serve``),
the deployments on a process work pool (``depin deploy --pool``), two ``prefect worker`` processes standing for
two hosts (each its own working directory and Prefect home; no shared local path), the dataset on the
S3-compatible test server, and the emulator enforcing DIMO's rate limit (429 past 10 requests/s per service).

1. ``train-and-publish`` run from its deployment by a worker: its ingest is 4 shards, child runs spread over
   both workers under the fleet-wide rate limit (the emulator sent no 429; the table equals one plain
   ``depin ingest``'s); it trains on the table and publishes to one of two gateway replicas sharing a
   registry on the S3 server; both replicas then answer the function.
2. A worker killed (SIGKILL, its whole process tree, like a lost host) while running shards: Prefect's
   heartbeat automation marks them Crashed, the parent runs them again on the other worker, and the table
   again equals the clean run's. The detection time is printed (``-s``) and kept in the test's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from connectors.dimo.store import TelemetryStore
from depin_core.proc import descendants
from depin_core.proc.tree import stop_tree
from depin_core.tls import client_context, make_certificate
from pipelines.shards import split
from serving._auth import new_admin_key
from tests.e2e.test_gateway_replicas import store_env
from tests.e2e.test_publish import DepinServe, wait_for
from tests.support import netns
from tests.support.browser import require_browser
from tests.support.flow_fleet import FLEET, FLEET_END, RANGE_HP, SIGNALS, SINCE, UNTIL
from tests.support.netns import Lan
from tests.support.postgres import PostgresServer, postgres_server  # noqa: F401 (the fixture)
from tests.support.s3 import S3Server
from tests.support.telemetry_tables import table_differences
from tests.support.ui_pool import check_work_pool_page
from tests.support.up_stack import DEPIN, clean_env, last_json, up_args

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
LICENSE_RATE = 10.0  # DIMO's documented limit; the emulator enforces it per service
# the flow tests' fleet (10 EVs x 2 days at 20 s): the range model beats its baseline on it
INGEST = {"since": SINCE, "until": UNTIL, "interval": "20s", "signals": SIGNALS}
CRASH_AFTER_S = 45  # > the 30 s heartbeat; detection takes 15-45 s plus the 5 s evaluation tick
RUN_DEADLINE_S = 300.0


@dataclass
class Fleet:
    root: Path
    api: str
    emulator: str
    pool: str
    s3: S3Server
    env: dict[str, str]
    lan: Lan | None = None  # the workers' network namespaces, when this machine can make them
    gateway_cert: str = ""  # PEM, pinned by whoever talks to the gateways
    gateways: list[DepinServe] = field(default_factory=list)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def uri(self) -> str:
        return f"s3://{self.s3.new_bucket()}/telemetry"

    def start_worker(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """A worker 'host': its own network namespace on the LAN (when possible), directory and Prefect home;
        the API and the bucket's settings only."""
        home = self.root / name
        (home / "prefect").mkdir(parents=True, exist_ok=True)
        env = {**self.env, "PREFECT_HOME": str(home / "prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        argv = [*command, "--pool", self.pool, "--name", name, "--limit", "2"]
        if self.lan is not None:
            if name not in self.lan.hosts:
                self.lan.add_host(name)
            argv = self.lan.command(name, argv)
        with (home / "worker.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / name / "worker.log").read_text(errors="replace")[-4000:]


def _prefect(api: str) -> Any:
    """Prefect settings pointing at the fleet's server (the session's test server stays the default)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: api})


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: PostgresServer,  # noqa: F811
) -> Iterator[Fleet]:
    """The control plane on a LAN address when network namespaces can be made here (root), else on loopback:
    Prefect on PostgreSQL with the emulator and a gateway (``depin up``), an S3 server, two gateway replicas
    on one registry there, the pool with its deployments and the ``dimo`` credentials block."""
    root = tmp_path_factory.mktemp("fleet")
    control = root / "control"
    control.mkdir()
    env = {
        **clean_env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with contextlib.ExitStack() as stack:
        why_not = netns.unavailable()
        lan = None if why_not else stack.enter_context(netns.Lan())
        if lan is None:
            print(f"workers as plain processes on loopback: {why_not}")
        address = lan.address if lan else "127.0.0.1"
        s3 = stack.enter_context(S3Server(host=address))
        args = [*up_args(vehicles=FLEET["vehicles"], days=FLEET["days"]), "--seed", str(FLEET["seed"]),
                "--end", FLEET_END.isoformat(), "--host", address, "--database-url", postgres_server.url,
                "--no-serve", "--emulator-rate-limit", str(LICENSE_RATE), "--emulator-rate-limit-per",
                "license", "--background", "--json"]  # fmt: skip
        started = subprocess.run(
            [*DEPIN, *args], cwd=control, env=env, capture_output=True, text=True, timeout=240
        )
        stack.callback(
            subprocess.run, [*DEPIN, "down"], cwd=control, env=env, capture_output=True, timeout=120
        )
        assert started.returncode == 0, started.stderr[-3000:]
        doc = last_json(started.stdout)
        publisher = Account.create()
        admin_key, admin_hash = new_admin_key()
        # the gateways serve HTTPS (plain HTTP only on loopback); the workers pin their certificate
        cert = make_certificate(addresses=[address])
        cert_file, key_file = cert.write(root / "gateway-tls")
        worker_env = {
            **env,
            **s3.env,
            "PREFECT_API_URL": doc["api"],
            "DEPIN_DIMO_RATE_LIMIT_PER_S": str(LICENSE_RATE),
            "DEPIN_PUBLISHER_KEY": publisher.key.hex(),  # the flows sign what they publish
            "DEPIN_ADMIN_KEY": admin_key,  # and publish through a gateway's admin API
            "DEPIN_GATEWAY_CERT": cert.cert_pem,
        }
        pool = f"fleet-{uuid.uuid4().hex[:6]}"
        fleet = Fleet(root, doc["api"], doc["emulator"], pool, s3, worker_env, lan, cert.cert_pem)
        stack.callback(_stop_all, fleet)
        gateway_env = {
            **store_env(s3, publisher),
            "DEPIN_GATEWAY_REGISTRY_URL": f"s3://{s3.new_bucket()}/functions",
            "DEPIN_GATEWAY_ADMIN_KEY_HASHES": admin_hash,
            "DEPIN_GATEWAY_HOST": address,
            "DEPIN_GATEWAY_TLS_CERT_FILE": str(cert_file),
            "DEPIN_GATEWAY_TLS_KEY_FILE": str(key_file),
        }
        for name in ("gateway-a", "gateway-b"):  # two replicas, each its own cache, one registry
            (root / name).mkdir()
            fleet.gateways.append(DepinServe(root / name, root / name / "cache", env=gateway_env).start())
        deployed = subprocess.run(
            [*DEPIN, "deploy", "--pool", pool, "--crash-after", str(CRASH_AFTER_S), "--json"],
            cwd=control,
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        with _prefect(doc["api"]):
            from connectors.dimo.settings import DimoSettings
            from pipelines.blocks import DimoCredentials

            creds = DimoSettings.from_credentials_file(control / ".depin/emulator/credentials.json")
            DimoCredentials.from_settings(creds).save("dimo", overwrite=True)  # what workers resolve
        yield fleet


def _stop_all(fleet: Fleet) -> None:
    for proc in fleet.workers.values():
        stop_tree([proc.pid], [proc.pid])
        proc.wait()
    for gateway in fleet.gateways:
        gateway.stop()


@pytest.fixture(scope="module")
def clean_table(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> TelemetryStore:
    """The reference: one plain ``depin ingest`` of the same window (no Prefect), into a local table."""
    out = tmp_path_factory.mktemp("clean") / "telemetry"
    creds = fleet.root / "control/.depin/emulator/credentials.json"
    cmd = [*DEPIN, "ingest", "--since", INGEST["since"], "--until", INGEST["until"], "--interval",
           INGEST["interval"], "--signals", ",".join(INGEST["signals"]), "--credentials", str(creds),
           "--out", str(out), "--json"]  # fmt: skip
    done = subprocess.run(cmd, env=fleet.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_json(done.stdout)["vehicles"] == FLEET["vehicles"]
    return TelemetryStore(out)


def _limited(fleet: Fleet) -> dict[str, Any]:
    return httpx.get(f"{fleet.emulator}/healthz", timeout=10).json()["rate_limit"]


def _wait_final(api: str, run_id: uuid.UUID, fleet: Fleet) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_DEADLINE_S
    with _prefect(api), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            logs = "\n".join(f"{n}: {fleet.log(n)}" for n in fleet.workers)
            assert time.monotonic() < deadline, f"run still {run.state_name}\n{logs}"
            time.sleep(0.5)


def _children(api: str, parent: uuid.UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _prefect(api), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
        )


def _assert_same_table(uri: str, fleet: Fleet, clean: TelemetryStore) -> None:
    """Same rows, keys, nulls and watermarks as the clean run; float values equal to the last bits."""
    shared = TelemetryStore(uri, storage_options=fleet.s3.storage_options)
    assert table_differences(shared, clean) == []


def _params(uri: str, **extra: Any) -> dict[str, Any]:
    return {"params": {**INGEST, "dataset": uri, "shards": 4, **extra}}


def test_train_and_publish_with_a_sharded_ingest_on_two_workers(
    fleet: Fleet, clean_table: TelemetryStore
) -> None:
    from prefect.client.orchestration import get_client

    fleet.start_worker("host-a", [sys.executable, "-m", "prefect", "worker", "start"])
    fleet.start_worker("host-b", [sys.executable, "-m", "pipelines.cli", "pool-worker"])
    gateway_a, gateway_b = fleet.gateways
    before = _limited(fleet)
    uri = fleet.uri()
    params = {
        "ingest": {**INGEST, "dataset": uri, "shards": 4},
        "train": {"hyperparameters": RANGE_HP},
        "publish": {"target": gateway_a.url},
    }
    with _prefect(fleet.api), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("train-and-publish/on-demand")
        assert dep.work_pool_name == fleet.pool
        parent = client.create_flow_run_from_deployment(dep.id, parameters={"params": params})
    run = _wait_final(fleet.api, parent.id, fleet)
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{fleet.log('host-a')}"

    by_sub = {sub.id: _children(fleet.api, sub.id) for sub in _children(fleet.api, parent.id)}
    [(ingest_run, shard_runs)] = [(sub, kids) for sub, kids in by_sub.items() if kids]  # the ingest's shards
    parts = [p for p in split(sorted(clean_table.watermarks()), 4) if p]  # an empty shard starts no run
    # the ingest run ingests the first shard itself while the others' processes start
    assert len(shard_runs) == len(parts) - 1 >= 2
    assert all(c.state is not None and c.state.is_completed() for c in shard_runs)
    assert sorted(sorted(c.parameters["params"]["vehicles"]) for c in shard_runs) == sorted(parts[1:])
    # each worker runs at most 2 runs at once and the parent and its ingest hold 2: both took shards
    assert {c.labels.get("prefect.worker.name") for c in shard_runs} == {"host-a", "host-b"}
    for c in shard_runs:
        assert (
            c.parameters["params"]["rate_limit_scope"] == "fleet"
            and c.parameters["params"]["report"] is False
        )
        assert (
            datetime.fromisoformat(c.parameters["params"]["since"]) == datetime.fromisoformat(SINCE)
            and c.parameters["params"]["shards"] == 1
        )

    _assert_same_table(uri, fleet, clean_table)
    after = _limited(fleet)
    assert after["per_s"] == LICENSE_RATE
    assert after["limited"] == before["limited"], "the emulator answered 429: the fleet went over the license"
    assert sum(after["passed"].values()) > sum(before["passed"].values())

    # published through replica A, served by both
    body = {"plan": {"km": 120}}
    pinned = client_context(fleet.gateway_cert)
    assert gateway_a.url.startswith("https://")

    def answer(url: str) -> dict[str, Any] | None:
        r = httpx.post(f"{url}/v1/functions/range@prod/invoke", json=body, timeout=30, verify=pinned)
        return r.json() if r.status_code == 200 else None

    on_a = wait_for(lambda: answer(gateway_a.url), "replica A to serve range@prod")
    on_b = wait_for(lambda: answer(gateway_b.url), "replica B to serve range@prod")
    assert on_a["version"] == on_b["version"] and on_a["outputs"] == on_b["outputs"]

    # the Prefect UI shows the pool, both workers online and the shards, also under their parent run
    require_browser()
    check_work_pool_page(
        fleet.api.removesuffix("/api"),
        fleet.pool,
        ["host-a", "host-b"],
        [c.name for c in shard_runs],
        fleet.root / "ui",
        run_state="Completed",
        parent_run_id=str(ingest_run),
    )


def test_a_killed_worker_s_shards_are_run_again_elsewhere(fleet: Fleet, clean_table: TelemetryStore) -> None:
    """The parent runs here (the control host); a worker running shards is killed outright."""
    from prefect.client.orchestration import get_client

    for name, cmd in [("host-a", ["-m", "prefect", "worker", "start"]), ("host-b", ["-m", "pipelines.cli", "pool-worker"])]:  # fmt: skip
        if name not in fleet.workers or fleet.workers[name].poll() is not None:
            fleet.start_worker(name, [sys.executable, *cmd])
    uri = fleet.uri()
    params = _params(uri)["params"]
    script = (
        "import json, sys\n"
        "from pipelines.flows import ingest_telemetry\n"
        "from pipelines.params import IngestParams\n"
        "state = ingest_telemetry(IngestParams(**json.loads(sys.argv[1])), return_state=True)\n"
        "print(json.dumps({'state': state.type.value, 'run': str(state.state_details.flow_run_id)}))\n"
    )
    control = fleet.root / "control"
    parent = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(params)],
        cwd=control,
        env={**fleet.env, "PREFECT_HOME": str(control / ".depin/prefect-client")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        victim, killed_at, lost = _kill_a_worker_mid_shard(fleet, parent)
        out, err = parent.communicate(timeout=RUN_DEADLINE_S)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 0, err[-4000:]
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["state"] == "COMPLETED", err[-4000:]

    with _prefect(fleet.api), get_client(sync_client=True) as client:
        detected = []
        for run_id in lost:
            states = client.read_flow_run_states(run_id)
            crashed = [s for s in states if s.type.value == "CRASHED"]
            assert crashed, f"shard {run_id} was never marked Crashed: {[s.type.value for s in states]}"
            assert "no heartbeat" in (crashed[0].message or "")
            detected.append(crashed[0].timestamp.timestamp() - killed_at)
            final = client.read_flow_run(run_id)
            assert final.state is not None and final.state.is_completed()
            assert final.run_count >= 2  # ran again, on the worker still alive
            assert final.labels.get("prefect.worker.name") not in (None, victim)
    message = (
        f"worker {victim} killed: its shards marked Crashed after {', '.join(f'{d:.1f}' for d in detected)} s"
    )
    print(message)
    (fleet.root / "crash-detection.txt").write_text(message + "\n")
    _assert_same_table(uri, fleet, clean_table)


def _pid(infrastructure_pid: str) -> int:
    return int(infrastructure_pid.rsplit(":", 1)[-1])  # "pid" or "host:pid"


def _kill_a_worker_mid_shard(
    fleet: Fleet, parent: subprocess.Popen[str]
) -> tuple[str, float, list[uuid.UUID]]:
    """Wait until some worker runs a shard, then SIGKILL that worker's whole process tree."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + RUN_DEADLINE_S
    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with _prefect(fleet.api), get_client(sync_client=True) as client:
        while True:
            assert parent.poll() is None, parent.stderr.read() if parent.stderr else ""
            assert time.monotonic() < deadline, "no shard started running"
            for fr in client.read_flow_runs(flow_run_filter=running):
                if "depin-shard" not in fr.tags or not fr.infrastructure_pid:
                    continue
                pid = _pid(fr.infrastructure_pid)
                for name, worker in fleet.workers.items():
                    tree = {worker.pid, *descendants(worker.pid)}
                    if pid in tree:
                        for p in tree:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(p, signal.SIGKILL)
                        killed_at = time.time()
                        worker.wait()
                        mine = [
                            r.id
                            for r in client.read_flow_runs(flow_run_filter=running)
                            if r.infrastructure_pid and _pid(r.infrastructure_pid) in tree
                        ]
                        return name, killed_at, mine
            time.sleep(0.1)
