"""Emulator Auth (dex web3 challenge) and Token Exchange, over a real socket."""

from __future__ import annotations

import base64
import re
import time

import httpx
import jwt
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from jwt.algorithms import RSAAlgorithm

from connectors.dimo.emulator import auth
from connectors.dimo.emulator.auth import InvalidJWT, VehicleClaims, verify_vehicle_jwt
from connectors.dimo.settings import VEHICLE_NFT_DEV, VEHICLE_NFT_PROD
from tests.support.emulator_auth import STRANGER, Server


def _challenge(c: httpx.Client, s: Server, **over: str) -> httpx.Response:
    lic = s.state.license
    form = {
        "client_id": lic.client_id,
        "domain": lic.domain,
        "scope": "openid email",
        "response_type": "code",
        "address": lic.client_id,
        **over,
    }
    return c.post("/auth/web3/generate_challenge", data=form)


def _submit(c: httpx.Client, s: Server, state_id: str, signature: str) -> httpx.Response:
    lic = s.state.license
    form = {
        "client_id": lic.client_id,
        "domain": lic.domain,
        "state": state_id,
        "signature": signature,
        "grant_type": "authorization_code",
    }
    return c.post("/auth/web3/submit_challenge", data=form)


def _sign(text: str, key: str) -> str:
    return "0x" + Account.sign_message(
        encode_defunct(text=text), private_key=key
    ).signature.hex().removeprefix("0x")


def dev_jwt(s: Server) -> str:
    """Run the whole web3 flow with the license's signer key; return the access token."""
    with s.client() as c:
        ch = _challenge(c, s).json()
        r = _submit(c, s, ch["state"], _sign(ch["challenge"], s.state.license.private_key))
        assert r.status_code == 200, r.text
        return r.json()["access_token"]


# --------------------------------------------------------------------------------------------------
# dex


def test_challenge_flow_issues_dev_jwt_verifiable_with_jwks(srv: Server) -> None:
    lic = srv.state.license
    with srv.client() as c:
        r = _challenge(c, srv)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        ch = r.json()
        text = ch["challenge"]
        host = srv.url.removeprefix("http://")
        assert text.startswith(
            f"{host} wants you to sign in with your Ethereum account:\n{lic.client_id}\n\n"
        )
        assert "localhost:8765 is asking you sign in." in text
        assert re.search(r"\nNonce: [A-Za-z0-9]{30}\nIssued At: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", text)
        assert ch["state"] in srv.state.challenges

        r = _submit(c, srv, ch["state"], _sign(text, lic.private_key))
        assert r.status_code == 200, r.text
        tok = r.json()
        assert tok["token_type"] == "bearer" and tok["expires_in"] == 14 * 86400

        jwks = c.get("/keys").json()["keys"]
        assert {k["kid"] for k in jwks} == {srv.state.dev_key.kid, srv.state.vehicle_key.kid}
    for name in ("access_token", "id_token"):
        kid = jwt.get_unverified_header(tok[name])["kid"]
        key = RSAAlgorithm.from_jwk(next(k for k in jwks if k["kid"] == kid))
        claims = jwt.decode(tok[name], key, algorithms=["RS256"], audience=lic.client_id)  # type: ignore[arg-type]
        assert claims["iss"] == srv.url and claims["aud"] == lic.client_id
        assert claims["ethereum_address"] == lic.client_id and claims["provider_id"] == "web3"
        assert claims["email_verified"] is False and claims["exp"] - claims["iat"] == 14 * 86400
        sub = base64.urlsafe_b64decode(claims["sub"] + "=" * (-len(claims["sub"]) % 4))
        assert sub == b"\x0a\x2a" + lic.client_id.encode() + b"\x12\x04web3"
    assert "at_hash" in jwt.decode(tok["id_token"], options={"verify_signature": False})


