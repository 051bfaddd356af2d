"""The range function's other request forms: a trip's raw telemetry, or a plan.

- ``{"telemetry": [row, …]}``: telemetry rows of one or more vehicles (DIMO signal names and units, as in the
  telemetry table). Trips are cut by :func:`features.trip_windows` — the code that built the training trips —
  and predicted as the batch scorer does (:func:`model.predict_trips`): the fleet model, calibrated per vehicle
  on that vehicle's *earlier* trips in the same request, ``range_km`` from the SoC after the trip. One output
  row per trip, with ``trip`` saying which (vehicle, start, end) and the engineered row it became.
- ``{"plan": {"km", "mean_speed"?, "air"?, "soc"?, …}}``: a trip not driven yet. What the plan leaves out is
  filled from the fleet the model was trained on (``model.json``), and listed in the response's ``assumed``:

  - ``mean_speed``, ``kinetic_per_km``, ``stop_share``, ``air``, ``battery_temp``: the training trips' mean
    (the normalisation centre);
  - ``hours_per_100km`` = 100 / ``mean_speed`` (an identity of the trip features);
  - ``v3_over_v`` = (``mean_speed``/100)² × the fleet's ratio of mean ``v3_over_v`` to (mean speed/100)², so
    faster plans carry the aerodynamic load of faster driving;
  - ``usable_kwh`` (only with ``soc``): ``model.json``'s ``fleet_usable_kwh`` when present, else
    :data:`FLEET_USABLE_KWH` (a mid-size EV: 64 kWh gross at 94 % health).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from gpu_jobs.errors import InvalidInput
from gpu_jobs.models import features as F
from gpu_jobs.models import online as OL
from gpu_jobs.models import raw as R
from gpu_jobs.models.base import Derived
from gpu_jobs.models.range import features as RF
from gpu_jobs.models.range.model import RangeNet, calibration, fleet_predict


class RangeRows(Protocol):
    """What the forms read of the range online model (``online.RangeOnline``), named here so that the online
    model can import its forms without an import cycle."""

    @property
    def net(self) -> RangeNet: ...  # the fleet model
    @property
    def order(self) -> list[str]: ...  # feature names in the net's input order
    @property
    def derive_cold(self) -> bool: ...  # "cold" is derived from air, not sent
    @property
    def fields(self) -> list[OL.NumberField]: ...  # the engineered row's fields
    @property
    def norm(self) -> dict[str, dict[str, float]]: ...  # feature → {center, scale}
    @property
    def matrix(self) -> OL.Matrix: ...  # the engineered row's column parser


FLEET_USABLE_KWH = 60.0  # kWh; see the module docstring
PLAN_FIELDS = ("km", "mean_speed", "air", "battery_temp", "soc", "usable_kwh", "vehicle_factor")
DERIVED = frozenset({"hours_per_100km", "v3_over_v", "cold"})


def _time(t: str) -> str:
    return f"2026-05-04T{t}:00Z"


class RangeTelemetry:
    """``{"telemetry": [row, …]}`` → one prediction per trip (see the module docstring)."""

    key = "telemetry"
    title = "raw telemetry rows of one or more trips (DIMO signal names and units)"
    row_key = "trip"

    def __init__(self, model: RangeRows, config: dict[str, Any]) -> None:
        self.model = model
        self.config = config
        self.min_km = float(config["hyperparameters"]["min_km"])
        self.rows = R.TelemetryRows(F.SIGNALS, key=self.key)
        self.schema = self.rows.schema(
            f"telemetry of one or more vehicles, one row per time bucket (at most 2 min apart within a trip). "
            f"A trip is a run of buckets with speed > 0 or isIgnitionOn = 1, without charging, covering at "
            f'least {self.min_km:g} km of {F.ODOMETER}, with {F.POWERTRAIN} "ELECTRIC" and {F.GROSS}; a '
            f"parked bucket (speed 0, isIgnitionOn 0) right before and after it gives the SoC for range_km. "
            f"Earlier trips of a vehicle calibrate the prediction of its later ones."
        )
        self.row_schema = {
            "type": "object",
            "description": "the trip this row predicts",
            "properties": {
                "token_id": {"type": ["integer", "null"], "description": "the vehicle (null: not given)"},
                "start": {"type": "string", "format": "date-time", "description": "first bucket of the trip"},
                "end": {"type": "string", "format": "date-time", "description": "last bucket of the trip"},
                "km": {"type": "number", "x-unit": "km", "description": "odometer distance of the trip"},
                "measured_kwh_per_100km": {
                    "type": ["number", "null"],
                    "x-unit": "kWh/100km",
                    "description": "what the trip took by SoC, when bracketed by parked buckets with SoC",
                },
                "features": {
                    "type": "object",
                    "description": "the engineered row the trip became (send it as inputs for the same answer)",
                },
            },
            "required": ["token_id", "start", "end", "km", "measured_kwh_per_100km", "features"],
        }
        self.notes_schema: dict[str, dict[str, Any]] = {}
        self.example = self._example()

    def _example(self) -> list[dict[str, Any]]:
        """One parked–driving–parked trip of ~10 km at 1-minute buckets (works as is)."""
        air = float(self.config["norm"].get("air", {}).get("center", 15.0))
        kwh100 = float(self.config.get("fleet_mean_kwh_per_100km", 17.0))
        speeds = [0.0, 25.0, 45.0, 60.0, 62.0, 58.0, 40.0, 55.0, 65.0, 60.0, 35.0, 15.0, 0.0]
        odo, soc, rows = 12_345.6, 80.0, []
        for m, v in enumerate(speeds):
            parked = m in (0, len(speeds) - 1)
            odo += v / 60.0
            soc -= v / 60.0 * kwh100 / 100.0 / (64.0 * 0.94) * 100.0
            rows.append({
                "token_id": 17, "timestamp": _time(f"08:{m:02d}"), F.SPEED: v, F.ODOMETER: round(odo, 3),
                F.IGNITION: 0.0 if parked else 1.0, F.SOC: round(soc, 3), F.GROSS: 64.0, F.SOH: 94.0,
                F.AIR: round(air, 1), F.BATT_TEMP: round(air + 5.0, 1), F.CHARGING: 0.0, F.POWERTRAIN: F.ELECTRIC,
            })  # fmt: skip
        return rows

    def derive(self, value: Any) -> Derived:
        df = self.rows.parse(value)
        trips = RF.trip_windows(df, min_km=self.min_km).sort("token_id", "start")
        if trips.is_empty():
            raise InvalidInput(self.key, f"no complete trip in these rows: {self._why(df)}")
        m = self.model
        with torch.inference_mode():
            fleet = fleet_predict(m.net, self.config, trips)
        # as model.predict_trips: the vehicle's earlier trips calibrate the fleet model
        pred = np.maximum(fleet + calibration(self.config).apply(trips, fleet), 0.2 * fleet)
        cols = {n: R.float_col(trips[n]) for n in m.order if n != "cold" or not m.derive_cold}
        cols["soc"] = R.float_col(trips["soc_end"])
        cols["usable_kwh"] = R.float_col(trips["usable_kwh"])
        cols["vehicle_factor"] = np.asarray(pred / fleet, dtype=np.float64)
        about = []
        for i, t in enumerate(trips.iter_rows(named=True)):
            feats = {n: R.finite_or_none(cols[n][i]) for n in cols}
            about.append({
                "token_id": R.token_out(t["token_id"]), "start": R.rfc3339(t["start"]), "end": R.rfc3339(t["end"]),
                "km": float(t["km"]), "measured_kwh_per_100km": R.finite_or_none(t[RF.RANGE_TARGET[0]]),
                "features": {k: v for k, v in feats.items() if v is not None},
            })  # fmt: skip
        return Derived(cols, about)

    def _why(self, df: pl.DataFrame) -> str:
        """What the rows lack for a trip (the first missing condition), and what to send."""
        ev = df.filter(pl.col(F.POWERTRAIN) == F.ELECTRIC)
        on = df.filter(F.on_expr())
        if ev.is_empty():
            return f'no row says {F.POWERTRAIN} "ELECTRIC": range trips are EV trips; send it on the trip\'s rows'
        if on.is_empty():
            return "no bucket has speed > 0 or isIgnitionOn = 1: nothing was driven; send the driving buckets"
        if ev[F.GROSS].null_count() == ev.height:
            return f"no {F.GROSS} (battery gross capacity, kWh, e.g. 64): send it on at least one row of the trip"
        if on[F.ODOMETER].null_count() == on.height:
            return f"no {F.ODOMETER} (odometer, km, e.g. 12345.6) on the driving buckets: send it"
        return (
            f"no trip covers {self.min_km:g} km: a trip is consecutive buckets of one vehicle at most 2 min apart "
            f"with speed > 0 or isIgnitionOn = 1 and no charging, whose odometer ({F.ODOMETER}) advances at "
            f"least {self.min_km:g} km; send more of the trip (e.g. 10 minutes at 60 km/h at 1-minute buckets)"
        )


class RangePlan:
    """``{"plan": {"km", …}}`` → one prediction, the rest from fleet defaults (see the module docstring)."""

    key = "plan"
    title = "a planned trip: distance, and optionally speed, temperature, state of charge"
    row_key = None
    row_schema = None

    def __init__(self, model: RangeRows, config: dict[str, Any]) -> None:
        self.model = model
        fields = {f.name: f for f in model.fields}
        self.fields = {n: fields[n] for n in PLAN_FIELDS if n in fields}
        self.center = {n: float(s["center"]) for n, s in model.norm.items()}
        self.fleet_usable = float(config.get("fleet_usable_kwh") or FLEET_USABLE_KWH)
        c_speed = self.center.get("mean_speed", 50.0)
        self.v3_ratio = self.center.get("v3_over_v", (c_speed / 100.0) ** 2) / max(
            (c_speed / 100.0) ** 2, 1e-6
        )
        props = {n: {**f.schema(), "type": "number"} for n, f in self.fields.items()}
        for n in ("mean_speed", "air", "battery_temp"):
            if n in props:
                props[n]["description"] = (
                    f"{self.fields[n].description} [{self.fields[n].unit}]; optional: absent = the fleet mean "
                    f"of the training trips ({self.center.get(n, 0.0):.4g})"
                )
        if "soc" in props:
            props["soc"]["description"] = (
                "state of charge now [percent]; optional: without it range_km is null"
            )
        if "usable_kwh" in props:
            props["usable_kwh"]["description"] = (
                f"usable battery energy [kWh]; optional: absent = {self.fleet_usable:g} (fleet default)"
            )
        self.schema = {
            "title": "a planned trip",
            "type": "object",
            "properties": props,
            "required": ["km"],
            "additionalProperties": False,
            "description": "features the plan leaves out are filled from the fleet the model was trained on "
            "and listed in the response's assumed",
        }
        self.notes_schema = {
            "assumed": {
                "type": "object",
                "additionalProperties": {"type": "number"},
                "description": "the model inputs the plan left out, with the value used (fleet defaults)",
            }
        }
        self.example = {"km": 120.0, "mean_speed": 90.0, "air": 5.0, "soc": 80.0}

    def derive(self, value: Any) -> Derived:
        if not isinstance(value, dict):
            raise InvalidInput(self.key, f'expected an object, got {OL.json_type(value)}; send {{"km": 120, '
                               '"mean_speed": 90, "air": 5, "soc": 80}')  # fmt: skip
        for k in value:
            if k not in self.fields:
                raise InvalidInput(
                    f"{self.key}.{k}", f"unexpected field; drop it (a plan has {', '.join(self.fields)})"
                )
        if "km" not in value:
            raise InvalidInput(f"{self.key}.km", f"missing; send {self.fields['km'].hint()}")
        given: dict[str, float] = {}
        for k, v in value.items():
            f = self.fields[k]
            problem = OL.number_problem(replace(f, required=True), v)
            if problem is not None:
                raise InvalidInput(f"{self.key}.{k}", problem)
            given[k] = float(v)
        row, assumed = self._row(given)
        cols = {n: np.array([row.get(n, np.nan)], dtype=np.float64) for n in self.model.matrix.names}
        cols["vehicle_factor"] = np.array([row.get("vehicle_factor", 1.0)])
        return Derived(cols, [], {"assumed": assumed})

    def _row(self, given: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """The engineered row of a plan (rounded as shown) and the inputs assumed for it."""
        row = dict(given)
        c = self.center
        assumed: dict[str, float] = {}
        speed = given.get("mean_speed", c.get("mean_speed", 50.0))
        fill = {
            "mean_speed": speed,
            "hours_per_100km": 100.0 / max(speed, 1e-3),
            "v3_over_v": min(self.v3_ratio * (speed / 100.0) ** 2, 10.0),
            **{n: v for n, v in c.items() if n not in DERIVED and n != "mean_speed"},
        }
        if "soc" in given:
            fill["usable_kwh"] = self.fleet_usable
        for n, v in fill.items():
            if n not in row and (n in self.model.matrix.names):
                row[n] = assumed[n] = round(float(v), 4)
        return row, assumed
