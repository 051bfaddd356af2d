"""io.net IO Cloud, containers as a service (CaaS): deploy a stock PyTorch image whose entrypoint runs our agent.

Follows io.net's own client, the ``ionet-cloud`` SDK (0.4.x, ``import iocloud``), and io.net's published OpenAPI
(``ionet-official/docs`` ``openapi/caas/*.json``). API-key routes of ``https://api.io.solutions`` under
``/enterprise/v1/io-cloud/caas`` (header ``x-api-key``):

- inventory: ``GET /hardware`` → ``{"data": [{"hardware_id", "hardware_name", "brand_name", "location", "price",
  "available", "max_gpus_per_container", "min_gpus_per_container", …}]}``, one row per hardware type and
  location, ``price`` in USD per GPU-hour (the SDK's listing; the deprecated ``/hardware/max-gpus-per-container``
  and ``/available-replicas`` are not used). It names locations but gives no location ids, so the deploy leaves
  the location to io.net (``location_ids`` is optional) and an offer's ``region`` is where most is free now;
- price: ``GET /price?hardware_id&duration_hours&gpus_per_container&replica_count`` → ``{"data":
  {"total_cost_usdc", "available_replica_count", …}}``, the whole prepaid duration;
- deploy: ``POST /deploy`` ``{"resource_private_name", "duration_hours", "gpus_per_container", "hardware_id",
  "container_config": {"replica_count", "entrypoint", "args", "env_variables", "secret_env_variables",
  "traffic_port"}, "registry_config": {"image_url"}}`` → ``{"status", "deployment_id"}``. The agent token goes
  in ``secret_env_variables`` only (io.net never echoes their values);
- status: ``GET /deployment/{id}`` → ``{"data": {"status", …}}``; ``GET /deployment/{id}/containers`` →
  ``{"data": {"workers": [{"container_id", "status", "public_url"}]}}`` (the agent's URL);
- ours: ``GET /deployments?page&page_size`` → ``{"data": {"deployments": [{"id", "name", "status"}], "total"}}``;
- stop: ``DELETE /deployment/{id}``.

**GPUs per container.** io.net's deploy docs and the SDK pin ``gpus_per_container`` to 8 in production today.
Offers are quoted and deployed with what the service accepts (``gpus_per_container``, default 8, within the
hardware's min/max), so an offer is 8 GPUs at the full price of 8; ``choose_offer`` (at least the job's GPUs,
cheapest first) and the price cap decide whether that is worth it for a 1-GPU job.

**Where the SDK and the published spec disagree**, the adapter sends what both accept:

- deploy body: the SDK always adds ``payment_source`` (``"credits"``) and ``on_incomplete_booking``
  (``"full_refund"``), which the spec's ``CaaSDeployClusterRequest`` (``additionalProperties: false``) lacks;
  the adapter leaves both out (the SDK's values are io.net's defaults);
- ``hardware_id``: an integer in the spec, ``int | str`` in the SDK (numeric-string ids occur); the adapter sends
  it back exactly as the inventory listed it;
- ``GET /deployments`` pages: the spec's ``page`` defaults to 0, the SDK counts from 1; the listing starts at 0
  (moving to 1 when page 0 is refused), de-duplicates by id and stops at the reported ``total``.

**Errors.** A 400/404/409/422 from price or deploy that says there is no capacity (or that the hardware is gone)
→ ``NoCapacity`` (the next offer, or the next runner); any other 400/422 → ``PermanentError`` with io.net's
message: the request will not succeed as sent.

Deployments are prepaid for ``duration_hours`` (the spec's ``max_wall_s`` plus a provisioning margin, rounded
up to whole hours); ``usd_per_hour`` of an offer is that price divided by the hours.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import httpx
from pydantic import SecretStr

from depin_core.errors import DepinError, PermanentError, TransientError
from gpu_jobs.errors import NoCapacity, ProviderRefused
from gpu_jobs.providers._market import MarketProvider
from gpu_jobs.providers.base import Bootstrap, Instance, Offer, Worker, is_ours
from gpu_jobs.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_URL = "https://api.io.solutions"
KEY_ENV = "DEPIN_IONET_API_KEY"
CAAS = "/enterprise/v1/io-cloud/caas"
GPUS_PER_CONTAINER = 8  # io.net's deploy docs and SDK: pinned to 8 in production today
MAX_PAGES = 1000
_GONE = {"destroyed", "completed", "termination requested", "terminated"}
_FAILED = _GONE | {"failed", "unpaid"}
_REFUSED = (400, 404, 409, 422)
_NO_CAPACITY = re.compile(
    r"capacity|not enough|insufficient|unavailable|not available|no (?:free|available)|sold out|out of stock",
    re.IGNORECASE,
)

# Per-GPU memory (GB) of the hardware names io.net lists; a "<n>GB" in the name wins.
VRAM_GB = {
    "b200": 180.0,
    "mi300x": 192.0,
    "h200": 141.0,
    "h100": 80.0,
    "a100": 80.0,
    "l40s": 48.0,
    "l40": 48.0,
    "a40": 48.0,
    "a6000": 48.0,
    "6000 ada": 48.0,
    "rtx 5090": 32.0,
    "v100": 32.0,
    "rtx 4090": 24.0,
    "rtx 3090": 24.0,
    "a10": 24.0,
    "l4": 24.0,
    "a5000": 24.0,
    "rtx 4080": 16.0,
    "a4000": 16.0,
    "t4": 16.0,
}


def vram_of(hardware_name: str) -> float:
    """Per-GPU memory of an io.net hardware name (0 when unknown)."""
    name = hardware_name.lower()
    if m := re.search(r"(\d+)\s*gb", name):
        return float(m.group(1))
    for key in sorted(VRAM_GB, key=len, reverse=True):
        if re.search(rf"(^|[^a-z0-9]){re.escape(key)}($|[^a-z0-9])", name):
            return VRAM_GB[key]
    return 0.0


def status_of(value: Any) -> str:
    """io.net's status word, normalised like the SDK does (``DEPLOYMENT_REQUESTED`` → ``deployment requested``)."""
    return " ".join(str(value or "unknown").strip().lower().replace("_", " ").replace("-", " ").split())


