"""A gateway's replica of a shared registry: its local ``Registry`` kept as a verified cache of the store.

``sync()`` reads the store's newest snapshot and, if it is new, downloads every bundle the cache lacks, checks
its bytes against the snapshot's sha256, verifies and installs it (signature, trusted publisher, file hashes:
``Registry.add``), and only then writes the aliases — so an alias on this replica never points at a version
that is not fully installed and verified here. A bundle that fails (missing, damaged, untrusted) is refused,
logged and reported (``status()["refused"]``); aliases that point at it keep their earlier target here. The
gateway's runtime then loads and warms the new targets before it swaps them in.

Admin writes (``publish``, ``set_alias``, ``rollback``) go to the store first and are then synced at once. A
background loop (``start``) syncs every ``poll_interval_s``; store errors are retried with doubling backoff (up
to 30 s) and logged without secrets. The cache directory records which store it caches (``STORE``): a
directory holding a local registry, or another store's cache, is refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from depin_core.errors import ConfigError, DepinError, TransientError
from serving.bundle import Bundle, pack_bundle
from serving.errors import NotFound
from serving.object_store import ObjectStore
from serving.registry import Registry, Target
from serving.shared_registry import SharedRegistry, Snapshot

if TYPE_CHECKING:
    from serving.settings import GatewaySettings

log = logging.getLogger(__name__)

MARKER = "STORE"
MAX_BACKOFF_S = 30.0


class Replica:
    """``registry`` (this gateway's cache) kept in step with ``shared``; every store call runs in one
    private thread (``run``), so syncs and admin writes never interleave."""

    def __init__(self, shared: SharedRegistry, registry: Registry, *, poll_interval_s: float = 1.0) -> None:
        self.shared = shared
        self.registry = registry
        self.poll_interval_s = poll_interval_s
        self.revision: int | None = None  # the store revision applied here (None: never synced)
        self.synced_at: float | None = None  # time.monotonic() of the last successful sync
        self.error: str | None = None  # why the last sync failed (None when it succeeded)
        self.refused: dict[str, str] = {}  # "name@version" → why its bundle was not installed
        self._lock = threading.Lock()
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="depin-registry")
        self._task: asyncio.Task[None] | None = None
        self._claim_cache()

    @classmethod
    def from_settings(cls, settings: GatewaySettings, registry: Registry) -> Replica:
        """The replica of ``settings.registry_url`` in ``registry`` (this gateway's cache)."""
        return cls(
            SharedRegistry(ObjectStore.from_settings(settings)),
            registry,
            poll_interval_s=settings.poll_interval_s,
        )

    @property
    def url(self) -> str:
        return self.shared.url

    def _claim_cache(self) -> None:
        root = self.registry.root
        marker = root / MARKER
        if marker.is_file():
            cached = marker.read_text().strip()
            if cached != self.url:
                raise ConfigError(
                    f"DEPIN_GATEWAY_REGISTRY_DIR {root} is the cache of {cached}, not of {self.url}; give each "
                    "shared registry its own cache directory (an empty one fills itself from the store)"
                )
            return
        if functions := self.registry.functions():
            raise ConfigError(
                f"DEPIN_GATEWAY_REGISTRY_DIR {root} holds a local registry ({', '.join(functions[:5])}); with "
                f"DEPIN_GATEWAY_REGISTRY_URL it must be this gateway's cache of {self.url}: point it at an empty "
                "directory (publish those functions through the gateway to share them)"
            )
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.url + "\n")

    # ---- sync --------------------------------------------------------------------------------------------
    def sync(self) -> bool:
        """Bring the cache to the store's newest snapshot; True when the cache changed."""
        with self._lock:
            return self._sync()

    def _sync(self) -> bool:
        try:
            snap = self.shared.head()
            changed = self.revision != snap.revision and self._apply(snap)
        except DepinError as exc:
            self.error = str(exc)
            raise
        self.revision, self.synced_at, self.error = snap.revision, time.monotonic(), None
        return changed

    def _apply(self, snap: Snapshot) -> bool:
        changed = False
        refused: dict[str, str] = {}
        for name, fn in sorted(snap.functions.items()):
            installed = self._installed(name)
            for version, ref in fn.bundles.items():
                if version in installed:
                    continue
                try:
                    data = self.shared.fetch_bundle(name, version, ref)
                    self.registry.add(data, expect_name=name, expect_version=version, move_latest=False)
                except TransientError:
                    raise  # the store is unreachable: the whole sync is retried later
                except DepinError as exc:
                    refused[f"{name}@{version}"] = str(exc)
                    log.error("registry %s: %s@%s refused: %s", self.url, name, version, exc)
                    continue
                installed.add(version)
                changed = True
            if not installed:
                continue
            try:
                here = self.registry.aliases(name)
            except NotFound:
                here = {}
            aliases: dict[str, Target] = {}
            for alias, target in fn.state.aliases.items():
                if set(target) <= installed:
                    aliases[alias] = target
                elif alias in here and set(here[alias]) <= installed:
                    aliases[alias] = here[alias]  # its new target was refused here: keep serving the old one
            history = {a: [t for t in ts if set(t) <= installed] for a, ts in fn.state.history.items()}
            changed |= self.registry.apply_state(name, aliases, history, fn.state.added)
        self.refused = refused
        return changed

    def _installed(self, name: str) -> set[str]:
        try:
            return set(self.registry.version_ids(name))
        except NotFound:
            return set()

    # ---- admin writes (store first, then this cache) -------------------------------------------------------
    def publish(self, bundle: Bundle, *, move_latest: bool = True) -> bool:
        """Publish a bundle this cache already holds verified (``Registry.add(..., move_latest=False)``);
        True when the version is new to the shared registry."""
        m = bundle.manifest
        # the canonical packing: every gateway uploads the same bytes (so the same object) for a version
        data = pack_bundle(bundle.path)
        with self._lock:
            created = self.shared.publish(m.name, m.version, data, move_latest=move_latest)
            self._sync()
        return created

    def set_alias(self, name: str, alias: str, target: str | dict[str, float]) -> Target:
        """``SharedRegistry.set_alias``, then sync; returns the previous target."""
        with self._lock:
            previous = self.shared.set_alias(name, alias, target)
            self._sync()
        return previous

    def rollback(self, name: str, alias: str) -> Target:
        """``SharedRegistry.rollback``, then sync; returns the restored target."""
        with self._lock:
            restored = self.shared.rollback(name, alias)
            self._sync()
        return restored

    # ---- background loop ---------------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run a blocking method of this replica in its store thread."""
        return asyncio.get_running_loop().run_in_executor(self._io, lambda: fn(*args, **kwargs))

    async def start(self, on_change: Callable[[], Awaitable[Any]]) -> None:
        """Sync in the background every ``poll_interval_s``; ``on_change`` runs after a sync changed the cache."""
        self._task = asyncio.create_task(self._loop(on_change), name="depin-registry-sync")

    async def stop(self) -> None:
        """Stop the loop and the store thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._io.shutdown(wait=True, cancel_futures=True)

    async def _loop(self, on_change: Callable[[], Awaitable[Any]]) -> None:
        delay = self.poll_interval_s
        while True:
            try:
                if await self.run(self.sync):
                    await on_change()
                delay = self.poll_interval_s
            except asyncio.CancelledError:
                raise
            except DepinError as exc:
                delay = min(MAX_BACKOFF_S, max(delay * 2, self.poll_interval_s))
                log.warning("registry %s: sync failed, retrying in %.1fs: %s", self.url, delay, exc)
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                delay = min(MAX_BACKOFF_S, max(delay * 2, self.poll_interval_s))
                log.exception("registry %s: sync failed, retrying in %.1fs", self.url, delay)
            await asyncio.sleep(delay)

    # ---- state -------------------------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """What keeps the gateway from being ready: never synced ({} once synced)."""
        if self.revision is not None:
            return {}
        why = f": {self.error}" if self.error else " (first sync running)"
        return {"registry": f"not synced with {self.url} yet{why}"}

    def status(self) -> dict[str, Any]:
        """The store, the revision applied here, seconds since the last successful sync, the last error and
        refused bundles (what ``/readyz`` shows)."""
        out: dict[str, Any] = {
            "url": self.url,
            "revision": self.revision,
            "synced_age_s": None if self.synced_at is None else round(time.monotonic() - self.synced_at, 3),
        }
        if self.error:
            out["error"] = self.error
        if self.refused:
            out["refused"] = dict(self.refused)
        return out

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Expose the sync state as gauges on a gateway's metrics registry."""
        registry.register(_SyncGauges(self))


class _SyncGauges(Collector):
    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        r = self._replica
        yield GaugeMetricFamily(
            "depin_gateway_registry_revision",
            "Revision of the shared registry applied here (-1 before the first sync)",
            value=-1 if r.revision is None else r.revision,
        )
        age = math.nan if r.synced_at is None else time.monotonic() - r.synced_at
        yield GaugeMetricFamily(
            "depin_gateway_registry_sync_age_seconds",
            "Seconds since the last successful registry sync",
            value=age,
        )
        yield GaugeMetricFamily(
            "depin_gateway_registry_refused_bundles",
            "Bundles of the shared registry refused here (missing, damaged or untrusted)",
            value=len(r.refused),
        )


__all__ = ["MARKER", "Replica"]
