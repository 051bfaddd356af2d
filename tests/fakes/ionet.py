"""A fake io.net IO Cloud CaaS API (the API-key routes of io.net's published OpenAPI), on loopback.

Header ``x-api-key`` (wrong or missing → 401 ``{"detail": …}``). Routes under
``/enterprise/v1/io-cloud/caas``:

- ``GET /hardware/max-gpus-per-container`` → ``{"data": {"hardware": [HardwareInfo], "total"}}``;
- ``GET /available-replicas?hardware_id&hardware_qty`` → ``{"data": [{"id", "iso2", "name",
  "available_replicas"}]}``;
- ``GET /price?location_ids=[..]&hardware_id&duration_hours&gpus_per_container&replica_count`` → ``{"data":
  {"total_cost_usdc", "ionet_fee", "currency_conversion_fee"}}``;
- ``POST /deploy`` (``CaaSDeployClusterRequest``, validated like the spec: no extra fields, required fields,
  ranges → 422 ``{"detail": [...]}``) → ``{"status": "deployment requested", "deployment_id": uuid}``; no
  free replica → 400;
- ``GET /deployments?status&page&page_size`` → ``{"data": {"deployments": [...], "total", "statuses"}}``;
- ``GET /deployment/{id}`` → ``{"data": DeploymentDetails}`` (secret env values are never echoed, only
  ``secret_env_keys``); ``GET /deployment/{id}/containers`` → ``{"data": {"total", "workers": [WorkerData]}}``;
- ``DELETE /deployment/{id}`` → ``{"status": "termination requested", "deployment_id"}`` (unknown → 404).

A deployment boots a real agent (``AgentProcess``) with ``container_config.secret_env_variables
["DEPIN_AGENT_TOKEN"]`` (entrypoint/args must run ``depin worker serve``; not executed here): ``deployment
requested`` while it boots, then ``running`` with the container's ``public_url`` = the agent's URL. Delete
stops it (status ``destroyed``).

Failure injection: ``no_capacity`` (nothing available, deploy fails), ``never_ready`` (stays ``deployment
requested``), ``leak(name)``.
"""

from __future__ import annotations

import hmac
import json
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes import AgentFactory, AgentPool, ServerThread, real_agent

CAAS = "/enterprise/v1/io-cloud/caas"

DEFAULT_HARDWARE: list[dict[str, Any]] = [
    {"hardware_id": 7, "hardware_name": "H100 80GB", "brand_name": "NVIDIA", "max_gpus_per_container": 8,
     "available": 4, "price": 2.19},
    {"hardware_id": 12, "hardware_name": "RTX 4090", "brand_name": "NVIDIA", "max_gpus_per_container": 4,
     "available": 6, "price": 0.39},
    {"hardware_id": 15, "hardware_name": "A100 40GB", "brand_name": "NVIDIA", "max_gpus_per_container": 8,
     "available": 0, "price": 1.10},
]  # fmt: skip
DEFAULT_LOCATIONS = [{"id": 9, "iso2": "DE", "name": "Frankfurt"}, {"id": 4, "iso2": "US", "name": "Iowa"}]
FEE = 0.02  # io.net fee share added to the compute cost

_DEPLOY_FIELDS = {
    "resource_private_name", "node_pool_id", "duration_hours", "gpus_per_container", "hardware_id",
    "location_ids", "container_config", "registry_config",
}  # fmt: skip
_DEPLOY_REQUIRED = {
    "resource_private_name", "duration_hours", "gpus_per_container", "hardware_id", "container_config",
    "registry_config",
}  # fmt: skip
_CONTAINER_FIELDS = {"replica_count", "env_variables", "secret_env_variables", "entrypoint", "traffic_port", "args",
                     "command"}  # fmt: skip
_REGISTRY_FIELDS = {"image_url", "registry_username", "registry_secret"}


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def _invalid(loc: list[str | int], msg: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}, status_code=422)


