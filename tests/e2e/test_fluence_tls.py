"""The Fluence gateway's transport: HTTPS with the certificate the publisher made for the VM, pinned.

A man in the middle on loopback — a TLS proxy presenting another certificate in front of the real gateway,
forwarding whatever it decrypts — is refused with a clear error, and the admin key never reaches the proxy's
upstream; a plain-HTTP gateway URL to a remote host is refused before any connection is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from depin_core.errors import ConfigError
from depin_core.net import free_port
from depin_core.tls import PinMismatch, make_certificate
from pipelines.cli.serve import run_invoke
from serving.client import GatewayClient
from serving.fluence import FluenceClient
from serving.fluence.publisher import FluencePublisher
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import StateStore
from serving.publish import GatewayPublisher
from tests.support.fakes.fluence import FakeFluence
from tests.support.tls_proxy import MitmProxy


@pytest.fixture
def deployed(
    range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> Iterator[tuple[FakeFluence, FluenceSettings]]:
    """A gateway VM on the fake Fluence (generation B) with one function published over pinned TLS."""
    with FakeFluence("B", step_s=0.05) as fake:
        settings = FluenceSettings(
            target="t1",
            port=free_port(),
            state_dir=tmp_path / "fluence",
            poll_s=0.05,
            vm_timeout_s=30.0,
            ready_timeout_s=120.0,
        )
        with publisher_for(fake, publisher, settings) as pub:
            pub.publish(range_artifact, "range", alias="prod")
        yield fake, settings
        with publisher_for(fake, publisher, settings) as pub:
            pub.down()


def publisher_for(fake: FakeFluence, account: LocalAccount, settings: FluenceSettings) -> FluencePublisher:
    client = FluenceClient(fake.api_key, base_url=fake.url, backoff_s=0.01)
    return FluencePublisher(
        client, account, settings, own_client=True, gateway_options={"retries": 2, "backoff_s": 0.01}
    )


@pytest.mark.e2e
def test_a_man_in_the_middle_is_refused_and_never_sees_the_admin_key(
    deployed: tuple[FakeFluence, FluenceSettings], range_artifact: Path, publisher: LocalAccount
) -> None:
    fake, settings = deployed
    store = StateStore(settings.state_dir)
    dep = store.get("t1")
    assert dep is not None and dep.url == f"https://127.0.0.1:{settings.port}"
    key = store.admin_key("t1")
    assert key is not None
    proxy = MitmProxy(f"https://127.0.0.1:{settings.port}")
    try:
        # control: the proxy is a working man in the middle — an unpinned client's request goes through it
        r = httpx.get(
            f"https://127.0.0.1:{proxy.port}/healthz",
            headers={"X-Probe": "mitm-control", "Connection": "close"},
            verify=False,
        )
        assert r.status_code == 200 and b"mitm-control" in proxy.forwarded
        proxy.forwarded.clear()

        # the traffic is routed to the proxy (as a hijacked address would): the publisher's pinned
        # connections refuse its certificate, with a clear error, before anything is sent
        store.put(dep.model_copy(update={"port": proxy.port}))
        via = f"https://127.0.0.1:{proxy.port}"
        with publisher_for(fake, publisher, settings) as pub, pytest.raises(PinMismatch) as exc:
            pub.publish(range_artifact, "range", alias="canary")
        message = str(exc.value)
        assert "man in the middle" in message and dep.tls_fingerprint in message  # type: ignore[operator]
        pem = store.tls_cert("t1")
        with (
            GatewayPublisher(via, key, publisher, tls_cert_pem=pem, retries=3, backoff_s=0.01) as gw,
            pytest.raises(PinMismatch, match="nothing was sent"),
        ):
            gw.publish(range_artifact, "range", alias="canary")
        with pytest.raises(PinMismatch):  # depin invoke pins the recorded certificate for that URL too
            run_invoke(ref="range@prod", data='{"x": 1}', target=via, request_id=None)
    finally:
        proxy.close()  # waits for its connections to end: what it forwarded is final
        store.put(dep)  # the fixture's `down` deletes the VM
    assert proxy.handshakes_failed >= 3
    assert bytes(proxy.forwarded) == b""
    assert key.get_secret_value().encode() not in bytes(proxy.forwarded)
    assert fake.vm(dep.vm_id or "")["gateway_alive"]  # the real gateway was never touched


def test_plain_http_to_a_remote_gateway_is_refused_before_connecting(publisher: LocalAccount) -> None:
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(
        lambda req: sent.append(req) or httpx.Response(200, json={"functions": []})
    )
    key = SecretStr("dgk_never-sent-in-clear")
    for url in ("http://203.0.113.7:8787", "http://gateway.example.org"):
        with pytest.raises(ConfigError, match="plain HTTP to a remote machine"):
            GatewayClient(url, admin_key=key, transport=transport)
        with pytest.raises(ConfigError, match="plain HTTP"):
            GatewayPublisher(url, key, publisher, transport=transport)
        with pytest.raises(ConfigError, match="use https://"):
            GatewayClient(url, tls_cert_pem=make_certificate().cert_pem, transport=transport)
        with pytest.raises(
            ConfigError, match="plain HTTP to a remote machine"
        ):  # public calls carry rows too
            GatewayClient(url, transport=transport)
        with pytest.raises(ConfigError, match="plain HTTP to a remote machine"):  # never the admin key
            GatewayClient(url, admin_key=key, transport=transport, insecure_http=True)
    assert sent == []
    with GatewayClient("http://gateway.example.org", transport=transport, insecure_http=True) as public:
        public.functions()  # the user's explicit choice, for calls without the admin key
    assert [str(r.url) for r in sent] == ["http://gateway.example.org/v1/functions"]
    # loopback may stay plain HTTP (`depin serve` on 127.0.0.1)
    GatewayClient("http://127.0.0.1:8787", admin_key=key, transport=transport).close()


def test_gateway_tls_settings_come_in_pairs_and_must_exist(tmp_path: Path) -> None:
    from serving.settings import GatewaySettings

    cert_file, key_file = make_certificate().write(tmp_path)
    with pytest.raises(ConfigError, match="DEPIN_GATEWAY_TLS_KEY_FILE go together"):
        GatewaySettings(tls_cert_file=cert_file)
    with pytest.raises(ConfigError, match=r"TLS_KEY_FILE.*no such file"):
        GatewaySettings(tls_cert_file=cert_file, tls_key_file=tmp_path / "missing.pem")
    settings = GatewaySettings(tls_cert_file=cert_file, tls_key_file=key_file)
    assert settings.scheme == "https" and GatewaySettings().scheme == "http"
