"""Fluence compute for the function gateway: an httpx client of the Fluence public API (VM generations A and B,
GPU containers). ``FluencePublisher`` (``serving.fluence.publisher``) builds on it."""

from serving.fluence._client import (
    DEFAULT_BASE_URL,
    FluenceAuthError,
    FluenceClient,
    FluenceError,
    FluenceNotFound,
    FluenceRefused,
    FluenceUnavailable,
    Generation,
    InsufficientBalance,
    NoOffer,
    NotTerminable,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "FluenceAuthError",
    "FluenceClient",
    "FluenceError",
    "FluenceNotFound",
    "FluenceRefused",
    "FluenceUnavailable",
    "Generation",
    "InsufficientBalance",
    "NoOffer",
    "NotTerminable",
]