def _validate_deploy(body: Any) -> JSONResponse | None:
    """422 like FastAPI for a body that breaks ``CaaSDeployClusterRequest``; None when valid."""
    if not isinstance(body, dict):
        return _invalid(["body"], "must be an object")
    for extra in sorted(set(body) - _DEPLOY_FIELDS):
        return _invalid(["body", extra], "Extra inputs are not permitted")
    for missing in sorted(_DEPLOY_REQUIRED - set(body)):
        return _invalid(["body", missing], "Field required")
    if not isinstance(body["resource_private_name"], str) or not body["resource_private_name"]:
        return _invalid(["body", "resource_private_name"], "must be a non-empty string")
    if not isinstance(body["duration_hours"], int) or not 0 < body["duration_hours"] <= 8760:
        return _invalid(["body", "duration_hours"], "must be an integer in (0, 8760]")
    if not isinstance(body["gpus_per_container"], int) or not 1 <= body["gpus_per_container"] <= 8:
        return _invalid(["body", "gpus_per_container"], "must be an integer in [1, 8]")
    if not isinstance(body["hardware_id"], int):
        return _invalid(["body", "hardware_id"], "must be an integer")
    locs = body.get("location_ids")
    if locs is not None and (not isinstance(locs, list) or len(locs) != 1 or not isinstance(locs[0], int)):
        return _invalid(["body", "location_ids"], "one location id (only single locations are supported)")
    cc = body["container_config"]
    if not isinstance(cc, dict):
        return _invalid(["body", "container_config"], "must be an object")
    for extra in sorted(set(cc) - _CONTAINER_FIELDS):
        return _invalid(["body", "container_config", extra], "Extra inputs are not permitted")
    for req in ("replica_count", "traffic_port"):
        if not isinstance(cc.get(req), int):
            return _invalid(["body", "container_config", req], "Field required (integer)")
    for key in ("env_variables", "secret_env_variables"):
        v = cc.get(key, {})
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            return _invalid(["body", "container_config", key], "must be an object of strings")
    for key in ("entrypoint", "args"):
        v = cc.get(key)
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v)):
            return _invalid(["body", "container_config", key], "must be a non-empty list of strings or null")
    rc = body["registry_config"]
    if not isinstance(rc, dict) or not isinstance(rc.get("image_url"), str):
        return _invalid(["body", "registry_config", "image_url"], "Field required")
    for extra in sorted(set(rc) - _REGISTRY_FIELDS):
        return _invalid(["body", "registry_config", extra], "Extra inputs are not permitted")
    return None