def test_challenge_accepts_query_params_and_v_0_1_signatures(srv: Server) -> None:
    lic = srv.state.license
    params = {"client_id": lic.client_id, "domain": lic.domain, "address": lic.client_id.lower()}
    with srv.client() as c:
        ch = c.post("/auth/web3/generate_challenge", params=params).json()
        sig = bytes.fromhex(_sign(ch["challenge"], lic.private_key)[2:])
        low_v = sig[:64] + bytes([sig[64] - 27])
        assert _submit(c, srv, ch["state"], "0x" + low_v.hex()).status_code == 200


def test_challenge_client_errors_are_dex_pages(srv: Server) -> None:
    lic = srv.state.license
    with srv.client() as c:
        r = _challenge(c, srv, client_id=STRANGER)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert f'Invalid client_id ("{STRANGER}").' in r.text
        r = _challenge(c, srv, domain="https://evil.example/cb")
        assert r.status_code == 400 and 'Unregistered redirect_uri ("https://evil.example/cb").' in r.text
        r = _challenge(c, srv, address="0x1234")
        assert r.status_code == 400 and r.json() == {"status": 400, "message": "Invalid Ethereum address."}
        assert lic.client_id  # license untouched


def test_submit_rejects_wrong_signer_reuse_unknown_and_expired(srv: Server) -> None:
    lic = srv.state.license
    intruder = Account.create()
    with srv.client() as c:
        ch = _challenge(c, srv).json()
        r = _submit(c, srv, ch["state"], _sign(ch["challenge"], intruder.key.hex()))
        assert r.status_code == 400 and r.json() == {"status": 400, "message": "Could not verify signature."}
        r = _submit(c, srv, ch["state"], "0xdeadbeef")
        assert r.json()["message"] == "Could not verify signature."
        good = _sign(ch["challenge"], lic.private_key)
        assert _submit(c, srv, ch["state"], good).status_code == 200
        r = _submit(c, srv, ch["state"], good)  # a challenge is single-use
        assert r.status_code == 400 and r.json()["message"] == "Requested resource does not exist."
        r = _submit(c, srv, "no-such-state", good)
        assert r.json() == {"status": 400, "message": "Requested resource does not exist."}

        ch = _challenge(c, srv).json()
        srv.clock[0] += 24 * 3600 + 1
        r = _submit(c, srv, ch["state"], _sign(ch["challenge"], lic.private_key))
        assert r.status_code == 400 and r.json()["message"] == "User session has expired."


def test_signature_by_the_address_itself_is_accepted(srv: Server) -> None:
    """dex accepts the challenge address signing for itself (an EOA client id), besides license signers."""
    acct = Account.create()
    with srv.client() as c:
        ch = _challenge(c, srv, address=acct.address).json()
        assert _submit(c, srv, ch["state"], _sign(ch["challenge"], acct.key.hex())).status_code == 200


# --------------------------------------------------------------------------------------------------
# token exchange


