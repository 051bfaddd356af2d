"""Publishers and the gateway client without a server process: LocalPublisher on a real registry directory;
GatewayClient retries / error mapping and GatewayPublisher's upload verification through httpx.MockTransport
handlers (one of them a faithful in-memory gateway backed by a real Registry, others that lie or fail)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError, TransientError
from serving.bundle import Bundle, recover_publisher
from serving.client import GatewayClient, GatewayRefused
from serving.errors import BundleError
from serving.publish import GatewayPublisher, LocalPublisher, Publisher, PublishResult
from serving.registry import Registry

KEY = SecretStr("dgk_test-admin-key-never-shown")
URL = "https://gateway.test"  # the admin key goes to a remote gateway over HTTPS only


# ----------------------------------------------------------------------------------------------------- local


def test_local_publisher(range_artifact: Path, publisher: LocalAccount, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    pub = LocalPublisher(root, publisher)
    assert isinstance(pub, Publisher) and pub.target == f"local:{root.resolve()}"
    first = pub.publish(range_artifact, "range", alias="prod")
    assert first.created and first.moved == ["latest", "prod"] and first.publisher == publisher.address
    assert first.aliases == {"latest": {first.version: 1.0}, "prod": {first.version: 1.0}}
    reg = Registry(root, trusted=[publisher.address])
    stored = reg.bundle("range", first.version)
    manifest = (stored.path / "manifest.json").read_bytes()
    assert first.manifest_sha256 == hashlib.sha256(manifest).hexdigest()
    assert recover_publisher(manifest, stored.signature_doc()) == publisher.address
    assert json.loads(json.dumps(first.to_json())) == first.to_json()

    again = pub.publish(range_artifact, "range", alias="prod")  # same model + settings: same version, no-op
    assert again.version == first.version and not again.created and again.moved == []

    small = LocalPublisher(root, publisher, max_batch_size=64).publish(range_artifact, "range")
    assert small.version != first.version and small.created and small.moved == ["latest"]
    assert small.aliases["prod"] == {first.version: 1.0}
    assert reg.version_ids("range") == [first.version, small.version]


def test_local_publisher_refusals(
    range_artifact: Path,
    range_bundle: Bundle,
    publisher: LocalAccount,
    other_publisher: LocalAccount,
    tmp_path: Path,
) -> None:
    root = tmp_path / "registry"
    with pytest.raises(BundleError, match="not trusted"):
        LocalPublisher(root, other_publisher, trusted=[publisher.address]).publish(range_artifact, "range")
    with pytest.raises(BundleError, match="function name"):
        LocalPublisher(root, publisher).publish(range_artifact, "Bad Name")
    with pytest.raises(ConfigError, match="alias"):
        LocalPublisher(root, publisher).publish(range_artifact, "range", alias="0123456789abcdef")
    with pytest.raises(ConfigError, match="not a directory"):
        LocalPublisher(root, publisher).publish(tmp_path / "missing", "range")
    # a built bundle is published as it is (signed by its publisher), under its own name only
    with pytest.raises(ConfigError, match="pass --name range-fn"):
        LocalPublisher(root, publisher).publish(range_bundle.path, "other")
    result = LocalPublisher(root, other_publisher, trusted=None).publish(range_bundle.path, "range-fn")
    assert result.version == range_bundle.version and result.publisher == publisher.address


# ---------------------------------------------------------------------------------------------------- client


def client_with(
    handler: Callable[[httpx.Request], httpx.Response], **kw
) -> tuple[GatewayClient, list[float]]:
    sleeps: list[float] = []
    client = GatewayClient(
        URL, admin_key=KEY, transport=httpx.MockTransport(handler), sleep=sleeps.append, **kw
    )
    return client, sleeps


def test_client_retries_transient_failures() -> None:
    answers = iter(
        [
            httpx.ConnectError("refused"),
            httpx.Response(
                503, headers={"Retry-After": "2"}, json={"error": {"code": "loading", "message": "x"}}
            ),
            httpx.Response(429, json={"error": {"code": "overloaded", "message": "queue full"}}),
            httpx.Response(200, json={"functions": []}),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client, sleeps = client_with(handler, backoff_s=0.1)
    assert client.functions() == []
    assert len(sleeps) == 3
    assert 0.08 <= sleeps[0] <= 0.12  # backoff 0.1 × 2^0, ±20 %
    assert 1.6 <= sleeps[1] <= 2.4  # the server's Retry-After
    assert 0.32 <= sleeps[2] <= 0.48  # backoff 0.1 × 2^2


def test_client_gives_up_and_maps_errors() -> None:
    calls: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused")

    client, sleeps = client_with(down, retries=2)
    with pytest.raises(TransientError, match=r"gave up after 3 attempts.*depin serve"):
        client.functions()
    assert len(calls) == 3 and len(sleeps) == 2

    def forbidden(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        body = {"error": {"code": "forbidden", "message": "not an admin key", "field": "X-API-Key"}}
        return httpx.Response(403, json=body)

    calls.clear()
    client, sleeps = client_with(forbidden)
    with pytest.raises(GatewayRefused) as info:
        client.set_alias("range", "prod", "0123456789abcdef")
    exc = info.value
    assert (exc.status, exc.code, exc.field) == (403, "forbidden", "X-API-Key")
    assert "not an admin key" in str(exc) and "admin key is wrong" in str(exc)
    assert len(calls) == 1 and sleeps == []  # permanent: not retried
    assert calls[0].headers["x-api-key"] == KEY.get_secret_value()
    assert KEY.get_secret_value() not in str(exc) + repr(client)

    def timeout(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("slow")

    calls.clear()
    client, _ = client_with(timeout)
    with pytest.raises(TransientError, match="check the result"):
        client.rollback("range", "prod")  # not idempotent: never re-sent once it may have arrived
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="admin key"):
        GatewayClient(URL).rollback("range", "prod")
    with pytest.raises(ConfigError, match="http"):
        GatewayClient("gateway.test:8787")


# ----------------------------------------------------------------------------------------- gateway publisher


class FakeGateway:
    """The gateway's admin + read API over a real Registry, in memory; ``tamper`` lets it lie."""

    def __init__(self, root: Path, trusted: list[str], tamper: str | None = None) -> None:
        self.registry = Registry(root, trusted=trusted)
        self.tamper = tamper
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        self.requests.append(f"{request.method} {request.url.path}")
        if request.headers.get("x-api-key") != KEY.get_secret_value() and request.method != "GET":
            return httpx.Response(403, json={"error": {"code": "forbidden", "message": "wrong key"}})
        if request.method == "PUT" and parts[3] == "versions":
            existed = parts[2] in self.registry.functions() and parts[4] in self.registry.version_ids(
                parts[2]
            )
            bundle = self.registry.add(request.content, expect_name=parts[2], expect_version=parts[4])
            body = {
                "created": not existed,
                "aliases": self.registry.aliases(parts[2]),
                "publisher": bundle.publisher,
            }
            return httpx.Response(200 if existed else 201, json=body)
        if request.method == "PUT" and parts[3] == "aliases":
            previous = self.registry.set_alias(parts[2], parts[4], json.loads(request.content)["version"])
            return httpx.Response(
                200, json={"target": self.registry.aliases(parts[2])[parts[4]], "previous": previous}
            )
        if request.method == "GET" and len(parts) == 6:
            bundle = self.registry.bundle(parts[2], parts[4])
            data = (bundle.path / parts[5]).read_bytes()
            if self.tamper == "manifest" and parts[5] == "manifest.json":
                doc = json.loads(data)
                doc["max_batch_size"] = 7  # a different function under the same version
                data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
            if self.tamper == "signature" and parts[5] == "signature.json":
                doc = json.loads(data)
                doc["signature"] = "0x" + "11" * 65
                data = json.dumps(doc).encode()
            return httpx.Response(200, content=data)
        if request.method == "GET" and len(parts) == 3:
            return httpx.Response(200, json={"aliases": self.registry.aliases(parts[2])})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": request.url.path}})


