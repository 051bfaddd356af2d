"""Online predictors: a loaded model artifact as a row-level function (JSON rows in, JSON rows out).

A :class:`Predictor` has three steps, so a server can batch between them:

1. :meth:`Predictor.columns` validates JSON-decoded rows (a list of objects) against the family's input
   schema and turns them into columns (one 1-D numpy array per field). Errors are :class:`InvalidInput`
   naming ``inputs[i].field``. Validation is vectorised over all numeric fields at once (one matrix, a
   handful of numpy calls), so it costs microseconds for one row and stays linear for big batches;
2. :meth:`Predictor.predict` runs the model over columns (any number of requests concatenated) under
   ``torch.inference_mode``; it does not mutate state, so threads may share a predictor;
3. :meth:`Predictor.rows` turns output columns back into JSON-able rows.

This module is the framework every family shares (fields, schemas, vectorised validation, normalisation);
each family's own online model (``gpu_jobs/models/<family>/online.py``) is built by the family registered under
the name in ``model.json`` (:func:`predictor_from`), so nothing here knows a specific family.

A feature is required unless the telemetry can legitimately lack it (a sensor the vehicle does not report):
then it is optional, and absent or ``null`` means "not measured" — the model uses the training centre, as the
batch scorers do for nulls. Bounds are physical plausibility limits, declared in the schema.

The feature order of the network is the order of ``model_config["features"]`` (a list): the ``norm`` mapping
loses its order when an artifact is written with sorted keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.errors import InvalidInput
from gpu_jobs.models.base import Columns, Derived, InputForm, OnlineModel
from gpu_jobs.registry import family_names, load_family

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
    example: float | None = None  # a plausible value, for error hints (not part of the schema)

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

    def hint(self) -> str:
        """What to send: ``a number in (0, 2000] km (trip distance), e.g. 12.5``."""
        bounds = self.bounds_text().removesuffix(" 1")  # a share or ratio: no unit to name
        text = f"a number in {bounds} ({self.description})"
        if self.example is not None:
            text += f", e.g. {self.example:g}"
        if self.required:
            return text
        if self.default is not None:
            return f"{text}; or leave it out / null for {self.default:g}"
        return text + "; or leave it out / null when not measured"


# a family's input bounds: name → (required, minimum, maximum, exclusive minimum)
Limits = dict[str, tuple[bool, float | None, float | None, bool]]
SHARE = (True, 0.0, 1.0, False)  # a share of a window: always known, in [0, 1]


def feature_fields(
    features: Sequence[dict[str, Any]],
    limits: Limits,
    skip: Iterable[str] = (),
    centers: Mapping[str, float] | None = None,
) -> list[NumberField]:
    """Input fields for ``model_config`` feature descriptions (``{"name", "unit", "description"}``), with the
    family's plausibility ``limits`` (a feature without limits: required, unbounded) and, from ``centers``
    (the training centres), the example value each field's error hint shows."""
    skip = set(skip)
    out = []
    for f in features:
        if f["name"] in skip:
            continue
        required, lo, hi, excl = limits.get(f["name"], (True, None, None, False))
        field_ = NumberField(f["name"], f["unit"], f["description"], required, lo, hi, excl)
        if centers is not None and f["name"] in centers:
            field_ = replace(field_, example=example_value(centers[f["name"]], field_))
        out.append(field_)
    return out


