"""Online predictors: a loaded model artifact as a row-level function (JSON rows in, JSON rows out).

A :class:`Predictor` has three steps, so a server can batch between them:

1. :meth:`Predictor.columns` validates JSON-decoded rows (a list of objects) against the family's input
   schema and turns them into columns (one 1-D numpy array per field). Errors are :class:`InvalidInput`
   naming ``inputs[i].field``. Validation is vectorised over all numeric fields at once (one matrix, a
   handful of numpy calls), so it costs microseconds for one row and stays linear for big batches;
2. :meth:`Predictor.predict` runs the model over columns (any number of requests concatenated) under
   ``torch.inference_mode``; it does not mutate state, so threads may share a predictor;
3. :meth:`Predictor.rows` turns output columns back into JSON-able rows.

Families:

- ``range``: the trip features of :data:`features.RANGE_FEATURES` (``cold`` is derived from ``air`` exactly
  as :func:`features.trip_windows` does), plus optional ``soc`` (%), ``usable_kwh`` and ``vehicle_factor``
  (a per-vehicle calibration, default 1) → ``kwh_per_100km`` (the fleet model × vehicle_factor) and
  ``range_km`` (null unless soc and usable_kwh are given). The same numbers as
  :func:`range.fleet_predict` / :func:`range.predict_trips`.
- ``anomaly``: ``powertrain`` (one of the model's types) and that type's features of
  :data:`features.ANOMALY_FEATURES` → ``score``, ``threshold``, ``flagged``, as :func:`anomaly.score_windows`.

A feature is required unless the telemetry can legitimately lack it (a sensor the vehicle does not report):
then it is optional, and absent or ``null`` means "not measured" — the model uses the training centre, as the
batch scorers do for nulls. Bounds are physical plausibility limits, declared in the schema.

The feature order of the network is the order of ``model_config["features"]`` (a list): the ``norm`` mapping
loses its order when an artifact is written with sorted keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.errors import InvalidInput
from gpu_jobs.models import anomaly as A
from gpu_jobs.models import features as F
from gpu_jobs.models import range as R

Columns = dict[str, np.ndarray]

# kWh/100 km is exp(model output); far outside the training data a net extrapolates without bound, so the
# log is kept to [ln 0.01, ln 10 000] (never reached by real trips) and the output is always a finite number
LOG_KWH_RANGE = (math.log(0.01), math.log(10_000.0))


# ------------------------------------------------------------------------------------------- input fields


@dataclass(frozen=True)
class NumberField:
    """One numeric input: unit, description, whether it may be absent/null, and plausibility bounds."""

    name: str
    unit: str
    description: str
    required: bool = True
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    default: float | None = None  # used when absent or null (else NaN: the training centre)

    def schema(self) -> dict[str, Any]:
        """JSON Schema (2020-12) of the field."""
        text = f"{self.description} [{self.unit}]"
        if not self.required:
            text += (
                f"; optional: absent or null = {self.default}"
                if self.default is not None
                else "; optional: absent or null = not measured (the model uses the training centre)"
            )
        out: dict[str, Any] = {
            "type": "number" if self.required else ["number", "null"],
            "description": text,
            "x-unit": self.unit,
        }
        if self.minimum is not None:
            out["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out

    def bounds_text(self) -> str:
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{'(' if self.exclusive_minimum else '['}{lo}, {hi}] {self.unit}"


# name → (required, minimum, maximum, exclusive minimum): physical plausibility, generous on purpose
_SHARE = (True, 0.0, 1.0, False)
_LIMITS: dict[str, tuple[bool, float | None, float | None, bool]] = {
    # range (trip) features; air / battery temperature are sensors a vehicle may not report
    "km": (True, 0.0, 2000.0, True),
    "mean_speed": (True, 0.0, 300.0, False),
    "v3_over_v": (True, 0.0, 10.0, False),
    "hours_per_100km": (True, 0.0, 10_000.0, True),
    "kinetic_per_km": (True, 0.0, 100.0, False),
    "stop_share": _SHARE,
    "air": (False, -90.0, 70.0, False),
    "battery_temp": (False, -60.0, 100.0, False),
    # anomaly (window) features: the shares are always known; every sensor-based feature may be missing
    "parked_share": _SHARE,
    "moving_share": _SHARE,
    "charging_share": _SHARE,
    **{f"tire_dev_{i}": (False, -1000.0, 1000.0, False) for i in range(4)},
    "v12_parked": (False, 0.0, 100.0, False),
    "speed_mean": (False, 0.0, 300.0, False),
    "batt_excess": (False, -200.0, 200.0, False),
    "batt_excess_max": (False, -200.0, 200.0, False),
    "power_abs": (False, 0.0, 2000.0, False),
    "coolant_excess": (False, -200.0, 300.0, False),
    "engine_load": (False, 0.0, 100.0, False),
    "rpm": (False, 0.0, 20_000.0, False),
}


def _feature_fields(features: Sequence[dict[str, Any]], skip: Iterable[str] = ()) -> list[NumberField]:
    """Input fields for ``model_config`` feature descriptions (``{"name", "unit", "description"}``)."""
    skip = set(skip)
    out = []
    for f in features:
        if f["name"] in skip:
            continue
        required, lo, hi, excl = _LIMITS.get(f["name"], (True, None, None, False))
        out.append(NumberField(f["name"], f["unit"], f["description"], required, lo, hi, excl))
    return out


def _row_schema(
    fields: Sequence[NumberField], title: str, extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    props = {**(extra or {}), **{f.name: f.schema() for f in fields}}
    required = [*(extra or {}), *(f.name for f in fields if f.required)]
    return {
        "title": title,
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


# ------------------------------------------------------------------------------------------- validation


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(v: Any) -> str:
    return {
        bool: "a boolean",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _check_rows(rows: Any) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise InvalidInput("inputs", f"expected an array of row objects, got {_json_type(rows)}")
    if not rows:
        raise InvalidInput("inputs", "empty; send at least one row object")
    return rows


def _check_keys(
    rows: Sequence[Any], index: Sequence[int], required: frozenset[str], allowed: frozenset[str]
) -> None:
    """Every row is an object with every required key and no other keys than ``allowed``."""
    full = required == allowed
    for i, r in zip(index, rows, strict=True):
        if type(r) is not dict:
            raise InvalidInput(f"inputs[{i}]", f"expected an object, got {_json_type(r)}")
        keys = r.keys()
        if keys == allowed or (not full and required <= keys <= allowed):
            continue
        if missing := sorted(required - keys):
            raise InvalidInput(
                f"inputs[{i}].{missing[0]}", f"missing; every row needs {', '.join(sorted(required))}"
            )
        extra = sorted(str(k) for k in keys if k not in allowed)
        raise InvalidInput(
            f"inputs[{i}].{extra[0]}", f"unexpected field; allowed fields are {', '.join(sorted(allowed))}"
        )


_NUMERIC = frozenset({int, float})
_NULLABLE = frozenset({int, float, type(None)})


class _Matrix:
    """Vectorised validation of a group of numeric fields (precomputed bound vectors)."""

    def __init__(self, fields: Sequence[NumberField]) -> None:
        self.fields = list(fields)
        self.names = [f.name for f in fields]
        inf = math.inf
        lo = [(-inf if f.minimum is None else f.minimum) for f in fields]
        # exclusive minimum m: a value must be > m, i.e. ≥ the next float above m
        self.lo_cmp = np.array(
            [np.nextafter(v, inf) if f.exclusive_minimum else v for v, f in zip(lo, fields, strict=True)]
        )
        self.hi = np.array([(inf if f.maximum is None else f.maximum) for f in fields], dtype=np.float64)
        self.nullable = np.array([not f.required for f in fields])
        self.any_nullable = bool(self.nullable.any())
        self.defaults = [(j, f.default) for j, f in enumerate(fields) if f.default is not None]

    def parse(self, rows: Sequence[dict[str, Any]], index: Sequence[int]) -> np.ndarray:
        """``(len(rows), len(fields))`` float64 matrix; NaN where an optional field is absent/null."""
        names, k = self.names, len(self.names)
        flat = [v for r in rows for v in map(r.get, names)]
        types = set(map(type, flat))  # bool is its own type: never a number here
        if not (types <= _NUMERIC or (self.any_nullable and types <= _NULLABLE)):
            self._raise_first(flat, index)
        try:
            arr = np.array(flat, dtype=np.float64).reshape(len(rows), k)
        except OverflowError:  # an integer beyond float range
            self._raise_first(flat, index)
        nonfinite = np.flatnonzero(~np.isfinite(arr))
        if len(nonfinite) and not (
            self.nullable[nonfinite % k].all() and all(flat[p] is None for p in nonfinite.tolist())
        ):  # only null (not NaN/inf) is allowed, and only in optional fields
            self._raise_first(flat, index)
        if ((arr < self.lo_cmp) | (arr > self.hi)).any():  # NaN compares False
            self._raise_first(flat, index)
        for j, d in self.defaults:
            col = arr[:, j]
            col[np.isnan(col)] = d
        return arr

    def _raise_first(self, flat: list[Any], index: Sequence[int]) -> NoReturn:
        k = len(self.fields)
        for pos, v in enumerate(flat):
            problem = self._problem(self.fields[pos % k], v)
            if problem is not None:
                raise InvalidInput(f"inputs[{index[pos // k]}].{self.names[pos % k]}", problem)
        raise AssertionError("validation found a bad value but no problem")  # pragma: no cover

    @staticmethod
    def _problem(f: NumberField, v: Any) -> str | None:
        if v is None:
            return None if not f.required else f"null is not allowed; send a number ({f.unit})"
        if type(v) not in _NUMERIC:
            return f"expected a number ({f.unit}), got {_json_type(v)} {_short(v)}; send a JSON number"
        try:
            x = float(v)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            return f"{_short(v)} is not a finite number; send a finite value ({f.unit})"
        if (
            (f.minimum is not None and (x <= f.minimum if f.exclusive_minimum else x < f.minimum))
            or (f.maximum is not None and x > f.maximum)
        ):  # fmt: skip
            return f"{_short(v)} is outside the accepted range {f.bounds_text()}; send a plausible value"
        return None


# ------------------------------------------------------------------------------------------- outputs


def _rows(out: Columns) -> list[dict[str, Any]]:
    keys = list(out)
    lists = []
    for k in keys:
        arr = np.asarray(out[k])
        vals = arr.tolist()
        if arr.dtype.kind == "f":
            nan = np.flatnonzero(~np.isfinite(arr))
            for i in nan.tolist():
                vals[i] = None
        lists.append(vals)
    return [dict(zip(keys, v, strict=True)) for v in zip(*lists, strict=True)]


def _output_schema(title: str, props: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "title": title,
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


# ------------------------------------------------------------------------------------------- predictor


class _Impl(Protocol):
    def columns(self, rows: Any) -> Columns: ...

    def predict(self, cols: Columns) -> Columns: ...


@dataclass(frozen=True, eq=False)
class Predictor:
    """A model as a row-level function: ``rows → columns → predict → rows`` (see the module docstring)."""

    family: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    example: list[dict[str, Any]]
    impl: _Impl = field(repr=False)

    def columns(self, rows: Any) -> Columns:
        """Validate a JSON-decoded list of rows → columns; raises :class:`InvalidInput` naming the field."""
        return self.impl.columns(rows)

    def predict(self, cols: Columns) -> Columns:
        """Vectorised inference (``torch.inference_mode``); n rows in → n rows out. Thread-safe."""
        return self.impl.predict(cols)

    def rows(self, out: Columns) -> list[dict[str, Any]]:
        """Output columns → JSON-able rows (floats, bools, strings; non-finite floats as null)."""
        return _rows(out)

    def __call__(self, rows: Any) -> list[dict[str, Any]]:
        """Validate, predict and format in one call."""
        return self.rows(self.predict(self.columns(rows)))


class _Norm:
    """``features.apply_norm`` on columns: ``(x − center)/scale`` as float32 in the network's feature order,
    NaN (not measured) → the centre, optionally clipped."""

    def __init__(self, norm: dict[str, dict[str, float]], clip: float | None = None) -> None:
        self.names = list(norm)
        self.center = np.array([norm[n]["center"] for n in self.names], dtype=np.float64)
        self.scale = np.array([norm[n]["scale"] for n in self.names], dtype=np.float64)
        self.clip = clip

    def __call__(self, cols: Columns) -> np.ndarray:
        x = np.stack([cols[n] for n in self.names], axis=1).astype(np.float64, copy=False)
        x = (np.where(np.isnan(x), self.center, x) - self.center) / self.scale
        if self.clip is not None:
            np.clip(x, -self.clip, self.clip, out=x)
        return x.astype(np.float32)


def _round(x: float, f: NumberField) -> float:
    v = round(float(x), 4)
    if f.minimum is not None:
        v = max(v, f.minimum + (1e-3 if f.exclusive_minimum else 0.0))
    if f.maximum is not None:
        v = min(v, f.maximum)
    return v


class _Range:
    """``range``: trip features → kWh/100 km (fleet model × vehicle_factor) and remaining range."""

    extra = (
        NumberField("soc", "percent", "state of charge now, for range_km", False, 0.0, 100.0),
        NumberField("usable_kwh", "kWh", "usable battery energy (gross × SoH), for range_km", False, 0.0, 1000.0, True),
        NumberField("vehicle_factor", "1", "per-vehicle calibration of the fleet model's consumption",
                    False, 0.0, 100.0, True, default=1.0),
    )  # fmt: skip

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> None:
        self.order = [f["name"] for f in config["features"]]
        self.norm = F.ordered_norm(config["norm"], config["features"])
        self.normalize = _Norm(self.norm)
        self.center = float(config["target"]["center"])
        self.scale = float(config["target"]["scale"])
        self.device = device
        net = R.RangeNet(len(self.order), int(config["hyperparameters"]["hidden"]))
        _load_state(net, state)
        self.net = net.to(device).eval()
        self.derive_cold = "cold" in self.order
        feats = _feature_fields(config["features"], skip={"cold"})
        self.fields = [*feats, *self.extra]
        self.matrix = _Matrix(self.fields)
        names = [f.name for f in self.fields]
        self.required = frozenset(f.name for f in self.fields if f.required)
        self.allowed = frozenset(names)
        self.input_schema = _row_schema(self.fields, "range input row: one trip")
        if self.derive_cold:
            self.input_schema["description"] = (
                f"cold (max(0, {F.COLD_BELOW_C:g} − air), celsius) is derived from air; do not send it"
            )
        self.output_schema = _output_schema(
            "range output row",
            {
                "kwh_per_100km": {
                    "type": "number",
                    "description": "predicted consumption: the fleet model × vehicle_factor [kWh/100km]",
                    "x-unit": "kWh/100km",
                },
                "range_km": {
                    "type": ["number", "null"],
                    "description": "remaining range soc/100 × usable_kwh / kwh_per_100km × 100 [km]; "
                    "null unless soc and usable_kwh are given",
                    "x-unit": "km",
                },
            },
        )
        base = {f.name: _round(self.norm[f.name]["center"], f) for f in feats}
        self.example = [{**base, "soc": 80.0, "usable_kwh": 60.0}, base]

    def columns(self, rows: Any) -> Columns:
        rows = _check_rows(rows)
        index = range(len(rows))
        _check_keys(rows, index, self.required, self.allowed)
        arr = self.matrix.parse(rows, index)
        return dict(zip(self.matrix.names, np.ascontiguousarray(arr.T), strict=True))

    def predict(self, cols: Columns) -> Columns:
        if self.derive_cold:
            cols = {**cols, "cold": np.maximum(F.COLD_BELOW_C - cols["air"], 0.0)}  # NaN air → NaN cold
        n = len(cols[self.order[0]])
        if n == 0:
            return {"kwh_per_100km": np.zeros(0), "range_km": np.zeros(0)}
        x = torch.from_numpy(self.normalize(cols)).to(self.device)
        with torch.inference_mode():
            z = self.net(x).float().cpu().numpy()
        log_kwh = np.clip(z * self.scale + self.center, *LOG_KWH_RANGE)  # float32, as range.fleet_predict
        kwh = np.exp(log_kwh) * cols.get("vehicle_factor", 1.0)
        kwh = np.asarray(kwh, dtype=np.float64)
        nan = np.full(n, np.nan)  # soc / usable_kwh not given → range_km null
        range_km = cols.get("soc", nan) / 100.0 * cols.get("usable_kwh", nan) / kwh * 100.0
        return {"kwh_per_100km": kwh, "range_km": range_km}


class _Anomaly:
    """``anomaly``: one window's features (per powertrain) → score, threshold, flagged."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> None:
        self.types = list(config["norm"])
        self.order = {t: [f["name"] for f in config["features"][t]] for t in self.types}
        self.norm = {t: F.ordered_norm(config["norm"][t], config["features"][t]) for t in self.types}
        hp = config["hyperparameters"]
        self.normalize = {t: _Norm(self.norm[t], float(hp["clip"])) for t in self.types}
        self.device = device
        net = A.build_net({**config, "norm": self.norm})
        _load_state(net, state)
        self.net = net.to(device).eval()
        self.cond = {t: A._condition(self.norm[t]) for t in self.types}
        self.ctx = {t: A._context(self.norm[t]) for t in self.types}
        self.scales = {t: A._scales(config, t, self.norm[t]) for t in self.types}
        self.thresholds = {t: float(config["thresholds"][t]) for t in self.types}
        self.fields = {t: _feature_fields(config["features"][t]) for t in self.types}
        self.matrix = {t: _Matrix(fs) for t, fs in self.fields.items()}
        self.required = {t: frozenset(["powertrain", *(f.name for f in fs if f.required)]) for t, fs in self.fields.items()}  # fmt: skip
        self.allowed = {t: frozenset(["powertrain", *(f.name for f in fs)]) for t, fs in self.fields.items()}
        self.names = list(dict.fromkeys(n for t in self.types for n in self.order[t]))
        variants = [
            _row_schema(
                self.fields[t],
                f"anomaly input row: one {t} window ({hp['window_minutes']} min)",
                {"powertrain": {"const": t, "description": "the vehicle's powertrain type"}},
            )
            for t in self.types
        ]
        self.input_schema: dict[str, Any] = (
            variants[0]
            if len(variants) == 1
            else {
                "title": "anomaly input row: one telemetry window",
                "type": "object",
                "description": f"powertrain is one of {', '.join(self.types)}; each type has its own features",
                "oneOf": variants,
            }
        )
        self.output_schema = _output_schema(
            "anomaly output row",
            {
                "score": {"type": "number", "minimum": 0, "description": "largest squared scaled residual "
                          "of the condition features given the context [1]", "x-unit": "1"},
                "threshold": {"type": "number", "description": "the powertrain type's flagging threshold [1]",
                              "x-unit": "1"},
                "flagged": {"type": "boolean", "description": "score > threshold"},
            },
        )  # fmt: skip
        self.example = [
            {"powertrain": t, **{f.name: _round(self.norm[t][f.name]["center"], f) for f in self.fields[t]}}
            for t in self.types
        ]

    def columns(self, rows: Any) -> Columns:
        rows = _check_rows(rows)
        n = len(rows)
        kinds = []
        for i, r in enumerate(rows):
            if type(r) is not dict:
                raise InvalidInput(f"inputs[{i}]", f"expected an object, got {_json_type(r)}")
            t = r.get("powertrain")
            if type(t) is not str or t not in self.thresholds:
                what = "missing" if "powertrain" not in r else f"{_short(t)} is not a powertrain type"
                raise InvalidInput(
                    f"inputs[{i}].powertrain", f"{what}; send one of {', '.join(map(repr, self.types))}"
                )
            kinds.append(t)
        pt = np.array(kinds, dtype=object)
        cols: Columns = {"powertrain": pt}
        if len(set(kinds)) == 1:
            t = kinds[0]
            index: Sequence[int] = range(n)
            _check_keys(rows, index, self.required[t], self.allowed[t])
            arr = self.matrix[t].parse(rows, index)
            for j, name in enumerate(self.matrix[t].names):
                cols[name] = np.ascontiguousarray(arr[:, j])
            for name in self.names:
                cols.setdefault(name, np.full(n, np.nan))
            return cols
        for name in self.names:
            cols[name] = np.full(n, np.nan)
        for t in self.types:
            idx = np.flatnonzero(pt == t)
            if not len(idx):
                continue
            sub = [rows[i] for i in idx.tolist()]
            index = idx.tolist()
            _check_keys(sub, index, self.required[t], self.allowed[t])
            arr = self.matrix[t].parse(sub, index)
            for j, name in enumerate(self.matrix[t].names):
                cols[name][idx] = arr[:, j]
        return cols

    def predict(self, cols: Columns) -> Columns:
        pt = cols["powertrain"]
        n = len(pt)
        score = np.zeros(n, dtype=np.float32)
        thr = np.zeros(n, dtype=np.float64)
        for t in self.types:
            idx = np.flatnonzero(pt == t)
            if not len(idx):
                continue
            sub = {k: cols[k][idx] for k in self.order[t]} if len(idx) < n else cols
            x = torch.from_numpy(self.normalize[t](sub)).to(self.device)
            with torch.inference_mode():
                res = (x[:, self.cond[t]] - self.net[t](x[:, self.ctx[t]])).cpu().numpy()
            err = ((res / self.scales[t]) ** 2).max(axis=1)  # as anomaly.score_windows
            score[idx] = err
            thr[idx] = self.thresholds[t]
        return {"score": score, "threshold": thr, "flagged": score > thr}


