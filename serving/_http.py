"""HTTP plumbing of the gateway: JSON responses (orjson), the error shape, size-limited body reads."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from serving.errors import GatewayHttpError

JSON = "application/json"


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``content`` serialised by orjson (NaN/inf become null)."""
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type=JSON)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    err: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return json_response({"error": err}, status, headers)


def answer(exc: GatewayHttpError) -> Response:
    """The error response ``exc`` stands for."""
    return error_response(exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers)


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds (HTTP allows only integers), at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds or 1.0)))}


async def read_body(request: Request, limit: int, *, field: str = "body") -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes — by Content-Length before reading, and
    while streaming for chunked bodies."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise GatewayHttpError(
                400, "bad_request", "Content-Length is not an integer", field="Content-Length"
            ) from None
        if size > limit:
            raise GatewayHttpError(
                413,
                "payload_too_large",
                f"the body is {size} bytes, the limit is {limit}; send less",
                field=field,
            )
    receive = request.receive  # the raw ASGI channel: cheaper than Request.stream() on the hot path
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limit:
                raise GatewayHttpError(
                    413,
                    "payload_too_large",
                    f"the body exceeds the limit of {limit} bytes; send less",
                    field=field,
                )
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes, *, field: str = "body") -> Any:
    """Decode ``body`` (strict JSON: no NaN/Infinity literals) or raise a 400 naming ``field``."""
    if not body:
        raise GatewayHttpError(400, "invalid_json", "the body is empty; send a JSON document", field=field)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayHttpError(
            400,
            "invalid_json",
            f"the body is not valid JSON ({exc}); NaN and Infinity are not JSON",
            field=field,
        ) from None
