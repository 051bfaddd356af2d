"""The errors of ``gpu_jobs``, under the project's one tree (``depin_core.errors``).

Callers retry ``TransientError`` and stop on ``PermanentError``; a job's own failure is a ``JobError`` carrying
its ``FailureKind``. The worker agent's HTTP answers (``AgentHttpError`` and the two errors its stores raise)
are ``DepinError``s: whether a caller may retry them is decided by the client from the status.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError


class FailureKind(StrEnum):
    USER = "user"  # the spec, the inputs or the family code is wrong: retrying will not help
    INFRA = "infra"  # the machine failed (no GPU, OOM, killed, timed out): another node may succeed
    VERIFY = "verify"  # the job ran but its outputs did not verify


# ---- jobs and runners -------------------------------------------------------------------------------------------
class JobError(PermanentError):
    """A job failure with its classification; the worker turns it into ``FAILED(kind)``."""

    def __init__(self, message: str, kind: FailureKind) -> None:
        super().__init__(message)
        self.kind = kind


class JobNotFound(PermanentError):
    """The runner knows no job with this id."""


class JobNotFinished(TransientError):
    """``result(timeout=…)`` ran out of time before the job reached a terminal state."""


# ---- results ----------------------------------------------------------------------------------------------------
class ArtifactIntegrityError(PermanentError):
    """A model artifact failed verification (missing, unexpected or modified file); the message names it."""


class VerifyError(PermanentError):
    """A result (or an artifact) is inconsistent with what it claims."""


class InvalidInput(ConfigError):
    """A request row does not match the function's input schema. ``field`` is e.g. ``inputs[3].air``;
    the message (``"<field>: <problem>; <fix>"``) says what is wrong and how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# ---- remote runners and providers (clients) ---------------------------------------------------------------------
class AgentRefused(PermanentError):
    """The agent refused a request for good; ``status`` and ``field`` come from its answer."""

    def __init__(self, message: str, *, status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


class AgentAuthError(AgentRefused):
    """401/403: the token is wrong, expired or scoped to another job."""


class ProviderRefused(PermanentError):
    """A GPU marketplace API refused a request for good; ``status`` is the HTTP status, ``detail`` its
    message."""

    def __init__(self, message: str, *, status: int, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


class NoCapacity(TransientError):
    """No offer fits (or the chosen one was taken meanwhile): try another provider, a higher price cap, or
    later."""


# ---- the worker agent (server) ----------------------------------------------------------------------------------
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_input",
    500: "internal",
    507: "insufficient_storage",
}


def status_code_name(status: int) -> str:
    """The error ``code`` the agent answers for ``status`` when no more specific one applies."""
    return _CODES.get(status, "http_error")


class AgentHttpError(DepinError):
    """An agent answer ``{"error": {"code", "message", "field"?, …extra}}`` with HTTP ``status`` (the gateway's
    shape; ``extra`` adds members such as ``missing``). ``code`` defaults to the status's name."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.code = code or status_code_name(status)
        self.headers, self.extra = headers or {}, extra or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": {**err, **self.extra}}


class AgentTokenError(DepinError):
    """A request to the agent without a valid token (401) or outside the token's job (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BlobError(DepinError):
    """An upload the agent's blob store refuses: HTTP ``status``, a message, optional ``code``, field and
    headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or status_code_name(status)
        self.field = field
        self.headers = headers or {}
