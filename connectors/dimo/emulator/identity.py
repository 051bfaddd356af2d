"""DIMO Identity API (GraphQL, public) over the emulator's fleet: ``POST|GET /identity/query``.

Semantics follow identity-api: vehicles ordered by token id descending, cursor ``base64(str(tokenId))``,
``after`` means ``tokenId < cursor``, page size at most 100 with the service's error texts; global ids are
``<prefix>_`` + base64(msgpack([tokenId])). Vehicle listings are served from an index built once per fleet
(token ids sorted once, owners and grantees bucketed), so a page costs a bisect plus the page itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from operator import attrgetter
from typing import Any

from eth_utils import is_hex_address, to_checksum_address
from graphql import (
    ExecutionResult,
    GraphQLError,
    GraphQLResolveInfo,
    GraphQLSchema,
    ValueNode,
    build_schema,
    execute,
)
from graphql.language import StringValueNode
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connectors.dimo.emulator.auth import ERC721_DID
from connectors.dimo.emulator.fleet import CHAIN_ID, SOURCES, Fleet, Grant, Vehicle, vehicle_did
from connectors.dimo.emulator.gql import (
    BadRequest,
    Endpoint,
    error_response,
    format_error,
    json_response,
    load_sdl,
    read_graphql_request,
    validation_failed_body,
)
from connectors.dimo.emulator.state import EmulatorState
from connectors.dimo.emulator.telemetry.schema import format_time, parse_time, wire_scalar
from connectors.dimo.privileges import encode_sacd_permissions

MAX_PAGE_SIZE = 100
_checksum = lru_cache(maxsize=1 << 16)(to_checksum_address)
DEV_LICENSE_NFT = "0x9A9D2E717bB005B240094ba761Ff074d392C7C85"  # DIMO DevLicense contract (Polygon)
SYNTHETIC_DEVICE_NFT = "0x4804e8D1661cd1a1e5dDdE1ff458A7f878c0aC6D"  # [I] SyntheticDevice contract (Polygon)
# aftermarket device manufacturer (token id, name) by connection; synthetic integration ids [I]
_AFTERMARKET_MAKERS = {SOURCES["autopi"]: (136, "AutoPi"), SOURCES["macaron"]: (142, "Hashdog")}
_INTEGRATIONS = {SOURCES["smartcar"]: 1, SOURCES["tesla"]: 2}


# --------------------------------------------------------------------------------------------------
# encodings


def _msgpack_uint(n: int) -> bytes:
    """msgpack encoding of a non-negative int (smallest form, as vmihailenco/msgpack writes it)."""
    if n < 0x80:
        return bytes([n])
    for marker, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if n < 1 << (8 * size):
            return bytes([marker]) + n.to_bytes(size, "big")
    raise ValueError(f"{n} does not fit in uint64")


def global_id(prefix: str, token_id: int) -> str:
    """identity-api's opaque node id: ``V_`` + base64(msgpack([tokenId])); 21957 -> ``V_kc1VxQ==``."""
    return f"{prefix}_" + base64.b64encode(b"\x91" + _msgpack_uint(token_id)).decode()


def id_to_cursor(token_id: int) -> str:
    return base64.b64encode(str(token_id).encode()).decode()


