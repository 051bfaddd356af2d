"""DIMO tokens: the Developer JWT (web3 challenge → sign → submit) and per-vehicle JWTs (token exchange).

Both are cached and refreshed before they expire (``exp`` is decoded, never assumed): a token is renewed when
it is within ``max(60 s, 10 % of its lifetime)`` of ``exp`` (a quarter of its lifetime when that is 2 minutes
or less). One refresh runs at a time; callers that saw the same stale token share it. Tokens and the private
key never reach logs, reprs or exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from eth_account import Account
from eth_account.messages import encode_defunct

from connectors.dimo._http import Service, TokenSource, json_body
from connectors.dimo.errors import DimoAuthError, DimoPrivilegeError, DimoQueryError, DimoTransientError
from connectors.dimo.privileges import ID_TO_PERMISSION
from connectors.dimo.settings import DimoSettings

MIN_MARGIN_S = 60.0
FORM = {"content-type": "application/x-www-form-urlencoded"}


@dataclass(slots=True)
class _Cached:
    token: str = field(repr=False)
    expires_at: float
    margin: float

    def fresh(self, now: float) -> bool:
        return now < self.expires_at - self.margin


def _seconds(value: Any, default: float) -> float:
    """A numeric claim or field from the server; ``default`` when absent, zero or not a number."""
    try:
        return float(value) or default
    except (TypeError, ValueError):
        return default


def _cache_entry(token: str, now: float, *, fallback_ttl: float) -> _Cached:
    """Decode ``exp``/``iat`` without verifying (we are the bearer, not the audience).

    Tokens living 2 minutes or less (tests, odd servers) get a quarter of their lifetime as margin, so they
    are still used for a while instead of being refreshed on every request.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    exp = _seconds(claims.get("exp"), now + fallback_ttl)
    iat = _seconds(claims.get("iat"), now)
    lifetime = max(exp - iat, 0.0)
    return _Cached(
        token, exp, max(MIN_MARGIN_S, 0.1 * lifetime) if lifetime > 2 * MIN_MARGIN_S else lifetime / 4
    )


def sign_challenge(challenge: str, private_key: str) -> str:
    """EIP-191 personal_sign of ``challenge``; 0x-prefixed 65-byte hex signature."""
    sig = Account.from_key(private_key).sign_message(encode_defunct(text=challenge)).signature.hex()
    return sig if sig.startswith("0x") else "0x" + sig


class DeveloperToken(TokenSource):
    """The Developer JWT for the license in ``settings`` (cached, refreshed before expiry)."""

    def __init__(
        self, settings: DimoSettings, service: Service, *, clock: Callable[[], float] = time.time
    ) -> None:
        settings.require_credentials()
        self._settings = settings
        self._service = service
        self._clock = clock
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    def __repr__(self) -> str:
        return f"DeveloperToken(client_id={self._settings.client_id!r})"

    async def token(self) -> str:
        cached = self._cached
        if cached is not None and cached.fresh(self._clock()):
            return cached.token
        async with self._lock:
            cached = self._cached
            if cached is None or not cached.fresh(self._clock()):
                cached = self._cached = await self._fetch()
            return cached.token

    async def refresh(self, stale: str) -> None:
        async with self._lock:
            if self._cached is None or self._cached.token == stale:
                self._cached = await self._fetch()

    async def _fetch(self) -> _Cached:
        s = self._settings
        base = s.urls.auth
        assert s.client_id and s.domain and s.private_key  # require_credentials() checked
        common = {"client_id": s.client_id, "domain": s.domain}
        for attempt in range(2):
            try:
                challenge = await self._service.call(
                    "POST",
                    f"{base}/auth/web3/generate_challenge",
                    what="DIMO auth generate_challenge",
                    parse=_challenge,
                    headers=FORM,
                    data={**common, "scope": "openid email", "response_type": "code", "address": s.client_id},
                )
                signature = sign_challenge(challenge["challenge"], s.private_key.get_secret_value())
                doc = await self._service.call(
                    "POST",
                    f"{base}/auth/web3/submit_challenge",
                    what="DIMO auth submit_challenge",
                    parse=lambda r: json_body(r, "DIMO auth submit_challenge"),
                    headers=FORM,
                    data={
                        **common,
                        "state": challenge["state"],
                        "signature": signature,
                        "grant_type": "authorization_code",
                    },
                )
            except DimoQueryError as exc:
                text = str(exc)
                if attempt == 0 and ("does not exist" in text or "expired" in text):
                    continue  # the challenge was consumed by a retried submit, or timed out: start over
                raise DimoAuthError(_auth_advice(text, s.client_id)) from None
            token = doc.get("access_token") if isinstance(doc, dict) else None
            if not token:
                raise DimoAuthError(
                    "DIMO auth: submit_challenge returned no access_token; check the auth URL"
                )
            self.fetches += 1
            ttl = _seconds(doc.get("expires_in"), 3600)
            return _cache_entry(str(token), self._clock(), fallback_ttl=ttl)
        raise DimoAuthError("DIMO auth: the challenge expired twice in a row; check the machine's clock")


