"""The invoke forms a caller can use, on the in-process gateway with real bundles of real trained models:
engineered rows (unchanged), raw telemetry rows (DIMO signal names and units) derived by the families' own
feature code — the served prediction equals the batch scorer's on the same rows — and a range plan filled
from fleet defaults; every example of the OpenAPI document works as is; error hints say what to send.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from eth_account.signers.local import LocalAccount

from gpu_jobs.models import features as F
from gpu_jobs.registry import load_family
from serving.bundle import Bundle
from tests.support.fleet_data import FleetData
from tests.support.gateway import check_openapi_examples, err, registry, serving, settings_for
from tests.support.model_ctx import make_ctx

BIG = {"max_body_bytes": 16 * 2**20}


def telemetry_json(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Telemetry table rows as a caller sends them: RFC 3339 times, DIMO names, null where not reported."""
    out = []
    for r in df.iter_rows(named=True):
        r["timestamp"] = r["timestamp"].isoformat().replace("+00:00", "Z")
        out.append(r)
    return out


def vehicles(fleet: FleetData, powertrains: list[str], hours: float | None = None) -> pl.DataFrame:
    """The first vehicle of each powertrain in ``powertrains`` (repeats: the next one), optionally only their
    first ``hours``, as a conformed telemetry frame sorted like the store."""
    table = F.read_telemetry(fleet.telemetry)
    kinds = table.group_by("token_id").agg(pl.col(F.POWERTRAIN).drop_nulls().first()).sort("token_id")
    ids: list[int] = []
    for pt in powertrains:
        ids.append(kinds.filter((pl.col(F.POWERTRAIN) == pt) & ~pl.col("token_id").is_in(ids))["token_id"][0])
    df = table.filter(pl.col("token_id").is_in(ids))
    if hours is not None:
        start = df["timestamp"].min()
        df = df.filter(pl.col("timestamp") < pl.lit(start) + pl.duration(minutes=int(hours * 60)))
    return df.sort(F.KEYS)


def batch_scores(tmp: Path, family: str, artifact: Path, df: pl.DataFrame) -> Path:
    """The family's ``infer`` job (the batch scorer) over ``df`` written as a Parquet dataset: its predictions."""
    (tmp / "data").mkdir()
    df.write_parquet(tmp / "data" / "rows.parquet")
    return load_family(family).infer(make_ctx(tmp, [tmp / "data"], family), artifact).output


def _iso(v: Any) -> str:
    return v.isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------- skew


async def test_range_on_raw_telemetry_equals_the_batch_scorer(
    tmp_path: Path,
    publisher: LocalAccount,
    range_bundle: Bundle,
    range_artifact: Path,
    serving_fleet: FleetData,
) -> None:
    df = vehicles(serving_fleet, [F.ELECTRIC, F.ELECTRIC])
    want = pl.read_parquet(batch_scores(tmp_path, "range", range_artifact, df)).sort("token_id", "start")
    assert want.height >= 4 and want["token_id"].n_unique() == 2
    assert (want["vehicle_factor"] - 1.0).abs().max() > 1e-3  # earlier trips calibrate later ones
    registry(tmp_path / "reg", publisher, range_bundle)
    async with serving(settings_for(tmp_path / "reg", publisher, **BIG)) as (_, client):
        r = await client.post("/v1/functions/range-fn/invoke", json={"telemetry": telemetry_json(df)})
    assert r.status_code == 200, r.text[:500]
    got = r.json()["outputs"]
    assert len(got) == want.height
    for g, w in zip(got, want.iter_rows(named=True), strict=True):
        trip = g["trip"]
        assert (trip["token_id"], trip["start"], trip["end"]) == (
            w["token_id"],
            _iso(w["start"]),
            _iso(w["end"]),
        )
        assert trip["km"] == pytest.approx(w["km"], rel=1e-12)
        assert g["kwh_per_100km"] == pytest.approx(w["predicted_kwh_per_100km"], rel=1e-5)
        if not isinstance(w["range_km"], float) or not math.isfinite(w["range_km"]):
            assert g["range_km"] is None
        else:
            assert g["range_km"] == pytest.approx(w["range_km"], rel=1e-5)
        measured = w["kwh_per_100km"]
        assert trip["measured_kwh_per_100km"] == (pytest.approx(measured) if measured is not None else None)
        assert trip["features"]["vehicle_factor"] == pytest.approx(w["vehicle_factor"], rel=1e-9)