def cursor_to_id(cursor: str) -> int:
    """Inverse of :func:`id_to_cursor`; raises GraphQLError with Go's error texts."""
    try:
        raw = base64.b64decode(cursor, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise GraphQLError(f"illegal base64 data in cursor {cursor!r}") from None
    if not re.fullmatch(r"[+-]?[0-9]+", raw):  # strconv.Atoi: ASCII digits only
        raise GraphQLError(f'strconv.Atoi: parsing "{raw}": invalid syntax')
    return int(raw)


def _parse_address(value: Any) -> str:
    if not isinstance(value, str) or not is_hex_address(value):
        raise GraphQLError(f"invalid address {value!r}: expected 0x followed by 40 hex digits")
    return _checksum(value)


def _parse_address_literal(node: ValueNode, _vars: Any = None) -> str:
    if not isinstance(node, StringValueNode):
        raise GraphQLError("Address must be a string")
    return _parse_address(node.value)


def _derived_address(kind: str, token_id: int) -> str:
    """A stable, made-up address for devices the fleet model only knows by token id."""
    return to_checksum_address("0x" + hashlib.sha256(f"{kind}-{token_id}".encode()).hexdigest()[:40])


# --------------------------------------------------------------------------------------------------
# paging


def validate_first_last(first: int | None, last: int | None, limit: int = MAX_PAGE_SIZE) -> None:
    """identity-api's ``validateFirstLast`` with its exact messages."""
    if first is not None:
        if last is not None:
            raise GraphQLError("pass `first` or `last`, but not both")
        if first < 0:
            raise GraphQLError("the value for `first` cannot be negative")
        if first > limit:
            raise GraphQLError(f"the value {first} for `first` exceeds the limit {limit}")
        return
    if last is None:
        raise GraphQLError("provide `first` or `last`")
    if last < 0:
        raise GraphQLError("the value for `last` cannot be negative")
    if last > limit:
        raise GraphQLError(f"the value {last} for `last` exceeds the limit {limit}")


def _slice(
    lo: int, hi: int, first: int | None, last: int | None, after: bool, before: bool
) -> tuple[int, int, bool, bool]:
    """``first``/``last`` of the rows ``[lo, hi)`` left by the cursors: ``(start, stop, has_next, has_prev)``."""
    hi = max(lo, hi)
    if first is not None:
        return lo, min(hi, lo + first), before or hi - lo > first, after
    assert last is not None
    return max(lo, hi - last), hi, before, after or hi - lo > last


@dataclass(frozen=True)
class Page:
    ids: list[int]
    total: int
    has_next: bool
    has_previous: bool


def page_desc(
    ids_desc: list[int],
    neg_sorted: list[int],
    first: int | None,
    after: int | None,
    last: int | None,
    before: int | None,
) -> Page:
    """One page of ``ids_desc`` (``neg_sorted`` = its negation, ascending, for bisect) per identity-api rules."""
    lo, hi = 0, len(ids_desc)
    if after is not None:  # tokenId < after
        lo = bisect_right(neg_sorted, -after)
    if before is not None:  # tokenId > before
        hi = bisect_left(neg_sorted, -before)
    start, stop, has_next, has_prev = _slice(lo, hi, first, last, after is not None, before is not None)
    return Page(ids_desc[start:stop], len(ids_desc), has_next, has_prev)


def _connection(
    nodes: list[Any], cursors: list[str], total: int, has_next: bool, has_prev: bool
) -> dict[str, Any]:
    return {
        "totalCount": total,
        "nodes": nodes,
        "edges": [{"node": n, "cursor": c} for n, c in zip(nodes, cursors, strict=True)],
        "pageInfo": {
            "startCursor": cursors[0] if cursors else None,
            "endCursor": cursors[-1] if cursors else None,
            "hasNextPage": has_next,
            "hasPreviousPage": has_prev,
        },
    }


def offset_connection(items: list[Any], args: dict[str, Any]) -> dict[str, Any]:
    """A small in-order connection (SACDs, privileges, signers) over the field's paging ``args``.

    Cursors encode the position; without ``first`` and ``last`` the first 100 items are returned.
    """
    first, last, after, before = args.get("first"), args.get("last"), args.get("after"), args.get("before")
    if first is None and last is None:
        first = MAX_PAGE_SIZE
    validate_first_last(first, last)
    lo, hi = 0, len(items)
    if after is not None:
        lo = max(0, cursor_to_id(after) + 1)
    if before is not None:
        hi = min(hi, cursor_to_id(before))
    start, stop, has_next, has_prev = _slice(lo, hi, first, last, after is not None, before is not None)
    return _connection(
        items[start:stop], [id_to_cursor(i) for i in range(start, stop)], len(items), has_next, has_prev
    )


# --------------------------------------------------------------------------------------------------
# fleet index and views


class FleetIndex:
    """Token ids sorted once (descending), plus owner and grantee buckets for the address filters."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.size = len(fleet.vehicles)
        self.ids_desc = sorted(fleet.vehicles, reverse=True)
        self.neg = [-i for i in self.ids_desc]
        self.by_owner: dict[str, list[int]] = {}
        self.grants: dict[str, list[tuple[int, datetime]]] = {}
        for tid in self.ids_desc:
            v = fleet.vehicles[tid]
            self.by_owner.setdefault(v.owner.lower(), []).append(tid)
            for g in v.grants:
                self.grants.setdefault(g.grantee.lower(), []).append((tid, g.expires_at))
        self._cache: dict[tuple[tuple[str, str], ...], tuple[list[int], list[int], datetime]] = {}

    def select(self, flt: dict[str, Any] | None, now: datetime) -> tuple[list[int], list[int]]:
        """Token ids matching ``flt`` (descending) and their negation (ascending).

        Results are cached per filter until the next grant expiry that could change them, so paging
        through a filtered listing filters and sorts once, not once per page.
        """
        if not flt or all(v is None for v in flt.values()):
            return self.ids_desc, self.neg
        key = tuple(
            sorted(
                (k, str(v).lower() if k in _ADDRESS_FILTERS else repr(v))
                for k, v in flt.items()
                if v is not None
            )
        )
        hit = self._cache.get(key)
        if hit is not None and now < hit[2]:
            return hit[0], hit[1]
        ids, valid_until = self._select(flt, now)
        if len(self._cache) >= 256:
            self._cache.clear()
        self._cache[key] = (ids, [-t for t in ids], valid_until)
        return self._cache[key][0], self._cache[key][1]

    def _select(self, flt: dict[str, Any], now: datetime) -> tuple[list[int], datetime]:
        ids: list[int] | None = None
        valid_until = datetime.max.replace(tzinfo=UTC)
        if (priv := flt.get("privileged")) is not None:
            p = priv.lower()
            found = set(self.by_owner.get(p, ()))
            for tid, exp in self.grants.get(p, ()):
                if exp > now:
                    found.add(tid)
                    valid_until = min(valid_until, exp)
            ids = sorted(found, reverse=True)
        if (owner := flt.get("owner")) is not None:
            owned = self.by_owner.get(owner.lower(), [])
            if ids is not None:
                owned_set = set(owned)
                owned = [t for t in ids if t in owned_set]
            ids = owned
        checks = [
            (key, str(v).lower() if key in _ADDRESS_FILTERS else v)
            for key in _FILTER_ATTRS
            if (v := flt.get(key)) is not None
        ]
        if checks:
            vs = self.fleet.vehicles
            ids = [
                t
                for t in (self.ids_desc if ids is None else ids)
                if all(_FILTER_ATTRS[k](vs[t]) == v for k, v in checks)
            ]
        return (self.ids_desc if ids is None else ids), valid_until


_ADDRESS_FILTERS = ("privileged", "owner", "connection")


def _definition_id(v: Vehicle) -> str:
    return v.definition_id or re.sub(r"[^a-z0-9]+", "_", f"{v.make} {v.model} {v.year}".lower()).strip("_")


def _connection_address(v: Vehicle) -> str | None:
    """The address of the connection a vehicle's synthetic device belongs to (its data source's ethr DID);
    None without a synthetic device. Lower case: filter values are compared lower-cased."""
    return v.source.rsplit(":", 1)[-1].lower() if v.synthetic_device_id is not None else None


# VehiclesFilter fields matched by equality, and how to read each from a Vehicle.
_FILTER_ATTRS: dict[str, Callable[[Vehicle], Any]] = {
    "make": attrgetter("make"),
    "model": attrgetter("model"),
    "year": attrgetter("year"),
    "manufacturerTokenId": attrgetter("manufacturer_token_id"),
    "deviceDefinitionId": _definition_id,
    "connection": _connection_address,
}


@dataclass(frozen=True)
class SacdView:
    """All active grants of one vehicle to one grantee, merged (SACD is one record per grantee)."""

    grantee: str
    ids: tuple[int, ...]
    createdAt: datetime
    expiresAt: datetime
    source: str

    @property
    def permissions(self) -> str:
        return encode_sacd_permissions(self.ids)


def _merge_grants(grants: list[Grant], now: datetime) -> list[SacdView]:
    by: dict[str, list[Grant]] = {}
    for g in grants:
        if g.expires_at > now:
            by.setdefault(g.grantee.lower(), []).append(g)
    out = []
    for gs in by.values():
        latest = max(gs, key=lambda g: g.created_at)
        ids = tuple(sorted({p for g in gs for p in g.permissions}))
        out.append(
            SacdView(
                grantee=_checksum(latest.grantee),
                ids=ids,
                createdAt=latest.created_at,
                expiresAt=max(g.expires_at for g in gs),
                source=latest.source,
            )
        )
    out.sort(key=lambda s: (s.createdAt, s.grantee))
    return out


class VehicleView:
    """The GraphQL ``Vehicle``: plain attributes for scalar fields, methods for fields with arguments."""

    def __init__(self, v: Vehicle, state: EmulatorState) -> None:
        self.v = v
        self._state = state
        self.tokenId = v.token_id
        self.tokenDID = vehicle_did(v.token_id)
        self.owner = v.owner
        self.mintedAt = v.minted_at
        self.name = v.name
        self.dcn = None
        self.earnings = None

    @property
    def id(self) -> str:
        return global_id("V", self.v.token_id)

    @property
    def imageURI(self) -> str:
        return f"{self._state.public_url}/identity/vehicle/{self.v.token_id}/image"

    image = imageURI

    @property
    def dataURI(self) -> str:
        return f"{self._state.public_url}/identity/vehicle/{self.v.token_id}"

    @property
    def definition(self) -> dict[str, Any]:
        v = self.v
        return {"id": _definition_id(v), "make": v.make, "model": v.model, "year": v.year}

    def _manufacturer(self, token_id: int, name: str) -> dict[str, Any]:
        return {
            "id": global_id("M", token_id),
            "tokenId": token_id,
            "name": name,
            "owner": _derived_address("manufacturer", token_id),
            "tableId": None,
            "mintedAt": self._state.fleet.start,
        }

    @property
    def manufacturer(self) -> dict[str, Any]:
        return self._manufacturer(self.v.manufacturer_token_id, self.v.make)

    @property
    def aftermarketDevice(self) -> dict[str, Any] | None:
        tid = self.v.aftermarket_device_id
        if tid is None:
            return None
        mid, mname = _AFTERMARKET_MAKERS.get(self.v.source, (136, "AutoPi"))
        serial = hashlib.sha256(f"serial-{tid}".encode()).hexdigest()
        return {
            "id": global_id("AD", tid),
            "tokenId": tid,
            "manufacturer": self._manufacturer(mid, mname),
            "address": _derived_address("aftermarket", tid),
            "owner": self.v.owner,
            "serial": f"{serial[:8]}-{serial[8:12]}-{serial[12:16]}-{serial[16:20]}-{serial[20:32]}",
            "imei": None,
            "devEUI": None,
            "hardwareRevision": None,
            "mintedAt": self.v.minted_at,
            "claimedAt": self.v.minted_at,
            "vehicle": self,
            "beneficiary": self.v.owner,
            "name": self.v.name,
            "image": "",
        }

    @property
    def syntheticDevice(self) -> dict[str, Any] | None:
        tid = self.v.synthetic_device_id
        if tid is None:
            return None
        return {
            "id": global_id("S", tid),
            "name": self.v.name,
            "tokenId": tid,
            "tokenDID": f"did:erc721:{CHAIN_ID}:{SYNTHETIC_DEVICE_NFT}:{tid}",
            "integrationId": _INTEGRATIONS.get(self.v.source, 1),
            "address": _derived_address("synthetic", tid),
            "mintedAt": self.v.minted_at,
            "vehicle": self,
        }

    @cached_property
    def _sacds(self) -> list[SacdView]:
        return _merge_grants(self.v.grants, self._state.now())

    def sacd(self, _info: GraphQLResolveInfo, grantee: str) -> SacdView | None:
        g = grantee.lower()
        return next((s for s in self._sacds if s.grantee.lower() == g), None)

    def sacds(self, _info: GraphQLResolveInfo, **kw: Any) -> dict[str, Any]:
        return offset_connection(self._sacds, kw)

    def privileges(self, _info: GraphQLResolveInfo, **kw: Any) -> dict[str, Any]:
        user = ((kw.get("filterBy") or {}).get("user") or "").lower()
        nodes = [
            {"id": pid, "user": s.grantee, "setAt": s.createdAt, "expiresAt": s.expiresAt}
            for s in self._sacds
            if not user or s.grantee.lower() == user
            for pid in s.ids
        ]
        return offset_connection(nodes, kw)


class LicenseView:
    """The GraphQL ``DeveloperLicense`` for the emulator's single license."""

    def __init__(self, state: EmulatorState) -> None:
        lic = state.license
        self._lic = lic
        self._since = state.fleet.start
        self.tokenId = lic.token_id
        self.tokenDID = f"did:erc721:{CHAIN_ID}:{DEV_LICENSE_NFT}:{lic.token_id}"
        self.owner = lic.signers[0] if lic.signers else lic.client_id
        self.clientId = lic.client_id
        self.alias = lic.alias
        self.mintedAt = self._since

    def signers(self, _info: GraphQLResolveInfo, **kw: Any) -> dict[str, Any]:
        nodes = [{"address": s, "enabledAt": self._since} for s in self._lic.signers]
        return offset_connection(nodes, kw)

    def redirectURIs(self, _info: GraphQLResolveInfo, **kw: Any) -> dict[str, Any]:
        nodes = [{"uri": self._lic.domain, "enabledAt": self._since}]
        return offset_connection(nodes, kw)