class FakeIonet:
    """The fake API plus its machines. ``with FakeIonet(tmp_path, api_key="k") as fake: fake.base_url``."""

    def __init__(
        self,
        workdir: Path,
        *,
        api_key: str = "ionet-test-key",
        hardware: list[dict[str, Any]] | None = None,
        locations: list[dict[str, Any]] | None = None,
        agent_factory: AgentFactory | None = real_agent,
    ) -> None:
        self.api_key = api_key
        self.hardware = [dict(h) for h in (DEFAULT_HARDWARE if hardware is None else hardware)]
        self.locations = [dict(loc) for loc in (DEFAULT_LOCATIONS if locations is None else locations)]
        self.deployments: dict[str, dict[str, Any]] = {}
        self.no_capacity = False
        self.never_ready = False
        self.launches = 0
        self.deploy_bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.pool = AgentPool(Path(workdir), agent_factory)
        self.server = ServerThread(
            Starlette(
                routes=[
                    Route(f"{CAAS}/hardware/max-gpus-per-container", self._hardware, methods=["GET"]),
                    Route(f"{CAAS}/available-replicas", self._replicas, methods=["GET"]),
                    Route(f"{CAAS}/price", self._price, methods=["GET"]),
                    Route(f"{CAAS}/deploy", self._deploy, methods=["POST"]),
                    Route(f"{CAAS}/deployments", self._list, methods=["GET"]),
                    Route(f"{CAAS}/deployment/{{dep_id}}", self._details, methods=["GET"]),
                    Route(f"{CAAS}/deployment/{{dep_id}}", self._delete, methods=["DELETE"]),
                    Route(f"{CAAS}/deployment/{{dep_id}}/containers", self._containers, methods=["GET"]),
                ]
            )
        )

    @property
    def base_url(self) -> str:
        return self.server.url

    def start(self) -> FakeIonet:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.stop()
        self.pool.close()

    def __enter__(self) -> FakeIonet:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        got = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(got.encode(), self.api_key.encode()):
            return JSONResponse({"detail": "Invalid or missing API key"}, status_code=401)
        return None

    def _hw(self, hardware_id: int) -> dict[str, Any] | None:
        return next((h for h in self.hardware if h["hardware_id"] == hardware_id), None)

    def _free_replicas(self, hw: dict[str, Any], gpus: int) -> int:
        if self.no_capacity or gpus > hw["max_gpus_per_container"]:
            return 0
        return hw["available"] // gpus

    def leak(self, name: str) -> str:
        """A running deployment nobody will delete (what a crashed flow leaves behind); its id."""
        dep_id = str(uuid.uuid4())
        with self._lock:
            self.deployments[dep_id] = self._record(dep_id, name, self.hardware[0], 1, 1, {}, [], "running")
        return dep_id

    def _record(
        self,
        dep_id: str,
        name: str,
        hw: dict[str, Any],
        gpus: int,
        hours: int,
        cc: dict[str, Any],
        locs: list[dict[str, Any]],
        status: str,
    ) -> dict[str, Any]:
        return {
            "id": dep_id,
            "name": name,
            "status": status,
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "amount_paid": round(hw["price"] * gpus * hours * (1 + FEE), 4),
            "completed_percent": 0.0,
            "total_gpus": gpus,
            "gpus_per_container": gpus,
            "total_containers": 1,
            "hardware_name": hw["hardware_name"],
            "hardware_id": hw["hardware_id"],
            "locations": locs,
            "brand_name": hw["brand_name"],
            "compute_minutes_served": 0,
            "compute_minutes_remaining": hours * 60,
            "container_config": {
                "entrypoint": cc.get("entrypoint"),
                "env_variables": cc.get("env_variables") or {},
                "traffic_port": cc.get("traffic_port", 0),
                "image_url": "",
                "secret_env_keys": sorted((cc.get("secret_env_variables") or {}).keys()),
            },
            "_workers": [],
        }

    # ---- routes ----------------------------------------------------------------------------------------------
    async def _hardware(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        rows = [{**h, "available": 0 if self.no_capacity else h["available"]} for h in self.hardware]
        return JSONResponse({"data": {"hardware": rows, "total": sum(r["available"] for r in rows)}})

    async def _replicas(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            hw_id, qty = int(request.query_params["hardware_id"]), int(request.query_params["hardware_qty"])
        except (KeyError, ValueError):
            return _invalid(["query", "hardware_id"], "hardware_id and hardware_qty are required integers")
        hw = self._hw(hw_id)
        if hw is None:
            return JSONResponse({"detail": "Not found"}, status_code=404)
        free = self._free_replicas(hw, qty)
        return JSONResponse({"data": [{**loc, "available_replicas": free} for loc in self.locations]})

    async def _price(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        qp = request.query_params
        try:
            locs = json.loads(qp["location_ids"])
            hw_id, hours = int(qp["hardware_id"]), int(qp["duration_hours"])
            gpus, replicas = int(qp["gpus_per_container"]), int(qp["replica_count"])
        except (KeyError, ValueError):
            return _invalid(["query"], "location_ids (JSON array), hardware_id, duration_hours, "
                            "gpus_per_container, replica_count are required")  # fmt: skip
        hw = self._hw(hw_id)
        if hw is None or not isinstance(locs, list) or min(hours, gpus, replicas) < 1:
            return _invalid(["query"], "unknown hardware or a value below 1")
        compute = hw["price"] * gpus * hours * replicas
        fee = round(compute * FEE, 6)
        return JSONResponse(
            {
                "data": {
                    "total_cost_usdc": round(compute + fee, 6),
                    "ionet_fee": fee,
                    "currency_conversion_fee": 0,
                }
            }
        )

    async def _deploy(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _invalid(["body"], "JSON decode error")
        if (bad := _validate_deploy(body)) is not None:
            return bad
        self.deploy_bodies.append(body)
        hw = self._hw(body["hardware_id"])
        if hw is None:
            return JSONResponse({"detail": f"hardware {body['hardware_id']} not found"}, status_code=404)
        gpus, cc = body["gpus_per_container"], body["container_config"]
        locs = [loc for loc in self.locations if loc["id"] in (body.get("location_ids") or [])]
        with self._lock:
            if self._free_replicas(hw, gpus) < cc["replica_count"]:
                return JSONResponse(
                    {"detail": "Not enough available replicas for the selected hardware and location"},
                    status_code=400,
                )
            hw["available"] -= gpus * cc["replica_count"]
            dep_id = str(uuid.uuid4())
            rec = self._record(
                dep_id, body["resource_private_name"], hw, gpus, body["duration_hours"], cc, locs,
                "deployment requested",
            )  # fmt: skip
            rec["container_config"]["image_url"] = body["registry_config"]["image_url"]
            self.deployments[dep_id] = rec
            self.launches += 1
        self._boot(dep_id, cc)
        return JSONResponse({"status": "deployment requested", "deployment_id": dep_id})

    def _boot(self, dep_id: str, cc: dict[str, Any]) -> None:
        rec = self.deployments[dep_id]
        token = (cc.get("secret_env_variables") or {}).get("DEPIN_AGENT_TOKEN", "")
        command = " ".join([*(cc.get("entrypoint") or []), *(cc.get("args") or []), cc.get("command") or ""])
        if "depin worker serve" not in command or not token:
            rec["status"] = "failed"
            return
        if self.never_ready:
            return

        def ready(url: str) -> None:
            with self._lock:
                if rec["status"] == "deployment requested":
                    rec.update(status="running", started_at=_now())
                    rec["_workers"] = [
                        {
                            "device_id": str(uuid.uuid4()),
                            "container_id": f"ctr-{dep_id[:8]}",
                            "hardware": rec["hardware_name"],
                            "brand_name": rec["brand_name"],
                            "created_at": _now(),
                            "uptime_percent": 100.0,
                            "gpus_per_container": rec["gpus_per_container"],
                            "status": "running",
                            "container_events": [{"time": _now(), "message": "Container started"}],
                            "public_url": url,
                        }
                    ]

        def failed(why: str) -> None:
            rec["status"] = "failed"

        self.pool.boot(dep_id, token, ready, failed)

    async def _list(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            page = int(request.query_params.get("page", 0))
            size = int(request.query_params.get("page_size", 10))
        except ValueError:
            return _invalid(["query", "page"], "page and page_size must be integers")
        if not 1 <= size <= 100:
            return _invalid(["query", "page_size"], "must be in [1, 100]")
        status = request.query_params.get("status")
        with self._lock:
            rows = [
                {
                    "id": d["id"],
                    "status": d["status"],
                    "name": d["name"],
                    "completed_percent": d["completed_percent"],
                    "hardware_quantity": d["total_gpus"],
                    "brand_name": d["brand_name"],
                    "hardware_name": d["hardware_name"],
                    "compute_minutes_served": d["compute_minutes_served"],
                    "compute_minutes_remaining": d["compute_minutes_remaining"],
                    "created_at": d["created_at"],
                }
                for d in self.deployments.values()
                if status in (None, "", d["status"])
            ]
        statuses = sorted({r["status"] for r in rows})
        return JSONResponse(
            {
                "data": {
                    "deployments": rows[page * size : (page + 1) * size],
                    "total": len(rows),
                    "statuses": statuses,
                }
            }
        )

    async def _details(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        with self._lock:
            rec = self.deployments.get(request.path_params["dep_id"])
            if rec is None:
                return JSONResponse({"detail": "Not found"}, status_code=404)
            data = {k: v for k, v in rec.items() if not k.startswith("_") and k != "name"}
        return JSONResponse({"data": data})

    async def _containers(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        with self._lock:
            rec = self.deployments.get(request.path_params["dep_id"])
            if rec is None:
                return JSONResponse({"detail": "Not found"}, status_code=404)
            workers = [dict(w) for w in rec["_workers"]]
        return JSONResponse({"data": {"total": len(workers), "workers": workers}})

    def _delete(self, request: Request) -> JSONResponse:  # sync: stopping an agent blocks
        if (denied := self._auth(request)) is not None:
            return denied
        dep_id = request.path_params["dep_id"]
        with self._lock:
            rec = self.deployments.get(dep_id)
            if rec is None:
                return JSONResponse({"detail": "Not found"}, status_code=404)
            if rec["status"] in ("destroyed", "termination requested"):
                return JSONResponse({"detail": "Deployment is already terminated"}, status_code=400)
            rec.update(status="termination requested")
        self.pool.stop(dep_id)
        with self._lock:
            rec.update(status="destroyed", finished_at=_now(), _workers=[])
            hw = self._hw(rec["hardware_id"])
            if hw is not None:
                hw["available"] += rec["total_gpus"]
        return JSONResponse({"status": "termination requested", "deployment_id": dep_id})
