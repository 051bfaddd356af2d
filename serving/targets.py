"""Publish targets: where functions are published, smoke-called and aliased — one path for ``depin publish``
and the flows.

A :class:`Target` is a place that serves functions. Implementations: :class:`LocalTarget` (a registry
directory, what ``depin serve`` serves), :class:`GatewayTarget` (a gateway's admin API over HTTP(S), its
certificate optionally pinned) and ``serving.fluence.target.FluenceTarget`` (the gateway on a Fluence VM).

:func:`publish_function` is the one publishing path: publish the version (only ``latest`` moves) → invoke it
with its manifest's example (the version must answer, one output per row) → move the alias and check it
points at the version. A version whose smoke call fails never gets the alias.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, Self, TypeAlias, TypeVar, runtime_checkable

from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, SecretStr

from depin_core.errors import ConfigError, PermanentError
from serving.bundle import DEFAULT_MAX_BATCH_SIZE, FunctionManifest, parse_manifest, predictor
from serving.client import GatewayClient, invoke_body
from serving.publish import GatewayPublisher, LocalPublisher, PublishResult
from serving.registry import Registry, valid_alias

T = TypeVar("T")
Lazy: TypeAlias = T | Callable[[], T]  # a value, or how to get it when first needed (keys: read only if used)
AliasTable = dict[str, dict[str, float]]


@runtime_checkable
class Target(Protocol):
    """Where functions are published and served. Every call is idempotent; close it when done."""

    @property
    def where(self) -> str:
        """What ``PublishResult.target`` names: ``local:<registry path>`` or the gateway URL."""
        ...

    @property
    def url(self) -> str:
        """The base URL the functions are served at (``function_url`` / ``manifest_url`` build on it)."""
        ...

    def publish(self, model_dir: Path | str, name: str) -> PublishResult:
        """Build, sign, ship and verify ``model_dir`` as a version of ``name``; moves only ``latest``."""
        ...

    def manifest(self, name: str, version: str) -> FunctionManifest:
        """The manifest of ``name``@``version`` as the target serves it."""
        ...

    def invoke(
        self, ref: str, rows: list[Any] | dict[str, Any], *, request_id: str | None = None
    ) -> dict[str, Any]:
        """Call ``ref`` (name, name@alias, name@version) with engineered rows or a request body of one form
        (``{"telemetry": …}``, ``{"plan": …}``): ``{"function", "version", "outputs", …form notes}``."""
        ...

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, float]:
        """Point ``alias`` at ``version``; returns the alias's target afterwards."""
        ...

    def aliases(self, name: str) -> AliasTable:
        """The alias table of ``name``: alias → {version: weight}."""
        ...

    def details(self) -> dict[str, Any]:
        """What else ``depin publish --json`` reports about the deployment (Fluence: the VM); often ``{}``."""
        ...

    def close(self) -> None:
        """Release connections (the target is not used afterwards)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def function_url(target: Target, ref: str) -> str:
    """The invoke URL of ``ref`` (``name@alias`` or ``name@version``) on ``target``."""
    return f"{target.url}/v1/functions/{ref}/invoke"


def manifest_url(target: Target, name: str, version: str) -> str:
    """The URL of ``name``@``version``'s signed ``manifest.json`` on ``target``."""
    return f"{target.url}/v1/functions/{name}/versions/{version}/manifest.json"


def _get(value: Lazy[T]) -> T:
    return value() if callable(value) else value


