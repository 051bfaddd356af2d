"""graphql-core resolvers of the Telemetry API's non-``signals`` root fields and the auth checks they share.

signalsLatest, availableSignals, signalsSnapshot, dataSummary, events and vinVCLatest are small answers, so they run on
graphql-core's ordinary executor; privileges are checked per field like gqlgen's directives.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl
from graphql import GraphQLError, GraphQLObjectType, GraphQLResolveInfo

from connectors.dimo.emulator.auth import VehicleClaims
from connectors.dimo.emulator.fleet import CHAIN_ID, Fleet
from connectors.dimo.emulator.telemetry.data import LAT, LON, TS, VehicleCache, VehicleData, snap, to_us
from connectors.dimo.emulator.telemetry.schema import (
    APPROX_COORDINATES,
    COORDINATES,
    field_privilege_error,
    missing_all,
    telemetry_schema,
)
from connectors.dimo.emulator.telemetry.signals import SignalsArgumentError, check_source, source_matches
from connectors.dimo.privileges import LOCATION_HISTORY, NON_LOCATION_HISTORY
from connectors.dimo.settings import VEHICLE_NFT_PROD

VIN_CREDENTIAL = 5
NO_DATA_LAST_SEEN = datetime(1900, 1, 1, tzinfo=UTC)  # telemetry-api GetDataSummary's starting maximum
_VIN_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


class Ctx:
    """Per-request context handed to resolvers."""

    __slots__ = ("cache", "claims", "fleet")

    def __init__(self, fleet: Fleet, cache: VehicleCache, claims: VehicleClaims | None) -> None:
        self.fleet, self.cache, self.claims = fleet, cache, claims


def token_error(claims: VehicleClaims | None, token_id: int) -> str | None:
    """``@requiresVehicleToken``: a JWT must be present, for a vehicle NFT of this chain, and for ``token_id``."""
    if claims is None:
        return "unauthorized: jwt missing"
    if claims.contract != VEHICLE_NFT_PROD:  # telemetry-api internal/auth validateHeader
        return (
            f"unauthorized: contract in claim is {claims.contract} instead of the required {VEHICLE_NFT_PROD}"
        )
    if claims.token_id != token_id:
        return "unauthorized: token id does not match"
    return None


def _unauthorized(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "UNAUTHORIZED"})


def _bad_request(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "BAD_REQUEST"})


def _authorize(info: GraphQLResolveInfo, token_id: int, required: tuple[int, ...] = ()) -> Ctx:
    ctx: Ctx = info.context
    msg = token_error(ctx.claims, token_id)
    if msg is None and required:
        assert ctx.claims is not None
        msg = missing_all(ctx.claims.privileges, required)
    if msg:
        raise _unauthorized(msg)
    return ctx


def _vehicle(ctx: Ctx, token_id: int, filter_arg: dict[str, Any] | None) -> VehicleData | None:
    """The vehicle's data, or None when unknown or the source filter names another connection."""
    try:
        source = check_source(filter_arg)
    except SignalsArgumentError as exc:
        raise _bad_request(str(exc)) from None
    vd = ctx.cache.get(token_id)
    return vd if vd is not None and source_matches(source, vd.source) else None


# ---- resolvers for the graphql-core path -----------------------------------------------------------


def _signals_latest(_root: Any, info: GraphQLResolveInfo, tokenId: int, filter: Any = None) -> Any:
    ctx = _authorize(info, tokenId)
    return {"vd": _vehicle(ctx, tokenId, filter)}


def _collection_field(name: str) -> Any:
    def resolve(parent: dict[str, Any], info: GraphQLResolveInfo) -> Any:
        ctx: Ctx = info.context
        assert ctx.claims is not None  # signalsLatest checked the token
        msg = field_privilege_error(name, ctx.claims.privileges)
        if msg:
            raise _unauthorized(msg)
        vd: VehicleData | None = parent["vd"]
        if vd is None:
            return None
        if name == APPROX_COORDINATES:
            hit = vd.latest.get(COORDINATES)
            if hit is None:
                return None
            ts, loc = hit
            return {"timestamp": ts, "value": {**loc, LAT: snap(loc[LAT]), LON: snap(loc[LON])}}
        hit = vd.latest.get(name)
        return None if hit is None else {"timestamp": hit[0], "value": hit[1]}

    return resolve


