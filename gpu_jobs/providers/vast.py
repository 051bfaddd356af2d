"""Vast.ai: rent an on-demand instance of a stock PyTorch image whose on-start script runs our agent.

REST API v0 (``https://console.vast.ai/api/v0``, ``Authorization: Bearer <key>``), as the ``vast-ai/vast-cli``
client calls it:

- offers: ``POST /bundles/`` with filters ``{"verified": {"eq": true}, "external": {"eq": false}, "rentable":
  {"eq": true}, "rented": {"eq": false}, "num_gpus": {"gte": n}, "gpu_ram": {"gte": MB}, "order":
  [["dph_total", "asc"]], "type": "on-demand", "limit", "allocated_storage"}`` → ``{"offers": [...]}``
  (``id``, ``machine_id``, ``gpu_name``, ``num_gpus``, ``gpu_ram`` MB, ``dph_total`` $/h, ``reliability2``,
  ``geolocation``);
- launch: ``PUT /asks/{offer_id}/`` ``{"client_id": "me", "image", "env", "price", "disk", "label",
  "onstart", "runtype", …}`` → ``{"success": true, "new_contract": instance_id}``. ``env`` is vast-cli's
  parsed form: ``{"DEPIN_AGENT_TOKEN": …, "-p 8900:8900": "1"}`` (the ``-p`` key exposes the agent port);
- status: ``GET /instances/{id}/?owner=me`` → ``{"instances": {...} | null}`` (``actual_status``,
  ``intended_status``, ``status_msg``, ``public_ipaddr``, ``ports`` = ``{"8900/tcp": [{"HostIp",
  "HostPort"}]}``); the agent is ``http://<public_ipaddr>:<HostPort of 8900/tcp>``;
- ours: ``GET /instances/?owner=me`` → ``{"instances": [...]}``, filtered by ``label``;
- destroy: ``DELETE /instances/{id}/``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from pydantic import SecretStr

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.providers._http import ApiError
from gpu_jobs.providers._market import MarketProvider
from gpu_jobs.providers.base import (
    DEFAULT_AGENT_PORT,
    Bootstrap,
    Instance,
    NoCapacity,
    Offer,
    Worker,
    is_ours,
)
from gpu_jobs.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_URL = "https://console.vast.ai/api/v0"
KEY_ENV = "DEPIN_VAST_API_KEY"
RUNTYPE = "ssh_direc ssh_proxy"  # vast-cli's --ssh --direct: the on-start script runs, ports map directly
_FAILED = {"exited", "offline", "dead", "failed"}


def agent_url(row: dict[str, Any], port: int) -> str | None:
    """``http://<public_ipaddr>:<host port mapped to port/tcp>`` of an instance row, when both are known."""
    ip = str(row.get("public_ipaddr") or "").strip()
    ports = row.get("ports") or {}
    if isinstance(ports, str):  # some API versions serialise the mapping as a JSON string
        try:
            ports = json.loads(ports)
        except ValueError:
            ports = {}
    binding = ports.get(f"{port}/tcp") if isinstance(ports, dict) else None
    if not ip or not binding:
        return None
    host_port = binding[0].get("HostPort") if isinstance(binding, list) and binding else None
    return f"http://{ip}:{int(host_port)}" if host_port else None


