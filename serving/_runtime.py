"""The gateway's live state: loaded versions (predictor + batcher), the routing table, and hot swap.

The routing table is an immutable snapshot rebuilt whenever ``Registry.revision()`` changes (polled in the
background, or forced after an admin change). A rebuild first loads and warms (with the manifest's example)
every version an alias points to, and only then swaps the table in one assignment: requests never reach a
half-loaded model. Versions no alias points to any more stay loaded for ``name@version`` requests (up to
``max_unaliased_loaded``, least recently used first out); the others are drained, then closed, so nothing
queued is dropped. The hot path (``resolve``) reads only memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from depin_core.errors import DepinError
from serving.batching import Columns, DynamicBatcher
from serving.errors import LoadFailed, NotFound
from serving.registry import LATEST, VERSION_RE, Registry, pick_version

if TYPE_CHECKING:
    from gpu_jobs.models.base import Derived
    from gpu_jobs.models.online import Predictor
    from serving._metrics import GatewayMetrics
    from serving.bundle import Bundle
    from serving.settings import GatewaySettings

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (function, version)


def forms_of(predictor: Any) -> dict[str, Any]:
    """The other request forms a loaded predictor accepts, by body key (none for a bare predictor)."""
    return dict(getattr(predictor, "forms", None) or {})


LoadPredictor = Callable[["Bundle", str], "Predictor"]


def default_load_predictor(bundle: Bundle, device: str = "cpu") -> Predictor:
    """The bundle's model as a row-level predictor (the artifact's sha256s are verified again, and its family
    and schemas must match the manifest)."""
    from serving.bundle import predictor

    return predictor(bundle, device=device)


@dataclass(frozen=True)
class VersionInfo:
    """What the registry says about one version (served by the GET endpoints without disk access)."""

    version: str
    bundle: Bundle
    manifest: dict[str, Any]  # JSON form of the FunctionManifest

    @property
    def signature(self) -> dict[str, str]:
        return {"scheme": "eip191", "publisher": self.bundle.publisher, "signature": self.bundle.signature}


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    versions: dict[str, VersionInfo]  # oldest first
    aliases: dict[str, dict[str, float]]  # as in the registry


@dataclass(frozen=True)
class FunctionRoute:
    info: FunctionInfo
    routes: dict[str, dict[str, float]]  # alias → target actually served (every version loaded and warm)


@dataclass(frozen=True)
class RoutingTable:
    revision: int
    functions: dict[str, FunctionRoute]
    problems: dict[str, str] = field(default_factory=dict)  # "name@alias" → why its target is not served
    warnings: dict[str, str] = field(default_factory=dict)  # "name@version" → why it is not servable


EMPTY_TABLE = RoutingTable(-1, {})


@dataclass(eq=False)
class LoadedVersion:
    """A version ready to serve: its predictor, batcher and manifest limits."""

    name: str
    version: str
    predictor: Predictor
    batcher: DynamicBatcher
    max_rows: int
    last_used: float = 0.0  # time.perf_counter() of the last request (LRU of unaliased versions)
    own_thread: concurrent.futures.ThreadPoolExecutor | None = None  # a slow function's inference thread

    async def aclose(self) -> None:
        """Drain the batcher, then stop the version's own inference thread (if it has one)."""
        await self.batcher.aclose(drain=True)
        if self.own_thread is not None:
            self.own_thread.shutdown(wait=False, cancel_futures=True)


def _make_run(predictor: Predictor) -> Callable[[Columns], list[dict[str, Any]]]:
    import torch

    def run(cols: Columns) -> list[dict[str, Any]]:
        with torch.inference_mode():
            return predictor.rows(predictor.predict(cols))

    return run


