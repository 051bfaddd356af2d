"""What the rented-machine providers (Vast.ai, io.net) share: the API client, agent health probes, ``close`` /
``with``, and ``wait_ready``'s polling loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

import httpx
from pydantic import SecretStr

from depin_core.errors import TransientError
from gpu_jobs.errors import ProviderRefused
from gpu_jobs.providers._http import ApiClient, HealthCheck
from gpu_jobs.providers.base import Worker


class MarketProvider:
    """Base of a marketplace provider; subclasses set ``name`` and implement the ``Provider`` protocol."""

    name: str

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str,
        *,
        auth_headers: Callable[[str], dict[str, str]],
        key_hint: str,
        poll_s: float,
        timeout: float,
        transport: httpx.BaseTransport | None,
        agent_transport: httpx.BaseTransport | None,
    ) -> None:
        self._api = ApiClient(
            base_url,
            api_key=api_key,
            auth_headers=auth_headers,
            key_hint=key_hint,
            provider=self.name,
            timeout=timeout,
            transport=transport,
        )
        self._health = HealthCheck(transport=agent_transport)
        self.poll_s = poll_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._api.base_url!r}, api_key=set)"

    def close(self) -> None:
        self._api.close()
        self._health.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get_object(self, path: str, key: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """``GET path``'s ``key`` object, or None when the API answers 404 (or holds no object there)."""
        try:
            doc = self._api.json("GET", path, params=params)
        except ProviderRefused as exc:
            if exc.status == 404:
                return None
            raise
        obj = doc.get(key) if isinstance(doc, dict) else None
        return obj if isinstance(obj, dict) else None

    def _poll_until_healthy(
        self, worker: Worker, probe: Callable[[], tuple[str | None, str]], *, what: str, timeout_s: float
    ) -> Worker:
        """``wait_ready``'s loop: call ``probe`` (after 0.25 s, then doubling up to ``poll_s``) until the URL it
        gives answers ``/v1/health`` with the worker's token; the worker with that ``url``. ``probe`` returns
        ``(agent URL or None, what it saw)`` and raises ``TransientError`` when the instance failed or is gone;
        ``what`` names the instance in the timeout error."""
        deadline = time.monotonic() + timeout_s
        delay = min(0.25, self.poll_s)  # fast at first (a ready agent answers at once), then every poll_s
        while True:
            url, last = probe()
            if url is not None:
                if self._health.check(url, worker.token, worker.tls_cert) is not None:
                    return worker.model_copy(update={"url": url})
                last = f"running, agent at {url}: {self._health.last_problem}"
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"{what} not ready within {timeout_s:g}s ({last}); destroy it and try another offer"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(self.poll_s, delay * 2)
