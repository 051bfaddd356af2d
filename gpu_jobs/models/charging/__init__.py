"""The charging family: the fleet charging planner (:mod:`gpu_jobs.charging`) as a served function.

No weights: the artifact holds the planner's configuration (:mod:`.planner`); the online model
(:mod:`.online`) takes a fleet snapshot (:mod:`.snapshot`) per input row and answers its plan; :mod:`.plots`
draws a plan (chargers in use per slot against the tariff). ``family.py``: :class:`ChargingFamily`, what the
registry loads. Unlike the trained families, the snapshot and the plot are also used by the ``plan_charging``
flow, so that the flow and the served function build the same problem. Names load on first use (the online
model pulls in torch through the predictor framework; the snapshot and planner config do not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depin_core.lazy import lazy_exports

_WHERE = {
    "SOLVERS": "gpu_jobs.models.charging.planner",
    "PlannerConfig": "gpu_jobs.models.charging.planner",
    "write_planner": "gpu_jobs.models.charging.planner",
    "ChargingFamily": "gpu_jobs.models.charging.family",
    "ChargingOnline": "gpu_jobs.models.charging.online",
    "charging_rows": "gpu_jobs.models.charging.snapshot",
    "FleetRow": "gpu_jobs.models.charging.snapshot",
    "FleetSnapshot": "gpu_jobs.models.charging.snapshot",
}
__all__ = [
    "SOLVERS",
    "ChargingFamily",
    "ChargingOnline",
    "FleetRow",
    "FleetSnapshot",
    "PlannerConfig",
    "charging_rows",
    "write_planner",
]

if TYPE_CHECKING:
    from gpu_jobs.models.charging.family import ChargingFamily
    from gpu_jobs.models.charging.online import ChargingOnline
    from gpu_jobs.models.charging.planner import SOLVERS, PlannerConfig, write_planner
    from gpu_jobs.models.charging.snapshot import FleetRow, FleetSnapshot, charging_rows

__getattr__, __dir__ = lazy_exports(globals(), _WHERE)
