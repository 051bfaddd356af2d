"""A fake Vast.ai REST API (what the official ``vastai`` 1.9 client and our adapter call), on loopback.

Server root ``<server>`` (the official client's ``--url`` / ``VAST_URL``); ``base_url`` is ``<server>/api/v0``.
``Authorization: Bearer <key>`` (wrong or missing → 401 ``auth_error``). Errors are Vast's envelope
``{"success": false, "error": code, "msg": text}``. Routes:

- ``POST /api/v0/bundles/``: filters ``{field: {op: value}}`` (ops eq, neq, gt, gte, lt, lte, in, notin; values
  as the official client's query parser sends them: numbers may be strings, ``"1"``; ``rented`` defaults to
  ``{"eq": false}``) plus ``order``, ``type``
  (on-demand | bid | reserved), ``limit``, ``allocated_storage`` → ``{"offers": [...]}``;
- ``PUT /api/v0/asks/{offer_id}/``: rent (the official ``create_instance`` body) → ``{"success": true,
  "new_contract": id}``. 400 ``invalid_args`` / ``invalid_price`` for a body Vast refuses (image, label, env,
  onstart, disk, price, runtype limits); 403 for an offer the account may not rent (``foreign_offers``);
  404 ``invalid_args`` "no_such_ask … is not available" for an unknown offer; 410 ``no_such_ask`` for one
  already rented (or ``no_capacity``);
- ``GET /api/v1/instances/``: keyset pages (``limit`` ≤ 25, ``page_limit``) with ``select_filters``,
  ``order_by``, ``select_cols`` (JSON strings) and ``after_token`` → ``{"instances", "next_token",
  "total_instances", "label_counts", …}``; 400 ``invalid_request`` for a computed or unknown column,
  ``invalid_token`` for a bad token; 404 when ``v1`` is off (an API without it);
- ``GET /api/v0/instances/?owner=me`` → ``{"instances": [...]}`` (the older list);
  ``GET /api/v0/instances/{id}/?owner=me`` → ``{"instances": row | null}``;
  ``DELETE /api/v0/instances/{id}/`` → ``{"success": true}`` (unknown → 404 ``not_found``).

A launched instance is a real machine here: the fake runs the launch's ``onstart`` script for real with
``/bin/sh`` (``tests.support.node_image.ScriptAgent``: the script pip-installs this checkout's wheel into a
stand-in image and starts ``depin worker serve``) with the launch's ``env`` (``DEPIN_AGENT_TOKEN``), the agent
on a free loopback port. A test's own ``agent_factory`` replaces that (``None``: no agents). While it boots
the instance is ``loading``; then
``running`` with ``public_ipaddr`` 127.0.0.1 and ``ports`` mapping the ``-p`` port of ``env`` to the agent's
real port. Destroy stops the agent.

Failure injection: ``no_capacity`` (no offers, and renting fails), ``never_ready`` (instances stay ``loading``
without an agent), ``leak(label)`` (an instance a crashed flow left behind), ``foreign_offers`` (403 on
renting them), ``ask_error = (status, error, msg)`` (the next rent answers that), ``v1 = False``.
Seen: ``requests`` ((method, path) of every authorised request), ``calls`` (the same with the query
parameters), ``asks`` (every rent body).
"""

from __future__ import annotations

import base64
import functools
import hmac
import itertools
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.fakes import AgentFactory, AgentPool, ServerThread, real_agent, with_node_env

# Field names as the official client's Offer (vastai/data/offer.py): reliability (not reliability2),
# verification, score, duration (seconds the machine may still be rented), hosting_type.
_MONTH_S = 30 * 86400.0
DEFAULT_OFFERS: list[dict[str, Any]] = [
    {"id": 1001, "machine_id": 501, "host_id": 91, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.42, "reliability": 0.995, "geolocation": "Ohio, US", "verified": True, "external": False,
     "rentable": True, "rented": False, "min_bid": 0.2, "cuda_max_good": 12.8, "disk_space": 200.0,
     "verification": "verified", "score": 310.0, "duration": _MONTH_S, "hosting_type": 0},
    {"id": 1002, "machine_id": 502, "host_id": 92, "gpu_name": "RTX 3090", "num_gpus": 1, "gpu_ram": 24576,
     "dph_total": 0.25, "reliability": 0.97, "geolocation": "Quebec, CA", "verified": True, "external": False,
     "rentable": True, "rented": False, "min_bid": 0.1, "cuda_max_good": 12.4, "disk_space": 100.0,
     "verification": "verified", "score": 260.0, "duration": _MONTH_S, "hosting_type": 0},
    {"id": 1003, "machine_id": 503, "host_id": 93, "gpu_name": "A100 SXM4", "num_gpus": 2, "gpu_ram": 81920,
     "dph_total": 2.10, "reliability": 0.999, "geolocation": "Oregon, US", "verified": True, "external": False,
     "rentable": True, "rented": False, "min_bid": 1.0, "cuda_max_good": 12.8, "disk_space": 500.0,
     "verification": "verified", "score": 410.0, "duration": _MONTH_S, "hosting_type": 1},
    {"id": 1004, "machine_id": 504, "host_id": 94, "gpu_name": "RTX 3060", "num_gpus": 1, "gpu_ram": 12288,
     "dph_total": 0.08, "reliability": 0.90, "geolocation": "Texas, US", "verified": False, "external": False,
     "rentable": True, "rented": False, "min_bid": 0.04, "cuda_max_good": 12.2, "disk_space": 50.0,
     "verification": "unverified", "score": 90.0, "duration": _MONTH_S, "hosting_type": 0},
]  # fmt: skip

