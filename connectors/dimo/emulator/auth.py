"""DIMO Auth (dex web3 connector) and Token Exchange, as the emulator serves them.

Routes: ``/auth/web3/generate_challenge``, ``/auth/web3/submit_challenge`` (developer JWT),
``/keys`` (JWKS for both signing keys), ``/v1/tokens/exchange`` (developer JWT -> vehicle JWT).
Bodies, status codes and error texts follow dex and token-exchange-api (see the DIMO reference §1).
:func:`verify_vehicle_jwt` is what the Telemetry endpoint uses to check a vehicle JWT.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_hex_address, to_checksum_address
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from connectors.dimo.emulator.gql import json_response
from connectors.dimo.emulator.keys import SigningKey
from connectors.dimo.emulator.state import Challenge, EmulatorState
from connectors.dimo.privileges import ID_TO_PERMISSION, PERMISSION_TO_ID
from connectors.dimo.settings import VEHICLE_NFT_DEV, VEHICLE_NFT_PROD

VEHICLE_JWT_ISSUER = "https://auth-roles-rights.dimo.zone"
VEHICLE_JWT_AUDIENCE = "dimo.zone"
AUTH_REQUEST_TTL_S = 24 * 3600
NFT_CHAINS = {VEHICLE_NFT_PROD.lower(): 137, VEHICLE_NFT_DEV.lower(): 80002}
_NONCE_ALPHABET = string.ascii_letters + string.digits
# did:erc721:<chain id>:<NFT contract>:<token id>
ERC721_DID = re.compile(r"^did:erc721:(\d+):(0x[0-9a-fA-F]{40}):(\d+)$")


# --------------------------------------------------------------------------------------------------
# Vehicle JWT verification (used by telemetry)


class InvalidJWT(Exception):
    """A bearer token that is malformed, wrongly signed, expired or lacks the vehicle claims."""


@dataclass(frozen=True)
class VehicleClaims:
    """What a verified vehicle JWT grants: privilege ids on one vehicle NFT."""

    token_id: int
    privileges: frozenset[int]
    contract: str  # checksummed vehicle NFT contract address


def _decode(key: SigningKey, token: str, now: float, audience: str | None = None) -> dict[str, Any]:
    """Verify an RS256 JWT signed by ``key``; ``exp`` is checked against ``now`` (the emulator clock)."""
    try:
        claims = jwt.decode(
            token,
            key.public_key,
            algorithms=["RS256"],
            audience=audience,
            options={"verify_aud": audience is not None, "verify_exp": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise InvalidJWT(f"token rejected: {type(exc).__name__}") from None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= now:
        raise InvalidJWT("token expired or has no exp")
    return claims


def _bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def verify_vehicle_jwt(state: EmulatorState, authorization: str | None) -> VehicleClaims | None:
    """Check the ``Authorization`` header of a Telemetry request.

    Returns None when there is no header, the granted claims when the vehicle JWT is valid
    (RS256 by ``state.vehicle_key``, unexpired, ``aud`` contains ``dimo.zone``), and raises
    :class:`InvalidJWT` otherwise.
    """
    if authorization is None or not authorization.strip():
        return None
    token = _bearer(authorization)
    if token is None:
        raise InvalidJWT("Authorization header is not 'Bearer <token>'")
    claims = _decode(state.vehicle_key, token, state.clock(), audience=VEHICLE_JWT_AUDIENCE)
    if claims.get("iss") != VEHICLE_JWT_ISSUER:
        raise InvalidJWT("token issuer is not the vehicle token issuer")
    m = ERC721_DID.match(str(claims.get("asset", "")))
    if m:
        contract, token_id = m.group(2), int(m.group(3))
    else:  # pre-2025 tokens carry only contract_address/token_id
        contract, raw_id = str(claims.get("contract_address", "")), str(claims.get("token_id", ""))
        if not is_hex_address(contract) or not raw_id.isdigit():
            raise InvalidJWT("token has no asset DID")
        token_id = int(raw_id)
    perms, ids = claims.get("permissions"), claims.get("privilege_ids")
    if isinstance(perms, list):
        privileges = frozenset(
            PERMISSION_TO_ID[p] for p in perms if isinstance(p, str) and p in PERMISSION_TO_ID
        )
    else:  # pre-2025 tokens carry only privilege_ids
        privileges = frozenset(p for p in ids if type(p) is int) if isinstance(ids, list) else frozenset()
    return VehicleClaims(token_id=token_id, privileges=privileges, contract=to_checksum_address(contract))


# --------------------------------------------------------------------------------------------------
# dex: challenge -> signature -> developer JWT


async def _form(request: Request) -> dict[str, str]:
    """Form fields from the urlencoded body merged over the query string (dex's ``r.ParseForm``)."""
    fields = dict(request.query_params)
    body = await request.body()
    if body:
        fields.update(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    return fields


def _html_error(status: int, message: str) -> Response:
    page = (
        "<!DOCTYPE html><html><head><title>dex</title></head><body>"
        f'<h2 class="theme-heading">Bad Request</h2><p>{html.escape(message, quote=False)}</p></body></html>'
    )
    return HTMLResponse(page, status_code=status)


def _dex_error(message: str, status: int = 400) -> Response:
    return json_response({"status": status, "message": message}, status)


def _client_error(state: EmulatorState, client_id: str, domain: str) -> Response | None:
    """dex's client/redirect_uri checks, as HTML pages."""
    lic = state.license
    if client_id.lower() != lic.client_id.lower():
        return _html_error(404, f'Invalid client_id ("{client_id}").')
    if domain != lic.domain:
        return _html_error(400, f'Unregistered redirect_uri ("{domain}").')
    return None


def challenge_text(state: EmulatorState, address: str, domain: str, nonce: str, issued_at: datetime) -> str:
    """The SIWE (EIP-4361) message dex asks the developer to sign."""
    host = urlsplit(state.public_url).netloc
    domain_host = urlsplit(domain).netloc or domain
    return (
        f"{host} wants you to sign in with your Ethereum account:\n{address}\n\n"
        f"{domain_host} is asking you sign in.\n\n"
        f"URI: {state.public_url}\nVersion: 1\nChain ID: 1\nNonce: {nonce}\n"
        f"Issued At: {issued_at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    )


def _purge_expired(state: EmulatorState, now: float) -> None:
    for key in [k for k, c in state.challenges.items() if now - c.issued_at > AUTH_REQUEST_TTL_S]:
        del state.challenges[key]


def _recover(text: str, signature: str) -> str | None:
    """EIP-191 signer of ``text``; v may be 0/1 or 27/28. None when the signature is unusable."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x").removeprefix("0X"))
    except ValueError:
        return None
    if len(raw) != 65:
        return None
    if raw[64] in (0, 1):
        raw = raw[:64] + bytes([raw[64] + 27])
    try:
        return Account.recover_message(encode_defunct(text=text), signature=raw)
    except Exception:  # eth_keys raises several types for bad signatures
        return None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def dex_subject(user_id: str, conn_id: str = "web3") -> str:
    """dex ``sub``: base64url-nopad of protobuf ``User{1: user_id, 2: conn_id}``."""
    u, c = user_id.encode(), conn_id.encode()
    return _b64url(b"\x0a" + _varint(len(u)) + u + b"\x12" + _varint(len(c)) + c)


def issue_dev_tokens(state: EmulatorState, client_id: str) -> dict[str, Any]:
    """The dex token response for ``client_id``: access and id token (RS256 by ``state.dev_key``)."""
    cid = to_checksum_address(client_id)
    iat = int(state.clock())
    ttl = int(state.dev_jwt_ttl.total_seconds())
    claims: dict[str, Any] = {
        "iss": state.public_url,
        "sub": dex_subject(cid),
        "aud": cid,
        "exp": iat + ttl,
        "iat": iat,
        "provider_id": "web3",
        "email_verified": False,
        "ethereum_address": cid,
    }
    access = state.dev_key.sign(claims)
    # at_hash: left half of sha256(access_token), base64url (OIDC core 3.1.3.6)
    at_hash = _b64url(hashlib.sha256(access.encode()).digest()[:16])
    id_token = state.dev_key.sign({**claims, "at_hash": at_hash})
    return {"access_token": access, "token_type": "bearer", "expires_in": ttl, "id_token": id_token}


def _auth_routes(state: EmulatorState) -> list[Route]:
    async def generate_challenge(request: Request) -> Response:
        f = await _form(request)
        client_id, domain, address = f.get("client_id", ""), f.get("domain", ""), f.get("address", "")
        if err := _client_error(state, client_id, domain):
            return err
        if not is_hex_address(address):
            return _dex_error("Invalid Ethereum address.")
        now = state.clock()
        _purge_expired(state, now)
        nonce = "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(30))
        issued = datetime.fromtimestamp(now, UTC)
        text = challenge_text(state, to_checksum_address(address), domain, nonce, issued)
        auth_id = secrets.token_hex(13)
        state.challenges[auth_id] = Challenge(client_id, domain, address, text, now)
        return json_response({"state": auth_id, "challenge": text})

    async def submit_challenge(request: Request) -> Response:
        f = await _form(request)
        client_id, domain = f.get("client_id", ""), f.get("domain", "")
        if err := _client_error(state, client_id, domain):
            return err
        grant_type = f.get("grant_type", "authorization_code")
        if grant_type != "authorization_code":
            return json_response(
                {
                    "error": "unsupported_grant_type",
                    "error_description": f"grant_type {grant_type!r} is not supported",
                },
                400,
            )
        auth_id = f.get("state", "")
        ch = state.challenges.get(auth_id)
        if ch is None or ch.client_id.lower() != client_id.lower():
            return _dex_error("Requested resource does not exist.")
        if state.clock() - ch.issued_at > AUTH_REQUEST_TTL_S:
            state.challenges.pop(auth_id, None)
            return _dex_error("User session has expired.")
        signer = _recover(ch.text, f.get("signature", ""))
        allowed = {s.lower() for s in state.license.signers} | {ch.address.lower()}
        if signer is None or signer.lower() not in allowed:
            return _dex_error("Could not verify signature.")
        del state.challenges[auth_id]  # single use; no await since the lookup, so no race
        return json_response(issue_dev_tokens(state, ch.client_id))

    async def keys(_: Request) -> Response:
        return json_response({"keys": [state.dev_key.public_jwk, state.vehicle_key.public_jwk]})

    async def openid_configuration(_: Request) -> Response:
        base = state.public_url
        return json_response(
            {
                "issuer": base,
                "jwks_uri": f"{base}/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "scopes_supported": ["openid", "email"],
            }
        )

    return [
        Route("/auth/web3/generate_challenge", generate_challenge, methods=["POST"]),
        Route("/auth/web3/submit_challenge", submit_challenge, methods=["POST"]),
        Route("/keys", keys, methods=["GET"]),
        Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
    ]


# --------------------------------------------------------------------------------------------------
# Token Exchange


class _CloudEvents(BaseModel):
    model_config = ConfigDict(extra="allow")
    events: list[dict[str, Any]] = []


class _ExchangeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    nftContractAddress: str | None = None
    privileges: list[int] | None = None
    tokenId: int | None = None
    asset: str | None = None
    permissions: list[str] | None = None
    audience: list[str] | None = None
    cloudEvents: _CloudEvents | None = None


def _exchange_error(status: int, message: str) -> Response:
    return json_response({"code": status, "message": message}, status)


def _go_list(items: list[Any]) -> str:
    """Go's ``%v`` of a slice: ``[a b c]``."""
    return "[" + " ".join(str(i) for i in items) + "]"


def _exchange_route(state: EmulatorState) -> Route:
    async def exchange(request: Request) -> Response:
        token = _bearer(request.headers.get("authorization"))
        if token is None:
            return PlainTextResponse("Missing or malformed JWT", 400)
        try:
            dev = _decode(state.dev_key, token, state.clock())
        except InvalidJWT:
            return PlainTextResponse("Invalid or expired JWT", 401)
        eth = dev.get("ethereum_address")
        if not isinstance(eth, str) or not eth:
            return _exchange_error(401, "No Ethereum address claim found.")
        lic = state.license
        if eth.lower() != lic.client_id.lower():
            return _exchange_error(403, f"not a dev license: {eth}")

        try:
            body = _ExchangeBody.model_validate_json(await request.body())
        except ValidationError:
            return _exchange_error(400, "Couldn't parse request body.")

        if state.exchange_legacy_only:  # an older token-exchange-api ignores the new fields
            body = body.model_copy(update={"asset": None, "permissions": None})
        if body.asset:
            m = ERC721_DID.match(body.asset)
            if not m:
                return _exchange_error(400, f'Invalid asset DID "{body.asset}".')
            contract, token_id = m.group(2), int(m.group(3))
        else:
            contract, token_id = body.nftContractAddress or "", body.tokenId or 0
            if not is_hex_address(contract):
                return _exchange_error(400, f'Invalid NFT contract address "{contract}".')
        chain = NFT_CHAINS.get(contract.lower())
        if chain is None:
            return _exchange_error(400, f'Invalid NFT contract address "{contract}".')

        if body.permissions:
            unknown = [p for p in body.permissions if p not in PERMISSION_TO_ID]
            if unknown:
                return _exchange_error(400, f"unknown permissions {_go_list(unknown)}")
            ids = sorted({PERMISSION_TO_ID[p] for p in body.permissions})
        else:
            unknown_ids = [i for i in body.privileges or [] if i not in ID_TO_PERMISSION]
            if unknown_ids:
                return _exchange_error(400, f"unknown privileges {_go_list(unknown_ids)}")
            ids = sorted(set(body.privileges or []))
        events = body.cloudEvents.events if body.cloudEvents else []
        if not ids and not events:
            return _exchange_error(400, "Please provide at least one privilege or cloudevent")

        vehicle = state.fleet.vehicles.get(token_id)
        if vehicle is None:
            return _exchange_error(404, f"vehicle {token_id} not found")
        checksummed = to_checksum_address(contract)
        did = f"did:erc721:{chain}:{checksummed}:{token_id}"
        granted = vehicle.privileges_for(lic.client_id, state.now())
        missing = [ID_TO_PERMISSION[i] for i in ids if i not in granted]
        if missing or (events and not granted):
            what = missing or ["cloudevents"]
            return _exchange_error(
                403,
                f"Address {to_checksum_address(lic.client_id)} lacks permissions {_go_list(what)} for asset {did}",
            )

        iat = int(state.clock())
        claims = {
            "iss": VEHICLE_JWT_ISSUER,
            "sub": to_checksum_address(lic.client_id),
            "aud": body.audience or [VEHICLE_JWT_AUDIENCE],
            "iat": iat,
            "exp": iat + int(state.vehicle_jwt_ttl.total_seconds()),
            "asset": did,
            "permissions": [ID_TO_PERMISSION[i] for i in ids],
            "cloud_events": {"events": events},
            "contract_address": contract.lower(),
            "token_id": str(token_id),
            "privilege_ids": ids,
        }
        return json_response({"token": state.vehicle_key.sign(claims)})

    return Route("/v1/tokens/exchange", exchange, methods=["POST"])


def routes(state: EmulatorState) -> list[Route]:
    """Auth (dex) and Token Exchange routes for the emulator app."""
    return [*_auth_routes(state), _exchange_route(state)]