def row_schema(
    fields: Sequence[NumberField], title: str, extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """JSON Schema of one input row: ``extra`` properties (e.g. a discriminator) first, then ``fields``."""
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


def short(v: Any) -> str:
    """``repr(v)``, cut to 40 characters (for error messages)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def json_type(v: Any) -> str:
    """The JSON type of a decoded value, for error messages (``a string``, ``null``, …)."""
    return {
        bool: "a boolean",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def check_rows(rows: Any) -> list[dict[str, Any]]:
    """``rows`` when it is a non-empty list; ``InvalidInput("inputs", …)`` otherwise."""
    if not isinstance(rows, list):
        raise InvalidInput(
            "inputs", f"expected an array of row objects, got {json_type(rows)}; send [{{field: number, …}}]"
        )
    if not rows:
        raise InvalidInput("inputs", "empty; send at least one row object")
    return rows


def check_keys(
    rows: Sequence[Any],
    index: Sequence[int],
    required: frozenset[str],
    allowed: frozenset[str],
    hints: Mapping[str, str] | None = None,
) -> None:
    """Every row is an object with every required key and no other keys than ``allowed``; ``hints`` (field →
    :meth:`NumberField.hint`) say what to send for a missing field."""
    full = required == allowed
    for i, r in zip(index, rows, strict=True):
        if type(r) is not dict:
            raise InvalidInput(
                f"inputs[{i}]", f"expected an object, got {json_type(r)}; send {{field: number, …}}"
            )
        keys = r.keys()
        if keys == allowed or (not full and required <= keys <= allowed):
            continue
        if missing := sorted(required - keys):
            want = (hints or {}).get(missing[0])
            raise InvalidInput(
                f"inputs[{i}].{missing[0]}",
                f"missing; send {want or 'it'} (every row needs {', '.join(sorted(required))})",
            )
        extra = sorted(str(k) for k in keys if k not in allowed)
        raise InvalidInput(
            f"inputs[{i}].{extra[0]}",
            f"unexpected field; drop it (allowed fields are {', '.join(sorted(allowed))})",
        )


_NUMERIC = frozenset({int, float})
_NULLABLE = frozenset({int, float, type(None)})


class Matrix:
    """Vectorised validation of a group of numeric fields (precomputed bound vectors)."""

    def __init__(self, fields: Sequence[NumberField], prefix: str = "inputs") -> None:
        self.prefix = prefix  # error fields read ``<prefix>[i].<name>``
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
                raise InvalidInput(f"{self.prefix}[{index[pos // k]}].{self.names[pos % k]}", problem)
        raise AssertionError("validation found a bad value but no problem")  # pragma: no cover

    @staticmethod
    def _problem(f: NumberField, v: Any) -> str | None:
        return number_problem(f, v)


def number_problem(f: NumberField, v: Any) -> str | None:
    """What is wrong with ``v`` as a value of ``f`` and what to send instead (None: nothing)."""
    if v is None:
        return None if not f.required else f"null is not allowed; send {f.hint()}"
    if type(v) not in _NUMERIC:
        return f"expected a number, got {json_type(v)} {short(v)}; send {f.hint()}"
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        return f"{short(v)} is not a finite number; send {f.hint()}"
    if (
        (f.minimum is not None and (x <= f.minimum if f.exclusive_minimum else x < f.minimum))
        or (f.maximum is not None and x > f.maximum)
    ):  # fmt: skip
        return f"{short(v)} is outside the accepted range; send {f.hint()}"
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


def output_schema(title: str, props: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema of one output row: every property required, no others."""
    return {
        "title": title,
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


# ------------------------------------------------------------------------------------------- predictor


@dataclass(frozen=True, eq=False)
class Predictor:
    """A model as a row-level function: ``rows → columns → predict → rows`` (see the module docstring)."""

    family: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    example: list[dict[str, Any]]
    impl: OnlineModel = field(repr=False)

    @property
    def forms(self) -> dict[str, InputForm]:
        """The other request forms the model accepts (``telemetry``, ``plan``, …), by body key."""
        return {f.key: f for f in getattr(self.impl, "forms", ())}

    @property
    def dedicated_thread(self) -> bool:
        """True when one call may run for seconds (an optimisation, not a forward pass): a gateway then runs
        this function in an inference thread of its own, so it never holds up the other functions."""
        return bool(getattr(self.impl, "dedicated_thread", False))

    def columns(self, rows: Any) -> Columns:
        """Validate a JSON-decoded list of rows → columns; raises :class:`InvalidInput` naming the field."""
        return self.impl.columns(rows)

    def derive(self, key: str, value: Any) -> Derived:
        """Another form's value → columns (:meth:`InputForm.derive`); ``InvalidInput`` naming the field."""
        form = self.forms.get(key)
        if form is None:
            raise InvalidInput(
                key, f"this {self.family} function does not accept {key}; send {self.keys_text()}"
            )
        return form.derive(value)

    def keys_text(self) -> str:
        """The body forms it accepts, for error messages."""
        return " or ".join(f'{{"{k}": …}}' for k in ("inputs", *self.forms))

    def invoke(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request body of any form (``{"inputs": rows}``, ``{"telemetry": rows}``, …) → the gateway's
        response fields (``outputs`` plus a form's notes), without batching (tests, local use)."""
        ((key, value),) = body.items()
        if key == "inputs":
            return {"outputs": self(value)}
        d = self.derive(key, value)
        return {"outputs": self.attach(key, self.rows(self.predict(d.cols)), d), **d.notes}

    def attach(self, key: str, rows: list[dict[str, Any]], derived: Derived) -> list[dict[str, Any]]:
        """Output rows of a derived form with each row's ``about`` under the form's ``row_key``."""
        row_key = self.forms[key].row_key
        if row_key is not None:
            for row, about in zip(rows, derived.about, strict=True):
                row[row_key] = about
        return rows

    def predict(self, cols: Columns) -> Columns:
        """Vectorised inference (``torch.inference_mode``); n rows in → n rows out. Thread-safe."""
        return self.impl.predict(cols)

    def rows(self, out: Columns) -> list[dict[str, Any]]:
        """Output columns → JSON-able rows (floats, bools, strings; non-finite floats as null)."""
        return _rows(out)

    def __call__(self, rows: Any) -> list[dict[str, Any]]:
        """Validate, predict and format in one call."""
        return self.rows(self.predict(self.columns(rows)))


class Norm:
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


def example_value(x: float, f: NumberField) -> float:
    """``x`` (a training centre) rounded for an example row, kept inside the field's bounds."""
    v = round(float(x), 4)
    if f.minimum is not None:
        v = max(v, f.minimum + (1e-3 if f.exclusive_minimum else 0.0))
    if f.maximum is not None:
        v = min(v, f.maximum)
    return v


def load_state(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``net``; ``ConfigError`` when the weights do not fit the config."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(
            f"weights.safetensors does not fit model.json ({str(e)[:200]}); re-export the artifact"
        ) from e


def predictor_from(
    state_dict: dict[str, torch.Tensor], model_config: dict[str, Any], *, device: str | torch.device = "cpu"
) -> Predictor:
    """A :class:`Predictor` for a model's weights and ``model.json``: the registry's family named there
    builds its online model (``ConfigError`` if that family is unknown or cannot be served)."""
    family = str(model_config.get("family"))
    names = family_names()
    make = (
        getattr(load_family(family, allow_import_path=False), "predictor", None) if family in names else None
    )
    if make is None:
        raise ConfigError(
            f"model.json: family {model_config.get('family')!r} cannot be served online; supported: "
            f"{', '.join(names)} (families with a predictor; plugins: DEPIN_FAMILIES)"
        )
    try:
        impl = make(model_config, state_dict, torch.device(device))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model.json of the {family} model lacks or mangles {e}; re-train the model") from e
    return Predictor(family, impl.input_schema, impl.output_schema, impl.example, impl)


def load_predictor(model_dir: Path | str, *, device: str | torch.device = "cpu") -> Predictor:
    """Verify and load a model artifact (``gpu_jobs.artifacts.load_artifact``) as a :class:`Predictor`."""
    art = load_artifact(model_dir)
    return predictor_from(art.state_dict, art.model_config, device=device)


__all__ = [
    "SHARE",
    "Columns",
    "InvalidInput",
    "Limits",
    "Matrix",
    "Norm",
    "NumberField",
    "Predictor",
    "check_keys",
    "check_rows",
    "example_value",
    "feature_fields",
    "json_type",
    "load_predictor",
    "load_state",
    "number_problem",
    "output_schema",
    "predictor_from",
    "row_schema",
    "short",
]
