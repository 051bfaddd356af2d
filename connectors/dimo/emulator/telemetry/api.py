"""The emulator's Telemetry API: ``POST|GET /telemetry/query`` (DIMO reference §3).

Request flow: vehicle JWT (invalid → HTTP 401 ``{"message":"JWT is invalid."}``), parse + validate
(cached, 422), complexity ≤ 100 (422), variable coercion. Root fields are then split: every ``signals``
field runs columnar (:mod:`.signals`); the rest (signalsLatest, availableSignals, signalsSnapshot, dataSummary,
events, vinVCLatest, __typename) run on graphql-core's executor with the resolvers of
:mod:`.resolvers`. Results are merged in selection order.

Deviation from gqlgen: a privilege error on a signal inside ``signals`` nulls the whole root field
(with one error per missing privilege), where gqlgen nulls that field in every row, and is reported
even when the window has no data. Inside ``signalsLatest`` privilege errors are per field, as in gqlgen.
"""

from __future__ import annotations

from typing import Any

import orjson
from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    OperationDefinitionNode,
    SelectionSetNode,
    execute,
)
from graphql.execution.values import get_argument_values, get_variable_values
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connectors.dimo.emulator.auth import InvalidJWT, verify_vehicle_jwt
from connectors.dimo.emulator.gql import (
    COMPLEXITY_LIMIT,
    BadRequest,
    Endpoint,
    GraphQLRequest,
    complexity,
    complexity_error,
    error_response,
    format_error,
    fragments_of,
    iter_fields,
    json_response,
    read_graphql_request,
    select_operation,
    validation_failed_body,
)
from connectors.dimo.emulator.state import EmulatorState
from connectors.dimo.emulator.telemetry.data import VehicleCache
from connectors.dimo.emulator.telemetry.resolvers import Ctx, token_error
from connectors.dimo.emulator.telemetry.schema import (
    field_privilege_error,
    telemetry_schema,
)
from connectors.dimo.emulator.telemetry.signals import (
    SignalsArgumentError,
    aggregate,
    included,
    plan_columns,
    window_args,
)


def _error(message: str, path: list[Any], code: str) -> dict[str, Any]:
    return {"message": message, "path": path, "extensions": {"code": code}}


def _run_signals(
    ctx: Ctx, key: str, nodes: list[FieldNode], fragments: Any, variables: Any
) -> tuple[Any, list[dict[str, Any]]]:
    schema = telemetry_schema()
    assert schema.query_type is not None
    try:
        args = get_argument_values(schema.query_type.fields["signals"], nodes[0], variables)
    except GraphQLError as exc:
        return None, [_error(exc.message, [key], "BAD_USER_INPUT")]
    msg = token_error(ctx.claims, args["tokenId"])
    if msg:
        return None, [_error(msg, [key], "UNAUTHORIZED")]
    try:
        window = window_args(args)
        cols = plan_columns(schema, nodes, fragments, variables)
    except SignalsArgumentError as exc:
        return None, [_error(str(exc), [key], "BAD_REQUEST")]
    assert ctx.claims is not None
    denied = dict.fromkeys(
        m for c in cols if c.name and (m := field_privilege_error(c.name, ctx.claims.privileges))
    )
    if denied:
        return None, [_error(m, [key], "UNAUTHORIZED") for m in denied]
    try:
        body = aggregate(ctx.cache.get(window.token_id), cols, window)
    except SignalsArgumentError as exc:
        return None, [_error(str(exc), [key], "BAD_REQUEST")]
    return orjson.Fragment(body), []


def execute_request(ctx: Ctx, req: GraphQLRequest, doc: DocumentNode) -> Response:
    """Run a parsed and validated document; returns the HTTP response (gqlgen status codes)."""
    schema = telemetry_schema()
    op = select_operation(doc, req.operation_name)
    if op is None:
        msg = (
            "operation not found"
            if req.operation_name
            else "must provide operation name if query contains multiple operations"
        )
        return error_response(msg, "GRAPHQL_VALIDATION_FAILED", 422)
    fragments = fragments_of(doc)
    cost = complexity(op, fragments)
    if cost > COMPLEXITY_LIMIT:
        return complexity_error(cost)
    coerced = get_variable_values(schema, op.variable_definitions or (), req.variables)
    if isinstance(coerced, list):
        return json_response(validation_failed_body(e.message for e in coerced), 422)
    groups: dict[str, list[FieldNode]] = {}
    for f in iter_fields(op.selection_set, fragments):
        if included(f, coerced):
            groups.setdefault(f.alias.value if f.alias else f.name.value, []).append(f)
    others = [f for nodes in groups.values() if nodes[0].name.value != "signals" for f in nodes]
    other_data: dict[str, Any] = {}
    errors_by_key: dict[str, list[dict[str, Any]]] = {}
    if others:
        sub_op = OperationDefinitionNode(
            operation=op.operation,
            name=op.name,
            variable_definitions=op.variable_definitions,
            directives=op.directives,
            selection_set=SelectionSetNode(selections=tuple(others)),
        )
        result = execute(
            schema,
            DocumentNode(definitions=(sub_op, *fragments.values())),
            context_value=ctx,
            variable_values=req.variables,
        )
        assert not hasattr(result, "__await__")  # all resolvers are synchronous
        other_data = result.data or {}
        for err in result.errors or []:
            errors_by_key.setdefault(str(err.path[0]) if err.path else "", []).append(format_error(err))
    data: dict[str, Any] = {}
    for key, nodes in groups.items():
        if nodes[0].name.value == "signals":
            data[key], errs = _run_signals(ctx, key, nodes, fragments, coerced)
            if errs:
                errors_by_key.setdefault(key, []).extend(errs)
        else:
            data[key] = other_data.get(key)
    errors = [e for key in ("", *groups) for e in errors_by_key.get(key, [])]
    payload = {"errors": errors, "data": data} if errors else {"data": data}
    return json_response(payload)


def routes(state: EmulatorState) -> list[Route]:
    """``/telemetry/query`` for ``state`` (POST and GET)."""
    endpoint = Endpoint(telemetry_schema())
    cache = VehicleCache(state.fleet)

    async def query(request: Request) -> Response:
        try:
            claims = verify_vehicle_jwt(state, request.headers.get("authorization"))
        except InvalidJWT:
            return json_response({"message": "JWT is invalid."}, 401)
        try:
            req = await read_graphql_request(request)
        except BadRequest as exc:
            return json_response({"errors": [{"message": str(exc)}], "data": None}, 400)
        prepared = endpoint.prepare(req.query)
        if isinstance(prepared, Response):
            return prepared
        return await run_in_threadpool(execute_request, Ctx(state.fleet, cache, claims), req, prepared)

    return [Route("/telemetry/query", query, methods=["GET", "POST"])]
