"""Errors raised by the DIMO client. All are ``depin_core.errors`` types, so retry policies see them as
transient (retry may help) or permanent (fix something first). Messages never contain tokens or keys."""

from __future__ import annotations

from depin_core.errors import DepinError, PermanentError, TransientError


class DimoError(DepinError):
    """Root of the DIMO client's errors."""


class DimoTransientError(TransientError, DimoError):
    """429/5xx, timeouts, dropped connections, malformed pages: retried with backoff, then raised."""


class DimoAuthError(PermanentError, DimoError):
    """Credentials were rejected (bad client id, domain, key) or a fresh token was rejected again."""


class DimoPrivilegeError(PermanentError, DimoError):
    """The developer license lacks a privilege on a vehicle (not shared, or location not shared)."""


class DimoQueryError(PermanentError, DimoError):
    """The server rejected the request itself (bad argument, unknown field, 400/404)."""


class ComplexityLimitExceeded(DimoQueryError):
    """HTTP 422 COMPLEXITY_LIMIT_EXCEEDED: the planner halves the signal chunk and retries."""


class ExecutionTimeExceeded(DimoQueryError):
    """The server estimated the query would pass its time limit: the planner halves the time window."""
