"""A fake io.net IO Cloud CaaS API on loopback: the API-key routes of io.net's published OpenAPI, plus what
io.net's own client (the ``ionet-cloud`` SDK 0.4.x, ``import iocloud``) sends and reads.

Header ``x-api-key``: a wrong key → 401 ``{"detail": …}``; a missing one too, except on ``/hardware`` and
``/price``, which io.net answers anonymously. Routes under ``/enterprise/v1/io-cloud/caas``:

- ``GET /hardware`` → ``{"data": [{"hardware_id", "hardware_name", "brand_name", "location", "price" (USD per
  GPU-hour), "available" (free GPUs there), "network", "max_gpus_per_container", "min_gpus_per_container",
  "confidential_compute"}]}``, one row per hardware type and location; ``hardware_id`` may be a string;
- deprecated, still served: ``GET /hardware/max-gpus-per-container`` and ``GET /available-replicas``;
- ``GET /price?hardware_id&duration_hours&gpus_per_container&replica_count[&location_ids=[id]]`` → ``{"data":
  {"total_cost_usdc", "available_replica_count", "ionet_fee", …}}``; ``gpus_per_container`` outside what the
  service accepts (``accepted_gpus``, {8} like production today) → 422 naming the field;
- ``POST /deploy``: ``CaaSDeployClusterRequest`` as published (no other fields, required fields, ranges → 422
  ``{"detail": [{"loc", "msg", "type"}]}``) plus what the SDK adds (``payment_source``,
  ``on_incomplete_booking``, ``resource_id``; ``hardware_id`` int or str; ``public_ingress_enabled`` /
  ``tls_required``) → ``{"status": "success", "deployment_id": uuid}``; no free container → 422 ``{"status":
  "failed", "error": "Not enough available replicas …"}``;
- ``GET /deployments?status&page&page_size`` → ``{"data": {"deployments": [...], "total", "statuses"}}``; pages
  count from ``first_page`` (1, as the SDK sends; the spec's default is 0), a page below it → 422 (or, with
  ``clamp_pages``, the first page again);
- ``GET /deployment/{id}`` → ``{"data": DeploymentDetails}`` (no ``name``; secret env values never echoed, only
  ``secret_env_keys``); ``GET /deployment/{id}/containers`` → ``{"data": {"total", "workers": [WorkerData]}}``;
- ``DELETE /deployment/{id}`` → ``{"status": "termination requested", "deployment_id"}`` (unknown → 404).

A deployment runs its container's ``entrypoint`` + ``args`` for real (``tests.support.node_image.ScriptAgent``:
the bootstrap pip-installs this checkout's wheel into a stand-in image and starts ``depin worker serve``) with
``env_variables`` and ``secret_env_variables`` (``DEPIN_AGENT_TOKEN``); a test's own ``agent_factory`` replaces
that (``None``: no agents). ``deployment requested`` while it boots, then ``running`` with the container's ``public_url`` = the agent's URL. Delete stops it (status
``destroyed``) and frees its GPUs. ``calls`` records every request (method, path, query).

Failure injection: ``no_capacity`` (nothing available, deploy fails), ``never_ready`` (stays ``deployment
requested``), ``fail_next(route, status, body)`` (one answer for ``"price"`` / ``"deploy"`` / ``"list"``),
``leak(name)``.
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

from tests.support.fakes import AgentFactory, AgentPool, ServerThread, real_agent, with_node_env

CAAS = "/enterprise/v1/io-cloud/caas"

# ``available``: free GPUs per location id. Hardware "203" has a numeric-string id, as io.net lists some.
DEFAULT_HARDWARE: list[dict[str, Any]] = [
    {"hardware_id": 7, "hardware_name": "H100 80GB", "brand_name": "NVIDIA", "max_gpus_per_container": 8,
     "price": 2.19, "available": {9: 16, 4: 8}},
    {"hardware_id": "203", "hardware_name": "RTX 4090", "brand_name": "NVIDIA", "max_gpus_per_container": 8,
     "price": 0.39, "available": {9: 8, 4: 24}},
    {"hardware_id": 15, "hardware_name": "A100 40GB", "brand_name": "NVIDIA", "max_gpus_per_container": 8,
     "price": 1.10, "available": {9: 0, 4: 0}},
    {"hardware_id": 21, "hardware_name": "L4", "brand_name": "NVIDIA", "max_gpus_per_container": 4,
     "price": 0.25, "available": {9: 4}},
]  # fmt: skip
DEFAULT_LOCATIONS = [
    {"id": 9, "iso2": "DE", "name": "Germany"},
    {"id": 4, "iso2": "US", "name": "United States"},
]
FEE = 0.02  # io.net fee share added to the compute cost
ACCEPTED_GPUS = frozenset({8})  # gpus_per_container io.net accepts in production today

_DEPLOY_FIELDS = {
    "resource_private_name", "node_pool_id", "duration_hours", "gpus_per_container", "hardware_id",
    "location_ids", "container_config", "registry_config",
    "resource_id", "payment_source", "on_incomplete_booking",  # sent by the SDK, absent from the spec
}  # fmt: skip
_DEPLOY_REQUIRED = {
    "resource_private_name", "duration_hours", "gpus_per_container", "hardware_id", "container_config",
    "registry_config",
}  # fmt: skip
_CONTAINER_FIELDS = {"replica_count", "env_variables", "secret_env_variables", "entrypoint", "traffic_port", "args",
                     "command", "public_ingress_enabled", "tls_required"}  # fmt: skip
_REGISTRY_FIELDS = {"image_url", "registry_username", "registry_secret"}
_ENUMS = {
    "payment_source": {"credits", "payment"},
    "on_incomplete_booking": {"full_refund", "partial_refund", "extend_booked"},
}


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def _invalid(loc: list[str | int], msg: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}, status_code=422)


def _is_id(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(v))


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
    if not _is_id(body["hardware_id"]):
        return _invalid(["body", "hardware_id"], "must be an integer or a string id")
    locs = body.get("location_ids")
    if locs is not None and (not isinstance(locs, list) or len(locs) != 1 or not _is_id(locs[0])):
        return _invalid(["body", "location_ids"], "one location id (only single locations are supported)")
    if locs is not None and body.get("node_pool_id") is not None:
        return _invalid(["body", "node_pool_id"], "can't be used if location_ids are provided")
    for key, allowed in _ENUMS.items():
        if key in body and body[key] not in allowed:
            return _invalid(["body", key], f"Input should be one of {sorted(allowed)}")
    if body.get("resource_id") is not None and not isinstance(body["resource_id"], str):
        return _invalid(["body", "resource_id"], "must be a string (uuid)")
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
    for key in ("public_ingress_enabled", "tls_required"):
        if cc.get(key) is not None and not isinstance(cc[key], bool):
            return _invalid(["body", "container_config", key], "must be a boolean or null")
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
        accepted_gpus: frozenset[int] = ACCEPTED_GPUS,
        first_page: int = 1,
        agent_factory: AgentFactory | None = real_agent,
    ) -> None:
        self.api_key = api_key
        self.hardware = [
            {**h, "available": dict(h["available"])}
            for h in (DEFAULT_HARDWARE if hardware is None else hardware)
        ]
        self.locations = [dict(loc) for loc in (DEFAULT_LOCATIONS if locations is None else locations)]
        self.accepted_gpus = accepted_gpus
        self.first_page = first_page
        self.clamp_pages = False  # True: a page below first_page is served as first_page, not refused
        self.deployments: dict[str, dict[str, Any]] = {}
        self.no_capacity = False
        self.never_ready = False
        self.launches = 0
        self.deploy_bodies: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self._faults: dict[str, list[tuple[int, Any]]] = {}
        self._lock = threading.Lock()
        self.pool = AgentPool(Path(workdir), agent_factory)
        self.server = ServerThread(
            Starlette(
                routes=[
                    Route(f"{CAAS}/hardware", self._hardware, methods=["GET"]),
                    Route(f"{CAAS}/hardware/max-gpus-per-container", self._max_gpus, methods=["GET"]),
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

    def fail_next(self, route: str, status: int, body: Any) -> None:
        """Answer the next ``route`` request (``"price"``, ``"deploy"``, ``"list"``) with ``status`` + ``body``."""
        self._faults.setdefault(route, []).append((status, body))

    def paths(self) -> set[str]:
        """The distinct paths requested so far."""
        return {path for _, path, _ in self.calls}

    # ---- helpers --------------------------------------------------------------------------------------------
    def _auth(self, request: Request, *, anonymous: bool = False) -> JSONResponse | None:
        self.calls.append((request.method, request.url.path, dict(request.query_params)))
        got = request.headers.get("x-api-key")
        if got is None and anonymous:
            return None
        if not hmac.compare_digest((got or "").encode(), self.api_key.encode()):
            return JSONResponse({"detail": "Invalid or missing API key"}, status_code=401)
        return None

    def _fault(self, route: str) -> JSONResponse | None:
        with self._lock:
            queue = self._faults.get(route)
            if not queue:
                return None
            status, body = queue.pop(0)
        return JSONResponse(body, status_code=status)

    def _hw(self, hardware_id: Any) -> dict[str, Any] | None:
        return next((h for h in self.hardware if str(h["hardware_id"]) == str(hardware_id)), None)

    def _loc(self, loc_id: Any) -> dict[str, Any] | None:
        return next((loc for loc in self.locations if str(loc["id"]) == str(loc_id)), None)

    def _free(self, hw: dict[str, Any], loc_id: Any) -> int:
        """Free GPUs of ``hw`` at location ``loc_id``."""
        if self.no_capacity:
            return 0
        return next((n for k, n in hw["available"].items() if str(k) == str(loc_id)), 0)

    def _replicas_per_location(self, hw: dict[str, Any], gpus: int, loc_ids: list[Any]) -> list[int]:
        """Free containers of ``gpus`` GPUs at each of ``loc_ids`` (0 where the hardware holds fewer)."""
        if gpus > hw["max_gpus_per_container"]:
            return [0 for _ in loc_ids]
        return [self._free(hw, loc) // gpus for loc in loc_ids]

    def leak(self, name: str) -> str:
        """A running deployment nobody will delete (what a crashed flow leaves behind); its id."""
        dep_id = str(uuid.uuid4())
        gpus = max(self.accepted_gpus)
        with self._lock:
            self.deployments[dep_id] = self._record(
                dep_id, name, self.hardware[0], gpus, 1, {}, self.locations[0], "running"
            )
        return dep_id

    def _record(
        self,
        dep_id: str,
        name: str,
        hw: dict[str, Any],
        gpus: int,
        hours: int,
        cc: dict[str, Any],
        loc: dict[str, Any],
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
            "locations": [loc],
            "brand_name": hw["brand_name"],
            "compute_minutes_served": 0,
            "compute_minutes_remaining": hours * 60,
            "container_config": {
                "entrypoint": cc.get("entrypoint"),
                "args": cc.get("args"),
                "command": cc.get("command"),
                "env_variables": cc.get("env_variables") or {},
                "traffic_port": cc.get("traffic_port", 0),
                "replica_count": cc.get("replica_count", 1),
                "image_url": "",
                "secret_env_keys": sorted((cc.get("secret_env_variables") or {}).keys()),
            },
            "_location": loc["id"],
            "_workers": [],
        }

    # ---- routes ----------------------------------------------------------------------------------------------
    async def _hardware(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request, anonymous=True)) is not None:
            return denied
        rows = []
        for h in self.hardware:
            for loc_id in h["available"]:
                loc, free = self._loc(loc_id), self._free(h, loc_id)
                rows.append(
                    {
                        "hardware_id": h["hardware_id"],
                        "hardware_name": h["hardware_name"],
                        "brand_name": h["brand_name"],
                        "location": loc["name"] if loc else str(loc_id),
                        "price": h["price"],
                        "available": free,
                        "network": free // max(self.accepted_gpus),
                        "max_gpus_per_container": h["max_gpus_per_container"],
                        "min_gpus_per_container": None,
                        "confidential_compute": False,
                    }
                )
        return JSONResponse({"data": rows})

    async def _max_gpus(self, request: Request) -> JSONResponse:  # deprecated by io.net
        if (denied := self._auth(request)) is not None:
            return denied
        rows = [
            {
                "hardware_id": h["hardware_id"],
                "hardware_name": h["hardware_name"],
                "brand_name": h["brand_name"],
                "max_gpus_per_container": h["max_gpus_per_container"],
                "available": sum(self._free(h, loc) for loc in h["available"]),
                "price": h["price"],
            }
            for h in self.hardware
        ]
        return JSONResponse({"data": {"hardware": rows, "total": sum(r["available"] for r in rows)}})

    async def _replicas(self, request: Request) -> JSONResponse:  # deprecated by io.net
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            hw_id, qty = request.query_params["hardware_id"], int(request.query_params["hardware_qty"])
        except (KeyError, ValueError):
            return _invalid(["query", "hardware_id"], "hardware_id and hardware_qty are required")
        hw = self._hw(hw_id)
        if hw is None or qty < 1:
            return JSONResponse({"detail": "Not found"}, status_code=404)
        ids = [loc["id"] for loc in self.locations]
        free = self._replicas_per_location(hw, qty, ids)
        return JSONResponse(
            {"data": [{**loc, "available_replicas": n} for loc, n in zip(self.locations, free, strict=True)]}
        )

    async def _price(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request, anonymous=True)) is not None:
            return denied
        if (fault := self._fault("price")) is not None:
            return fault
        qp = request.query_params
        try:
            hw_id, hours = qp["hardware_id"], int(qp["duration_hours"])
            gpus, replicas = int(qp["gpus_per_container"]), int(qp["replica_count"])
            locs = json.loads(qp["location_ids"]) if "location_ids" in qp else None
        except (KeyError, ValueError):
            return _invalid(["query"], "hardware_id, duration_hours, gpus_per_container, replica_count are "
                            "required; location_ids is a JSON array")  # fmt: skip
        if locs is not None and (not isinstance(locs, list) or len(locs) != 1 or self._loc(locs[0]) is None):
            return _invalid(["query", "location_ids"], "one known location id, as a JSON array")
        if gpus not in self.accepted_gpus:
            return _invalid(["query", "gpus_per_container"],
                            f"gpus_per_container must be one of {sorted(self.accepted_gpus)}")  # fmt: skip
        hw = self._hw(hw_id)
        if hw is None or min(hours, replicas) < 1:
            return _invalid(["query", "hardware_id"], "unknown hardware, or a value below 1")
        ids = locs if locs is not None else [loc["id"] for loc in self.locations]
        compute = hw["price"] * gpus * hours * replicas
        fee = round(compute * FEE, 6)
        data = {
            "replica_count": replicas,
            "gpus_per_container": gpus,
            "available_replica_count": self._replicas_per_location(hw, gpus, ids),
            "discount": 0.0,
            "ionet_fee": fee,
            "ionet_fee_percent": FEE * 100,
            "currency_conversion_fee": 0.0,
            "currency_conversion_fee_percent": 0.0,
            "total_cost_usdc": round(compute + fee, 6),
            "min_non_promotional_credits_required": 0.0,
        }
        return JSONResponse({"data": data})

    async def _deploy(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        if (fault := self._fault("deploy")) is not None:
            return fault
        try:
            body = await request.json()
        except ValueError:
            return _invalid(["body"], "JSON decode error")
        if (bad := _validate_deploy(body)) is not None:
            return bad
        gpus, cc = body["gpus_per_container"], body["container_config"]
        if gpus not in self.accepted_gpus:
            return _invalid(["body", "gpus_per_container"],
                            f"gpus_per_container must be one of {sorted(self.accepted_gpus)}")  # fmt: skip
        self.deploy_bodies.append(body)
        hw = self._hw(body["hardware_id"])
        if hw is None:
            return JSONResponse({"detail": f"hardware {body['hardware_id']} not found"}, status_code=404)
        wanted = body.get("location_ids") or list(hw["available"])
        with self._lock:
            free = self._replicas_per_location(hw, gpus, wanted)
            best = max(range(len(wanted)), key=lambda i: free[i])
            if free[best] < cc["replica_count"]:
                return JSONResponse(
                    {"status": "failed", "error": f"Not enough available replicas of {hw['hardware_name']} "
                     f"with {gpus} GPUs per container in the selected location(s)"},
                    status_code=422,
                )  # fmt: skip
            loc = self._loc(wanted[best]) or {"id": wanted[best], "iso2": "", "name": str(wanted[best])}
            key = next(k for k in hw["available"] if str(k) == str(loc["id"]))
            hw["available"][key] -= gpus * cc["replica_count"]
            dep_id = str(uuid.uuid4())
            rec = self._record(
                dep_id, body["resource_private_name"], hw, gpus, body["duration_hours"], cc, loc,
                "deployment requested",
            )  # fmt: skip
            rec["container_config"]["image_url"] = body["registry_config"]["image_url"]
            self.deployments[dep_id] = rec
            self.launches += 1
        self._boot(dep_id, cc)
        return JSONResponse({"status": "success", "deployment_id": dep_id})

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

        factory = self.pool.factory
        node_env = {**(cc.get("env_variables") or {}), **(cc.get("secret_env_variables") or {})}
        if factory is not None and factory is not real_agent:
            factory = with_node_env(factory, node_env)
        if factory is real_agent:  # the container runs its entrypoint + args, as io.net does
            from tests.support.node_image import ScriptAgent

            argv = [*(cc.get("entrypoint") or []), *(cc.get("args") or [])]

            def factory(data_dir: Path, tok: str) -> ScriptAgent:
                return ScriptAgent(data_dir, tok, argv, node_env)

        self.pool.boot(dep_id, token, ready, failed, factory=factory)

    async def _list(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        if (fault := self._fault("list")) is not None:
            return fault
        try:
            page = int(request.query_params.get("page", self.first_page))
            size = int(request.query_params.get("page_size", 10))
        except ValueError:
            return _invalid(["query", "page"], "page and page_size must be integers")
        if page < self.first_page and not self.clamp_pages:
            return _invalid(["query", "page"], f"Input should be greater than or equal to {self.first_page}")
        page = max(page, self.first_page)
        if not 1 <= size <= 100:
            return _invalid(["query", "page_size"], "must be in [1, 100]")
        status = request.query_params.get("status") or None
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
                if status in (None, d["status"])
            ]
        statuses = sorted({r["status"] for r in rows})
        start = (page - self.first_page) * size
        return JSONResponse(
            {"data": {"deployments": rows[start : start + size], "total": len(rows), "statuses": statuses}}
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
            key = next((k for k in (hw or {}).get("available", {}) if str(k) == str(rec["_location"])), None)
            if hw is not None and key is not None:
                hw["available"][key] += rec["total_gpus"]
        return JSONResponse({"status": "termination requested", "deployment_id": dep_id})
