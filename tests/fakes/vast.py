"""A fake Vast.ai REST API v0 (the endpoints ``vast-ai/vast-cli`` calls), on loopback.

Base URL ``<server>/api/v0``; ``Authorization: Bearer <key>`` (wrong or missing → 401). Routes:

- ``POST /bundles/``: filters ``{field: {op: value}}`` (ops eq, neq, gt, gte, lt, lte) over the offers, plus
  ``order``, ``type`` (on-demand | bid | reserved), ``limit``, ``allocated_storage`` → ``{"offers": [...]}``;
- ``PUT /asks/{offer_id}/``: rent (body as vast-cli's ``create_instance``) → ``{"success": true,
  "new_contract": id}``; an offer already rented or unknown → 400 ``{"success": false, "error": "no_such_ask"}``;
- ``GET /instances/?owner=me`` → ``{"instances": [...]}``; ``GET /instances/{id}/?owner=me`` → ``{"instances":
  row | null}``; ``DELETE /instances/{id}/`` → ``{"success": true}`` (unknown → 404).

A launched instance is a real machine here: the fake boots a real agent (``AgentProcess``) with the
``DEPIN_AGENT_TOKEN`` of the launch's ``env`` (the on-start script must run ``depin worker serve``; it is not
executed: the package is already installed here). While it boots the instance is ``loading``; then
``running`` with ``public_ipaddr`` 127.0.0.1 and ``ports`` mapping the ``-p`` port of ``env`` to the agent's
real port. Destroy stops the agent.

Failure injection: ``no_capacity`` (no offers, and renting fails), ``never_ready`` (instances stay ``loading``
without an agent), ``leak(label)`` (an instance a crashed flow left behind).
"""

from __future__ import annotations

import hmac
import itertools
import re
import threading
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes import AgentFactory, AgentPool, ServerThread, real_agent

DEFAULT_OFFERS: list[dict[str, Any]] = [
    {"id": 1001, "machine_id": 501, "host_id": 91, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.42, "reliability2": 0.995, "geolocation": "Ohio, US", "verified": True, "external": False,
     "rentable": True, "rented": False, "min_bid": 0.2, "cuda_max_good": 12.8, "disk_space": 200.0},
    {"id": 1002, "machine_id": 502, "host_id": 92, "gpu_name": "RTX 3090", "num_gpus": 1, "gpu_ram": 24576,
     "dph_total": 0.25, "reliability2": 0.97, "geolocation": "Quebec, CA", "verified": True, "external": False,
     "rentable": True, "rented": False, "min_bid": 0.1, "cuda_max_good": 12.4, "disk_space": 100.0},
    {"id": 1003, "machine_id": 503, "host_id": 93, "gpu_name": "A100 SXM4", "num_gpus": 2, "gpu_ram": 81920,
     "dph_total": 2.10, "reliability2": 0.999, "geolocation": "Oregon, US", "verified": True, "external": False,
     "rentable": True, "rented": False, "min_bid": 1.0, "cuda_max_good": 12.8, "disk_space": 500.0},
    {"id": 1004, "machine_id": 504, "host_id": 94, "gpu_name": "RTX 3060", "num_gpus": 1, "gpu_ram": 12288,
     "dph_total": 0.08, "reliability2": 0.90, "geolocation": "Texas, US", "verified": False, "external": False,
     "rentable": True, "rented": False, "min_bid": 0.04, "cuda_max_good": 12.2, "disk_space": 50.0},
]  # fmt: skip

_OPS = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
}
_QUERY_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
_PORT_KEY = re.compile(r"^-p (\d+):(\d+)(/tcp|/udp)?$")


