"""Emulator Identity GraphQL: paging, filters, lookups, SACDs, errors (over a real socket)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.dimo.emulator.identity import FleetIndex, global_id, id_to_cursor, page_desc
from connectors.dimo.privileges import decode_sacd_permissions
from connectors.dimo.settings import VEHICLE_NFT_PROD
from tests.support.emulator_auth import OWNER, STRANGER, Server, make_fleet

PAGE = """
query($lic: Address!, $first: Int, $after: String, $last: Int, $before: String) {
  vehicles(first: $first, after: $after, last: $last, before: $before, filterBy: {privileged: $lic}) {
    totalCount
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
    edges { cursor node { tokenId } }
    nodes { tokenId owner }
  }
}"""


def gql(s: Server, query: str, **variables: Any) -> tuple[int, dict[str, Any]]:
    with s.client() as c:
        r = c.post("/identity/query", json={"query": query, "variables": variables})
    return r.status_code, r.json()


def privileged_ids(s: Server) -> list[int]:
    """Expected: vehicles owned by the license, or with an unexpired grant to it (tokenId DESC)."""
    now = datetime.now(UTC)
    lic = s.state.license.client_id
    return sorted((t for t, v in s.state.fleet.vehicles.items() if v.privileges_for(lic, now)), reverse=True)


def test_privileged_paging_walks_all_pages_in_desc_order(srv: Server) -> None:
    lic = srv.state.license.client_id.lower()
    expected = privileged_ids(srv)
    assert len(expected) == 7  # 12 vehicles: 4 never shared, 1 expired
    seen: list[int] = []
    after = None
    pages = 0
    while True:
        status, body = gql(srv, PAGE, lic=lic, first=3, after=after)
        assert status == 200 and "errors" not in body, body
        conn = body["data"]["vehicles"]
        assert conn["totalCount"] == 7
        ids = [n["tokenId"] for n in conn["nodes"]]
        assert ids == [e["node"]["tokenId"] for e in conn["edges"]]
        assert [e["cursor"] for e in conn["edges"]] == [id_to_cursor(t) for t in ids]
        assert conn["pageInfo"]["hasPreviousPage"] is (after is not None)
        assert conn["pageInfo"]["startCursor"] == id_to_cursor(ids[0])
        seen += ids
        pages += 1
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
    assert seen == expected and pages == 3


def test_cursor_semantics_after_before_last(srv: Server) -> None:
    lic = srv.state.license.client_id
    cur = base64.b64encode(b"50").decode()
    _, body = gql(srv, PAGE, lic=lic, first=100, after=cur)
    assert [n["tokenId"] for n in body["data"]["vehicles"]["nodes"]] == [40, 10]
    _, body = gql(srv, PAGE, lic=lic, first=2, before=cur)
    conn = body["data"]["vehicles"]
    assert [n["tokenId"] for n in conn["nodes"]] == [110, 100]
    assert conn["pageInfo"]["hasNextPage"] is True and conn["pageInfo"]["hasPreviousPage"] is False
    _, body = gql(srv, PAGE, lic=lic, last=2, before=cur)
    conn = body["data"]["vehicles"]
    assert [n["tokenId"] for n in conn["nodes"]] == [80, 70]
    assert conn["pageInfo"]["hasPreviousPage"] is True
    _, body = gql(srv, PAGE, lic=lic, first=0)
    assert (
        body["data"]["vehicles"]["nodes"] == []
        and body["data"]["vehicles"]["pageInfo"]["hasNextPage"] is True
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"first": 101}, "the value 101 for `first` exceeds the limit 100"),
        ({"last": 500}, "the value 500 for `last` exceeds the limit 100"),
        ({}, "provide `first` or `last`"),
        ({"first": 1, "last": 1}, "pass `first` or `last`, but not both"),
        ({"first": -1}, "the value for `first` cannot be negative"),
        ({"first": 1, "after": "%%%"}, None),
    ],
)
def test_page_size_errors(srv: Server, args: dict[str, Any], message: str | None) -> None:
    status, body = gql(srv, PAGE, lic=srv.state.license.client_id, **args)
    assert status == 200 and body["data"] is None
    assert body["errors"][0]["path"] == ["vehicles"]
    if message:
        assert body["errors"][0]["message"] == message


def test_vehicle_lookup_fields_and_not_found(srv: Server) -> None:
    lic = srv.state.license.client_id
    q = """query($id: Int, $did: String, $g: Address!) { vehicle(tokenId: $id, tokenDID: $did) {
      id tokenId tokenDID owner mintedAt name imageURI dcn { name } earnings { totalTokens }
      definition { id make model year } manufacturer { tokenId name }
      aftermarketDevice { tokenId address serial manufacturer { name } }
      syntheticDevice { tokenId address integrationId }
      sacd(grantee: $g) { permissions grantee createdAt expiresAt source } } }"""
    status, body = gql(srv, q, id=10, g=lic.lower())
    assert status == 200 and "errors" not in body, body
    v = body["data"]["vehicle"]
    assert v["id"] == global_id("V", 10) and v["tokenDID"] == f"did:erc721:137:{VEHICLE_NFT_PROD}:10"
    assert v["owner"] == OWNER and v["mintedAt"] == "2026-01-02T00:00:00Z" and v["name"] == "word1 alpha beta"
    assert v["definition"]["make"] == "Tesla" and v["manufacturer"] == {"tokenId": 137, "name": "Tesla"}
    assert v["aftermarketDevice"]["manufacturer"]["name"] == "AutoPi" and v["syntheticDevice"] is None
    assert v["dcn"] is None and v["earnings"] is None
    assert v["sacd"]["grantee"] == lic and decode_sacd_permissions(v["sacd"]["permissions"]) == [1, 3, 4, 8]
    assert v["sacd"]["expiresAt"] == "2099-01-01T00:00:00Z"

    _, body = gql(srv, q, did=f"did:erc721:137:{VEHICLE_NFT_PROD}:40", g=STRANGER)
    v = body["data"]["vehicle"]
    assert v["tokenId"] == 40 and v["sacd"] is None and v["syntheticDevice"]["tokenId"] == 2004

    status, body = gql(srv, q, id=12345, g=lic)
    # identity-api (graph/vehicle.resolvers.go): `vehicle` is nullable; null plus a NOT_FOUND error.
    assert status == 200 and body["data"] == {"vehicle": None}
    err = body["errors"][0]
    assert err["message"] == "No vehicle with token id 12345." and err["path"] == ["vehicle"]
    assert err["extensions"]["code"] == "NOT_FOUND"
    _, body = gql(srv, q, did=f"did:erc721:137:{VEHICLE_NFT_PROD}:999", g=lic)
    assert body["data"] == {"vehicle": None}
    assert body["errors"][0]["message"] == f'No vehicle with DID "did:erc721:137:{VEHICLE_NFT_PROD}:999".'
    _, body = gql(srv, q, id=10, did="did:erc721:137:0x0:1", g=lic)
    assert body["errors"][0]["message"] == "provide exactly one of `tokenID` or `tokenDID`"


def test_sacds_decode_back_to_grant_ids(srv: Server) -> None:
    q = """{ vehicles(first: 100) { nodes { tokenId
      sacds(first: 100) { totalCount nodes { grantee permissions createdAt expiresAt source } }
      privileges(first: 100) { nodes { id setAt expiresAt } } } } }"""
    status, body = gql(srv, q)
    assert status == 200 and "errors" not in body, body
    lic = srv.state.license.client_id
    by_id = {n["tokenId"]: n for n in body["data"]["vehicles"]["nodes"]}
    assert len(by_id) == 12
    for tid, vehicle in srv.state.fleet.vehicles.items():
        active = [g for g in vehicle.grants if g.expires_at > datetime.now(UTC)]
        sacds = by_id[tid]["sacds"]
        assert sacds["totalCount"] == len(active)
        for node, grant in zip(sacds["nodes"], active, strict=True):
            assert node["grantee"] == lic
            assert decode_sacd_permissions(node["permissions"]) == sorted(grant.permissions)
        assert sorted(p["id"] for p in by_id[tid]["privileges"]["nodes"]) == sorted(
            p for g in active for p in g.permissions
        )


def test_filters_owner_make_year_and_count(srv: Server) -> None:
    q = """query($f: VehiclesFilter) { vehicles(first: 100, filterBy: $f) { totalCount nodes { tokenId } } }"""
    fleet = srv.state.fleet.vehicles

    def ids(f: dict[str, Any] | None) -> list[int]:
        status, body = gql(srv, q, f=f)
        assert status == 200 and "errors" not in body, body
        conn = body["data"]["vehicles"]
        assert conn["totalCount"] == len(conn["nodes"])
        return [n["tokenId"] for n in conn["nodes"]]

    assert ids(None) == sorted(fleet, reverse=True)
    assert ids({"owner": STRANGER.upper().replace("0X", "0x")}) == [30]
    assert ids({"make": "Ford"}) == [t for t in sorted(fleet, reverse=True) if fleet[t].make == "Ford"]
    assert ids({"make": "Ford", "year": 2022, "privileged": srv.state.license.client_id}) == [
        t for t in privileged_ids(srv) if fleet[t].make == "Ford" and fleet[t].year == 2022
    ]
    assert ids({"owner": OWNER, "manufacturerTokenId": 137, "privileged": STRANGER}) == []
    # connection: vehicles whose synthetic device belongs to the connection at that address
    paired = [t for t in sorted(fleet, reverse=True) if fleet[t].synthetic_device_id is not None]
    assert paired, "the fleet needs a vehicle with a synthetic device"
    address = fleet[paired[0]].source.rsplit(":", 1)[1]
    want = [t for t in paired if fleet[t].source.rsplit(":", 1)[1].lower() == address.lower()]
    assert ids({"connection": address.upper().replace("0X", "0x")}) == want
    assert ids({"connection": STRANGER}) == []


def test_developer_license_rewards_and_bad_address(srv: Server) -> None:
    lic = srv.state.license
    q = """query($c: Address!) { developerLicense(by: {clientId: $c}) { tokenId clientId alias owner
      signers { nodes { address enabledAt } } redirectURIs { totalCount nodes { uri } } }
      rewards(user: $c) { totalTokens } }"""
    status, body = gql(srv, q, c=lic.client_id.lower())
    assert status == 200 and "errors" not in body, body
    d = body["data"]["developerLicense"]
    assert d["clientId"] == lic.client_id and d["alias"] == lic.alias
    assert [s["address"] for s in d["signers"]["nodes"]] == list(lic.signers)
    assert d["redirectURIs"]["nodes"] == [{"uri": lic.domain}] and body["data"]["rewards"] is None

    other = "0x" + "12" * 20
    status, body = gql(srv, q, c=other)
    # identity-api: `developerLicense` is nullable; an unknown license is null plus a NOT_FOUND error.
    assert status == 200 and body["data"]["developerLicense"] is None
    assert body["errors"][0]["message"] == f"No developer license with client id {other}."
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    status, body = gql(srv, q, c="0xnot-an-address")
    assert status == 422 and body["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    status, body = gql(srv, "{ vehicles(first: 1) { bogus } }")
    assert status == 422 and body["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    with srv.client() as c:
        r = c.get("/identity/query", params={"query": "{ vehicles(first: 2) { totalCount } }"})
    assert r.status_code == 200 and r.json()["data"]["vehicles"]["totalCount"] == 12


def test_global_id_and_index_paging_on_a_large_fleet() -> None:
    assert global_id("V", 21957) == "V_kc1VxQ==" and global_id("V", 5) == "V_kQU="
    fleet = make_fleet(2000)
    idx = FleetIndex(fleet)
    lic = fleet.license.client_id
    ids, neg = idx.select({"privileged": lic}, datetime.now(UTC))
    expected = sorted(
        (t for t, v in fleet.vehicles.items() if v.privileges_for(lic, datetime.now(UTC))), reverse=True
    )
    assert ids == expected
    walked, after = [], None
    while True:
        page = page_desc(ids, neg, 100, after, None, None)
        walked += page.ids
        if not page.has_next:
            break
        after = page.ids[-1]
    assert walked == expected


def test_index_cache_follows_grant_expiry_and_exact_make() -> None:
    fleet = make_fleet(30)
    idx = FleetIndex(fleet)
    lic = fleet.license.client_id
    now = datetime.now(UTC)
    assert len(idx.select({"privileged": lic}, now)[0]) == 19
    assert (
        idx.select({"privileged": lic.lower()}, now)[0] is idx.select({"privileged": lic}, now)[0]
    )  # cached
    assert idx.select({"privileged": lic}, datetime(2099, 1, 2, tzinfo=UTC))[0] == []  # all grants expired
    assert idx.select({"make": "ford"}, now)[0] == [] and len(idx.select({"make": "Ford"}, now)[0]) == 15
