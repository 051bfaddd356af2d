"""The function gateway: a Starlette app serving the registry's functions over HTTP/JSON.

Routes (errors are ``{"error": {"code", "message", "field"?}}``, never a 5xx for bad input):

- ``POST /v1/functions/{ref}/invoke`` — ``ref`` = ``name``, ``name@alias`` or ``name@version``; body
  ``{"inputs": [row, …]}`` (engineered features) or another form the function's family accepts (e.g.
  ``{"telemetry": [row, …]}``, raw DIMO telemetry; ``{"plan": {…}}``), derived into rows by the family's own
  feature code off the event loop → ``{"function", "version", "outputs": [row, …], …form notes}`` +
  ``X-Depin-Version``. ``X-Request-Id`` keys sticky weighted splits.
- ``GET /v1/functions``, ``GET /v1/functions/{name}``, ``GET /v1/functions/{name}/versions/{version}``
  (manifest + signature; ``…/manifest.json`` and ``…/signature.json`` give the exact signed bytes).
- Admin (header ``X-API-Key``): ``PUT /v1/functions/{name}/versions/{version}`` (body = packed bundle),
  ``PUT /v1/functions/{name}/aliases/{alias}`` (``{"version": v}`` or ``{"weights": {v: w}}``),
  ``POST /v1/functions/{name}/aliases/{alias}/rollback``. Each returns once the change is served.
- ``/healthz``, ``/readyz`` (200 when every aliased version is loaded and warm), ``/metrics``,
  ``/openapi.json``.

With ``registry_url`` (a registry on object storage shared by several gateways, ``serving.replica``), the
local registry is this gateway's verified cache of it: admin writes go to the store first, changes made
through other gateways arrive by a background sync, and ``/readyz`` also waits for the first sync (its body's
``registry`` shows the revision applied here and the seconds since the last sync).

The invoke path reads only memory (the routing table, see ``serving._runtime``), decodes with orjson,
validates with the function's predictor, and awaits the version's dynamic batcher; the model runs in one
dedicated inference thread under ``torch.inference_mode()`` — except a lone request on an idle model whose
batches take ≤ ``inline_max_ms``, which runs on the loop (cheaper than the thread hop; see ``serving.batching``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from depin_core.errors import DepinError, TransientError
from depin_core.names import function_name_error
from gpu_jobs.errors import InvalidInput
from serving._auth import AdminKeys
from serving._http import (
    JSON,
    answer,
    error_response,
    json_response,
    parse_json,
    read_body,
    retry_after_header,
)
from serving._metrics import CONTENT_TYPE, UNKNOWN, GatewayMetrics
from serving._openapi import build_openapi
from serving._runtime import (
    FunctionRoute,
    LoadedVersion,
    LoadPredictor,
    Runtime,
    default_load_predictor,
    forms_of,
)
from serving.batching import row_count
from serving.errors import (
    BundleError,
    DeadlineExceeded,
    GatewayHttpError,
    InvalidTarget,
    LoadFailed,
    NoHistory,
    NotFound,
    Overloaded,
    UntrustedPublisher,
)
from serving.registry import (
    NAME_RE,
    VERSION_RE,
    Registry,
    normalise_weights,
    valid_alias,
)
from serving.settings import GatewaySettings

if TYPE_CHECKING:
    from gpu_jobs.models.base import Derived
    from gpu_jobs.models.online import Predictor
    from serving.replica import Replica

log = logging.getLogger(__name__)

_ADMIN_BODY_LIMIT = 64 * 1024
_NOT_FOUND_FIELD = {"function": "name", "alias": "alias", "version": "version"}


def _not_found(exc: NotFound, field: str | None = None) -> GatewayHttpError:
    kind = exc.kind if exc.kind in _NOT_FOUND_FIELD else "version"
    return GatewayHttpError(404, f"{kind}_not_found", str(exc), field=field or _NOT_FOUND_FIELD[kind])


def configure_torch(settings: GatewaySettings) -> int:
    """Set torch's CPU threads for this process (``torch_threads``, else ``DEPIN_TORCH_THREADS``, else 1)."""
    import torch

    from gpu_jobs.device import cpu_threads

    threads = settings.torch_threads or cpu_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable only before the first inter-op parallel work
        torch.set_num_interop_threads(threads)
    return threads