class Runtime:
    """Owns the executors, loaded versions and routing table of one gateway."""

    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        metrics: GatewayMetrics | None = None,
        *,
        load_predictor: LoadPredictor = default_load_predictor,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.table = EMPTY_TABLE
        self.initialized = False  # the first routing table is built
        self.loaded: dict[Key, LoadedVersion] = {}
        self._load_predictor = load_predictor
        self._loading: dict[Key, asyncio.Task[LoadedVersion]] = {}
        self._failed: dict[Key, tuple[int, str]] = {}  # key → (revision, reason), retried on a new revision
        self._refresh_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self.infer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="depin-infer")
        self.loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="depin-load")
        # other request forms (raw telemetry, plans) run the family's feature code: off the loop, beside inference
        self.prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="depin-prep")

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start polling the registry (the first table is built in the background; see ``ready``)."""
        self._poller = asyncio.create_task(self._poll(), name="depin-registry-poll")

    async def stop(self) -> None:
        """Stop polling, drain and close every batcher, stop the threads."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._loading.values()):
            task.cancel()
        loaded, self.loaded = list(self.loaded.values()), {}
        await asyncio.gather(*(lv.aclose() for lv in loaded), *self._closing)
        self.infer.shutdown(wait=True, cancel_futures=True)
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.prep.shutdown(wait=True, cancel_futures=True)

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving the current table; the next poll retries
                log.exception("gateway: refreshing the routing table failed")
            await asyncio.sleep(self.settings.poll_interval_s)

    def derive(self, predictor: Predictor, key: str, value: Any) -> asyncio.Future[Derived]:
        """``predictor.derive(key, value)`` in the prep thread (another request form → columns)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.prep, predictor.derive, key, value)

    def in_loader(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run blocking registry / disk work in the loader thread."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.loader, lambda: fn(*args, **kwargs))

    # ---- state -------------------------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """What keeps the gateway from being ready ({} when ready)."""
        if not self.initialized:
            return {"gateway": "the routing table is being built (models are loading)"}
        return dict(self.table.problems)

    def ready(self) -> bool:
        return self.initialized and not self.table.problems

    def queue_state(self) -> Iterator[tuple[str, str, int, int]]:
        for (name, version), lv in list(self.loaded.items()):
            yield name, version, lv.batcher.queue_rows, lv.batcher.in_flight_rows

    # ---- hot path ----------------------------------------------------------------------------------------
    def route(self, name: str) -> FunctionRoute | None:
        return self.table.functions.get(name)

    def pick(self, route: FunctionRoute, selector: str | None, request_key: str | None) -> str:
        """The version that serves ``selector`` (None → latest); ``NotFound`` naming what is unknown;
        ``LoadFailed`` when the alias exists but none of its targets is loaded yet."""
        info = route.info
        if selector is None:
            selector = LATEST
        if VERSION_RE.fullmatch(selector):
            if selector not in info.versions:
                problem = self.table.warnings.get(f"{info.name}@{selector}")
                if problem is not None:
                    raise LoadFailed(f"{info.name}@{selector} {problem}")
                raise NotFound("version", selector, info.versions, function=info.name)
            return selector
        target = route.routes.get(selector)
        if target is None:
            if selector in info.aliases:
                raise LoadFailed(
                    f"alias {selector!r} of {info.name!r} points at a version that is not loaded yet "
                    f"({self.table.problems.get(f'{info.name}@{selector}', 'loading')}); retry shortly"
                )
            raise NotFound("alias", selector, info.aliases, function=info.name)
        return pick_version(target, request_key, salt=info.name)

    def get_loaded(self, name: str, version: str) -> LoadedVersion | None:
        lv = self.loaded.get((name, version))
        if lv is not None and not lv.batcher.closed:
            return lv
        return None

    # ---- loading -----------------------------------------------------------------------------------------
    async def ensure_loaded(self, name: str, version: str, bundle: Bundle | None = None) -> LoadedVersion:
        """The loaded version, loading and warming it first if needed (concurrent callers share one load).
        Raises ``LoadFailed`` (cached until the registry revision changes) or ``NotFound``."""
        lv = self.get_loaded(name, version)
        if lv is not None:
            lv.last_used = time.perf_counter()
            return lv
        key = (name, version)
        failed = self._failed.get(key)
        if failed is not None and failed[0] == self.table.revision:
            raise LoadFailed(failed[1])
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, version, bundle), name=f"depin-load-{name}@{version}")
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        lv = await asyncio.shield(task)
        lv.last_used = time.perf_counter()
        return lv

    async def _load(self, name: str, version: str, bundle: Bundle | None) -> LoadedVersion:
        if bundle is None:
            route = self.table.functions.get(name)
            info = route.info.versions.get(version) if route else None
            bundle = info.bundle if info is not None else None
        own_thread: concurrent.futures.ThreadPoolExecutor | None = None
        try:
            if bundle is None:
                bundle = await self.in_loader(self.registry.bundle, name, version)
            manifest = bundle.manifest
            predictor = await self.in_loader(self._load_predictor, bundle, self.settings.device)
            max_rows = int(manifest.max_batch_size)
            # A function whose calls take seconds (the charging planner) gets a thread of its own: in the
            # shared inference thread every other function's requests would wait behind its solves.
            own_thread = (
                concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"depin-infer-{name}")
                if getattr(predictor, "dedicated_thread", False)  # tests wrap predictors in bare objects
                else None
            )
            batcher = DynamicBatcher(
                _make_run(predictor),
                max_batch_rows=max_rows,
                max_wait_ms=self.settings.max_wait_ms,
                max_queue_rows=max(self.settings.max_queue_rows, max_rows),
                executor=own_thread or self.infer,
                max_in_flight=self.settings.max_in_flight,
                name=f"{name}@{version}",
                inline_max_ms=self.settings.inline_max_ms,
            )
            example = list(manifest.example)
            cols = await self.in_loader(predictor.columns, example)
            out = await batcher.submit(
                cols, deadline=time.monotonic() + max(60.0, self.settings.request_timeout_s)
            )
            if len(out) != len(example):
                raise LoadFailed(f"warm-up returned {len(out)} rows for {len(example)} example rows")
            for key, form in forms_of(predictor).items():  # warms the feature code; its example must work
                try:
                    await self.in_loader(predictor.derive, key, form.example)
                except Exception as exc:
                    log.error("gateway: %s@%s: the example of its %s form fails: %s", name, version, key, exc)
        except NotFound:
            raise
        except Exception as exc:
            if own_thread is not None:
                own_thread.shutdown(wait=False, cancel_futures=True)
            reason = f"{name}@{version} failed to load: {exc}"
            log.error("gateway: %s", reason)
            self._failed[(name, version)] = (self.table.revision, reason)
            raise LoadFailed(reason) from exc
        if self.metrics is not None:
            batcher.on_batch = self.metrics.batch_observer(name, version)
        lv = LoadedVersion(name, version, predictor, batcher, max_rows, time.perf_counter(), own_thread)
        self.loaded[(name, version)] = lv
        self._failed.pop((name, version), None)
        log.info("gateway: loaded and warmed %s@%s", name, version)
        return lv

    # ---- routing table -----------------------------------------------------------------------------------
    def _snapshot(self) -> tuple[int, dict[str, FunctionInfo], dict[str, str]]:
        """Runs in the loader thread: every function's verified versions and aliases, and the versions that
        failed verification (with why)."""
        revision = self.registry.revision()
        infos: dict[str, FunctionInfo] = {}
        problems: dict[str, str] = {}
        for name in self.registry.functions():
            try:
                ids = self.registry.version_ids(name)
                aliases = self.registry.aliases(name)
            except NotFound:  # removed meanwhile
                continue
            versions: dict[str, VersionInfo] = {}
            for version in ids:
                try:
                    bundle = self.registry.bundle(name, version)
                except DepinError as exc:
                    problems[f"{name}@{version}"] = f"not served: {exc}"
                    continue
                versions[version] = VersionInfo(version, bundle, bundle.manifest.model_dump(mode="json"))
            infos[name] = FunctionInfo(name, versions, aliases)
        return revision, infos, problems

    async def refresh(self, *, force: bool = False) -> bool:
        """Rebuild the routing table if the registry changed (or ``force``); True when it was rebuilt."""
        async with self._refresh_lock:
            revision = await self.in_loader(self.registry.revision)
            if not force and self.initialized and revision == self.table.revision:
                return False
            revision, infos, warnings = await self.in_loader(self._snapshot)
            problems: dict[str, str] = {}
            old = self.table
            functions: dict[str, FunctionRoute] = {}
            for name, info in infos.items():
                routes: dict[str, dict[str, float]] = {}
                for alias, target in info.aliases.items():
                    reason = await self._load_target(name, target, info, warnings)
                    if reason is None:
                        routes[alias] = target
                        continue
                    problems[f"{name}@{alias}"] = reason
                    previous = old.functions.get(name)
                    kept = previous.routes.get(alias) if previous else None
                    if kept is not None and all(self.get_loaded(name, v) for v in kept):
                        routes[alias] = kept  # keep serving the old target rather than nothing
                functions[name] = FunctionRoute(info, routes)
            self.table = RoutingTable(revision, functions, problems, warnings)
            self.initialized = True
            self._retire()
            return True

    async def _load_target(
        self, name: str, target: dict[str, float], info: FunctionInfo, warnings: dict[str, str]
    ) -> str | None:
        """Load every version of ``target``; None when all are loaded, else why not."""
        for version in target:
            if version not in info.versions:
                why = warnings.get(f"{name}@{version}", "it is not in the registry")
                return f"version {version} cannot be served: {why}"
            try:
                await self.ensure_loaded(name, version, info.versions[version].bundle)
            except LoadFailed as exc:
                return str(exc)
            except NotFound as exc:
                return str(exc)
        return None

    def _retire(self) -> None:
        """Close versions that are gone from the registry, and unaliased ones beyond the keep limit."""
        table = self.table
        aliased = {
            (name, v)
            for name, route in table.functions.items()
            for target in route.routes.values()
            for v in target
        }
        unaliased: list[tuple[float, Key]] = []
        for key, lv in list(self.loaded.items()):
            if key in aliased:
                continue
            route = table.functions.get(key[0])
            if route is None or key[1] not in route.info.versions:
                self._close(key)
            else:
                unaliased.append((lv.last_used, key))
        unaliased.sort()
        for _, key in unaliased[: max(0, len(unaliased) - self.settings.max_unaliased_loaded)]:
            self._close(key)

    def _close(self, key: Key) -> None:
        lv = self.loaded.pop(key, None)
        if lv is None:
            return
        log.info("gateway: unloading %s@%s (draining %d queued rows)", *key, lv.batcher.queue_rows)
        task = asyncio.create_task(lv.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def evict_unaliased(self) -> None:
        """Apply the keep limit to unaliased versions now (after a lazy load)."""
        self._retire()
