"""The one retry policy of the project's HTTP clients (gateway, Fluence, providers, worker agent, DIMO).

A request's outcome — a response or an ``httpx.TransportError`` — gets one :class:`Verdict`:

- a status in ``ok``: done; any status outside ``statuses``: a permanent refusal, never retried;
- a status in ``statuses`` (e.g. 429/502/503/504): retried, except that a non-idempotent request is re-sent only
  after a status in ``resend_statuses`` (by default all of ``statuses``: the server did not apply it);
- a refused TLS certificate (``depin_core.tls.is_certificate_refusal``): never retried, nothing was sent;
- a connection that failed before sending (``NOT_SENT``): retried; one that failed after sending (read timeout,
  dropped connection): retried only when the request is idempotent.

Waits grow ``base_s × 2^(n-1)`` before retry ``n``, at most ``max_s``, jittered ±20 % (or "full jitter":
uniform in [0, wait]); a server's ``Retry-After`` replaces the backoff (capped at ``retry_after_cap_s``). The
policy gives up after ``max_retries`` retries or when the next wait would pass ``budget_s``. Each client keeps
its own errors and words: it hands :meth:`RetryPolicy.send` a :class:`Failures` that builds them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from depin_core.errors import PermanentError, TransientError
from depin_core.http import NOT_SENT, TRANSIENT_STATUSES, retry_after_of
from depin_core.tls import PinMismatch, is_certificate_refusal

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = httpx.Response | httpx.TransportError


class Verdict(enum.Enum):
    """What to do with one outcome of a request."""

    OK = "ok"  # a status the caller expects
    RETRY = "retry"  # transient, and sending again is safe
    REFUSED = "refused"  # a permanent answer
    MAYBE_APPLIED = "maybe applied"  # transient, but a non-idempotent request may have been applied: stop
    CERTIFICATE = "certificate"  # the server's TLS certificate was refused: stop, nothing was sent


class Retryable(TransientError):
    """One attempt failed in a way worth another; ``problem`` says how (for logs and the final message)."""

    def __init__(self, problem: str, *, retry_after: float | None = None) -> None:
        super().__init__(problem, retry_after=retry_after)
        self.problem = problem


class Failures:
    """How one client words and raises the failures :meth:`RetryPolicy.send` stops on. ``where`` names the
    request (``"GET https://host/path"``); subclass and override what the client says differently."""

    def __init__(self, where: str) -> None:
        self.where = where

    def problem(self, outcome: Outcome) -> str:
        """A short description of a transient failure."""
        if isinstance(outcome, httpx.Response):
            return f"{outcome.status_code} {outcome.reason_phrase}"
        if isinstance(outcome, NOT_SENT):
            return f"cannot connect ({type(outcome).__name__})"
        return f"connection failed ({type(outcome).__name__})"

    def refused(self, r: httpx.Response) -> Exception:
        """The permanent error for an answer outside ``ok`` and the transient statuses."""
        return PermanentError(f"{self.where}: {r.status_code} {r.reason_phrase}")

    def certificate(self, exc: httpx.TransportError) -> Exception:
        """The error for a refused TLS certificate (a ``PermanentError``: retrying cannot help)."""
        return PinMismatch(
            f"{self.where}: the server's TLS certificate was refused ({exc}); nothing was sent. Check the URL, "
            "the machine's CA certificates and any proxy that intercepts TLS"
        )

    def maybe_applied(self, outcome: Outcome, problem: str, retry_after: float | None) -> Exception:
        """The error for a non-idempotent request that failed after it may have reached the server."""
        if isinstance(outcome, httpx.TransportError):
            problem = f"the connection failed after sending ({type(outcome).__name__})"
        return TransientError(
            f"{self.where}: {problem}; the request may have been applied — look it up before repeating it",
            retry_after=retry_after,
        )

    def gave_up(self, problem: str, attempts: int, retry_after: float | None) -> Exception:
        """The error once the policy stops retrying a transient failure."""
        return TransientError(
            f"{self.where}: {problem}; gave up after {attempts} attempts — retry later",
            retry_after=retry_after,
        )


class Attempts:
    """The retry state of one call: failures so far and the deadline (see :meth:`RetryPolicy.attempts`)."""

    def __init__(self, policy: RetryPolicy, budget_s: float | None) -> None:
        self.policy = policy
        self.failures = 0
        self.deadline = None if budget_s is None else policy.clock() + budget_s

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """Count one more failure: the seconds to wait before the next attempt, or None to give up."""
        self.failures += 1
        p = self.policy
        if p.max_retries is not None and self.failures > p.max_retries:
            return None
        delay = p.delay(self.failures, retry_after)
        if self.deadline is not None and p.clock() + delay > self.deadline:
            return None
        return delay


@dataclass
class RetryPolicy:
    """Which outcomes to retry, how long to wait and when to give up (see the module docstring).

    ``max_retries``: retries after the first attempt (None: no count limit, ``budget_s`` decides).
    ``budget_s``: seconds from the first attempt after which no retry starts (None: no time limit).
    ``sleep``: the wait (default ``time.sleep`` for :meth:`send`/:meth:`run`, ``asyncio.sleep`` for
    :meth:`run_async`); ``rng`` and ``clock`` are for tests too.
    """

    max_retries: int | None = 4
    base_s: float = 0.5
    max_s: float = 20.0
    statuses: frozenset[int] = TRANSIENT_STATUSES
    resend_statuses: frozenset[int] | None = None
    full_jitter: bool = False
    retry_after_cap_s: float | None = None
    budget_s: float | None = None
    sleep: Callable[[float], Any] | None = None
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic

    def classify(
        self, outcome: Outcome, *, idempotent: bool = True, ok: Collection[int] = (200, 201)
    ) -> Verdict:
        """The verdict on one outcome of a request."""
        if isinstance(outcome, httpx.Response):
            status = outcome.status_code
            if status in ok:
                return Verdict.OK
            if status not in self.statuses:
                return Verdict.REFUSED
            if idempotent or self.resend_statuses is None or status in self.resend_statuses:
                return Verdict.RETRY
            return Verdict.MAYBE_APPLIED
        if is_certificate_refusal(outcome):
            return Verdict.CERTIFICATE
        return Verdict.RETRY if idempotent or isinstance(outcome, NOT_SENT) else Verdict.MAYBE_APPLIED

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
        backoff = min(self.max_s, self.base_s * 2.0 ** min(attempt - 1, 62))
        ra_cap = self.max_s if self.retry_after_cap_s is None else self.retry_after_cap_s
        if self.full_jitter:  # the server's wish exactly, else uniform in [0, backoff]
            return (
                min(max(retry_after, 0.0), ra_cap)
                if retry_after is not None
                else self.rng.uniform(0, backoff)
            )
        wait = backoff if retry_after is None else min(ra_cap, retry_after)
        return wait * self.rng.uniform(0.8, 1.2)

    def attempts(self, budget_s: float | None = None) -> Attempts:
        """A fresh retry state for one call (``budget_s`` overrides the policy's), for loops of one's own."""
        return Attempts(self, self.budget_s if budget_s is None else budget_s)

    # ---- running -----------------------------------------------------------------------------------------
    def run(
        self,
        fn: Callable[[], T],
        *,
        gave_up: Callable[[Any, int], Exception],
        on_retry: Callable[[Any, float], None] | None = None,
        retry_on: type[TransientError] = TransientError,
        budget_s: float | None = None,
    ) -> T:
        """``fn()`` until it returns, retrying while it raises ``retry_on`` (its ``retry_after`` honoured);
        then ``gave_up(error, attempts)`` is raised. ``on_retry(error, delay)`` runs before each wait."""
        attempts, sleep = self.attempts(budget_s), self.sleep or time.sleep
        while True:
            try:
                return fn()
            except retry_on as exc:
                delay = attempts.next_delay(exc.retry_after)
                if delay is None:
                    raise gave_up(exc, attempts.failures) from None
                if on_retry is not None:
                    on_retry(exc, delay)
                sleep(delay)

    async def run_async(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        gave_up: Callable[[Any, int], Exception],
        on_retry: Callable[[Any, float], None] | None = None,
        retry_on: type[TransientError] = TransientError,
        budget_s: float | None = None,
    ) -> T:
        """:meth:`run` for a coroutine function; waits with ``sleep`` (default ``asyncio.sleep``)."""
        attempts, sleep = self.attempts(budget_s), self.sleep or asyncio.sleep
        while True:
            try:
                return await fn()
            except retry_on as exc:
                delay = attempts.next_delay(exc.retry_after)
                if delay is None:
                    raise gave_up(exc, attempts.failures) from None
                if on_retry is not None:
                    on_retry(exc, delay)
                await sleep(delay)

    def attempt(
        self,
        request: Callable[[], httpx.Response],
        failures: Failures,
        *,
        idempotent: bool = True,
        ok: Collection[int] = (200, 201),
    ) -> httpx.Response:
        """One try of ``request``: the response when its status is in ``ok``; :class:`Retryable` when another
        try may work; else the error ``failures`` builds for the verdict."""
        try:
            outcome: Outcome = request()
        except httpx.TransportError as exc:
            outcome = exc
        verdict = self.classify(outcome, idempotent=idempotent, ok=ok)
        if verdict is Verdict.OK:
            assert isinstance(outcome, httpx.Response)
            return outcome
        if verdict is Verdict.REFUSED:
            assert isinstance(outcome, httpx.Response)
            raise failures.refused(outcome)
        if verdict is Verdict.CERTIFICATE:
            assert isinstance(outcome, httpx.TransportError)
            raise failures.certificate(outcome) from None
        problem = failures.problem(outcome)
        retry_after = retry_after_of(outcome) if isinstance(outcome, httpx.Response) else None
        if verdict is Verdict.MAYBE_APPLIED:
            raise failures.maybe_applied(outcome, problem, retry_after) from None
        raise Retryable(problem, retry_after=retry_after) from None

    def send(
        self,
        request: Callable[[], httpx.Response],
        failures: Failures,
        *,
        idempotent: bool = True,
        ok: Collection[int] = (200, 201),
        budget_s: float | None = None,
    ) -> httpx.Response:
        """``request()`` (one HTTP exchange) with this policy's retries: the response when its status is in
        ``ok``, else the error ``failures`` builds (``gave_up`` once the retries are spent)."""

        def retrying(exc: Retryable, delay: float) -> None:
            log.info("%s: %s; retrying in %.2fs", failures.where, exc.problem, delay)

        return self.run(
            lambda: self.attempt(request, failures, idempotent=idempotent, ok=ok),
            gave_up=lambda exc, n: failures.gave_up(exc.problem, n, exc.retry_after),
            on_retry=retrying,
            retry_on=Retryable,
            budget_s=budget_s,
        )