class Gateway:
    """One gateway: settings, registry, runtime (loaded models + routing table), metrics and the ASGI app.

    ``gateway.app`` is the Starlette application (its lifespan starts and stops the runtime);
    ``async with gateway.running():`` does the same without a server (tests).
    """

    def __init__(
        self,
        settings: GatewaySettings | None = None,
        *,
        registry: Registry | None = None,
        load_predictor: LoadPredictor = default_load_predictor,
    ) -> None:
        self.settings = settings or GatewaySettings()
        self.registry = registry or Registry(
            self.settings.registry_dir,
            trusted=self.settings.trusted(),
            max_bundle_bytes=self.settings.max_upload_bytes,
        )
        self.admin = AdminKeys(self.settings.admin_digests())
        self.metrics = GatewayMetrics(self._queue_state, self._ready)
        self.replica: Replica | None = None
        if self.settings.registry_url:
            from serving.replica import Replica

            self.replica = Replica.from_settings(self.settings, self.registry)
            self.replica.register_metrics(self.metrics.registry)
        self.runtime = Runtime(self.settings, self.registry, self.metrics, load_predictor=load_predictor)
        self._admin_lock: Any = None
        self._openapi: tuple[object, bytes] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/functions/{ref}/invoke", self.invoke, methods=["POST"]),
                Route("/v1/functions", self.list_functions, methods=["GET"]),
                Route("/v1/functions/{name}", self.get_function, methods=["GET"]),
                Route("/v1/functions/{name}/versions/{version}", self.version, methods=["GET", "PUT"]),
                Route(
                    "/v1/functions/{name}/versions/{version}/manifest.json",
                    self.raw_manifest,
                    methods=["GET"],
                ),
                Route(
                    "/v1/functions/{name}/versions/{version}/signature.json",
                    self.raw_signature,
                    methods=["GET"],
                ),
                Route("/v1/functions/{name}/aliases/{alias}", self.put_alias, methods=["PUT"]),
                Route("/v1/functions/{name}/aliases/{alias}/rollback", self.rollback, methods=["POST"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
            ],
            exception_handlers={
                GatewayHttpError: self._api_error,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
            lifespan=self._lifespan,
        )
        self.app.state.gateway = self

    # ---- lifecycle ---------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Start the runtime (threads, registry polling, model loading) and stop it on exit."""
        import asyncio

        self._admin_lock = asyncio.Lock()
        configure_torch(self.settings)
        await self.runtime.start()
        if self.replica is not None:
            await self.replica.start(self.runtime.refresh)
        try:
            yield self
        finally:
            if self.replica is not None:
                await self.replica.stop()
            await self.runtime.stop()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with self.running():
            yield

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until ``/readyz`` would answer 200 (``TimeoutError`` naming the problems otherwise)."""
        import asyncio

        end = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > end:
                raise TimeoutError(f"gateway not ready after {timeout:.0f}s: {self._problems()}")
            await asyncio.sleep(0.02)

    def _queue_state(self) -> Any:
        return self.runtime.queue_state()

    def _problems(self) -> dict[str, str]:
        shared = self.replica.problems() if self.replica is not None else {}
        return {**shared, **self.runtime.problems()}

    def _ready(self) -> bool:
        return self.runtime.ready() and (self.replica is None or not self.replica.problems())

    # ---- errors ------------------------------------------------------------------------------------------
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayHttpError)
        return answer(exc)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, message, headers=exc.headers)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("gateway: %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the gateway log")

    def _unknown_function(self, name: str) -> GatewayHttpError:
        if not self.runtime.initialized:
            return GatewayHttpError(
                503,
                "loading",
                "the gateway is loading its functions; retry shortly",
                headers=retry_after_header(1),
            )
        known = sorted(self.runtime.table.functions)
        shown = ", ".join(known[:20]) + (" …" if len(known) > 20 else "") if known else "none yet"
        return GatewayHttpError(
            404, "function_not_found", f"function {name[:100]!r} not found; available: {shown}", field="name"
        )

    def _route(self, name: str) -> FunctionRoute:
        route = self.runtime.route(name)
        if route is None:
            raise self._unknown_function(name)
        return route

    # ---- invoke (the hot path) ---------------------------------------------------------------------------
    async def invoke(self, request: Request) -> Response:
        t0 = time.perf_counter()
        runtime = self.runtime
        name, sep, selector = request.path_params["ref"].partition("@")
        fn_label, version = UNKNOWN, ""
        n = 0
        try:
            if runtime.route(name) is None:
                raise self._unknown_function(name)
            fn_label = name
            if sep and not selector:
                raise GatewayHttpError(
                    404,
                    "alias_not_found",
                    "nothing after '@'; use name, name@alias or name@version",
                    field="ref",
                )
            doc = parse_json(await read_body(request, self.settings.max_body_bytes))
            key, inputs = _body(doc)
            n = len(inputs) if key == "inputs" else 0
            derived: Derived | None = None
            derived_by: Predictor | None = None
            headers = request.headers
            deadline = time.monotonic() + self.settings.request_timeout_s
            request_id = headers.get("x-request-id")
            if request_id is not None and len(request_id) > 200:
                raise GatewayHttpError(
                    400, "bad_header", "X-Request-Id is longer than 200 chars", field="X-Request-Id"
                )
            for attempt in (0, 1):
                route = self._route(name)  # re-read: the table may have been swapped while the body arrived
                version = runtime.pick(route, selector or None, request_id)
                lv = runtime.get_loaded(name, version)
                if lv is None:  # name@version of a version no alias points to: load it on first use
                    lv = await runtime.ensure_loaded(name, version)
                    runtime.evict_unaliased()
                lv.last_used = t0
                if key != "inputs" and derived_by is not lv.predictor:
                    derived = await self._derive(lv, key, inputs)
                    derived_by = lv.predictor
                    n = row_count(derived.cols)
                if n > lv.max_rows:
                    what = "rows" if key == "inputs" else f"trips/windows in the {key}"
                    raise GatewayHttpError(
                        413,
                        "too_many_rows",
                        f"{n} {what} exceed max_batch_size {lv.max_rows} of {name}@{version}; send at most "
                        f"{lv.max_rows} per request",
                        field=key,
                    )
                if derived is not None:
                    cols = derived.cols
                else:
                    try:
                        cols = lv.predictor.columns(inputs)
                    except InvalidInput as exc:
                        raise GatewayHttpError(422, "invalid_input", str(exc), field=exc.field) from None
                    except Exception as exc:  # a validation bug must still not become a 5xx for bad input
                        log.warning("gateway: validating inputs of %s@%s raised %r", name, version, exc)
                        raise GatewayHttpError(
                            422,
                            "invalid_input",
                            f"inputs could not be read ({type(exc).__name__})",
                            field="inputs",
                        ) from None
                try:
                    rows = await lv.batcher.submit(cols, deadline=deadline)
                    break
                except Overloaded as exc:
                    if exc.draining and attempt == 0:
                        continue  # the version was unloaded by a hot swap meanwhile: resolve again
                    code = "draining" if exc.draining else "overloaded"
                    raise GatewayHttpError(
                        exc.status, code, str(exc), headers=retry_after_header(exc.retry_after)
                    ) from None
                except DeadlineExceeded as exc:
                    raise GatewayHttpError(504, "deadline_exceeded", str(exc)) from None
        except GatewayHttpError as exc:
            self.metrics.request(fn_label, version, exc.status, time.perf_counter() - t0)
            return answer(exc)
        except NotFound as exc:
            self.metrics.request(fn_label, "", 404, time.perf_counter() - t0)
            return answer(_not_found(exc, "ref"))
        except ClientDisconnect:  # the client went away while sending the body: nobody to answer
            self.metrics.request(fn_label, version, 499, time.perf_counter() - t0)
            return Response(status_code=499)
        except LoadFailed as exc:
            self.metrics.request(fn_label, version, 503, time.perf_counter() - t0)
            return error_response(503, "not_loaded", str(exc), headers=retry_after_header(1))
        except Exception as exc:
            log.error("gateway: invoking %s@%s failed", name, version, exc_info=exc)
            self.metrics.request(fn_label, version, 500, time.perf_counter() - t0)
            return error_response(
                500, "inference_failed", f"the model failed ({type(exc).__name__}); see the log"
            )
        body: dict[str, Any] = {"function": name, "version": version, "outputs": rows}
        if derived is not None and derived_by is not None:
            body["outputs"] = derived_by.attach(key, rows, derived)
            body.update(derived.notes)
        content = orjson.dumps(body)
        self.metrics.request(name, version, 200, time.perf_counter() - t0)
        return Response(content, headers={"X-Depin-Version": version}, media_type=JSON)

    async def _derive(self, lv: LoadedVersion, key: str, value: Any) -> Derived:
        """Another request form → the row model's columns, in the runtime's prep thread (feature code)."""
        pred = lv.predictor
        forms = forms_of(pred)
        if key not in forms:
            accepted = " or ".join(f'{{"{k}": …}}' for k in ("inputs", *forms))
            raise GatewayHttpError(
                422,
                "invalid_input",
                f"unexpected field {key[:40]!r}; {lv.name} accepts {accepted} (forms and working examples: "
                "GET /openapi.json)",
                field=key[:100],
            )
        try:
            return await self.runtime.derive(pred, key, value)
        except InvalidInput as exc:
            raise GatewayHttpError(422, "invalid_input", str(exc), field=exc.field) from None
        except Exception as exc:  # a feature-code bug must still not become a 5xx for bad input
            log.warning("gateway: deriving %s of %s@%s raised %r", key, lv.name, lv.version, exc)
            raise GatewayHttpError(
                422, "invalid_input", f"{key} could not be read ({type(exc).__name__})", field=key
            ) from None

    # ---- read-only endpoints -----------------------------------------------------------------------------
    async def list_functions(self, request: Request) -> Response:
        out = []
        for name, route in sorted(self.runtime.table.functions.items()):
            out.append(
                {
                    "name": name,
                    "latest": _latest(route),
                    "aliases": route.info.aliases,
                    "versions": list(route.info.versions),
                }
            )
        return json_response({"functions": out})

    async def get_function(self, request: Request) -> Response:
        name = request.path_params["name"]
        route = self._route(name)
        latest = _latest(route)
        info = route.info.versions.get(latest) if latest else None
        versions = [
            {
                "version": v,
                "family": i.manifest["family"],
                "created_at": i.manifest["created_at"],
                "publisher": i.bundle.publisher,
                "max_batch_size": i.manifest["max_batch_size"],
                "loaded": self.runtime.get_loaded(name, v) is not None,
            }
            for v, i in route.info.versions.items()
        ]
        return json_response(
            {
                "name": name,
                "latest": latest,
                "aliases": route.info.aliases,
                "serving": route.routes,
                "versions": versions,
                "manifest": info.manifest if info else None,
                "signature": info.signature if info else None,
            }
        )

    def _version_info(self, request: Request) -> Any:
        name, version = request.path_params["name"], request.path_params["version"]
        route = self._route(name)
        info = route.info.versions.get(version)
        if info is None:
            raise GatewayHttpError(
                404,
                "version_not_found",
                f"version {version[:40]!r} of function {name!r} not found; available: "
                f"{', '.join(route.info.versions) or 'none'}",
                field="version",
            )
        return info

    async def version(self, request: Request) -> Response:
        if request.method == "PUT":
            return await self.put_version(request)
        return await self.get_version(request)

    async def get_version(self, request: Request) -> Response:
        info = self._version_info(request)
        name = request.path_params["name"]
        return json_response(
            {
                "function": name,
                "version": info.version,
                "manifest": info.manifest,
                "signature": info.signature,
                "loaded": self.runtime.get_loaded(name, info.version) is not None,
            }
        )

    async def raw_manifest(self, request: Request) -> Response:
        return await self._raw(request, "manifest.json")

    async def raw_signature(self, request: Request) -> Response:
        return await self._raw(request, "signature.json")

    async def _raw(self, request: Request, filename: str) -> Response:
        info = self._version_info(request)
        data = await self.runtime.in_loader((info.bundle.path / filename).read_bytes)
        return Response(data, media_type=JSON)

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        runtime = self.runtime
        table = runtime.table
        problems = self._problems()
        body: dict[str, Any] = {"status": "not_ready" if problems else "ready", "revision": table.revision}
        if self.replica is not None:
            body["registry"] = self.replica.status()
        if problems:
            body["problems"] = problems
        else:
            body["functions"] = {name: route.routes for name, route in table.functions.items()}
        if table.warnings:  # versions no alias points to that cannot be served (do not affect readiness)
            body["warnings"] = table.warnings
        if problems:
            return json_response(body, 503, retry_after_header(1))
        return json_response(body)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        table = self.runtime.table
        if self._openapi is None or self._openapi[0] is not table:
            self._openapi = (table, orjson.dumps(build_openapi(table, forms=self._forms)))
        return Response(self._openapi[1], media_type=JSON)

    def _forms(self, name: str, version: str) -> dict[str, Any]:
        lv = self.runtime.get_loaded(name, version)
        return forms_of(lv.predictor) if lv is not None else {}

    # ---- admin -------------------------------------------------------------------------------------------
    def _check_admin(self, request: Request) -> None:
        key = request.headers.get("x-api-key")
        if not key:
            raise GatewayHttpError(
                401,
                "unauthorized",
                "this is an admin endpoint: send the admin API key in the X-API-Key header",
                field="X-API-Key",
                headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
            )
        if not self.admin.enabled:
            raise GatewayHttpError(
                403,
                "admin_disabled",
                "the admin API is disabled: no admin key is configured (set DEPIN_GATEWAY_ADMIN_KEY_HASHES or "
                "DEPIN_GATEWAY_ADMIN_KEYS_FILE on the gateway)",
                field="X-API-Key",
            )
        if not self.admin.check(key):
            raise GatewayHttpError(
                403, "forbidden", "the X-API-Key is not an admin key of this gateway", field="X-API-Key"
            )

    async def put_version(self, request: Request) -> Response:
        self._check_admin(request)
        name, version = request.path_params["name"], request.path_params["version"]
        if not NAME_RE.fullmatch(name):
            raise GatewayHttpError(
                422,
                "invalid_name",
                function_name_error(name),
                field="name",
            )
        if not VERSION_RE.fullmatch(version):
            raise GatewayHttpError(
                422,
                "invalid_version",
                "a version is 16 lowercase hex chars (the content hash)",
                field="version",
            )
        data = await read_body(request, self.settings.max_upload_bytes)
        if not data:
            raise GatewayHttpError(
                422, "invalid_bundle", "the body is empty; send the packed bundle (tar)", field="body"
            )
        runtime = self.runtime
        async with self._admin_lock:
            await self._sync_replica()
            route = runtime.route(name)
            existed = route is not None and version in route.info.versions
            try:
                bundle = await runtime.in_loader(
                    self.registry.add,
                    data,
                    expect_name=name,
                    expect_version=version,
                    move_latest=self.replica is None,  # a replica's aliases come from the store
                )
            except BundleError as exc:
                untrusted = isinstance(exc, UntrustedPublisher)
                raise GatewayHttpError(
                    403 if untrusted else 422,
                    "untrusted_publisher" if untrusted else "invalid_bundle",
                    _strip_paths(str(exc)),
                    field="body",
                ) from None
            failure = None
            if self.replica is not None:
                created, failure = await self._publish_shared(bundle)
                existed = not created
            await runtime.refresh(force=True)
            if runtime.get_loaded(name, version) is None:
                reason = failure or runtime.table.problems.get(f"{name}@latest", "it failed to load")
                if not existed and self.replica is None:
                    with contextlib.suppress(NoHistory, NotFound):
                        await runtime.in_loader(self.registry.rollback, name, "latest")
                    await runtime.refresh(force=True)
                raise GatewayHttpError(
                    422,
                    "load_failed",
                    f"{name}@{version} was stored but cannot be served: {reason}",
                    field="body",
                )
        route = self._route(name)
        return json_response(
            {
                "function": name,
                "version": version,
                "publisher": bundle.publisher,
                "created": not existed,
                "aliases": route.info.aliases,
            },
            200 if existed else 201,
        )

    async def _sync_replica(self) -> None:
        """With a shared registry: catch up with the store before an admin change (503 if unreachable)."""
        if self.replica is not None and await self._shared(self.replica.sync):
            await self.runtime.refresh()

    async def _shared(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a replica method in its store thread; an unreachable store is a 503 naming it."""
        assert self.replica is not None
        try:
            return await self.replica.run(fn, *args, **kwargs)
        except TransientError as exc:
            raise GatewayHttpError(
                503, "registry_unavailable", str(exc), headers=retry_after_header(2)
            ) from None
        except (NotFound, InvalidTarget, NoHistory):
            raise
        except DepinError as exc:
            raise GatewayHttpError(502, "registry_error", str(exc)) from None

    async def _publish_shared(self, bundle: Any) -> tuple[bool, str | None]:
        """Load and warm a version installed in this cache, then publish it to the shared registry, moving
        ``latest`` only if it loaded (otherwise it is stored but not served, as on a local registry). Returns
        (new to the shared registry, why it failed to load or None)."""
        assert self.replica is not None
        await self.runtime.refresh(force=True)  # the version is installed here, no alias points at it yet
        failure = None
        try:
            await self.runtime.ensure_loaded(bundle.manifest.name, bundle.manifest.version)
        except LoadFailed as exc:
            failure = str(exc)
        created = await self._shared(self.replica.publish, bundle, move_latest=failure is None)
        return bool(created), failure

    def _target_versions(self, route: FunctionRoute, doc: Any) -> tuple[str | dict[str, float], list[str]]:
        """The alias target in a PUT body and the versions it names (checked against the routing table)."""
        if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in ("version", "weights"):
            raise GatewayHttpError(
                422,
                "invalid_target",
                'send {"version": "<16 hex chars or another alias>"} or {"weights": {"<version>": weight, …}}',
                field="body",
            )
        info = route.info
        if "version" in doc:
            target = doc["version"]
            if not isinstance(target, str):
                raise GatewayHttpError(
                    422, "invalid_target", "version must be a string (16 hex chars)", field="version"
                )
            if VERSION_RE.fullmatch(target) and target in info.versions:
                return target, [target]
            if target in info.aliases and not VERSION_RE.fullmatch(target):
                return target, list(info.aliases[target])
            raise GatewayHttpError(
                404,
                "version_not_found",
                f"{target[:40]!r} is neither a version nor an alias of {info.name!r}; versions: "
                f"{', '.join(info.versions) or 'none'}",
                field="version",
            )
        try:
            weights = normalise_weights(doc["weights"])
        except InvalidTarget as exc:
            raise GatewayHttpError(422, "invalid_target", str(exc), field=exc.field) from None
        for v in weights:
            if v not in info.versions:
                raise GatewayHttpError(
                    404, "version_not_found", f"version {v} of {info.name!r} not found", field=f"weights.{v}"
                )
        return weights, list(weights)

    async def _preload(self, name: str, versions: list[str]) -> None:
        for v in versions:
            try:
                await self.runtime.ensure_loaded(name, v)
            except LoadFailed as exc:
                raise GatewayHttpError(422, "load_failed", str(exc), field="version") from None

    async def put_alias(self, request: Request) -> Response:
        self._check_admin(request)
        name, alias = request.path_params["name"], request.path_params["alias"]
        try:
            valid_alias(alias)
        except InvalidTarget as exc:
            raise GatewayHttpError(422, "invalid_alias", str(exc), field="alias") from None
        await self._sync_replica()
        self._route(name)
        doc = parse_json(await read_body(request, _ADMIN_BODY_LIMIT))
        async with self._admin_lock:
            target, versions = self._target_versions(self._route(name), doc)
            await self._preload(name, versions)  # load + warm before the alias moves
            try:
                if self.replica is not None:
                    previous = await self._shared(self.replica.set_alias, name, alias, target)
                else:
                    previous = await self.runtime.in_loader(self.registry.set_alias, name, alias, target)
            except InvalidTarget as exc:
                raise GatewayHttpError(422, "invalid_target", str(exc), field=exc.field) from None
            except NotFound as exc:
                raise _not_found(exc) from None
            await self.runtime.refresh(force=True)
        served = self._route(name).routes.get(alias)
        return json_response({"function": name, "alias": alias, "target": served, "previous": previous})

    async def rollback(self, request: Request) -> Response:
        self._check_admin(request)
        name, alias = request.path_params["name"], request.path_params["alias"]
        async with self._admin_lock:
            await self._sync_replica()
            route = self._route(name)
            if alias not in route.info.aliases:
                raise GatewayHttpError(
                    404,
                    "alias_not_found",
                    f"alias {alias[:40]!r} of {name!r} not found; aliases: "
                    f"{', '.join(route.info.aliases) or 'none'}",
                    field="alias",
                )
            history = await self.runtime.in_loader(self.registry.history, name, alias)
            if not history:
                raise GatewayHttpError(
                    409, "no_history", f"{name}@{alias} has no earlier target to roll back to", field="alias"
                )
            await self._preload(name, list(history[-1]))
            try:
                if self.replica is not None:
                    restored = await self._shared(self.replica.rollback, name, alias)
                else:
                    restored = await self.runtime.in_loader(self.registry.rollback, name, alias)
            except NoHistory as exc:
                raise GatewayHttpError(409, "no_history", str(exc), field="alias") from None
            await self.runtime.refresh(force=True)
        return json_response({"function": name, "alias": alias, "target": restored})


_FORMS_TEXT = (
    '{"inputs": [row, …]} (engineered features), {"telemetry": [row, …]} (raw DIMO telemetry rows) or '
    '{"plan": {"km": …}} (range); GET /openapi.json shows each function\'s forms with working examples'
)


def _body(doc: Any) -> tuple[str, Any]:
    """(form, value) of an invoke body: an object with exactly one field (shape only: the predictor validates
    ``inputs`` rows, the family derives the other forms)."""
    if not isinstance(doc, dict):
        raise GatewayHttpError(
            422, "invalid_input", f"the body must be a JSON object; send {_FORMS_TEXT}", field="body"
        )
    if not doc:
        raise GatewayHttpError(422, "invalid_input", f"missing; send {_FORMS_TEXT}", field="inputs")
    key = "inputs" if "inputs" in doc else next(iter(doc))
    if len(doc) != 1:
        extra = sorted(k for k in doc if k != key)[0]
        raise GatewayHttpError(
            422,
            "invalid_input",
            f"unexpected field {extra[:40]!r}; send one input form only: {_FORMS_TEXT}",
            field=extra[:100],
        )
    value = doc[key]
    if key == "inputs":
        if not isinstance(value, list):
            raise GatewayHttpError(
                422,
                "invalid_input",
                'inputs must be an array of row objects, e.g. {"inputs": [{"km": 12.5, …}]} (the function\'s '
                "example: GET /v1/functions/<name>, manifest.example)",
                field="inputs",
            )
        if not value:
            raise GatewayHttpError(
                422, "invalid_input", "inputs is empty; send at least one row object", field="inputs"
            )
    return key, value


def _latest(route: FunctionRoute) -> str | None:
    target = route.info.aliases.get("latest")
    return next(iter(target)) if target else None


def _strip_paths(message: str) -> str:
    """Bundle errors name server-side temp paths; a client needs only the file inside the bundle."""
    import re

    return re.sub(r"bundle /\S+: ", "bundle: ", message)


def create_app(settings: GatewaySettings | None = None, **kwargs: Any) -> Starlette:
    """The gateway's ASGI app (``settings`` default: from ``DEPIN_GATEWAY_*``); ``app.state.gateway`` is the
    ``Gateway``."""
    return Gateway(settings, **kwargs).app
