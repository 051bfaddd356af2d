"""The plain functions behind the flows, tested directly (no Prefect server): quality bars, batching, rate
split, windows, dataset summaries, publish URLs, credentials lookup, parameters, deployments, lazy import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from connectors.dimo.client import Pacer
from connectors.dimo.schema import telemetry_schema
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError, PermanentError, TransientError
from gpu_jobs import api as jobs
from pipelines import _steps as S
from pipelines.params import IngestParams, PublishParams, TrainAndPublishParams, TrainParams
from pipelines.results import TrainResult, clean_metrics

KEY = "0x" + "ab" * 32
CLIENT = "0x" + "12" * 20


# ------------------------------------------------------------------------------------------------ quality


@pytest.mark.parametrize(
    ("family", "metrics", "accepted", "reason"),
    [
        ("range", {"mae": 1.0, "baseline_mae": 2.0}, True, None),
        ("range", {"mae": 2.0, "baseline_mae": 2.0}, False, "not below the fleet-mean baseline"),
        ("range", {"mae": 3.0, "baseline_mae": 2.0}, False, "not below"),
        ("range", {"mae": math.nan, "baseline_mae": 2.0}, False, "missing"),
        ("range", {}, False, "missing"),
        ("anomaly", {"recall": 0.9, "false_positive_rate": 0.05}, True, None),
        ("anomaly", {"recall": 0.4, "false_positive_rate": 0.05}, False, "recall 0.400 < 0.5"),
        ("anomaly", {"recall": 1.0, "false_positive_rate": 0.3}, False, "false_positive_rate 0.300 > 0.2"),
        ("anomaly", {"recall": math.nan, "false_positive_rate": math.nan}, True, "no ground truth"),
    ],
)
def test_quality_bar_against_the_naive_baseline(
    family: str, metrics: dict[str, Any], accepted: bool, reason: str | None
) -> None:
    verdict = S.check_quality(family, metrics)
    assert verdict.accepted is accepted
    if reason:
        assert any(reason in r for r in verdict.reasons)
    with pytest.raises(ConfigError):
        S.check_quality("other", metrics)


def _train_result(**metrics: Any) -> TrainResult:
    return TrainResult(
        family="range",
        model_dir="/m",
        model_sha256="0" * 64,
        dataset="/d",
        dataset_sha256="1" * 64,
        metrics=metrics,
        baseline={"baseline_mae": metrics.get("baseline_mae")},
        accepted=True,
        runner="local",
        device="cpu",
        job_id="j",
        spec_hash="s",
        seconds=1.0,
    )


def test_require_better_refuses_with_the_numbers_and_the_fix() -> None:
    S.require_better(_train_result(mae=1.0, baseline_mae=2.0))
    with pytest.raises(PermanentError, match=r"refused: held-out mae 2\.5 .* baseline 2;.*ingest more data"):
        S.require_better(_train_result(mae=2.5, baseline_mae=2.0))


def test_metrics_artifacts_are_json_and_name_the_verdict() -> None:
    result = _train_result(mae=1.0, baseline_mae=2.0, history_baseline_mae=1.5, unit="kWh/100km")
    rows = S.metrics_rows(result)
    assert {"metric": "mae", "value": 1.0, "shown": "1.00 kWh/100 km"} in rows
    assert {"metric": "bar: baseline_mae", "value": 2.0, "shown": "2.00 kWh/100 km"} in rows
    json.dumps(rows, allow_nan=False)
    md = S.metrics_markdown(result)
    assert "accepted" in md and "ratio 0.50" in md and "/m" in md
    assert clean_metrics({"a": math.nan, "b": math.inf, "c": 1.0, "d": "x"}) == {
        "a": None,
        "b": None,
        "c": 1.0,
        "d": "x",
    }


# ------------------------------------------------------------------------------------------------- ingest


def test_batches_and_one_pace_for_the_tasks_of_a_process() -> None:
    assert S.plan_batches([5, 1, 2, 3, 4], 2) == [[5, 1], [2, 3], [4]]
    assert S.plan_batches([], 3) == []
    settings = DimoSettings(rate_limit_per_s=10)
    assert S.batch_settings(settings, IngestParams()).rate_limit_per_s == 10
    assert S.batch_settings(settings, IngestParams(rate_limit_per_s=2)).rate_limit_per_s == 2
    assert S.batch_settings(settings, IngestParams(rate_limit_per_s=0)).rate_limit_per_s == 0
    # every task's client gives its pacing to the process's one pacer for this license and rate
    client_settings, admit = S.paced(settings, None)
    assert client_settings.rate_limit_per_s == 0 and isinstance(admit, Pacer) and admit.rate == 10
    assert S.paced(settings, None)[1] is admit
    assert S.paced(settings.model_copy(update={"rate_limit_per_s": 5}), None)[1] is not admit
    fleet = object()  # a fleet-wide admission is used as given, the client keeps its own limiter
    assert S.paced(settings, fleet)[1] is fleet  # type: ignore[arg-type]
    assert S.paced(settings, fleet)[0].rate_limit_per_s == 10  # type: ignore[arg-type]
    assert S.paced(DimoSettings(rate_limit_per_s=0), None) == (DimoSettings(rate_limit_per_s=0), None)


def test_window_is_resolved_once_and_checked() -> None:
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    w = S.resolve_window(IngestParams(since="1d", until="now"), now=now)
    assert (w.since, w.until, w.interval) == (now - timedelta(days=1), now, timedelta(seconds=20))
    with pytest.raises(ConfigError, match="not before"):
        S.resolve_window(IngestParams(since="now", until="1d"), now=now)
    with pytest.raises(ConfigError, match="interval"):
        S.resolve_window(IngestParams(interval="1d"), now=now)
    with pytest.raises(ConfigError, match="unknown DIMO signal"):
        S.resolve_signal_names(IngestParams(signals=["speed", "warpFactor"]))


def _write(store: TelemetryStore, rows: list[tuple[int, int]]) -> None:
    base = datetime(2026, 11, 24, tzinfo=UTC)
    schema = telemetry_schema(["speed"], interval="20s")
    table = pa.table(
        {
            "token_id": [t for t, _ in rows],
            "timestamp": [base + timedelta(seconds=20 * i) for _, i in rows],
            "speed": [1.0] * len(rows),
        }
    ).cast(schema)
    store.append(table)


def test_dataset_info_and_vehicle_table(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    assert S.dataset_info(root).rows == 0 and S.dataset_info(root).sha256 is None
    _write(TelemetryStore(root), [(1, 0), (1, 1), (2, 0)])
    info = S.dataset_info(root)
    assert (info.rows, info.vehicles, info.interval) == (3, 2, "20s")
    assert info.sha256 and len(info.sha256) == 64 and info.first and info.last
    rows = S.vehicle_table(root, {1: 2}, [{"token_id": 3, "reason": "not shared"}])
    assert [(r["token_id"], r["new_rows"], r["rows"], r["status"]) for r in rows] == [
        (1, 2, 2, "ingested"),
        (2, 0, 1, "up to date"),
        (3, 0, 0, "skipped: not shared"),
    ]
    json.dumps(rows, allow_nan=False)


# --------------------------------------------------------------------------------------------------- train


def test_model_dirs_are_fresh_and_the_train_step_runs_the_whole_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain itself (fallback, resume, verification) is tested in tests/gpu_jobs/test_chain.py; the step
    hands it the whole chain at once and records every attempt in its result and report."""
    params = TrainParams(out=tmp_path, runners=["agent:http://gpu-a:8900", "vast", "local"])
    a, b = S.model_dir_for(params), S.model_dir_for(params)
    assert a != b and a.parent == tmp_path and a.name.startswith("range-")

    seen: dict[str, Any] = {}

    def fake_train(**kw: Any) -> dict[str, Any]:
        seen.update(kw)
        raise TransientError("every runner of the chain failed: agent:http://gpu-a:8900: unreachable | …")

    monkeypatch.setattr(jobs, "train", fake_train)
    with pytest.raises(TransientError, match="every runner of the chain failed"):
        S.train_model_step(params, tmp_path, a)
    assert seen["runners"] == ["agent:http://gpu-a:8900", "vast", "local"] and seen["out"] == a

    attempts = [
        {"attempt": 1, "runner": "vast", "node": "h1", "state": "FAILED", "failure": "verify",
         "reason": "local hold-out evaluation disagrees: mae …", "verified": False,
         "verification": "local hold-out evaluation disagrees", "cost_usd": 0.01, "seconds": 40.0},
        {"attempt": 2, "runner": "local", "node": "me", "state": "SUCCEEDED", "failure": None, "reason": None,
         "verified": None, "verification": None, "cost_usd": None, "seconds": 12.5},
    ]  # fmt: skip
    result = _train_result(mae=1.0, baseline_mae=2.0).model_copy(update={"attempts": attempts})
    md = S.metrics_markdown(result)
    assert "## Runner chain" in md and "FAILED(verify)" in md and "| 2 | local | me | SUCCEEDED |" in md
    assert [r["state"] for r in S.attempts_rows(attempts)] == ["FAILED(verify)", "SUCCEEDED"]