def _exchange(s: Server, body: object, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with s.client() as c:
        if isinstance(body, bytes):
            return c.post("/v1/tokens/exchange", content=body, headers=headers)
        return c.post("/v1/tokens/exchange", json=body, headers=headers)


def test_exchange_legacy_body_issues_vehicle_jwt(srv: Server) -> None:
    lic = srv.state.license
    r = _exchange(
        srv, {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [4, 1], "tokenId": 10}, dev_jwt(srv)
    )
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    with srv.client() as c:
        jwk = next(
            k for k in c.get("/keys").json()["keys"] if k["kid"] == jwt.get_unverified_header(token)["kid"]
        )
    claims = jwt.decode(token, RSAAlgorithm.from_jwk(jwk), algorithms=["RS256"], audience="dimo.zone")  # type: ignore[arg-type]
    assert claims == {
        "iss": "https://auth-roles-rights.dimo.zone",
        "sub": lic.client_id,
        "aud": ["dimo.zone"],
        "iat": claims["iat"],
        "exp": claims["iat"] + 600,
        "asset": f"did:erc721:137:{VEHICLE_NFT_PROD}:10",
        "permissions": ["privilege:GetNonLocationHistory", "privilege:GetLocationHistory"],
        "cloud_events": {"events": []},
        "contract_address": VEHICLE_NFT_PROD.lower(),
        "token_id": "10",
        "privilege_ids": [1, 4],
    }
    got = verify_vehicle_jwt(srv.state, f"Bearer {token}")
    assert got == VehicleClaims(token_id=10, privileges=frozenset({1, 4}), contract=VEHICLE_NFT_PROD)


def test_exchange_new_body_and_dev_contract(srv: Server) -> None:
    dev = dev_jwt(srv)
    body = {
        "asset": f"did:erc721:137:{VEHICLE_NFT_PROD}:10",
        "permissions": ["privilege:GetApproximateLocation"],
    }
    r = _exchange(srv, {**body, "tokenId": 999, "privileges": [2]}, dev)  # asset/permissions win
    assert r.status_code == 200, r.text
    claims = verify_vehicle_jwt(srv.state, "Bearer " + r.json()["token"])
    assert claims == VehicleClaims(10, frozenset({8}), VEHICLE_NFT_PROD)

    r = _exchange(srv, {"nftContractAddress": VEHICLE_NFT_DEV.lower(), "privileges": [1], "tokenId": 40}, dev)
    assert r.status_code == 200, r.text
    claims = verify_vehicle_jwt(srv.state, "Bearer " + r.json()["token"])
    assert claims is not None and claims.contract == VEHICLE_NFT_DEV and claims.token_id == 40


def test_exchange_legacy_only_ignores_the_new_fields(srv: Server) -> None:
    """``exchange_legacy_only``: a token-exchange-api from before asset/permissions existed."""
    dev = dev_jwt(srv)
    new = {
        "asset": f"did:erc721:137:{VEHICLE_NFT_PROD}:10",
        "permissions": ["privilege:GetNonLocationHistory"],
    }
    srv.state.exchange_legacy_only = True
    try:
        r = _exchange(srv, new, dev)
        legacy = _exchange(
            srv, {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1], "tokenId": 10}, dev
        )
    finally:
        srv.state.exchange_legacy_only = False
    assert (r.status_code, r.json()) == (400, {"code": 400, "message": 'Invalid NFT contract address "".'})
    assert legacy.status_code == 200
    assert _exchange(srv, new, dev).status_code == 200  # the current service takes it


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1, 8], "tokenId": 40},
            403,
            "Address {cid} lacks permissions [privilege:GetApproximateLocation] for asset "
            f"did:erc721:137:{VEHICLE_NFT_PROD}:40",
        ),
        (  # grant expired
            {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1], "tokenId": 20},
            403,
            "Address {cid} lacks permissions [privilege:GetNonLocationHistory] for asset "
            f"did:erc721:137:{VEHICLE_NFT_PROD}:20",
        ),
        (
            {"nftContractAddress": STRANGER, "privileges": [1], "tokenId": 10},
            400,
            f'Invalid NFT contract address "{STRANGER}".',
        ),
        (
            {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1, 9], "tokenId": 10},
            400,
            "unknown privileges [9]",
        ),
        (
            {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [], "tokenId": 10},
            400,
            "Please provide at least one privilege or cloudevent",
        ),
        (
            {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": "all", "tokenId": 10},
            400,
            "Couldn't parse request body.",
        ),
        (b"not json", 400, "Couldn't parse request body."),
        ({"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1], "tokenId": 5}, 404, None),
    ],
)
def test_exchange_errors(srv: Server, body: object, status: int, message: str | None) -> None:
    r = _exchange(srv, body, dev_jwt(srv))
    assert r.status_code == status
    got = r.json()
    assert got["code"] == status and set(got) == {"code", "message"}
    if message is not None:
        assert got["message"] == message.format(cid=srv.state.license.client_id)


def test_exchange_rejects_bad_bearer_tokens(srv: Server) -> None:
    body = {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1], "tokenId": 10}
    r = _exchange(srv, body, None)
    assert (r.status_code, r.text) == (400, "Missing or malformed JWT")
    assert r.headers["content-type"].startswith("text/plain")
    r = _exchange(srv, body, "not.a.jwt")
    assert (r.status_code, r.text) == (401, "Invalid or expired JWT")

    token = dev_jwt(srv)
    srv.clock[0] += 14 * 86400 + 1
    r = _exchange(srv, body, token)
    assert (r.status_code, r.text) == (401, "Invalid or expired JWT")
    srv.clock[0] = time.time()

    now = int(time.time())
    no_claim = srv.state.dev_key.sign({"iss": srv.url, "sub": "x", "iat": now, "exp": now + 60})
    r = _exchange(srv, body, no_claim)
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "No Ethereum address claim found."}
    other = srv.state.dev_key.sign({"ethereum_address": STRANGER, "iat": now, "exp": now + 60})
    r = _exchange(srv, body, other)
    assert r.status_code == 403 and r.json() == {"code": 403, "message": f"not a dev license: {STRANGER}"}
    forged = srv.state.vehicle_key.sign({"ethereum_address": srv.state.license.client_id, "exp": now + 60})
    assert _exchange(srv, body, forged).status_code == 401


