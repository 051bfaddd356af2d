"""The SDK side of ``bench/ingest.py``: DIMO's official Python SDK fetching the same telemetry, one run.

Runs inside the SDK's own venv (``.venv-dimo-sdk``; only the standard library and ``dimo`` are imported).
Usage: ``python sdk_ingest.py CREDENTIALS_JSON PLAN_JSON``, where the plan is ``[{"token_id": int, "queries":
[str, ...]}, ...]``: the connector's telemetry queries with their variables written into the text, because
``Telemetry.query(query, vehicle_jwt)`` takes no variables. What an SDK user does, as its samples do, one call
at a time: a developer JWT, the license's vehicles from Identity, then per vehicle a token exchange and its
queries; each response stays a list of dicts. Prints one JSON line: ``seconds``, ``rows``, ``requests``.
"""

from __future__ import annotations

import json
import sys
import time

from dimo import DIMO


def run(creds: dict, plan: list[dict]) -> dict:
    """One timed pass over ``plan``; raises on any GraphQL error or a vehicle missing from Identity."""
    base = creds["auth_url"]
    client_id = creds["client_id"]
    t = time.perf_counter()
    d = DIMO("Production")
    d.urls = {  # a new dict: d.urls aliases the SDK's module-level environment table
        **d.urls,
        "Auth": base,
        "TokenExchange": base,
        "Identity": f"{base}/identity/query",
        "Telemetry": f"{base}/telemetry/query",
    }
    dev_jwt = d.auth.get_dev_jwt(
        client_id=client_id, domain=creds["domain"], private_key=creds["private_key"]
    )["access_token"]
    nodes = d.identity.query(
        f'{{ vehicles(first: 100, filterBy: {{privileged: "{client_id}"}}) {{ nodes {{ tokenId }} }} }}'
    )["data"]["vehicles"]["nodes"]
    known = {n["tokenId"] for n in nodes}
    rows = requests = 0
    for vehicle in plan:
        token_id = vehicle["token_id"]
        if token_id not in known:
            raise SystemExit(f"vehicle {token_id} is not among the license's first 100 vehicles in Identity")
        vehicle_jwt = d.token_exchange.exchange(developer_jwt=dev_jwt, token_id=token_id)["token"]
        for query in vehicle["queries"]:
            answer = d.telemetry.query(query, vehicle_jwt)
            requests += 1
            if answer.get("errors"):
                raise SystemExit(f"vehicle {token_id}: GraphQL errors {answer['errors']!r:.500}")
            rows += len(answer["data"]["signals"])
    return {"seconds": time.perf_counter() - t, "rows": rows, "requests": requests}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        credentials = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        queries = json.load(f)
    print(json.dumps(run(credentials, queries)))