class VastProvider(MarketProvider):
    """Vast.ai on-demand instances (see the module doc for the endpoints).

    ``poll_s``: the longest pause between ``wait_ready`` polls (it starts at 0.25 s and doubles up to it).
    ``transport`` (the Vast API) and ``agent_transport`` (agent health probes) are test seams. The API key is
    a ``SecretStr`` and never leaves the ``Authorization`` header.
    """

    name = "vast"

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str = DEFAULT_URL,
        *,
        poll_s: float = 5.0,
        timeout: float = 30.0,
        search_limit: int = 64,
        verified_only: bool = True,
        agent_port: int = DEFAULT_AGENT_PORT,
        transport: httpx.BaseTransport | None = None,
        agent_transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            api_key,
            base_url,
            auth_headers=lambda key: {"Authorization": f"Bearer {key}", "Accept": "application/json"},
            key_hint=KEY_ENV,
            poll_s=poll_s,
            timeout=timeout,
            transport=transport,
            agent_transport=agent_transport,
        )
        self.search_limit = search_limit
        self.verified_only = verified_only
        self.agent_port = agent_port
        self._ports: dict[str, int] = {}  # instance id → agent port of the launches made here

    # ---- offers ----------------------------------------------------------------------------------------------
    def search_query(self, spec: JobSpec, *, disk_gb: float = 32.0) -> dict[str, Any]:
        """The ``POST /bundles/`` body for ``spec`` (cheapest first)."""
        q: dict[str, Any] = {
            "external": {"eq": False},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "num_gpus": {"gte": max(1, spec.resources.gpu_count)},
        }
        if self.verified_only:
            q["verified"] = {"eq": True}
        if spec.resources.min_vram_gb > 0:
            q["gpu_ram"] = {"gte": spec.resources.min_vram_gb * 1000}  # MB, vast-cli's multiplier
        q["order"] = [["dph_total", "asc"]]
        q["type"] = "on-demand"
        q["limit"] = self.search_limit
        q["allocated_storage"] = disk_gb
        return q

    def quote(self, spec: JobSpec) -> list[Offer]:
        """On-demand offers that meet ``spec.resources`` (``[]`` when none)."""
        doc = self._api.json("POST", "/bundles/", json=self.search_query(spec))
        rows = (doc.get("offers") if isinstance(doc, dict) else None) or []
        offers = []
        for row in rows:
            try:
                offers.append(self._offer(row))
            except (KeyError, TypeError, ValueError) as exc:
                log.debug("vast: skipping an offer the API described oddly (%s)", exc)
        return offers

    def _offer(self, row: dict[str, Any]) -> Offer:
        host = row.get("machine_id") if row.get("machine_id") is not None else row.get("host_id")
        reliability = row.get("reliability2", row.get("reliability"))
        return Offer(
            provider=self.name,
            offer_id=str(row["id"]),
            host=None if host is None else str(host),
            gpu_name=str(row.get("gpu_name") or "unknown"),
            gpu_count=int(row.get("num_gpus") or 0),
            vram_gb=float(row.get("gpu_ram") or 0) / 1000.0,
            usd_per_hour=float(row["dph_total"]),
            reliability=None if reliability is None else float(reliability),
            region=(str(row["geolocation"]) if row.get("geolocation") else None),
            spot=False,
            max_duration_s=None if row.get("duration") is None else float(row["duration"]),
        )

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def _rows(self) -> list[dict[str, Any]]:
        doc = self._api.json("GET", "/instances/", params={"owner": "me"})
        rows = doc.get("instances") if isinstance(doc, dict) else None
        return [r for r in rows or [] if isinstance(r, dict)]

    def find(self, name: str) -> dict[str, Any] | None:
        """Our instance labelled ``name`` (the newest when several), or None."""
        rows = [r for r in self._rows() if r.get("label") == name]
        return max(rows, key=lambda r: int(r.get("id") or 0)) if rows else None

    def launch(self, offer: Offer, bootstrap: Bootstrap, *, name: str) -> Worker:
        """Rent ``offer`` as instance ``name`` running the bootstrap on start; an instance already labelled
        ``name`` is returned instead (no second rental). ``NoCapacity`` when the offer is gone."""
        if not is_ours(name):
            raise PermanentError(f"vast: instance name {name!r} must start with 'depin-' (see worker_name)")
        existing = self.find(name)
        if existing is not None:
            log.info("vast: %s exists already (instance %s); not renting again", name, existing.get("id"))
            iid = str(existing["id"])
            self._ports.setdefault(iid, bootstrap.port)
            return Worker(
                provider=self.name,
                instance_id=iid,
                name=name,
                url=agent_url(existing, bootstrap.port) or "",
                token=bootstrap.token,
                offer=offer,
            )
        body = {
            "client_id": "me",
            "image": bootstrap.image,
            "env": {**bootstrap.env(), f"-p {bootstrap.port}:{bootstrap.port}": "1"},
            "price": None,  # on-demand (a bid price would make it interruptible)
            "disk": bootstrap.disk_gb,
            "label": name,
            "onstart": bootstrap.script(background=True),
            "runtype": RUNTYPE,
            "image_login": None,
            "cancel_unavail": True,
        }
        try:
            r = self._api.request("PUT", f"/asks/{offer.offer_id}/", json=body, idempotent=False)
        except ApiError as exc:
            if exc.status in (400, 404, 410):
                raise NoCapacity(
                    f"vast: offer {offer.offer_id} can no longer be rented ({exc.detail or exc.status}); "
                    "quote again"
                ) from None
            raise
        doc = r.json()
        if not doc.get("success", True) or doc.get("new_contract") is None:
            raise NoCapacity(
                f"vast: renting offer {offer.offer_id} failed: {doc.get('msg') or doc.get('error')}"
            )
        iid = str(doc["new_contract"])
        self._ports[iid] = bootstrap.port
        log.info("vast: rented offer %s as instance %s (%s)", offer.offer_id, iid, name)
        return Worker(provider=self.name, instance_id=iid, name=name, token=bootstrap.token, offer=offer)

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        """``GET /instances/{id}/?owner=me``: the row, or None when the instance does not exist (any more)."""
        return self._get_object(f"/instances/{instance_id}/", "instances", params={"owner": "me"})

    def wait_ready(self, worker: Worker, *, timeout_s: float) -> Worker:
        """Poll until the instance runs and its agent answers ``/v1/health`` with the token; the worker with
        its ``url``. ``TransientError`` when it failed, vanished or is not ready within ``timeout_s``."""
        port = self._ports.get(worker.instance_id, self.agent_port)
        what = f"vast: instance {worker.instance_id} ({worker.name})"

        def probe() -> tuple[str | None, str]:
            row = self.instance(worker.instance_id)
            if row is None:
                raise TransientError(f"{what} is gone")
            status = str(row.get("actual_status") or "unknown")
            last = f"status {status}" + (f" ({row['status_msg']})" if row.get("status_msg") else "")
            if status in _FAILED or row.get("intended_status") == "stopped":
                raise TransientError(f"{what} failed: {last}")
            if status != "running":
                return None, last
            url = agent_url(row, port)
            return url, last if url else f"running, but port {port}/tcp is not mapped yet"

        return self._poll_until_healthy(worker, probe, what=what, timeout_s=timeout_s)

    def destroy(self, target: Worker | Instance) -> None:
        """``DELETE /instances/{id}/``; an instance already gone is fine."""
        try:
            r = self._api.request("DELETE", f"/instances/{target.instance_id}/", json={}, ok=(200, 201, 204))
        except ApiError as exc:
            if exc.status in (404, 410) or "no_such" in exc.detail or "not found" in exc.detail.lower():
                return
            raise
        self._ports.pop(target.instance_id, None)
        if r.content:
            try:
                doc = r.json()
            except ValueError:
                return
            if isinstance(doc, dict) and doc.get("success") is False:
                msg = str(doc.get("msg") or doc.get("error") or "")
                if "no_such" not in msg and "not found" not in msg.lower():
                    raise TransientError(f"vast: destroying instance {target.instance_id} failed: {msg}")
        log.info("vast: destroyed instance %s (%s)", target.instance_id, target.name)

    def instances(self) -> list[Instance]:
        """Our instances whose label starts with ``depin-``."""
        out = []
        for row in self._rows():
            label = row.get("label")
            if not is_ours(label):
                continue
            iid = str(row.get("id"))
            out.append(
                Instance(
                    provider=self.name,
                    instance_id=iid,
                    name=str(label),
                    status=str(row.get("actual_status") or "unknown"),
                    url=agent_url(row, self._ports.get(iid, self.agent_port)),
                    usd_per_hour=None if row.get("dph_total") is None else float(row["dph_total"]),
                )
            )
        return out
