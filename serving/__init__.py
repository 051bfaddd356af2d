"""Functions served by a gateway: signed, versioned bundles of trained models, published to a target and
invoked over HTTP.

- Bundles (``serving.bundle``): :func:`build_bundle` signs a model artifact, :func:`verify_bundle` checks one,
  :func:`recover_publisher` tells who signed a manifest, :func:`load_publisher_account` is the signing key.
- The registry directory (``serving.registry``): :class:`Registry`; admin keys: :func:`new_admin_key` and
  :func:`hash_api_key` (what a gateway stores).
- The gateway (``serving.gateway``, ``serving.server``): :class:`GatewaySettings`, :func:`serve`,
  :class:`GatewayProcess`; its HTTP client :class:`GatewayClient` (:class:`GatewayRefused` on a refusal).
- Publishing (``serving.targets``): a :class:`Target` — :class:`LocalTarget`, :class:`GatewayTarget`,
  :class:`FluenceTarget` — and :func:`publish_function` (publish → smoke call → alias move), built on the
  publishers of ``serving.publish`` (:class:`LocalPublisher`, :class:`GatewayPublisher`,
  :class:`FluencePublisher`).

Names are imported on first use: ``import serving`` stays cheap (the bundle code pulls in torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depin_core.lazy import lazy_exports

_HOMES = {
    "Bundle": "serving.bundle",
    "BundleError": "serving.errors",
    "FunctionManifest": "serving.bundle",
    "build_bundle": "serving.bundle",
    "load_publisher_account": "serving.bundle",
    "pack_bundle": "serving.bundle",
    "recover_publisher": "serving.bundle",
    "verify_bundle": "serving.bundle",
    "Registry": "serving.registry",
    "GatewaySettings": "serving.settings",
    "GatewayClientSettings": "serving.settings",
    "GatewayProcess": "serving.server",
    "serve": "serving.server",
    "GatewayClient": "serving.client",
    "GatewayRefused": "serving.client",
    "PublishResult": "serving.publish",
    "Publisher": "serving.publish",
    "LocalPublisher": "serving.publish",
    "GatewayPublisher": "serving.publish",
    "FluencePublisher": "serving.fluence.publisher",
    "FluenceSettings": "serving.fluence.settings",
    "Target": "serving.targets",
    "LocalTarget": "serving.targets",
    "GatewayTarget": "serving.targets",
    "FluenceTarget": "serving.fluence.target",
    "PublishedFunction": "serving.targets",
    "publish_function": "serving.targets",
    "hash_api_key": "serving._auth",
    "new_admin_key": "serving._auth",
}

__all__ = [
    "Bundle",
    "BundleError",
    "FluencePublisher",
    "FluenceSettings",
    "FluenceTarget",
    "FunctionManifest",
    "GatewayClient",
    "GatewayClientSettings",
    "GatewayProcess",
    "GatewayPublisher",
    "GatewayRefused",
    "GatewaySettings",
    "GatewayTarget",
    "LocalPublisher",
    "LocalTarget",
    "PublishResult",
    "PublishedFunction",
    "Publisher",
    "Registry",
    "Target",
    "build_bundle",
    "hash_api_key",
    "load_publisher_account",
    "new_admin_key",
    "pack_bundle",
    "publish_function",
    "recover_publisher",
    "serve",
    "verify_bundle",
]

if TYPE_CHECKING:
    from serving._auth import hash_api_key, new_admin_key
    from serving.bundle import (
        Bundle,
        FunctionManifest,
        build_bundle,
        load_publisher_account,
        pack_bundle,
        recover_publisher,
        verify_bundle,
    )
    from serving.client import GatewayClient, GatewayRefused
    from serving.errors import BundleError
    from serving.fluence.publisher import FluencePublisher
    from serving.fluence.settings import FluenceSettings
    from serving.fluence.target import FluenceTarget
    from serving.publish import GatewayPublisher, LocalPublisher, Publisher, PublishResult
    from serving.registry import Registry
    from serving.server import GatewayProcess, serve
    from serving.settings import GatewayClientSettings, GatewaySettings
    from serving.targets import GatewayTarget, LocalTarget, PublishedFunction, Target, publish_function

__getattr__, __dir__ = lazy_exports(globals(), _HOMES)
