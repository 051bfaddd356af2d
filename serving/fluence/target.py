"""The gateway on a Fluence VM as a ``serving.targets.Target``.

``publish`` goes through :class:`serving.fluence.publisher.FluencePublisher`: the target's VM is ensured
(created, bootstrapped and ready on first use, reused afterwards) and the version is recorded in the state
file. Every other call uses the recorded deployment only — its URL, admin key and the certificate pinned in
the state directory (``DEPIN_FLUENCE_STATE_DIR``) — so invoking needs no Fluence API key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from depin_core.errors import ConfigError
from serving.bundle import FunctionManifest
from serving.fluence.state import DEFAULT_STATE_DIR, StateStore
from serving.publish import PublishResult
from serving.targets import AliasTable, GatewayTarget

if TYPE_CHECKING:
    from serving.fluence.publisher import FluencePublisher


def recorded_url(store: StateStore, target: str) -> str | None:
    """The URL of ``target``'s gateway in the state file (None before its first publish). Reads no API."""
    dep = store.get(target)
    return dep.url if dep is not None else None


def pinned_cert_for(url: str, state_dir: Path | str = DEFAULT_STATE_DIR) -> str | None:
    """The pinned certificate (PEM) of the recorded Fluence gateway serving at ``url``, or None."""
    store = StateStore(state_dir)
    if not store.path.exists():
        return None
    for target, dep in store.load().deployments.items():
        if dep.url == url and dep.tls_fingerprint:
            return store.tls_cert(target)
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
        """The recorded gateway as a :class:`GatewayTarget`: its admin key, its certificate pinned."""
        if self._gateway is None:
            url = self.url
            dep = self.store.get(self.name)
            assert dep is not None  # self.url found its record
            pem = self.store.pinned_cert(dep)
            self._gateway = GatewayTarget(url, admin_key=self._admin_key, tls_cert_pem=pem, **self._options)
        return self._gateway

    def _admin_key(self) -> SecretStr:
        key = self.store.admin_key(self.name)
        if key is None:
            raise ConfigError(
                f"no admin key for Fluence target {self.name!r} in {self.store.root}; restore it, or run "
                f"`depin fluence down --fluence-target {self.name}` and publish again (a new gateway VM)"
            )
        return key

    def publish(self, model_dir: Path | str, name: str) -> PublishResult:
        with self._open_publisher() as fluence:
            result = fluence.publish(model_dir, name)
        self.close()  # the VM may have been replaced (another address, another certificate)
        return result

    def manifest(self, name: str, version: str) -> FunctionManifest:
        return self.gateway().manifest(name, version)

    def invoke(
        self, ref: str, rows: list[Any] | dict[str, Any], *, request_id: str | None = None
    ) -> dict[str, Any]:
        return self.gateway().invoke(ref, rows, request_id=request_id)

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, float]:
        before = self.gateway().aliases(name).get(alias)
        moved = self.gateway().set_alias(name, alias, version)
        if moved != before:
            self._record_alias(name, alias, version)
        return moved

    def aliases(self, name: str) -> AliasTable:
        return self.gateway().aliases(name)

    def details(self) -> dict[str, Any]:
        dep = self.store.get(self.name)
        if dep is None:
            return {}
        keys = ("target", "vm_id", "vm_name", "generation", "usd_per_day")
        return {"fluence": {k: getattr(dep, k) for k in keys}}

    def close(self) -> None:
        if self._gateway is not None:
            self._gateway.close()
            self._gateway = None

    def _record_alias(self, name: str, alias: str, version: str) -> None:
        """Note the moved alias on the version's record in the state file (``depin fluence status``)."""
        dep = self.store.get(self.name)
        item = (
            next((p for p in dep.published if (p.name, p.version) == (name, version)), None) if dep else None
        )
        if item is not None and alias not in item.moved:
            self.store.add_published(
                self.name, item.model_copy(update={"moved": sorted({*item.moved, alias})})
            )


__all__ = ["FluenceTarget", "pinned_cert_for", "recorded_url"]
