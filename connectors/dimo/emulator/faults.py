"""Fault injection for the emulator (off by default): 429/503 with Retry-After, latency, dropped
connections, early token expiry and malformed pages, each with its own probability.

Spec syntax (``--faults``): comma-separated ``kind=probability``; ``latency=P:MS`` sets the delay;
``all=P`` spreads P evenly over the error kinds; ``retry_after=S`` sets the Retry-After header (seconds);
``seed=N`` makes the sequence reproducible. Example: ``all=0.2,latency=0.1:50,retry_after=0``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from depin_core.errors import ConfigError

ERROR_KINDS = ("429", "503", "drop", "expire", "malformed")
EXEMPT_PATHS = ("/healthz", "/keys", "/emulator/")


class DroppedConnection(Exception):
    """Raised after a partial response so the server closes the connection mid-body."""


class _DropFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)


@dataclass(frozen=True)
class FaultSpec:
    probabilities: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 200.0
    retry_after: float = 1.0
    seed: int | None = None

    @property
    def enabled(self) -> bool:
        return any(p > 0 for p in self.probabilities.values())

    @classmethod
    def parse(cls, text: str | None) -> FaultSpec:
        if not text:
            return cls()
        probs: dict[str, float] = {}
        latency_ms, retry_after, seed = 200.0, 1.0, None
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                if key == "all":
                    p = float(value)
                    for k in ERROR_KINDS:
                        probs[k] = p / len(ERROR_KINDS)
                elif key == "latency":
                    p_text, _, ms = value.partition(":")
                    probs["latency"] = float(p_text)
                    if ms:
                        latency_ms = float(ms)
                elif key == "retry_after":
                    retry_after = float(value)
                elif key == "seed":
                    seed = int(value)
                elif key in ERROR_KINDS:
                    probs[key] = float(value)
                else:
                    raise KeyError(key)
            except KeyError:
                raise ConfigError(
                    f"faults: unknown kind {key!r}; use {', '.join((*ERROR_KINDS, 'latency', 'all', 'retry_after', 'seed'))}"
                ) from None
            except ValueError:
                raise ConfigError(
                    f"faults: {part!r} is not kind=number (e.g. '429=0.1', 'latency=0.2:100')"
                ) from None
        total = sum(v for k, v in probs.items() if k != "latency")
        if any(v < 0 for v in probs.values()) or total > 1 or probs.get("latency", 0) > 1:
            raise ConfigError(
                "faults: probabilities must be in [0, 1] and the error kinds must sum to at most 1"
            )
        return cls(probs, latency_ms, retry_after, seed)


class FaultInjector:
    """ASGI middleware that injects the faults of a :class:`FaultSpec`."""

    def __init__(self, app: ASGIApp, spec: FaultSpec) -> None:
        self.app = app
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.injected: dict[str, int] = {}
        if spec.enabled:
            logging.getLogger("uvicorn.error").addFilter(_DropFilter())

    def _pick(self) -> str | None:
        r = self.rng.random()
        acc = 0.0
        for kind in ERROR_KINDS:
            acc += self.spec.probabilities.get(kind, 0.0)
            if r < acc:
                return kind
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.spec.enabled or scope["path"].startswith(EXEMPT_PATHS):
            await self.app(scope, receive, send)
            return
        if self.rng.random() < self.spec.probabilities.get("latency", 0.0):
            await asyncio.sleep(self.spec.latency_ms / 1000)
        kind = self._pick()
        if kind == "expire" and not any(k == b"authorization" for k, _ in scope["headers"]):
            kind = None
        if kind is None:
            await self.app(scope, receive, send)
            return
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if kind in ("429", "503"):
            await _send(
                send,
                int(kind),
                b'{"message":"emulated overload, retry later"}',
                extra=[(b"retry-after", _fmt(self.spec.retry_after))],
            )
        elif kind == "expire":
            if scope["path"].startswith("/v1/tokens"):
                await _send(send, 401, b"Invalid or expired JWT", ctype=b"text/plain; charset=utf-8")
            else:
                await _send(send, 401, b'{"message":"JWT is invalid."}')
        elif kind == "drop":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"data":{', "more_body": True})
            raise DroppedConnection("emulated dropped connection")
        else:  # malformed: the real response, cut in half
            await self._malformed(scope, receive, send)

    async def _malformed(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        body = body[: max(1, len(body) // 2)]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 200), "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _fmt(seconds: float) -> bytes:
    return (str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}").encode()


async def _send(
    send: Send,
    status: int,
    body: bytes,
    *,
    ctype: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
