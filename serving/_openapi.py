"""OpenAPI 3.1 description of the gateway, built from the served functions' JSON schemas.

Each function gets a concrete invoke path per alias (``/v1/functions/range/invoke``,
``/v1/functions/range@prod/invoke``) whose request body is one of its input forms (``oneOf``): ``{"inputs":
[row, …]}`` with ``row`` the bundle's input schema and ``maxItems`` its ``max_batch_size``, and each other form
its family accepts (``{"telemetry": [...]}``, ``{"plan": {...}}``), each with a working example (``examples``:
the manifest's example rows, the form's own example). The templated ``/v1/functions/{ref}/invoke`` covers
every other reference (``name@version``). OpenAPI 3.1 uses JSON Schema 2020-12, like the bundles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from depin_core.names import FUNCTION_NAME_PATTERN

if TYPE_CHECKING:
    from serving._runtime import RoutingTable

ERROR = {"$ref": "#/components/schemas/Error"}
_ERRORS = {
    "400": "Malformed request (not JSON, bad header)",
    "401": "Admin key missing",
    "403": "Admin key wrong, admin API disabled, or publisher not trusted",
    "404": "Unknown function, alias or version",
    "409": "Conflict (nothing to roll back to)",
    "413": "Body too large or too many rows",
    "422": "Invalid input: the error's field names it",
    "429": "Queue full: retry after Retry-After seconds",
    "503": "Not ready, loading or draining: retry after Retry-After seconds",
    "504": "The request's deadline passed",
}


def _errors(*codes: str) -> dict[str, Any]:
    out = {}
    for code in codes:
        resp: dict[str, Any] = {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": ERROR}},
        }
        if code in ("429", "503"):
            resp["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        out[code] = resp
    return out


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props), **extra}


STR = {"type": "string"}
TARGET = {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}}
ALIASES = {"type": "object", "additionalProperties": TARGET}
SIGNATURE = _obj({"scheme": {"const": "eip191"}, "publisher": STR, "signature": STR})
VERSION = {"type": "string", "pattern": "^[0-9a-f]{16}$"}

_INVOKE_ERRORS = ("400", "404", "413", "422", "429", "503", "504")
_ADMIN: list[dict[str, list[str]]] = [{"apiKey": []}]
_REQUEST_ID = {
    "name": "X-Request-Id",
    "in": "header",
    "required": False,
    "description": "keys sticky weighted splits: the same id always reaches the same version",
    "schema": {"type": "string", "maxLength": 200},
}


Forms = Callable[[str, str], Mapping[str, Any]]  # (function, version) → its other input forms by body key


def _invoke(
    summary: str,
    input_schema: Any,
    output_schema: Any,
    max_rows: int | None,
    op_id: str,
    forms: Mapping[str, Any] | None = None,
    example: list[dict[str, Any]] | None = None,
) -> dict:
    inputs: dict[str, Any] = {"type": "array", "items": input_schema, "minItems": 1}
    if max_rows is not None:
        inputs["maxItems"] = max_rows
    rows_body = _obj({"inputs": inputs}, additionalProperties=False)
    forms = forms or {}
    body: dict[str, Any] = rows_body
    media: dict[str, Any] = {}
    if forms:
        rows_body["title"] = "engineered feature rows"
        body = {
            "oneOf": [
                rows_body,
                *(
                    {**_obj({k: f.schema}, additionalProperties=False), "title": f.title}
                    for k, f in forms.items()
                ),
            ]
        }
    if example is not None:
        media["examples"] = {
            "inputs": {"summary": "engineered feature rows", "value": {"inputs": example}},
            **{k: {"summary": f.title, "value": {k: f.example}} for k, f in forms.items()},
        }
    row_extra = {f.row_key: f.row_schema for f in forms.values() if f.row_key is not None}
    if row_extra and isinstance(output_schema, dict) and "properties" in output_schema:
        output_schema = {**output_schema, "properties": {**output_schema["properties"], **row_extra}}
    notes = {k: v for f in forms.values() for k, v in f.notes_schema.items()}
    ok = _obj(
        {"function": STR, "version": VERSION, "outputs": {"type": "array", "items": output_schema}, **notes},
        ["function", "version", "outputs"],
    )
    return {
        "post": {
            "operationId": op_id,
            "summary": summary,
            "tags": ["invoke"],
            "parameters": [_REQUEST_ID],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body, **media}}},
            "responses": {
                "200": {
                    "description": "one output row per input row, in order (per trip/window for telemetry)",
                    "headers": {"X-Depin-Version": {"schema": VERSION}},
                    "content": {"application/json": {"schema": ok}},
                },
                **_errors(*_INVOKE_ERRORS),
            },
        }
    }


class _GenericForm:
    """Another input form in the templated invoke path (its function's own schema is on its concrete path)."""

    def __init__(self, key: str, title: str, schema: dict[str, Any]) -> None:
        self.key, self.title, self.schema = key, title, schema
        self.row_key: str | None = None
        self.row_schema: dict[str, Any] | None = None
        self.notes_schema: dict[str, dict[str, Any]] = {}


_GENERIC_FORMS = {
    "telemetry": _GenericForm(
        "telemetry",
        "raw telemetry rows (DIMO signal names and units), for families that accept them",
        {"type": "array", "items": {"type": "object"}, "minItems": 1},
    ),
    "plan": _GenericForm("plan", "a planned trip, for families that accept one (range)", {"type": "object"}),
}


def _path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema or STR}


