"""The families' other request forms without a gateway: raw telemetry rows → the telemetry frame the training
feature code reads (order, nulls, vehicles), and the predictor's ``invoke`` on each form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from gpu_jobs.errors import InvalidInput
from gpu_jobs.models import features as F
from gpu_jobs.models import raw as R
from gpu_jobs.models.online import Predictor, load_predictor
from gpu_jobs.models.range import features as RF


@pytest.fixture(scope="module")
def range_pred(range_artifact: Path) -> Predictor:
    return load_predictor(range_artifact)


def test_telemetry_rows_become_the_conformed_table() -> None:
    rows: list[dict[str, Any]] = [
        {"token_id": 5, "timestamp": "2026-05-04T08:01:00+02:00", "speed": 10, "powertrainType": "ELECTRIC"},
        {"token_id": 5, "timestamp": "2026-05-04T06:00:00Z", "speed": None},
        {"timestamp": "2026-05-04T07:00:00Z", F.SOC: 55.5},
    ]
    df = R.TelemetryRows().parse(rows)
    assert set(df.columns) == {*F.KEYS, *F.SIGNALS}
    assert df["token_id"].to_list() == [-1, 5, 5]  # sorted by (token_id, timestamp); no token_id → -1
    assert [t.isoformat() for t in df["timestamp"]] == [
        "2026-05-04T07:00:00+00:00", "2026-05-04T06:00:00+00:00", "2026-05-04T06:01:00+00:00"
    ]  # fmt: skip
    assert df[F.SPEED].to_list() == [None, None, 10.0]  # null, not NaN: the feature code fills nulls
    assert df[F.SOC].to_list() == [55.5, None, None] and df[F.POWERTRAIN].to_list() == [
        None,
        None,
        "ELECTRIC",
    ]
    assert R.token_out(-1) is None and R.token_out(5) == 5


@pytest.mark.parametrize(
    ("rows", "field", "words"),
    [
        ("x", "telemetry", ["expected an array"]),
        ([], "telemetry", ["empty"]),
        ([{"timestamp": "2026-05-04T08:00:00Z", "token_id": "a"}], "telemetry[0].token_id", ["e.g. 17"]),
        ([{"timestamp": "1900-01-01T00:00:00Z"}], "telemetry[0].timestamp", ["between 1970 and 2200"]),
        ([{"timestamp": "2026-05-04T08:00:00Z", "speed": -3}], "telemetry[0].speed", ["[0, 400] km/h"]),
        ([{"timestamp": "2026-05-04T08:00:00Z", "powertrainType": "DIESEL"}], "telemetry[0].powertrainType",
         ["'ELECTRIC'"]),
        ([{"timestamp": "2026-05-04T08:00:00Z", "latitude": 1.0}], "telemetry[0].latitude", ["unexpected"]),
        ([{"timestamp": "2026-05-04T08:00:00Z", "obdDTCList": "P0100"}], "telemetry[0].obdDTCList",
         ["does not read the DIMO signal"]),
    ],
)  # fmt: skip
def test_bad_telemetry_rows_name_the_field(rows: Any, field: str, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        R.TelemetryRows().parse(rows)
    assert e.value.field == field
    for w in words:
        assert w in str(e.value)


def test_range_telemetry_form_uses_the_training_trips(range_pred: Predictor, serving_fleet: Any) -> None:
    table = F.read_telemetry(serving_fleet.telemetry)
    ev = table.filter(pl.col(F.POWERTRAIN) == F.ELECTRIC)["token_id"][0]
    df = table.filter(pl.col("token_id") == ev)
    rows = [{**r, "timestamp": r["timestamp"].isoformat()} for r in df.iter_rows(named=True)]
    out = range_pred.invoke({"telemetry": rows[::-1]})["outputs"]  # any order: rows are sorted first
    trips = RF.trip_windows(df).sort("start")
    assert len(out) == trips.height > 1
    for o, t in zip(out, trips.iter_rows(named=True), strict=True):
        feats = o["trip"]["features"]
        for name in ("km", "mean_speed", "v3_over_v", "hours_per_100km", "kinetic_per_km", "stop_share"):
            assert feats[name] == t[name]
        # the engineered row the trip became answers the same through the rows form
        again = range_pred.invoke({"inputs": [feats]})["outputs"][0]
        assert again["kwh_per_100km"] == pytest.approx(o["kwh_per_100km"], rel=1e-6)
    assert np.isfinite([o["kwh_per_100km"] for o in out]).all()
