"""The Fluence client's errors, and how an error answer of the API becomes one.

Every error is a ``FluenceError`` under ``depin_core.errors``: :class:`FluenceRefused` (a ``PermanentError``) is
built from the body — generation A's ``{"error": "..."}``, generation B's ``{"code": "...", "error": "..."}`` or
the GPU API's ``{"detail": "..." | [{loc, msg}, ...]}`` — with a hint what to do; 422 "No suitable offer found" /
"Not enough offers found" is :class:`NoOffer`, an insufficient balance (B ``insufficient_balance``, GPU
"Insufficient balance ...") :class:`InsufficientBalance`; :class:`FluenceUnavailable` (a ``TransientError``)
means the API could not be reached or kept answering 429/5xx.
"""

from __future__ import annotations

from typing import Any

import httpx

from depin_core.errors import DepinError, PermanentError, TransientError

_NO_OFFER = ("no suitable offer", "not enough offers", "no longer available")
_NO_BALANCE = ("insufficient balance", "not enough balance", "insufficient funds")


class FluenceError(DepinError):
    """Root of the Fluence client's errors."""


class FluenceRefused(FluenceError, PermanentError):
    """The API refused the request. ``status`` is the HTTP status, ``code`` generation B's error code (or a
    status-derived one), ``api_message`` the API's own ``error`` text."""

    def __init__(self, message: str, *, status: int, code: str, api_message: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.api_message = status, code, api_message


class FluenceAuthError(FluenceRefused):
    """401/403: the API key is missing, wrong, expired or lacks the scope."""


class FluenceNotFound(FluenceRefused):
    """404: no such resource (or route: a generation the account does not have)."""


class NoOffer(FluenceRefused):
    """422 "No suitable offer found" / "Not enough offers found": nothing matches the constraints or price."""


class InsufficientBalance(FluenceRefused):
    """The account's balance cannot pay for the deposit (generation B ``insufficient_balance``)."""


class FluenceUnavailable(FluenceError, TransientError):
    """The API could not be reached or kept answering 429/5xx; retrying later may work."""


class NotTerminable(FluenceError, TransientError):
    """The instance is in a status from which it cannot be terminated yet (GPU: only ``ACTIVE`` can)."""


class VmFailed(PermanentError):
    """A VM the publisher started reached a terminal failed status (or disappeared while starting)."""


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    406: "not_acceptable",
    409: "conflict",
    422: "unprocessable_entity",
}


def _detail_text(detail: Any) -> str:
    """The GPU API's ``detail``: a string (400 business errors) or FastAPI's ``[{loc, msg}, ...]`` (422)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in (item.get("loc") or []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("msg") or detail)
    return str(detail)


def parse_error(r: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error answer: ``{"error": "..."}`` (A), ``{"code", "error"}`` (B),
    ``{"detail": ...}`` (GPU), or text."""
    try:
        body = r.json()
    except ValueError:
        body = None
    fallback = _STATUS_CODES.get(r.status_code, "http_error")
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # tolerate {"error": {"code", "message"}}
            return str(err.get("code") or fallback), str(err.get("message") or "")
        if err is None and "detail" in body:
            message = _detail_text(body["detail"])
            if any(m in message.lower() for m in _NO_BALANCE):
                return "insufficient_balance", message
            return str(body.get("code") or fallback), message
        code = body.get("code") or fallback
        return str(code), str(err if err is not None else body.get("message") or "")
    return fallback, r.text[:300].strip()


def _fix(status: int, code: str) -> str:
    if status in (401, 403):
        return (
            "check the Fluence API key (DEPIN_FLUENCE_API_KEY; create one in Fluence Console › Settings › API "
            "Keys, full access for deploys)"
        )
    if status == 404:
        return "the resource is gone or this account does not have this API generation"
    if code == "insufficient_balance":
        return "top up the Fluence balance (Console › Billing); retrying will not help before that"
    if status == 422:
        return "relax the constraints (configuration, country, max price) or retry later"
    if status in (400, 406, 409):
        return "the message says which field or state is wrong"
    return "see the message"


def refused(r: httpx.Response, where: str) -> FluenceRefused:
    """The :class:`FluenceRefused` (subclass) for a permanent error answer."""
    code, message = parse_error(r)
    status = r.status_code
    cls: type[FluenceRefused] = FluenceRefused
    if status in (401, 403):
        cls = FluenceAuthError
    elif status == 404:
        cls = FluenceNotFound
    elif code == "insufficient_balance" or any(m in message.lower() for m in _NO_BALANCE):
        cls = InsufficientBalance
    elif status in (400, 422) and any(m in message.lower() for m in _NO_OFFER):
        cls = NoOffer
    text = f"{where} refused ({status} {code}): {message or r.reason_phrase}; {_fix(status, code)}"
    return cls(text, status=status, code=code, api_message=message)
