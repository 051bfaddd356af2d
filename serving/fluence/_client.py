"""HTTP client of the Fluence public API (``https://api.fluence.dev``), both API generations and GPU containers.

Authentication: the API key goes into the ``X-API-KEY`` header on every request — the ``api_key`` scheme of
Fluence's published OpenAPI document and the form the current docs show. Generation-B requests (``/v1``,
``/v2``) also carry ``Authorization: X-API-KEY <key>``, the form the document's introduction shows and that
Fluence's own Terraform provider sends next to ``X-API-KEY``. No ``Authorization: Bearer`` (that scheme is for
console JWTs). The key is a ``SecretStr`` and never appears in a message, a log line or a ``repr``.

Errors (``serving.fluence.errors``): transient failures (connection errors, 429, 500, 502, 503, 504) are retried
by ``depin_core.retry``'s policy (jittered exponential backoff, ``Retry-After`` honoured); after the last
attempt they raise :class:`FluenceUnavailable` (a ``TransientError``). A request that may have reached the
server (a read timeout, a dropped connection, a 5xx) is re-sent only when it is idempotent: creating a VM is
not, so the caller must reconcile by name. A refused TLS certificate is never retried. Other answers raise a
:class:`FluenceRefused` (a ``PermanentError``) built from the body, with a hint what to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from functools import cached_property
from typing import Any

import httpx
from pydantic import SecretStr

from depin_core.errors import ConfigError
from depin_core.http import TRANSIENT_STATUSES, check_base_url
from depin_core.retry import Failures, Outcome, RetryPolicy
from serving.fluence._api import Generation
from serving.fluence._gen_a import VmsV3
from serving.fluence._gen_b import V2Cluster
from serving.fluence._gpu import GpuContainers
from serving.fluence.errors import (
    FluenceAuthError,
    FluenceError,
    FluenceNotFound,
    FluenceRefused,
    FluenceUnavailable,
    InsufficientBalance,
    NoOffer,
    NotTerminable,
    parse_error,
    refused,
)

__all__ = [  # the errors are re-exported: callers of the client catch them from here or serving.fluence
    "DEFAULT_BASE_URL",
    "FluenceAuthError",
    "FluenceClient",
    "FluenceError",
    "FluenceNotFound",
    "FluenceRefused",
    "FluenceUnavailable",
    "Generation",
    "InsufficientBalance",
    "NoOffer",
    "NotTerminable",
    "parse_error",
    "refused",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.fluence.dev"
RETRY_STATUS = TRANSIENT_STATUSES | {500}
RESEND_STATUS = frozenset({429})  # the only transient answer that says a POST was not applied


class _Failures(Failures):
    """The Fluence client's words for the failures its retry policy stops on."""

    def problem(self, outcome: Outcome) -> str:
        if isinstance(outcome, httpx.Response):
            code, message = parse_error(outcome)
            return f"{outcome.status_code} {code}: {message[:200]}"
        return super().problem(outcome)

    def refused(self, r: httpx.Response) -> FluenceRefused:
        return refused(r, self.where)

    def maybe_applied(self, outcome: Outcome, problem: str, retry_after: float | None) -> FluenceUnavailable:
        if isinstance(outcome, httpx.TransportError):
            problem = f"the connection failed after sending ({type(outcome).__name__})"
        return FluenceUnavailable(
            f"{self.where}: {problem}; the request may have been applied — list the resources (by name) before "
            "retrying",
            retry_after=retry_after,
        )

    def gave_up(self, problem: str, attempts: int, retry_after: float | None) -> FluenceUnavailable:
        return FluenceUnavailable(
            f"{self.where}: {problem}; gave up after {attempts} attempts — retry later",
            retry_after=retry_after,
        )