def build_openapi(
    table: RoutingTable,
    *,
    title: str = "depin function gateway",
    version: str = "1",
    forms: Forms | None = None,
) -> dict:
    """The OpenAPI document for ``table``'s functions plus the fixed endpoints; ``forms`` gives a served
    version's other input forms (none without it)."""
    paths: dict[str, Any] = {}
    for name, route in sorted(table.functions.items()):
        for alias, target in sorted(route.routes.items()):
            info = route.info.versions.get(next(iter(target)))
            if info is None:
                continue
            m = info.manifest
            path = (
                f"/v1/functions/{name}/invoke"
                if alias == "latest"
                else f"/v1/functions/{name}@{alias}/invoke"
            )
            op = f"invoke_{name}" if alias == "latest" else f"invoke_{name}_at_{alias}"
            summary = f"{name}@{alias}: {m['family']} model (version {info.version} when this was generated)"
            paths[path] = _invoke(
                summary,
                m["input_schema"],
                m["output_schema"],
                m["max_batch_size"],
                op,
                forms(name, info.version) if forms is not None else None,
                m["example"],
            )
    generic = _invoke(
        "invoke any function: ref = name, name@alias or name@version",
        {"type": "object"},
        {"type": "object"},
        None,
        "invoke",
        _GENERIC_FORMS,
    )
    generic["post"]["parameters"] = [
        _path_param("ref", "name, name@alias or name@version", {"type": "string", "maxLength": 100}),
        *generic["post"]["parameters"],
    ]
    paths["/v1/functions/{ref}/invoke"] = generic

    name_p = _path_param("name", "function name", {"type": "string", "pattern": f"^{FUNCTION_NAME_PATTERN}$"})
    version_p = _path_param("version", "16 hex chars (the content hash)", VERSION)
    alias_p = _path_param(
        "alias",
        "alias name (never 16 hex chars: that reads as a version)",
        {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$", "not": VERSION},
    )
    version_summary = _obj(
        {
            "version": VERSION,
            "family": STR,
            "created_at": STR,
            "publisher": STR,
            "max_batch_size": {"type": "integer"},
            "loaded": {"type": "boolean"},
        }
    )
    fn_summary = _obj(
        {
            "name": STR,
            "latest": {"type": ["string", "null"]},
            "aliases": ALIASES,
            "versions": {"type": "array", "items": VERSION},
        }
    )
    paths["/v1/functions"] = {
        "get": {
            "operationId": "list_functions",
            "summary": "every function with its versions and aliases",
            "responses": {
                "200": {
                    "description": "the functions",
                    "content": {
                        "application/json": {
                            "schema": _obj({"functions": {"type": "array", "items": fn_summary}})
                        }
                    },
                }
            },
        }
    }
    paths["/v1/functions/{name}"] = {
        "get": {
            "operationId": "get_function",
            "summary": "versions, aliases and the latest manifest + signature of a function",
            "parameters": [name_p],
            "responses": {
                "200": {
                    "description": "the function",
                    "content": {
                        "application/json": {
                            "schema": _obj(
                                {
                                    "name": STR,
                                    "latest": {"type": ["string", "null"]},
                                    "aliases": ALIASES,
                                    "serving": ALIASES,
                                    "versions": {"type": "array", "items": version_summary},
                                    "manifest": {"type": ["object", "null"]},
                                    "signature": {"anyOf": [SIGNATURE, {"type": "null"}]},
                                }
                            )
                        }
                    },
                },
                **_errors("404"),
            },
        }
    }
    paths["/v1/functions/{name}/versions/{version}"] = {
        "get": {
            "operationId": "get_version",
            "summary": "manifest and publisher signature of one version (verify with eth-account)",
            "parameters": [name_p, version_p],
            "responses": {
                "200": {
                    "description": "the version",
                    "content": {
                        "application/json": {
                            "schema": _obj(
                                {
                                    "function": STR,
                                    "version": VERSION,
                                    "manifest": {"type": "object"},
                                    "signature": SIGNATURE,
                                    "loaded": {"type": "boolean"},
                                }
                            )
                        }
                    },
                },
                **_errors("404"),
            },
        },
        "put": {
            "operationId": "upload_version",
            "summary": "upload a packed bundle (tar from serving.bundle.pack_bundle); admin",
            "security": _ADMIN,
            "parameters": [name_p, version_p],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "200": {
                    "description": "already present",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "201": {
                    "description": "installed, loaded, warm; alias latest moved to it",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_errors("400", "401", "403", "404", "413", "422"),
            },
        },
    }
    for raw, what in (
        ("manifest.json", "the exact signed bytes of manifest.json"),
        ("signature.json", "signature.json"),
    ):
        paths[f"/v1/functions/{{name}}/versions/{{version}}/{raw}"] = {
            "get": {
                "operationId": f"get_{raw.replace('.', '_')}",
                "summary": what,
                "parameters": [name_p, version_p],
                "responses": {
                    "200": {
                        "description": what,
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors("404"),
                },
            }
        }
    alias_result = _obj(
        {"function": STR, "alias": STR, "target": TARGET, "previous": TARGET}, ["function", "alias", "target"]
    )
    paths["/v1/functions/{name}/aliases/{alias}"] = {
        "put": {
            "operationId": "set_alias",
            "summary": "point an alias at a version or a weighted split; admin",
            "security": _ADMIN,
            "parameters": [name_p, alias_p],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                _obj({"version": STR}, additionalProperties=False),
                                _obj({"weights": TARGET}, additionalProperties=False),
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "moved (served once this returns)",
                    "content": {"application/json": {"schema": alias_result}},
                },
                **_errors("400", "401", "403", "404", "413", "422", "503"),
            },
        }
    }
    paths["/v1/functions/{name}/aliases/{alias}/rollback"] = {
        "post": {
            "operationId": "rollback_alias",
            "summary": "restore the alias's previous target; admin",
            "security": _ADMIN,
            "parameters": [name_p, alias_p],
            "responses": {
                "200": {
                    "description": "rolled back",
                    "content": {"application/json": {"schema": alias_result}},
                },
                **_errors("401", "403", "404", "409", "503"),
            },
        }
    }
    status = {"application/json": {"schema": _obj({"status": STR}, additionalProperties=True)}}
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "the process is up",
            "responses": {"200": {"description": "up", "content": status}},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "200 when every aliased version is loaded and warm, else 503 with the problems",
            "responses": {
                "200": {"description": "ready", "content": status},
                "503": {"description": "not ready", "content": status},
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {"schema": STR}}}
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "this document",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": "Versioned, signed model functions."},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": _obj(
                    {"error": _obj({"code": STR, "message": STR, "field": STR}, ["code", "message"])}
                )
            },
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }
