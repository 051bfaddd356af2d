"""Fleet charging planner: which vehicle charges in which slot, at least cost, within chargers and grid cap.

One formulation (:mod:`.formulate`: a dimod CQM and its penalty BQM), several solvers (exact MILP, greedy,
simulated annealing, Dynex), one feasibility check and repair (:mod:`.feasibility`) that every answer passes
through, and :func:`plan`, the solver chain. The solver modules (scipy, dimod, dwave-samplers) load lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from gpu_jobs.charging.problem import (
    ChargingProblem,
    EvDemand,
    Plan,
    Site,
    Unmet,
    day_night_tariff,
    ev_kw,
    slot_energy_kwh,
    slots_needed,
    target_slots,
)

if TYPE_CHECKING:
    from gpu_jobs.charging.chain import plan
    from gpu_jobs.charging.depot import FLEET_COLUMNS, problem_from_table
    from gpu_jobs.charging.feasibility import check, repair
    from gpu_jobs.charging.formulate import to_bqm, to_cqm

_LAZY = {
    "plan": "gpu_jobs.charging.chain",
    "check": "gpu_jobs.charging.feasibility",
    "repair": "gpu_jobs.charging.feasibility",
    "to_cqm": "gpu_jobs.charging.formulate",
    "to_bqm": "gpu_jobs.charging.formulate",
    "problem_from_table": "gpu_jobs.charging.depot",
    "FLEET_COLUMNS": "gpu_jobs.charging.depot",
}

__all__ = [
    "FLEET_COLUMNS",
    "ChargingProblem",
    "EvDemand",
    "Plan",
    "Site",
    "Unmet",
    "check",
    "day_night_tariff",
    "ev_kw",
    "plan",
    "problem_from_table",
    "repair",
    "slot_energy_kwh",
    "slots_needed",
    "target_slots",
    "to_bqm",
    "to_cqm",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpu_jobs.charging' has no attribute {name!r}")
