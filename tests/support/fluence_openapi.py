"""Check Fluence HTTP exchanges against Fluence's published OpenAPI document (v0.10.0) with openapi-core.

The document is not part of this repository (AGPL): it is read from ``<repo>/../shared/reference/``. Without it
the tests that need it skip, except when ``CI`` is set, where they fail.

``RecordingTransport`` records every exchange a :class:`serving.fluence.FluenceClient` makes (pass it as the
client's ``transport``); :func:`exchange_problems` says what in one exchange does not conform: the request
(parameters, body, auth header) and the response (status, body). Properties the document does not define are
problems too, both ways (:func:`undeclared`): the server drops unknown request fields silently, and the fake
must not invent any.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from werkzeug.datastructures import Headers, ImmutableMultiDict

from tests.support.ci import require

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO.parent / "shared" / "reference" / "fluence-openapi-0.10.0.yml"
_BRACKET = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[\d*\]$")

# operations whose only declared scheme is the JWT one although API keys work there (Fluence's own Terraform
# provider manages SSH keys with an API key against the live API): a gap in the document, not in the client
JWT_ONLY_GAP = {("get", "/v1/ssh_keys"), ("post", "/v1/ssh_keys"), ("post", "/v1/ssh_keys/delete")}


def spec_or_skip() -> Any:
    """The parsed document (``openapi_core.OpenAPI``); skips when it is absent, fails instead when ``CI`` is set."""
    if not SPEC_PATH.is_file():
        require(
            f"Fluence's OpenAPI document is not at {SPEC_PATH}",
            in_ci=f"{SPEC_PATH} is missing: CI must check the Fluence exchanges against the published spec",
        )
    return _load(str(SPEC_PATH))


@functools.lru_cache(maxsize=2)
def _load(path: str) -> Any:
    from openapi_core import Config, OpenAPI

    # openapi-core's "forbid" policy rejects valid allOf compositions (each part forbids the other's
    # properties), so undeclared properties are found by :func:`undeclared` instead
    return OpenAPI.from_file_path(path, config=Config())


@functools.lru_cache(maxsize=2)
def _raw(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@dataclass
class Exchange:
    request: httpx.Request
    response: httpx.Response

    def __str__(self) -> str:
        return f"{self.request.method} {self.request.url.path} → {self.response.status_code}"


class RecordingTransport(httpx.BaseTransport):
    """An ``httpx`` transport that sends for real and keeps every (request, response), bodies read."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self._inner.handle_request(request)
        body = response.read()
        response.close()
        copy = httpx.Response(response.status_code, headers=response.headers, content=body, request=request)
        self.exchanges.append(Exchange(request, copy))
        return copy

    def close(self) -> None:
        self._inner.close()


# ---- openapi-core adapters ---------------------------------------------------------------------------------------
def _query(url: httpx.URL) -> ImmutableMultiDict[str, str]:
    """Query parameters, with the bracket notation the document prescribes for arrays (``expand[0]=a``)
    folded into repeated names, so the array items are validated."""
    items = []
    for key, value in url.params.multi_items():
        m = _BRACKET.match(key)
        items.append((m.group(1) if m else key, value))
    return ImmutableMultiDict(items)


@dataclass
class _Request:
    host_url: str
    path: str
    method: str
    parameters: Any
    content_type: str
    body: bytes | None


@dataclass
class _Response:
    status_code: int
    content_type: str
    headers: Any
    data: bytes | None


def _adapt(ex: Exchange) -> tuple[_Request, _Response]:
    from openapi_core.datatypes import RequestParameters

    req, resp = ex.request, ex.response
    params = RequestParameters(
        query=_query(req.url),
        header=Headers(list(req.headers.items())),
        cookie=ImmutableMultiDict(),
        path={},
    )
    url = req.url
    request = _Request(
        host_url=f"{url.scheme}://{url.netloc.decode()}",
        path=url.path,
        method=req.method.lower(),
        parameters=params,
        content_type=req.headers.get("content-type", "application/json").lower(),
        body=req.content or None,
    )
    response = _Response(
        status_code=resp.status_code,
        content_type=resp.headers.get("content-type", "").lower(),
        headers=Headers(list(resp.headers.items())),
        data=resp.content or None,
    )
    return request, response


def operation_of(spec: Any, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """(path template, operation) of the document for ``method path``, or None when it has none."""
    paths = _raw(str(SPEC_PATH))["paths"]
    for template, item in paths.items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            exact = template == path
            if exact or not any(t == path and method.lower() in paths[t] for t in paths):
                return template, item[method.lower()]
    return None


def _errors_text(errors: list[Exception]) -> str:
    out = []
    for exc in errors:
        cause = exc.__cause__
        details = getattr(cause, "schema_errors", None) or getattr(exc, "schema_errors", None) or []
        text = f"{type(exc).__name__}: {exc}"
        if details:
            text += (
                " ["
                + "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"[:400] for e in details)
                + "]"
            )
        elif cause is not None:
            text += f" ({cause})"
        out.append(text)
    return "; ".join(out)


