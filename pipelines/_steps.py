"""The steps of the flows as plain functions (no Prefect): each is tested directly and timed by
``bench/pipeline.py``; ``pipelines._tasks`` wraps them as tasks. They take and return references (paths,
sha256s, small pydantic results), never tables or models.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict

from connectors.dimo.client import Admission, DimoClient, Pacer, VehicleInfo
from connectors.dimo.go_duration import parse_interval
from connectors.dimo.ingest import IngestProgress, ingest
from connectors.dimo.location import TableLocation
from connectors.dimo.schema import resolve_signals
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from depin_core import plots as P
from depin_core.errors import ConfigError, PermanentError
from depin_core.timeparse import parse_instant
from gpu_jobs.registry import family_names, load_family
from gpu_jobs.spec import DatasetRef, sha256_file
from pipelines.params import DEFAULT_SCORES, IngestParams, PublishParams, ScoreParams, TrainParams
from pipelines.results import (
    BatchReport,
    DatasetInfo,
    PublishFunctionResult,
    QualityVerdict,
    ScoreResult,
    TrainAndPublishResult,
    TrainResult,
    clean_metrics,
)

if TYPE_CHECKING:
    from gpu_jobs import api as jobs

T = TypeVar("T")


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` to completion from sync code — also where this thread already runs an
    event loop (a notebook, an async caller): then in a fresh thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1, thread_name_prefix="depin-async") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# ----------------------------------------------------------------------------------------------- ingest


class Window(BaseModel):
    """``since``/``until``/``interval`` resolved once per flow run, so every batch asks for the same buckets."""

    model_config = ConfigDict(frozen=True)

    since: datetime
    until: datetime
    interval: timedelta


def resolve_window(params: IngestParams, now: datetime | None = None) -> Window:
    now = now or datetime.now(UTC)
    since = parse_instant(params.since, field="since", now=now)
    until = parse_instant(params.until, field="until", now=now)
    if until <= since:
        raise ConfigError(f"since/until: {params.since!r} is not before {params.until!r}; widen the window")
    return Window(since=since, until=until, interval=parse_interval(params.interval))


def resolve_signal_names(params: IngestParams) -> list[str] | None:
    return resolve_signals(params.signals) if params.signals else None


def request_rate(settings: DimoSettings, params: IngestParams) -> float:
    """DIMO requests/s per service for this run: ``params.rate_limit_per_s``, else the settings' (0 = off)."""
    return settings.rate_limit_per_s if params.rate_limit_per_s is None else params.rate_limit_per_s


def batch_settings(settings: DimoSettings, params: IngestParams) -> DimoSettings:
    """Per-task client settings: the run's :func:`request_rate` (its tasks share one :func:`process_pacer`)."""
    return settings.model_copy(update={"rate_limit_per_s": request_rate(settings, params)})


_PACERS: dict[tuple[str, str, float], Pacer] = {}
_PACERS_LOCK = threading.Lock()


def process_pacer(settings: DimoSettings) -> Pacer:
    """The one :class:`~connectors.dimo.client.Pacer` of this process for ``settings``' license, DIMO endpoints
    and rate: every task (thread) of every run here paces its requests with it. Each task pacing itself at a
    share of the rate left the rate of finished tasks unused, and the tasks' bursts stacked (the emulator
    answered 429 to token exchanges)."""
    key = (settings.client_id or "", settings.urls.auth, settings.rate_limit_per_s)
    with _PACERS_LOCK:
        return _PACERS.setdefault(key, Pacer(settings.rate_limit_per_s))


def paced(settings: DimoSettings, admit: Admission | None) -> tuple[DimoSettings, Admission | None]:
    """The client settings and admission of one DIMO client: ``admit`` when given (the fleet-wide limit),
    else this process's :func:`process_pacer` instead of the client's own limiter."""
    if admit is not None or settings.rate_limit_per_s <= 0:
        return settings, admit
    return settings.model_copy(update={"rate_limit_per_s": 0.0}), process_pacer(settings)


def discover_vehicles(
    settings: DimoSettings, wanted: Sequence[int] | None = None, admit: Admission | None = None
) -> list[VehicleInfo]:
    """The vehicles shared with the license, by token id (``wanted`` filters; unknown ids are an error).
    ``admit`` gates each DIMO request (a fleet-wide rate limit: ``pipelines.fleet_rate``)."""

    settings, admit = paced(settings, admit)

    async def run() -> list[VehicleInfo]:
        async with DimoClient(settings, admit=admit) as client:
            return sorted(await client.discover_vehicles(), key=lambda v: v.token_id)

    found = run_sync(run)
    if wanted is not None:
        keep = set(wanted)
        missing = sorted(keep - {v.token_id for v in found})
        if missing:
            raise ConfigError(f"vehicles: {missing} are not shared with this license; check the token ids")
        return [v for v in found if v.token_id in keep]
    return found