async def test_anomaly_on_raw_telemetry_equals_the_batch_scorer(
    tmp_path: Path,
    publisher: LocalAccount,
    anomaly_bundle: Bundle,
    anomaly_artifact: Path,
    serving_fleet: FleetData,
) -> None:
    df = vehicles(serving_fleet, [F.ELECTRIC, F.COMBUSTION], hours=12)
    scored = batch_scores(tmp_path, "anomaly", anomaly_artifact, df)
    want = pl.read_parquet(scored).sort("token_id", "window_start")
    assert want.height >= 30 and set(want["powertrain"]) == {F.ELECTRIC, F.COMBUSTION}
    registry(tmp_path / "reg", publisher, anomaly_bundle)
    async with serving(settings_for(tmp_path / "reg", publisher, **BIG)) as (_, client):
        r = await client.post("/v1/functions/anomaly-fn/invoke", json={"telemetry": telemetry_json(df)})
    assert r.status_code == 200, r.text[:500]
    got = r.json()["outputs"]
    assert len(got) == want.height
    for g, w in zip(got, want.iter_rows(named=True), strict=True):
        win = g["window"]
        assert (win["token_id"], win["start"], win["end"], win["powertrain"], win["rows"]) == (
            w["token_id"], _iso(w["window_start"]), _iso(w["window_end"]), w["powertrain"], w["rows"]
        )  # fmt: skip
        assert g["score"] == pytest.approx(w["score"], rel=1e-5, abs=1e-6)
        assert g["threshold"] == pytest.approx(w["threshold"], rel=1e-9)
        assert g["flagged"] == w["flagged"]


# ----------------------------------------------------------------------------------------------- OpenAPI


async def test_every_openapi_example_works_as_is(
    tmp_path: Path, publisher: LocalAccount, range_bundle: Bundle, anomaly_bundle: Bundle
) -> None:
    registry(tmp_path, publisher, range_bundle, anomaly_bundle)
    async with serving(settings_for(tmp_path, publisher)) as (_, client):
        await check_openapi_examples(
            client, {"range-fn": {"inputs", "telemetry", "plan"}, "anomaly-fn": {"inputs", "telemetry"}}
        )


# ----------------------------------------------------------------------------------------------- plan


async def test_a_plan_is_the_engineered_row_it_assumes(
    tmp_path: Path, publisher: LocalAccount, range_bundle: Bundle
) -> None:
    registry(tmp_path, publisher, range_bundle)
    url = "/v1/functions/range-fn/invoke"
    async with serving(settings_for(tmp_path, publisher)) as (_, client):
        r = await client.post(url, json={"plan": {"km": 120, "mean_speed": 100, "air": -5, "soc": 50}})
        assert r.status_code == 200, r.text
        body = r.json()
        assumed = body["assumed"]
        assert set(assumed) == {"hours_per_100km", "v3_over_v", "kinetic_per_km", "stop_share", "battery_temp",
                                "usable_kwh"}  # fmt: skip
        assert assumed["hours_per_100km"] == 1.0 and assumed["usable_kwh"] == 60.0
        slow = (await client.post(url, json={"plan": {"km": 120, "mean_speed": 50}})).json()["assumed"]
        assert slow["v3_over_v"] == pytest.approx(assumed["v3_over_v"] / 4, rel=1e-3)  # ∝ mean_speed²
        assert slow["hours_per_100km"] == 2.0 and "usable_kwh" not in slow
        # the plan answers exactly what its engineered row answers
        row = {"km": 120, "mean_speed": 100, "air": -5, "soc": 50, **assumed}
        same = (await client.post(url, json={"inputs": [row]})).json()["outputs"][0]
        assert body["outputs"] == [same]
        kwh = same["kwh_per_100km"]
        assert same["range_km"] == pytest.approx(0.5 * 60.0 / kwh * 100.0, rel=1e-9)
        bare = (await client.post(url, json={"plan": {"km": 10}})).json()
        assert bare["outputs"][0]["range_km"] is None and "mean_speed" in bare["assumed"]


