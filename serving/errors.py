"""The errors of ``serving`` (the gateway, its registry, bundles and batching), under the project's one tree
(``depin_core.errors``). The Fluence client's errors live in ``serving.fluence``; the gateway client's
``GatewayRefused`` in ``serving.client``."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError

_LIST_MAX = 20  # names listed in a NotFound message


class GatewayHttpError(DepinError):
    """A gateway answer ``{"error": {"code", "message", "field"?}}`` with HTTP ``status`` (``serving._http``
    writes it)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


class NotFound(PermanentError):
    """An unknown function, alias or version; the message names it and lists what exists."""

    def __init__(self, kind: str, ref: str, available: Collection[str], *, function: str | None = None):
        self.kind, self.ref, self.function = kind, ref, function
        self.available = sorted(available)
        where = f" of function {function!r}" if function else ""
        shown = ", ".join(self.available[:_LIST_MAX]) + (" …" if len(self.available) > _LIST_MAX else "")
        have = f"available: {shown}" if self.available else "there are none yet"
        super().__init__(f"{kind} {ref!r}{where} not found; {have}")


class InvalidTarget(ConfigError):
    """An alias name, weight or split is malformed; ``field`` names it, the message says the fix."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class NoHistory(PermanentError):
    """``rollback`` was asked for but the alias has no earlier target."""


class BundleError(PermanentError):
    """A bundle is invalid, modified or untrusted; the message names the file or field and the fix."""


class UntrustedPublisher(BundleError):
    """A validly signed bundle whose publisher is not among the trusted addresses."""


class LoadFailed(DepinError):
    """A version could not be loaded or warmed; the message says why."""


class Overloaded(TransientError):
    """The queue is full (429) or the batcher is draining (503); retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float, draining: bool = False) -> None:
        super().__init__(message, retry_after=retry_after)
        self.draining = draining

    @property
    def status(self) -> int:
        """The HTTP status a gateway answers with: 503 while draining, else 429."""
        return 503 if self.draining else 429


class DeadlineExceeded(TransientError):
    """The request's deadline passed before its batch finished (504)."""