def gateway_publisher(fake: FakeGateway, account: LocalAccount, **kw: Any) -> GatewayPublisher:
    return GatewayPublisher(
        URL, KEY, account, transport=httpx.MockTransport(fake), sleep=lambda s: None, **kw
    )


def test_gateway_publisher_verifies_then_moves_the_alias(
    range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    fake = FakeGateway(tmp_path / "reg", [publisher.address])
    with gateway_publisher(fake, publisher) as pub:
        assert isinstance(pub, Publisher) and pub.target == URL
        result = pub.publish(range_artifact, "range", alias="prod")
        assert isinstance(result, PublishResult)
        assert result.created and result.moved == ["latest", "prod"] and result.publisher == publisher.address
        v = result.version
        assert [r.split(" ")[0] for r in fake.requests[:4]] == [
            "PUT",
            "GET",
            "GET",
            "PUT",
        ]  # verify, then alias
        again = pub.publish(
            range_artifact, "range", alias="prod"
        )  # a new bundle (new created_at), same version
        assert again.version == v and not again.created and again.moved == []
        assert again.manifest_sha256 == result.manifest_sha256  # what the gateway holds: the first upload
    assert KEY.get_secret_value() not in repr(pub)


@pytest.mark.parametrize("tamper", ["manifest", "signature"])
def test_gateway_publisher_refuses_a_gateway_that_serves_something_else(
    tamper: str, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    fake = FakeGateway(tmp_path / "reg", [publisher.address], tamper=tamper)
    with pytest.raises(PermanentError, match=r"upload verification of range@.* failed"):
        gateway_publisher(fake, publisher).publish(range_artifact, "range", alias="prod")
    assert not any("/aliases/" in r for r in fake.requests)  # the alias was never moved