# ----------------------------------------------------------------------------------------------- hints


async def test_error_hints_say_what_to_send(
    tmp_path: Path, publisher: LocalAccount, range_bundle: Bundle, anomaly_bundle: Bundle
) -> None:
    registry(tmp_path, publisher, range_bundle, anomaly_bundle)
    row = range_bundle.manifest.example[1]
    t0 = {"token_id": 1, "timestamp": "2026-05-04T08:00:00Z", "speed": 10.0}
    cases: list[tuple[str, Any, str, list[str]]] = [
        ("range-fn", {}, "inputs", ['{"inputs": [row, …]}', '{"telemetry"', '{"plan"']),
        ("range-fn", {"inputs": [{k: v for k, v in row.items() if k != "km"}]}, "inputs[0].km",
         ["missing", "(0, 2000] km", "e.g. "]),
        ("range-fn", {"inputs": [{**row, "stop_share": 2}]}, "inputs[0].stop_share",
         ["outside the accepted range", "[0, 1]", "e.g. "]),
        ("range-fn", {"inputs": [{**row, "air": "cold"}]}, "inputs[0].air",
         ["expected a number", "[-90, 70] celsius", "e.g. "]),
        ("range-fn", {"telemetry": [{**t0, "speed": "fast"}]}, "telemetry[0].speed",
         ["expected a number", "[0, 400] km/h", "e.g. 48"]),
        ("range-fn", {"telemetry": [t0, {"speed": 3}]}, "telemetry[1].timestamp",
         ["missing", "RFC 3339", '"2026-05-04T08:00:00Z"']),
        ("range-fn", {"telemetry": [{**t0, "sped": 3}]}, "telemetry[0].sped", ["did you mean speed?"]),
        ("range-fn", {"telemetry": [t0, {**t0, "speed": 12.0}]}, "telemetry[1].timestamp",
         ["same vehicle and time as telemetry[0]"]),
        ("range-fn", {"telemetry": [t0]}, "telemetry", ['powertrainType "ELECTRIC"']),
        ("range-fn", {"telemetry": [{**t0, "powertrainType": "ELECTRIC", "powertrainTractionBatteryGrossCapacity": 64,
                                     "powertrainTransmissionTravelledDistance": 100.0}]},
         "telemetry", ["covers 2 km", "powertrainTransmissionTravelledDistance"]),
        ("range-fn", {"plan": {"mean_speed": 80}}, "plan.km", ["missing", "(0, 2000] km", "e.g. "]),
        ("range-fn", {"plan": {"km": 100, "air": 200}}, "plan.air", ["outside", "[-90, 70] celsius", "e.g. "]),
        ("range-fn", {"plan": {"km": 100, "speed": 80}}, "plan.speed", ["unexpected field", "mean_speed"]),
        ("range-fn", {"plan": [1]}, "plan", ["expected an object", '"km": 120']),
        ("anomaly-fn", {"plan": {"km": 100}}, "plan", ['{"inputs": …} or {"telemetry": …}', "/openapi.json"]),
        ("anomaly-fn", {"telemetry": [{**t0, "powertrainType": "ELECTRIC"}]}, "telemetry",
         ["30 min", "at least 10 rows", "fullest window here has 1 row"]),
        ("anomaly-fn", {"inputs": [{"powertrain": "ELECTRIC", "parked_share": 0.5, "moving_share": 0.5}]},
         "inputs[0].charging_share", ["missing", "[0, 1]", "e.g. "]),
    ]  # fmt: skip
    async with serving(settings_for(tmp_path, publisher)) as (_, client):
        for fn, body, field, words in cases:
            r = await client.post(f"/v1/functions/{fn}/invoke", json=body)
            assert r.status_code == 422, (body, r.text)
            e = err(r)
            assert e["field"] == field, (body, e)
            for w in words:
                assert w in e["message"], (w, e["message"])
        # the rows form answers as before: the same fields, nothing added
        r = await client.post("/v1/functions/range-fn/invoke", json={"inputs": [row]})
        assert set(r.json()) == {"function", "version", "outputs"}
        assert set(r.json()["outputs"][0]) == {"kwh_per_100km", "range_km"}
