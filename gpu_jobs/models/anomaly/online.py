"""The anomaly family's online model: one window's features (per powertrain) → score, threshold, flagged.

Input: ``powertrain`` (one of the model's types) and that type's features of
``features.ANOMALY_FEATURES``; output: ``score``, ``threshold``, ``flagged``, as :func:`model.score_windows`.
It also accepts raw telemetry rows (:mod:`anomaly.forms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gpu_jobs.errors import InvalidInput
from gpu_jobs.models import features as F
from gpu_jobs.models import online as OL
from gpu_jobs.models.anomaly.forms import AnomalyTelemetry
from gpu_jobs.models.anomaly.model import build_net, condition_idx, context_idx, scales_of

# name → (required, minimum, maximum, exclusive minimum): physical plausibility, generous on purpose; the
# shares are always known, every sensor-based feature may be missing
LIMITS: OL.Limits = {
    "air": (False, -90.0, 70.0, False),
    "parked_share": OL.SHARE,
    "moving_share": OL.SHARE,
    "charging_share": OL.SHARE,
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


class AnomalyOnline:
    """``anomaly``: one window's features (per powertrain) → score, threshold, flagged."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device) -> None:
        self.types = list(config["norm"])
        self.order = {t: [f["name"] for f in config["features"][t]] for t in self.types}
        self.norm = {t: F.ordered_norm(config["norm"][t], config["features"][t]) for t in self.types}
        hp = config["hyperparameters"]
        self.normalize = {t: OL.Norm(self.norm[t], float(hp["clip"])) for t in self.types}
        self.device = device
        net = build_net({**config, "norm": self.norm})
        OL.load_state(net, state)
        self.net = net.to(device).eval()
        self.cond = {t: condition_idx(self.norm[t]) for t in self.types}
        self.ctx = {t: context_idx(self.norm[t]) for t in self.types}
        self.scales = {t: scales_of(config, t, self.norm[t]) for t in self.types}
        self.thresholds = {t: float(config["thresholds"][t]) for t in self.types}
        self.fields = {
            t: OL.feature_fields(
                config["features"][t],
                LIMITS,
                centers={n: float(s["center"]) for n, s in self.norm[t].items()},
            )
            for t in self.types
        }
        self.hints = {t: {f.name: f.hint() for f in fs} for t, fs in self.fields.items()}
        self.matrix = {t: OL.Matrix(fs) for t, fs in self.fields.items()}
        self.required = {t: frozenset(["powertrain", *(f.name for f in fs if f.required)]) for t, fs in self.fields.items()}  # fmt: skip
        self.allowed = {t: frozenset(["powertrain", *(f.name for f in fs)]) for t, fs in self.fields.items()}
        self.names = list(dict.fromkeys(n for t in self.types for n in self.order[t]))
        variants = [
            OL.row_schema(
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
        self.output_schema = OL.output_schema(
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
            {
                "powertrain": t,
                **{f.name: OL.example_value(self.norm[t][f.name]["center"], f) for f in self.fields[t]},
            }
            for t in self.types
        ]
        self.forms = (AnomalyTelemetry(self, config),)

    def columns(self, rows: Any) -> OL.Columns:
        rows = OL.check_rows(rows)
        n = len(rows)
        kinds = []
        for i, r in enumerate(rows):
            if type(r) is not dict:
                raise InvalidInput(f"inputs[{i}]", f"expected an object, got {OL.json_type(r)}")
            t = r.get("powertrain")
            if type(t) is not str or t not in self.thresholds:
                what = "missing" if "powertrain" not in r else f"{OL.short(t)} is not a powertrain type"
                raise InvalidInput(
                    f"inputs[{i}].powertrain", f"{what}; send one of {', '.join(map(repr, self.types))}"
                )
            kinds.append(t)
        pt = np.array(kinds, dtype=object)
        cols: OL.Columns = {"powertrain": pt}
        if len(set(kinds)) == 1:
            t = kinds[0]
            index: Sequence[int] = range(n)
            OL.check_keys(rows, index, self.required[t], self.allowed[t], self.hints[t])
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
            OL.check_keys(sub, index, self.required[t], self.allowed[t], self.hints[t])
            arr = self.matrix[t].parse(sub, index)
            for j, name in enumerate(self.matrix[t].names):
                cols[name][idx] = arr[:, j]
        return cols

    def predict(self, cols: OL.Columns) -> OL.Columns:
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
