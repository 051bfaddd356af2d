"""The function-name rule, in one place: every check of a function name (bundles, the registry, the gateway,
its OpenAPI document, the flows' parameters, the CLI's help) uses these. It lives in the kernel, not in
``serving``, because a model family's name is the default name of its function and ``gpu_jobs`` (which
never imports ``serving``) checks family names by the same rule."""

from __future__ import annotations

import re
from typing import Any

FUNCTION_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
FUNCTION_NAME_RE = re.compile(FUNCTION_NAME_PATTERN)
FUNCTION_NAME_RULE = "1-63 lowercase letters, digits, '_' or '-', starting with a letter or digit"


def is_function_name(name: Any) -> bool:
    """Whether ``name`` is a legal function name (a ``str`` matching ``FUNCTION_NAME_PATTERN`` entirely)."""
    return isinstance(name, str) and FUNCTION_NAME_RE.fullmatch(name) is not None


def function_name_error(name: Any) -> str:
    """The message for an illegal function name ``name``: what it is and the rule to follow."""
    return f"function name {name!r} is invalid; use {FUNCTION_NAME_RULE}"


__all__ = [
    "FUNCTION_NAME_PATTERN",
    "FUNCTION_NAME_RE",
    "FUNCTION_NAME_RULE",
    "function_name_error",
    "is_function_name",
]
