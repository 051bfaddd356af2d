"""HTTP client of the Fluence public API (``https://api.fluence.dev``), both API generations and GPU containers.

Authentication: the API key goes into the ``X-API-KEY`` header on every request — the ``api_key`` scheme of
Fluence's published OpenAPI document and the form the current docs show. Generation-B requests (``/v1``,
``/v2``) also carry ``Authorization: X-API-KEY <key>``, the form the document's introduction shows and that
Fluence's own Terraform provider sends next to ``X-API-KEY``. No ``Authorization: Bearer`` (that scheme is for
console JWTs). The key is a ``SecretStr`` and never appears in a message, a log line or a ``repr``.

Errors: transient failures (connection errors, 429, 5xx) are retried with jittered exponential backoff, honouring
``Retry-After``; after the last attempt they raise :class:`FluenceUnavailable` (a ``TransientError``). A request
that may have reached the server (a read timeout, a dropped connection, a 5xx) is re-sent only when it is
idempotent: creating a VM is not, so the caller must reconcile by name. Other answers raise a
:class:`FluenceRefused` (a ``PermanentError``) built from the body — generation A's ``{"error": "..."}``,
generation B's ``{"code": "...", "error": "..."}`` or the GPU API's ``{"detail": "..." | [{loc, msg}, ...]}`` —
with a hint what to do; 422 "No suitable offer found" / "Not enough offers found" is :class:`NoOffer`, an
insufficient balance (B ``insufficient_balance``, GPU "Insufficient balance ...") :class:`InsufficientBalance`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import SecretStr

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError
from depin_core.http import NOT_SENT, TRANSIENT_STATUSES, backoff_delay, check_base_url, retry_after_of

if TYPE_CHECKING:
    from serving.fluence._gen_a import VmsV3
    from serving.fluence._gen_b import V2Cluster
    from serving.fluence._gpu import GpuContainers

log = logging.getLogger(__name__)

Generation = Literal["A", "B"]
DEFAULT_BASE_URL = "https://api.fluence.dev"
RETRY_STATUS = TRANSIENT_STATUSES | {500}
_NO_OFFER = ("no suitable offer", "not enough offers", "no longer available")
_NO_BALANCE = ("insufficient balance", "not enough balance", "insufficient funds")


class FluenceError(DepinError):
    """Root of the Fluence client's errors."""


class FluenceRefused(FluenceError, PermanentError):
    """The API refused the request. ``status`` is the HTTP status, ``code`` generation B's error code (or a
    status-derived one), ``api_message`` the API's own ``error`` text."""

    def __init__(self, message: str, *, status: int, code: str, api_message: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.api_message = status, code, api_message


class FluenceAuthError(FluenceRefused):
    """401/403: the API key is missing, wrong, expired or lacks the scope."""


class FluenceNotFound(FluenceRefused):
    """404: no such resource (or route: a generation the account does not have)."""


class NoOffer(FluenceRefused):
    """422 "No suitable offer found" / "Not enough offers found": nothing matches the constraints or price."""


class InsufficientBalance(FluenceRefused):
    """The account's balance cannot pay for the deposit (generation B ``insufficient_balance``)."""


class FluenceUnavailable(FluenceError, TransientError):
    """The API could not be reached or kept answering 429/5xx; retrying later may work."""


class NotTerminable(FluenceError, TransientError):
    """The instance is in a status from which it cannot be terminated yet (GPU: only ``ACTIVE`` can)."""


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    406: "not_acceptable",
    409: "conflict",
    422: "unprocessable_entity",
}