# ------------------------------------------------------------------------------------------------- publish


def test_function_urls_and_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEPIN_GATEWAY_URL", raising=False)
    p = PublishParams()
    assert S.function_urls(p, "range", "0123456789abcdef") == (
        "http://127.0.0.1:8787/v1/functions/range@prod/invoke",
        "http://127.0.0.1:8787/v1/functions/range/versions/0123456789abcdef/manifest.json",
    )
    monkeypatch.setenv("DEPIN_GATEWAY_URL", "http://gw:1/")
    assert S.gateway_url(p) == "http://gw:1"
    remote = PublishParams(target="https://fn.example/", alias=None)
    assert S.function_urls(remote, "x", "v")[0] == "https://fn.example/v1/functions/x@v/invoke"
    (tmp_path / "model.json").write_text(json.dumps({"family": "anomaly"}))
    assert S.function_name(PublishParams(), tmp_path) == "anomaly"
    assert S.function_name(PublishParams(name="mine"), tmp_path) == "mine"
    with pytest.raises(ConfigError, match=r"publish\.name"):
        S.function_name(PublishParams(), tmp_path / "nothing")


def test_one_factory_builds_the_target_of_every_publish_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'local', 'fluence' and a URL become their ``serving.targets`` class in ``pipelines._targets`` alone;
    keys and the Fluence record are read only when a call needs them."""
    from pipelines._targets import make_target, open_target
    from serving.fluence.target import FluenceTarget
    from serving.targets import GatewayTarget, LocalTarget

    monkeypatch.delenv("DEPIN_ADMIN_KEY", raising=False)
    monkeypatch.setenv("DEPIN_FLUENCE_STATE_DIR", str(tmp_path / "fluence"))
    monkeypatch.delenv("DEPIN_FLUENCE_API_KEY", raising=False)
    with open_target(PublishParams(registry=tmp_path / "reg", gateway_url="http://gw:2/")) as local:
        assert (
            isinstance(local, LocalTarget) and local.root == tmp_path / "reg" and local.url == "http://gw:2"
        )
    with open_target(PublishParams(target="https://fn.example/", registry=tmp_path / "reg")) as remote:
        assert isinstance(remote, GatewayTarget) and remote.url == "https://fn.example"
        with pytest.raises(ConfigError, match="no admin key"):  # read on the first admin call, not before
            remote.set_alias("x", "prod", "0" * 16)
    with open_target(PublishParams(target="fluence", fluence_target="t9")) as fluence:
        assert isinstance(fluence, FluenceTarget) and fluence.name == "t9"
        with pytest.raises(ConfigError, match="no gateway VM recorded"):
            S.function_urls(PublishParams(target="fluence", fluence_target="t9"), "x", "v")
        with pytest.raises(ConfigError, match="DEPIN_FLUENCE_API_KEY"):  # publishing needs the API
            fluence.publish(tmp_path, "x")
    with pytest.raises(ConfigError, match=r"--target 'ftp://x'.*'local'.*'fluence'"):
        make_target("ftp://x")


# ---------------------------------------------------------------------------------------------- parameters


def test_parameters_validate_and_default_to_a_working_local_run() -> None:
    p = TrainAndPublishParams()
    assert p.ingest.interval == "20s" and p.train.family == "range" and p.train.runners == ["local"]
    assert p.publish.target == "local" and p.publish.alias == "prod"
    assert TrainAndPublishParams.model_validate({"train": {"family": "anomaly"}}).train.family == "anomaly"
    for bad in (
        {"train": {"family": "other"}},
        {"train": {"runners": []}},
        {"publish": {"name": "Bad Name"}},
        {"publish": {"target": "ftp://x"}},
        {"ingest": {"batch_size": 0}},
        {"ingest": {"unknown": 1}},
    ):
        with pytest.raises(ValidationError):
            TrainAndPublishParams.model_validate(bad)
    schema = TrainAndPublishParams.model_json_schema()  # what the UI renders as a form
    assert {"ingest", "train", "publish"} <= set(schema["properties"])


# ------------------------------------------------------------------------------------------------ settings


def test_dimo_settings_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.blocks import resolve_dimo_settings

    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps({"client_id": CLIENT, "domain": "http://cb", "private_key": KEY, "auth_url": "http://e:1"})
    )
    missing = tmp_path / "absent.json"
    settings, source = resolve_dimo_settings(creds, None, default_credentials=missing)
    assert source == f"file {creds}" and settings.urls.auth == "http://e:1"
    with pytest.raises(ConfigError, match=r"DEPIN_DIMO_CLIENT_ID.*DimoCredentials block.*depin up"):
        resolve_dimo_settings(None, None, default_credentials=missing)
    assert resolve_dimo_settings(None, None, default_credentials=creds)[1] == f"file {creds}"
    monkeypatch.setenv("DEPIN_DIMO_CLIENT_ID", CLIENT)
    monkeypatch.setenv("DEPIN_DIMO_PRIVATE_KEY", KEY)
    monkeypatch.setenv("DEPIN_DIMO_ENV", "production")
    settings, source = resolve_dimo_settings(None, None, default_credentials=creds)
    assert source == "environment" and settings.environment == "production"
    assert KEY not in repr(settings)


# -------------------------------------------------------------------------------------------- deployments


def test_deployments_schedules_and_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.deployments import ScheduleSettings, deployments

    monkeypatch.setenv("DEPIN_SCHEDULE_TZ", "Europe/Berlin")
    deps = {f"{d.flow_name}/{d.name}": d for d in deployments()}
    assert set(deps) == {
        "ingest-telemetry/nightly",
        "train-and-publish/weekly",
        *(
            f"{f}/on-demand"
            for f in (
                "train-and-publish",
                "ingest-telemetry",
                "train-model",
                "publish-function",
                "batch-score",
                "plan-charging",
            )
        ),
    }
    nightly, weekly = deps["ingest-telemetry/nightly"], deps["train-and-publish/weekly"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [
        ("0 2 * * *", "Europe/Berlin")
    ]
    assert [(s.schedule.cron, s.schedule.timezone) for s in weekly.schedules] == [
        ("0 3 * * 1", "Europe/Berlin")
    ]
    assert nightly.parameters["params"]["since"] == "2d"
    assert TrainAndPublishParams.model_validate(weekly.parameters["params"]) == TrainAndPublishParams()
    assert not deps["train-model/on-demand"].schedules
    assert weekly.entrypoint == "pipelines.flows.train_and_publish"
    with pytest.raises(ConfigError, match="IANA"):
        ScheduleSettings(tz="Mars/Olympus")


def test_the_flow_api_is_lazy() -> None:
    code = (
        "import sys, pipelines, pipelines.cli, pipelines.params, pipelines.results\n"
        "assert 'prefect' not in sys.modules, 'import pipelines must not import prefect'\n"
        "assert set(pipelines.__all__) <= set(dir(pipelines))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pipelines

    assert pipelines.train_and_publish.name == "train-and-publish"  # resolved on first use
    with pytest.raises(AttributeError):
        pipelines.no_such_flow  # noqa: B018


async def test_async_steps_also_run_where_an_event_loop_is_running() -> None:
    """A notebook cell (or an async caller) already runs a loop: the steps must not call asyncio.run there."""

    async def answer() -> int:
        return 42

    assert S.run_sync(answer) == 42


@pytest.mark.parametrize(
    ("failure", "error"), [("infra", TransientError), ("user", PermanentError), ("verify", PermanentError)]
)
def test_a_failed_job_is_transient_only_when_the_infrastructure_failed(
    tmp_path: Path, failure: str, error: type[Exception]
) -> None:
    """What the flows' retry condition and the runner chain rely on; the job's log lines reach ``on_log``."""
    import contextlib
    from collections.abc import Iterator

    from gpu_jobs.chain import Entry, Lease
    from gpu_jobs.runner import JobStatus
    from gpu_jobs.spec import FailureKind, JobKind, JobResult, JobSpec, JobState, ModelSpec, Outputs

    class FailingRunner:
        def submit(self, spec: JobSpec, *, job_id: str) -> str:
            return job_id

        def status(self, job_id: str) -> JobStatus:
            return JobStatus(job_id=job_id, state=JobState.FAILED)

        def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
            return ("epoch 1 loss 0.5\nboom\n", 21) if offset == 0 else ("", offset)

        def result(self, job_id: str, timeout: float | None = None) -> JobResult:
            return JobResult(
                job_id=job_id,
                spec_hash="h",
                state=JobState.FAILED,
                failure=FailureKind(failure),
                error="boom",
            )

        def checkpoint_dir(self, job_id: str) -> Path | None:
            return None

    class OneRunner:
        def check(self, entry: Entry) -> None:
            pass

        @contextlib.contextmanager
        def lease(self, entry: Entry, **kw: Any) -> Iterator[Lease]:
            yield Lease(FailingRunner(), node="n1")

    lines: list[str] = []
    statuses: list[tuple[str, JobState]] = []
    spec = JobSpec(
        kind=JobKind.TRAIN, model=ModelSpec(family="range"), outputs=Outputs(dir=str(tmp_path / "m"))
    )
    with pytest.raises(error, match=rf"job \S+ FAILED\({failure}\): .*boom"):
        jobs.run_spec(
            spec,
            ["local"],
            jobs_dir=tmp_path / "jobs",
            factory=OneRunner(),
            on_log=lines.append,
            on_status=lambda entry, st: statuses.append((entry, st.state)),
        )
    assert [line for line in lines if not line.startswith("chain: ")] == ["epoch 1 loss 0.5", "boom"]
    assert statuses == [("local", JobState.FAILED)]


_CLI_LIBRARIES_IN_FLOW_MODULES = """
import ast, json, sys
import pipelines.flows, pipelines._tasks, pipelines._steps

found = {}
for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] != "pipelines" or not getattr(module, "__file__", None):
        continue
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add((node.module or "").split(".")[0])
    found[name] = sorted(roots & {"rich", "typer"})
print(json.dumps({"modules": found, "typer_loaded": "typer" in sys.modules}))
"""


def test_the_modules_the_flows_call_import_no_cli_library() -> None:
    """Flows, tasks and steps call the packages' library APIs; rich and typer belong to the CLI modules. (rich
    itself may still load through a dependency, e.g. prefect or httpx's CLI: the check is on our modules,
    every ``pipelines`` module that importing the flows loads.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_LIBRARIES_IN_FLOW_MODULES], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    modules = report["modules"]
    assert {"pipelines.flows", "pipelines._tasks", "pipelines._steps"} <= set(modules)
    assert {name: libs for name, libs in modules.items() if libs} == {}
    assert report["typer_loaded"] is False
