"""A small, scriptable DIMO look-alike on loopback for the client tests (no tests here).

It follows DIMO's public APIs (sources in connectors/dimo/emulator/README.md) for the shapes the client depends on: web3 challenge auth,
token exchange (current and legacy body), identity paging, telemetry ``signals``/``availableSignals``. Faults are
scripted per path: ``server.script("/telemetry/query", 429, 503, "drop", "malformed")``.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import jwt
import orjson
import uvicorn
from eth_account import Account
from eth_account.messages import encode_defunct
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connectors.dimo.go_duration import parse_go_duration
from connectors.dimo.privileges import PERMISSION_TO_ID, encode_sacd_permissions

SECRET = "test-secret-for-the-fake-dimo-server-0123456789"
SIGNER = Account.from_key("0x" + "11" * 32)
CLIENT_ID = Account.from_key("0x" + "22" * 32).address
DOMAIN = "http://localhost/callback"
NOW = datetime(2026, 1, 10, tzinfo=UTC)
# optional alias, signal name, aggregation: ``s0: speed(agg: AVG)`` or ``speed(agg: AVG)``
_FIELD = re.compile(r"(?:(\w+):\s*)?(\w+)\(agg: (\w+)\)")


async def _form(request: Request) -> dict[str, str]:
    """Form fields (python-multipart is not installed, and url-encoded bodies need nothing more)."""
    return {k: v[-1] for k, v in parse_qs((await request.body()).decode()).items()}


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers=headers, media_type="application/json")


@dataclass
class FakeState:
    dev_ttl: float = 3600.0
    vehicle_ttl: float = 600.0
    clock: Any = time.time
    # token id -> granted privilege ids
    vehicles: dict[int, set[int]] = field(default_factory=lambda: {3: {1, 4}, 2: {1}, 1: {4}})
    available: list[str] = field(
        default_factory=lambda: ["speed", "powertrainType", "currentLocationCoordinates"]
    )
    complexity_limit: int = 100
    max_buckets: int = 10**9  # more buckets than this → "maximum execution time" error
    sacd_supported: bool = True
    # dataSummary: "missing" = unknown field (422, like a server without it), "null" = answered with null
    data_summary: str = "missing"
    page_size: int = 100
    scripts: dict[str, deque[Any]] = field(default_factory=lambda: defaultdict(deque))
    hits: Counter[str] = field(default_factory=Counter)
    challenges: dict[str, str] = field(default_factory=dict)
    revoked_vehicle_tokens: set[str] = field(default_factory=set)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    telemetry_queries: list[dict[str, Any]] = field(default_factory=list)


def _bucket_rows(
    fields: list[tuple[str, str, str]], start: datetime, end: datetime, step: timedelta
) -> list[dict]:
    """Deterministic rows: bucket k has data unless k % 5 == 4; speed is null when k % 3 == 2."""
    rows = []
    t, k = start, 0
    while t < end:
        if k % 5 != 4:
            row: dict[str, Any] = {"timestamp": t.strftime("%Y-%m-%dT%H:%M:%SZ")}
            for alias, name, _agg in fields:
                key = alias or name  # the response key is the alias when the query sets one
                if name == "currentLocationCoordinates":
                    row[key] = {"latitude": 40.0 + k / 1000, "longitude": -73.0} if k % 2 == 0 else None
                elif name == "powertrainType":
                    row[key] = "ELECTRIC"
                elif name == "speed":
                    row[key] = (
                        None if k % 3 == 2 else int(t.timestamp() // 60 % 100)
                    )  # ints must become floats
                else:
                    row[key] = float(k)
            rows.append(row)
        t += step
        k += 1
    return rows


def create_app(state: FakeState) -> Starlette:
    def scripted(path: str) -> Response | str | None:
        q = state.scripts.get(path)
        if not q:
            return None
        item = q.popleft()
        if item == 429:
            return _json({"message": "slow down"}, 429, {"retry-after": "3"})
        if isinstance(item, int):
            return _json({"message": f"status {item}"}, item)
        return item  # "drop" / "malformed" handled by the caller

    def wrap(path: str, handler):
        async def endpoint(request: Request) -> Response:
            state.hits[path] += 1
            action = scripted(path)
            if isinstance(action, Response):
                return action
            resp = await handler(request)
            if action == "malformed":
                return Response(
                    resp.body[: len(resp.body) // 2], resp.status_code, media_type="application/json"
                )
            if action == "drop":
                return _DroppedResponse()
            return resp

        return endpoint

    async def generate(request: Request) -> Response:
        form = await _form(request)
        if form.get("client_id") != CLIENT_ID:
            return Response(f'Invalid client_id ("{form.get("client_id")}").', 404, media_type="text/html")
        nonce = base64.b16encode(str(len(state.challenges)).encode()).decode()
        text = f"auth wants you to sign in with your Ethereum account:\n{form['address']}\n\nNonce: {nonce}"
        state.challenges[nonce] = text
        return _json({"state": nonce, "challenge": text})

    async def submit(request: Request) -> Response:
        form = await _form(request)
        text = state.challenges.pop(str(form.get("state")), None)
        if text is None:
            return _json({"status": 400, "message": "Requested resource does not exist."}, 400)
        signer = Account.recover_message(encode_defunct(text=text), signature=str(form["signature"]))
        if signer != SIGNER.address:
            return _json({"status": 400, "message": "Could not verify signature."}, 400)
        now = state.clock()
        token = jwt.encode(
            {
                "aud": CLIENT_ID,
                "iat": int(now),
                "exp": int(now + state.dev_ttl),
                "jti": text[-8:],
                "ethereum_address": CLIENT_ID,
            },
            SECRET,
        )
        return _json({"access_token": token, "token_type": "bearer", "expires_in": int(state.dev_ttl)})

    def bearer(request: Request) -> dict[str, Any] | None:
        auth = request.headers.get("authorization", "")
        try:
            claims = jwt.decode(
                auth.removeprefix("Bearer "),
                SECRET,
                algorithms=["HS256"],
                options={"verify_aud": False, "verify_exp": False},
            )
        except jwt.PyJWTError:
            return None
        if claims["exp"] <= state.clock() or auth.removeprefix("Bearer ") in state.revoked_vehicle_tokens:
            return None
        return claims

    async def exchange(request: Request) -> Response:
        if bearer(request) is None:
            return Response("Invalid or expired JWT", 401, media_type="text/plain")
        body = orjson.loads(await request.body())
        state.exchanges.append(body)
        if body.get("asset"):  # the current form: did:erc721:<chain>:<contract>:<token id> + permission names
            tid = int(body["asset"].rsplit(":", 1)[1])
            privs = {PERMISSION_TO_ID[p] for p in body["permissions"]}
        else:
            tid, privs = int(body["tokenId"]), set(body["privileges"])
        if not privs <= state.vehicles.get(tid, set()):
            return _json(
                {
                    "code": 403,
                    "message": f"Address {CLIENT_ID} lacks permissions {sorted(privs)} for asset "
                    f"did:erc721:137:0x:{tid}",
                },
                403,
            )
        now = state.clock()
        token = jwt.encode(
            {
                "token_id": str(tid),
                "privilege_ids": sorted(privs),
                "iat": int(now),
                "jti": str(len(state.exchanges)),
                "exp": int(now + state.vehicle_ttl),
            },
            SECRET,
        )
        return _json({"token": token})

    async def identity(request: Request) -> Response:
        doc = orjson.loads(await request.body())
        query, variables = doc["query"], doc.get("variables") or {}
        if "sacd(" in query and not state.sacd_supported:
            return _json(
                {
                    "errors": [
                        {
                            "message": 'Cannot query field "sacd" on type "Vehicle".',
                            "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"},
                        }
                    ],
                    "data": None,
                },
                422,
            )
        ids = sorted(state.vehicles, reverse=True)
        after = variables.get("after")
        if after:
            ids = [i for i in ids if i < int(base64.b64decode(after))]
        page, more = ids[: state.page_size], len(ids) > state.page_size
        nodes = []
        for tid in page:
            perms = encode_sacd_permissions(state.vehicles[tid])
            node = {
                "tokenId": tid,
                "owner": "0x" + "ab" * 20,
                "definition": {"make": "Tesla", "model": "3", "year": 2022},
            }
            if "sacd(" in query:
                node["sacd"] = {"permissions": perms} if state.vehicles[tid] else None
            else:
                node["sacds"] = {
                    "nodes": [{"grantee": CLIENT_ID.upper().replace("0X", "0x"), "permissions": perms}]
                }
            nodes.append(node)
        cursor = base64.b64encode(str(page[-1]).encode()).decode() if page else None
        return _json(
            {"data": {"vehicles": {"pageInfo": {"hasNextPage": more, "endCursor": cursor}, "nodes": nodes}}}
        )

    async def telemetry(request: Request) -> Response:
        claims = bearer(request)
        if claims is None:
            return _json({"message": "JWT is invalid."}, 401)
        doc = orjson.loads(await request.body())
        query, v = doc["query"], doc.get("variables") or {}
        if int(claims["token_id"]) != int(v["tokenId"]):
            return _json({"errors": [{"message": "unauthorized: token id does not match"}], "data": None})
        if "availableSignals" in query:
            return _json({"data": {"availableSignals": state.available}})
        if "dataSummary" in query:
            if state.data_summary == "null":
                return _json({"data": {"dataSummary": None}})
            message = 'Cannot query field "dataSummary" on type "Query".'
            return _json(
                {"errors": [{"message": message, "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}]}, 422
            )
        state.telemetry_queries.append(v)
        fields = _FIELD.findall(query)
        cost = 2 + sum(3 if n == "currentLocationCoordinates" else 1 for _, n, _ in fields)
        if cost > state.complexity_limit:
            return _json(
                {
                    "errors": [
                        {
                            "message": f"operation has complexity {cost}, which exceeds the limit of "
                            f"{state.complexity_limit}",
                            "extensions": {"code": "COMPLEXITY_LIMIT_EXCEEDED"},
                        }
                    ],
                    "data": None,
                },
                422,
            )
        privs = set(claims["privilege_ids"])
        for _, name, _ in fields:
            need = 4 if name.startswith("currentLocation") else 1
            if need not in privs:
                return _json(
                    {
                        "errors": [
                            {
                                "message": "unauthorized: missing required privilege(s) "
                                "privilege:GetLocationHistory"
                                if need == 4
                                else "unauthorized: missing required privilege(s) privilege:GetNonLocationHistory",
                                "path": ["signals", name],
                            }
                        ],
                        "data": {"signals": None},
                    }
                )
        start = datetime.fromisoformat(v["from"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(v["to"].replace("Z", "+00:00"))
        step = parse_go_duration(v["interval"])
        if (end - start) / step > state.max_buckets:
            return _json(
                {
                    "errors": [
                        {
                            "message": "request exceeded or is estimated to exceed the maximum execution "
                            "time",
                            "extensions": {"code": "BAD_REQUEST"},
                        }
                    ],
                    "data": {"signals": None},
                }
            )
        return _json({"data": {"signals": _bucket_rows(fields, start, end, step)}})

    routes = [
        Route(
            "/auth/web3/generate_challenge", wrap("/auth/web3/generate_challenge", generate), methods=["POST"]
        ),
        Route("/auth/web3/submit_challenge", wrap("/auth/web3/submit_challenge", submit), methods=["POST"]),
        Route("/v1/tokens/exchange", wrap("/v1/tokens/exchange", exchange), methods=["POST"]),
        Route("/identity/query", wrap("/identity/query", identity), methods=["POST"]),
        Route("/telemetry/query", wrap("/telemetry/query", telemetry), methods=["POST"]),
    ]
    return Starlette(routes=routes)


class _DroppedResponse(Response):
    """Announces 1000 bytes, sends a few, then fails so the server closes the connection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"data":{', "more_body": True})
        raise ConnectionAbortedError("test: dropped connection")


class LoopbackServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 (free port) in a background thread; always stop it."""

    def __init__(self, app: Any) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="critical", lifespan="off", access_log=False)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("loopback server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def settings_for(url: str, **overrides: Any):
    from connectors.dimo.settings import DimoSettings

    return DimoSettings(
        environment="emulator",
        client_id=CLIENT_ID,
        domain=DOMAIN,
        private_key="0x" + "11" * 32,
        auth_url=url,
        token_exchange_url=url,
        identity_url=f"{url}/identity/query",
        telemetry_url=f"{url}/telemetry/query",
        **{
            "rate_limit_per_s": 0,
            "backoff_base_s": 0.001,
            "backoff_max_s": 0.01,
            "use_data_summary": False,  # this fake has no dataSummary; the emulator tests cover it
            **overrides,
        },
    )


class RecordingSleep:
    """An injected sleep that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
