"""One exception tree for the whole project.

``TransientError`` marks failures that may succeed on retry (timeouts, 429/503, dropped connections);
``PermanentError`` marks failures that will not (bad credentials, missing privilege, invalid input).
Retry policies (ours and Prefect's ``retry_condition_fn``) retry only ``TransientError``.
Messages say what was wrong and what to do about it; they never contain secrets.
"""

from __future__ import annotations


class DepinError(Exception):
    """Root of every error raised on purpose by depin-pipeline."""


class TransientError(DepinError):
    """A failure that can succeed on retry. ``retry_after`` (seconds) is a server's hint, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DepinError):
    """A failure that will not go away by retrying; the message says what to fix."""


class ConfigError(PermanentError):
    """A setting, parameter or file is invalid; the message names it and the fix."""