def _last_seen(parent: dict[str, Any], _info: GraphQLResolveInfo) -> Any:
    vd: VehicleData | None = parent["vd"]
    return None if vd is None else vd.last_seen


def _available_signals(_root: Any, info: GraphQLResolveInfo, tokenId: int, filter: Any = None) -> Any:
    ctx = _authorize(info, tokenId)
    vd = _vehicle(ctx, tokenId, filter)
    return (vd.available if vd else []) or None  # telemetry-api does not filter these by privilege


def _signals_snapshot(_root: Any, info: GraphQLResolveInfo, tokenId: int, filter: Any = None) -> Any:
    """telemetry-api ``SignalsSnapshot``: every signal's latest value the caller may read (filtered by its
    privileges, unlike availableSignals), the approximate location appended when the coordinates are there."""
    ctx = _authorize(info, tokenId)
    vd = _vehicle(ctx, tokenId, filter)
    if vd is None:
        return {"lastSeen": None, "signals": []}
    assert ctx.claims is not None
    privileges = ctx.claims.privileges
    out = []
    for name, (ts, value) in sorted(vd.latest.items()):
        if field_privilege_error(name, privileges) is None:
            out.append({"name": name, "timestamp": ts, **_snapshot_value(name, value)})
    if COORDINATES in vd.latest and field_privilege_error(APPROX_COORDINATES, privileges) is None:
        ts, loc = vd.latest[COORDINATES]
        approx = {**loc, LAT: snap(loc[LAT]), LON: snap(loc[LON])}
        out.append({"name": APPROX_COORDINATES, "timestamp": ts, "valueLocation": approx})
    return {"lastSeen": vd.last_seen, "signals": out}


def _snapshot_value(name: str, value: Any) -> dict[str, Any]:
    if name == COORDINATES:
        return {"valueLocation": value}
    return {"valueString": value} if isinstance(value, str) else {"valueNumber": value}


def _data_summary(_root: Any, info: GraphQLResolveInfo, tokenId: int, filter: Any = None) -> Any:
    """telemetry-api ``GetDataSummary``: all-time, not filtered by privileges (only ``@requiresVehicleToken``);
    firstSeen/lastSeen also cover events; with no data they are the request time and 1900-01-01."""
    ctx = _authorize(info, tokenId)
    vd = _vehicle(ctx, tokenId, filter)
    names = vd.available if vd else []
    sums = [vd.summaries[n] for n in names] if vd else []
    events = vd.summary.events if vd else []
    firsts = [s.first_seen for s in sums] + [e["firstSeen"] for e in events]
    lasts = [s.last_seen for s in sums] + [e["lastSeen"] for e in events]
    return {
        "numberOfSignals": sum(s.count for s in sums),
        "availableSignals": names,
        "firstSeen": min(firsts, default=datetime.now(UTC)),
        "lastSeen": max(lasts, default=NO_DATA_LAST_SEEN),
        "signalDataSummary": [
            {"name": n, "numberOfSignals": s.count, "firstSeen": s.first_seen, "lastSeen": s.last_seen}
            for n, s in zip(names, sums, strict=True)
        ],
        "eventDataSummary": events,
    }


def _string_filter(col: str, f: dict[str, Any] | None) -> pl.Expr | None:
    """``StringValueFilter``: every set condition holds, and so does one of ``or`` when given."""
    if not f:
        return None
    c = pl.col(col)
    conds = [
        *([c == f["eq"]] if f.get("eq") is not None else []),
        *([c != f["neq"]] if f.get("neq") is not None else []),
        *([c.is_in(f["in"])] if f.get("in") is not None else []),
        *([~c.is_in(f["notIn"])] if f.get("notIn") is not None else []),
        *([c.str.starts_with(f["startsWith"])] if f.get("startsWith") is not None else []),
    ]
    alternatives = [e for sub in f.get("or") or [] if (e := _string_filter(col, sub)) is not None]
    if alternatives:
        conds.append(pl.any_horizontal(alternatives))
    return pl.all_horizontal(conds) if conds else None


