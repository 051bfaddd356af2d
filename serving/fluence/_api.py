"""What the API adapters (``_gen_a``, ``_gen_b``, ``_gpu``) need of the Fluence client: a protocol, so they
depend on these four calls and not on the client module (which builds them)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, Protocol

import httpx

Generation = Literal["A", "B"]


class FluenceApi(Protocol):
    """Authenticated, retried calls of one Fluence account (``serving.fluence.FluenceClient``)."""

    def request(
        self,
        method: str,
        path: str,
        *,
        gen: Generation,
        json: Any = None,
        params: Any = None,
        idempotent: bool | None = None,
        ok: Collection[int] = ...,
    ) -> httpx.Response: ...

    def get_json(self, path: str, *, gen: Generation, params: Any = None) -> Any: ...

    def get_items(self, path: str, *, gen: Generation) -> list[Any]: ...

    def paginate(
        self, path: str, *, gen: Generation, params: dict[str, Any] | None = None, per_page: int = 100
    ) -> list[dict[str, Any]]: ...
