"""The range family's online model: trip features → kWh/100 km (fleet model × vehicle_factor) and range.

Input: the trip features of :data:`features.RANGE_FEATURES` (``cold`` is derived from ``air`` exactly as
:func:`features.trip_windows` does), plus optional ``soc`` (%), ``usable_kwh`` and ``vehicle_factor`` (a
per-vehicle calibration, default 1). Output: ``kwh_per_100km`` (the fleet model × vehicle_factor) and
``range_km`` (null unless soc and usable_kwh are given). The same numbers as :func:`model.fleet_predict` /
:func:`model.predict_trips`. It also accepts a trip's raw telemetry and a plan (:mod:`range.forms`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gpu_jobs.models import features as F
from gpu_jobs.models import online as OL
from gpu_jobs.models.range import features as RF
from gpu_jobs.models.range.forms import RangePlan, RangeTelemetry
from gpu_jobs.models.range.model import RangeNet

# kWh/100 km is exp(model output); far outside the training data a net extrapolates without bound, so the
# log is kept to [ln 0.01, ln 10 000] (never reached by real trips) and the output is always a finite number
LOG_KWH_RANGE = (math.log(0.01), math.log(10_000.0))

# name → (required, minimum, maximum, exclusive minimum): physical plausibility, generous on purpose; air and
# battery temperature are sensors a vehicle may not report
LIMITS: OL.Limits = {
    "km": (True, 0.0, 2000.0, True),
    "mean_speed": (True, 0.0, 300.0, False),
    "v3_over_v": (True, 0.0, 10.0, False),
    "hours_per_100km": (True, 0.0, 10_000.0, True),
    "kinetic_per_km": (True, 0.0, 100.0, False),
    "stop_share": OL.SHARE,
    "air": (False, -90.0, 70.0, False),
    "battery_temp": (False, -60.0, 100.0, False),
}


class RangeOnline:
    """``range``: trip features → kWh/100 km (fleet model × vehicle_factor) and remaining range."""

    extra = (
        OL.NumberField("soc", "percent", "state of charge now, for range_km", False, 0.0, 100.0, example=80.0),
        OL.NumberField("usable_kwh", "kWh", "usable battery energy (gross × SoH), for range_km", False, 0.0, 1000.0, True,
                       example=60.0),
        OL.NumberField("vehicle_factor", "1", "per-vehicle calibration of the fleet model's consumption",
                    False, 0.0, 100.0, True, default=1.0, example=1.0),
    )  # fmt: skip

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> None:
        self.order = [f["name"] for f in config["features"]]
        self.norm = F.ordered_norm(config["norm"], config["features"])
        self.normalize = OL.Norm(self.norm)
        self.center = float(config["target"]["center"])
        self.scale = float(config["target"]["scale"])
        self.device = device
        net = RangeNet(len(self.order), int(config["hyperparameters"]["hidden"]))
        OL.load_state(net, state)
        self.net = net.to(device).eval()
        self.derive_cold = "cold" in self.order
        centers = {n: float(s["center"]) for n, s in self.norm.items()}
        feats = OL.feature_fields(config["features"], LIMITS, skip={"cold"}, centers=centers)
        self.fields = [*feats, *self.extra]
        self.hints = {f.name: f.hint() for f in self.fields}
        self.matrix = OL.Matrix(self.fields)
        names = [f.name for f in self.fields]
        self.required = frozenset(f.name for f in self.fields if f.required)
        self.allowed = frozenset(names)
        self.input_schema = OL.row_schema(self.fields, "range input row: one trip")
        if self.derive_cold:
            self.input_schema["description"] = (
                f"cold (max(0, {RF.COLD_BELOW_C:g} − air), celsius) is derived from air; do not send it"
            )
        self.output_schema = OL.output_schema(
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
        base = {f.name: OL.example_value(self.norm[f.name]["center"], f) for f in feats}
        self.example = [{**base, "soc": 80.0, "usable_kwh": 60.0}, base]
        self.forms = (RangeTelemetry(self, config), RangePlan(self, config))

    def columns(self, rows: Any) -> OL.Columns:
        rows = OL.check_rows(rows)
        index = range(len(rows))
        OL.check_keys(rows, index, self.required, self.allowed, self.hints)
        arr = self.matrix.parse(rows, index)
        return dict(zip(self.matrix.names, np.ascontiguousarray(arr.T), strict=True))

    def predict(self, cols: OL.Columns) -> OL.Columns:
        if self.derive_cold:
            cols = {**cols, "cold": np.maximum(RF.COLD_BELOW_C - cols["air"], 0.0)}  # NaN air → NaN cold
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