# --------------------------------------------------------------------------------------------------
# root resolvers


class Root:
    """Root value for Identity queries against one emulator state."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self._index: FleetIndex | None = None

    @property
    def index(self) -> FleetIndex:
        fleet = self.state.fleet
        idx = self._index
        if idx is None or idx.fleet is not fleet or idx.size != len(fleet.vehicles):
            idx = self._index = FleetIndex(fleet)
        return idx

    def vehicle(
        self, _info: GraphQLResolveInfo, tokenId: int | None = None, tokenDID: str | None = None
    ) -> VehicleView:
        if (tokenId is None) == (tokenDID is None):
            raise GraphQLError("provide exactly one of `tokenID` or `tokenDID`")
        if tokenDID is not None:
            m = ERC721_DID.match(tokenDID)
            if not m:
                raise GraphQLError(f"error decoding tokenDID: invalid DID {tokenDID!r}")
            tokenId = int(m.group(3))
        v = self.state.fleet.vehicles.get(tokenId)  # type: ignore[arg-type]
        if v is None:  # identity-api: data.vehicle is null, with this error beside it
            what = f"token id {tokenId}." if tokenDID is None else f"DID {json.dumps(tokenDID)}."
            raise GraphQLError(f"No vehicle with {what}", extensions={"code": "NOT_FOUND"})
        return VehicleView(v, self.state)

    def vehicles(self, _info: GraphQLResolveInfo, **kw: Any) -> dict[str, Any]:
        first, last = kw.get("first"), kw.get("last")
        validate_first_last(first, last)
        ids, neg = self.index.select(kw.get("filterBy"), self.state.now())
        after = cursor_to_id(kw["after"]) if kw.get("after") is not None else None
        before = cursor_to_id(kw["before"]) if kw.get("before") is not None else None
        page = page_desc(ids, neg, first, after, last, before)
        vs = self.state.fleet.vehicles
        nodes = [VehicleView(vs[t], self.state) for t in page.ids]
        return _connection(
            nodes, [id_to_cursor(t) for t in page.ids], page.total, page.has_next, page.has_previous
        )

    def developerLicense(self, _info: GraphQLResolveInfo, by: dict[str, Any]) -> LicenseView:
        given = [(k, v) for k, v in by.items() if v is not None]
        if len(given) != 1:
            raise GraphQLError("must specify exactly one of `clientId`, `alias`, `tokenId`, `tokenDID`")
        key, value = given[0]
        lic = self.state.license
        view = LicenseView(self.state)
        match = {
            "clientId": str(value).lower() == lic.client_id.lower(),
            "alias": value == lic.alias,
            "tokenId": value == lic.token_id,
            "tokenDID": str(value).lower() == view.tokenDID.lower(),
        }[key]
        if not match:  # identity-api's message (it has no case for tokenDID: the text stops there)
            shown = {
                "tokenId": f"token id {value}.",
                "clientId": f"client id {value}.",
                "alias": f"alias {json.dumps(value)}.",
            }
            raise GraphQLError(
                f"No developer license with {shown.get(key, '')}", extensions={"code": "NOT_FOUND"}
            )
        return view

    def rewards(self, _info: GraphQLResolveInfo, user: str) -> None:
        return None


# --------------------------------------------------------------------------------------------------
# schema and HTTP


def build_identity_schema() -> GraphQLSchema:
    """The Identity schema with the custom scalars wired to (de)serializers."""
    schema = build_schema(load_sdl("identity.graphql"))
    wire_scalar(schema, "Time", format_time, parse_time)
    wire_scalar(schema, "Address", _checksum, _parse_address, _parse_address_literal)
    for name in ("BigInt", "BigDecimal"):
        wire_scalar(schema, name, str, str)
    return schema


def result_payload(result: ExecutionResult) -> tuple[dict[str, Any], int]:
    """The response body and status of an execution result (422 when variables failed to coerce)."""
    if result.errors and result.data is None and all(e.path is None for e in result.errors):
        return validation_failed_body(e.message for e in result.errors), 422
    payload: dict[str, Any] = {}
    if result.errors:
        payload["errors"] = [format_error(e) for e in result.errors]
    payload["data"] = result.data
    return payload, 200


def routes(state: EmulatorState) -> list[Route]:
    """The Identity GraphQL endpoint at ``/identity/query`` (POST and GET)."""
    endpoint = Endpoint(build_identity_schema())
    root = Root(state)

    async def query(request: Request) -> Response:
        try:
            req = await read_graphql_request(request)
        except BadRequest as exc:
            return error_response(str(exc), "GRAPHQL_PARSE_FAILED", 400)
        doc = endpoint.prepare(req.query)
        if isinstance(doc, Response):
            return doc
        result = execute(endpoint.schema, doc, root, state, req.variables, req.operation_name)
        assert isinstance(result, ExecutionResult)  # all resolvers are synchronous
        payload, status = result_payload(result)
        return json_response(payload, status)

    return [Route("/identity/query", query, methods=["GET", "POST"])]