def _detail_text(detail: Any) -> str:
    """The GPU API's ``detail``: a string (400 business errors) or FastAPI's ``[{loc, msg}, ...]`` (422)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in (item.get("loc") or []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("msg") or detail)
    return str(detail)


def parse_error(r: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error answer: ``{"error": "..."}`` (A), ``{"code", "error"}`` (B),
    ``{"detail": ...}`` (GPU), or text."""
    try:
        body = r.json()
    except ValueError:
        body = None
    fallback = _STATUS_CODES.get(r.status_code, "http_error")
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # tolerate {"error": {"code", "message"}}
            return str(err.get("code") or fallback), str(err.get("message") or "")
        if err is None and "detail" in body:
            message = _detail_text(body["detail"])
            if any(m in message.lower() for m in _NO_BALANCE):
                return "insufficient_balance", message
            return str(body.get("code") or fallback), message
        code = body.get("code") or fallback
        return str(code), str(err if err is not None else body.get("message") or "")
    return fallback, r.text[:300].strip()


def _fix(status: int, code: str) -> str:
    if status in (401, 403):
        return (
            "check the Fluence API key (DEPIN_FLUENCE_API_KEY; create one in Fluence Console › Settings › API "
            "Keys, full access for deploys)"
        )
    if status == 404:
        return "the resource is gone or this account does not have this API generation"
    if code == "insufficient_balance":
        return "top up the Fluence balance (Console › Billing); retrying will not help before that"
    if status == 422:
        return "relax the constraints (configuration, country, max price) or retry later"
    if status in (400, 406, 409):
        return "the message says which field or state is wrong"
    return "see the message"


def refused(r: httpx.Response, where: str) -> FluenceRefused:
    """The :class:`FluenceRefused` (subclass) for a permanent error answer."""
    code, message = parse_error(r)
    status = r.status_code
    cls: type[FluenceRefused] = FluenceRefused
    if status in (401, 403):
        cls = FluenceAuthError
    elif status == 404:
        cls = FluenceNotFound
    elif code == "insufficient_balance" or any(m in message.lower() for m in _NO_BALANCE):
        cls = InsufficientBalance
    elif status in (400, 422) and any(m in message.lower() for m in _NO_OFFER):
        cls = NoOffer
    text = f"{where} refused ({status} {code}): {message or r.reason_phrase}; {_fix(status, code)}"
    return cls(text, status=status, code=code, api_message=message)


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
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
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
        from serving.fluence._gen_a import VmsV3

        return VmsV3(self)

    @cached_property
    def b(self) -> V2Cluster:
        """Generation B: clusters, ``/v2/vms``, security groups, cloud-init."""
        from serving.fluence._gen_b import V2Cluster

        return V2Cluster(self)

    @cached_property
    def gpu(self) -> GpuContainers:
        """GPU Cloud containers (``/gpu``)."""
        from serving.fluence._gpu import GpuContainers

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
        where = f"{method} {self.base_url}{path}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            retry_after: float | None = None
            try:
                r = self._http.request(method, path, json=json, params=params, headers=self._headers(gen))
            except NOT_SENT as exc:
                problem = f"cannot connect ({type(exc).__name__})"
            except httpx.TransportError as exc:  # may have reached the server
                if not idempotent:
                    raise FluenceUnavailable(
                        f"{where}: the connection failed after sending ({type(exc).__name__}); the request may "
                        "have been applied — list the resources (by name) before retrying"
                    ) from None
                problem = f"connection failed ({type(exc).__name__})"
            else:
                if r.status_code in ok:
                    return r
                if r.status_code not in RETRY_STATUS:
                    raise refused(r, where)
                code, message = parse_error(r)
                problem, retry_after = f"{r.status_code} {code}: {message[:200]}", retry_after_of(r)
                if not idempotent and r.status_code != 429:
                    raise FluenceUnavailable(
                        f"{where}: {problem}; the request may have been applied — list the resources (by name) "
                        "before retrying",
                        retry_after=retry_after,
                    )
            if last:
                raise FluenceUnavailable(
                    f"{where}: {problem}; gave up after {attempt + 1} attempts — retry later",
                    retry_after=retry_after,
                )
            delay = backoff_delay(attempt, retry_after, base_s=self.backoff_s, cap_s=self.max_backoff_s)
            log.info("%s: %s; retrying in %.2fs", where, problem, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

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