class _Closing:
    def details(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- local


class LocalTarget(_Closing):
    """The registry directory ``root`` (a gateway serving it at ``url`` picks changes up by polling).

    ``invoke`` loads the version as stored — re-verified, any valid signer — like the gateway loads it,
    without going through a gateway; ``account`` (or how to load it) signs what ``publish`` builds."""

    def __init__(
        self,
        root: Path | str,
        account: Lazy[LocalAccount] | None = None,
        *,
        url: str = "http://127.0.0.1:8787",
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        self.root = Path(root)
        self._account = account
        self._url = url.rstrip("/")
        self.max_batch_size = max_batch_size
        self.registry = Registry(self.root, trusted=None)

    def __repr__(self) -> str:
        return f"LocalTarget({str(self.root)!r})"

    @property
    def where(self) -> str:
        return f"local:{self.root.resolve()}"

    @property
    def url(self) -> str:
        return self._url

    def publish(self, model_dir: Path | str, name: str) -> PublishResult:
        if self._account is None:
            raise ConfigError("publishing needs the publisher key (DEPIN_PUBLISHER_KEY)")
        pub = LocalPublisher(self.root, _get(self._account), max_batch_size=self.max_batch_size)
        return pub.publish(model_dir, name)

    def manifest(self, name: str, version: str) -> FunctionManifest:
        return self.registry.bundle(name, version).manifest

    def invoke(
        self, ref: str, rows: list[Any] | dict[str, Any], *, request_id: str | None = None
    ) -> dict[str, Any]:
        name, _, selector = ref.partition("@")
        version = self.registry.resolve(name, selector or None, request_key=request_id)
        answer = predictor(self.registry.bundle(name, version)).invoke(invoke_body(rows))
        return {"function": name, "version": version, **answer}

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, float]:
        self.registry.set_alias(name, alias, version)
        return self.registry.aliases(name).get(alias, {})

    def aliases(self, name: str) -> AliasTable:
        return self.registry.aliases(name)


# ---------------------------------------------------------------------------------------------- gateway


class GatewayTarget(_Closing):
    """A gateway at ``base_url``: public calls (invoke, manifests, aliases) without the admin key; publish
    and alias moves through its admin API with ``admin_key`` (read when first needed).

    ``tls_cert_pem``: the gateway's certificate, pinned. ``insecure_http``: public calls may reach a remote
    plain-HTTP gateway. ``client_options`` go to :class:`serving.client.GatewayClient` (retries, timeout, …)."""

    def __init__(
        self,
        base_url: str,
        account: Lazy[LocalAccount] | None = None,
        *,
        admin_key: Lazy[SecretStr] | None = None,
        tls_cert_pem: str | None = None,
        insecure_http: bool = False,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        **client_options: Any,
    ) -> None:
        self.client = GatewayClient(
            base_url, tls_cert_pem=tls_cert_pem, insecure_http=insecure_http, **client_options
        )
        self._account, self._admin_key = account, admin_key
        self._pin, self._options = tls_cert_pem, client_options
        self.max_batch_size = max_batch_size
        self._publisher: GatewayPublisher | None = None
        self._admin: GatewayClient | None = None

    def __repr__(self) -> str:
        return f"GatewayTarget({self.url!r})"

    @property
    def where(self) -> str:
        return self.client.base_url

    @property
    def url(self) -> str:
        return self.client.base_url

    def _key(self) -> SecretStr:
        if self._admin_key is None:
            raise ConfigError(
                f"{self.url}: this needs the gateway's admin key (--admin-key-file FILE or DEPIN_ADMIN_KEY)"
            )
        return _get(self._admin_key)

    def publisher(self) -> GatewayPublisher:
        """The admin side: a :class:`GatewayPublisher` with the admin key and the publisher account."""
        if self._publisher is None:
            if self._account is None:
                raise ConfigError("publishing needs the publisher key (DEPIN_PUBLISHER_KEY)")
            self._publisher = GatewayPublisher(
                self.url,
                self._key(),
                _get(self._account),
                max_batch_size=self.max_batch_size,
                tls_cert_pem=self._pin,
                **self._options,
            )
        return self._publisher

    def admin(self) -> GatewayClient:
        """A client holding the admin key (alias moves)."""
        if self._publisher is not None:
            return self._publisher.client
        if self._admin is None:
            self._admin = GatewayClient(
                self.url, admin_key=self._key(), tls_cert_pem=self._pin, **self._options
            )
        return self._admin

    def publish(self, model_dir: Path | str, name: str) -> PublishResult:
        return self.publisher().publish(model_dir, name)

    def manifest(self, name: str, version: str) -> FunctionManifest:
        return parse_manifest(self.client.manifest_bytes(name, version), where=f"{self.url}: ")

    def invoke(
        self, ref: str, rows: list[Any] | dict[str, Any], *, request_id: str | None = None
    ) -> dict[str, Any]:
        doc, _ = self.client.invoke(ref, rows, request_id=request_id)
        return doc

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, float]:
        return self.admin().set_alias(name, alias, version).get("target") or {}

    def aliases(self, name: str) -> AliasTable:
        return self.client.function(name).get("aliases") or {}

    def close(self) -> None:
        for client in (self._publisher, self._admin, self.client):
            if client is not None:
                client.close()


