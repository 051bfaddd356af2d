"""A target's gateway replicas on Fluence: one verified bundle published to every replica's gateway in two
phases (upload and verify on all, then the alias on all: no replica serves an alias before every replica has
the version), the result naming every URL, and the health probe ``depin fluence status`` and ``depin invoke``
use (the first replica whose ``/readyz`` answers serves the calls).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from eth_account.signers.local import LocalAccount

from depin_core.errors import PermanentError
from depin_core.tls import client_context
from serving.bundle import MANIFEST, pack_bundle
from serving.publish import GatewayPublisher, PublishResult, moved_aliases, prepare_bundle


class FluencePublishResult(PublishResult):
    """A :class:`PublishResult` (replica 0's: ``target`` is its URL) plus ``urls``, every replica's gateway."""

    urls: list[str]


@dataclass(frozen=True)
class Health:
    """What ``GET /readyz`` said: ``ready`` when it answered 200; ``latency_ms`` when it answered at all."""

    ready: bool
    latency_ms: float | None
    detail: str


def probe(url: str, cert_pem: str, *, timeout_s: float = 5.0) -> Health:
    """``GET <url>/readyz`` trusting exactly ``cert_pem``."""
    t0 = time.perf_counter()
    try:
        r = httpx.get(f"{url}/readyz", timeout=timeout_s, verify=client_context(cert_pem))
    except httpx.HTTPError as exc:
        return Health(False, None, type(exc).__name__)
    latency = round((time.perf_counter() - t0) * 1e3, 1)
    return Health(r.status_code == 200, latency, f"{r.status_code}")


def publish_to_all(
    gateways: Sequence[GatewayPublisher],
    model_dir: Path | str,
    name: str,
    *,
    alias: str | None,
    account: LocalAccount,
    max_batch_size: int,
) -> list[PublishResult]:
    """Build and sign ``model_dir`` once, upload it to every gateway and verify what each serves (phase 1),
    then move ``alias`` on every gateway (phase 2). One result per gateway, in order."""
    with tempfile.TemporaryDirectory(prefix="depin-publish-") as tmp:
        bundle = prepare_bundle(model_dir, name, account, Path(tmp), max_batch_size=max_batch_size)
        sent = (bundle.path / MANIFEST).read_bytes()
        packed = pack_bundle(bundle.path)
    version = bundle.version
    uploads = []
    for gw in gateways:
        put = gw.client.upload(name, version, packed)
        created = bool(put.get("created", True))
        data, publisher, signature = gw.verify_upload(name, version, sent, bundle, created=created)
        before = put.get("aliases") or {}
        if created:  # the add moved latest; what it pointed to before is not in the answer
            before = {a: t for a, t in before.items() if a != "latest"}
        uploads.append((created, data, publisher, signature, before))
    if alias is not None:
        for gw in gateways:
            moved = gw.client.set_alias(name, alias, version)
            if moved.get("target") != {version: 1.0}:
                raise PermanentError(
                    f"{gw.target}: alias {alias} of {name} points at {moved.get('target')} after moving it to "
                    f"{version}; another publisher moved it meanwhile — check and retry"
                )
    results = []
    for gw, (created, data, publisher, signature, before) in zip(gateways, uploads, strict=True):
        after = gw.client.function(name).get("aliases") or {}
        results.append(
            PublishResult(
                name=name,
                version=version,
                publisher=publisher,
                target=gw.target,
                manifest_sha256=hashlib.sha256(data).hexdigest(),
                signature=signature,
                created=created,
                aliases=after,
                moved=moved_aliases(before, after, version),
            )
        )
    return results


__all__ = ["FluencePublishResult", "Health", "probe", "publish_to_all"]