def test_verify_vehicle_jwt_rejects_expired_foreign_and_malformed(srv: Server) -> None:
    st = srv.state
    assert verify_vehicle_jwt(st, None) is None
    r = _exchange(
        srv, {"nftContractAddress": VEHICLE_NFT_PROD, "privileges": [1], "tokenId": 10}, dev_jwt(srv)
    )
    token = r.json()["token"]
    assert verify_vehicle_jwt(st, f"Bearer {token}") is not None
    with pytest.raises(InvalidJWT):
        verify_vehicle_jwt(st, token)  # no scheme
    with pytest.raises(InvalidJWT):
        verify_vehicle_jwt(st, f"Bearer {dev_jwt(srv)}")  # a developer JWT is not a vehicle JWT
    now = int(st.clock())
    base = {"iss": auth.VEHICLE_JWT_ISSUER, "exp": now + 60, "asset": f"did:erc721:137:{VEHICLE_NFT_PROD}:10"}
    with pytest.raises(InvalidJWT):
        verify_vehicle_jwt(st, "Bearer " + st.vehicle_key.sign({**base, "aud": ["other.zone"]}))
    srv.clock[0] += 601
    with pytest.raises(InvalidJWT):
        verify_vehicle_jwt(st, f"Bearer {token}")


def test_verify_vehicle_jwt_ignores_malformed_privilege_claims(srv: Server) -> None:
    st = srv.state
    base = {
        "iss": auth.VEHICLE_JWT_ISSUER,
        "aud": ["dimo.zone"],
        "exp": int(st.clock()) + 60,
        "asset": f"did:erc721:137:{VEHICLE_NFT_PROD}:10",
    }
    for extra, want in (
        ({"privilege_ids": 4}, frozenset()),
        ({"privilege_ids": [1, True, "4", 4]}, frozenset({1, 4})),
        ({"permissions": [{"x": 1}, "privilege:GetLocationHistory"], "privilege_ids": [1]}, frozenset({4})),
    ):
        claims = verify_vehicle_jwt(st, "Bearer " + st.vehicle_key.sign({**base, **extra}))
        assert claims is not None and claims.privileges == want, extra


def test_dex_subject_encoding_handles_long_ids() -> None:
    long_id = "x" * 200  # needs a two-byte varint length
    raw = base64.urlsafe_b64decode(auth.dex_subject(long_id) + "==")
    assert raw[:3] == b"\x0a\xc8\x01" and raw.endswith(b"\x12\x04web3")