def _error_body_problems(body: bytes | None) -> list[str]:
    """Problems of a non-2xx body against ``ErrorBody`` (every non-2xx carries it, says the document)."""
    from openapi_schema_validator import OAS31Validator

    raw = _raw(str(SPEC_PATH))
    try:
        doc = json.loads(body or b"")
    except ValueError:
        return [f"error body is not JSON: {(body or b'')[:120]!r}"]
    schema = {"$ref": "#/components/schemas/ErrorBody", "components": raw["components"]}
    return [f"ErrorBody: {e.message}" for e in OAS31Validator(schema).iter_errors(doc)]


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    raw = _raw(str(SPEC_PATH))
    while "$ref" in schema:
        node: Any = raw
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    declared = schema.get("type")
    if declared is None:
        return True
    names = declared if isinstance(declared, list) else [declared]
    if isinstance(value, bool):
        return "boolean" in names
    return any(isinstance(value, _TYPES.get(n, ())) for n in names)


def undeclared(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """JSON paths in ``value`` of object properties that ``schema`` does not declare (through ``$ref``,
    ``allOf``, and the best-fitting ``oneOf``/``anyOf`` branch)."""
    schema = _resolve(schema)
    branches = schema.get("oneOf") or schema.get("anyOf")
    if branches:
        fitting = [undeclared(value, b, path) for b in branches if _fits(value, _resolve(b))]
        return min(fitting, key=len) if fitting else []
    parts = [schema] + [_resolve(p) for p in schema.get("allOf", [])]
    if isinstance(value, dict):
        if any(
            isinstance(p.get("additionalProperties"), dict) or p.get("additionalProperties") is True
            for p in parts
        ):
            return []
        if any("oneOf" in p or "anyOf" in p for p in parts[1:]):
            return []  # not used by the document; do not guess
        props: dict[str, Any] = {}
        for p in parts:
            props.update(p.get("properties", {}))
        if not props and all(p.get("type") in (None, "object") and "properties" not in p for p in parts):
            return []  # a free-form object (e.g. CloudInitInfoDto)
        out = []
        for key, item in value.items():
            out += [f"{path}/{key}"] if key not in props else undeclared(item, props[key], f"{path}/{key}")
        return out
    if isinstance(value, list) and "items" in schema:
        return [p for i, item in enumerate(value) for p in undeclared(item, schema["items"], f"{path}/{i}")]
    return []


def _json_schema(section: dict[str, Any]) -> dict[str, Any] | None:
    return ((section.get("content") or {}).get("application/json") or {}).get("schema")


def exchange_problems(spec: Any, ex: Exchange) -> list[str]:
    """What in ``ex`` does not conform to the document (empty: it conforms). Raises ``LookupError`` when the
    document has no such operation."""
    from openapi_core.validation.request.exceptions import SecurityValidationError
    from openapi_core.validation.request.validators import (
        V31RequestBodyValidator,
        V31RequestParametersValidator,
    )

    found = operation_of(spec, ex.request.method, ex.request.url.path)
    if found is None:
        raise LookupError(f"{ex.request.method} {ex.request.url.path}: not in the published document")
    template, op = found
    request, response = _adapt(ex)
    problems: list[str] = []
    errors = list(spec.iter_request_errors(request))
    if any(isinstance(e, SecurityValidationError) for e in errors) and (
        (ex.request.method.lower(), template) in JWT_ONLY_GAP
    ):
        # the document's JWT-only declaration is the gap: check the API-key header and the rest
        if "x-api-key" not in ex.request.headers:
            problems.append("request: no X-API-KEY header")
        errors = [
            *V31RequestParametersValidator(spec.spec).iter_errors(request),
            *V31RequestBodyValidator(spec.spec).iter_errors(request),
        ]
    if errors:
        problems.append(f"request: {_errors_text(errors)}")
    body_schema = _json_schema(op.get("requestBody") or {})
    if ex.request.content and body_schema is not None:
        extra = undeclared(json.loads(ex.request.content), body_schema)
        if extra:
            problems.append(f"request: properties the document does not define: {extra}")
    status = str(ex.response.status_code)
    if status in op.get("responses", {}) or "default" in op.get("responses", {}):
        errors = list(spec.iter_response_errors(request, response))
        if errors:
            problems.append(f"response: {_errors_text(errors)}")
        resp_schema = _json_schema(op["responses"].get(status) or op["responses"].get("default") or {})
        if ex.response.content and resp_schema is not None and not errors:
            extra = undeclared(json.loads(ex.response.content), resp_schema)
            if extra:
                problems.append(f"response: properties the document does not define: {extra}")
    elif ex.response.status_code >= 400:
        problems += [f"response: {p}" for p in _error_body_problems(ex.response.content)]
    else:
        problems.append(f"response: status {status} is not one the document gives for this operation")
    return problems


def body_problems(spec: Any, method: str, path: str, body: Any, *, undeclared_ok: bool = False) -> list[str]:
    """Problems of a request body (JSON value) for ``method path`` (auth and parameters aside); with
    ``undeclared_ok`` only what the document itself forbids (it allows undeclared properties)."""
    from openapi_core.validation.request.validators import V31RequestBodyValidator

    req = httpx.Request(method, f"http://fluence.test{path}", json=body, headers={"X-API-KEY": "k"})
    request, _ = _adapt(Exchange(req, httpx.Response(200)))
    errors = list(V31RequestBodyValidator(spec.spec).iter_errors(request))
    found = operation_of(spec, method, path)
    schema = _json_schema((found[1].get("requestBody") or {}) if found else {})
    extra = undeclared(body, schema) if schema is not None and not undeclared_ok else []
    return ([_errors_text(errors)] if errors else []) + ([f"undeclared properties: {extra}"] if extra else [])
