"""The gateway on a Fluence VM as a ``serving.targets.Target``.

``publish`` goes through :class:`serving.fluence.publisher.FluencePublisher`: the target's VM is ensured
(created, bootstrapped and ready on first use, reused afterwards) and the version is recorded in the state
file. Every other call uses the recorded deployment only — its URL, admin key and the certificate pinned in
the state directory (``DEPIN_FLUENCE_STATE_DIR``) — so invoking needs no Fluence API key.

With replicas, ``publish`` uploads to every replica (and smoke-calls each) before anything moves an alias;
``set_alias`` moves the alias on every replica; ``invoke``, ``manifest`` and ``aliases`` go to the first replica
(by number) whose ``/readyz`` answers — no load balancing. ``url`` is replica 0's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from depin_core.errors import ConfigError
from serving.bundle import FunctionManifest
from serving.fluence.replicas import probe
from serving.fluence.state import DEFAULT_STATE_DIR, Deployment, StateStore
from serving.publish import PublishResult
from serving.targets import AliasTable, GatewayTarget, smoke_invoke

if TYPE_CHECKING:
    from serving.fluence.publisher import FluencePublisher


def recorded_url(store: StateStore, target: str) -> str | None:
    """The URL of ``target``'s gateway in the state file (None before its first publish). Reads no API."""
    dep = store.get(target)
    return dep.url if dep is not None else None


def pinned_cert_for(url: str, state_dir: Path | str = DEFAULT_STATE_DIR) -> str | None:
    """The pinned certificate (PEM) of the recorded Fluence gateway (any replica) serving at ``url``, or
    None."""
    store = StateStore(state_dir)
    if not store.path.exists():
        return None
    for key, dep in store.load().deployments.items():
        if dep.url == url and dep.tls_fingerprint:
            return store.tls_cert(key)
    return None


class FluenceTarget:
    """Fluence deployment ``name`` recorded in ``store``. ``open_publisher`` makes the
    :class:`FluencePublisher` that ``publish`` uses (it needs the API key; nothing else calls it).
    ``gateway_options`` go to :class:`serving.client.GatewayClient` for the other calls."""

    def __init__(
        self,
        store: StateStore,
        name: str,
        open_publisher: Callable[[], FluencePublisher],
        **gateway_options: Any,
    ) -> None:
        self.store, self.name = store, name
        self._open_publisher = open_publisher
        self._options = gateway_options
        self._gateway: GatewayTarget | None = None
        self._replicas: dict[int, GatewayTarget] = {}

    def __repr__(self) -> str:
        return f"FluenceTarget({self.name!r}, state={str(self.store.root)!r})"

    def __enter__(self) -> FluenceTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        url = recorded_url(self.store, self.name)
        if url is None:
            raise ConfigError(
                f"Fluence target {self.name!r}: no gateway VM recorded in {self.store.path} yet; publish to "
                "it first (`depin publish --target fluence`), which creates it"
            )
        return url

    @property
    def where(self) -> str:
        return self.url

    def gateway(self) -> GatewayTarget:
        """The gateway that serves the calls: with one replica, it; with several, the first (by number) whose
        ``/readyz`` answers (replica 0 when none does, so the error names it). Its certificate is pinned."""
        if self._gateway is None:
            self.url  # noqa: B018 — raises the "publish first" error when nothing is recorded
            deps = [d for d in self.store.replicas(self.name) if d.url]
            chosen = deps[0]
            if len(deps) > 1:
                for dep in deps:
                    assert dep.url is not None
                    if probe(dep.url, self.store.pinned_cert(dep), timeout_s=3.0).ready:
                        chosen = dep
                        break
            self._gateway = self._replica(chosen)
        return self._gateway

    def _replica(self, dep: Deployment) -> GatewayTarget:
        if dep.replica not in self._replicas:
            assert dep.url is not None
            pem = self.store.pinned_cert(dep)
            self._replicas[dep.replica] = GatewayTarget(
                dep.url, admin_key=lambda: self._admin_key(dep), tls_cert_pem=pem, **self._options
            )
        return self._replicas[dep.replica]

    def replicas(self) -> list[GatewayTarget]:
        """Every recorded replica's gateway, replica 0 first."""
        return [self._replica(d) for d in self.store.replicas(self.name) if d.url]

    def _admin_key(self, dep: Deployment | None = None) -> SecretStr:
        key = self.store.admin_key(dep.key if dep is not None else self.name)
        if key is None:
            raise ConfigError(
                f"no admin key for Fluence target {self.name!r} in {self.store.root}; restore it, or run "
                f"`depin fluence down --fluence-target {self.name}` and publish again (a new gateway VM)"
            )
        return key

    def publish(self, model_dir: Path | str, name: str) -> PublishResult:
        with self._open_publisher() as fluence:
            result = fluence.publish(model_dir, name)
        self.close()  # the VMs may have been replaced (another address, another certificate)
        gateways = self.replicas()
        if len(gateways) > 1:  # every replica must answer the version before any alias moves
            for gateway in gateways:
                smoke_invoke(gateway, name, result.version)
        return result

    def manifest(self, name: str, version: str) -> FunctionManifest:
        return self.gateway().manifest(name, version)

    def invoke(
        self, ref: str, rows: list[Any] | dict[str, Any], *, request_id: str | None = None
    ) -> dict[str, Any]:
        return self.gateway().invoke(ref, rows, request_id=request_id)

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, float]:
        """Move ``alias`` on every replica; the alias's target afterwards (the first that differs from
        replica 0's, if any does)."""
        deps = [d for d in self.store.replicas(self.name) if d.url]
        if not deps:
            self.url  # noqa: B018 — raises the "publish first" error
        moved_on: list[dict[str, float]] = []
        for dep in deps:
            gateway = self._replica(dep)
            before = gateway.aliases(name).get(alias)
            moved = gateway.set_alias(name, alias, version)
            if moved != before:
                self._record_alias(dep, name, alias, version)
            moved_on.append(moved)
        return next((m for m in moved_on if m != moved_on[0]), moved_on[0])

    def aliases(self, name: str) -> AliasTable:
        return self.gateway().aliases(name)

    def details(self) -> dict[str, Any]:
        deps = self.store.replicas(self.name)
        if not deps:
            return {}
        keys = ("target", "vm_id", "vm_name", "generation", "usd_per_day")
        each = ("replica", "vm_id", "vm_name", "url", "datacenter", "country", "location", "usd_per_day")
        return {
            "fluence": {
                **{k: getattr(deps[0], k) for k in keys},
                "replicas": [{k: getattr(d, k) for k in each} for d in deps],
            }
        }

    def close(self) -> None:
        for gateway in self._replicas.values():
            gateway.close()
        self._replicas.clear()
        self._gateway = None

    def _record_alias(self, dep: Deployment, name: str, alias: str, version: str) -> None:
        """Note the moved alias on the version's record in the state file (``depin fluence status``)."""
        now = self.store.load().deployments.get(dep.key)
        item = (
            next((p for p in now.published if (p.name, p.version) == (name, version)), None) if now else None
        )
        if item is not None and alias not in item.moved:
            self.store.add_published(dep.key, item.model_copy(update={"moved": sorted({*item.moved, alias})}))


__all__ = ["FluenceTarget", "pinned_cert_for", "recorded_url"]
