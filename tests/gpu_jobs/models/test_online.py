"""Online predictors on REAL models (trained on a tiny real fleet by tests/support/serving.py): the same
numbers as the batch scorers, strict validation naming ``inputs[i].field``, schemas that agree with it."""

from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pytest
from jsonschema import Draft202012Validator

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.errors import ArtifactIntegrityError, InvalidInput
from gpu_jobs.models import anomaly as A
from gpu_jobs.models import features as F
from gpu_jobs.models import range as R
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.online import Predictor, load_predictor, predictor_from
from gpu_jobs.models.range import features as RF
from tests.support.fleet_data import FleetData, build_fleet_data
from tests.support.serving import ANOMALY_HP, RANGE_HP, SERVING_FLEET, train_artifact

# The serving tests' tiny real fleet and models (tests/support/serving.py), built once for this module.


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("online_fleet"), **SERVING_FLEET)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def table(fleet: FleetData) -> pl.DataFrame:
    return F.read_telemetry(fleet.telemetry)


@pytest.fixture(scope="module")
def range_artifact(fleet: FleetData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_artifact(
        tmp_path_factory.mktemp("online_range") / "model", "range", [fleet.telemetry], RANGE_HP, seed=1
    )


@pytest.fixture(scope="module")
def anomaly_artifact(fleet: FleetData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_artifact(
        tmp_path_factory.mktemp("online_anom") / "model", "anomaly", [fleet.telemetry], ANOMALY_HP
    )


@pytest.fixture(scope="module")
def range_pred(range_artifact: Path) -> Predictor:
    return load_predictor(range_artifact)


@pytest.fixture(scope="module")
def anomaly_pred(anomaly_artifact: Path) -> Predictor:
    return load_predictor(anomaly_artifact)


def json_rows(frame: pl.DataFrame, names: list[str]) -> list[dict[str, Any]]:
    """Rows as a client would send them (through real JSON): NaN/null → absent."""
    rows = frame.select(names).fill_nan(None).to_dicts()
    return orjson.loads(orjson.dumps([{k: v for k, v in r.items() if v is not None} for r in rows]))


# ------------------------------------------------------------------------------------- same numbers


def test_range_matches_batch_scorers(
    range_artifact: Path, range_pred: Predictor, table: pl.DataFrame
) -> None:
    art = load_artifact(range_artifact)
    cfg = art.model_config  # as read back: norm keys sorted
    net = R.net_from_config(cfg, art.state_dict)
    trips = RF.trip_windows(table).sort("token_id", "start")
    assert trips.height >= 10
    inputs = [n for n in cfg["norm"] if n != "cold"]  # cold is derived from air
    out = range_pred.predict(range_pred.columns(json_rows(trips, inputs)))
    np.testing.assert_allclose(out["kwh_per_100km"], R.fleet_predict(net, cfg, trips), rtol=1e-5)
    assert np.isnan(out["range_km"]).all(), "no soc/usable_kwh → no range"

    # with the per-vehicle calibration's factor and the trip's end state: predict_trips' numbers
    batch = R.predict_trips(net, cfg, trips, R.calibration(cfg))
    rows = json_rows(batch.rename({"soc_end": "soc"}), [*inputs, "soc", "usable_kwh", "vehicle_factor"])
    got = range_pred.predict(range_pred.columns(rows))
    np.testing.assert_allclose(got["kwh_per_100km"], batch["predicted_kwh_per_100km"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["range_km"], batch["range_km"].to_numpy(), rtol=1e-5)


def test_anomaly_matches_batch_scorer(
    anomaly_artifact: Path, anomaly_pred: Predictor, table: pl.DataFrame
) -> None:
    art = load_artifact(anomaly_artifact)
    cfg = art.model_config  # as read back: norm keys sorted
    net = A.build_net(cfg, art.state_dict)
    windows = AF.anomaly_windows(table, window_minutes=int(cfg["hyperparameters"]["window_minutes"]))
    windows = windows.filter(pl.col("powertrain").is_in(list(cfg["norm"]))).sort("token_id", "window_start")
    assert set(windows["powertrain"]) == {"ELECTRIC", "COMBUSTION"}
    batch = A.score_windows(net, cfg, windows)
    rows = []
    for r in windows.to_dicts():  # each row carries only its own type's features
        feats = cfg["norm"][r["powertrain"]]
        rows.append({"powertrain": r["powertrain"], **{k: r[k] for k in feats if r[k] is not None}})
    rows = orjson.loads(orjson.dumps(rows))
    out = anomaly_pred.predict(anomaly_pred.columns(rows))  # both types in one request
    np.testing.assert_allclose(out["score"], batch["score"].to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out["threshold"], batch["threshold"].to_numpy())
    same = np.isclose(out["score"], out["threshold"], rtol=1e-5)  # a tie may flip on the last ulp
    np.testing.assert_array_equal(out["flagged"][~same], batch["flagged"].to_numpy()[~same])
    assert 0 < out["flagged"].sum() < len(rows), "some windows flagged, most not"

    ev = [i for i, r in enumerate(rows) if r["powertrain"] == "ELECTRIC"]  # one type per request
    one = anomaly_pred.predict(anomaly_pred.columns([rows[i] for i in ev]))
    np.testing.assert_allclose(one["score"], out["score"][ev], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- schemas, rows


@pytest.mark.parametrize("which", ["range", "anomaly"])
def test_schemas_describe_inputs_and_outputs(
    which: str, range_pred: Predictor, anomaly_pred: Predictor
) -> None:
    pred = range_pred if which == "range" else anomaly_pred
    Draft202012Validator.check_schema(pred.input_schema)
    Draft202012Validator.check_schema(pred.output_schema)
    ins, outs = Draft202012Validator(pred.input_schema), Draft202012Validator(pred.output_schema)
    assert pred.example and all(ins.is_valid(r) for r in pred.example)
    rows = pred(pred.example)
    assert len(rows) == len(pred.example) and all(outs.is_valid(r) for r in rows)
    assert orjson.loads(orjson.dumps(rows)) == rows
    variants = pred.input_schema.get("oneOf", [pred.input_schema])
    for v in variants:
        assert v["additionalProperties"] is False and v["required"]
        for name, prop in v["properties"].items():
            if name != "powertrain":
                assert prop["x-unit"] and prop["description"].endswith(
                    ("]", "(the model uses the training centre)", "= 1.0")
                ), name


def test_range_schema_fields(range_pred: Predictor) -> None:
    s = range_pred.input_schema
    assert "cold" not in s["properties"], "derived from air"
    assert set(s["required"]) == {
        "km",
        "mean_speed",
        "v3_over_v",
        "hours_per_100km",
        "kinetic_per_km",
        "stop_share",
    }
    assert {"air", "battery_temp", "soc", "usable_kwh", "vehicle_factor"} <= set(s["properties"])
    assert s["properties"]["air"]["type"] == ["number", "null"]
    assert s["properties"]["km"]["x-unit"] == "km" and s["properties"]["soc"]["x-unit"] == "percent"
    assert set(range_pred.output_schema["properties"]) == {"kwh_per_100km", "range_km"}


def test_anomaly_schema_has_one_variant_per_powertrain(anomaly_pred: Predictor) -> None:
    variants = {v["properties"]["powertrain"]["const"]: v for v in anomaly_pred.input_schema["oneOf"]}
    assert set(variants) == {"ELECTRIC", "COMBUSTION"}
    assert set(variants["ELECTRIC"]["properties"]) - {"powertrain"} == set(AF.ANOMALY_FEATURES["ELECTRIC"])
    assert "coolant_excess" in variants["COMBUSTION"]["properties"]
    assert set(anomaly_pred.output_schema["properties"]) == {"score", "threshold", "flagged"}


def test_rows_are_json_with_nulls(range_pred: Predictor) -> None:
    base = dict(range_pred.example[1])
    rows = range_pred([base, {**base, "soc": 50.0, "usable_kwh": 70.0}, {**base, "vehicle_factor": 1.0}])
    assert rows[0]["range_km"] is None and isinstance(rows[1]["range_km"], float)
    assert rows[2] == rows[0], "vehicle_factor defaults to 1"
    assert rows[1]["range_km"] == pytest.approx(0.5 * 70.0 / rows[1]["kwh_per_100km"] * 100.0)
    assert type(rows[0]["kwh_per_100km"]) is float
    doubled = range_pred([{**base, "vehicle_factor": 2.0}])
    assert doubled[0]["kwh_per_100km"] == pytest.approx(2 * rows[0]["kwh_per_100km"])


def test_optional_features_absent_or_null(range_pred: Predictor, anomaly_pred: Predictor) -> None:
    base = dict(range_pred.example[1])
    absent = {k: v for k, v in base.items() if k not in ("air", "battery_temp")}
    assert range_pred([absent]) == range_pred([{**absent, "air": None, "battery_temp": None}])
    ev = next(r for r in anomaly_pred.example if r["powertrain"] == "ELECTRIC")
    bare = {k: ev[k] for k in ("powertrain", "parked_share", "moving_share", "charging_share")}
    out = anomaly_pred([bare])
    assert math.isfinite(out[0]["score"]) and type(out[0]["flagged"]) is bool


def test_extreme_valid_inputs_give_finite_outputs(range_pred: Predictor, anomaly_pred: Predictor) -> None:
    """Far outside the training data (but inside the declared bounds) the outputs stay finite numbers."""
    for pred in (range_pred, anomaly_pred):
        for variant in pred.input_schema.get("oneOf", [pred.input_schema]):
            for pick in ("minimum", "maximum"):
                row = {}
                for name, prop in variant["properties"].items():
                    if "const" in prop:
                        row[name] = prop["const"]
                    else:
                        lo = prop.get("minimum", prop.get("exclusiveMinimum", -1e6))
                        row[name] = prop.get(pick, 1e6) if pick == "maximum" else lo + 1e-3
                out = pred([row])[0]
                assert Draft202012Validator(pred.output_schema).is_valid(out), (row, out)
                assert all(v is None or isinstance(v, bool) or math.isfinite(v) for v in out.values())


def test_predict_is_thread_safe(range_pred: Predictor) -> None:
    rows = [dict(range_pred.example[0], km=float(k)) for k in range(2, 200)]
    want = range_pred.predict(range_pred.columns(rows))["kwh_per_100km"]
    got: list[np.ndarray] = []

    def work() -> None:
        for _ in range(20):
            got.append(range_pred.predict(range_pred.columns(rows))["kwh_per_100km"])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 80 and all(np.array_equal(g, want) for g in got)


def test_columns_concatenate_like_one_request(range_pred: Predictor) -> None:
    """What a dynamic batcher does: concatenating two requests' columns gives each its own answer."""
    a = [dict(range_pred.example[0], km=3.0)]
    b = [dict(range_pred.example[1], km=7.0), dict(range_pred.example[0])]
    ca, cb = range_pred.columns(a), range_pred.columns(b)
    both = range_pred.predict({k: np.concatenate([ca[k], cb[k]]) for k in ca})
    rows = range_pred.rows(both)
    assert rows[:1] == range_pred(a) and rows[1:] == range_pred(b)


# ------------------------------------------------------------------------------------- validation


def _range_cases(ok: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(case, inputs, field named by the error)"""
    return [
        ("not a list", ok, "inputs"),
        ("empty", [], "inputs"),
        ("row not an object", [ok, [1, 2]], "inputs[1]"),
        ("row is null", [None], "inputs[0]"),
        ("missing", [ok, {k: v for k, v in ok.items() if k != "km"}], "inputs[1].km"),
        ("extra", [{**ok, "speed": 3}], "inputs[0].speed"),
        ("derived cold sent", [{**ok, "cold": 1.0}], "inputs[0].cold"),
        ("string", [ok, ok, {**ok, "air": "12"}], "inputs[2].air"),
        ("bool", [{**ok, "stop_share": True}], "inputs[0].stop_share"),
        ("null required", [{**ok, "km": None}], "inputs[0].km"),
        ("nan", [{**ok, "mean_speed": float("nan")}], "inputs[0].mean_speed"),
        ("inf", [{**ok, "battery_temp": float("inf")}], "inputs[0].battery_temp"),
        ("huge int", [{**ok, "km": 10**400}], "inputs[0].km"),
        ("array", [{**ok, "km": [1.0]}], "inputs[0].km"),
        ("object", [{**ok, "km": {"v": 1}}], "inputs[0].km"),
        ("above max", [{**ok, "stop_share": 1.5}], "inputs[0].stop_share"),
        ("below min", [ok, {**ok, "mean_speed": -1}], "inputs[1].mean_speed"),
        ("exclusive min", [{**ok, "km": 0}], "inputs[0].km"),
        ("soc above 100", [{**ok, "soc": 101}], "inputs[0].soc"),
        ("vehicle_factor 0", [{**ok, "vehicle_factor": 0}], "inputs[0].vehicle_factor"),
    ]


def test_range_bad_inputs_name_the_field(range_pred: Predictor) -> None:
    ok = range_pred.example[0]
    validator = Draft202012Validator(range_pred.input_schema)
    for case, inputs, field in _range_cases(ok):
        with pytest.raises(InvalidInput) as err:
            range_pred.columns(inputs)
        assert err.value.field == field, case
        assert str(err.value).startswith(f"{field}: ") and isinstance(err.value, ConfigError), case
        rows = inputs if isinstance(inputs, list) else [inputs]
        if (
            field.startswith("inputs[")
            and "." in field
            and not any(
                isinstance(v, float) and not math.isfinite(v)
                for r in rows
                if isinstance(r, dict)
                for v in r.values()
            )
        ):
            i = int(field[len("inputs[") : field.index("]")])
            assert not validator.is_valid(rows[i]), f"{case}: the schema must refuse it too"


def test_error_messages_say_what_and_how(range_pred: Predictor) -> None:
    ok = range_pred.example[0]
    msgs = {}
    for case, inputs, _ in _range_cases(ok):
        with pytest.raises(InvalidInput) as err:
            range_pred.columns(inputs)
        msgs[case] = str(err.value)
    assert "missing" in msgs["missing"] and "km" in msgs["missing"]
    assert "unexpected field" in msgs["extra"] and "allowed fields" in msgs["extra"]
    assert "a string" in msgs["string"] and "send a number in [-90, 70] celsius" in msgs["string"]
    assert "e.g. " in msgs["string"] and "e.g. " in msgs["missing"]  # an example value to send
    assert "a boolean" in msgs["bool"]
    assert "not a finite number" in msgs["nan"] and "not a finite number" in msgs["huge int"]
    assert "[0, 1] (" in msgs["above max"] and "(0, 2000] km" in msgs["exclusive min"]
    long = [{**ok, "air": "x" * 10_000}]
    with pytest.raises(InvalidInput) as err:
        range_pred.columns(long)
    assert len(str(err.value)) < 300, "a huge value is not echoed back"


def test_valid_inputs_accepted_and_schema_agrees(range_pred: Predictor) -> None:
    ok = range_pred.example[0]
    validator = Draft202012Validator(range_pred.input_schema)
    good = [
        ok,
        {k: v for k, v in ok.items() if k not in ("soc", "usable_kwh")},
        {**ok, "km": 1},  # ints are numbers
        {**ok, "air": None, "battery_temp": None},
        {**ok, "stop_share": 0, "mean_speed": 300},  # bounds are inclusive
        {**ok, "soc": None, "usable_kwh": None, "vehicle_factor": None},
    ]
    for row in good:
        assert validator.is_valid(row)
        cols = range_pred.columns([row])
        assert all(c.shape == (1,) and c.dtype == np.float64 for c in cols.values())


def test_anomaly_bad_inputs_name_the_field(anomaly_pred: Predictor) -> None:
    ev = next(r for r in anomaly_pred.example if r["powertrain"] == "ELECTRIC")
    ice = next(r for r in anomaly_pred.example if r["powertrain"] == "COMBUSTION")
    cases = [
        ("missing powertrain", [{k: v for k, v in ev.items() if k != "powertrain"}], "inputs[0].powertrain"),
        ("unknown powertrain", [ev, {**ev, "powertrain": "HYBRID"}], "inputs[1].powertrain"),
        ("powertrain not a string", [{**ev, "powertrain": ["ELECTRIC"]}], "inputs[0].powertrain"),
        ("other type's feature", [ice, {**ev, "coolant_excess": 1.0}], "inputs[1].coolant_excess"),
        ("missing required share", [ice, {k: v for k, v in ev.items() if k != "parked_share"}],
         "inputs[1].parked_share"),
        ("bad value in mixed batch", [ev, ice, {**ice, "rpm": "fast"}], "inputs[2].rpm"),
        ("nan", [ice, ev, {**ev, "v12_parked": float("nan")}], "inputs[2].v12_parked"),
        ("share above 1", [{**ice, "moving_share": 2}], "inputs[0].moving_share"),
    ]  # fmt: skip
    for case, inputs, field in cases:
        with pytest.raises(InvalidInput) as err:
            anomaly_pred.columns(inputs)
        assert err.value.field == field, (case, str(err.value))
    validator = Draft202012Validator(anomaly_pred.input_schema)
    assert not validator.is_valid({**ev, "coolant_excess": 1.0})
    assert not validator.is_valid({**ev, "powertrain": "HYBRID"})


# ------------------------------------------------------------------------------------- loading


def test_load_predictor_verifies_the_artifact(range_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model"
    shutil.copytree(range_artifact, bad)
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"weights\.safetensors"):
        load_predictor(bad)


def test_predictor_from_refuses_unknown_family_and_bad_weights(range_artifact: Path) -> None:
    art = load_artifact(range_artifact)
    with pytest.raises(ConfigError, match="family 'toy' cannot be served"):
        predictor_from(art.state_dict, {**art.model_config, "family": "toy"})
    with pytest.raises(ConfigError, match=r"does not fit model\.json"):
        predictor_from(art.state_dict, {**art.model_config, "hyperparameters": {"hidden": 3}})
    broken = {k: v for k, v in art.model_config.items() if k != "target"}
    with pytest.raises(ConfigError, match="target"):
        predictor_from(art.state_dict, broken)