def _events(
    _root: Any, info: GraphQLResolveInfo, tokenId: int, to: datetime, filter: Any = None, **kw: Any
) -> Any:
    ctx = _authorize(info, tokenId, (NON_LOCATION_HISTORY, LOCATION_HISTORY))
    frm: datetime = kw["from"]
    if frm > to:
        raise _bad_request("invalid argument: from timestamp is after to timestamp")
    vd = ctx.cache.get(tokenId)
    if vd is None:
        return []
    window = vd.events(to_us(frm), to_us(to))
    if window.is_empty():
        return []
    for cond in (
        _string_filter("name", (filter or {}).get("name")),
        _string_filter("source", (filter or {}).get("source")),
    ):
        if cond is not None:
            window = window.filter(cond)
    if "metadata" not in window.columns:
        window = window.with_columns(pl.lit(None, dtype=pl.String).alias("metadata"))
    return window.select(
        pl.col(TS).alias("timestamp"), "name", "source", pl.col("duration_ns").alias("durationNs"), "metadata"
    ).to_dicts()


def fake_vin(token_id: int) -> str:
    """A deterministic 17-character VIN-alphabet string for ``token_id`` (no check digit semantics)."""
    digest = hashlib.sha256(f"depin-emulator-vin-{token_id}".encode()).digest()
    return "".join(_VIN_ALPHABET[b % len(_VIN_ALPHABET)] for b in digest[:17])


def _vin_vc(_root: Any, info: GraphQLResolveInfo, tokenId: int) -> Any:
    ctx = _authorize(info, tokenId, (VIN_CREDENTIAL,))
    vehicle = ctx.fleet.vehicles.get(tokenId)
    if vehicle is None:
        return None
    vin, issued = fake_vin(tokenId), vehicle.minted_at.astimezone(UTC)
    expires = ctx.fleet.end.astimezone(UTC) + timedelta(days=7)
    subject = {
        "vehicleTokenId": tokenId,
        "vehicleContractAddress": f"eth:{VEHICLE_NFT_PROD}",
        "vehicleIdentificationNumber": vin,
        "recordedBy": vehicle.source,
        "recordedAt": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "countryCode": "USA",
    }
    raw = {
        "@context": ["https://www.w3.org/ns/credentials/v2"],
        "type": ["VerifiableCredential", "Vehicle"],
        "issuer": f"did:ethr:{CHAIN_ID}:0x0000000000000000000000000000000000000001",
        "id": f"urn:uuid:{hashlib.sha256(vin.encode()).hexdigest()[:32]}",
        "validFrom": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validTo": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "credentialSubject": subject,
    }
    return {
        "vehicleTokenId": tokenId,
        "vin": vin,
        "recordedBy": vehicle.source,
        "recordedAt": issued,
        "countryCode": "USA",
        "vehicleContractAddress": VEHICLE_NFT_PROD,
        "validFrom": issued,
        "validTo": expires,
        "rawVC": orjson.dumps(raw).decode(),
    }


def wire_resolvers() -> None:
    """Attach the resolvers to the (cached) telemetry schema; idempotent."""
    schema = telemetry_schema()
    query = schema.query_type
    assert query is not None
    query.fields["signalsLatest"].resolve = _signals_latest
    query.fields["availableSignals"].resolve = _available_signals
    query.fields["signalsSnapshot"].resolve = _signals_snapshot
    query.fields["dataSummary"].resolve = _data_summary
    query.fields["events"].resolve = _events
    query.fields["vinVCLatest"].resolve = _vin_vc
    coll = schema.type_map["SignalCollection"]
    assert isinstance(coll, GraphQLObjectType)
    for name, field in coll.fields.items():
        field.resolve = _last_seen if name == "lastSeen" else _collection_field(name)


wire_resolvers()