_QUERY_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
# the official client sends "on-demand", Vast's spec says "ondemand"
_OFFER_TYPES = {"on-demand", "ondemand", "bid", "reserved"}
_PORT_KEY = re.compile(r"^-p (\d+):(\d+)(/tcp|/udp)?$")
# Vast's v1 instance list cannot filter on computed columns (its spec: dph_total, num_gpus, … answer 400)
_COMPUTED = {"dph_total", "num_gpus", "dlperf", "dlperf_per_dphtotal", "flops_per_dphtotal", "score",
             "duration"}  # fmt: skip
_RUNTYPES = {"ssh", "ssh_direc", "ssh_direct", "ssh_proxy", "jupyter", "jupyter_direc", "jupyter_direct",
             "jupyter_proxy", "args"}  # fmt: skip
MAX_PAGE = 25


class BadQuery(ValueError):
    """A filter Vast would refuse with 400."""


def _like(actual: Any, wanted: Any, field: str) -> Any:
    """``wanted`` in ``actual``'s type: the official client's query parser sends numbers as strings (``"1"``)."""
    if isinstance(actual, bool):
        if isinstance(wanted, str) and wanted.lower() in ("true", "false"):
            return wanted.lower() == "true"
        return wanted
    if isinstance(actual, int | float) and isinstance(wanted, str):
        try:
            return float(wanted)
        except ValueError:
            return wanted
    if field == "gpu_name" and isinstance(wanted, str):  # "RTX_3090" (the docs) = "RTX 3090" (the client)
        return wanted.replace("_", " ")
    return wanted


def _test(field: str, op: str, actual: Any, wanted: Any) -> bool:
    if op in ("in", "notin"):
        if not isinstance(wanted, list):
            raise BadQuery(f"operator {op} on {field} needs a list")
        hit = any(actual == _like(actual, w, field) for w in wanted)
        return hit if op == "in" else not hit
    w = _like(actual, wanted, field)
    if op == "eq":
        return actual == w
    if op == "neq":
        return actual != w
    if op not in ("gt", "gte", "lt", "lte"):
        raise BadQuery(f"unknown operator {op} on {field}")
    if actual is None or w is None:
        return False
    try:
        return {"gt": actual > w, "gte": actual >= w, "lt": actual < w, "lte": actual <= w}[op]
    except TypeError:
        return False


def _matches(row: dict[str, Any], filters: dict[str, Any]) -> bool:
    ok = True
    for field, cond in filters.items():
        if not isinstance(cond, dict):
            raise BadQuery(f"filter {field} must be {{op: value}}")
        for op, value in cond.items():
            ok = _test(field, op, row.get(field), value) and ok
    return ok


def _compare(a: list[Any], b: list[Any], dirs: list[str]) -> int:
    """Row keys ``a`` and ``b`` in the order of ``dirs`` (None last in either direction)."""
    for x, y, d in zip(a, b, dirs, strict=True):
        kx, ky = (x is None, x), (y is None, y)
        if kx == ky:
            continue
        try:
            c = -1 if kx < ky else 1
        except TypeError:
            c = -1 if str(kx) < str(ky) else 1
        return -c if d == "desc" and x is not None and y is not None else c
    return 0


def _token(values: list[Any], cols: list[str]) -> str:
    doc = {"values": dict(zip(cols, values, strict=True))}
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()


def _untoken(token: str, cols: list[str]) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))["values"]
        return [values[c] for c in cols]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadQuery("invalid after_token") from exc