def plan_batches(token_ids: Sequence[T], batch_size: int) -> list[list[T]]:
    """Consecutive batches of at most ``batch_size`` vehicles."""
    ids = list(token_ids)
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def ingest_batch(
    settings: DimoSettings,
    dataset: Path | str,
    window: Window,
    vehicles: Sequence[VehicleInfo],
    signals: Sequence[str] | None = None,
    on_vehicle: Callable[[int, int], None] | None = None,
    admit: Admission | None = None,
) -> BatchReport:
    """Ingest ``vehicles`` (from :func:`discover_vehicles`: not discovered again per batch) over ``window``
    into the dataset (``connectors.dimo.ingest``: incremental, idempotent). ``on_vehicle(token_id, rows)`` is
    called as each vehicle completes; ``admit`` gates each DIMO request."""
    token_ids = [v.token_id for v in vehicles]
    per_vehicle: dict[int, int] = {}
    last = 0
    settings, admit = paced(settings, admit)

    def progress(p: IngestProgress) -> None:
        nonlocal last
        if p.token_id is not None:
            per_vehicle[p.token_id] = p.rows - last
            if on_vehicle is not None:
                on_vehicle(p.token_id, p.rows - last)
        last = p.rows

    async def run() -> BatchReport:
        async with DimoClient(settings, admit=admit) as client:
            report = await ingest(
                client,
                TelemetryStore(dataset),
                since=window.since,
                until=window.until,
                interval=window.interval,
                signals=signals,
                vehicles=list(vehicles),
                on_progress=progress,
            )
        skipped = {int(s["token_id"]) for s in report.skipped}
        return BatchReport(
            token_ids=token_ids,
            rows=report.rows,
            vehicles=report.vehicles,
            requests=report.requests,
            retries=report.retries,
            up_to_date=report.up_to_date,
            skipped=report.skipped,
            per_vehicle={t: n for t, n in per_vehicle.items() if t not in skipped},
            seconds=report.seconds,
        )

    return run_sync(run)


def dataset_info(path: Path | str, *, with_hash: bool = True) -> DatasetInfo:
    """Size, extent, version and content hash (``gpu_jobs.spec.DatasetRef`` digest of the version's files;
    local tables only: on object storage it would mean downloading the table) of a telemetry dataset."""

    store = TelemetryStore(path)
    summary = store.summary()
    local = store.location.is_local
    digest = (
        DatasetRef.from_table(store.root, version=summary.version).sha256
        if with_hash and local and summary.files
        else None
    )
    return DatasetInfo(
        path=store.root,
        version=summary.version,
        sha256=digest,
        rows=summary.rows,
        vehicles=summary.vehicles,
        interval=summary.interval,
        first=summary.first.isoformat() if summary.first else None,
        last=summary.last.isoformat() if summary.last else None,
        columns=summary.columns,
    )


