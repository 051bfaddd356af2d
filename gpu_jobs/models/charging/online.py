"""The ``charging`` family's online model: one fleet snapshot in, its charging plan out.

Input row: a :class:`snapshot.FleetSnapshot` (site + vehicles with need, state of charge and window). Output
row: the :class:`gpu_jobs.charging.Plan` of the planner's solver chain (``model.json``'s :class:`PlannerConfig`)
— which solver answered, the schedule, energy, cost recomputed locally, unmet needs with the reason, the
feasibility check, the solver attempts — plus ``charging``: one entry per vehicle and slot it charges in
(start instant, kW). Rows are independent problems: a batch of several snapshots is solved one by one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_jobs.charging import Plan
from gpu_jobs.models import online as OL
from gpu_jobs.models.charging.planner import PlannerConfig
from gpu_jobs.models.charging.snapshot import FleetSnapshot, charging_rows, inline_refs, parse_snapshot

CHARGING_ROW = {
    "type": "object",
    "properties": {
        "vehicle": {"type": "string", "description": "the vehicle (token id)"},
        "slot": {"type": "integer", "description": "slot index from site.start"},
        "start": {"type": "string", "format": "date-time", "description": "start of the slot (UTC)"},
        "kw": {"type": "number", "x-unit": "kW", "description": "charging power in the slot"},
    },
    "required": ["vehicle", "slot", "start", "kw"],
    "additionalProperties": False,
}
EXAMPLE_SITE = {
    "chargers": 1,
    "charger_kw": 11.0,
    "slot_minutes": 60,
    "slots": 12,
    "start": "2026-11-24T18:00:00Z",
}


class ChargingOnline:
    """``charging``: fleet snapshot → charging plan (see the module docstring)."""

    dedicated_thread = (
        True  # a solve takes up to the planner's time limit per attempt: not in the shared thread
    )

    def __init__(self, config: dict[str, Any]) -> None:
        self.planner = PlannerConfig.model_validate(config["planner"])
        self.input_schema = inline_refs(FleetSnapshot.model_json_schema())
        self.input_schema["title"] = "charging-plan input row: one fleet snapshot (site + vehicles)"
        plan = inline_refs(Plan.model_json_schema())
        props = {**plan["properties"], "charging": {"type": "array", "items": CHARGING_ROW}}
        for p in props.values():
            p.pop("title", None)
        props["charging"]["description"] = "one entry per vehicle and slot it charges in"
        self.output_schema = OL.output_schema("charging-plan output row: the plan of one snapshot", props)
        self.example = [
            {
                "site": EXAMPLE_SITE,
                "fleet": [
                    {"token_id": 1, "soc_pct": 40.0, "gross_kwh": 64.0, "need_kwh": 18.0,
                     "arrive": "2026-11-24T18:00:00Z", "depart": "2026-11-25T06:00:00Z"},
                    {"token_id": 2, "soc_pct": 70.0, "gross_kwh": 50.0, "need_kwh": 9.0,
                     "arrive": "2026-11-24T19:00:00Z", "depart": "2026-11-25T06:00:00Z", "max_kw": 7.4},
                ],
            }
        ]  # fmt: skip

    def columns(self, rows: Any) -> OL.Columns:
        rows = OL.check_rows(rows)
        problems = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            problems[i] = parse_snapshot(row, f"inputs[{i}]", self.planner.max_vehicles)
        return {"problem": problems}

    def predict(self, cols: OL.Columns) -> OL.Columns:
        from gpu_jobs.charging import plan as solve  # scipy / dimod: loaded with the first request

        names = [*Plan.model_fields, "charging"]
        out = {n: np.empty(len(cols["problem"]), dtype=object) for n in names}
        cfg = self.planner
        for i, problem in enumerate(cols["problem"]):
            answer = solve(problem, cfg.solvers, seed=cfg.seed, time_limit_s=cfg.time_limit_s)
            row = {**answer.model_dump(mode="json"), "charging": charging_rows(problem, answer)}
            for n in names:
                out[n][i] = row[n]
        return out
