"""Vehicle discovery through the Identity API: every vehicle shared with the license, with its privileges."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from connectors.dimo._http import Service, graphql_data
from connectors.dimo.errors import DimoQueryError, DimoTransientError
from connectors.dimo.privileges import decode_sacd_permissions

PAGE_SIZE = 100  # the Identity API's maximum for `first`

_NODE_SACD = "sacd(grantee: $lic) { permissions }"
_NODE_SACDS = "sacds(first: 100) { nodes { grantee permissions } }"
_QUERY = """query Vehicles($lic: Address!, $after: String) {
  vehicles(first: %d, after: $after, filterBy: {privileged: $lic}) {
    pageInfo { hasNextPage endCursor }
    nodes { tokenId owner definition { make model year } %s }
  }
}"""


@dataclass(frozen=True, slots=True)
class VehicleInfo:
    """A vehicle the license may read: identity facts plus the privilege ids granted to the license."""

    token_id: int
    make: str | None = None
    model: str | None = None
    year: int | None = None
    owner: str | None = None
    privileges: frozenset[int] = frozenset()


def _privileges(node: dict[str, Any], client_id: str) -> frozenset[int]:
    lic = client_id.lower()
    if str(node.get("owner") or "").lower() == lic:
        return frozenset(range(1, 9))  # owners hold every privilege
    if "sacd" in node:
        sacd = node.get("sacd") or {}
        return (
            frozenset(decode_sacd_permissions(sacd["permissions"]))
            if sacd.get("permissions")
            else frozenset()
        )
    out: set[int] = set()
    for grant in (node.get("sacds") or {}).get("nodes") or []:
        # Grantees come back checksummed: compare case-insensitively (activepieces #8322).
        if str(grant.get("grantee") or "").lower() == lic and grant.get("permissions"):
            out.update(decode_sacd_permissions(grant["permissions"]))
    return frozenset(out)


def _vehicle(node: dict[str, Any], client_id: str) -> VehicleInfo:
    d = node.get("definition") or {}
    year = d.get("year")
    return VehicleInfo(
        token_id=int(node["tokenId"]),
        make=d.get("make"),
        model=d.get("model"),
        year=int(year) if year is not None else None,
        owner=node.get("owner"),
        privileges=_privileges(node, client_id),
    )


async def _page(resp: httpx.Response, what: str, client_id: str) -> tuple[list[VehicleInfo], dict[str, Any]]:
    """(vehicles, pageInfo) of one ``vehicles`` page; a page of the wrong shape is transient (retried)."""
    data = await graphql_data(resp, what)
    conn = data.get("vehicles")
    if not isinstance(conn, dict):
        raise DimoTransientError(f"{what}: response lacks vehicles")
    try:
        vehicles = [_vehicle(n, client_id) for n in conn.get("nodes") or []]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DimoTransientError(f"{what}: a vehicle node lacks tokenId or has malformed fields") from None
    info = conn.get("pageInfo")
    return vehicles, info if isinstance(info, dict) else {}


async def discover_vehicles(
    service: Service, url: str, client_id: str, *, logger: logging.Logger | None = None
) -> list[VehicleInfo]:
    """All vehicles shared with ``client_id`` (Identity pages of 100, ``tokenId`` descending)."""
    log = logger or logging.getLogger(__name__)
    node_fields = _NODE_SACD
    out: list[VehicleInfo] = []
    after: str | None = None
    seen: set[str] = set()
    page = 1
    while True:
        query = _QUERY % (PAGE_SIZE, node_fields)
        what = f"DIMO identity vehicles page {page}"
        try:
            vehicles, info = await service.call(
                "POST",
                url,
                what=what,
                parse=functools.partial(_page, what=what, client_id=client_id),
                json={"query": query, "variables": {"lic": client_id, "after": after}},
            )
        except DimoQueryError as exc:
            if node_fields == _NODE_SACD and "sacd" in str(exc):
                log.info("identity API has no Vehicle.sacd(grantee:); falling back to sacds and filtering")
                node_fields = _NODE_SACDS
                continue
            raise
        out.extend(vehicles)
        page += 1
        after = info.get("endCursor")
        if not info.get("hasNextPage") or not after:
            break
        if after in seen:
            raise DimoQueryError(
                f"{what}: the identity API returned cursor {after!r} twice; pagination is broken"
            )
        seen.add(after)
    log.info("discovered %d vehicles shared with license %s", len(out), client_id)
    return out