async def _challenge(resp: httpx.Response) -> dict[str, str]:
    """``state`` and ``challenge`` of a generate_challenge response; a page lacking them is transient."""
    what = "DIMO auth generate_challenge"
    doc = await json_body(resp, what)
    if not isinstance(doc, dict) or not doc.get("state") or not doc.get("challenge"):
        raise DimoTransientError(f"{what}: response lacks state/challenge")
    return {"state": str(doc["state"]), "challenge": str(doc["challenge"])}


def _auth_advice(text: str, client_id: str) -> str:
    if "HTTP 404" in text or "Invalid client_id" in text:
        return f"{text}: client id {client_id} is not a developer license; check DEPIN_DIMO_CLIENT_ID"
    if "redirect_uri" in text:
        return (
            f"{text}: DEPIN_DIMO_DOMAIN must be a redirect URI registered on the license in console.dimo.org"
        )
    if "verify signature" in text:
        return f"{text}: DEPIN_DIMO_PRIVATE_KEY is not an enabled signer (API key) of license {client_id}"
    return f"{text}: check DEPIN_DIMO_CLIENT_ID, DEPIN_DIMO_DOMAIN and DEPIN_DIMO_PRIVATE_KEY"


class VehicleTokens:
    """Per-vehicle JWTs from ``POST /v1/tokens/exchange``, cached until shortly before ``exp``.

    Sends the current body (``asset`` DID + ``permissions``); a service that rejects it with a 400 about the
    legacy fields gets the legacy body (``nftContractAddress``/``privileges``/``tokenId``) from then on.
    """

    def __init__(
        self,
        settings: DimoSettings,
        service: Service,
        developer: DeveloperToken,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._service = service
        self._developer = developer
        self._clock = clock
        self._cache: dict[int, tuple[frozenset[int], _Cached]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._log = logging.getLogger("connectors.dimo")
        self.exchanges = 0
        # True once the service rejected the current body: later exchanges send the legacy one directly.
        self.legacy_body = False

    def __repr__(self) -> str:
        return f"VehicleTokens(cached={len(self._cache)})"

    def source(self, token_id: int, privileges: Iterable[int]) -> TokenSource:
        """A token source for one vehicle, asking for ``privileges`` (ids)."""
        return _VehicleSource(self, token_id, frozenset(privileges))

    def invalidate(self, token_id: int) -> None:
        self._cache.pop(token_id, None)

    def _usable(self, token_id: int, privileges: frozenset[int], stale: str | None) -> str | None:
        """The cached token when it covers ``privileges``, is fresh and is not ``stale``; else None."""
        hit = self._cache.get(token_id)
        if hit and privileges <= hit[0] and hit[1].fresh(self._clock()) and hit[1].token != stale:
            return hit[1].token
        return None

    async def get(self, token_id: int, privileges: frozenset[int], *, stale: str | None = None) -> str:
        """A token for ``token_id`` holding ``privileges``; exchanged (once, under a lock) when needed."""
        if token := self._usable(token_id, privileges, stale):
            return token
        async with self._locks.setdefault(token_id, asyncio.Lock()):
            if token := self._usable(token_id, privileges, stale):
                return token
            hit = self._cache.get(token_id)
            wanted = privileges | (hit[0] if hit else frozenset())
            entry = await self._exchange(token_id, wanted)
            self._cache[token_id] = (wanted, entry)
            return entry.token

    async def _exchange(self, token_id: int, privileges: frozenset[int]) -> _Cached:
        s = self._settings
        what = f"DIMO token exchange for vehicle {token_id}"
        try:
            doc: Any = None
            if not self.legacy_body:
                try:
                    doc = await self._post(what, current_exchange_body(s, token_id, privileges))
                except DimoQueryError as exc:
                    if not _rejects_current_body(exc):
                        raise
                    # An older token-exchange-api, from before `asset`/`permissions`: remember and fall back.
                    self.legacy_body = True
                    self._log.info(
                        "%s: the service rejected the asset/permissions body (%s); using the "
                        "legacy nftContractAddress/privileges/tokenId body",
                        what,
                        exc,
                    )
            if doc is None:
                doc = await self._post(what, legacy_exchange_body(s, token_id, privileges))
        except DimoPrivilegeError as exc:
            perms = ", ".join(ID_TO_PERMISSION.get(p, str(p)) for p in sorted(privileges))
            raise DimoPrivilegeError(
                f"vehicle {token_id}: license {s.client_id} was refused {perms} ({exc}); the vehicle owner must "
                "share these privileges with the license (SACD grant), or drop the signals that need them"
            ) from None
        token = doc.get("token") if isinstance(doc, dict) else None
        if not token:
            raise DimoTransientError(f"{what}: response has no token")
        self.exchanges += 1
        return _cache_entry(str(token), self._clock(), fallback_ttl=600)

    async def _post(self, what: str, body: dict[str, Any]) -> Any:
        return await self._service.call(
            "POST",
            f"{self._settings.urls.token_exchange}/v1/tokens/exchange",
            what=what,
            parse=lambda r: json_body(r, what),
            auth=self._developer,
            json=body,
        )


def current_exchange_body(settings: DimoSettings, token_id: int, privileges: Iterable[int]) -> dict[str, Any]:
    """The token-exchange body DIMO documents today: the vehicle as an ERC-721 DID, permission names."""
    urls = settings.urls
    ids = sorted(privileges)
    unknown = [p for p in ids if p not in ID_TO_PERMISSION]
    if unknown:
        raise DimoQueryError(
            f"privileges {unknown} have no DIMO permission name; use ids {sorted(ID_TO_PERMISSION)}"
        )
    return {
        "asset": f"did:erc721:{urls.chain_id}:{urls.nft_contract}:{token_id}",
        "permissions": [ID_TO_PERMISSION[p] for p in ids],
    }


def legacy_exchange_body(settings: DimoSettings, token_id: int, privileges: Iterable[int]) -> dict[str, Any]:
    """The deprecated body (what the SDKs still send): contract address, privilege ids, token id."""
    return {
        "nftContractAddress": settings.urls.nft_contract,
        "privileges": sorted(privileges),
        "tokenId": token_id,
    }


# What a token-exchange-api that predates `asset`/`permissions` answers to the current body: it reads the empty
# legacy fields ('Invalid NFT contract address "".', 'Please provide at least one privilege ...').
_LEGACY_ONLY = re.compile(r"nft ?contract|tokenid|privilege|parse request body", re.IGNORECASE)


def _rejects_current_body(exc: DimoQueryError) -> bool:
    """True when a 400 says the service does not understand the asset/permissions body."""
    text = str(exc)
    return "HTTP 400" in text and bool(_LEGACY_ONLY.search(text.partition("HTTP 400")[2]))


class _VehicleSource(TokenSource):
    def __init__(self, tokens: VehicleTokens, token_id: int, privileges: frozenset[int]) -> None:
        self._tokens = tokens
        self._token_id = token_id
        self._privileges = privileges

    def __repr__(self) -> str:
        return f"_VehicleSource(token_id={self._token_id})"

    async def token(self) -> str:
        return await self._tokens.get(self._token_id, self._privileges)

    async def refresh(self, stale: str) -> None:
        await self._tokens.get(self._token_id, self._privileges, stale=stale)


__all__ = [
    "DeveloperToken",
    "VehicleTokens",
    "current_exchange_body",
    "legacy_exchange_body",
    "sign_challenge",
]