def _load_state(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(
            f"weights.safetensors does not fit model.json ({str(e)[:200]}); re-export the artifact"
        ) from e


_FAMILIES: dict[str, type[_Range] | type[_Anomaly]] = {"range": _Range, "anomaly": _Anomaly}


def predictor_from(
    state_dict: dict[str, torch.Tensor], model_config: dict[str, Any], *, device: str | torch.device = "cpu"
) -> Predictor:
    """A :class:`Predictor` for a model's weights and ``model.json`` (``ConfigError`` if unsupported)."""
    family = model_config.get("family")
    impl_cls = _FAMILIES.get(str(family))
    if impl_cls is None:
        raise ConfigError(
            f"model.json: family {family!r} cannot be served online; supported: {', '.join(sorted(_FAMILIES))}"
        )
    try:
        impl = impl_cls(state_dict, model_config, torch.device(device))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model.json of the {family} model lacks or mangles {e}; re-train the model") from e
    return Predictor(str(family), impl.input_schema, impl.output_schema, impl.example, impl)


def load_predictor(model_dir: Path | str, *, device: str | torch.device = "cpu") -> Predictor:
    """Verify and load a model artifact (``gpu_jobs.artifacts.load_artifact``) as a :class:`Predictor`."""
    art = load_artifact(model_dir)
    return predictor_from(art.state_dict, art.model_config, device=device)


__all__ = ["Columns", "InvalidInput", "NumberField", "Predictor", "load_predictor", "predictor_from"]
