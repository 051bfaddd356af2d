"""GraphQL plumbing shared by the emulator's Identity and Telemetry endpoints (graphql-core).

Requests are parsed and validated against the real schema (SDL files beside this module); parsed
documents are cached by query text. Errors follow gqlgen, which both DIMO services run on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import orjson
from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    build_schema,
    parse,
    validate,
)
from starlette.requests import Request
from starlette.responses import Response

COMPLEXITY_LIMIT = 100


def load_sdl(filename: str) -> str:
    return resources.files("connectors.dimo.emulator").joinpath("schema", filename).read_text("utf-8")


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def format_error(err: GraphQLError) -> dict[str, Any]:
    """A gqlgen-style error entry: message, path, and extensions when set."""
    out: dict[str, Any] = {"message": err.message, "path": err.path}
    if err.extensions:
        out["extensions"] = err.extensions
    return out


def validation_failed_body(messages: Iterable[str]) -> dict[str, Any]:
    """The 422 body gqlgen sends when validation (or variable coercion) fails."""
    return {
        "errors": [{"message": m, "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}} for m in messages],
        "data": None,
    }


def error_response(message: str, code: str, status: int = 422) -> Response:
    """A gqlgen-style error document: ``{"errors":[{"message", "extensions":{"code"}}], "data": null}``."""
    return json_response(
        {"errors": [{"message": message, "extensions": {"code": code}}], "data": None}, status
    )


@dataclass(frozen=True)
class GraphQLRequest:
    query: str
    variables: dict[str, Any]
    operation_name: str | None


class BadRequest(Exception):
    """The HTTP request itself is not a GraphQL request (bad JSON, missing query)."""


async def read_graphql_request(request: Request) -> GraphQLRequest:
    """Read ``{"query", "variables", "operationName"}`` from a POST JSON body or GET query string."""
    if request.method == "GET":
        q = request.query_params.get("query")
        raw_vars = request.query_params.get("variables")
        op = request.query_params.get("operationName")
        try:
            variables = orjson.loads(raw_vars) if raw_vars else {}
        except orjson.JSONDecodeError:
            raise BadRequest("variables could not be decoded") from None
    else:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise BadRequest("json request body could not be decoded") from None
        if not isinstance(body, dict):
            raise BadRequest("json request body must be an object")
        q, variables, op = body.get("query"), body.get("variables") or {}, body.get("operationName")
    if not isinstance(q, str) or not q.strip():
        raise BadRequest("no operation provided")
    if not isinstance(variables, dict):
        raise BadRequest("variables must be an object")
    return GraphQLRequest(q, variables, op)


class Endpoint:
    """A schema plus a cache of parsed and validated documents."""

    def __init__(self, schema: GraphQLSchema) -> None:
        self.schema = schema
        self._prepare = lru_cache(maxsize=512)(self._prepare_uncached)

    @classmethod
    def from_sdl_file(cls, filename: str) -> Endpoint:
        return cls(build_schema(load_sdl(filename)))

    def _prepare_uncached(self, query: str) -> DocumentNode | Response:
        try:
            doc = parse(query)
        except GraphQLError as exc:
            return error_response(exc.message, "GRAPHQL_PARSE_FAILED")
        errors = validate(self.schema, doc)
        if errors:
            return json_response(validation_failed_body(e.message for e in errors), 422)
        return doc

    def prepare(self, query: str) -> DocumentNode | Response:
        """Parse and validate ``query``; a Response means it failed (422, gqlgen codes)."""
        return self._prepare(query)


def select_operation(doc: DocumentNode, name: str | None) -> OperationDefinitionNode | None:
    ops = [d for d in doc.definitions if isinstance(d, OperationDefinitionNode)]
    if name:
        return next((o for o in ops if o.name and o.name.value == name), None)
    return ops[0] if len(ops) == 1 else None


def fragments_of(doc: DocumentNode) -> dict[str, FragmentDefinitionNode]:
    return {d.name.value: d for d in doc.definitions if isinstance(d, FragmentDefinitionNode)}


def iter_fields(selection_set: SelectionSetNode | None, fragments: dict[str, FragmentDefinitionNode]):
    """Yield the FieldNodes of a selection set, expanding inline fragments and fragment spreads."""
    if selection_set is None:
        return
    for sel in selection_set.selections:
        if isinstance(sel, FieldNode):
            yield sel
        elif isinstance(sel, InlineFragmentNode):
            yield from iter_fields(sel.selection_set, fragments)
        elif isinstance(sel, FragmentSpreadNode):
            frag = fragments.get(sel.name.value)
            if frag is not None:
                yield from iter_fields(frag.selection_set, fragments)


def complexity(op: OperationDefinitionNode, fragments: dict[str, FragmentDefinitionNode]) -> int:
    """gqlgen's default complexity: every selected field costs 1 plus its children (fragments expanded)."""

    def cost(ss: SelectionSetNode | None) -> int:
        return sum(1 + cost(f.selection_set) for f in iter_fields(ss, fragments))

    return cost(op.selection_set)


def complexity_error(value: int, limit: int = COMPLEXITY_LIMIT) -> Response:
    return error_response(
        f"operation has complexity {value}, which exceeds the limit of {limit}",
        "COMPLEXITY_LIMIT_EXCEEDED",
        422,
    )