# ---------------------------------------------------------------------------------------------- the path


class PublishedFunction(BaseModel):
    """What :func:`publish_function` did: ``result`` as the version was published, with ``aliases`` and
    ``moved`` as they are after the alias move; the smoke call's size and first outputs; the URLs."""

    model_config = ConfigDict(frozen=True)

    result: PublishResult
    alias: str | None
    smoke_inputs: int
    smoke_outputs: list[dict[str, Any]]
    function_url: str
    manifest_url: str


def smoke_invoke(target: Target, name: str, version: str) -> tuple[int, list[dict[str, Any]]]:
    """Invoke ``name``@``version`` with its manifest's example: (rows sent, outputs). ``PermanentError``
    when another version answers or the outputs do not match the rows one to one."""
    example = list(target.manifest(name, version).example)
    try:
        doc = target.invoke(f"{name}@{version}", example)
    except PermanentError as exc:
        raise PermanentError(f"{target.where}: smoke call of {name}@{version} failed: {exc}") from exc
    if doc.get("version") != version:
        raise PermanentError(
            f"{target.where}: smoke call of {name}@{version} was answered by version {doc.get('version')}"
        )
    outputs = list(doc.get("outputs") or [])
    if len(outputs) != len(example):
        raise PermanentError(
            f"smoke call of {name}@{version}: {len(example)} example rows gave {len(outputs)} outputs"
        )
    return len(example), outputs


def move_alias(target: Target, name: str, alias: str | None, version: str) -> AliasTable:
    """Point ``alias`` (None: none) at ``version`` and check it does; returns the alias table."""
    if alias is not None:
        moved = target.set_alias(name, alias, version)
        if moved != {version: 1.0}:
            raise PermanentError(
                f"{target.where}: alias {alias} of {name} points at {moved}, not {version}; another publisher "
                "moved it meanwhile — check and retry"
            )
    return target.aliases(name)


def published_function(
    target: Target,
    published: PublishResult,
    alias: str | None,
    smoke: tuple[int, list[dict[str, Any]]],
    aliases: AliasTable,
) -> PublishedFunction:
    """Put the three steps' results together (the flow runs them as separate tasks)."""
    version = published.version
    moved = set(published.moved)
    now = {version: 1.0}
    if alias is not None and aliases.get(alias) == now and published.aliases.get(alias) != now:
        moved.add(alias)  # the alias move of this call (``latest`` was moved by the publish itself)
    return PublishedFunction(
        result=published.model_copy(update={"aliases": aliases, "moved": sorted(moved)}),
        alias=alias,
        smoke_inputs=smoke[0],
        smoke_outputs=smoke[1][:5],
        function_url=function_url(target, f"{published.name}@{alias or version}"),
        manifest_url=manifest_url(target, published.name, version),
    )


def publish_function(
    target: Target, model_dir: Path | str, name: str, alias: str | None = None
) -> PublishedFunction:
    """Publish ``model_dir`` as ``name`` on ``target`` → smoke-call the new version with its example → move
    ``alias`` to it. A failed smoke call raises and leaves the alias where it was."""
    if alias is not None:
        valid_alias(alias)
    published = target.publish(model_dir, name)
    try:
        smoke = smoke_invoke(target, name, published.version)
    except PermanentError as exc:
        kept = f"alias {alias} was not moved" if alias else "no alias was moved"
        raise PermanentError(f"{exc} — {kept}") from exc
    aliases = move_alias(target, name, alias, published.version)
    return published_function(target, published, alias, smoke, aliases)


__all__ = [
    "GatewayTarget",
    "LocalTarget",
    "PublishedFunction",
    "Target",
    "function_url",
    "manifest_url",
    "move_alias",
    "publish_function",
    "published_function",
    "smoke_invoke",
]