def _err(status: int, error: str, msg: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": error, "msg": msg}, status_code=status)


def _ask_err(status: int, error: str, msg: str, offer_id: int) -> JSONResponse:
    body = {"success": False, "error": error, "msg": msg, "ask_id": offer_id}
    return JSONResponse(body, status_code=status)


def _invalid_ask(body: dict[str, Any]) -> tuple[str, str] | None:
    """``(error, why)`` when Vast would refuse a rent body with 400 (its spec's input limits), else None."""
    image = body.get("image")
    if body.get("client_id") != "me":
        return "invalid_args", "client_id must be 'me'"
    if not body.get("template_hash_id") and not (isinstance(image, str) and 0 < len(image) <= 1024):
        return "invalid_args", "image is required (at most 1024 characters)"
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        return "invalid_args", "env must be an object of strings"
    if any(len(k) > 256 or len(v) > 256 for k, v in env.items()) or len(json.dumps(env)) > 32768:
        return "invalid_args", "env entries are limited to 256 characters (32768 in all)"
    label = body.get("label")
    if label is not None and (not isinstance(label, str) or len(label) > 256):
        return "invalid_args", "label must be a string of at most 256 characters"
    launch = [body.get("onstart"), body.get("args_str"), *(body.get("args") or [])]
    if sum(len(str(x)) for x in launch if x) > 4096:
        return "invalid_args", "onstart and args are limited to 4096 characters together"
    disk = body.get("disk", 8.0)
    if not isinstance(disk, int | float) or disk < 8.0:
        return "invalid_args", "disk must be at least 8 GB"
    price = body.get("price")
    if price is not None and (not isinstance(price, int | float) or not 0.001 <= price <= 128.0):
        return "invalid_price", "price must be between 0.001 and 128 $/h"
    runtype = body.get("runtype")
    if runtype is not None and (not isinstance(runtype, str) or not set(runtype.split()) <= _RUNTYPES):
        return "invalid_args", f"unknown runtype {runtype!r}"
    return None


def _json_param(params: Any, name: str, default: Any) -> Any:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadQuery(f"{name} is not JSON") from exc


def _page(
    rows: list[dict[str, Any]],
    *,
    filters: Any,
    order: Any,
    limit: int,
    after: str | None,
    page_limit: int,
) -> tuple[list[dict[str, Any]], int, dict[str, int], str | None]:
    """One keyset page of ``rows``: ``(page, total matching, label counts, next token or None)``."""
    if not isinstance(filters, dict) or not isinstance(order, list):
        raise BadQuery("select_filters must be an object and order_by a list")
    columns = set(rows[0]) if rows else set()
    for field in filters:
        if field in _COMPUTED or (columns and field not in columns):
            raise BadQuery(f"{field} is not a valid search key")
    cols, dirs = [], []
    for item in order:
        col = item.get("col") if isinstance(item, dict) else None
        if not isinstance(col, str) or col in _COMPUTED or (columns and col not in columns):
            raise BadQuery(f"{col} is not a valid order column")
        cols.append(col)
        dirs.append("desc" if item.get("dir") == "desc" else "asc")
    if "id" not in cols:  # the id is always the tiebreaker
        cols.append("id")
        dirs.append("asc")
    matching = [r for r in rows if _matches(r, filters)]
    key = functools.cmp_to_key(lambda a, b: _compare([a[c] for c in cols], [b[c] for c in cols], dirs))
    matching.sort(key=key)
    counts: dict[str, int] = {}
    for r in matching:
        counts[r.get("label") or ""] = counts.get(r.get("label") or "", 0) + 1
    start = matching
    if after:
        last = _untoken(after, cols)
        start = [r for r in matching if _compare([r[c] for c in cols], last, dirs) > 0]
    size = min(page_limit, limit if limit > 0 else 5, MAX_PAGE)
    page = start[:size]
    more = len(start) > size
    next_token = _token([page[-1][c] for c in cols], cols) if more and page else None
    return page, len(matching), counts, next_token


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
        self.calls: list[tuple[str, str, dict[str, str]]] = []  # the same with the query parameters
        self.asks: list[dict[str, Any]] = []  # every PUT /asks/ body, as sent
        self.v1 = True  # serve GET /api/v1/instances/ (False: 404, an API without it)
        self.page_limit = MAX_PAGE  # the most rows a v1 page holds (tests lower it to see paging)
        self.foreign_offers: set[int] = set()  # offers this account may not rent (403)
        self.ask_error: tuple[int, str, str] | None = None  # (status, error, msg) for the next PUT /asks/
        self._ids = itertools.count(7001)
        self._lock = threading.Lock()
        self.pool = AgentPool(Path(workdir), agent_factory)
        self.server = ServerThread(
            Starlette(
                routes=[
                    Route("/api/v0/bundles/", self._bundles, methods=["POST"]),
                    Route("/api/v0/asks/{offer_id:int}/", self._ask, methods=["PUT"]),
                    Route("/api/v0/instances/", self._list, methods=["GET"]),
                    Route("/api/v1/instances/", self._list_v1, methods=["GET"]),
                    Route("/api/v0/instances/{iid:int}/", self._show, methods=["GET"]),
                    Route("/api/v0/instances/{iid:int}/", self._destroy, methods=["DELETE"]),
                ]
            )
        )

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/api/v0"

    @property
    def server_url(self) -> str:
        """The root the official client takes (``--url`` / ``VAST_URL`` / ``VastAI(server_url=…)``)."""
        return self.server.url

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
        self.calls.append((request.method, request.url.path, dict(request.query_params)))
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
            "extra_env": [[k, v] for k, v in env.items()],  # "-p" keys too, as Vast's spec shows
            "image_uuid": None,
            "image_runtype": None,
            "onstart": None,
            "verification": "verified" if offer.get("verified") else "unverified",
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
        if not isinstance(q, dict) or q.get("type", "on-demand") not in _OFFER_TYPES:
            return _err(400, "invalid_args", "type must be on-demand, bid or reserved")
        # Vast's spec: rented defaults to {"eq": false} (the official CLI and SDK leave it out)
        filters = {"rented": {"eq": False}, **{k: v for k, v in q.items() if k not in _QUERY_KEYS}}
        try:
            rows = [dict(o) for o in self.offers if _matches(o, filters)]
        except BadQuery as exc:
            return _err(400, "invalid_args", str(exc))
        if self.no_capacity:
            return JSONResponse({"offers": []})
        for field, direction in reversed(q.get("order") or []):
            rows.sort(key=lambda o, f=field: (o.get(f) is None, o.get(f)), reverse=direction == "desc")
        if q.get("limit"):
            rows = rows[: int(q["limit"])]
        return JSONResponse({"offers": rows})

    async def _ask(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        offer_id = int(request.path_params["offer_id"])
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _ask_err(
                400, "invalid_args", "error 400: Invalid args: the body must be a JSON object", offer_id
            )
        self.asks.append(body)
        if self.ask_error is not None:
            (status, error, msg), self.ask_error = self.ask_error, None
            return _ask_err(status, error, msg, offer_id)
        if (problem := _invalid_ask(body)) is not None:
            return _ask_err(400, problem[0], f"error 400: Invalid args: {problem[1]}", offer_id)
        env = body.get("env") or {}
        with self._lock:
            offer = next((o for o in self.offers if o["id"] == offer_id), None)
            if offer is None:
                msg = f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available."
                return _ask_err(404, "invalid_args", msg, offer_id)
            if offer_id in self.foreign_offers:
                msg = f"error 403/3586: Offer {offer_id} is not your own. Hosts can only rent their own machines."
                return _ask_err(403, "invalid_args", msg, offer_id)
            if self.no_capacity or offer["rented"]:
                msg = f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available."
                return _ask_err(410, "no_such_ask", msg, offer_id)
            offer["rented"] = True
            iid = next(self._ids)
            self.instances[iid] = row = self._row(iid, offer, body.get("label"), env, status="loading")
            row["onstart"] = body.get("onstart")
            row["image_uuid"] = body.get("image")
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

        factory = self.pool.factory
        node_env = {k: v for k, v in env.items() if not k.startswith("-")}
        if factory is not None and factory is not real_agent:
            factory = with_node_env(factory, node_env)
        if factory is real_agent:  # the instance runs the on-start script it was given, as Vast does
            from tests.support.node_image import ScriptAgent

            def factory(data_dir: Path, tok: str) -> ScriptAgent:
                return ScriptAgent(data_dir, tok, ["/bin/sh", "-c", onstart], node_env)

        self.pool.boot(str(iid), token, ready, failed, factory=factory)

    async def _list(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        with self._lock:
            rows = [dict(r) for r in self.instances.values()]
        return JSONResponse({"instances": rows})

    async def _list_v1(self, request: Request) -> JSONResponse:
        if not self.v1:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if (denied := self._auth(request)) is not None:
            return denied
        params = request.query_params
        with self._lock:
            rows = [dict(r) for r in self.instances.values()]
        try:
            page, total, counts, next_token = _page(
                rows,
                filters=_json_param(params, "select_filters", {}),
                order=_json_param(params, "order_by", [{"col": "id", "dir": "asc"}]),
                limit=int(params.get("limit") or MAX_PAGE),
                after=params.get("after_token"),
                page_limit=self.page_limit,
            )
            cols = _json_param(params, "select_cols", ["*"])
        except BadQuery as exc:
            error = "invalid_token" if "after_token" in str(exc) else "invalid_request"
            return _err(400, error, f"Error in query parameters: {exc}")
        except ValueError:
            return _err(400, "invalid_request", "Error in query parameters: limit must be an integer")
        if cols != ["*"]:
            page = [{c: r.get(c) for c in cols} for r in page]
        return JSONResponse(
            {
                "success": True,
                "instances_found": len(page),
                "total_instances": total,
                "label_counts": counts,
                "next_token": next_token,
                "instances": page,
            }
        )

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
            return _err(404, "not_found", "Instance not found")
        self.pool.stop(str(iid))
        return JSONResponse({"success": True, "msg": "Instance destroyed successfully"})