def _hardware_id(value: Any) -> int | str | None:
    """A listed ``hardware_id``: an int, or a non-empty string (numeric-string ids occur); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip()):
        return value
    return None


def _offer_id(hardware_id: int | str, gpus: int, hours: int) -> str:
    # JSON keeps the id's type: 7 and "7" are different ids to send back
    return f"{json.dumps(hardware_id)}:{gpus}:{hours}"


def _parse_offer_id(offer_id: str) -> tuple[int | str, int, int]:
    try:
        hw_text, gpus, hours = offer_id.rsplit(":", 2)
        hw = _hardware_id(json.loads(hw_text))
        if hw is None:
            raise ValueError(hw_text)
        return hw, int(gpus), int(hours)
    except ValueError:
        raise PermanentError(
            f"ionet: offer id {offer_id!r} is not <hardware_id as JSON>:<gpus>:<hours>; take it from quote()"
        ) from None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _data(doc: Any) -> Any:
    """The ``data`` member of io.net's response envelope, or the body itself."""
    return doc["data"] if isinstance(doc, dict) and "data" in doc else doc


def _items(doc: Any, *keys: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, envelope)`` of a listing: a bare ``data`` list, or the list under one of ``keys``."""
    data = _data(doc)
    rows: Any = []
    if isinstance(data, list):
        rows, data = data, {}
    elif isinstance(data, dict):
        rows = next((data[k] for k in keys if isinstance(data.get(k), list)), [])
    else:
        data = {}
    return [r for r in rows if isinstance(r, dict)], data


def _public_url(url: str | None) -> str | None:
    if not url:
        return None
    url = url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"https://{url}"


def refused(exc: ProviderRefused, what: str, fix: str) -> DepinError:
    """What io.net's 4xx answer to a price or deploy request means: ``NoCapacity`` when it says there is no
    capacity (or the hardware is gone), else ``PermanentError`` carrying io.net's message and ``fix``."""
    text = exc.detail or f"HTTP {exc.status}"
    if exc.status in (404, 409) or _NO_CAPACITY.search(text):
        return NoCapacity(f"ionet: {what}: no capacity ({text}); quote again or let the next runner take it")
    return PermanentError(f"ionet: {what} was refused ({exc.status}: {text}); {fix}")


