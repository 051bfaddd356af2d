"""Developer JWT (challenge → sign → submit), refresh before expiry, vehicle JWT exchange and 401 refresh."""

from __future__ import annotations

import logging

import httpx
import jwt
import pytest

from connectors.dimo._auth import _cache_entry, _challenge, sign_challenge
from connectors.dimo.client import DimoClient
from connectors.dimo.errors import DimoAuthError, DimoPrivilegeError, DimoTransientError
from connectors.dimo.settings import DimoSettings
from tests.support.dimo_loopback import (
    NOW,
    SIGNER,
    FakeState,
    LoopbackServer,
    create_app,
    settings_for,
)


class Clock:
    def __init__(self) -> None:
        self.t = NOW.timestamp()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fake():
    clock = Clock()
    state = FakeState(clock=clock)
    with LoopbackServer(create_app(state)) as server:
        yield state, server.url, clock


def test_signature_is_0x_65_bytes_and_recoverable():
    from eth_account import Account
    from eth_account.messages import encode_defunct

    sig = sign_challenge("hello", "0x" + "11" * 32)
    assert sig.startswith("0x") and len(sig) == 2 + 130
    assert Account.recover_message(encode_defunct(text="hello"), signature=sig) == SIGNER.address


async def test_developer_token_cached_and_refreshed_before_expiry(fake):
    state, url, clock = fake
    state.dev_ttl = 1000  # margin = max(60, 100) = 100 s
    async with DimoClient(settings_for(url)) as client:
        dev = client.developer_token
        dev._clock = clock
        first = await dev.token()
        assert await dev.token() == first and dev.fetches == 1
        clock.t += 850  # 150 s left: still fresh
        assert await dev.token() == first
        clock.t += 60  # 90 s left: inside the margin → refreshed, though not yet expired
        second = await dev.token()
    assert second != first and dev.fetches == 2
    assert state.hits["/auth/web3/generate_challenge"] == 2


async def test_vehicle_token_reexchanged_on_401_and_before_exp(fake):
    state, url, clock = fake
    async with DimoClient(settings_for(url)) as client:
        client.vehicle_tokens._clock = clock
        client.developer_token._clock = clock
        assert await client.available_signals(3) == ["currentLocationCoordinates", "powertrainType", "speed"]
        assert len(state.exchanges) == 1
        await client.available_signals(3)
        assert len(state.exchanges) == 1  # cached
        # The server stops accepting the cached token (e.g. early expiry): 401 → one re-exchange → success.
        state.revoked_vehicle_tokens.add(client.vehicle_tokens._cache[3][1].token)
        await client.available_signals(3)
        assert len(state.exchanges) == 2
        clock.t += 545  # vehicle JWT lives 600 s; within 60 s of exp it is renewed
        await client.available_signals(3)
        assert len(state.exchanges) == 3
    assert state.exchanges[0] == {  # the current form; the legacy fallback is tested against the emulator
        "asset": "did:erc721:137:0xbA5738a18d83D41847dfFbDC6101d37C69c9B0cF:3",
        "permissions": ["privilege:GetNonLocationHistory"],
    }


async def test_exchange_403_is_a_privilege_error_with_advice(fake):
    state, url, _ = fake
    state.vehicles[7] = set()
    async with DimoClient(settings_for(url)) as client:
        with pytest.raises(DimoPrivilegeError, match=r"vehicle 7: .*privilege:GetNonLocationHistory.*share"):
            await client.available_signals(7)
    assert state.hits["/v1/tokens/exchange"] == 1  # not retried


async def test_wrong_key_is_an_auth_error_and_key_never_leaks(fake, caplog):
    _state, url, _ = fake
    key = "0x" + "33" * 32
    settings = DimoSettings(**{**settings_for(url).model_dump(), "private_key": key})
    caplog.set_level(logging.DEBUG)
    async with DimoClient(settings) as client:
        with pytest.raises(DimoAuthError, match="not an enabled signer") as info:
            await client.developer_token.token()
        text = f"{info.value!r} {info.value} {client!r} {client.developer_token!r} {settings!r} {settings}"
    assert key[2:] not in text and key[2:] not in caplog.text


async def test_unknown_client_id_says_what_to_fix(fake):
    _state, url, _ = fake
    settings = DimoSettings(
        **{**settings_for(url).model_dump(), "client_id": "0x" + "cd" * 20, "private_key": "0x" + "11" * 32}
    )
    async with DimoClient(settings) as client:
        with pytest.raises(DimoAuthError, match="DEPIN_DIMO_CLIENT_ID"):
            await client.developer_token.token()


async def test_expired_dev_token_on_exchange_is_refreshed_once(fake):
    state, url, clock = fake
    async with DimoClient(settings_for(url)) as client:
        client.developer_token._clock = lambda: clock.t - 10_000  # the client thinks its token is fresh
        await client.available_signals(3)
        clock.t += 4000  # server-side the dev token (ttl 3600) has expired
        client.vehicle_tokens.invalidate(3)
        await client.available_signals(3)
    assert state.hits["/auth/web3/submit_challenge"] == 2
    assert state.hits["/v1/tokens/exchange"] == 3  # 200, 401, 200


async def test_malformed_challenge_page_is_transient_and_odd_claims_fall_back():
    with pytest.raises(DimoTransientError, match="lacks state/challenge"):
        await _challenge(httpx.Response(200, content=b'{"state": "s"}'))
    with pytest.raises(DimoTransientError, match="lacks state/challenge"):
        await _challenge(httpx.Response(200, content=b'["s", "c"]'))
    assert await _challenge(httpx.Response(200, content=b'{"state": 7, "challenge": "c"}')) == {
        "state": "7",
        "challenge": "c",
    }
    # A server's non-numeric exp/iat must not crash the cache: the fallback lifetime is used instead.
    token = jwt.encode({"exp": "soon", "iat": None}, "k" * 32)
    entry = _cache_entry(token, 1000.0, fallback_ttl=600)
    assert entry.expires_at == 1600.0 and entry.margin == 60.0 and entry.fresh(1500.0)