def vehicle_table(
    path: Path | str, new_rows: dict[int, int], skipped: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per vehicle for the table artifact: rows added now, rows stored, first/last bucket, status."""
    dataset = TelemetryStore(path).dataset()
    stored: dict[int, tuple[int, Any, Any]] = {}
    if dataset is not None:
        keys = dataset.to_table(columns=["token_id", "timestamp"])
        grouped = keys.group_by("token_id").aggregate(
            [("timestamp", "count"), ("timestamp", "min"), ("timestamp", "max")]
        )
        for row in grouped.to_pylist():
            stored[int(row["token_id"])] = (
                int(row["timestamp_count"]),
                row["timestamp_min"],
                row["timestamp_max"],
            )
    reasons = {int(s["token_id"]): str(s.get("reason", "")) for s in skipped}
    rows = []
    for tid in sorted(set(stored) | set(new_rows) | set(reasons)):
        n, first, last = stored.get(tid, (0, None, None))
        status = (
            "skipped: " + reasons[tid]
            if tid in reasons
            else ("ingested" if tid in new_rows else "up to date")
        )
        rows.append(
            {
                "token_id": tid,
                "new_rows": new_rows.get(tid, 0),
                "rows": n,
                "first": first.isoformat() if first else None,
                "last": last.isoformat() if last else None,
                "status": status,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ train


def model_dir_for(params: TrainParams, now: datetime | None = None) -> Path:
    """A fresh artifact directory ``<out>/<family>-<UTC time>-<random>`` (never overwrites a model)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return params.out / f"{params.family}-{stamp}-{secrets.token_hex(2)}"


def check_quality(family: str, metrics: dict[str, Any]) -> QualityVerdict:
    """Does the model beat its naive baseline? The family's own bar (``ModelFamily.quality``: range, held-out
    ``mae < baseline_mae``; anomaly, ``recall ≥ 0.5`` and ``false_positive_rate ≤ 0.2`` when measurable)."""
    quality = (
        getattr(load_family(family, allow_import_path=False), "quality", None)
        if family in family_names()
        else None
    )
    if quality is None:
        raise ConfigError(f"family {family!r}: no quality bar for it; use one of {', '.join(family_names())}")
    verdict = quality(metrics)
    return QualityVerdict(accepted=verdict.accepted, baseline=verdict.baseline, reasons=list(verdict.reasons))


def train_model_step(
    params: TrainParams, dataset: Path | str, out: Path | None = None, on_log: jobs.LogSink | None = None
) -> TrainResult:
    """Train, then judge the model against its baseline (the verdict is in the result; see ``require_better``)."""
    out = out or model_dir_for(params)
    loc = TableLocation.of(dataset)
    from gpu_jobs import api as jobs  # torch: imported by the runs that train, not by every ingest

    doc = jobs.train(
        dataset=dataset if loc.is_local else loc.uri,
        storage_options=None if loc.is_local else loc.storage_options,
        model=params.family,
        out=out,
        runners=params.runners,
        ground_truth=params.ground_truth,
        params=params.hyperparameters,
        seed=params.seed,
        max_wall_s=params.max_wall_s,
        jobs_dir=params.jobs_dir,
        on_log=on_log,
    )
    metrics = clean_metrics(doc["metrics"])
    verdict = check_quality(params.family, doc["metrics"])
    return TrainResult(
        family=params.family,
        model_dir=str(out),
        model_sha256=sha256_file(out / "manifest.json"),
        dataset=str(doc["dataset"]["table"] or dataset),
        dataset_version=doc["dataset"]["version"],
        dataset_sha256=doc["dataset"]["sha256"],
        metrics=metrics,
        baseline=verdict.baseline,
        accepted=verdict.accepted,
        runner=doc["runner"],
        device=doc.get("device"),
        job_id=doc["job_id"],
        spec_hash=doc["spec_hash"],
        seconds=float(doc.get("seconds") or 0.0),
        attempts=doc.get("attempts") or [],
    )


def attempts_rows(attempts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the runner-chain table: one per attempt (runner, node, state, reason, cost, seconds, verified)."""
    return [
        {
            "attempt": a.get("attempt"),
            "runner": a.get("runner"),
            "node": a.get("node"),
            "state": str(a.get("state")) + (f"({a['failure']})" if a.get("failure") else ""),
            "reason": a.get("reason"),
            "verified": a.get("verification") if a.get("verified") is not None else "trusted/not reached",
            "resumed_from_step": a.get("resumed_from_step"),
            "cost_usd": a.get("cost_usd"),
            "seconds": a.get("seconds"),
        }
        for a in attempts
    ]


def require_better(result: TrainResult) -> None:
    """``PermanentError`` when the model does not beat its naive baseline (it must not be published)."""
    verdict = check_quality(result.family, result.metrics)
    if not verdict.accepted:
        raise PermanentError(
            f"{result.family} model at {result.model_dir} refused: {'; '.join(verdict.reasons)}; it will not be "
            "published — ingest more data (or shorter buckets) or change the hyperparameters"
        )


def metrics_rows(result: TrainResult) -> list[dict[str, Any]]:
    """Rows of the metrics table artifact: metric, value (6 decimals), shown (for people: 3 significant
    digits and the unit)."""
    from pipelines.report import human

    rows = [
        {"metric": k, "value": round(v, 6) if isinstance(v, float) else v, "shown": human(k, v)}
        for k, v in result.metrics.items()
        if isinstance(v, int | float | str) or v is None
    ]
    rows += [{"metric": f"bar: {k}", "value": v, "shown": human(k, v)} for k, v in result.baseline.items()]
    return rows


def run_summary_markdown(result: TrainAndPublishResult) -> str:
    """The parent run's own report: data → model → function, with the stage times."""
    m, b = result.metrics, result.baseline
    family = load_family(result.family, allow_import_path=False) if result.family in family_names() else None
    key = getattr(family, "headline", None) or next(iter(m), "")  # the family's headline metric
    from pipelines.report import human, model_plots_markdown

    lines = [
        f"# {result.function_name}@{result.function_alias} → version `{result.function_version}`",
        "",
        f"- data: {result.rows:,} rows from {result.vehicles} vehicles (`{result.dataset}`, "
        f"{result.new_rows:,} new)",
        f"- model: {result.family}, held-out {key} {human(key, m.get(key))} (baseline: {human('', b)})",
        f"- function: [{result.function_url}]({result.function_url}) — [manifest]({result.manifest_url})",
        "- stage times: " + ", ".join(f"{k} {P.quantity(v, 's')}" for k, v in result.stage_seconds.items()),
    ]
    plots = model_plots_markdown(result.model_dir)
    return "\n".join(lines + (["", plots.rstrip()] if plots else []))


def metrics_markdown(result: TrainResult) -> str:
    verdict = check_quality(result.family, result.metrics)
    m = result.metrics
    lines = [f"# {result.family} model: {'accepted' if verdict.accepted else '**refused**'}", ""]
    lines.append(load_family(result.family, allow_import_path=False).summary(m))
    lines += [""] + [f"- {r}" for r in verdict.reasons]
    lines += [
        "",
        "| field | value |",
        "|---|---|",
        f"| model | `{result.model_dir}` |",
        f"| manifest sha256 | `{result.model_sha256}` |",
        f"| dataset | `{result.dataset}` (sha256 `{result.dataset_sha256[:16]}…`) |",
        f"| runner / device | {result.runner} / {result.device} |",
        f"| job | `{result.job_id}` ({result.seconds:.1f} s) |",
    ]
    attempts = attempts_rows(result.attempts)
    if attempts:
        lines += ["", "## Runner chain", "", "| # | runner | node | state | reason | verified | cost (USD) | s |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in attempts:
            reason = str(r["reason"] or "").replace("|", "\\|").replace("\n", " ")[:200]
            cost = "" if r["cost_usd"] is None else f"{r['cost_usd']:.4f}"
            lines.append(
                f"| {r['attempt']} | {r['runner']} | {r['node'] or ''} | {r['state']} | {reason} | "
                f"{r['verified']} | {cost} | {P.sig(r['seconds'])} |"
            )
    from pipelines.report import metric_rows, model_plots_markdown

    lines += ["", "## Held-out metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {shown} |" for k, shown, _ in metric_rows(m)]
    plots = model_plots_markdown(result.model_dir)
    return "\n".join(lines + (["", plots.rstrip()] if plots else []))


def ingest_markdown(info: DatasetInfo, new_rows: int, skipped: Sequence[dict[str, Any]]) -> str:
    """The ingest report: the dataset's size and extent for people, and its fleet plots (tracks, rows per
    vehicle-hour); a plot that cannot be drawn is named with the reason, never fails the ingest."""
    from pipelines.report import fleet_plots_markdown

    lines = [
        f"# Telemetry dataset `{info.path}`",
        "",
        f"- {info.rows:,} rows ({new_rows:,} new) from {info.vehicles:,} vehicles, {info.interval} buckets",
        f"- from {info.first} to {info.last}; {len(info.columns)} columns",
    ]
    if skipped:
        lines.append(f"- {len(skipped)} vehicle(s) skipped: " + "; ".join(
            f"{s.get('token_id')}: {s.get('reason', '')}" for s in skipped[:10]))  # fmt: skip
    try:
        plots = fleet_plots_markdown(info.path)
    except Exception as e:  # render_fleet does not raise; this guards the report itself
        plots = f"*fleet plots unavailable: {type(e).__name__}: {e}*"
    return "\n".join([*lines, "", plots.rstrip()])


# ---------------------------------------------------------------------------------------------- publish


def gateway_url(params: PublishParams) -> str:
    """The base URL the function is served at: the target URL (or the recorded Fluence VM's); for 'local',
    ``gateway_url``, ``DEPIN_GATEWAY_URL``, the default local gateway."""
    with open_target(params) as target:
        return target.url


def registry_dir(registry: Path | None) -> Path:
    from pipelines._targets import registry_dir as resolve

    return resolve(registry)


def open_target(params: PublishParams) -> Any:
    """The ``serving.targets.Target`` of ``params`` (``pipelines._targets.open_target``); close it."""
    from pipelines._targets import open_target as make

    return make(params)


def function_name(params: PublishParams, model_dir: Path) -> str:
    """``params.name``, else the model's family (from ``model.json``, or the bundle's manifest)."""
    import json

    if params.name:
        return params.name
    for rel, key in (("model.json", "family"), ("model/model.json", "family")):
        with contextlib.suppress(OSError, ValueError):
            family = json.loads((model_dir / rel).read_text()).get(key)
            if family:
                return str(family)
    raise ConfigError(f"model {model_dir}: cannot tell its family; pass publish.name")


def publish_version(params: PublishParams, model_dir: Path, name: str) -> dict[str, Any]:
    """Build, sign, upload and verify the version; no alias is moved yet. Returns ``PublishResult`` JSON."""
    with open_target(params) as target:
        return target.publish(model_dir, name).to_json()


def smoke_invoke(params: PublishParams, name: str, version: str) -> tuple[int, list[dict[str, Any]]]:
    """Invoke ``name@version`` on the target with its manifest's example; (inputs, outputs) or an error
    (``serving.targets.smoke_invoke``). Local target: the version as stored in the registry, re-verified and
    loaded like the gateway loads it."""
    from serving.targets import smoke_invoke as smoke

    with open_target(params) as target:
        return smoke(target, name, version)


def move_alias(params: PublishParams, name: str, version: str) -> dict[str, dict[str, float]]:
    """Point ``params.alias`` at ``version`` (after the smoke call); returns the alias table."""
    from serving.targets import move_alias as move

    with open_target(params) as target:
        return move(target, name, params.alias, version)


def function_urls(params: PublishParams, name: str, version: str) -> tuple[str, str]:
    """(invoke URL of ``name@alias`` — or ``@version`` without alias —, URL of the version's manifest)."""
    from serving.targets import function_url, manifest_url

    with open_target(params) as target:
        return function_url(target, f"{name}@{params.alias or version}"), manifest_url(target, name, version)


def publish_function_step(params: PublishParams, model_dir: Path) -> PublishFunctionResult:
    """publish → smoke call → alias (``serving.targets.publish_function``; the flow runs the three as tasks)."""
    from serving.targets import publish_function

    with open_target(params) as target:
        done = publish_function(target, model_dir, function_name(params, model_dir), params.alias)
    return _function_result(done)


def publish_result(
    params: PublishParams,
    published: dict[str, Any],
    n_inputs: int,
    outputs: list[dict[str, Any]],
    aliases: dict[str, dict[str, float]],
) -> PublishFunctionResult:
    """The flow's result from its three tasks' results."""
    from serving.publish import PublishResult
    from serving.targets import published_function

    with open_target(params) as target:
        done = published_function(
            target, PublishResult.model_validate(published), params.alias, (n_inputs, outputs), aliases
        )
    return _function_result(done)


def _function_result(done: Any) -> PublishFunctionResult:
    r = done.result
    return PublishFunctionResult(
        name=r.name,
        version=r.version,
        alias=done.alias,
        target=r.target,
        function_url=done.function_url,
        manifest_url=done.manifest_url,
        manifest_sha256=r.manifest_sha256,
        publisher=r.publisher,
        created=r.created,
        smoke_inputs=done.smoke_inputs,
        smoke_outputs=done.smoke_outputs,
        aliases=r.aliases,
    )


# ------------------------------------------------------------------------------------------------ score


def resolve_model(params: ScoreParams) -> Path:
    """The model artifact to score with: ``model_dir``, or the one inside the registry's bundle of
    ``function`` (name, name@alias, name@version)."""
    if (params.model_dir is None) == (params.function is None):
        raise ConfigError("score: give exactly one of model_dir or function")
    if params.model_dir is not None:
        return params.model_dir
    from serving.bundle import MODEL_DIR
    from serving.registry import Registry

    assert params.function is not None
    name, _, selector = params.function.partition("@")
    registry = Registry(registry_dir(params.registry), trusted=None)
    version = registry.resolve(name, selector or None)
    return registry.bundle(name, version).path / MODEL_DIR


def score_step(params: ScoreParams, on_log: jobs.LogSink | None = None) -> ScoreResult:
    model = resolve_model(params)
    label = params.function.replace("@", "-") if params.function else Path(model).name
    out = params.out or DEFAULT_SCORES / f"{label}.parquet"
    from gpu_jobs import api as jobs

    doc = jobs.score(
        model_dir=model,
        dataset=params.dataset,
        out=out,
        runners=params.runners,
        ground_truth=params.ground_truth,
        max_wall_s=params.max_wall_s,
        jobs_dir=params.jobs_dir,
        on_log=on_log,
    )
    return ScoreResult(
        output=str(out),
        sha256=sha256_file(out),
        rows=doc.get("rows"),
        family=str(doc["family"]),
        model=str(model),
        metrics=clean_metrics({k: v for k, v in doc["metrics"].items() if not isinstance(v, dict | list)}),
        seconds=float(doc.get("seconds") or 0.0),
        attempts=doc.get("attempts") or [],
    )