class IonetProvider(MarketProvider):
    """io.net CaaS deployments (see the module doc). ``gpus_per_container``: what io.net accepts per container
    (8 today; None = the job's own GPU count). ``poll_s``: the longest pause between ``wait_ready`` polls (it
    starts at 0.25 s and doubles up to it). ``margin_s`` is added to the spec's ``max_wall_s`` when sizing the
    prepaid duration."""

    name = "ionet"

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str = DEFAULT_URL,
        *,
        gpus_per_container: int | None = GPUS_PER_CONTAINER,
        poll_s: float = 5.0,
        timeout: float = 30.0,
        margin_s: float = 1800.0,
        page_size: int = 100,
        transport: httpx.BaseTransport | None = None,
        agent_transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            api_key,
            base_url,
            auth_headers=lambda key: {"x-api-key": key, "Accept": "application/json"},
            key_hint=KEY_ENV,
            poll_s=poll_s,
            timeout=timeout,
            transport=transport,
            agent_transport=agent_transport,
        )
        self.gpus_per_container = gpus_per_container
        self.margin_s = margin_s
        self.page_size = page_size

    # ---- offers ----------------------------------------------------------------------------------------------
    def duration_hours(self, spec: JobSpec) -> int:
        """Whole hours to prepay for ``spec``: ``max_wall_s`` + margin, rounded up."""
        return max(1, math.ceil((spec.limits.max_wall_s + self.margin_s) / 3600.0))

    def gpus_for(self, want: int, lowest: int = 0, highest: int = 0) -> int | None:
        """GPUs per container for a job wanting ``want``: what io.net accepts (``gpus_per_container``, raised to
        the hardware's ``lowest``); None when that is fewer than ``want`` or more than ``highest`` (0: no
        limit)."""
        n = max(self.gpus_per_container or want, lowest, 1)
        return None if n < want or (highest and n > highest) else n

    def hardware(self) -> list[dict[str, Any]]:
        """io.net's inventory: one row per hardware type and location (price, location, availability)."""
        rows, _ = _items(self._api.json("GET", f"{CAAS}/hardware"), "hardware")
        return rows

    def price(self, hardware_id: int | str, gpus: int, hours: int) -> dict[str, Any]:
        """``GET /price``'s ``data`` for one container of ``gpus`` GPUs for ``hours``, anywhere; ``NoCapacity`` /
        ``PermanentError`` when io.net refuses (see :func:`refused`)."""
        params = {
            "hardware_id": hardware_id,
            "duration_hours": hours,
            "gpus_per_container": gpus,
            "replica_count": 1,
        }
        try:
            doc = self._api.json("GET", f"{CAAS}/price", params=params)
        except ProviderRefused as exc:
            if exc.status not in _REFUSED:
                raise
            what = f"price of hardware {hardware_id!r} with {gpus} GPU(s) per container for {hours} h"
            raise refused(
                exc, what, "fix the field io.net names (IonetProvider(gpus_per_container=…))"
            ) from None
        data = _data(doc)
        return data if isinstance(data, dict) else {}

    def quote(self, spec: JobSpec) -> list[Offer]:
        """One offer per hardware type with free capacity and enough memory per GPU, for one container of the
        GPUs io.net accepts (at least the job's), priced by io.net for the whole prepaid duration."""
        want = max(1, spec.resources.gpu_count)
        hours = self.duration_hours(spec)
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in self.hardware():
            if (hw_id := _hardware_id(row.get("hardware_id"))) is not None:
                by_id.setdefault(json.dumps(hw_id), []).append(row)
        offers = []
        for key, rows in by_id.items():
            hw_id, name = json.loads(key), str(rows[0].get("hardware_name") or "")
            free = [r for r in rows if _int(r.get("available")) > 0]
            gpus = self.gpus_for(
                want,
                max(_int(r.get("min_gpus_per_container")) for r in rows),
                max(_int(r.get("max_gpus_per_container")) for r in rows),
            )
            if not free or gpus is None or vram_of(name) < spec.resources.min_vram_gb:
                continue
            try:
                price = self.price(hw_id, gpus, hours)
            except NoCapacity as exc:
                log.info("%s", exc)
                continue
            replicas = price.get("available_replica_count")
            if isinstance(replicas, list) and replicas and max(_int(n) for n in replicas) < 1:
                continue
            try:
                total = float(price.get("total_cost_usdc") or float(rows[0].get("price") or 0) * gpus * hours)
            except (TypeError, ValueError):
                continue
            if total <= 0:
                continue
            best = max(free, key=lambda r: _int(r.get("available")))
            offers.append(
                Offer(
                    provider=self.name,
                    offer_id=_offer_id(hw_id, gpus, hours),
                    host=None,  # io.net picks the device at deploy time
                    gpu_name=name or f"hardware {hw_id}",
                    gpu_count=gpus,
                    vram_gb=vram_of(name),
                    usd_per_hour=total / hours,
                    reliability=None,
                    region=str(best.get("location") or "") or None,
                )
            )
        return offers

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def deployments(self) -> list[dict[str, Any]]:
        """Every CaaS deployment of the account, whichever number io.net gives its first page."""
        seen: dict[str, dict[str, Any]] = {}
        page, stale = 0, 0
        while page < MAX_PAGES:
            params = {"page": page, "page_size": self.page_size}
            try:
                doc = self._api.json("GET", f"{CAAS}/deployments", params=params)
            except ProviderRefused as exc:
                if page == 0 and exc.status in (400, 422):  # pages counted from 1, as the SDK does
                    page = 1
                    continue
                raise
            rows, envelope = _items(doc, "deployments", "clusters")
            new = [r for r in rows if r.get("id") is not None and str(r["id"]) not in seen]
            for r in new:
                seen[str(r["id"])] = r
            stale = 0 if new else stale + 1
            total = envelope.get("total")
            if isinstance(total, int) and len(seen) >= total:
                break
            if page > 0 and (not rows or stale >= 2):
                break
            if not isinstance(total, int) and rows and len(rows) < self.page_size:
                break
            page += 1
        return list(seen.values())

    def find(self, name: str) -> dict[str, Any] | None:
        """Our live deployment named ``name``, or None."""
        for row in self.deployments():
            if row.get("name") == name and status_of(row.get("status")) not in _GONE:
                return row
        return None

    def launch(self, offer: Offer, bootstrap: Bootstrap, *, name: str) -> Worker:
        """Deploy one container of ``bootstrap.image`` running the agent as ``name``; a live deployment of that
        name is returned instead (no second rental). ``NoCapacity`` when io.net cannot place it,
        ``PermanentError`` (io.net's message) when it refuses the request itself."""
        if not is_ours(name):
            raise PermanentError(
                f"ionet: deployment name {name!r} must start with 'depin-' (see worker_name)"
            )
        existing = self.find(name)
        if existing is not None:
            log.info(
                "ionet: %s exists already (deployment %s); not deploying again", name, existing.get("id")
            )
            return Worker(
                provider=self.name,
                instance_id=str(existing["id"]),
                name=name,
                token=bootstrap.token,
                offer=offer,
                tls_cert=bootstrap.tls_cert,
            )
        hw, gpus, hours = _parse_offer_id(offer.offer_id)
        body = {
            "resource_private_name": name,
            "duration_hours": hours,
            "gpus_per_container": gpus,
            "hardware_id": hw,
            "container_config": {
                "replica_count": 1,
                "entrypoint": ["/bin/sh", "-c"],
                "args": [bootstrap.script()],
                "env_variables": {"DEPIN_AGENT_PORT": str(bootstrap.port)},
                "secret_env_variables": bootstrap.env(),
                "traffic_port": bootstrap.port,
            },
            "registry_config": {"image_url": bootstrap.image},
        }
        try:
            doc = _data(self._api.json("POST", f"{CAAS}/deploy", json=body, idempotent=False))
        except ProviderRefused as exc:
            if exc.status not in _REFUSED:
                raise
            what = f"deploy of offer {offer.offer_id} as {name}"
            raise refused(exc, what, "fix the field io.net names; quoting again will not help") from None
        dep_id = doc.get("deployment_id") if isinstance(doc, dict) else None
        if not dep_id:
            raise TransientError(f"ionet: deploy answered without a deployment_id ({str(doc)[:200]})")
        log.info("ionet: deployed offer %s as %s (deployment %s)", offer.offer_id, name, dep_id)
        return Worker(
            provider=self.name,
            instance_id=str(dep_id),
            name=name,
            token=bootstrap.token,
            offer=offer,
            tls_cert=bootstrap.tls_cert,
        )

    def deployment(self, deployment_id: str) -> dict[str, Any] | None:
        """``GET …/deployment/{id}``'s ``data``, or None when it does not exist."""
        return self._get_object(f"{CAAS}/deployment/{deployment_id}", "data")

    def container_url(self, deployment_id: str) -> str | None:
        """The ``public_url`` of the deployment's first live container that has one (io.net fills it in once
        its own network check passes)."""
        workers, _ = _items(
            self._api.json("GET", f"{CAAS}/deployment/{deployment_id}/containers"), "workers", "containers"
        )
        for w in workers:
            if status_of(w.get("status") or "running") in _FAILED:
                continue
            if url := _public_url(w.get("public_url")):
                return url
        return None

    def wait_ready(self, worker: Worker, *, timeout_s: float) -> Worker:
        """Poll until the deployment runs and its container's agent answers ``/v1/health`` with the token;
        the worker with its ``url``. ``TransientError`` when it failed or is not ready within ``timeout_s``."""
        what = f"ionet: deployment {worker.instance_id} ({worker.name})"

        def probe() -> tuple[str | None, str]:
            data = self.deployment(worker.instance_id)
            if data is None:
                raise TransientError(f"{what} is gone")
            status = status_of(data.get("status"))
            if status in _FAILED:
                raise TransientError(f"{what} {status}")
            if status != "running":
                return None, f"status {status}"
            url = self.container_url(worker.instance_id)
            return url, f"status {status}" if url else "running, no container with a public_url yet"

        return self._poll_until_healthy(worker, probe, what=what, timeout_s=timeout_s)

    def destroy(self, target: Worker | Instance) -> None:
        """``DELETE …/deployment/{id}``; a deployment already gone or terminating is fine."""
        try:
            self._api.request("DELETE", f"{CAAS}/deployment/{target.instance_id}", ok=(200, 202, 204))
        except ProviderRefused as exc:
            if exc.status == 404:
                return
            if exc.status in (400, 409, 422):
                data = self.deployment(target.instance_id)
                if data is None or status_of(data.get("status")) in _FAILED:
                    return
            raise
        log.info("ionet: terminated deployment %s (%s)", target.instance_id, target.name)

    def instances(self) -> list[Instance]:
        """Our deployments (names ``depin-…``) that are not finished."""
        out = []
        for row in self.deployments():
            name, status = row.get("name"), status_of(row.get("status"))
            if is_ours(name) and status not in _GONE:
                out.append(
                    Instance(
                        provider=self.name, instance_id=str(row.get("id")), name=str(name), status=status
                    )
                )
        return out
