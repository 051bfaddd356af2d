"""The emulator's ASGI app: DIMO Auth, Token Exchange, Identity and Telemetry on one port."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from connectors.dimo.emulator import auth, identity, telemetry
from connectors.dimo.emulator.faults import FaultInjector
from connectors.dimo.emulator.gql import json_response
from connectors.dimo.emulator.ratelimit import RateLimiter
from connectors.dimo.emulator.state import EmulatorState


def create_app(state: EmulatorState) -> ASGIApp:
    """Build the app for ``state``; fault injection and the rate limit wrap it when enabled. ``/healthz``
    also reports the rate limiter's counts per service (``rate_limit.passed``/``limited``: 429s sent)."""
    limiter: RateLimiter | None = None

    async def healthz(_: Request) -> Response:
        doc: dict[str, object] = {"status": "ok", "vehicles": len(state.fleet.vehicles)}
        if limiter is not None:
            doc["rate_limit"] = {
                "per_s": limiter.rate,
                "per": limiter.per,
                "passed": dict(limiter.passed),
                "limited": dict(limiter.limited),
            }
        return json_response(doc)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        *auth.routes(state),
        *identity.routes(state),
        *telemetry.routes(state),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = state
    wrapped: ASGIApp = app
    if state.faults.enabled:
        wrapped = FaultInjector(wrapped, state.faults)
    if state.rate_limit_per_s > 0:  # outermost: the ingress limits before anything else runs
        wrapped = limiter = RateLimiter(
            wrapped, state.rate_limit_per_s, per=state.rate_limit_per, clock=state.rate_limit_clock
        )
    return wrapped