class FluenceClient:
    """A client of one Fluence account. ``generation`` ("A" or "B") skips detection; ``transport`` and
    ``sleep`` are seams for tests. Use ``.a`` (VMs v3), ``.b`` (v2 cluster VMs) and ``.gpu`` (GPU containers).

    ``retries`` extra attempts after the first for transient failures, waiting ``backoff_s × 2^attempt`` (or the
    server's ``Retry-After``), jittered ±20 %, at most ``max_backoff_s``.
    """

    def __init__(
        self,
        api_key: SecretStr,
        *,
        base_url: str = DEFAULT_BASE_URL,
        generation: Generation | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(api_key, SecretStr):
            raise ConfigError("api_key must be a pydantic SecretStr (keeps it out of logs and reprs)")
        if not api_key.get_secret_value().strip():
            raise ConfigError("the Fluence API key is empty: set DEPIN_FLUENCE_API_KEY")
        url = check_base_url(base_url, "Fluence base URL")
        if generation not in (None, "A", "B"):
            raise ConfigError(f"generation must be 'A', 'B' or None (detect), not {generation!r}")
        self.base_url = url
        self._key = api_key
        self._generation: Generation | None = generation
        self.policy = RetryPolicy(
            max_retries=retries,
            base_s=backoff_s,
            max_s=max_backoff_s,
            statuses=RETRY_STATUS,
            resend_statuses=RESEND_STATUS,
            sleep=sleep,
        )
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._http = httpx.Client(
            base_url=url, timeout=timeout, transport=transport, headers={"Accept": "application/json"}
        )

    def __repr__(self) -> str:
        return f"FluenceClient({self.base_url!r}, generation={self._generation!r}, api_key='**********')"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FluenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- adapters ----------------------------------------------------------------------------------------------
    @cached_property
    def a(self) -> VmsV3:
        """Generation A: marketplace offers and ``/vms/v3``."""
        return VmsV3(self)

    @cached_property
    def b(self) -> V2Cluster:
        """Generation B: clusters, ``/v2/vms``, security groups, cloud-init."""
        return V2Cluster(self)

    @cached_property
    def gpu(self) -> GpuContainers:
        """GPU Cloud containers (``/gpu``)."""
        return GpuContainers(self)

    # ---- generation --------------------------------------------------------------------------------------------
    @property
    def generation(self) -> Generation:
        """The account's API generation (detected on first use unless given)."""
        if self._generation is None:
            self._generation = self.detect_generation()
        return self._generation

    def detect_generation(self) -> Generation:
        """The account's generation, by authenticated calls: ``GET /v2/vms`` answering 200 → "B"; else
        ``GET /vms/v3`` answering 200 → "A". (``GET /v1/service/status`` is public and answers on the shared
        host for every account, so it says nothing about the account.) ``DEPIN_FLUENCE_GENERATION`` skips this.

        Raises ``FluenceAuthError`` when both refuse the key, ``FluenceUnavailable`` when the API cannot be
        reached, ``FluenceRefused`` when neither generation answers."""
        try:
            self.request("GET", "/v2/vms", gen="B", params={"perPage": 1})
            return "B"
        except FluenceRefused as exc:
            first = exc
        try:
            self.request("GET", "/vms/v3", gen="A")
            return "A"
        except FluenceRefused as exc:
            auth = isinstance(exc, FluenceAuthError) or isinstance(first, FluenceAuthError)
            cls: type[FluenceRefused] = FluenceAuthError if auth else FluenceRefused
            hint = (
                "check DEPIN_FLUENCE_API_KEY (a full-access key), or set DEPIN_FLUENCE_GENERATION=A|B"
                if cls is FluenceAuthError
                else f"check DEPIN_FLUENCE_URL (default {DEFAULT_BASE_URL}) or set DEPIN_FLUENCE_GENERATION=A|B"
            )
            raise cls(
                f"{self.base_url} accepts this key for neither API generation (GET /v2/vms: {first.status} "
                f"{first.code}, GET /vms/v3: {exc.status} {exc.code}); {hint}",
                status=exc.status,
                code=exc.code,
                api_message=exc.api_message,
            ) from None

    # ---- transport ---------------------------------------------------------------------------------------------
    def _headers(self, gen: Generation) -> dict[str, str]:
        key = self._key.get_secret_value()
        if gen == "B":
            return {"X-API-KEY": key, "Authorization": f"X-API-KEY {key}"}
        return {"X-API-KEY": key}

    def request(
        self,
        method: str,
        path: str,
        *,
        gen: Generation,
        json: Any = None,
        params: Any = None,
        idempotent: bool | None = None,
        ok: Collection[int] = (200, 201, 202, 204),
    ) -> httpx.Response:
        """Send ``method path`` with ``gen``'s auth headers and the retry policy of the module docstring.

        ``idempotent`` defaults to True for GET/PUT/DELETE/PATCH/HEAD and False for POST. Returns the response
        when its status is in ``ok``."""
        if idempotent is None:
            idempotent = method.upper() != "POST"
        return self.policy.send(
            lambda: self._http.request(method, path, json=json, params=params, headers=self._headers(gen)),
            _Failures(f"{method} {self.base_url}{path}"),
            idempotent=idempotent,
            ok=ok,
        )

    def get_json(self, path: str, *, gen: Generation, params: Any = None) -> Any:
        """``GET path`` → decoded JSON."""
        return _json(self.request("GET", path, gen=gen, params=params), path)

    def get_items(self, path: str, *, gen: Generation) -> list[Any]:
        """``GET path`` of an unpaginated collection: ``{"items": [...]}`` (the current document) or a bare
        list (older snapshots) → the items."""
        doc = self.get_json(path, gen=gen)
        if isinstance(doc, dict) and isinstance(doc.get("items"), list):
            return list(doc["items"])
        if isinstance(doc, list):
            return doc
        raise FluenceRefused(
            f'GET {path}: expected {{"items": [...]}} or a list, got {type(doc).__name__}',
            status=200,
            code="bad_response",
        )

    def paginate(
        self, path: str, *, gen: Generation, params: dict[str, Any] | None = None, per_page: int = 100
    ) -> list[dict[str, Any]]:
        """Every item of a generation-B paginated list (``{"items", "pagination"}``), walking ``page`` /
        ``perPage``. Independent of whether pages count from 0 or 1: it asks for the page after the one the
        server says it returned, until it has ``filteredRecords`` items or a page comes back empty."""
        items: list[dict[str, Any]] = []
        query = dict(params or {})
        query["perPage"] = per_page
        for _ in range(10_000):
            doc = self.get_json(path, gen=gen, params=query)
            if isinstance(doc, list):  # an unpaginated answer
                return items + doc
            page_items = doc.get("items") or []
            items.extend(page_items)
            pag = doc.get("pagination") or {}
            total = int(pag.get("filteredRecords", pag.get("totalRecords", 0)) or 0)
            current = int(pag.get("currentPage", 0) or 0)
            pages = int(pag.get("totalPages", 0) or 0)
            if not page_items or len(items) >= total or (pages and current + 1 > pages and current >= 1):
                return items
            query["page"] = current + 1
        raise FluenceRefused(
            f"GET {path}: pagination did not end", status=200, code="pagination", api_message=""
        )


def _json(r: httpx.Response, path: str) -> Any:
    try:
        return r.json()
    except ValueError:
        raise FluenceRefused(
            f"{path}: the API answered {r.status_code} with a body that is not JSON ({r.text[:120]!r})",
            status=r.status_code,
            code="bad_response",
        ) from None
