"""Request-body rules of the fake Fluence API, generation B, written from Fluence's published OpenAPI document
(v0.10.0): what ``POST /v2/vms``, ``POST /v1/security_groups`` & co. accept. The fake answers a body that breaks
them with 400 ``{"code": "bad_request", "error": "<field>: <problem>"}``, so a client that drifts from the
published shapes fails against the fake as it would against the API.

As in the document, properties it does not define are allowed (the server drops them); the conformance test
(``tests/e2e/test_fluence_openapi.py``) flags them separately. ``tests/serving/fluence/test_fake_wire.py`` checks
these rules against the document itself.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
U16: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 65535}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [{"type": "null"}, schema]}


NEW_STORAGE = _obj(
    ["clusterId", "name", "storageType", "volumeGb", "replicated"],
    clusterId=UUID,
    name={"type": "string"},
    storageType={"enum": ["NVME"]},
    volumeGb={"type": "integer", "minimum": 0},
    replicated={"type": "boolean"},
    osImage={"type": ["string", "null"]},
)
DISK = {"oneOf": [UUID, NEW_STORAGE]}
NEW_PUBLIC_IP = _obj(
    ["clusterId", "name", "addressType"],
    clusterId=UUID,
    name={"type": "string"},
    addressType={"enum": ["V4"]},
)
PORTS = {
    "oneOf": [
        {"const": "all"},
        _obj(["exact"], exact=_obj(["value"], value=U16)),
        _obj(["range"], range=_obj(["min", "max"], min=U16, max=U16)),
    ]
}
PROTOCOL = {
    "oneOf": [
        {"enum": ["all", "icmp"]},
        _obj(["tcp"], tcp=_obj(["ports"], ports=PORTS)),
        _obj(["udp"], udp=_obj(["ports"], ports=PORTS)),
    ]
}
RULE = _obj(
    ["type", "protocolKind", "remote"],
    type={"enum": ["ipv4", "ipv6"]},
    protocolKind=PROTOCOL,
    remote={
        "oneOf": [_obj(["address"], address={"type": "string"}), _obj(["securityGroup"], securityGroup=UUID)]
    },
)
RULES_ARRAY = {"type": ["array", "null"], "items": RULE}
IDS = _obj(["ids"], ids={"type": "array", "items": UUID})

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v2/vms"): _obj(
        ["clusterId", "name", "configurationId", "bootDisk"],
        clusterId=UUID,
        name={"type": "string"},
        configurationId=UUID,
        bootDisk=DISK,
        dataDisks={"type": "array", "items": DISK},
        sshKeys={"type": "array", "items": UUID},
        publicIp=_nullable({"oneOf": [UUID, NEW_PUBLIC_IP]}),
        cloudInit=_nullable(_obj([], userData={"type": ["string", "null"]})),
    ),
    ("PATCH", "/v2/vms/{vm_id}"): _obj([], name={"type": ["string", "null"]}),
    ("PATCH", "/v2/vms/{vm_id}/interfaces/{interface_id}"): _obj([], securityGroupId=_nullable(UUID)),
    # ingressRules / egressRules are ARRAYS (or null) here; the {"type", "rules"} object is the answer's form
    ("POST", "/v1/security_groups"): _obj(
        ["clusterId", "name"],
        clusterId=UUID,
        name={"type": "string"},
        ingressRules=RULES_ARRAY,
        egressRules=RULES_ARRAY,
    ),
    ("POST", "/v1/security_groups/delete"): IDS,
    ("POST", "/v1/ssh_keys"): _obj(
        ["publicKey", "name"], publicKey={"type": "string"}, name={"type": "string"}
    ),
    ("POST", "/v1/ssh_keys/delete"): IDS,
    ("POST", "/v1/prices/cost"): _obj(
        ["resources"],
        secs={"type": ["integer", "null"], "minimum": 0},
        resources={
            "type": "array",
            "items": {
                "oneOf": [
                    _obj(
                        ["publicIp"],
                        publicIp=_obj(
                            ["resource_id"],
                            resource_id=_obj(
                                ["addressType", "clusterId"],
                                addressType={"enum": ["V4", "V6"]},
                                clusterId=UUID,
                            ),
                        ),
                    ),
                    _obj(
                        ["storage"],
                        storage=_obj(
                            ["resource_id", "volume_gb"],
                            volume_gb={"type": "integer", "minimum": 0},
                            resource_id=_obj(
                                ["storageType", "replicated", "clusterId"],
                                storageType={"enum": ["HDD", "SSD", "NVME"]},
                                replicated={"type": "boolean"},
                                clusterId=UUID,
                            ),
                        ),
                    ),
                    _obj(
                        ["vm"],
                        vm=_obj(
                            ["resource_id"],
                            resource_id=_obj(
                                ["vmConfigurationId", "clusterId"], vmConfigurationId=UUID, clusterId=UUID
                            ),
                        ),
                    ),
                ]
            },
        },
    ),
}
_VALIDATORS = {
    key: Draft202012Validator(schema, format_checker=FormatChecker()) for key, schema in BODIES.items()
}


def body_problem(method: str, route: str, body: Any) -> str | None:
    """``"<field path>: <problem>"`` for the first rule ``body`` breaks, or None (also for routes without
    rules). ``route`` is the path template, e.g. ``/v2/vms/{vm_id}``."""
    validator = _VALIDATORS.get((method.upper(), route))
    if validator is None:
        return None
    errors = sorted(
        validator.iter_errors(body), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    if not errors:
        return None
    err = errors[0]
    if err.context:  # a oneOf: report the branch that got furthest
        err = max(err.context, key=lambda e: len(e.absolute_path))
    where = ".".join(str(p) for p in err.absolute_path) or "body"
    return f"{where}: {err.message[:300]}"


def uuid_problem(name: str, value: str) -> str | None:
    """``"<name>: not a UUID"`` when a path parameter the document types ``format: uuid`` is not one."""
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return f"{name}: {value[:60]!r} is not a UUID"
    return None
