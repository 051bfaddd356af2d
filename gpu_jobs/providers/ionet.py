"""io.net IO Cloud, containers as a service (CaaS): deploy a stock PyTorch image whose entrypoint runs our agent.

API-key routes of ``https://api.io.solutions`` (header ``x-api-key``), from io.net's published OpenAPI
(``ionet-official/docs`` ``openapi/caas/*.json``):

- hardware: ``GET /enterprise/v1/io-cloud/caas/hardware/max-gpus-per-container`` → ``{"data": {"hardware":
  [{"hardware_id", "hardware_name", "brand_name", "available", "max_gpus_per_container", "price"}], "total"}}``;
- where: ``GET /enterprise/v1/io-cloud/caas/available-replicas?hardware_id&hardware_qty`` → ``{"data": [{"id",
  "iso2", "name", "available_replicas"}]}``;
- price: ``GET /enterprise/v1/io-cloud/caas/price?location_ids=[id]&hardware_id&duration_hours&
  gpus_per_container&replica_count`` → ``{"data": {"total_cost_usdc", …}}`` (the whole prepaid duration);
- deploy: ``POST /enterprise/v1/io-cloud/caas/deploy`` ``{"resource_private_name", "duration_hours",
  "gpus_per_container", "hardware_id", "location_ids", "container_config": {"replica_count", "entrypoint",
  "args", "env_variables", "secret_env_variables", "traffic_port"}, "registry_config": {"image_url"}}`` →
  ``{"status", "deployment_id"}``. The agent token goes in ``secret_env_variables`` only;
- status: ``GET …/caas/deployment/{id}`` → ``{"data": {"status", …}}`` (running, completed, failed,
  deployment requested, termination requested, destroyed); ``GET …/caas/deployment/{id}/containers`` →
  ``{"data": {"workers": [{"container_id", "status", "public_url"}]}}`` (the agent's URL);
- ours: ``GET …/caas/deployments?page&page_size`` → ``{"data": {"deployments": [{"id", "name", "status"}],
  "total"}}``;
- stop: ``DELETE …/caas/deployment/{id}``.

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

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.providers._http import ApiError
from gpu_jobs.providers._market import MarketProvider
from gpu_jobs.providers.base import Bootstrap, Instance, NoCapacity, Offer, Worker, is_ours
from gpu_jobs.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_URL = "https://api.io.solutions"
KEY_ENV = "DEPIN_IONET_API_KEY"
CAAS = "/enterprise/v1/io-cloud/caas"
_GONE = {"destroyed", "completed", "termination requested", "terminated"}
_FAILED = _GONE | {"failed", "unpaid"}

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


def _offer_id(hardware_id: int, location_id: int, gpus: int, hours: int) -> str:
    return f"{hardware_id}:{location_id}:{gpus}:{hours}"


def _parse_offer_id(offer_id: str) -> tuple[int, int, int, int]:
    try:
        hw, loc, gpus, hours = (int(p) for p in offer_id.split(":"))
    except ValueError:
        raise PermanentError(
            f"ionet: offer id {offer_id!r} is not hardware:location:gpus:hours; take it from quote()"
        ) from None
    return hw, loc, gpus, hours


def _public_url(url: str | None) -> str | None:
    if not url:
        return None
    url = url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"https://{url}"


class IonetProvider(MarketProvider):
    """io.net CaaS deployments (see the module doc). ``poll_s``: the longest pause between ``wait_ready``
    polls (it starts at 0.25 s and doubles up to it). ``margin_s`` is added to the spec's ``max_wall_s`` when
    sizing the prepaid duration; ``max_locations`` bounds the price look-ups per hardware type."""

    name = "ionet"

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str = DEFAULT_URL,
        *,
        poll_s: float = 5.0,
        timeout: float = 30.0,
        margin_s: float = 1800.0,
        max_locations: int = 3,
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
        self.margin_s = margin_s
        self.max_locations = max_locations

    # ---- offers ----------------------------------------------------------------------------------------------
    def duration_hours(self, spec: JobSpec) -> int:
        """Whole hours to prepay for ``spec``: ``max_wall_s`` + margin, rounded up."""
        return max(1, math.ceil((spec.limits.max_wall_s + self.margin_s) / 3600.0))

    def hardware(self) -> list[dict[str, Any]]:
        """io.net's hardware types with availability and ``max_gpus_per_container``."""
        doc = self._api.json("GET", f"{CAAS}/hardware/max-gpus-per-container")
        data = doc.get("data") if isinstance(doc, dict) else None
        rows = data.get("hardware") if isinstance(data, dict) else None
        return [r for r in rows or [] if isinstance(r, dict)]

    def quote(self, spec: JobSpec) -> list[Offer]:
        """One offer per (hardware type, location) with a free replica of ``gpu_count`` GPUs (at least one)
        and enough memory, priced for the prepaid duration."""
        gpus = max(1, spec.resources.gpu_count)
        hours = self.duration_hours(spec)
        offers = []
        for hw in self.hardware():
            try:
                hw_id, hw_name = int(hw["hardware_id"]), str(hw.get("hardware_name") or "")
                available, max_gpus = (
                    int(hw.get("available") or 0),
                    int(hw.get("max_gpus_per_container") or 0),
                )
            except (KeyError, TypeError, ValueError):
                continue
            vram = vram_of(hw_name)
            if available <= 0 or max_gpus < gpus or vram < spec.resources.min_vram_gb:
                continue
            doc = self._api.json(
                "GET", f"{CAAS}/available-replicas", params={"hardware_id": hw_id, "hardware_qty": gpus}
            )
            locations = [
                loc
                for loc in (doc.get("data") if isinstance(doc, dict) else None) or []
                if isinstance(loc, dict) and int(loc.get("available_replicas") or 0) > 0
            ]
            locations.sort(key=lambda loc: -int(loc.get("available_replicas") or 0))
            for loc in locations[: self.max_locations]:
                total = self._price(hw_id, int(loc["id"]), gpus, hours)
                if total is None:
                    total = float(hw.get("price") or 0.0) * gpus * hours
                if total <= 0:
                    continue
                offers.append(
                    Offer(
                        provider=self.name,
                        offer_id=_offer_id(hw_id, int(loc["id"]), gpus, hours),
                        host=None,  # io.net picks the device at deploy time
                        gpu_name=hw_name or f"hardware {hw_id}",
                        gpu_count=gpus,
                        vram_gb=vram,
                        usd_per_hour=total / hours,
                        reliability=None,
                        region=str(loc.get("iso2") or loc.get("name") or "") or None,
                    )
                )
        return offers

    def _price(self, hardware_id: int, location_id: int, gpus: int, hours: int) -> float | None:
        params = {
            "location_ids": json.dumps([location_id]),
            "hardware_id": hardware_id,
            "duration_hours": hours,
            "gpus_per_container": gpus,
            "replica_count": 1,
        }
        doc = self._api.json("GET", f"{CAAS}/price", params=params)
        data = doc.get("data") if isinstance(doc, dict) else None
        try:
            return float(data["total_cost_usdc"]) if isinstance(data, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def deployments(self) -> list[dict[str, Any]]:
        """Every CaaS deployment of the account (all pages)."""
        seen: dict[str, dict[str, Any]] = {}
        for page in range(0, 100):
            doc = self._api.json("GET", f"{CAAS}/deployments", params={"page": page, "page_size": 100})
            data = doc.get("data") if isinstance(doc, dict) else None
            rows = [r for r in (data or {}).get("deployments") or [] if isinstance(r, dict)]
            new = [r for r in rows if str(r.get("id")) not in seen]
            for r in new:
                seen[str(r.get("id"))] = r
            total = int((data or {}).get("total") or 0)
            if not new or len(seen) >= total:
                break
        return list(seen.values())

    def find(self, name: str) -> dict[str, Any] | None:
        """Our live deployment named ``name``, or None."""
        for row in self.deployments():
            if row.get("name") == name and str(row.get("status") or "").lower() not in _GONE:
                return row
        return None

    def launch(self, offer: Offer, bootstrap: Bootstrap, *, name: str) -> Worker:
        """Deploy one container of ``bootstrap.image`` running the agent as ``name``; a live deployment of that
        name is returned instead (no second rental). ``NoCapacity`` when io.net cannot place it."""
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
            )
        hw, loc, gpus, hours = _parse_offer_id(offer.offer_id)
        body = {
            "resource_private_name": name,
            "duration_hours": hours,
            "gpus_per_container": gpus,
            "hardware_id": hw,
            "location_ids": [loc],
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
            doc = self._api.json("POST", f"{CAAS}/deploy", json=body, idempotent=False)
        except ApiError as exc:
            if exc.status in (400, 404, 409):
                raise NoCapacity(
                    f"ionet: cannot deploy offer {offer.offer_id} ({exc.detail or exc.status}); quote again"
                ) from None
            raise
        dep_id = doc.get("deployment_id") if isinstance(doc, dict) else None
        if not dep_id:
            raise TransientError(f"ionet: deploy answered without a deployment_id ({str(doc)[:200]})")
        log.info("ionet: deployed offer %s as %s (deployment %s)", offer.offer_id, name, dep_id)
        return Worker(
            provider=self.name, instance_id=str(dep_id), name=name, token=bootstrap.token, offer=offer
        )

    def deployment(self, deployment_id: str) -> dict[str, Any] | None:
        """``GET …/deployment/{id}``'s ``data``, or None when it does not exist."""
        return self._get_object(f"{CAAS}/deployment/{deployment_id}", "data")

    def container_url(self, deployment_id: str) -> str | None:
        """The ``public_url`` of the deployment's (first) running container."""
        doc = self._api.json("GET", f"{CAAS}/deployment/{deployment_id}/containers")
        data = doc.get("data") if isinstance(doc, dict) else None
        for w in (data or {}).get("workers") or []:
            if not isinstance(w, dict) or str(w.get("status") or "running").lower() != "running":
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
            status = str(data.get("status") or "unknown").lower()
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
        except ApiError as exc:
            if exc.status == 404:
                return
            if exc.status in (400, 409):
                data = self.deployment(target.instance_id)
                if data is None or str(data.get("status") or "").lower() in _FAILED:
                    return
            raise
        log.info("ionet: terminated deployment %s (%s)", target.instance_id, target.name)

    def instances(self) -> list[Instance]:
        """Our deployments (names ``depin-…``) that are not finished."""
        out = []
        for row in self.deployments():
            name, status = row.get("name"), str(row.get("status") or "unknown").lower()
            if is_ours(name) and status not in _GONE:
                out.append(
                    Instance(
                        provider=self.name, instance_id=str(row.get("id")), name=str(name), status=status
                    )
                )
        return out
