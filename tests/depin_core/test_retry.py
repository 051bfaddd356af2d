"""The one retry policy (depin_core.retry): verdicts, waits, limits, and ``send`` against a real loopback HTTP
server (plain and TLS) that answers each request with the next scripted action. Waits are recorded, never slept."""

from __future__ import annotations

import random
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from depin_core.errors import PermanentError, TransientError
from depin_core.retry import Failures, RetryPolicy, Verdict
from depin_core.tls import PinMismatch, client_context, make_certificate

Action = int | tuple[int, dict[str, str]] | str  # a status, a status with headers, or "drop"


class Scripted(ThreadingHTTPServer):
    """Answers the n-th request with ``actions[n]`` (the last one repeats); ``"drop"`` closes the connection
    after reading the request, without an answer. ``requests`` records (method, path)."""

    daemon_threads = True

    def __init__(self, actions: list[Action]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.actions = actions
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_action(self, method: str, path: str) -> Action:
        with self.lock:
            self.requests.append((method, path))
            return self.actions[min(len(self.requests), len(self.actions)) - 1]


class _Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        action = self.server.next_action(self.command, self.path)
        if action == "drop":
            self.close_connection = True
            return
        status, headers = action if isinstance(action, tuple) else (action, {})
        assert isinstance(status, int)
        body = b'{"ok": true}'
        self.send_response(status)
        for k, v in {"content-type": "application/json", "content-length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer


@contextmanager
def serving(actions: list[Action], tls_dir: Path | None = None) -> Iterator[Scripted]:
    server = Scripted(actions)
    if tls_dir is not None:  # the server presents a certificate of its own
        cert, key = make_certificate().write(tls_dir)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def policy(sleeps: list[float], **kw: Any) -> RetryPolicy:
    kw.setdefault("max_retries", 4)
    return RetryPolicy(base_s=0.5, max_s=8.0, sleep=sleeps.append, rng=random.Random(7), **kw)


def send(p: RetryPolicy, url: str, method: str = "GET", **kw: Any) -> httpx.Response:
    with httpx.Client(timeout=5.0) as client:
        return p.send(lambda: client.request(method, url + "/thing"), Failures(f"{method} {url}/thing"), **kw)


# ---- verdicts (pure) ----------------------------------------------------------------------------------------------
def _cert_refusal() -> httpx.ConnectError:
    try:
        raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    except ssl.SSLCertVerificationError as cause:
        exc = httpx.ConnectError("handshake failed")
        exc.__cause__ = cause
        return exc


@pytest.mark.parametrize(
    ("outcome", "idempotent", "verdict"),
    [
        (httpx.Response(201), False, Verdict.OK),
        (httpx.Response(404), True, Verdict.REFUSED),
        (httpx.Response(500), True, Verdict.REFUSED),  # not in the default statuses
        (httpx.Response(503), True, Verdict.RETRY),
        (httpx.Response(503), False, Verdict.MAYBE_APPLIED),  # resend_statuses={429} below
        (httpx.Response(429), False, Verdict.RETRY),
        (httpx.ConnectError("refused"), False, Verdict.RETRY),  # nothing was sent
        (httpx.ReadTimeout("slow"), True, Verdict.RETRY),
        (httpx.ReadTimeout("slow"), False, Verdict.MAYBE_APPLIED),
        (httpx.RemoteProtocolError("dropped"), False, Verdict.MAYBE_APPLIED),
        (_cert_refusal(), True, Verdict.CERTIFICATE),
    ],
)
def test_classify(outcome: httpx.Response | httpx.TransportError, idempotent: bool, verdict: Verdict) -> None:
    p = RetryPolicy(resend_statuses=frozenset({429}))
    assert p.classify(outcome, idempotent=idempotent) is verdict


def test_statuses_and_resend_statuses_are_parameters() -> None:
    default = RetryPolicy()
    assert default.classify(httpx.Response(502), idempotent=False) is Verdict.RETRY  # resend: all transient
    wider = RetryPolicy(statuses=frozenset({429, 500, 502, 503, 504}))
    assert wider.classify(httpx.Response(500)) is Verdict.RETRY
    assert RetryPolicy().classify(httpx.Response(204), ok=(204,)) is Verdict.OK


# ---- waits --------------------------------------------------------------------------------------------------------
def test_backoff_doubles_within_20_percent_and_stops_at_max_s() -> None:
    p = RetryPolicy(base_s=0.5, max_s=3.0, rng=random.Random(1))
    for attempt, nominal in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (40, 3.0), (10_000, 3.0)]:
        waits = [p.delay(attempt) for _ in range(50)]
        assert min(waits) >= 0.8 * nominal and max(waits) <= 1.2 * nominal


def test_retry_after_replaces_the_backoff_and_is_capped() -> None:
    p = RetryPolicy(base_s=0.5, max_s=3.0, rng=random.Random(1))
    assert 1.6 <= p.delay(1, retry_after=2.0) <= 2.4
    assert p.delay(1, retry_after=1e6) <= 3.6  # capped at max_s (±20 %)
    full = RetryPolicy(base_s=0.5, max_s=3.0, full_jitter=True, retry_after_cap_s=60.0, rng=random.Random(1))
    assert full.delay(1, retry_after=2.0) == 2.0  # the server's wish exactly
    assert full.delay(1, retry_after=1e6) == 60.0
    assert all(0 <= full.delay(3) <= 2.0 for _ in range(50))


def test_attempts_end_at_max_retries_or_at_the_budget() -> None:
    counted = RetryPolicy(max_retries=2).attempts()
    assert counted.next_delay() is not None and counted.next_delay() is not None
    assert counted.next_delay() is None and counted.failures == 3
    now = [0.0]
    timed = RetryPolicy(max_retries=None, base_s=1.0, max_s=1.0, clock=lambda: now[0]).attempts(budget_s=2.5)
    waits = []
    while (d := timed.next_delay()) is not None:
        waits.append(d)
        now[0] += d
    assert waits and sum(waits) <= 2.5 and timed.failures == len(waits) + 1


# ---- send, against a loopback server ------------------------------------------------------------------------------
def test_send_retries_transient_answers_then_returns_the_success() -> None:
    sleeps: list[float] = []
    with serving([(503, {"Retry-After": "2"}), 502, 200]) as server:
        r = send(policy(sleeps), server.url)
    assert r.status_code == 200 and len(server.requests) == 3
    assert 1.6 <= sleeps[0] <= 2.4  # Retry-After: 2 wins over the backoff
    assert 0.8 <= sleeps[1] <= 1.2  # second retry: 0.5 × 2, ±20 %


def test_send_gives_up_after_max_retries_with_the_servers_hint() -> None:
    sleeps: list[float] = []
    with (
        serving([(429, {"Retry-After": "1"})]) as server,
        pytest.raises(TransientError, match="gave up after 3 attempts") as info,
    ):
        send(policy(sleeps, max_retries=2), server.url)
    assert len(server.requests) == 3 and len(sleeps) == 2
    assert info.value.retry_after == 1.0 and "429" in str(info.value)


def test_a_permanent_answer_is_never_retried() -> None:
    sleeps: list[float] = []
    with serving([404, 200]) as server, pytest.raises(PermanentError, match="404"):
        send(policy(sleeps), server.url)
    assert len(server.requests) == 1 and sleeps == []


def test_a_dropped_connection_is_resent_only_when_idempotent() -> None:
    sleeps: list[float] = []
    with serving(["drop", 200]) as server:
        assert send(policy(sleeps), server.url, "PUT").status_code == 200
    assert len(server.requests) == 2
    with serving(["drop", 200]) as server, pytest.raises(TransientError, match="may have been applied"):
        send(policy(sleeps), server.url, "POST", idempotent=False)
    assert server.requests == [("POST", "/thing")]


def test_a_non_idempotent_request_is_resent_only_after_a_resend_status() -> None:
    sleeps: list[float] = []
    with (
        serving([429, 502, 200]) as server,
        pytest.raises(TransientError, match="502 Bad Gateway; the request may have been applied"),
    ):
        send(policy(sleeps, resend_statuses=frozenset({429})), server.url, "POST", idempotent=False)
    assert len(server.requests) == 2 and len(sleeps) == 1


def test_a_refused_connection_is_retried_even_when_not_idempotent() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        sleeps: list[float] = []
        with pytest.raises(
            TransientError, match=r"cannot connect \(ConnectError\); gave up after 3 attempts"
        ):
            send(policy(sleeps, max_retries=2), url, "POST", idempotent=False)
    assert len(sleeps) == 2


def test_a_refused_certificate_is_never_retried(tmp_path: Path) -> None:
    sleeps: list[float] = []
    other = make_certificate()  # the client trusts this one; the server presents another
    with serving([200], tls_dir=tmp_path) as server:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        with (
            httpx.Client(verify=client_context(other.cert_pem), timeout=5.0) as client,
            pytest.raises(PinMismatch, match="TLS certificate was refused"),
        ):
            policy(sleeps).send(lambda: client.get(url + "/thing"), Failures(f"GET {url}/thing"))
    assert server.requests == [] and sleeps == []


def test_send_stops_within_the_budget() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    p = RetryPolicy(max_retries=None, base_s=0.2, max_s=1.0, sleep=sleep, clock=lambda: now[0])
    with serving([503]) as server, pytest.raises(TransientError, match="gave up after"):
        send(p, server.url, budget_s=2.0)
    assert sum(sleeps) <= 2.0 and len(server.requests) == len(sleeps) + 1 >= 3


# ---- run_async ----------------------------------------------------------------------------------------------------
async def test_run_async_retries_transient_errors_and_words_the_last_one() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("busy", retry_after=0.25)
        return "done"

    p = RetryPolicy(max_retries=5, sleep=sleep)
    assert await p.run_async(flaky, gave_up=lambda e, n: AssertionError(n)) == "done"
    assert slept == pytest.approx([0.25, 0.25], rel=0.2) and len(calls) == 3

    async def down() -> str:
        raise TransientError("down")

    class GaveUp(TransientError):
        pass

    with pytest.raises(GaveUp, match="down after 2"):
        await RetryPolicy(max_retries=1, sleep=sleep).run_async(
            down, gave_up=lambda e, n: GaveUp(f"{e} after {n}")
        )

    async def refused() -> str:
        raise PermanentError("no")

    with pytest.raises(PermanentError, match="no"):  # only retry_on (TransientError) is retried
        await p.run_async(refused, gave_up=lambda e, n: AssertionError(n))
