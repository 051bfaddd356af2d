"""The Telemetry GraphQL schema: the SDL template plus one field per catalog signal, and its scalars.

The emulator's ``schema/telemetry.graphql`` holds everything but the per-signal fields; those are generated
here from :func:`connectors.dimo.catalog.current_signals`, so the schema and the catalog cannot drift.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Any

from graphql import (
    GraphQLError,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    StringValueNode,
    ValueNode,
    build_schema,
)

from connectors.dimo.catalog import Signal, current_signals
from connectors.dimo.emulator.gql import load_sdl
from connectors.dimo.privileges import APPROXIMATE_LOCATION, ENUM_TO_ID, ID_TO_PERMISSION, LOCATION_HISTORY

APPROX_COORDINATES = "currentLocationApproximateCoordinates"
COORDINATES = "currentLocationCoordinates"
_MARK_AGG = "  # @signals:aggregations"
_MARK_COLLECTION = "  # @signals:collection"


def _doc(sig: Signal) -> str:
    unit = f" Unit: '{sig.unit}'" if sig.unit else ""
    desc = sig.description.replace('"""', "'''").replace("\\", "/")
    return f'  """\n  {desc}{unit}\n  Required Privileges: [{sig.privilege}]\n  """\n'


def _agg_field(sig: Signal) -> str:
    if sig.gql_type == "Float":
        return f"  {sig.name}(agg: FloatAggregation!, filter: SignalFloatFilter): Float\n"
    if sig.gql_type == "Location":
        return f"  {sig.name}(agg: LocationAggregation!, filter: SignalLocationFilter): Location\n"
    return f"  {sig.name}(agg: StringAggregation!): String\n"


def _collection_field(sig: Signal) -> str:
    return f"  {sig.name}: Signal{sig.gql_type}\n"


@cache
def telemetry_sdl() -> str:
    """The full SDL: the template with the per-signal fields of the current catalog spliced in."""
    signals = current_signals().values()
    template = load_sdl("telemetry.graphql")
    if _MARK_AGG not in template or _MARK_COLLECTION not in template:
        raise RuntimeError("telemetry.graphql lost its '# @signals:…' markers; restore them")
    aggs = "".join(_doc(s) + _agg_field(s) for s in signals)
    coll = "".join(_doc(s) + _collection_field(s) for s in signals)
    return template.replace(_MARK_AGG + "\n", aggs).replace(_MARK_COLLECTION + "\n", coll)


# ---- scalars -------------------------------------------------------------------------------------


def parse_time(text: Any) -> datetime:
    """Parse an RFC3339 time (``Z`` or a numeric offset) into an aware UTC datetime."""
    if not isinstance(text, str):
        raise GraphQLError(f"{text!r} is not a valid RFC3339 time; use e.g. 2024-06-28T00:00:00Z")
    s = text.strip()
    try:
        if "T" not in s.upper():
            raise ValueError
        dt = datetime.fromisoformat(s[:-1] + "+00:00" if s[-1:] in "zZ" else s)
    except ValueError:
        raise GraphQLError(f"{text!r} is not a valid RFC3339 time; use e.g. 2024-06-28T00:00:00Z") from None
    if dt.tzinfo is None:
        raise GraphQLError(f"{text!r} has no time zone; RFC3339 needs 'Z' or an offset such as +02:00")
    return dt.astimezone(UTC)


def format_time(value: Any) -> str:
    """Format like Go's RFC3339Nano in UTC: fractional seconds only when non-zero, trailing zeros trimmed."""
    if isinstance(value, str):
        return value
    if not isinstance(value, datetime):
        raise GraphQLError(f"Time cannot represent {value!r}")
    dt = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    base = dt.replace(tzinfo=None, microsecond=0).isoformat()  # strftime("%Y") drops year 1's zero padding
    if dt.microsecond:
        base += "." + f"{dt.microsecond:06d}".rstrip("0")
    return base + "Z"


def _parse_time_literal(node: ValueNode, _variables: Any = None) -> datetime:
    if not isinstance(node, StringValueNode):
        raise GraphQLError("Time must be a string such as 2024-06-28T00:00:00Z")
    return parse_time(node.value)


def _serialize_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GraphQLError(f"cannot represent {value!r} as an integer")
    return value


# gqlgen's Int is 64-bit, graphql-core's 32-bit: output fields that can exceed 2³¹ (Event.durationNs) get this
# stand-in, which keeps the name "Int" so the schema reads as the real one.
INT_64 = GraphQLScalarType("Int64", serialize=_serialize_int, description="gqlgen's 64-bit Int")
INT_64.name = "Int"  # graphql-core refuses the reserved name at construction only


@cache
def telemetry_schema() -> GraphQLSchema:
    """The executable schema with the Time/Uint64 scalars wired up (resolvers are set by telemetry.py)."""
    schema = build_schema(telemetry_sdl())
    wire_scalar(schema, "Time", format_time, parse_time, _parse_time_literal)
    wire_scalar(schema, "Uint64", _serialize_int)
    event = schema.type_map["Event"]
    assert isinstance(event, GraphQLObjectType)
    event.fields["durationNs"].type = GraphQLNonNull(INT_64)
    return schema


def wire_scalar(schema: GraphQLSchema, name: str, out: Any, value: Any = None, literal: Any = None) -> None:
    """Install coercers on an SDL-built scalar under graphql-core 3.2 names and 3.3's ``coerce_*`` names.

    An SDL scalar has no ``coerce_input_literal``, so 3.3 parses literals with ``parse_literal``.
    """
    scalar = schema.type_map[name]
    assert isinstance(scalar, GraphQLScalarType)
    scalar.serialize = out  # type: ignore[method-assign]
    if hasattr(scalar, "coerce_output_value"):
        scalar.coerce_output_value = out
    if value is not None:
        scalar.parse_value = value  # type: ignore[method-assign]
        if hasattr(scalar, "coerce_input_value"):
            scalar.coerce_input_value = value
    if literal is not None:
        scalar.parse_literal = literal  # type: ignore[method-assign]


# ---- privileges ----------------------------------------------------------------------------------


def missing_all(privileges: frozenset[int], required: tuple[int, ...]) -> str | None:
    """gqlgen ``@requiresAllOfPrivileges``: the error for the first missing privilege, else None."""
    for pid in required:
        if pid not in privileges:
            return f"unauthorized: missing required privilege(s) {ID_TO_PERMISSION[pid]}"
    return None


def missing_any(privileges: frozenset[int], required: tuple[int, ...]) -> str | None:
    """gqlgen ``@requiresAtLeastOneOfPrivileges``: an error unless one of ``required`` is held."""
    if any(pid in privileges for pid in required):
        return None
    names = " ".join(ID_TO_PERMISSION[p] for p in required)
    return f"unauthorized: requires at least one of the following privileges [{names}]"


APPROX_REQUIRED = (APPROXIMATE_LOCATION, LOCATION_HISTORY)


@cache
def signal_privileges() -> dict[str, int]:
    """Privilege id each current signal requires (1 non-location, 4 location history)."""
    return {name: ENUM_TO_ID[s.privilege] for name, s in current_signals().items()}


def field_privilege_error(name: str, privileges: frozenset[int]) -> str | None:
    """The privilege error for reading signal field ``name``, or None when allowed."""
    if name == APPROX_COORDINATES:
        return missing_any(privileges, APPROX_REQUIRED)
    pid = signal_privileges().get(name)
    return None if pid is None else missing_all(privileges, (pid,))