def _err(status: int, error: str, msg: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": error, "msg": msg}, status_code=status)


class FakeVast:
    """The fake API plus its machines. ``with FakeVast(tmp_path, api_key="k") as fake: fake.base_url``."""

    def __init__(
        self,
        workdir: Path,
        *,
        api_key: str = "vast-test-key",
        offers: list[dict[str, Any]] | None = None,
        agent_factory: AgentFactory | None = real_agent,
    ) -> None:
        self.api_key = api_key
        self.offers = [dict(o) for o in (DEFAULT_OFFERS if offers is None else offers)]
        self.instances: dict[int, dict[str, Any]] = {}
        self.no_capacity = False
        self.never_ready = False
        self.launches = 0  # PUT /asks/ calls that rented something
        self.destroyed: list[int] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every authorised request
        self._ids = itertools.count(7001)
        self._lock = threading.Lock()
        self.pool = AgentPool(Path(workdir), agent_factory)
        self.server = ServerThread(
            Starlette(
                routes=[
                    Route("/api/v0/bundles/", self._bundles, methods=["POST"]),
                    Route("/api/v0/asks/{offer_id:int}/", self._ask, methods=["PUT"]),
                    Route("/api/v0/instances/", self._list, methods=["GET"]),
                    Route("/api/v0/instances/{iid:int}/", self._show, methods=["GET"]),
                    Route("/api/v0/instances/{iid:int}/", self._destroy, methods=["DELETE"]),
                ]
            )
        )

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/api/v0"

    def start(self) -> FakeVast:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.stop()
        self.pool.close()

    def __enter__(self) -> FakeVast:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            return _err(401, "auth_error", "invalid or missing API key")
        self.requests.append((request.method, request.url.path))
        return None

    def leak(self, label: str, *, status: str = "running") -> int:
        """An instance nobody will destroy (what a crashed flow leaves behind); its id."""
        with self._lock:
            iid = next(self._ids)
            self.instances[iid] = self._row(iid, self.offers[0], label, {}, status=status)
        return iid

    def _row(
        self, iid: int, offer: dict[str, Any], label: str | None, env: dict[str, str], *, status: str
    ) -> dict[str, Any]:
        return {
            "id": iid,
            "machine_id": offer.get("machine_id"),
            "host_id": offer.get("host_id"),
            "label": label,
            "actual_status": status,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "status_msg": "pulling image" if status == "loading" else "",
            "gpu_name": offer.get("gpu_name"),
            "num_gpus": offer.get("num_gpus"),
            "dph_total": offer.get("dph_total"),
            "public_ipaddr": "127.0.0.1",
            "ssh_host": "127.0.0.1",
            "ssh_port": None,
            "ports": {},
            "extra_env": [[k, v] for k, v in env.items() if not k.startswith("-")],
            "start_date": time.time(),
        }

    # ---- routes ----------------------------------------------------------------------------------------------
    async def _bundles(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            q = await request.json()
        except ValueError:
            return _err(400, "invalid_args", "body is not JSON")
        if not isinstance(q, dict) or q.get("type", "on-demand") not in ("on-demand", "bid", "reserved"):
            return _err(400, "invalid_args", "type must be on-demand, bid or reserved")
        if self.no_capacity:
            return JSONResponse({"offers": []})
        rows = []
        for offer in self.offers:
            ok = True
            for field, cond in q.items():
                if field in _QUERY_KEYS:
                    continue
                if not isinstance(cond, dict):
                    return _err(400, "invalid_args", f"filter {field} must be {{op: value}}")
                for op, value in cond.items():
                    if op not in _OPS:
                        return _err(400, "invalid_args", f"unknown operator {op} on {field}")
                    ok = ok and _OPS[op](offer.get(field), value)
            if ok:
                rows.append(dict(offer))
        for field, direction in reversed(q.get("order") or []):
            rows.sort(key=lambda o, f=field: (o.get(f) is None, o.get(f)), reverse=direction == "desc")
        if q.get("limit"):
            rows = rows[: int(q["limit"])]
        return JSONResponse({"offers": rows})

    async def _ask(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        body = await request.json()
        if body.get("client_id") != "me" or not isinstance(body.get("image"), str):
            return _err(400, "invalid_args", "client_id must be 'me' and image a string")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            return _err(400, "invalid_args", "env must be an object of strings")
        offer_id = int(request.path_params["offer_id"])
        with self._lock:
            offer = next((o for o in self.offers if o["id"] == offer_id), None)
            if self.no_capacity or offer is None or offer["rented"]:
                return _err(400, "no_such_ask", f"offer {offer_id} is no longer available")
            offer["rented"] = True
            iid = next(self._ids)
            self.instances[iid] = row = self._row(iid, offer, body.get("label"), env, status="loading")
            row["onstart"] = body.get("onstart")
            row["image_uuid"] = body["image"]
            row["image_runtype"] = body.get("runtype")
            self.launches += 1
        self._boot(iid, env, str(body.get("onstart") or ""))
        return JSONResponse({"success": True, "new_contract": iid})

    def _boot(self, iid: int, env: dict[str, str], onstart: str) -> None:
        row = self.instances[iid]
        token = env.get("DEPIN_AGENT_TOKEN", "")
        ports = [m.group(2) for k in env if (m := _PORT_KEY.match(k))]
        if "depin worker serve" not in onstart or not token or not ports:
            row.update(actual_status="exited", status_msg="onstart: agent did not start (token/port/command)")
            return
        if self.never_ready:
            return  # stays "loading" forever

        def ready(url: str) -> None:
            port = url.rsplit(":", 1)[1]
            with self._lock:
                if iid in self.instances:
                    row.update(
                        actual_status="running",
                        status_msg="",
                        ports={f"{ports[0]}/tcp": [{"HostIp": "0.0.0.0", "HostPort": port}]},
                    )

        def failed(why: str) -> None:
            row.update(actual_status="exited", status_msg=why)

        self.pool.boot(str(iid), token, ready, failed)

    async def _list(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        with self._lock:
            rows = [dict(r) for r in self.instances.values()]
        return JSONResponse({"instances": rows})

    async def _show(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        with self._lock:
            row = self.instances.get(int(request.path_params["iid"]))
            return JSONResponse({"instances": dict(row) if row else None})

    def _destroy(self, request: Request) -> JSONResponse:  # sync: stopping an agent blocks
        if (denied := self._auth(request)) is not None:
            return denied
        iid = int(request.path_params["iid"])
        with self._lock:
            row = self.instances.pop(iid, None)
            if row is not None:
                self.destroyed.append(iid)
                for offer in self.offers:
                    if offer.get("machine_id") == row.get("machine_id"):
                        offer["rented"] = False
        if row is None:
            return _err(404, "no_such_instance", f"instance {iid} not found")
        self.pool.stop(str(iid))
        return JSONResponse({"success": True})
