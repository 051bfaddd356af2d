"""Drive the emulator with DIMO's official Python SDK (dimo-python-sdk 1.8.0); runs inside its own venv.

Usage: ``python sdk_script.py CREDENTIALS_JSON``. Prints one JSON line with what each SDK call returned
(never the private key or full tokens). Only the standard library and ``dimo`` are imported here.
"""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from dimo import DIMO


def jwt_claims(token: str) -> dict[str, Any]:
    """The unverified payload of a JWT (the test checks signatures elsewhere)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def main(creds_path: str) -> dict[str, Any]:
    with open(creds_path, encoding="utf-8") as f:
        creds = json.load(f)
    base = creds["auth_url"]
    client_id = creds["client_id"]
    d = DIMO("Production")
    # a new dict: d.urls aliases the SDK's module-level environment table
    d.urls = {
        **d.urls,
        "Auth": base,
        "TokenExchange": base,
        "Identity": f"{base}/identity/query",
        "Telemetry": f"{base}/telemetry/query",
    }
    out: dict[str, Any] = {}

    dev = d.auth.get_dev_jwt(client_id=client_id, domain=creds["domain"], private_key=creds["private_key"])
    dev_jwt = dev["access_token"]
    claims = jwt_claims(dev_jwt)
    out["dev_jwt"] = {
        "token_type": dev["token_type"],
        "expires_in": dev["expires_in"],
        "ethereum_address": claims.get("ethereum_address"),
        "aud": claims.get("aud"),
        "lifetime": claims["exp"] - claims["iat"],
    }

    out["count"] = d.identity.count_dimo_vehicles()["data"]["vehicles"]["totalCount"]
    # identity.query takes no variables, so the address goes into the query text
    privileged = d.identity.query(
        f"""{{ vehicles(first: 100, filterBy: {{privileged: "{client_id}"}}) {{
              totalCount
              nodes {{ tokenId owner definition {{ make model year }} sacd(grantee: "{client_id}") {{ permissions }} }}
            }} }}"""
    )["data"]["vehicles"]
    out["privileged"] = {
        "totalCount": privileged["totalCount"],
        "ids": [n["tokenId"] for n in privileged["nodes"]],
    }
    token_id = privileged["nodes"][0]["tokenId"]
    out["token_id"] = token_id

    sacds = d.identity.check_vehicle_privileges(token_id)["data"]["vehicle"]["sacds"]["nodes"]
    out["sacds"] = sacds

    vehicle_jwt = d.token_exchange.exchange(developer_jwt=dev_jwt, token_id=token_id)["token"]
    vclaims = jwt_claims(vehicle_jwt)
    out["vehicle_jwt"] = {k: vclaims.get(k) for k in ("sub", "aud", "token_id", "privilege_ids", "asset")}
    out["vehicle_jwt"]["lifetime"] = vclaims["exp"] - vclaims["iat"]

    out["available"] = d.telemetry.available_signals(vehicle_jwt, token_id)["data"]["availableSignals"]
    out["latest"] = d.telemetry.get_signals_latest(vehicle_jwt, token_id)["data"]["signalsLatest"]

    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=3)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    daily = d.telemetry.get_daily_average_speed(vehicle_jwt, token_id, start.strftime(iso), end.strftime(iso))
    out["daily_avg_speed"] = daily["data"]["signals"]

    raw = d.telemetry.query(
        f"""{{ signals(tokenId: {token_id}, interval: "6h", from: "{start.strftime(iso)}", to: "{end.strftime(iso)}") {{
              timestamp maxSpeed: speed(agg: MAX) odo: powertrainTransmissionTravelledDistance(agg: LAST) }} }}""",
        vehicle_jwt,
    )
    out["signals_6h"] = raw["data"]["signals"]
    out["signals_errors"] = raw.get("errors")

    out["vin"] = d.telemetry.get_vehicle_vin_vc(vehicle_jwt, token_id)["data"]["vinVCLatest"]["vin"]
    # fields of the current telemetry-api schema, through the SDK's raw query
    current = d.telemetry.query(
        f"""{{ vinVCLatest(tokenId: {token_id}) {{ validFrom validTo }}
              dataSummary(tokenId: {token_id}) {{ availableSignals signalDataSummary {{ name firstSeen lastSeen }} }}
              signalsSnapshot(tokenId: {token_id}) {{ lastSeen signals {{ name }} }} }}""",
        vehicle_jwt,
    )
    out["current_schema"] = current.get("data")
    out["current_schema_errors"] = current.get("errors")
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
