"""Pinned TLS: a client trusts exactly the certificate it made (or learned by fingerprint) for a node."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from depin_core.errors import ConfigError
from depin_core.net import free_port
from depin_core.tls import (
    PinMismatch,
    agreed_fingerprint,
    check_url,
    client_context,
    fetch_certificate,
    fingerprint,
    is_certificate_refusal,
    load_or_make,
    make_certificate,
    normalise_fingerprint,
    pin_refused,
)


@contextmanager
def https_server(tmp: Path, cert_dir: Path) -> Iterator[str]:
    """A real uvicorn HTTPS server on loopback with the certificate kept in ``cert_dir``."""
    load_or_make(cert_dir)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning",
        ssl_certfile=str(cert_dir / "tls-cert.pem"), ssl_keyfile=str(cert_dir / "tls-key.pem"),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the HTTPS server did not start")
            thread.join(0.01)
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_pinned_certificate_is_accepted_and_any_other_refused(tmp_path: Path) -> None:
    with https_server(tmp_path, tmp_path / "node") as url:
        mine = load_or_make(tmp_path / "node")
        assert httpx.get(url, verify=client_context(mine.cert_pem)).text == "ok"
        other = make_certificate()  # what a man in the middle would present, for the same names
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            httpx.get(url, verify=client_context(other.cert_pem))
        assert is_certificate_refusal(refused.value)
        with pytest.raises(httpx.ConnectError) as unreachable:  # a network problem is not a refusal
            httpx.get(f"https://127.0.0.1:{free_port()}", verify=client_context(mine.cert_pem))
        assert not is_certificate_refusal(unreachable.value)
        # known only by its fingerprint: the certificate is read and kept when (and only when) the hash matches
        pem = fetch_certificate(url, mine.fingerprint.upper())
        assert fingerprint(pem) == mine.fingerprint
        with pytest.raises(PinMismatch, match=f"not the pinned {other.fingerprint}"):
            fetch_certificate(url, other.fingerprint)


def test_a_restarted_server_keeps_its_certificate(tmp_path: Path) -> None:
    first = load_or_make(tmp_path)
    assert load_or_make(tmp_path) == first
    assert (tmp_path / "tls-key.pem").stat().st_mode & 0o777 == 0o600
    assert ssl.PEM_cert_to_DER_cert(first.cert_pem)


def test_plain_http_only_to_loopback() -> None:
    for ok in ("https://203.0.113.7:8900", "http://127.0.0.1:8900", "http://localhost:1", "http://[::1]:2"):
        assert check_url(ok) == ok
    for bad in ("http://203.0.113.7:8900", "http://node.example:8900", "ftp://x", "https://"):
        with pytest.raises(ConfigError, match="url"):
            check_url(bad)


def test_fingerprints_in_the_usual_spellings() -> None:
    fp = make_certificate().fingerprint
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalise_fingerprint(colons) == normalise_fingerprint(f"sha256:{fp}") == fp
    with pytest.raises(ConfigError, match="tls_fingerprint"):
        normalise_fingerprint("abc", field="tls_fingerprint")


def test_a_pin_given_as_certificate_and_fingerprint_must_agree() -> None:
    cert, other = make_certificate(), make_certificate()
    assert agreed_fingerprint(cert.cert_pem, cert.fingerprint.upper()) == cert.fingerprint
    assert agreed_fingerprint(cert.cert_pem, None) == agreed_fingerprint(None, f"sha256:{cert.fingerprint}")
    assert agreed_fingerprint(None, None) is None
    with pytest.raises(ConfigError, match=f"sha256 is {cert.fingerprint}, not the tls_fingerprint given"):
        agreed_fingerprint(cert.cert_pem, other.fingerprint)


def test_an_expired_pinned_certificate_is_told_apart_from_another_one(tmp_path: Path) -> None:
    expired = make_certificate(days=-0.001)  # ran out 86 s ago
    expired.write(tmp_path / "node")
    with https_server(tmp_path, tmp_path / "node") as url:
        with pytest.raises(httpx.ConnectError) as refused:
            httpx.get(url, verify=client_context(expired.cert_pem))
        assert is_certificate_refusal(refused.value)
        message = str(
            pin_refused(refused.value, "agent node-x", expired.fingerprint, "pin its new certificate")
        )
        assert message.startswith(
            f"agent node-x: the pinned TLS certificate (sha256 {expired.fingerprint}) has "
        )
        assert "expired" in message and "man in the middle" not in message
        other = make_certificate()  # a valid certificate that is not the pinned one
        with pytest.raises(httpx.ConnectError) as mitm:
            httpx.get(url, verify=client_context(other.cert_pem))
        message = str(pin_refused(mitm.value, "agent node-x", other.fingerprint, "pin its new certificate"))
        assert "other than the pinned one" in message and "man in the middle" in message
