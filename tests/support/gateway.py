"""The gateway in tests: settings with a known admin key, the gateway in-process behind an httpx client, a
registry of bundles, the error object of an answer, and the check that every OpenAPI example works as is."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from eth_account.signers.local import LocalAccount

from serving._auth import new_admin_key
from serving.bundle import Bundle
from serving.gateway import Gateway
from serving.registry import Registry
from serving.settings import GatewaySettings

ADMIN_KEY, ADMIN_HASH = new_admin_key()


def settings_for(root: Path, publisher: LocalAccount, **kw: Any) -> GatewaySettings:
    """Settings of a test gateway on ``root`` trusting ``publisher``, with the admin key ``ADMIN_KEY``."""
    base: dict[str, Any] = {
        "registry_dir": root,
        "trusted_publishers": [publisher.address],
        "admin_key_hashes": [ADMIN_HASH],
        "poll_interval_s": 0.05,
    }
    base.update(kw)
    return GatewaySettings(**base)


@contextlib.asynccontextmanager
async def serving(settings: GatewaySettings, **kw: Any) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A running, ready gateway in-process and an httpx client on its ASGI app."""
    gateway = Gateway(settings, **kw)
    async with gateway.running():
        await gateway.wait_ready(60)
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield gateway, client


def registry(root: Path, publisher: LocalAccount, *bundles: Bundle) -> Registry:
    """A registry on ``root`` trusting ``publisher``, holding ``bundles``."""
    reg = Registry(root, trusted=[publisher.address])
    for b in bundles:
        reg.add(b.path)
    return reg


def err(r: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of a JSON error answer."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


async def check_openapi_examples(client: httpx.AsyncClient, functions: dict[str, set[str]]) -> None:
    """Every request example of each function's invoke operation validates against its request schema, and
    sent as is gets 200 with a body valid against the 200 schema. ``functions``: name → expected forms."""
    spec = (await client.get("/openapi.json")).json()
    validator = jsonschema.Draft202012Validator
    for name, forms in functions.items():
        op = spec["paths"][f"/v1/functions/{name}/invoke"]["post"]
        media = op["requestBody"]["content"]["application/json"]
        validator.check_schema(media["schema"])
        assert set(media["examples"]) == forms
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        for key, ex in media["examples"].items():
            validator(media["schema"]).validate(ex["value"])
            r = await client.post(f"/v1/functions/{name}/invoke", json=ex["value"])
            assert r.status_code == 200, (name, key, r.text[:500])
            body = r.json()
            validator(ok).validate(body)
            assert body["outputs"], (name, key)
            if key == "telemetry":
                row_key = "trip" if "trip" in body["outputs"][0] else "window"
                assert body["outputs"][0][row_key]["start"].startswith("2026-05-04T08:")
            if key == "plan":
                assert body["assumed"] and "km" not in body["assumed"]
